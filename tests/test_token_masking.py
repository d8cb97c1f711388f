"""Token-level masking (captum_vit._token_masking): zero / mean / drop."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn

from captum_vit import adapt
from captum_vit._token_masking import check_mask, masked_forward, token_masking


def _randomise_head(model: nn.Module) -> None:
    """torchvision initialises its head to zero: give it weights so logits differ."""
    heads = getattr(model, "heads", None)
    if heads is not None:
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.5)


def _family(name: str) -> tuple[nn.Module, Tensor]:
    model, size = make_model(name)
    _randomise_head(model)
    torch.manual_seed(1)
    return model, torch.randn(3, 3, size, size)


def _mask(batch: int, patches: int, counts: list[int], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, patches, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, torch.randperm(patches, generator=g)[:c]] = True
    return mask


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_masking_nothing_reproduces_logits_exactly(name: str) -> None:
    model, x = _family(name)
    adapter = adapt(model)
    gh, gw = adapter.grid_size(x)
    empty = torch.zeros(3, gh * gw, dtype=torch.bool)
    with torch.no_grad():
        ref = adapter.forward(x)
        assert torch.equal(masked_forward(adapter, x, None), ref)
        for replacement in ("zero", "mean", "drop"):
            if name == "timm_eva" and replacement == "drop":
                continue
            assert torch.equal(masked_forward(adapter, x, empty, replacement), ref), replacement


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_batch_equals_single_every_family(name: str) -> None:
    model, x = _family(name)
    adapter = adapt(model)
    gh, gw = adapter.grid_size(x)
    mask = _mask(3, gh * gw, [2, 5, 2])  # unequal counts: "drop" groups samples
    replacements = ["zero", "mean"] if name == "timm_eva" else ["zero", "mean", "drop"]
    with torch.no_grad():
        ref = adapter.forward(x)
        for replacement in replacements:
            batch = masked_forward(adapter, x, mask, replacement)
            assert batch.shape == ref.shape
            for i in range(2):  # counts 2 and 5
                single = masked_forward(adapter, x[i : i + 1], mask[i : i + 1], replacement)
                torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-4)
            if name != "torchvision_vit" or replacement != "drop":
                # masking changes the output (random models are sensitive enough)
                assert not torch.equal(batch, ref), replacement


def _timm_tokens(model: nn.Module, x: Tensor, adapter_mask: Tensor | None, replacement: str) -> Tensor:
    """The token sequence entering the first block (output of pos_drop)."""
    seen: list[Tensor] = []
    handle = model.pos_drop.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        adapter = adapt(model)
        masked_forward(adapter, x, adapter_mask, replacement)
    finally:
        handle.remove()
    return seen[0]


def test_zero_keeps_position_embedding_timm() -> None:
    model, x = _family("timm_vit")
    adapter = adapt(model)
    patches = adapter.grid_size(x)[0] * adapter.grid_size(x)[1]
    mask = _mask(3, patches, [4, 4, 4])
    with torch.no_grad():
        tokens = _timm_tokens(model, x, mask, "zero")
        clean = _timm_tokens(model, x, None, "zero")
    pos = model.pos_embed[0]  # (1 + P, D): cls first
    prefix = model.num_prefix_tokens
    for i in range(3):
        idx = torch.nonzero(mask[i]).flatten()
        # a masked token is exactly its position embedding (patch embedding zeroed)
        torch.testing.assert_close(tokens[i, prefix + idx], pos[prefix + idx].expand(len(idx), -1))
        keep = torch.nonzero(~mask[i]).flatten()
        assert torch.equal(tokens[i, prefix + keep], clean[i, prefix + keep])
        assert torch.equal(tokens[i, :prefix], clean[i, :prefix])


def test_zero_keeps_position_embedding_torchvision_and_hf() -> None:
    # torchvision: conv_proj output is (B, D, gh, gw); the encoder adds pos_embedding.
    model, x = _family("torchvision_vit")
    adapter = adapt(model)
    mask = _mask(3, 16, [3, 3, 3])
    seen: list[Tensor] = []
    h = model.encoder.dropout.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            masked_forward(adapter, x, mask, "zero")
    finally:
        h.remove()
    pos = model.encoder.pos_embedding[0]
    for i in range(3):
        idx = torch.nonzero(mask[i]).flatten() + 1
        torch.testing.assert_close(seen[0][i, idx], pos[idx])
    # Hugging Face ViT: the embeddings module adds position_embeddings.
    model, x = _family("hf_vit")
    adapter = adapt(model)
    seen.clear()
    h = model.vit.embeddings.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            masked_forward(adapter, x, mask, "zero")
    finally:
        h.remove()
    pos = model.vit.embeddings.position_embeddings[0]
    for i in range(3):
        idx = torch.nonzero(mask[i]).flatten() + 1
        torch.testing.assert_close(seen[0][i, idx], pos[idx])


def test_zero_and_mean_match_hand_written_forward() -> None:
    """Independent implementation on timm: patch_embed -> replace -> pos -> blocks -> head."""
    model, x = _family("timm_vit")
    adapter = adapt(model)
    mask = _mask(3, 100, [10, 30, 0])
    with torch.no_grad():
        for replacement in ("zero", "mean"):
            emb = model.patch_embed(x)  # test_vit: dynamic size, (B, gh, gw, D)
            shape = emb.shape
            emb = emb.reshape(3, 100, -1)
            if replacement == "zero":
                emb = torch.where(mask.unsqueeze(-1), torch.zeros_like(emb), emb)
            else:
                emb = torch.where(mask.unsqueeze(-1), emb.mean(1, keepdim=True).expand_as(emb), emb)
            h = model._pos_embed(emb.reshape(shape))
            h = model.norm(model.blocks(model.norm_pre(h)))
            expected = model.forward_head(h)
            got = masked_forward(adapter, x, mask, replacement)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_drop_shortens_sequence() -> None:
    model, x = _family("timm_vit")
    adapter = adapt(model)
    mask = _mask(3, 100, [37, 37, 37])
    with torch.no_grad(), adapter.capture() as rec:
        masked_forward(adapter, x, mask, "drop")
    assert rec.num_tokens == 101 - 37
    for attn in rec.kept():
        assert attn.shape[-2:] == (64, 64)


def test_drop_equals_attention_mask_timm() -> None:
    model, x = _family("timm_vit")  # CLS-pooled
    adapter = adapt(model)
    mask = _mask(3, 100, [20, 20, 20])
    bias = torch.zeros(3, 1, 1, 101)
    bias[:, 0, 0, 1:] = torch.where(mask, float("-inf"), 0.0)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x, attn_mask=bias))
        got = masked_forward(adapter, x, mask, "drop")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # unequal counts per sample (grouped internally) against the same reference
    mask2 = _mask(3, 100, [5, 50, 20], seed=3)
    bias2 = torch.zeros(3, 1, 1, 101)
    bias2[:, 0, 0, 1:] = torch.where(mask2, float("-inf"), 0.0)
    with torch.no_grad():
        expected2 = model.forward_head(model.forward_features(x, attn_mask=bias2))
        got2 = masked_forward(adapter, x, mask2, "drop")
    torch.testing.assert_close(got2, expected2, atol=1e-5, rtol=1e-4)


def test_drop_equals_attention_mask_hf() -> None:
    model, x = _family("hf_vit")
    adapter = adapt(model)
    mask = _mask(3, 16, [4, 9, 4])
    keep = torch.cat([torch.ones(3, 1, dtype=torch.long), (~mask).long()], dim=1)
    with torch.no_grad():
        expected = model(pixel_values=x, attention_mask=keep).logits
        got = masked_forward(adapter, x, mask, "drop")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mask_shapes_accepted() -> None:
    model, x = _family("hf_vit")
    adapter = adapt(model)
    flat = _mask(3, 16, [2, 2, 2])
    with torch.no_grad():
        ref = masked_forward(adapter, x, flat, "zero")
        torch.testing.assert_close(masked_forward(adapter, x, flat.view(3, 4, 4), "zero"), ref)
        shared = masked_forward(adapter, x, flat[0], "zero")
        torch.testing.assert_close(shared, masked_forward(adapter, x, flat[:1].expand(3, -1), "zero"))


def test_numpy_images_equal_tensors() -> None:
    model, x = _family("hf_vit")
    adapter = adapt(model)
    flat = _mask(3, 16, [2, 2, 2])
    with torch.no_grad():
        for replacement in ("zero", "drop"):
            ref = masked_forward(adapter, x, flat, replacement)
            for images in (x.numpy(), x.double().numpy()):
                assert torch.equal(masked_forward(adapter, images, flat, replacement), ref)
        with pytest.raises(TypeError, match="dtype int64"):
            masked_forward(adapter, x.long().numpy(), flat, "zero")


def test_bad_inputs() -> None:
    model, x = _family("timm_vit")
    adapter = adapt(model)
    with pytest.raises(TypeError, match="bool"):
        masked_forward(adapter, x, torch.zeros(3, 100), "zero")
    with pytest.raises(ValueError, match=r"expected \(3, 100\)"):
        masked_forward(adapter, x, torch.zeros(3, 99, dtype=torch.bool), "zero")
    with pytest.raises(ValueError, match=r"expected \(3, 100\)"):
        masked_forward(adapter, x, torch.zeros(2, 100, dtype=torch.bool), "zero")
    with pytest.raises(ValueError, match="replacement"):
        masked_forward(adapter, x, torch.zeros(3, 100, dtype=torch.bool), "blur")
    with pytest.raises(TypeError):
        check_mask([[True]], 1, (1, 1))  # type: ignore[arg-type]


def test_eva_drop_raises_clear_error() -> None:
    model, size = make_model("timm_eva")
    adapter = adapt(model)
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError, match="rotary"):
        masked_forward(adapter, x, torch.ones(1, 16, dtype=torch.bool), "drop")


def test_custom_model_without_embedding_modules_raises() -> None:
    model, size = make_model("timm_vit")
    adapter = adapt(model, attention_modules=[b.attn.attn_drop for b in model.blocks],
                     num_prefix_tokens=1, patch_size=16)
    x = torch.randn(1, 3, size, size)
    mask = torch.zeros(1, 100, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch_embed="):
        masked_forward(adapter, x, mask, "zero")
    with pytest.raises(ValueError, match="token_module="):
        masked_forward(adapter, x, mask, "drop")
    described = adapt(model, attention_modules=[b.attn.attn_drop for b in model.blocks],
                      num_prefix_tokens=1, patch_size=16, patch_embed=model.patch_embed,
                      token_module=model.pos_drop)
    mask[0, :7] = True
    with torch.no_grad():
        torch.testing.assert_close(
            masked_forward(described, x, mask, "drop"), masked_forward(adapt(model), x, mask, "drop")
        )


def test_hooks_removed_also_on_error() -> None:
    model, x = _family("timm_vit")
    adapter = adapt(model)
    mask = torch.zeros(3, 100, dtype=torch.bool)
    before = (len(model.patch_embed._forward_hooks), len(model.pos_drop._forward_hooks))
    with pytest.raises(RuntimeError), token_masking(adapter, mask, "zero", grid=(10, 10)):
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="same number"), torch.no_grad(), token_masking(
        adapter, _mask(3, 100, [1, 2, 3]), "drop", grid=(10, 10)
    ):
        adapter.forward(x)
    after = (len(model.patch_embed._forward_hooks), len(model.pos_drop._forward_hooks))
    assert before == after
