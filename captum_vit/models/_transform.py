"""Image preprocessing that accepts what people actually have: PIL images, numpy arrays
(uint8 HWC, grayscale or RGBA) and image files, and that can undo itself for display."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..io import read_image

__all__ = ["ImageLike", "ImageTransform", "load_image"]

#: What :class:`ImageTransform` and :func:`load_image` accept.
ImageLike = Image.Image | np.ndarray | str | PathLike[str]


def load_image(image: ImageLike) -> Image.Image:
    """Open an image as an RGB PIL image (:func:`captum_vit.io.read_image`).

    Args:
        image (PIL.Image, numpy.ndarray, str or PathLike): a PIL image, an array
            ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (uint8, uint16, or float in
            ``[0, 1]``), or the path of an image file.

    Returns:
        PIL.Image.Image: the image in RGB mode, upright (EXIF orientation applied),
        16-bit images scaled to 8 bits, transparency composited over white.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, is too large, or the array
            has a shape or value range that is not an image.

    Example::

        >>> from skimage import data
        >>> load_image(data.chelsea()).size
        (451, 300)
    """
    return read_image(image)


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
        patch_size (tuple[int, int], optional): the model's patch size; images
            smaller than one patch are upsampled with a
            :class:`~captum_vit.io.SmallImageWarning`. Default: None

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
        *,
        patch_size: tuple[int, int] | None = None,
    ) -> None:
        self.transform = transform
        self.patch_size = patch_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = (int(input_size[0]), int(input_size[1]))

    def __call__(self, image: ImageLike) -> Tensor:
        """Preprocess one image (PIL, array or path) to a float tensor ``(3, H, W)``."""
        out = self.transform(read_image(image, min_size=self.patch_size))
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
