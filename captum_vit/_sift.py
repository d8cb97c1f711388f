"""SIFT keypoint counting per patch of a ViT's patch grid (OpenCV).

The counts are taken on the image the model sees: after resize / crop, before
normalisation. :func:`unnormalize_inputs` undoes the normalisation of a model input
batch (default: ImageNet mean and std) and :func:`keypoint_counts` runs OpenCV's SIFT
detector on each image and counts the keypoints falling into each patch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "keypoint_counts", "unnormalize_inputs"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: What ``unnormalize=`` accepts: a callable ``(B, C, H, W) -> (B, C, H, W)`` in
#: [0, 1], or a ``(mean, std)`` pair of per-channel sequences.
Unnormalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]] | None


def unnormalize_inputs(inputs: Tensor, unnormalize: Unnormalize = None) -> Tensor:
    """Invert the preprocessing normalisation of a model input batch.

    Args:
        inputs (Tensor): normalised images ``(B, C, H, W)``.
        unnormalize (Callable or (mean, std) or None, optional): a function returning
            the images in [0, 1], or per-channel ``(mean, std)`` so that the image is
            ``inputs * std + mean``. ``None`` uses the ImageNet mean and std.
            Default: None

    Returns:
        Tensor: float32 images ``(B, C, H, W)`` clamped to [0, 1].

    Example::

        >>> imgs = unnormalize_inputs(batch)      # ImageNet statistics
        >>> imgs = unnormalize_inputs(batch, ((0.5,) * 3, (0.5,) * 3))
    """
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        raise ValueError("inputs must be a tensor (B, C, H, W)")
    x = inputs.detach().float()
    if callable(unnormalize):
        out = unnormalize(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                "unnormalize must return a tensor of the input's shape (B, C, H, W) in [0, 1]"
            )
        return out.detach().float().clamp(0.0, 1.0)
    if unnormalize is None:
        mean_s: Sequence[float] = IMAGENET_MEAN
        std_s: Sequence[float] = IMAGENET_STD
    else:
        if not (isinstance(unnormalize, tuple) and len(unnormalize) == 2):
            raise TypeError(
                "unnormalize must be None, a callable or a (mean, std) pair of per-channel "
                f"sequences, got {unnormalize!r}"
            )
        mean_s, std_s = unnormalize
    mean = torch.as_tensor(mean_s, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std_s, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    if mean.shape[1] not in (1, x.shape[1]) or std.shape[1] not in (1, x.shape[1]):
        raise ValueError(
            f"unnormalize mean/std have {mean.shape[1]}/{std.shape[1]} channels; the inputs "
            f"have {x.shape[1]}"
        )
    return (x * std + mean).clamp(0.0, 1.0)


def _to_gray_uint8(images: Tensor | np.ndarray) -> list[np.ndarray]:
    """Images -> list of 2-D uint8 grey images.

    Accepts uint8 ``(H, W, C)`` / ``(B, H, W, C)`` / ``(H, W)`` (numpy or tensor), or
    float ``(C, H, W)`` / ``(B, C, H, W)`` in [0, 1].
    """
    if isinstance(images, Tensor):
        arr = images.detach().cpu()
        is_float = arr.is_floating_point()
        if is_float:
            arr = arr.float()
        np_arr = arr.numpy()
    elif isinstance(images, np.ndarray):
        np_arr = images
        is_float = np.issubdtype(np_arr.dtype, np.floating)
    else:
        raise TypeError(
            f"images must be a tensor or numpy array, got {type(images).__name__}"
        )
    if is_float:
        # float CHW / BCHW in [0, 1]
        if np_arr.ndim == 3:
            np_arr = np_arr[None]
        if np_arr.ndim != 4 or np_arr.shape[1] not in (1, 3):
            raise ValueError(
                f"float images must be (C, H, W) or (B, C, H, W) with C in (1, 3) and values in "
                f"[0, 1]; got shape {tuple(np_arr.shape)}"
            )
        if not np.isfinite(np_arr).all():
            raise ValueError("images contain NaN or Inf")
        if np_arr.min() < -1e-3 or np_arr.max() > 1 + 1e-3:
            raise ValueError(
                "float images must lie in [0, 1] (pass normalised model inputs to analyze() "
                "and let unnormalize= invert them, or pass uint8 HWC images)"
            )
        u8 = np.clip(np.rint(np_arr * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    else:
        if np_arr.dtype != np.uint8:
            raise TypeError(
                f"integer images must be uint8 (H, W, C), got dtype {np_arr.dtype}; float "
                "images must be (C, H, W) in [0, 1]"
            )
        if np_arr.ndim == 2:
            np_arr = np_arr[None, :, :, None]
        elif np_arr.ndim == 3:
            np_arr = np_arr[None]
        if np_arr.ndim != 4 or np_arr.shape[-1] not in (1, 3):
            raise ValueError(
                f"uint8 images must be (H, W, C) or (B, H, W, C) with C in (1, 3); got shape "
                f"{tuple(np_arr.shape)}"
            )
        u8 = np_arr
    out: list[np.ndarray] = []
    for img in u8:
        gray = img[..., 0] if img.shape[-1] == 1 else cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
        out.append(np.ascontiguousarray(gray))
    return out


def keypoint_counts(
    images: Tensor | np.ndarray,
    patch_size: int | tuple[int, int],
    *,
    grid: tuple[int, int] | None = None,
    sift_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Number of SIFT keypoints in each patch of each image.

    A keypoint at pixel ``(x, y)`` belongs to patch ``(y // ph, x // pw)``; keypoints
    outside the patch grid (in pixels a non-padding patch embedding crops away) are
    not counted.

    Args:
        images (Tensor or ndarray): uint8 ``(H, W, C)`` / ``(B, H, W, C)`` (RGB or
            grey), or float ``(C, H, W)`` / ``(B, C, H, W)`` in [0, 1]: the image the
            model sees, before normalisation.
        patch_size (int or (int, int)): patch height and width in pixels.
        grid (tuple[int, int], optional): the patch grid ``(gh, gw)``. Default: None
            (``(H // ph, W // pw)``)
        sift_options (Mapping[str, Any], optional): keyword arguments for
            ``cv2.SIFT_create`` (``nfeatures``, ``contrastThreshold``, ...).
            Default: None

    Returns:
        Tensor: int64 ``(B, gh * gw)``, patches in row-major order.

    Example::

        >>> from skimage import data
        >>> counts = keypoint_counts(data.chelsea()[:224, :224], 16)   # (1, 196)
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if ph <= 0 or pw <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    grays = _to_gray_uint8(images)
    h, w = grays[0].shape
    gh, gw = grid if grid is not None else (h // ph, w // pw)
    if gh <= 0 or gw <= 0:
        raise ValueError(f"images of {h}x{w} are smaller than one {ph}x{pw} patch")
    try:
        sift = cv2.SIFT_create(**dict(sift_options or {}))  # type: ignore[attr-defined]
    except cv2.error as err:  # pragma: no cover - depends on OpenCV's checks
        raise ValueError(f"cv2.SIFT_create rejected sift_options={sift_options!r}: {err}") from err
    counts = np.zeros((len(grays), gh * gw), dtype=np.int64)
    for b, gray in enumerate(grays):
        kps = sift.detect(gray, None)
        if not kps:
            continue
        pts = np.array([kp.pt for kp in kps], dtype=np.float64)
        cols = np.floor(pts[:, 0] / pw).astype(np.int64)
        rows = np.floor(pts[:, 1] / ph).astype(np.int64)
        inside = (rows >= 0) & (rows < gh) & (cols >= 0) & (cols < gw)
        counts[b] = np.bincount(rows[inside] * gw + cols[inside], minlength=gh * gw)
    return torch.from_numpy(counts)
