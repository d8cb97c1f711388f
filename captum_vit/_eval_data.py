"""Image folders for ``captum-vit eval``: what each image is, without opening it.

Layouts of ``--data DIR`` (checked in this order):

* ``DIR/labels.csv`` (as the shared ImageNet sample) or ``DIR/index.csv`` (as the
  shared VOC sample): a column ``file`` or ``image`` (paths relative to ``DIR``), an
  optional class column ``class_index`` or ``label`` (empty = unknown) and an
  optional ``mask`` column;
* a torchvision ``ImageFolder`` tree (one folder per class); the class index of a
  folder comes from a ``--classes`` file (one class name per line, line ``k`` =
  class ``k``), else from the model's label map (class names, ImageNet synsets), else
  from the folder name when it is an integer;
* a flat folder of images (classes unknown: the perturbation test then scores
  agreement with the prediction).

Masks (``--masks DIR``) are matched by image stem (``S.png``, ``S_mask.png``, or
``N_mask.png`` for ``N_image.*``), in the image's sub-folder or at the top of the
masks folder, unless the table names them. A problem with one image (unreadable
file, class index out of range, mask of another size) is returned as an error item
and skipped by :func:`collate`, never raised.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EvalDataError", "EvalDataset", "collate", "read_class_file"]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class EvalDataError(ValueError):
    """The data folder cannot be used at all (raised before any image is read)."""


class _Unreadable(Exception):
    """A file of the set that cannot be read as an image or mask."""


@dataclass(frozen=True)
class _Item:
    image_id: str
    path: Path
    label: str  # raw text: parsed (and range-checked) per image
    mask: Path | None


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """Class names, one per line (line ``k`` = class ``k``; blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"--classes file not found: {p}")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise EvalDataError(f"--classes file {p} lists no class")
    return names


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _class_index(folder: str, maps: Sequence[Sequence[str]], source: str) -> int:
    for names in maps:
        exact = {n: i for i, n in enumerate(names)}
        if folder in exact:
            return exact[folder]
        loose = {_norm(n): i for i, n in enumerate(names)}
        for i, n in enumerate(names):  # "tench, Tinca tinca" also answers to "tench"
            loose.setdefault(_norm(n.split(",")[0]), i)
        if _norm(folder) in loose:
            return loose[_norm(folder)]
    if folder.lstrip("-").isdigit():
        return int(folder)
    raise EvalDataError(
        f"class folder {folder!r} matches no class of {source}; pass --classes FILE "
        "(one class name per line, line k = class k)"
    )


class EvalDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """The images of an evaluation folder, loaded one by one.

    Items are dicts ``{"id", "index", "image", "label"[, "mask", "has_mask"]}`` or,
    for an image that cannot be used, ``{"id", "index", "error"}``.

    Args:
        root (str or PathLike): the data folder (see the module docstring).
        transform (Callable): PIL image -> ``(C, H, W)`` tensor (the model's
            preprocessing).
        num_classes (int, optional): classes of the model; labels outside
            ``[0, num_classes)`` are reported per image. Default: None
        label_maps (Sequence[Sequence[str]], optional): the model's class names
            (and e.g. ImageNet synsets) used to index ``ImageFolder`` classes.
            Default: ()
        classes (Sequence[str], optional): class names from a ``--classes`` file
            (takes precedence over ``label_maps``). Default: None
        masks (str or PathLike, optional): the masks folder. Default: None
        mask_config (Mapping, optional): the model's data config for
            :func:`captum_vit.metrics.align_mask` (``input_size``, ``crop_pct``,
            ``crop_mode``). Required with ``masks``. Default: None
        limit (int, optional): use at most this many images. Default: None
        stride (int, optional): use every ``stride``-th image. Default: 1
        id_prefix (str, optional): prepended to every image id. Default: ""

    Raises:
        EvalDataError: missing or empty folder, bad table header, unknown class
            folder.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Tensor],
        *,
        num_classes: int | None = None,
        label_maps: Sequence[Sequence[str]] = (),
        classes: Sequence[str] | None = None,
        masks: str | os.PathLike[str] | None = None,
        mask_config: Mapping[str, Any] | None = None,
        limit: int | None = None,
        stride: int = 1,
        id_prefix: str = "",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise EvalDataError(f"data folder not found: {self.root}")
        self.masks = None if masks is None else Path(masks)
        if self.masks is not None and not self.masks.is_dir():
            raise EvalDataError(f"masks folder not found: {self.masks}")
        if self.masks is not None and mask_config is None:
            raise EvalDataError("masks need the model's data config (mask_config)")
        self.transform = transform
        self.num_classes = num_classes
        self.mask_config = mask_config
        self.notes: list[str] = []
        self.id_prefix = id_prefix
        if (self.root / "labels.csv").is_file():
            self.layout = "labels.csv"
            items = self._from_table(self.root / "labels.csv")
        elif (self.root / "index.csv").is_file():
            self.layout = "index.csv"
            items = self._from_table(self.root / "index.csv")
        elif any(
            p.is_dir() and not p.name.startswith(".") and (self.masks is None or p.resolve() != self.masks.resolve())
            for p in self.root.iterdir()
        ):
            self.layout = "ImageFolder"
            items = self._from_folders(classes, label_maps)
        else:
            self.layout = "images"
            items = self._from_flat()
        items = items[:: max(1, int(stride))]
        if limit is not None:
            items = items[: max(0, int(limit))]
        if not items:
            raise EvalDataError(f"no images found in {self.root} (layout: {self.layout})")
        self.items = items
        if self.masks is not None:
            missing = sum(1 for it in items if it.mask is None)
            if missing:
                self.notes.append(f"{missing} of {len(items)} images have no mask in {self.masks}")

    # ------------------------------------------------------------ layouts
    def _mask_for(self, rel: Path) -> Path | None:
        if self.masks is None:
            return None
        stem = rel.stem
        names = [f"{stem}.png", f"{stem}_mask.png"]
        if stem.endswith("_image"):
            names.insert(0, f"{stem[: -len('_image')]}_mask.png")
        for folder in (self.masks / rel.parent, self.masks):
            for n in names:
                p = folder / n
                if p.is_file() and p.resolve() != (self.root / rel).resolve():
                    return p
        return None

    def _from_table(self, path: Path) -> list[_Item]:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            col = "file" if "file" in fields else "image" if "image" in fields else None
            if col is None:
                raise EvalDataError(f"{path} needs a 'file' or 'image' column, has {fields}")
            lab = "class_index" if "class_index" in fields else "label" if "label" in fields else None
            rows = list(reader)
        items = []
        for r in rows:
            rel = Path(r[col] or "")
            mask = None
            if self.masks is not None:
                named = (r.get("mask") or "").strip()
                mask = (self.masks / named) if named else self._mask_for(rel)
                if mask is not None and not mask.is_file():
                    mask = None
            items.append(_Item(self.id_prefix + rel.as_posix(), self.root / rel, (r.get(lab) or "") if lab else "", mask))
        return items

    def _from_folders(self, classes: Sequence[str] | None, label_maps: Sequence[Sequence[str]]) -> list[_Item]:
        from torchvision.datasets.folder import find_classes, make_dataset

        skip = self.masks.resolve() if self.masks is not None else None
        folders = [
            f for f in find_classes(str(self.root))[0]
            if not f.startswith(".") and (self.root / f).resolve() != skip
        ]
        if classes is not None:
            maps: Sequence[Sequence[str]] = [classes]
            source = "the --classes file"
        else:
            maps = label_maps
            source = "the model's label map"
        class_to_idx = {f: _class_index(f, maps, source) for f in folders}
        samples = make_dataset(str(self.root), class_to_idx, extensions=_IMAGE_EXTENSIONS, allow_empty=True)
        seen = {Path(p).relative_to(self.root).parts[0] for p, _ in samples}
        empty = [f for f in folders if f not in seen]
        if empty:
            self.notes.append(f"{len(empty)} class folder(s) without images: {', '.join(empty[:5])}")
        items = []
        for p, idx in samples:
            rel = Path(p).relative_to(self.root)
            items.append(_Item(self.id_prefix + rel.as_posix(), Path(p), str(idx), self._mask_for(rel)))
        return items

    def _from_flat(self) -> list[_Item]:
        same = self.masks is not None and self.masks.resolve() == self.root.resolve()
        paths = sorted(p for p in self.root.iterdir() if _is_image(p))
        if same:
            paths = [p for p in paths if not p.stem.endswith("_mask")]
        return [_Item(self.id_prefix + p.name, p, "", self._mask_for(Path(p.name))) for p in paths]

    # ------------------------------------------------------------ items
    @property
    def ids(self) -> list[str]:
        """Image ids (paths relative to the data folder, with the prefix)."""
        return [it.image_id for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _label(self, text: str) -> int:
        text = text.strip()
        if not text:
            return -1
        try:
            label = int(text)
        except ValueError:
            raise ValueError(f"class index {text!r} is not an integer") from None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"class index {label} out of range for a {self.num_classes}-class model")
        return label

    def _load(self, i: int) -> dict[str, Any]:
        from PIL import Image

        from .io import read_image
        from .metrics import align_mask

        it = self.items[i]
        label = self._label(it.label)
        try:
            rgb = read_image(it.path)
        except (OSError, ValueError) as err:
            raise _Unreadable(str(err)) from err
        out: dict[str, Any] = {"id": it.image_id, "index": i, "image": self.transform(rgb), "label": label}
        if self.masks is None:
            return out
        assert self.mask_config is not None
        size = self.mask_config["input_size"]
        if it.mask is None:
            out["mask"] = torch.full((int(size[-2]), int(size[-1])), 255, dtype=torch.uint8)
            out["has_mask"] = False
            return out
        try:
            with Image.open(it.mask) as mk:  # label values as stored: no RGB conversion
                arr = np.array(mk)
        except OSError as err:
            raise _Unreadable(f"mask {it.mask.name}: {err}") from err
        if arr.ndim != 2:
            raise ValueError(f"mask {it.mask.name} has shape {arr.shape}, expected one channel (H, W)")
        if (arr.shape[1], arr.shape[0]) != rgb.size:
            raise ValueError(
                f"mask {it.mask.name} is {arr.shape[1]}x{arr.shape[0]}, the image is {rgb.size[0]}x{rgb.size[1]}"
            )
        out["mask"] = align_mask(torch.from_numpy(arr.astype(np.uint8)), self.mask_config)
        out["has_mask"] = True
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._load(i)
        except Exception as err:  # one bad image must not stop the run
            reason = str(err) or err.__class__.__name__
            if isinstance(err, _Unreadable) and not reason.startswith("cannot read"):
                reason = f"cannot read: {reason}"
            return {"id": self.items[i].image_id, "index": i, "error": reason}


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch :class:`EvalDataset` items, leaving out (and listing) the bad ones.

    Args:
        items (Sequence[Mapping]): dataset items.

    Returns:
        dict: ``{"image", "label", "index", "id"[, "mask", "has_mask"], "errors"}``
        where ``errors`` lists ``(id, reason)`` of the skipped images (``image`` is
        empty when every image of the batch was bad).
    """
    good = [it for it in items if "error" not in it]
    errors = [(str(it["id"]), str(it["error"])) for it in items if "error" in it]
    if not good:
        return {"image": torch.empty(0), "id": [], "index": torch.empty(0, dtype=torch.long), "errors": errors}
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in good]),
        "label": torch.tensor([int(it["label"]) for it in good], dtype=torch.long),
        "index": torch.tensor([int(it["index"]) for it in good], dtype=torch.long),
        "id": [str(it["id"]) for it in good],
        "errors": errors,
    }
    if "mask" in good[0]:
        batch["mask"] = torch.stack([it["mask"] for it in good])
        batch["has_mask"] = torch.tensor([bool(it["has_mask"]) for it in good])
    return batch
