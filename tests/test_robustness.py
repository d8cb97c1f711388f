"""compare_pooling and masking_sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn

from captum_vit import AttentionRollout, adapt, compare_pooling, masking_sweep
from captum_vit._token_masking import masked_forward
from captum_vit.masking import center_mask, random_mask, score_mask

#: which pooling reproduces the model's own output ("neither" for Dinov2's [CLS, mean] head)
_OWN = {
    "timm_vit": "cls",
    "timm_deit_distilled": "cls",
    "timm_registers": "cls",
    "timm_avgpool": "mean",
    "timm_eva": "mean",  # eva02_tiny uses global_pool="avg"
    "hf_vit": "cls",
    "hf_deit_teacher": "cls",
    "hf_dinov2": "neither",
    "hf_dinov2_registers": "neither",
    "hf_clip_vision": "cls",
    "hf_clip_classifier": "mean",
    "torchvision_vit": "cls",
}


def _randomise_head(model: nn.Module) -> None:
    heads = getattr(model, "heads", None)  # torchvision initialises its head to zero
    if heads is not None:
        with torch.no_grad():
            for p in heads.parameters():
                p.normal_(0, 0.5)


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_compare_pooling_every_family(name: str) -> None:
    model, size = make_model(name)
    _randomise_head(model)
    torch.manual_seed(0)
    x = torch.randn(3, 3, size, size)
    out = compare_pooling(model, x)
    with torch.no_grad():
        ref = adapt(model).forward(x)
    assert set(out) == {"cls", "mean"}
    assert out["cls"].shape == ref.shape == out["mean"].shape
    own = _OWN[name]
    if own != "neither":
        torch.testing.assert_close(out[own], ref, atol=1e-5, rtol=1e-5)
        other = "mean" if own == "cls" else "cls"
        assert not torch.allclose(out[other], ref, atol=1e-4)
    single = compare_pooling(model, x[1:2])
    torch.testing.assert_close(single["mean"], out["mean"][1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single["cls"], out["cls"][1:2], atol=1e-5, rtol=1e-4)


def test_compare_pooling_independent_timm_and_hf() -> None:
    model, size = make_model("timm_registers")  # 1 CLS + 4 registers
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = model.head(feats[:, 5:].mean(1))
    torch.testing.assert_close(compare_pooling(model, x)["mean"], expected)
    model, size = make_model("timm_deit_distilled")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        m = feats[:, 2:].mean(1)
        expected = (model.head(m) + model.head_dist(m)) / 2
    torch.testing.assert_close(compare_pooling(model, x)["mean"], expected)
    model, size = make_model("hf_dinov2")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        h = model.dinov2(x).last_hidden_state
        cls_expected = model.classifier(torch.cat([h[:, 0], h[:, 0]], 1))
        mean = h[:, 1:].mean(1)
        mean_expected = model.classifier(torch.cat([mean, mean], 1))
    out = compare_pooling(model, x)
    torch.testing.assert_close(out["cls"], cls_expected)
    torch.testing.assert_close(out["mean"], mean_expected)


def test_compare_pooling_custom_model_raises() -> None:
    model, size = make_model("timm_vit")
    adapter = adapt(model, attention_modules=[b.attn.attn_drop for b in model.blocks],
                    num_prefix_tokens=1, patch_size=16)
    with pytest.raises(ValueError, match="custom"):
        compare_pooling(model, torch.randn(1, 3, size, size), adapter=adapter)


def _sweep_setup() -> tuple[nn.Module, Tensor, Tensor]:
    model, size = make_model("hf_vit")  # 4x4 grid, 5 classes
    torch.manual_seed(1)
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        pred = model(x).logits.argmax(1)
    return model, x, pred


def test_masking_sweep_against_plain_loop() -> None:
    model, x, pred = _sweep_setup()
    labels = torch.arange(6) % 5
    ratios = [0.0, 0.25, 0.5, 0.9]
    strategies = ["center", "rollout_most", "rollout_least", "random"]
    res = masking_sweep(model, x, labels, strategies=strategies, ratios=ratios, batch_size=4,
                        seed=3, show_progress=False)
    assert res.agreement.shape == (4, 4) and res.accuracy is not None
    adapter = adapt(model)
    roll = AttentionRollout(model).attribute(x, return_patch_grid=True)
    assert isinstance(roll, Tensor)
    for i, s in enumerate(strategies[:3]):
        for j, r in enumerate(ratios):
            if s == "center":
                mask = center_mask((4, 4), r).expand(6, -1)
            else:
                mask = score_mask(roll, r, largest=s == "rollout_most")
            with torch.no_grad():
                out = masked_forward(adapter, x, mask, "zero").argmax(1)
            assert res.agreement[i, j].item() == pytest.approx((out == pred).float().mean().item())
            assert res.accuracy[i, j].item() == pytest.approx((out == labels).float().mean().item())
            assert res.actual_ratio[i, j].item() == pytest.approx(mask.float().mean().item())
    assert (res.agreement[:, 0] == 1).all()  # ratio 0 masks nothing
    assert res.clean_accuracy == pytest.approx((pred == labels).float().mean().item())
    # random: exact counts, repeatable, independent of batch size
    again = masking_sweep(model, x, labels, strategies=["random"], ratios=ratios, batch_size=5,
                          seed=3, show_progress=False)
    assert torch.equal(again.agreement[0], res.agreement[3])
    assert res.actual_ratio[3].tolist() == pytest.approx([0.0, 0.25, 0.5, 14 / 16])
    # random against its documented mask stream (generator seeded seed * 1000 + ratio index)
    g = torch.Generator().manual_seed(3 * 1000 + 2)
    mask = random_mask(6, 16, 0.5, generator=g)
    with torch.no_grad():
        out = masked_forward(adapter, x, mask, "zero").argmax(1)
    assert res.agreement[3, 2].item() == pytest.approx((out == pred).float().mean().item())


def test_masking_sweep_scores_and_markdown() -> None:
    model, x, pred = _sweep_setup()
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    res = masking_sweep(model, x, pred, strategies=["score_most", "score_least"], ratios=[0.5],
                        scores=scores.view(6, 1, 4, 4), replacement="drop", show_progress=False)
    # labels = predictions: accuracy equals agreement
    torch.testing.assert_close(res.accuracy, res.agreement)
    adapter = adapt(model)
    with torch.no_grad():
        out = masked_forward(adapter, x, score_mask(scores, 0.5), "drop").argmax(1)
    assert res.agreement[0, 0].item() == pytest.approx((out == pred).float().mean().item())
    md = res.to_markdown()
    assert "score_most" in md and "| strategy | 0.5 |" in md and "accuracy" in md
    assert len(res.rows()) == 2 and res.rows()[0]["strategy"] == "score_most"


def test_masking_sweep_bad_inputs() -> None:
    model, x, _ = _sweep_setup()
    with pytest.raises(ValueError, match="unknown strategy"):
        masking_sweep(model, x, strategies=["blur"], show_progress=False)
    with pytest.raises(ValueError, match="scores="):
        masking_sweep(model, x, strategies=["score_most"], show_progress=False)
    with pytest.raises(ValueError, match="labels"):
        masking_sweep(model, x, [1, 2], strategies=["center"], show_progress=False)
    with pytest.raises(ValueError, match="ratio"):
        masking_sweep(model, x, strategies=["center"], ratios=[1.2], show_progress=False)
    with pytest.raises(ValueError, match="replacement"):
        masking_sweep(model, x, strategies=["center"], replacement="blur", show_progress=False)


def test_masking_sweep_numpy_images_and_labels_equal_tensors() -> None:
    """DESIGN: inputs accept numpy arrays as well as tensors (images and targets)."""
    model, x, _ = _sweep_setup()
    labels = (torch.arange(6) % 5).numpy()
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    kw = {"strategies": ["random", "center", "rollout_most", "score_least"], "ratios": [0.25, 0.5],
          "batch_size": 4, "show_progress": False}
    ref = masking_sweep(model, x, torch.from_numpy(labels), scores=scores, **kw)  # type: ignore[arg-type]
    for images in (x.numpy(), x.double().numpy(), (x.numpy(),)):
        for lab in (labels, labels.astype(np.int32), labels.tolist()):
            got = masking_sweep(model, images, lab, scores=scores.numpy(), **kw)  # type: ignore[arg-type]
            assert got.accuracy is not None and ref.accuracy is not None
            assert torch.equal(got.agreement, ref.agreement) and torch.equal(got.accuracy, ref.accuracy)
            assert got.clean_accuracy == ref.clean_accuracy
    assert ref.accuracy is not None and ref.accuracy.abs().sum() > 0
    with pytest.raises(TypeError, match="dtype uint8"):
        masking_sweep(model, (x.numpy() * 50).astype(np.uint8), strategies=["center"], show_progress=False)
    with pytest.raises(TypeError, match="integers"):
        masking_sweep(model, x, labels.astype(np.float64), strategies=["center"], show_progress=False)
    with pytest.raises(TypeError, match="integers"):
        masking_sweep(model, x, torch.from_numpy(labels).float(), strategies=["center"], show_progress=False)
    with pytest.raises(ValueError, match="out of range"):
        masking_sweep(model, x, labels + 5, strategies=["center"], show_progress=False)  # 5 classes
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        masking_sweep(model, x.tolist(), strategies=["center"], show_progress=False)  # type: ignore[arg-type]


@pytest.mark.real_model
def test_seed_experiment_real_deit(real_deit: nn.Module, chelsea_batch: Tensor) -> None:
    """Toseef's seed experiment on chelsea: unmasked, 30 % random, 30 % centre, CLS vs mean."""
    adapter = adapt(real_deit)
    with torch.no_grad():
        logits = adapter.forward(chelsea_batch)
    assert int(logits.argmax()) == 285  # Egyptian cat
    pooled = compare_pooling(real_deit, chelsea_batch)
    torch.testing.assert_close(pooled["cls"], logits, atol=1e-5, rtol=1e-5)
    assert pooled["mean"].shape == (1, 1000)
    rmask = random_mask(1, 196, 0.3, generator=torch.Generator().manual_seed(0))
    cmask, actual = center_mask((14, 14), 0.3, return_ratio=True)
    assert int(rmask.sum()) == 59 and actual == pytest.approx(64 / 196)
    with torch.no_grad():
        for mask in (rmask, cmask):
            masked = masked_forward(adapter, chelsea_batch, mask, "zero")
            p = masked.softmax(-1)[0]
            # hiding 30 % of the cat lowers the cat's probability
            assert p[285] < logits.softmax(-1)[0, 285]
