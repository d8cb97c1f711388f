"""captum_vit._progress: one bar per task, finished once, result lines above it, silent when
asked or off a terminal; the CLI uses it that way."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captum_vit._progress import progress, terminal, write


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """What a terminal shows for ``raw``: ``\\r`` returns to the line start and overwrites."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    for ch in raw:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if "".join(line).strip():
        lines.append("".join(line).rstrip())
    return lines


def test_screen_emulation_known_answer() -> None:
    assert screen("abc\rX\n") == ["Xbc"]
    assert screen("one\r   \rtwo\nthree\n") == ["two", "three"]


def test_bar_finishes_once_on_one_line() -> None:
    term = FakeTerminal()
    for _ in progress(range(3), desc="task", file=term, mininterval=0):
        pass
    shown = screen(term.getvalue())
    assert len(shown) == 1, shown  # no duplicate last line
    assert shown[0].startswith("task: 100%") and "3/3" in shown[0]
    # driven by hand, as the methods do
    term = FakeTerminal()
    with progress(total=4, desc="occlusion", file=term, mininterval=0) as bar:
        for _ in range(4):
            bar.update(1)
    shown = screen(term.getvalue())
    assert len(shown) == 1 and "4/4" in shown[0]


def test_written_lines_stay_above_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    with progress(total=2, desc="explain", mininterval=0) as bar:
        for i in range(2):
            write(f"image {i}: cat")
            bar.update(1)
    write("done")
    shown = screen(term.getvalue())
    assert shown[:2] == ["image 0: cat", "image 1: cat"]
    assert shown[2].startswith("explain: 100%") and "2/2" in shown[2]
    assert shown[3:] == ["done"]


def test_disabled_bar_iterates_silently() -> None:
    term = FakeTerminal()
    assert list(progress(range(3), file=term, enabled=False)) == [0, 1, 2]
    bar = progress(total=3, file=term, disable=True)
    bar.update(3)
    bar.close()
    assert term.getvalue() == ""


def test_terminal_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert terminal()
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # piped / redirected
    assert not terminal()


def test_library_show_progress_keeps_captums_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    """``show_progress=True`` draws one bar (even off a terminal, as Captum), False none."""
    from conftest import make_model

    from captum_vit import PatchOcclusion

    model, size = make_model("timm_vit")
    x = torch.randn(1, 3, size, size)
    for flag in (True, False):
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        PatchOcclusion(model).attribute(x, target=0, perturbations_per_eval=4, show_progress=flag)
        shown = screen(err.getvalue())
        assert len(shown) == (1 if flag else 0), shown
        if flag:
            assert "100%" in shown[0]


@pytest.mark.slow
def test_cli_draws_one_bar_on_a_terminal_and_none_when_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    import timm
    from skimage import data

    from captum_vit.cli import EXIT_OK, main

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    for name in ("a", "b"):
        Image.fromarray(data.chelsea()).save(tmp_path / f"{name}.png")
    args = ["explain", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--method", "rollout_mean",
            "--batch-size", "1", "--model", "timm:test_vit", "--weights", str(weights)]
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main([*args, "--out", str(tmp_path / "o1")]) == EXIT_OK
    shown = screen(term.getvalue())
    bars = [line for line in shown if line.startswith("explain:")]
    assert len(bars) == 1 and "2/2" in bars[0], shown
    assert [line.split(":")[0] for line in shown if line.endswith(")") or "png:" in line][:2] == [
        str(tmp_path / "a.png"), str(tmp_path / "b.png")
    ]
    assert shown[-1].startswith("wrote 2 overlay(s)")
    for quiet in (["--quiet"], ["-q"]):
        term = FakeTerminal()
        monkeypatch.setattr(sys, "stdout", term)
        monkeypatch.setattr(sys, "stderr", term)
        assert main([*args, *quiet, "--out", str(tmp_path / "o2")]) == EXIT_OK
        assert term.getvalue() == ""
    # --no-progress on a terminal: the result lines, no bar
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main([*args, "--no-progress", "--out", str(tmp_path / "o3")]) == EXIT_OK
    shown = screen(term.getvalue())
    assert len(shown) == 3 and not any("%|" in line for line in shown)
