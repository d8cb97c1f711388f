"""``captum-vit eval``: data layouts, timm / HF / custom models, torchrun with 2 gloo
processes == 1 process, two torchrun launches as two nodes == 1 process (and one node
killed, then --resume on both), SIGKILL + --resume == an uninterrupted run, bad input,
RANK / LOCAL_RANK (shards, cuda index, who prints)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from PIL import Image

from captum_vit import adapt
from captum_vit._eval_cli import EvalUsageError, RunSpec, _init_distributed
from captum_vit._eval_io import read_shards
from captum_vit.cli import main
from captum_vit.evaluation import EvalDataset, EvaluationTable, collate, evaluate

_METHODS = ["rollout_mean", "grad_rollout_chefer", "random"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path: Path, seed: int, size: tuple[int, int] = (120, 100)) -> None:
    rng = np.random.RandomState(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path: Path, size: tuple[int, int] = (120, 100)) -> None:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[20:70, 30:90] = 12
    m[18:20, 30:90] = 255
    Image.fromarray(m).save(path)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's tiny ``test_vit`` (160 px, 1000 classes) saved as a local weights file."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "test_vit.safetensors"
    safetensors.torch.save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def labels_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.csv folder (as the shared ImageNet sample) with 12 images."""
    root = tmp_path_factory.mktemp("inet")
    lines = ["file,class_index,synset"]
    for i in range(12):
        _image(root / f"img{i:02d}.png", i)
        lines.append(f"img{i:02d}.png,{(7 * i) % 1000},x")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _run(*args: str) -> int:
    return main(["eval", "--no-progress", "--threads", "1", "--n-boot", "200", *args])


def _summary(out: Path) -> pd.DataFrame:
    """The summary without the timing rows (timings differ from run to run)."""
    frame = pd.read_csv(out / "summary.csv")
    return frame[frame["metric"] != "seconds"].reset_index(drop=True)


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


# ---------------------------------------------------------------------- layouts and models
def test_labels_csv_with_timm_model(tmp_path: Path, labels_folder: Path, timm_weights: Path) -> None:
    out = tmp_path / "out"
    rc = _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(labels_folder),
              "--methods", "rollout_mean,random", "--out", str(out), "--limit", "5", "--batch-size", "2",
              "--compare", "rollout_mean", "random")
    assert rc == 0
    rows = pd.read_csv(out / "rows-00000.csv")
    assert len(rows) == 10 and set(rows["method"]) == {"rollout_mean", "random"}
    assert rows.loc[rows["image_id"] == "img03.png", "label"].tolist() == [21, 21]
    assert rows["auc_positive"].between(0, 0.9).all() and rows["pointing"].isna().all()
    table = EvaluationTable.load(out)
    summ = pd.read_csv(out / "summary.csv")
    got = summ[(summ.method == "random") & (summ.metric == "auc_gap")].iloc[0]
    assert got["mean"] == pytest.approx(100 * table.value("random", "auc_gap"))
    assert got["ci_low"] <= got["mean"] <= got["ci_high"] and got["n"] == 5
    cmp = pd.read_csv(out / "summary_compare.csv")
    assert set(cmp["metric"]) >= {"auc_positive", "auc_negative", "auc_gap"}
    assert "Paired comparison rollout_mean − random" in (out / "summary.md").read_text()


def test_image_folder_with_classes_file_and_label_map(tmp_path: Path, timm_weights: Path) -> None:
    data = tmp_path / "folders"
    for cls, n in (("dog", 2), ("cat", 1)):
        for i in range(n):
            _image(data / cls / f"{cls}{i}.jpg", i + (10 if cls == "cat" else 0))
    (data / "empty").mkdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\nempty\n")
    out = tmp_path / "out"
    assert _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(data),
                "--classes", str(classes), "--methods", "random", "--out", str(out), "--no-perturbation") == 0
    rows = {r["image_id"]: r for r in read_shards(out)}
    assert {k: v["label"] for k, v in rows.items()} == {"cat/cat0.jpg": "1", "dog/dog0.jpg": "0", "dog/dog1.jpg": "0"}
    # without --classes: folder names looked up in the model's label map (ImageNet
    # names and synsets for a timm ImageNet head)
    data2 = tmp_path / "inet_folders"
    _image(data2 / "goldfish" / "a.png", 1)
    _image(data2 / "n01440764" / "b.png", 2)
    out2 = tmp_path / "out2"
    assert _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(data2),
                "--methods", "random", "--out", str(out2), "--no-perturbation") == 0
    assert {r["image_id"]: r["label"] for r in read_shards(out2)} == {"goldfish/a.png": "1", "n01440764/b.png": "0"}
    # a folder the label map does not know: one line, exit 2
    _image(data2 / "not_a_class" / "c.png", 3)
    assert _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(data2),
                "--methods", "random", "--out", str(tmp_path / "out3")) == 2


def test_hf_model_from_a_folder_with_masks(tmp_path: Path) -> None:
    """hf:DIR (save_pretrained), a flat folder of N_image.png with N_mask.png beside them."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(num_labels=5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    model_dir = tmp_path / "hf"
    tf.ViTForImageClassification(cfg).save_pretrained(model_dir)
    data = tmp_path / "voc"
    for i in range(3):
        _image(data / f"{i}_image.png", i)
        _mask(data / f"{i}_mask.png")
    out = tmp_path / "out"
    assert _run("--model", f"hf:{model_dir}", "--data", str(data), "--masks", str(data),
                "--methods", "rollout_mean", "random", "--out", str(out)) == 0
    rows = pd.read_csv(out / "rows-00000.csv")
    assert sorted(set(rows["image_id"])) == ["0_image.png", "1_image.png", "2_image.png"]  # masks are not images
    for k in ("pixel_accuracy", "miou", "map", "pointing", "faf", "baf", "auc_gap"):
        assert rows[k].notna().all(), k
    assert (rows["label"] == -1).all()  # a flat folder has no classes
    assert np.allclose(rows["faf"] + rows["baf"], 1.0)


def test_custom_model_and_any_iterable_with_the_library() -> None:
    """evaluate() takes a user's own ViT (adapter with attention_modules) and a plain list."""
    from test_capture import TinyViT

    torch.manual_seed(0)
    model = TinyViT(depth=2).eval()
    adapter = adapt(model, attention_modules=[a.probe for a in model.attns], num_prefix_tokens=1, patch_size=4,
                    patch_embed=model.embed)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(3, 3, 16, 16, generator=g), "label": torch.tensor([0, 1, -1]),
                "id": [f"b{b}i{i}" for i in range(3)]} for b in range(2)]
    table = evaluate(model, batches, ["rollout_mean", "grad_rollout_chefer", "random"], adapter=adapter,
                     show_progress=False)
    assert table.image_ids == sorted(f"b{b}i{i}" for b in range(2) for i in range(3))
    assert table.count("grad_rollout_chefer", "auc_gap") == 6
    # the same images in other batches give the same table
    x = torch.cat([b["image"] for b in batches])
    single = [{"image": x[i : i + 1], "label": torch.cat([b["label"] for b in batches])[i : i + 1],
               "id": [f"b{i // 3}i{i % 3}"]} for i in range(6)]
    again = evaluate(model, single, ["rollout_mean", "grad_rollout_chefer", "random"], adapter=adapter,
                     show_progress=False)
    for m in table.methods:
        for k in ("auc_positive", "auc_negative"):
            assert again.value(m, k) == pytest.approx(table.value(m, k), abs=1e-6)


# ---------------------------------------------------------------------- bad input
def test_bad_images_are_reported_per_image_and_skipped(tmp_path: Path, timm_weights: Path) -> None:
    data = tmp_path / "d"
    masks = tmp_path / "m"
    masks.mkdir()
    for i in range(4):
        _image(data / f"{i}.png", i)
        _mask(masks / f"{i}.png", (120, 100) if i != 3 else (64, 64))  # mask 3: wrong size
    (data / "broken.png").write_bytes(b"this is not a png")
    (data / "labels.csv").write_text(
        "file,class_index\n0.png,5\n1.png,1000\n2.png,3\n3.png,4\nbroken.png,2\nmissing.png,1\n"
    )
    out = tmp_path / "out"
    rc = _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(data), "--masks",
              str(masks), "--methods", "random", "--out", str(out), "--batch-size", "3")
    assert rc == 0
    table = EvaluationTable.load(out)
    assert table.image_ids == ["0.png", "2.png"]
    reasons = {e["image_id"]: e["reason"] for e in table.errors}
    assert set(reasons) == {"1.png", "3.png", "broken.png", "missing.png"}
    assert "out of range" in reasons["1.png"] and "1000" in reasons["1.png"]
    assert "64x64" in reasons["3.png"] and "120x100" in reasons["3.png"]
    assert "cannot read" in reasons["broken.png"]
    assert "4 skipped" in (out / "summary.md").read_text()
    # resuming does not report (or count) the skipped images twice
    assert _run("--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(data), "--masks",
                str(masks), "--methods", "random", "--out", str(out), "--batch-size", "3", "--resume") == 0
    assert len(EvaluationTable.load(out).errors) == 4


def test_dataset_items_and_collate(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 0)
    (tmp_path / "b.png").write_bytes(b"")
    ds = EvalDataset(tmp_path, lambda im: torch.zeros(3, 4, 4))
    assert ds.layout == "images" and ds.ids == ["a.png", "b.png"]
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (1, 3, 4, 4) and batch["id"] == ["a.png"]
    assert batch["errors"][0][0] == "b.png"
    empty = collate([ds[1]])
    assert empty["image"].shape[0] == 0


def test_cli_errors_exit_2_with_one_line(tmp_path: Path, labels_folder: Path, timm_weights: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--model", "timm:test_vit", "--weights", str(timm_weights)]
    cases = [
        [*base, "--data", str(empty), "--methods", "random", "--out", str(tmp_path / "o1")],
        [*base, "--data", str(tmp_path / "nope"), "--methods", "random", "--out", str(tmp_path / "o2")],
        [*base, "--data", str(labels_folder), "--methods", "no_such_method", "--out", str(tmp_path / "o3")],
        [*base, "--data", str(labels_folder), "--methods", "random", "--compare", "random", "rollout_mean",
         "--out", str(tmp_path / "o4")],
        ["--model", "timm:test_vit", "--weights", str(tmp_path / "none.safetensors"), "--data",
         str(labels_folder), "--methods", "random", "--out", str(tmp_path / "o5")],
        [*base, "--data", str(labels_folder), "--methods", "random", "--out", str(tmp_path / "o6"), "--batch-size", "0"],
        [*base, "--data", str(labels_folder), "--bogus"],
    ]
    for args in cases:
        capsys.readouterr()
        assert _run(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("captum-vit eval: error:"), err
    # an --out that holds a run: --resume or a new folder; --resume with other settings: refused
    out = tmp_path / "o7"
    assert _run(*base, "--data", str(labels_folder), "--methods", "random", "--out", str(out), "--limit", "2") == 0
    assert _run(*base, "--data", str(labels_folder), "--methods", "random", "--out", str(out), "--limit", "2") == 2
    assert _run(*base, "--data", str(labels_folder), "--methods", "rollout_mean", "--out", str(out),
                "--limit", "2", "--resume") == 2
    assert "other settings (methods)" in capsys.readouterr().err


# ---------------------------------------------------------------------- distributed and resume
def _nine_image_args(labels_folder: Path, timm_weights: Path) -> list[str]:
    """The eval options of the distributed tests: 9 images in batches of 2, a comparison."""
    return ["--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(labels_folder),
            "--methods", *_METHODS, "--limit", "9", "--batch-size", "2", "--compare", "grad_rollout_chefer",
            "rollout_mean"]


def _assert_same_comparison(one: Path, two: Path) -> None:
    """The paired comparisons of two runs are equal (timings aside)."""
    cmp1, cmp2 = (pd.read_csv(d / "summary_compare.csv") for d in (one, two))
    keep = cmp1["metric"] != "seconds"
    pd.testing.assert_frame_equal(cmp1[keep], cmp2[keep])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_gloo_processes_give_the_single_process_table(
    tmp_path: Path, labels_folder: Path, timm_weights: Path
) -> None:
    common = _nine_image_args(labels_folder, timm_weights)
    one = tmp_path / "one"
    assert _run(*common, "--out", str(one)) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "captum_vit", "eval", *common, "--out", str(two), "--no-progress", "--threads", "1",
           "--n-boot", "200", "--format", "parquet"]
    proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in two.glob("rows-*.csv")) == ["rows-00000.csv", "rows-00001.csv"]
    ranks = pd.concat([pd.read_csv(p) for p in sorted(two.glob("rows-*.csv"))], ignore_index=True)
    assert sorted(set(ranks["rank"])) == [0, 1] and len(ranks) == 9 * len(_METHODS)
    # --format parquet: one part per rank, together the rows of the CSV shards
    assert sorted(p.name for p in (two / "rows.parquet").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(two / "rows.parquet"), ranks, check_dtype=False, check_exact=True)
    pd.testing.assert_frame_equal(_summary(one), _summary(two))
    _assert_same_comparison(one, two)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_table(
    tmp_path: Path, labels_folder: Path, timm_weights: Path
) -> None:
    common = ["--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(labels_folder),
              "--methods", *_METHODS, "--batch-size", "2"]
    full = tmp_path / "full"
    assert _run(*common, "--out", str(full)) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "captum_vit", "eval", *common, "--out", str(killed), "--no-progress",
           "--threads", "1", "--n-boot", "200", "--format", "parquet"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "rows-00000.csv"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if shard.exists() and shard.read_text().count("\n") > 1 + 2 * len(_METHODS):  # two batches written
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = {r["image_id"] for r in read_shards(killed)}
    assert 0 < len(done) < 12
    with open(shard, "ab") as fh:  # and a torn last line, as a kill inside a write leaves
        fh.write(b"img11.png,11,random,77,3,0.5")
    assert not (killed / "rows.parquet").exists()  # killed before its part was done
    assert _run(*common, "--out", str(killed), "--resume", "--format", "parquet") == 0
    pd.testing.assert_frame_equal(_summary(full), _summary(killed))
    rows = pd.concat([pd.read_csv(p) for p in killed.glob("rows-*.csv")], ignore_index=True)
    assert len(rows) == 12 * len(_METHODS)  # no image missing, none counted twice
    assert not rows.duplicated(["image_id", "method"]).any()
    # the Parquet part written by the resumed run: the same rows, each once
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "rows.parquet"), rows, check_dtype=False, check_exact=True)
    # row by row, every metric is the uninterrupted run's, to the last bit of its text
    timing = {"seconds", "forward_seconds", "rank"}
    ref = {(r["image_id"], r["method"]): r for r in csv.DictReader((full / "rows-00000.csv").open())}
    for r in csv.DictReader((killed / "rows-00000.csv").open()):
        a = ref[(r["image_id"], r["method"])]
        assert {k: v for k, v in r.items() if k not in timing} == {k: v for k, v in a.items() if k not in timing}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nproc_starts_the_same_job_through_the_elastic_launcher(
    tmp_path: Path, labels_folder: Path, timm_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["--model", "timm:test_vit", "--weights", str(timm_weights), "--data", str(labels_folder),
              "--methods", "rollout_mean", "random", "--limit", "4", "--batch-size", "1"]
    one = tmp_path / "one"
    assert _run(*common, "--out", str(one)) == 0
    two = tmp_path / "two"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert _run(*common, "--out", str(two), "--nproc", "2") == 0
    assert sorted(p.name for p in two.glob("rows-*.csv")) == ["rows-00000.csv", "rows-00001.csv"]
    pd.testing.assert_frame_equal(_summary(one), _summary(two))
    assert "--nproc 2" in (two / "summary.md").read_text().splitlines()[0]  # the command as typed
    # inside torchrun, --nproc is refused (torchrun already started the processes)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _run(*common, "--out", str(tmp_path / "three"), "--nproc", "2") == 2


# ---------------------------------------------------------------------- ranks and nodes
_TIMING = frozenset({"seconds", "forward_seconds", "rank"})


def _rows_text(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Every shard's rows as written (text), keyed by (image, method), timings left out;
    a row written twice fails."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for shard in sorted(out.glob("rows-*.csv")):
        for r in csv.DictReader(shard.open()):
            key = (r["image_id"], r["method"])
            assert key not in rows, f"{key} written twice"
            rows[key] = {k: v for k, v in r.items() if k not in _TIMING}
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@dataclass
class _Node:
    """One ``torchrun`` launch acting as one node of a two-node job."""

    rank: int
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        """SIGKILL the launch and its workers at once, as a node that dies."""
        below = _descendants(self.proc.pid)
        for pid in (self.proc.pid, *below):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def text(self, stream: str) -> str:
        return self.log.with_suffix(f".{stream}").read_text(errors="replace")


def _start_nodes(logs: Path, args: Sequence[str]) -> list[_Node]:
    """Two ``torchrun --nnodes 2 --nproc_per_node 1 --node-rank R`` launches on this
    machine (static rendezvous at a free localhost port): each worker has LOCAL_RANK 0
    and GROUP_RANK = RANK = R, WORLD_SIZE 2."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "captum_vit", "eval", *args, "--no-progress", "--threads", "1", "--n-boot", "200"]
        log = logs / f"node{node}"
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            proc = subprocess.Popen(cmd, env=_cli_env(), stdout=out, stderr=err, start_new_session=True)
        nodes.append(_Node(node, proc, log))
    return nodes


def _report(nodes: Sequence[_Node]) -> str:
    return "\n".join(
        f"--- node {n.rank} (exit {n.proc.returncode}) stderr:\n{n.text('err')[-2500:]}" for n in nodes
    )


def _wait(nodes: Sequence[_Node], timeout: float = 150) -> list[int]:
    """Exit codes of the launches; past ``timeout`` s, both are killed and the test fails."""
    deadline = time.monotonic() + timeout
    try:
        for n in nodes:
            n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
        pytest.fail(f"the two-node run did not finish within {timeout:.0f} s\n{_report(nodes)}")
    return [int(n.proc.returncode) for n in nodes]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_torchrun_nodes_give_the_single_process_table(
    tmp_path: Path, labels_folder: Path, timm_weights: Path
) -> None:
    """Two launches as two nodes (LOCAL_RANK 0 on both) on one --out: shards by global
    rank, batches split by RANK, rank 0 alone prints and writes the summary."""
    common = _nine_image_args(labels_folder, timm_weights)
    one = tmp_path / "one"
    assert _run(*common, "--out", str(one)) == 0
    two = tmp_path / "two"
    nodes = _start_nodes(tmp_path / "logs", [*common, "--out", str(two), "--format", "parquet"])
    try:
        assert _wait(nodes) == [0, 0], _report(nodes)
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    assert sorted(p.name for p in two.glob("rows-*.csv")) == ["rows-00000.csv", "rows-00001.csv"], _report(nodes)
    for r in (0, 1):  # shard r holds the rows of rank r: batches r, r + 2, ... of 2 images
        shard = pd.read_csv(two / f"rows-{r:05d}.csv")
        assert (shard["rank"] == r).all() and ((shard["index"] // 2) % 2 == r).all()
    assert sorted(p.name for p in (two / "rows.parquet").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert _rows_text(two) == _rows_text(one)
    pd.testing.assert_frame_equal(_summary(one), _summary(two))
    _assert_same_comparison(one, two)
    # one summary, one invocation record, printed by the node of rank 0 only
    assert "wrote " in nodes[0].text("out") and nodes[1].text("out") == ""
    runs = [json.loads(line) for line in (two / "invocations.jsonl").read_text().splitlines()]
    assert [(r["processes"], r["images_after"]) for r in runs] == [(2, 9)]
    assert "2 process(es)" in (two / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/proc/self/stat").exists(), reason="needs mkfifo and /proc")
def test_one_node_killed_mid_run_then_resume_on_both_gives_the_uninterrupted_table(
    tmp_path: Path, labels_folder: Path, timm_weights: Path
) -> None:
    """Node 1 dies (launch and worker SIGKILLed) in its third batch; node 0 then fails
    instead of hanging; --resume on both nodes finishes the run: every row once, the
    table and the rows those of a single uninterrupted process."""
    common = ["--model", "timm:test_vit", "--methods", *_METHODS, "--batch-size", "2",
              "--weights", str(timm_weights)]
    full = tmp_path / "full"
    assert _run(*common, "--data", str(labels_folder), "--out", str(full)) == 0
    # the same 12 images, but img11.png (rank 1's third batch) a FIFO: reading it blocks,
    # so node 1 is killed exactly after its first two batches, whatever the machine's speed
    data = tmp_path / "data"
    shutil.copytree(labels_folder, data)
    (data / "img11.png").unlink()
    os.mkfifo(data / "img11.png")
    killed = tmp_path / "killed"
    args = [*common, "--data", str(data), "--out", str(killed)]
    nodes = _start_nodes(tmp_path / "logs1", args)
    shard = killed / "rows-00001.csv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(n.proc.poll() is None for n in nodes):
            if shard.exists() and shard.read_text().count("\n") == 1 + 4 * len(_METHODS):
                break
            time.sleep(0.05)
        assert nodes[1].proc.poll() is None, f"node 1 ended before it was killed\n{_report(nodes)}"
        assert shard.read_text().count("\n") == 1 + 4 * len(_METHODS), _report(nodes)
        nodes[1].kill()
        codes = _wait(nodes[:1], timeout=120)  # node 0 loses its peer: an error, not a hang
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    assert codes != [0], _report(nodes)
    assert "captum-vit eval: failed" in nodes[0].text("err"), _report(nodes)
    by_rank = {r: {row["image_id"] for row in csv.DictReader((killed / f"rows-{r:05d}.csv").open())} for r in (0, 1)}
    assert by_rank == {0: {f"img{i:02d}.png" for i in (0, 1, 4, 5, 8, 9)}, 1: {f"img{i:02d}.png" for i in (2, 3, 6, 7)}}
    assert not (killed / "summary.csv").exists()
    with open(shard, "ab") as fh:  # and a torn last line, as a kill inside a write leaves
        fh.write(b"img11.png,11,random,77,3,0.5")
    tmp = data / "img11.tmp"
    shutil.copy(labels_folder / "img11.png", tmp)
    os.replace(tmp, data / "img11.png")
    nodes = _start_nodes(tmp_path / "logs2", [*args, "--resume"])
    try:
        assert _wait(nodes) == [0, 0], _report(nodes)
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.kill()
    pd.testing.assert_frame_equal(_summary(full), _summary(killed))
    assert _rows_text(killed) == _rows_text(full)  # every row once, each as the uninterrupted run's
    resumed = pd.read_csv(killed / "rows-00001.csv")
    assert set(resumed.loc[resumed["index"] >= 10, "rank"]) == {1}  # node 1 did its last batch
    runs = [json.loads(line) for line in (killed / "invocations.jsonl").read_text().splitlines()]
    assert [(r["processes"], r["images_before"], r["images_after"], r["resume"]) for r in runs] == [(2, 10, 12, True)]


@pytest.mark.parametrize(("rank", "local_rank", "printed"), [(0, 0, True), (1, 0, True), (3, 1, False)])
def test_a_usage_error_is_printed_by_the_first_process_of_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    rank: int, local_rank: int, printed: bool,
) -> None:
    """LOCAL_RANK 0, not RANK 0: node 1 (RANK 1, LOCAL_RANK 0) says why it exits 2 in its
    own log (its copy of --data may be the one missing); other local ranks stay quiet."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert _run("--data", str(tmp_path), "--methods", "random", "--out", str(tmp_path / "o"), "--batch-size", "0") == 2
    want = ["captum-vit eval: error: --batch-size must be >= 1, got 0"] if printed else []
    assert capsys.readouterr().err.splitlines() == want


@pytest.mark.parametrize(("local_rank", "printed"), [(0, True), (1, False)])
def test_bench_usage_error_is_printed_once_per_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, local_rank: int, printed: bool
) -> None:
    """`bench --eval` under torchrun: like `eval`, only LOCAL_RANK 0 prints; every rank exits 2."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    missing = str(tmp_path / "absent")
    assert main(["bench", "--eval", "--data", missing, "--masks", missing, "--out", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == (1 if printed else 0)


def test_cuda_device_is_cuda_local_rank_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda: cuda:LOCAL_RANK (not RANK) for torch.cuda.set_device and nccl's
    device_id; an explicit index is kept only in a single process; CPU: gloo, no device."""
    import torch.distributed as dist

    set_device: list[torch.device] = []
    inits: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", set_device.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: inits.append((backend, kw)))

    def spec(device: str) -> RunSpec:
        return RunSpec(model="default", weights=None, sources=[], methods=["random"], method_options={},
                       replacement="zero", metric="accuracy", batch_size=1, rows_dir="o", summary_stem="o/s",
                       device=device, timeout_s=60)

    # node 1 of 2 nodes x 4 processes: RANK 5, LOCAL_RANK 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("cuda", "cuda:3"):
        set_device.clear()
        inits.clear()
        assert _init_distributed(spec(device)) == torch.device("cuda", 1)
        assert set_device == [torch.device("cuda", 1)]
        assert [(b, kw["device_id"], kw["init_method"]) for b, kw in inits] == [("nccl", torch.device("cuda", 1), "env://")]
    # more processes on the node than GPUs: one clear line (every process of the node), no group
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    inits.clear()
    with pytest.raises(EvalUsageError, match=r"6 processes on this node but 4 visible CUDA device"):
        _init_distributed(spec("cuda"))
    assert inits == []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    set_device.clear()
    inits.clear()
    assert _init_distributed(spec("cpu")) == torch.device("cpu")
    assert set_device == [] and [b for b, kw in inits] == ["gloo"] and "device_id" not in inits[0][1]
    # one process: the index given, or cuda:0; no process group
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    inits.clear()
    assert _init_distributed(spec("cuda:2")) == torch.device("cuda", 2)
    assert _init_distributed(spec("cuda")) == torch.device("cuda", 0)
    assert inits == []


def test_bench_eval_without_data_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a plain clone (no ../shared beside it) `bench --eval` names --data / --masks, exit 2."""
    missing = str(tmp_path / "absent")
    code = main(["bench", "--eval", "--data", missing, "--masks", missing, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "pass --data DIR" in err and "--masks DIR" in err and "captum-vit eval" in err
