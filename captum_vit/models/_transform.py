"""Image preprocessing that accepts what people actually have: PIL images, numpy arrays
(uint8 HWC, grayscale or RGBA) and image files, and that can undo itself for display."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["ImageLike", "ImageTransform", "load_image"]

#: What :class:`ImageTransform` and :func:`load_image` accept.
ImageLike = Image.Image | np.ndarray | str | PathLike[str]


def load_image(image: ImageLike) -> Image.Image:
    """Open an image as an RGB PIL image.

    Args:
        image (PIL.Image, numpy.ndarray, str or PathLike): a PIL image, an array
            ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (uint8, or float in ``[0, 1]``),
            or the path of an image file.

    Returns:
        PIL.Image.Image: the image in RGB mode (alpha dropped, grayscale repeated).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, or the array has a shape that
            is not an image.

    Example::

        >>> from skimage import data
        >>> load_image(data.chelsea()).size
        (451, 300)
    """
    if isinstance(image, (str, PathLike)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not an image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {path} as an image: {err}") from err
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(
                f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}"
            )
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.number):
                raise ValueError(f"image array has non-numeric dtype {arr.dtype}")
            scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
            arr = np.clip(np.nan_to_num(arr.astype(np.float64)) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(
        f"expected a PIL image, a numpy array or a file path, got {type(image).__name__}"
    )


class ImageTransform:
    """Model preprocessing: any image -> normalised tensor ``(3, H, W)``.

    Wraps a torchvision/timm transform (resize, crop, to-tensor, normalise) and
    remembers its normalisation, so that :meth:`to_image` can turn a model input back
    into the picture the model sees (after resize and crop) for plotting.

    Args:
        transform (Callable[[PIL.Image.Image], Tensor]): the preprocessing of the
            model (PIL image in, normalised float tensor ``(3, H, W)`` out).
        mean (Sequence[float]): per-channel mean used by ``transform``.
        std (Sequence[float]): per-channel standard deviation used by ``transform``.
        input_size (tuple[int, int]): ``(H, W)`` of the tensors it produces.

    Example::

        >>> model, transform, names = captum_vit.models.load_default()
        >>> x = transform(data.chelsea()).unsqueeze(0)     # (1, 3, 224, 224)
        >>> rgb = transform.to_image(x[0])                  # (224, 224, 3) uint8
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], Any],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: tuple[int, int],
    ) -> None:
        self.transform = transform
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def __call__(self, image: ImageLike) -> Tensor:
        """Preprocess one image (PIL, array or path) to a float tensor ``(3, H, W)``."""
        out = self.transform(load_image(image))
        if not isinstance(out, Tensor):
            raise TypeError(f"the wrapped transform returned {type(out).__name__}, not a tensor")
        return out

    def batch(self, images: Sequence[ImageLike]) -> Tensor:
        """Preprocess several images into one batch ``(B, 3, H, W)``."""
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.stack([self(im) for im in images])

    def to_image(self, tensor: Tensor) -> np.ndarray:
        """Undo the normalisation: model input ``(3, H, W)`` -> uint8 RGB ``(H, W, 3)``.

        Args:
            tensor (Tensor): one preprocessed image ``(3, H, W)`` (or ``(1, 3, H, W)``).

        Returns:
            numpy.ndarray: ``(H, W, 3)`` uint8, the image as the model sees it.
        """
        t = tensor.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != len(self.mean):
            raise ValueError(f"expected one image (3, H, W), got shape {tuple(tensor.shape)}")
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        rgb = (t * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        return np.asarray(np.round(rgb * 255), dtype=np.uint8)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(input_size={self.input_size}, mean={self.mean}, std={self.std},\n"
            f"  transform={self.transform!r})"
        )
