"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import AttentionRollout, GradientRollout, RawAttention, UnsupportedModelError, adapt


def test_cnn_is_unsupported() -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="no self-attention"):
        adapt(model)
    with pytest.raises(UnsupportedModelError):
        AttentionRollout(model)


def test_swin_is_unsupported_because_windowed() -> None:
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        depths=(1, 1),
        num_heads=(1, 2),
        embed_dim=16,
        img_size=32,
        window_size=4,
    )
    with pytest.raises(UnsupportedModelError, match="windowed"):
        adapt(model)
    with pytest.raises(UnsupportedModelError, match="windowed"):
        GradientRollout(model)


def test_not_a_module() -> None:
    with pytest.raises(UnsupportedModelError, match=r"nn\.Module"):
        adapt(lambda x: x)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def deit() -> tuple[nn.Module, int]:
    return make_model("timm_deit_distilled")  # fixed 64x64 input, 7 classes


def test_wrong_image_size(deit: tuple[nn.Module, int]) -> None:
    model, _ = deit
    for method in (RawAttention(model), AttentionRollout(model), GradientRollout(model)):
        with pytest.raises(ValueError, match="64x64"):
            method.attribute(torch.randn(1, 3, 48, 64))


def test_target_out_of_range(deit: tuple[nn.Module, int]) -> None:
    model, size = deit
    x = torch.randn(2, 3, size, size)
    gr = GradientRollout(model)
    with pytest.raises(ValueError, match="target 7 is out of range"):
        gr.attribute(x, target=7)
    with pytest.raises(ValueError, match="target -1 is out of range"):
        gr.attribute(x, target=[0, -1])
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        gr.attribute(x, target=[0, 1, 2])
    with pytest.raises(TypeError, match="bool"):
        gr.attribute(x, target=True)
    with pytest.raises(TypeError, match="integers"):
        gr.attribute(x, target=torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_input(deit: tuple[nn.Module, int], bad: float) -> None:
    model, size = deit
    x = torch.randn(2, 3, size, size)
    x[1, 0, 3, 3] = bad
    for method in (RawAttention(model), AttentionRollout(model), GradientRollout(model)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            method.attribute(x)


def test_finite_inputs_whose_sum_overflows_are_accepted(deit: tuple[nn.Module, int]) -> None:
    """The finiteness check sums the inputs once; a sum that overflows although every
    value is finite must not be reported as NaN / Inf."""
    model, size = deit
    adapter = RawAttention(model).adapter
    big = torch.full((1, 3, size, size), 3e38)
    assert not torch.isfinite(big.sum())
    adapter.check_inputs(big)
    half = torch.full((1, 3, size, size), 60000.0, dtype=torch.float16)
    adapter.check_inputs(half)  # the float16 sum overflows at 65504
    half[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter.check_inputs(half)


def test_malformed_inputs(deit: tuple[nn.Module, int]) -> None:
    model, size = deit
    ro = AttentionRollout(model)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ro.attribute(torch.randn(3, size, size))
    with pytest.raises(ValueError, match="empty batch"):
        ro.attribute(torch.randn(0, 3, size, size))
    with pytest.raises(ValueError, match="1-tuple"):
        ro.attribute((torch.randn(1, 3, size, size), torch.randn(1, 3, size, size)))
    with pytest.raises(TypeError, match="tensor"):
        ro.attribute([[1.0]])  # type: ignore[arg-type]


def test_bad_constructor_arguments(deit: tuple[nn.Module, int]) -> None:
    model, _ = deit
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="residual_weight"):
        AttentionRollout(model, residual_weight=1.5)
    with pytest.raises(ValueError, match="out of range"):
        RawAttention(model, layer=2)
    with pytest.raises(ValueError, match="out of range"):
        AttentionRollout(model, start_layer=-3)
    with pytest.raises(ValueError, match="variant"):
        GradientRollout(model, variant="lrp")
    with pytest.raises(ValueError, match="variant='rollout'"):
        GradientRollout(model, discard_ratio=0.5)
    other, _ = make_model("timm_vit")
    with pytest.raises(ValueError, match="different model"):
        AttentionRollout(model, adapter=adapt(other))


# ------------------------------------------------------------ custom attention modules
class _Emitter(nn.Module):
    """Returns whatever ``make(tokens)`` builds, standing in for an attention module."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, t: Tensor) -> Tensor:
        logits = t @ t.transpose(1, 2)
        if self.kind == "not_stochastic":
            return logits[:, None].exp()  # positive, rows far from 1
        if self.kind == "negative":
            p = logits[:, None].softmax(-1)
            return p - p.roll(1, -1)  # rows sum to 0, negative entries
        if self.kind == "rank3":
            return logits.softmax(-1)  # (B, N, N): no heads axis
        if self.kind == "not_square":
            return logits[:, None, :, :-1].softmax(-1)
        return logits[:, None].softmax(-1)


class _Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.attn = _Emitter(kind)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)
        a = self.attn(t)
        return self.head((a.mean(1) @ t)[:, 0] if a.ndim == 4 else t[:, 0])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_stochastic", "not row-stochastic"),
        ("negative", "not row-stochastic"),
        ("rank3", r"expected \(B, heads, N, N\)"),
        ("not_square", r"expected \(B, heads, N, N\)"),
    ],
)
def test_custom_attention_that_is_not_attention(kind: str, message: str) -> None:
    model = _Model(kind).eval()
    adapter = adapt(model, attention_modules=[model.attn], num_prefix_tokens=1, patch_size=4)
    x = torch.randn(2, 3, 8, 8)
    for method in (
        RawAttention(model, adapter=adapter),
        AttentionRollout(model, adapter=adapter),
        GradientRollout(model, adapter=adapter),
    ):
        with pytest.raises(ValueError, match=message):
            method.attribute(x)


def test_custom_attention_wrong_token_count() -> None:
    model = _Model("ok").eval()
    # 2x2 grid + 1 CLS = 5 tokens; claiming 2 prefix tokens cannot add up
    adapter = adapt(model, attention_modules=[model.attn], num_prefix_tokens=2, patch_size=4)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        AttentionRollout(model, adapter=adapter).attribute(torch.randn(1, 3, 8, 8))
    good = adapt(model, attention_modules=[model.attn], num_prefix_tokens=1, patch_size=4)
    out = AttentionRollout(model, adapter=good).attribute(torch.randn(1, 3, 8, 8), return_patch_grid=True)
    assert isinstance(out, Tensor) and out.shape == (1, 1, 2, 2)


def test_numpy_integer_targets_are_accepted(deit: tuple[nn.Module, int]) -> None:
    import numpy as np

    model, size = deit
    x = torch.randn(2, 3, size, size)
    gr = GradientRollout(model)
    torch.testing.assert_close(gr.attribute(x, target=np.int64(3)), gr.attribute(x, target=3))
    torch.testing.assert_close(
        gr.attribute(x, target=list(np.array([3, 1]))), gr.attribute(x, target=[3, 1])
    )
    with pytest.raises(ValueError, match="out of range"):
        gr.attribute(x, target=np.int64(9))



def test_numpy_images_and_targets_equal_tensors(deit: tuple[nn.Module, int]) -> None:
    import numpy as np

    from captum_vit import AttnLRP, PatchOcclusion, ViTGradCam

    model, size = deit
    x = torch.randn(2, 3, size, size)
    for method in (AttentionRollout(model), GradientRollout(model), RawAttention(model),
                   AttnLRP(model), ViTGradCam(model), PatchOcclusion(model)):
        expected = method.attribute(x, target=[3, 1])
        got = method.attribute(x.numpy(), target=np.array([3, 1]))
        assert isinstance(got, Tensor), type(method).__name__
        torch.testing.assert_close(got, expected, msg=type(method).__name__)
    gr = GradientRollout(model)
    # numpy's default float64 is taken as float32; a 1-tuple in gives a 1-tuple out
    out = gr.attribute((x.numpy().astype(np.float64),), target=np.int64(3))
    assert isinstance(out, tuple) and out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], gr.attribute(x, target=3))
    with pytest.raises(TypeError, match="floating point"):
        gr.attribute((x.numpy() * 255).astype(np.uint8))
    with pytest.raises(TypeError, match="integers"):
        gr.attribute(x.numpy(), target=np.array([3.0, 1.0]))
    with pytest.raises(ValueError, match="out of range"):
        gr.attribute(x.numpy(), target=np.array([3, 9]))

class _MHAModel(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, **kw)  # type: ignore[arg-type]
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)
        return self.head(self.mha(t, t, t, need_weights=False)[0][:, 0])


def test_custom_multihead_attention() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _MHAModel().eval()
    adapter = adapt(model, attention_modules=[model.mha], num_prefix_tokens=1, patch_size=4)
    with torch.no_grad():
        plain = model(x)
        with adapter.capture() as rec:
            captured = adapter.forward(x)
    torch.testing.assert_close(captured, plain, atol=1e-6, rtol=1e-5)
    assert rec.attentions[0] is not None and rec.attentions[0].shape == (2, 2, 5, 5)
    assert "forward" not in model.mha.__dict__
    odd = _MHAModel(kdim=6, vdim=6).eval()
    odd.mha.in_proj_weight = None  # separate q/k/v projections
    bad = adapt(odd, attention_modules=[odd.mha], num_prefix_tokens=1, patch_size=4)
    with pytest.raises(UnsupportedModelError, match="packed in-projection"):
        AttentionRollout(odd, adapter=bad).attribute(x)
    assert "forward" not in odd.mha.__dict__
