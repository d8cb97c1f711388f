"""One model shared by many callers: threads, nested captures, early stops.

Every check runs real threads on one tiny model per family (timm, Hugging Face,
torchvision) and compares with the same calls made alone on one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import (
    AttentionRollout,
    GradientRollout,
    PatchOcclusion,
    RawAttention,
    UnsupportedModelError,
    ViTGradCam,
    ablate_heads,
    adapt,
    compare_pooling,
    head_importance,
    region_probe,
)
from captum_vit._capture import _slots_in_use, _to_output_tensor

FAMILIES = ["timm_deit_distilled", "hf_vit", "torchvision_vit"]


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything a capture may touch, compared exactly before and after."""
    return {
        "forward_hooks": [dict(m._forward_hooks) for m in model.modules()],
        "forward_pre_hooks": [dict(m._forward_pre_hooks) for m in model.modules()],
        "backward_hooks": sum(len(m._backward_hooks) for m in model.modules()),
        "fused": [(type(m.fused_attn), m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")],
        "hf_impl": [
            m.config._attn_implementation_internal
            for m in model.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation_internal")
        ],
        "instance_attrs": [sorted(m.__dict__) for m in model.modules()],
        "instance_forward": ["forward" in m.__dict__ for m in model.modules()],
    }


def _calls(model: nn.Module, size: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """(name, fn(x) -> tensor): every kind of hook/patch/flag the library installs."""
    adapter = adapt(model)
    layers = adapter.num_layers

    def heads_mask(x: Tensor) -> Tensor:
        mask = torch.zeros(layers, 2, dtype=torch.bool)
        mask[0, 1] = True
        return ablate_heads(model, x, mask)

    def probe(x: Tensor) -> Tensor:
        gh, gw = adapter.grid_size(x)
        region = torch.zeros(x.shape[0], gh * gw, dtype=torch.bool)
        region[:, 0] = True
        return region_probe(model, x, region, target=0, replacement="zero").attention_shift

    return [
        ("plain", lambda x: _to_output_tensor(model(x))),
        ("raw_last", lambda x: RawAttention(model).attribute(x)),
        ("raw_first_stops_early", lambda x: RawAttention(model, layer=0).attribute(x)),
        ("rollout", lambda x: AttentionRollout(model, discard_ratio=0.5).attribute(x)),
        ("chefer", lambda x: GradientRollout(model).attribute(x, target=1)),
        ("grad_rollout", lambda x: GradientRollout(model, variant="rollout").attribute(x, target=0)),
        ("gradcam", lambda x: ViTGradCam(model).attribute(x, target=1)),
        ("occlusion", lambda x: PatchOcclusion(model).attribute(x, target=0, perturbations_per_eval=4)),
        ("head_importance", lambda x: head_importance(model, x, target=0)),
        ("ablate_heads", heads_mask),
        ("region_probe", probe),
        ("compare_pooling", lambda x: compare_pooling(model, x)["cls"]),
    ]


def _run_threads(workers: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # StopForward must be reported too
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_threads_get_their_single_threaded_results(name: str) -> None:
    model, size = make_model(name)
    calls = _calls(model, size)
    if name == "timm_deit_distilled":  # compare_pooling needs a CLS-pooling model
        calls = [c for c in calls if c[0] != "compare_pooling"]
    inputs = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    before = model_state(model)
    with torch.no_grad():
        plain_alone = [_to_output_tensor(model(x)) for x in inputs]
    alone = {(i, n): fn(inputs[i]) for i in range(8) for n, fn in calls}
    assert model_state(model) == before

    got: dict[tuple[int, str], Tensor] = {}

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            order = calls[i % len(calls) :] + calls[: i % len(calls)]  # a different mix per thread
            for n, fn in order:
                got[(i, n)] = fn(inputs[i])
                with torch.no_grad():
                    plain = _to_output_tensor(model(inputs[i]))
                assert torch.equal(plain, plain_alone[i]), f"plain forward changed in thread {i}"

        return run

    errors = _run_threads([worker(i) for i in range(8)])
    assert not errors, errors
    for key, expected in alone.items():
        assert torch.equal(got[key], expected), key
    assert model_state(model) == before
    assert _slots_in_use() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_forward_from_another_thread_during_an_open_capture(name: str) -> None:
    model, size = make_model(name)
    adapter = adapt(model)
    x = torch.randn(3, 3, size, size)
    before = model_state(model)
    with torch.no_grad():
        plain = _to_output_tensor(model(x))
    opened, done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def capturing() -> None:
        with torch.no_grad(), adapter.capture() as rec:
            opened.set()
            assert done.wait(60)
            seen["captured"] = adapter.forward(x)
        seen["recorded"] = rec.seen

    def other() -> None:
        assert opened.wait(60)
        with torch.no_grad():
            seen["other"] = _to_output_tensor(model(x))
            # a method on the other thread while the first capture is still open
            seen["rollout"] = AttentionRollout(model).attribute(x)
        done.set()

    errors = _run_threads([capturing, other])
    assert not errors, errors
    assert torch.equal(seen["other"], plain), "plain logits changed by another thread's capture"
    torch.testing.assert_close(seen["captured"], plain, atol=1e-5, rtol=1e-4)
    assert seen["recorded"] == set(range(adapter.num_layers)), "the capture saw only its own forward"
    torch.testing.assert_close(seen["rollout"], AttentionRollout(model).attribute(x))
    assert model_state(model) == before
    assert _slots_in_use() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_nested_captures_record_into_the_innermost(name: str) -> None:
    model, size = make_model(name)
    adapter = adapt(model)
    x = torch.randn(1, 3, size, size)
    before = model_state(model)
    with torch.no_grad(), adapter.capture() as outer:
        with adapter.capture(stop_after=0) as inner:
            adapter.forward(x)  # StopForward is swallowed by the inner capture
            pytest.fail("the forward should have stopped after layer 0")
        assert inner.seen == {0} and outer.seen == set()
        assert model_state(model) != before  # the outer capture is still installed
        adapter.forward(x)
        assert outer.seen == set(range(adapter.num_layers))
        # a method called inside an open capture runs its own capture, then the outer resumes
        expected_map = RawAttention(model, layer=0).attribute(x)
    assert outer.attentions[0] is not None
    torch.testing.assert_close(expected_map, RawAttention(model, layer=0).attribute(x))
    assert model_state(model) == before
    assert _slots_in_use() == 0


def test_stop_forward_never_reaches_other_threads() -> None:
    model, size = make_model("hf_vit")
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        plain = _to_output_tensor(model(x))
    before = model_state(model)
    results: list[Tensor] = []

    def stopper() -> None:
        for _ in range(40):
            RawAttention(model, layer=0).attribute(x)  # stops every forward after layer 0

    def plain_caller() -> None:
        for _ in range(40):
            with torch.no_grad():
                results.append(_to_output_tensor(model(x)))

    errors = _run_threads([stopper, stopper, plain_caller, plain_caller])
    assert not errors, errors
    assert len(results) == 80 and all(torch.equal(r, plain) for r in results)
    assert model_state(model) == before


def test_capture_cleans_up_when_forward_raises_in_threads() -> None:
    model, size = make_model("torchvision_vit")
    adapter = adapt(model)
    x = torch.randn(1, 3, size, size)
    before = model_state(model)

    def failing() -> None:
        def boom(_layer: int, _attn: Tensor) -> None:
            raise RuntimeError("boom")

        for _ in range(20):
            with pytest.raises(RuntimeError, match="boom"), adapter.capture(on_attention=boom):
                adapter.forward(x)

    def working() -> None:
        for _ in range(20):
            RawAttention(model).attribute(x)

    errors = _run_threads([failing, working, failing, working])
    assert not errors, errors
    assert model_state(model) == before
    with torch.no_grad():
        model(x)  # the unpatched torchvision forward works


# --------------------------------------------------------------------- cross-attention
class _Block(nn.Module):
    def __init__(self, dim: int, cross: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.cross = cross
        self.memory = nn.Parameter(torch.randn(1, 3, dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.cross:  # attend from the tokens to a learned memory (key = value != query)
            kv = self.memory.expand(x.shape[0], -1, -1)
            return x + self.attn(x, kv, kv, need_weights=False)[0]
        return x + self.attn(x, x.clone(), x.clone(), need_weights=False)[0]


class _TinyMhaViT(nn.Module):
    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.ModuleList([_Block(16, False), _Block(16, cross)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        for b in self.blocks:
            t = b(t)
        return self.head(t[:, 0])


def test_mha_cross_attention_is_refused_and_the_model_left_alone() -> None:
    torch.manual_seed(0)
    model = _TinyMhaViT(cross=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    before = model_state(model)
    adapter = adapt(model, attention_modules=[b.attn for b in model.blocks], patch_size=8)
    with pytest.raises(UnsupportedModelError, match="layer 1 is called as cross-attention"):
        AttentionRollout(model, adapter=adapter).attribute(x)
    with pytest.raises(UnsupportedModelError, match="cross-attention"), adapter.capture():
        adapter.forward(x)
    assert model_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_mha_self_attention_with_equal_key_and_value_tensors_is_captured_exactly() -> None:
    torch.manual_seed(0)
    model = _TinyMhaViT(cross=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    adapter = adapt(model, attention_modules=[b.attn for b in model.blocks], patch_size=8)
    with torch.no_grad(), adapter.capture() as rec:
        captured = adapter.forward(x)
    torch.testing.assert_close(captured, plain, atol=1e-6, rtol=1e-5)
    assert rec.seen == {0, 1}
    # the captured probabilities are the module's own (averaged over heads)
    tokens = torch.cat([model.cls.expand(2, -1, -1), model.embed(x).flatten(2).transpose(1, 2)], 1)
    _, own = model.blocks[0].attn(tokens, tokens, tokens)
    torch.testing.assert_close(rec.attentions[0].mean(1), own, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_copy_taken_during_a_capture_is_a_plain_model(name: str) -> None:
    import copy

    model, size = make_model(name)
    adapter = adapt(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = _to_output_tensor(model(x))
    with torch.no_grad(), adapter.capture() as rec:
        clone = copy.deepcopy(model)
        clone_logits = _to_output_tensor(clone(x))  # on the capturing thread, yet not recorded
        assert rec.seen == set()
        adapter.forward(x)
        assert rec.seen == set(range(adapter.num_layers))
    assert torch.equal(clone_logits, plain)
    assert all(type(m.fused_attn) is bool for m in clone.modules() if hasattr(m, "fused_attn"))
    with torch.no_grad():
        assert torch.equal(_to_output_tensor(clone(x)), plain)
