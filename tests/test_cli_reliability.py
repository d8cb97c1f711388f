"""Exit codes scripts can trust, every image a user has, and the offline hub, through the
command line (in-process ``main()`` and the real ``python -m captum_vit``).

The model is timm's tiny random ``test_vit`` (6 layers, 160 px, 16 px patches, so a
10x10 patch grid) saved as local safetensors: offline and fast.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from captum_vit.cli import EXIT_OK, EXIT_USAGE, main

ENV_MPL = {"MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import safetensors.torch
    import timm

    root = tmp_path_factory.mktemp("cli_rel")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    safetensors.torch.save_file(model.state_dict(), str(root / "tiny.safetensors"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "rgb.png")
    (root / "a_file").write_text("not a folder\n")
    return {"root": root, "weights": root / "tiny.safetensors", "rgb": root / "rgb.png", "file": root / "a_file"}


def _model(tiny: dict[str, Path]) -> list[str]:
    return ["--model", "timm:test_vit", "--weights", str(tiny["weights"]), "--no-progress"]


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _one_clear_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_bad_option_values_exit_2_with_one_line(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img, root, model = str(tiny["rgb"]), tiny["root"], _model(tiny)
    (root / "folder.png").mkdir(exist_ok=True)
    out = ["--out", str(root / "o")]
    cases: list[tuple[list[str], str]] = [
        (["explain", img, "--method", "raw_attention", "--layer", "6", *out, *model], "--layer 6 is out of range: the model has 6 layers"),
        (["explain", img, "--method", "raw_attention", "--layer", "-7", *out, *model], "--layer -7 is out of range"),
        (["explain", img, "--method", "patch_occlusion", "--window", "11", *out, *model], "--window 11 is larger than the model's 10x10 patch grid"),
        (["explain", img, "--method", "patch_occlusion", "--stride", "12", *out, *model], "--stride 12 is larger"),
        (["demo", "--methods", "raw_attention", "--layer", "9", "--out", str(root / "d"), *model], "--layer 9 is out of range"),
        (["explain", img, "--discard-ratio", "1", *out], "--discard-ratio must be in [0, 1)"),
        (["explain", img, "--discard-ratio", "-0.5", *out], "--discard-ratio must be in [0, 1)"),
        (["explain", img, "--discard-ratio", "nan", *out], "--discard-ratio must be in [0, 1)"),
        (["explain", img, "--blur-sigma", "nan", *out], "--blur-sigma must be a finite number"),
        (["explain", img, "--gamma", "0", *out], "--gamma must be a finite number > 0"),
        (["explain", img, "--batch-size", "0", *out], "--batch-size"),
        (["explain", img, "--window", "0", *out], "--window"),
        (["explain", img, "--top-k", "0", *out], "--top-k"),
        (["explain", img, "--target", "-1", *out], "--target"),
        (["explain", img, "--out", str(tiny["file"]), *model], f"--out {tiny['file']} exists and is not a directory"),
        (["explain", img, "--out", str(tiny["file"] / "sub"), *model], "is a file, not a directory"),
        (["explain", img, "--out", str(tiny["file"] / "map.png"), *model], "is a file, not a directory"),
        (["explain", img, "--out", str(root / "folder.png"), *model], "is a directory"),
        (["demo", "--out", str(tiny["file"]), *model], "exists and is not a directory"),
        (["analyze", img, "--out", str(tiny["file"]), *model], "exists and is not a directory"),
        (["explain", img, "--layer", "x", *out], "invalid int value"),
        (["explain", str(_png_claiming(root / "big.png", 12_000, 10_000)), *out],
         "12000x10000 = 120,000,000 pixels, more than the limit of 89,478,485"),
        (["explain", str(_png_claiming(root / "bomb.png", 30_000, 30_000)), *out],
         "larger than PIL's decompression-bomb limit"),
    ]
    for args, message in cases:
        assert main(args) == EXIT_USAGE, args
        line = _one_clear_line(capsys.readouterr().err)
        assert message in line, (args, line)
    assert not (root / "o").exists() and not (root / "d").exists(), "nothing is written on bad input"


def _write_every_kind(root: Path) -> dict[str, Path]:
    """One file per kind of image a user has, generated with PIL."""
    kinds: dict[str, Path] = {}
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    for suffix in ("png", "tif"):
        kinds[f"gray16_{suffix}"] = root / f"gray16.{suffix}"
        Image.fromarray(ramp).save(kinds[f"gray16_{suffix}"])
    kinds["gray8"] = root / "gray8.png"
    Image.fromarray((ramp // 257).astype(np.uint8)).save(kinds["gray8"])
    kinds["palette"] = root / "palette.png"
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").quantize(16).save(kinds["palette"])
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 1] = 180
    rgba[:, 32:, 3] = 255
    kinds["rgba"] = root / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(kinds["rgba"])
    kinds["la"] = root / "la.png"
    Image.fromarray(rgba[..., [1, 3]], mode="LA").save(kinds["la"])
    kinds["cmyk_jpeg"] = root / "cmyk.jpg"
    Image.new("CMYK", (64, 48), (0, 200, 200, 20)).save(kinds["cmyk_jpeg"])
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 8  # rotate 90 CCW to display
    kinds["exif_rotated"] = root / "rotated.jpg"
    photo.save(kinds["exif_rotated"], exif=exif.tobytes())
    kinds["smaller_than_a_patch"] = root / "tiny.png"
    Image.new("RGB", (7, 5), (200, 10, 10)).save(kinds["smaller_than_a_patch"])
    return kinds


@pytest.mark.slow
def test_every_kind_of_image_through_the_entry_point(tiny: dict[str, Path]) -> None:
    """One real ``python -m captum_vit explain`` over every kind: each map equals the
    library's on :func:`captum_vit.io.read_image`'s picture; a 7x5 image warns in one
    line."""
    from captum_vit import AttentionRollout
    from captum_vit.io import SmallImageWarning, read_image
    from captum_vit.models import load_model

    root = tiny["root"] / "kinds"
    root.mkdir()
    kinds = _write_every_kind(root)
    cmd = [sys.executable, "-m", "captum_vit", "explain", *map(str, kinds.values()),
           "--method", "rollout_mean", "--out", str(root / "maps"), *_model(tiny)]
    env = {**__import__("os").environ, **ENV_MPL}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == EXIT_OK, res.stderr
    warning_lines = [line for line in res.stderr.splitlines() if "warning" in line]
    assert warning_lines == [
        f"captum-vit explain: warning: {kinds['smaller_than_a_patch']} is 7x5 pixels, smaller than "
        "one 16x16 patch: it is upsampled to the model's input size, so its explanation shows "
        "interpolated pixels"
    ], res.stderr
    records = json.loads((root / "maps" / "explain.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in kinds.values()]

    model, transform, _ = load_model("timm:test_vit", weights=tiny["weights"])
    from captum_vit.cli import ROLLOUT_DISCARD

    rollout = AttentionRollout(model, discard_ratio=ROLLOUT_DISCARD["rollout_mean"])  # the CLI's default
    for record, (kind, path) in zip(records, kinds.items(), strict=True):
        picture = read_image(path)
        if kind == "smaller_than_a_patch":  # the library warns as the command did
            with pytest.warns(SmallImageWarning, match="7x5 pixels, smaller than one 16x16 patch"):
                tensor = transform(picture)
        else:
            tensor = transform(picture)
        expected = rollout.attribute(tensor[None], return_patch_grid=True)[0, 0]
        np.testing.assert_allclose(np.load(record["npy"]), expected.numpy(), rtol=1e-4, atol=1e-6, err_msg=kind)
    gray16 = np.asarray(read_image(kinds["gray16_png"]))
    assert gray16.min() == 0 and gray16.max() == 255 and 100 < gray16.mean() < 155, "not a white square"
    assert read_image(kinds["exif_rotated"]).size == (48, 64), "turned upright"
    assert np.asarray(read_image(kinds["rgba"]))[0, 0].tolist() == [255, 255, 255]



# ------------------------------------------------------------------------------ offline
def _count_connections(monkeypatch: pytest.MonkeyPatch, fail: bool) -> list[Any]:
    calls: list[Any] = []
    real = socket.create_connection

    def fake(address: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(address)
        if fail:
            raise OSError("Network is unreachable")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", fake)
    return calls


@pytest.fixture()
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("spec", ["timm:vit_tiny_patch16_224", "hf:google/vit-base-patch16-224"])
def test_hub_model_with_hf_hub_offline_fails_fast(
    spec: str, tiny: dict[str, Path], empty_hub_cache: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _count_connections(monkeypatch, fail=True)
    assert main(["explain", str(tiny["rgb"]), "--model", spec, "--out", str(tiny["root"] / "x")]) == EXIT_USAGE
    line = _one_clear_line(capsys.readouterr().err)
    assert "no network (HF_HUB_OFFLINE is set)" in line
    assert ("--weights FILE" if spec.startswith("timm") else "--model hf:DIR") in line
    assert calls == [], "no connection is even tried when HF_HUB_OFFLINE is set"


def test_hub_model_without_network_is_detected(
    tiny: dict[str, Path], empty_hub_cache: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    from captum_vit.models import HubOfflineError, load_model

    calls = _count_connections(monkeypatch, fail=True)
    assert main(["explain", str(tiny["rgb"]), "--model", "timm:vit_tiny_patch16_224", "--out", str(tiny["root"] / "x")]) == EXIT_USAGE
    line = _one_clear_line(capsys.readouterr().err)
    assert "no network (cannot connect to huggingface.co:443" in line and "--weights FILE" in line
    assert len(calls) == 1, "one probe, then the hub client stays offline (no retries)"
    assert constants.HF_HUB_OFFLINE is False, "offline mode is only switched on for the load"
    with pytest.raises(HubOfflineError, match="no network"):
        load_model("hf:google/vit-base-patch16-224")
    # local weights need no hub at all
    load_model("timm:test_vit", weights=tiny["weights"])
    assert len(calls) == 2
