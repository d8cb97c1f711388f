"""The captum-vit command through its real entry point (``python -m captum_vit``).

A tiny random timm ``test_vit`` (6 layers, 2 heads, 160 px, 10x10 patches) saved as
local safetensors stands in for a real model, so every run is offline and fast; the
raw maps written by the command are compared with the library called directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_vit.cli import (
    DEFAULT_METHOD,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    METHODS,
    ROLLOUT_DISCARD,
    main,
)
from captum_vit.registry import MethodEntry, available_methods

ENV = {**os.environ, "MPLBACKEND": "Agg"}
#: Entry-point processes started at once: each spends most of its time importing torch.
PARALLEL = 4


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*commands: Sequence[str | Path], timeout: float = 600) -> list[Result]:
    """Run ``python -m captum_vit ARGS`` for each command, ``PARALLEL`` at a time."""
    results: list[Result] = []
    for start in range(0, len(commands), PARALLEL):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "captum_vit", *map(str, args)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            )
            for args in commands[start : start + PARALLEL]
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(Result(proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights of a tiny timm model, two images, a non-image file."""
    import safetensors.torch
    import timm
    from skimage import data

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    safetensors.torch.save_file(model.state_dict(), str(root / "tiny.safetensors"))
    Image.fromarray(data.chelsea()).save(root / "cat.png")
    Image.fromarray(data.camera()).save(root / "camera.jpg")  # grayscale JPEG
    (root / "notes.png").write_text("this is not an image\n")
    return {
        "root": root, "weights": root / "tiny.safetensors", "cat": root / "cat.png",
        "camera": root / "camera.jpg", "text": root / "notes.png",
    }


def _model_args(tiny: dict[str, Path]) -> list[str]:
    return ["--model", "timm:test_vit", "--weights", str(tiny["weights"]), "--no-progress"]


def _inputs(tiny: dict[str, Path], *names: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from captum_vit.models import load_model

    model, transform, _ = load_model("timm:test_vit", weights=tiny["weights"])
    return model, torch.stack([transform(tiny[n]) for n in names])


def _not_blank(png: Path) -> tuple[int, int]:
    arr = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert arr.std() > 5, f"{png} looks blank"
    return arr.shape[1], arr.shape[0]


@pytest.fixture(scope="module")
def happy(tiny: dict[str, Path]) -> dict[str, tuple[Result, Path]]:
    """The happy path of explain, demo and analyze, run through the entry point at once."""
    root = tiny["root"]
    commands = {
        "explain": ["explain", tiny["cat"], tiny["camera"], "--method", "rollout", "chefer",
                    "--top-k", "2", "--batch-size", "2", "--out", root / "maps", *_model_args(tiny)],
        "demo": ["demo", "--images", "cat-and-coffee", tiny["cat"], "--out", root / "demo", *_model_args(tiny)],
        "analyze": ["analyze", tiny["cat"], tiny["camera"], "--out", root / "analysis", *_model_args(tiny)],
    }
    results = run_cli(*commands.values())
    return {
        name: (res, root / out)
        for (name, res), out in zip(zip(commands, results, strict=True), ("maps", "demo", "analysis"), strict=True)
    }


@pytest.mark.slow
def test_entry_point_help_and_bad_input(tiny: dict[str, Path]) -> None:
    """Every sub-command through ``python -m captum_vit``: bad input exits 2 with a message
    and no traceback; ``bench --help`` reaches the evaluation suite's own parser."""
    t = {k: str(v) for k, v in tiny.items()}
    model = ["--model", "timm:test_vit", "--weights", t["weights"]]
    cases: list[tuple[list[str], int, str]] = [
        (["explain", f"{t['root']}/nope.jpg", "--out", f"{t['root']}/o"], EXIT_USAGE, "image not found"),
        (["explain", t["text"], "--out", f"{t['root']}/o"], EXIT_USAGE, "cannot read"),
        (["explain", t["cat"], "--method", "gradcam++", "--out", f"{t['root']}/o"], EXIT_USAGE, "invalid choice"),
        (["explain", t["cat"], "--target", "1000", "--out", f"{t['root']}/o", *model], EXIT_USAGE, "out of range"),
        (["demo", "--images", "lena", "--out", f"{t['root']}/d"], EXIT_USAGE, "unknown demo image"),
        (["analyze", t["text"], "--out", f"{t['root']}/a"], EXIT_USAGE, "cannot read"),
        (["bench", "--help"], EXIT_OK, "--eval"),
        (["bench"], EXIT_USAGE, "--eval"),
    ]
    for (args, code, message), res in zip(cases, run_cli(*[c[0] for c in cases]), strict=True):
        assert res.returncode == code, (args, res.stderr)
        assert message in (res.stdout if code == EXIT_OK else res.stderr), (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_explain_top_k_writes_what_the_library_computes(happy, tiny: dict[str, Path]) -> None:
    res, out = happy["explain"]
    assert res.returncode == EXIT_OK, res.stderr
    records = json.loads((out / "explain.json").read_text())
    assert len(records) == 2 * (1 + 2)  # 2 images x (rollout + chefer for 2 classes)
    from captum_vit import AttentionRollout, GradientRollout

    model, x = _inputs(tiny, "cat", "camera")
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    rollout = AttentionRollout(
        model, head_fusion="mean", discard_ratio=ROLLOUT_DISCARD["rollout_mean"]
    ).attribute(x, return_patch_grid=True)
    for i, stem in enumerate(("cat", "camera")):
        grid = np.load(out / f"{stem}_rollout_mean.npy")
        assert grid.shape == (10, 10)
        np.testing.assert_allclose(grid, rollout[i, 0].numpy(), rtol=1e-5, atol=1e-7)
        assert _not_blank(out / f"{stem}_rollout_mean.png")[0] > 200
        for k in top2[i].tolist():
            chefer = GradientRollout(model).attribute(x[i : i + 1], target=k, return_patch_grid=True)
            np.testing.assert_allclose(
                np.load(out / f"{stem}_grad_rollout_chefer_class{k}.npy"), chefer[0, 0].numpy(), rtol=1e-4, atol=1e-6
            )
            _not_blank(out / f"{stem}_grad_rollout_chefer_class{k}.png")
    assert "cat.png:" in res.stdout


@pytest.mark.slow
def test_demo_report_with_every_method(happy, tiny: dict[str, Path]) -> None:
    """The composite and a user file: every method, two targets per class-specific method,
    the best-scoring method first, maps equal to the library's."""
    res, out = happy["demo"]
    assert res.returncode == EXIT_OK, res.stderr
    page = (out / "index.html").read_text()
    for name in available_methods():
        assert METHODS[name].title in page
    # per image: class-specific (two targets), class-agnostic, layers; plus the interrelation
    assert page.count('src="data:image/png;base64,') == 2 * 3 + 1
    summary = json.loads((out / "demo.json").read_text())
    assert summary["methods"][0] == DEFAULT_METHOD and sorted(summary["methods"]) == sorted(available_methods())
    assert summary["images"] == ["cat-and-coffee", str(tiny["cat"])]
    from captum_vit._demo import builtin_image

    model, x_cat = _inputs(tiny, "cat")
    from captum_vit.models import load_model

    _, transform, _ = load_model("timm:test_vit", weights=tiny["weights"])
    comp = builtin_image("cat-and-coffee")
    with torch.no_grad():
        halves = model(torch.stack([transform(p) for p in comp.parts])).argmax(1).tolist()
        top2 = model(x_cat).topk(2, dim=1).indices[0].tolist()
    composite_targets = [t["class"] for t in summary["results"]["cat-and-coffee"]["targets"]]
    assert composite_targets == (halves if halves[0] != halves[1] else composite_targets)
    assert [t["class"] for t in summary["results"][str(tiny["cat"])]["targets"]] == top2
    w, h = _not_blank(out / "cat-and-coffee_targets.png")
    specific = [m for m in available_methods() if METHODS[m].class_specific]
    assert w > len(specific) * h / 2  # two rows of (input + class-specific methods)
    _not_blank(out / "cat_agnostic.png")
    maps = np.load(out / "maps.npz")
    expected = {
        f"{stem}_{m.name}_class{c}" if m.class_specific else f"{stem}_{m.name}"
        for stem, targets in (("cat-and-coffee", composite_targets), ("cat", top2))
        for m in map(METHODS.get, available_methods()) if m is not None for c in (targets if m.class_specific else [0])
    }
    assert set(maps.files) == expected
    assert all(maps[f].shape == (10, 10) for f in maps.files)
    from captum_vit import GradientRollout

    chefer = GradientRollout(model, variant="chefer").attribute(x_cat, target=top2[1], return_patch_grid=True)
    np.testing.assert_allclose(maps[f"cat_grad_rollout_chefer_class{top2[1]}"], chefer[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    # piped output: no progress bar, one line per image and the report line
    assert "%|" not in res.stderr and "it/s" not in res.stderr
    assert res.stdout.count("targets") == 2 and "demo report:" in res.stdout


@pytest.mark.slow
def test_analyze_report(happy, tiny: dict[str, Path]) -> None:
    res, out = happy["analyze"]
    assert res.returncode == EXIT_OK, res.stderr
    rows = (out / "interrelation.csv").read_text().strip().splitlines()
    assert rows[0] == "layer,head,kk,nk,kn,nn,focus_index" and len(rows) == 1 + 6 * 2
    from captum_vit import SiftInterrelation

    model, x = _inputs(tiny, "cat", "camera")
    direct = SiftInterrelation(model, unnormalize=((0.5,) * 3, (0.5,) * 3)).analyze(x)
    kk = torch.nanmean(direct.kk, 0)
    for row in rows[1:]:
        layer, head, value = int(row.split(",")[0]), int(row.split(",")[1]), float(row.split(",")[2])
        if not np.isnan(value):
            assert abs(value - float(kk[layer, head])) < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 2 and set(summary["stages"]) == {"retrieval", "capture", "coach"}
    assert "| layer |" in (out / "interrelation.md").read_text()
    _not_blank(out / "interrelation.png")
    _not_blank(out / "cat_sift_scores.png")


@pytest.mark.slow
def test_explain_single_file_occlusion(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "one" / "cat_occlusion.png"
    code = main(["explain", str(tiny["cat"]), "--method", "occlusion", "--target", "3", "--out", str(out),
                 "--blur-sigma", "3", *_model_args(tiny)])
    assert code == EXIT_OK
    assert out.is_file() and out.with_suffix(".npy").is_file()
    _not_blank(out)
    from captum_vit import PatchOcclusion

    model, x = _inputs(tiny, "cat")
    expected = PatchOcclusion(model, replacement="drop").attribute(
        x, target=3, perturbations_per_eval=32, return_patch_grid=True
    )[0, 0]
    np.testing.assert_allclose(np.load(out.with_suffix(".npy")), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == EXIT_OK
    text = capsys.readouterr().out
    for word in ("explain", "demo", "analyze", "bench", "exit codes"):
        assert word in text
    for sub in ("explain", "demo", "analyze"):
        assert main([sub, "--help"]) == EXIT_OK
        assert "--out" in capsys.readouterr().out


def test_no_help_output_shows_a_doubled_percent(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse %-formats help= strings only (and texts with %(prog)s): a "%%" in a description or
    epilog reaches the user as "%%". Every subcommand of the parser, also eval and bench (their own
    parsers), is checked."""
    import argparse

    from captum_vit.cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = sorted(subs[0].choices)
    assert {"explain", "demo", "analyze", "eval", "bench"} <= set(commands)
    for argv in ([], *([c] for c in commands)):
        assert main([*argv, "--help"]) == EXIT_OK, argv
        text = capsys.readouterr().out
        assert "usage:" in text and "%%" not in text, (argv, text[text.find("%%") - 60 : text.find("%%") + 10])
    assert main(["eval", "--help"]) == EXIT_OK
    assert "bootstrap 95% intervals" in " ".join(capsys.readouterr().out.split())


def test_more_bad_input_in_process(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cat, cam = str(tiny["cat"]), str(tiny["camera"])
    cases = [
        (["explain", cat, cam, "--out", str(tmp_path / "x.png")], "one image"),
        (["explain", cat, "--model", "timm:test_vit", "--weights", str(tmp_path / "none.safetensors"),
          "--out", str(tmp_path / "o")], "weights file not found"),
        (["explain", cat, "--model", "torchhub:deit", "--out", str(tmp_path / "o")], "unknown model source"),
        (["explain", cat, "--device", "banana", "--out", str(tmp_path / "o")], "device"),
        (["explain", cat, "--alpha", "2", "--out", str(tmp_path / "o")], "--alpha"),
        (["analyze", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a")], "image not found"),
        (["demo", "--methods", "lime", "--out", str(tmp_path / "d")], "invalid choice"),
    ]
    for args, message in cases:
        assert main(args) == EXIT_USAGE, args
        assert message in capsys.readouterr().err, args


def test_exit_codes_for_runtime_failure_and_unsupported_model(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from captum_vit import cli

    def broken(model: object, adapter: object, options: object) -> object:
        def explain(x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("method blew up")

        return explain

    monkeypatch.setitem(cli.METHODS, "raw_attention", MethodEntry("raw_attention", "raw attention", make=broken))
    code = main(["explain", str(tiny["cat"]), "--method", "raw_attention", "--out", str(tmp_path / "o"), *_model_args(tiny)])
    assert code == EXIT_FAILURE
    assert "method blew up" in capsys.readouterr().err
    # a CNN cannot be explained by attention methods: bad input, not a crash
    import safetensors.torch
    import timm

    cnn = timm.create_model("resnet10t", pretrained=False)
    safetensors.torch.save_file(cnn.state_dict(), str(tmp_path / "cnn.safetensors"))
    monkeypatch.undo()
    code = main(["explain", str(tiny["cat"]), "--method", "rollout", "--out", str(tmp_path / "o"),
                 "--model", "timm:resnet10t", "--weights", str(tmp_path / "cnn.safetensors"), "--no-progress"])
    assert code == EXIT_USAGE
    assert "unsupported model" in capsys.readouterr().err


def test_explain_defaults_quiet_and_help(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --method explain runs the best-scoring method; --quiet prints nothing; --help
    gives the choice and its numbers."""
    out = tmp_path / "maps"
    assert main(["explain", str(tiny["cat"]), "--out", str(out), "--quiet", *_model_args(tiny)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    records = json.loads((out / "explain.json").read_text())
    assert [r["method"] for r in records] == [DEFAULT_METHOD]
    from captum_vit import GradientRollout

    model, x = _inputs(tiny, "cat")
    target = int(model(x).argmax())
    expected = GradientRollout(model, variant="rollout").attribute(x, target=target, return_patch_grid=True)
    np.testing.assert_allclose(np.load(out / f"cat_{DEFAULT_METHOD}_class{target}.npy"), expected[0, 0].numpy(), rtol=1e-4, atol=1e-7)
    # not quiet, stdout captured (not a terminal): result lines, no bar
    assert main(["explain", str(tiny["cat"]), "--out", str(out), *_model_args(tiny)[:-1]]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.count("cat.png:") == 1 and "wrote 1 overlay" in captured.out
    assert captured.err == ""
    assert main(["explain", "--help"]) == EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {DEFAULT_METHOD}" in text and "25.5" in text and "eval_deit_tiny_500.md" in text
    assert "rollout_defaults.md" in text


@pytest.mark.slow
def test_rollout_discard_defaults_and_override(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The rollout methods use the evaluated discard ratio unless --discard-ratio is given."""
    from captum_vit import AttentionRollout

    model, x = _inputs(tiny, "cat")
    for extra, discard in (([], ROLLOUT_DISCARD["rollout_min"]), (["--discard-ratio", "0"], 0.0)):
        out = tmp_path / f"r{len(extra)}"
        assert main(["explain", str(tiny["cat"]), "--method", "rollout_min", "--out", str(out), "--quiet",
                     *extra, *_model_args(tiny)]) == EXIT_OK
        expected = AttentionRollout(model, head_fusion="min", discard_ratio=discard).attribute(x, return_patch_grid=True)
        np.testing.assert_allclose(np.load(out / "cat_rollout_min.npy"), expected[0, 0].numpy(), rtol=1e-5, atol=1e-7)
