"""Models ready to explain: the bundled offline DeiT-Tiny and loaders for timm and
Hugging Face checkpoints.

* :func:`load_default` needs no network: it builds timm's ``deit_tiny_patch16_224``
  from the float16 safetensors file shipped inside the package (ImageNet-1k DeiT
  weights, Apache-2.0, Touvron et al. 2021, from facebookresearch/deit as exported in
  wvfunc/matlab-bit_true-deit_tiny-fix, see NOTICE) and returns it with its
  preprocessing and the 1000 ImageNet class names (from timm's bundled WordNet
  lemmas).
* :func:`load_model` loads ``"timm:NAME"`` or ``"hf:NAME_OR_DIR"`` models, from the
  hub (when online) or from local weights: safetensors files or
  ``torch.load(..., weights_only=True)`` checkpoints only (no pickled code runs).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._transform import ImageLike, ImageTransform, load_image

__all__ = [
    "DEFAULT_MODEL_NAME",
    "HubOfflineError",
    "ImageLike",
    "ImageTransform",
    "default_weights_path",
    "imagenet_class_names",
    "load_default",
    "load_image",
    "load_model",
    "load_state_dict",
]

#: timm architecture of the bundled model.
DEFAULT_MODEL_NAME = "deit_tiny_patch16_224"
_DEFAULT_WEIGHTS = "deit_tiny_patch16_224.fp16.safetensors"


def default_weights_path() -> Path:
    """Path of the bundled DeiT-Tiny weights (float16 safetensors, 11.4 MB).

    Returns:
        pathlib.Path: the file inside the installed package.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    path = Path(str(resources.files(__name__).joinpath("_assets", _DEFAULT_WEIGHTS)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled model weights are missing ({path}); reinstall captum-vit "
            "(the wheel ships captum_vit/models/_assets/*)"
        )
    return path


def imagenet_class_names(subset: str = "imagenet-1k") -> list[str]:
    """The ImageNet class names in timm's class-index order, offline.

    Read from timm's bundled WordNet files (``timm.data.ImageNetInfo``): index 285 is
    ``"Egyptian cat"``, 967 ``"espresso"``.

    Args:
        subset (str, optional): ``"imagenet-1k"``, ``"imagenet-21k"``, ...
            (any subset timm knows). Default: "imagenet-1k"

    Returns:
        list[str]: one description per class (comma-separated synonyms).
    """
    return list(_class_names(subset))


@functools.lru_cache(maxsize=4)
def _class_names(subset: str) -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    return tuple(str(info.index_to_description(i)) for i in range(info.num_classes()))


def load_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or ``torch.load(weights_only=True)``.

    A checkpoint that wraps the weights under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"`` is unwrapped.

    Args:
        path (str or PathLike): ``*.safetensors``, or a ``*.pt`` / ``*.pth`` / ``*.bin``
            file written by ``torch.save``.

    Returns:
        dict[str, Tensor]: parameter name -> tensor (on CPU, dtype as stored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds something other than tensors, or needs pickled code
            (refused by ``weights_only=True``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        import safetensors.torch

        try:
            return dict(safetensors.torch.load_file(str(p)))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"cannot read {p} as safetensors: {err}") from err
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, ... from torch.load
        raise ValueError(
            f"cannot read {p} with torch.load(weights_only=True) (only plain tensor "
            f"checkpoints are accepted): {err}"
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    target = model.state_dict()
    converted = {
        k: v.to(target[k].dtype) if k in target and v.is_floating_point() else v
        for k, v in state.items()
    }
    mismatched = [k for k, v in converted.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"the weights in {source} do not fit {type(model).__name__}: {len(mismatched)} "
            f"tensor(s) have other shapes, e.g. {k}: {tuple(converted[k].shape)} in the file, "
            f"{tuple(target[k].shape)} in the model"
        )
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the weights in {source} do not fit {type(model).__name__}: "
            f"{len(missing)} missing key(s) {list(missing)[:5]}, "
            f"{len(unexpected)} unexpected key(s) {list(unexpected)[:5]}"
        )


def _finish(model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _timm_transform(model: nn.Module) -> ImageTransform:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    size = cfg["input_size"]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return ImageTransform(
        transform, cfg["mean"], cfg["std"], (int(size[1]), int(size[2])), patch_size=_patch_pair(patch)
    )


def _patch_pair(patch: Any) -> tuple[int, int] | None:
    """A model's patch size as ``(h, w)``, or ``None`` when it has none."""
    if isinstance(patch, int):
        return (patch, patch)
    if isinstance(patch, (tuple, list)) and len(patch) == 2:
        return (int(patch[0]), int(patch[1]))
    return None


def _timm_class_names(model: nn.Module) -> list[str]:
    import timm.data

    num = int(getattr(model, "num_classes", 0) or 0)
    subset = timm.data.infer_imagenet_subset(model)
    if subset is not None:
        names = imagenet_class_names(subset)
        if len(names) == num:
            return names
    return [f"class {i}" for i in range(num)]


def load_default(
    *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, ImageTransform, list[str]]:
    """The bundled ImageNet DeiT-Tiny, its preprocessing and class names, offline.

    The model is timm's ``deit_tiny_patch16_224`` (5.7M parameters, 12 layers,
    3 heads, 16x16 patches, 224x224 input, one CLS token) with the float16 weights
    shipped in the package, converted to float32 (or ``dtype``) and in eval mode.
    The weights are the DeiT weights (Apache-2.0, facebookresearch/deit) as exported
    in wvfunc/matlab-bit_true-deit_tiny-fix; their LayerNorm parameters are rounded,
    so predictions are close to, not identical with, the official checkpoint
    (skimage's ``chelsea`` -> 285 "Egyptian cat", ``coffee`` -> 967 "espresso").

    Args:
        device (str or torch.device, optional): where to put the model.
            Default: None (CPU)
        dtype (torch.dtype, optional): parameter dtype. Default: None (float32)

    Returns:
        tuple: ``(model, transform, class_names)`` where ``model`` is an
        ``nn.Module`` returning logits ``(B, 1000)``, ``transform`` an
        :class:`ImageTransform` (PIL image, array or path -> ``(3, 224, 224)``: bicubic
        resize, centre crop 0.9, ImageNet mean/std) and ``class_names`` a list of
        1000 strings in class-index order.

    Example::

        >>> from captum_vit.models import load_default
        >>> from skimage import data
        >>> model, transform, names = load_default()
        >>> x = transform(data.chelsea()).unsqueeze(0)
        >>> names[model(x).argmax().item()]
        'Egyptian cat'
    """
    import timm

    model = timm.create_model(DEFAULT_MODEL_NAME, pretrained=False)
    _apply_state_dict(model, load_state_dict(default_weights_path()), "the bundled weights")
    model = _finish(model, device, dtype)
    return model, _timm_transform(model), imagenet_class_names()


def _load_timm(
    name: str, weights: Path | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, ImageTransform, list[str]]:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"timm has no model named {name!r} (see timm.list_models())")
    model = timm.create_model(name, pretrained=weights is None, **kwargs)
    if weights is not None:
        _apply_state_dict(model, load_state_dict(weights), str(weights))
    return model, _timm_transform(model), _timm_class_names(model)


def _hf_transform(source: str, config: Any) -> ImageTransform:
    from torchvision import transforms as T

    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        processor = None
    size = getattr(config, "image_size", 224)
    size = int(size if isinstance(size, int) else size[0])
    if processor is None:
        # transformers' ViTImageProcessor defaults: resize, mean = std = 0.5
        mean = std = (0.5, 0.5, 0.5)
        transform = T.Compose(
            [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(), T.Normalize(mean, std)]
        )
        return ImageTransform(
            transform, mean, std, (size, size), patch_size=_patch_pair(getattr(config, "patch_size", None))
        )
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))

    def run_processor(image: Any) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]  # type: ignore[misc]

    probe = run_processor(load_image(np.zeros((8, 8, 3), dtype=np.uint8)))
    return ImageTransform(
        run_processor, mean, std, (int(probe.shape[-2]), int(probe.shape[-1])),
        patch_size=_patch_pair(getattr(config, "patch_size", None)),
    )


def _load_hf(
    source: str, weights: Path | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, ImageTransform, list[str]]:
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ValueError(
            f"cannot load a Hugging Face config from {source!r} (a hub name or a directory "
            f"with config.json): {err}"
        ) from err
    if weights is None:
        model = AutoModelForImageClassification.from_pretrained(source, **kwargs)
    else:
        model = AutoModelForImageClassification.from_config(config, **kwargs)
        _apply_state_dict(model, load_state_dict(weights), str(weights))
    cfg = model.config
    vision_cfg = getattr(cfg, "vision_config", cfg)
    id2label = getattr(cfg, "id2label", None) or {}
    names = [str(id2label.get(i, f"class {i}")) for i in range(int(getattr(cfg, "num_labels", len(id2label))))]
    return model, _hf_transform(source, vision_cfg), names


def load_model(
    spec: str,
    weights: str | PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, ImageTransform, list[str]]:
    """Load a classifier to explain, with its preprocessing and class names.

    Args:
        spec (str): ``"default"`` (the bundled DeiT-Tiny, see :func:`load_default`),
            ``"timm:NAME"`` (``timm.create_model(NAME)``; downloads pretrained weights
            from the hub unless ``weights`` is given) or ``"hf:NAME_OR_DIR"`` (Hugging
            Face ``AutoModelForImageClassification`` from the hub or from a directory
            written by ``save_pretrained``).
        weights (str or PathLike, optional): local weights to load instead of the
            hub's: a ``.safetensors`` file or a ``torch.save`` state dict read with
            ``weights_only=True``. For ``hf:`` the architecture comes from the config
            of ``NAME_OR_DIR``. Default: None
        device (str or torch.device, optional): where to put the model. Default: None
        dtype (torch.dtype, optional): parameter dtype. Default: None
        **model_kwargs (Any): passed to ``timm.create_model`` (e.g. ``num_classes``,
            ``img_size``) or to ``from_pretrained`` / ``from_config``.

    Returns:
        tuple: ``(model, transform, class_names)`` as in :func:`load_default`; the
        model is in eval mode. Class names are the ImageNet names for timm ImageNet
        heads, the config's ``id2label`` for Hugging Face, else ``"class i"``.

    Raises:
        ValueError: unknown prefix or model name, unreadable or mismatching weights.
        HubOfflineError: (a ``ValueError``) the hub is unreachable (no network, or
            ``HF_HUB_OFFLINE`` set) and the model's files are not in the local cache;
            raised at once, without the hub clients' minute of retries.
        FileNotFoundError: ``weights`` does not exist.

    Example::

        >>> model, transform, names = load_model("timm:deit_small_patch16_224")
        >>> model, transform, names = load_model(
        ...     "timm:vit_tiny_patch16_224", weights="vit_tiny.safetensors")
        >>> model, transform, names = load_model("hf:./my-finetuned-vit")
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string like 'timm:NAME' or 'hf:NAME', got {type(spec).__name__}")
    path = Path(weights) if weights is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    prefix, _, name = spec.partition(":")
    if spec == "default" and path is None and not model_kwargs:
        return load_default(device=device, dtype=dtype)
    if prefix == "default" or spec == "default":
        raise ValueError("'default' takes no weights or model arguments; use 'timm:NAME' instead")
    if not name:
        raise ValueError(f"model spec {spec!r} should look like 'default', 'timm:NAME' or 'hf:NAME_OR_DIR'")
    if prefix not in ("timm", "hf"):
        raise ValueError(f"unknown model source {prefix!r} in {spec!r}: use 'timm:' or 'hf:'")
    needs_hub = (prefix == "timm" and path is None) or (prefix == "hf" and not Path(name).is_dir())
    with _hub_access(spec, prefix, needs_hub):
        if prefix == "timm":
            model, transform, names = _load_timm(name, path, model_kwargs)
        else:
            model, transform, names = _load_hf(name, path, model_kwargs)
    return _finish(model, device, dtype), transform, names


def _mask_config(spec: str, model: nn.Module, transform: ImageTransform) -> dict[str, Any]:
    """The resize / crop geometry of ``load_model(spec)``'s preprocessing.

    What :func:`captum_vit.metrics.align_mask` needs to give segmentation masks the
    pixels of the model input: ``input_size`` ``(3, H, W)``, ``crop_pct`` and
    ``crop_mode``. Family knowledge stays here: a Hugging Face image processor that
    centre-crops after resizing the shorter side gives ``crop_pct = H / shortest_edge``
    (``"center"``), one that centre-crops after resizing to ``(height, width)`` (DeiT)
    gives ``crop_pct = H / height`` (``"squash"``), one that does not crop (or none)
    squashes the image to ``(H, W)``; a timm model (and ``"default"``) gives timm's own
    data config.

    Args:
        spec (str): the spec the model was loaded with (see :func:`load_model`).
        model (nn.Module): the loaded model.
        transform (ImageTransform): its preprocessing, as :func:`load_model` returned it.

    Returns:
        dict[str, Any]: a data config for :func:`~captum_vit.metrics.align_mask`.
    """
    h, w = (int(v) for v in transform.input_size)
    prefix, _, name = spec.partition(":")
    if prefix == "hf":
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            proc = None
        if proc is not None and getattr(proc, "do_center_crop", False):
            size = getattr(proc, "size", {}) or {}
            short = size.get("shortest_edge")
            if short:  # shorter side resized to `short` (aspect kept), then the centre crop
                return {"input_size": (3, h, w), "crop_pct": min(1.0, h / float(short)), "crop_mode": "center"}
            height = size.get("height")
            if height:  # both sides resized to (height, width) (aspect lost), then the centre crop
                return {"input_size": (3, h, w), "crop_pct": min(1.0, h / float(height)), "crop_mode": "squash"}
        return {"input_size": (3, h, w), "crop_pct": 1.0, "crop_mode": "squash"}
    import timm.data

    return dict(timm.data.resolve_data_config({}, model=model))


def _label_maps(model: nn.Module, class_names: Sequence[str]) -> list[list[str]]:
    """Label maps a class folder's name is looked up in: ``class_names``, and for a timm
    ImageNet head also its WordNet synsets (``n01440764``)."""
    maps = [list(class_names)]
    try:
        import timm.data

        subset = timm.data.infer_imagenet_subset(model)
        if subset is not None:
            info = timm.data.ImageNetInfo(subset)
            maps.append(list(info.label_names()))
    except Exception:  # not a timm ImageNet head: class names only
        pass
    return maps


class HubOfflineError(ValueError):
    """A hub model was asked for without network and its files are not cached locally."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or ``None`` when it can.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set means offline. Otherwise one
    TCP connection to the hub's host is tried (at most about ``timeout`` seconds,
    name resolution included; a machine without network fails it at once); behind a proxy
    (``HTTPS_PROXY`` / ``ALL_PROXY``) the hub is assumed reachable.
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"{var} is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode"
        endpoint = str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - a dependency of timm and transformers
        endpoint = "https://huggingface.co"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:  # in a thread: name resolution is not bounded by the socket timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {host}:{port} ({err.__class__.__name__}: {err})")

    worker = threading.Thread(target=probe, name="captum-vit-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout + 1.0:g} s"
    return outcome[0]


@contextlib.contextmanager
def _hub_access(spec: str, prefix: str, needs_hub: bool) -> Iterator[None]:
    """Load from the local cache only, failing fast with a clear message, when offline.

    Without network the hub clients would retry for about a minute before failing;
    instead ``huggingface_hub`` is put in offline mode for the duration of the load
    (files already in the local cache still load), and a miss raises
    :class:`HubOfflineError` saying how to pass local weights.
    """
    reason = _offline_reason() if needs_hub else None
    if reason is None:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except (OSError, ValueError) as err:
        if not _is_hub_miss(err):
            raise
        local = (
            "pass local weights: --weights FILE (.safetensors or a torch.save state dict; in "
            f"Python load_model({spec!r}, weights=FILE))"
            if prefix == "timm"
            else "pass a local directory written by save_pretrained: --model hf:DIR (config.json "
            "and weights), or the config directory with --weights FILE"
        )
        raise HubOfflineError(
            f"no network ({reason}): {spec} needs files from the Hugging Face hub that are not "
            f"in the local cache; {local}"
        ) from err
    finally:
        constants.HF_HUB_OFFLINE = previous


def _is_hub_miss(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a hub file missing from the local cache."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover
        return False
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        text = str(node)
        if isinstance(node, OSError) and ("cached files" in text or "local cache" in text):
            return True
        node = node.__cause__ or node.__context__
    return False
