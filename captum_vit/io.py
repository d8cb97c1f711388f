"""Reading images: the one place where files, PIL images and arrays become RGB pictures.

:func:`read_image` is used by the command line, by the transforms of
:mod:`captum_vit.models` (:func:`~captum_vit.models.load_default` and friends), by the
evaluation datasets and by :func:`captum_vit.viz.overlay`. What it does with each kind
of image:

* 8-bit RGB, grayscale (``L``), 1-bit (``1``) and palette (``P``) images: converted to
  RGB (grayscale repeated in the three channels).
* 16-bit grayscale (``I;16`` PNG / TIFF, and ``I`` images whose values lie in
  ``0..65535``): scaled by the bit depth, ``v * 255 / 65535`` (not clipped, which
  would turn a 16-bit image into a white square). 32-bit float images (``F``): values
  in ``[0, 1]`` are scaled by 255, values in ``[0, 255]`` used as is; other ranges are
  refused.
* Images with transparency (``RGBA``, ``LA``, ``PA``, palette images with a
  transparent colour): the alpha channel is composited over a background,
  :data:`DEFAULT_BACKGROUND` (white) unless ``background=`` says otherwise.
* CMYK (e.g. CMYK JPEG) and YCbCr images: converted to RGB by PIL.
* EXIF-rotated photos: turned upright (:func:`PIL.ImageOps.exif_transpose`) so that the
  explanation lines up with the picture as every viewer shows it.
* Very large images: refused before decoding when they have more than ``max_pixels``
  pixels (default :data:`MAX_PIXELS`, PIL's decompression-bomb limit).
* Images smaller than ``min_size`` pixels on a side (the transforms pass the model's
  patch size): a warning says the image is upsampled to the model's input size.
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_BACKGROUND", "MAX_PIXELS", "ImageLike", "SmallImageWarning", "read_image"]

#: What :func:`read_image` accepts.
ImageLike = Image.Image | np.ndarray | str | PathLike[str]

#: Background colour (RGB) that transparent pixels are composited over.
DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: Default largest number of pixels read (PIL's decompression-bomb limit, about 89.5 Mpx).
MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class SmallImageWarning(UserWarning):
    """An image smaller than one patch was upsampled to the model's input size."""


def read_image(
    image: ImageLike,
    *,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    max_pixels: int | None = MAX_PIXELS,
    min_size: int | tuple[int, int] | None = None,
) -> Image.Image:
    """Read an image as an 8-bit RGB PIL image, the way it is meant to look.

    Args:
        image (PIL.Image, numpy.ndarray, str or PathLike): the path of an image file,
            a PIL image, or an array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
            ``(H, W, 4)`` (uint8; uint16 scaled by ``255 / 65535``; other numbers in
            ``[0, 1]`` scaled by 255 or in ``[0, 255]`` used as is).
        background (tuple[int, int, int], optional): RGB colour under transparent
            pixels. Default: ``DEFAULT_BACKGROUND`` (white)
        max_pixels (int, optional): refuse files with more pixels than this
            (decompression-bomb guard), before decoding them; ``None`` = no limit.
            Default: ``MAX_PIXELS``
        min_size (int or (int, int), optional): warn with :class:`SmallImageWarning`
            when the image is smaller than this ``(height, width)`` (one patch of
            the model) and will therefore be upsampled. Default: None

    Returns:
        PIL.Image.Image: mode ``"RGB"``, upright (EXIF orientation applied).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image, is larger than ``max_pixels``,
            has a pixel format or value range that cannot be shown as RGB, or the
            array does not have an image shape.
        TypeError: ``image`` is none of the accepted types.

    Example::

        >>> from captum_vit.io import read_image
        >>> read_image("scan_16bit.png").mode
        'RGB'
    """
    if isinstance(image, (str, PathLike)):
        rgb = _read_file(Path(image), background, max_pixels)
    elif isinstance(image, Image.Image):
        rgb = _to_rgb(image, background, "the image")
    elif isinstance(image, np.ndarray):
        rgb = _from_array(image, background)
    else:
        raise TypeError(
            f"expected a PIL image, a numpy array or a file path, got {type(image).__name__}"
        )
    if min_size is not None:
        mh, mw = (min_size, min_size) if isinstance(min_size, int) else min_size
        w, h = rgb.size
        if h < mh or w < mw:
            name = f"{image}" if isinstance(image, (str, PathLike)) else "the image"
            warnings.warn(
                f"{name} is {w}x{h} pixels, smaller than one {mh}x{mw} patch: it is upsampled "
                "to the model's input size, so its explanation shows interpolated pixels",
                SmallImageWarning,
                stacklevel=2,
            )
    return rgb


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"{name} is empty ({w}x{h} pixels)")
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(
            f"{name} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(a guard against decompression bombs): downscale it first, or pass a larger "
            "max_pixels to captum_vit.io.read_image if you trust the file"
        )


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """Open (not decode) an image file, refusing missing, unreadable or huge files."""
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        # (no warnings.catch_warnings here: it is not thread-safe; PIL may warn with a
        # DecompressionBombWarning between its limit and twice it, then we refuse)
        im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{path} is larger than PIL's decompression-bomb limit ({err}); downscale it first"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err
    try:
        _check_size(im.size, max_pixels, str(path))
    except ValueError:
        im.close()
        raise
    return im


def _read_file(path: Path, background: tuple[int, int, int], max_pixels: int | None) -> Image.Image:
    im = _open_checked(path, max_pixels)
    try:
        with im:
            im.load()
            return _to_rgb(im, background, str(path))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err


def _to_rgb(im: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    im = ImageOps.exif_transpose(im) or im
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_wide(np.asarray(im), mode, name)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return im  # exif_transpose returned a copy: never the caller's image itself
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise ValueError(f"cannot show {name} (pixel format {mode!r}) as RGB: {err}") from err


def _scale_wide(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit, 32-bit integer and float grayscale -> uint8, by the value range."""
    values = arr.astype(np.float64)
    if mode.startswith("I;16") or mode == "I":
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{name} is a 32-bit integer image with values {lo:g}..{hi:g}, outside the "
                "16-bit range 0..65535 that captum_vit knows how to scale; convert it to "
                "8 or 16 bits first"
            )
        return np.asarray(np.round(values * (255.0 / 65535.0)), dtype=np.uint8)
    return _scale_float(values, name)


def _scale_float(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or Inf")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1:
        return np.asarray(np.round(values * 255.0), dtype=np.uint8)
    if lo >= 0 and hi <= 255:
        return np.asarray(np.round(values), dtype=np.uint8)
    raise ValueError(
        f"{name} has values {lo:g}..{hi:g}; expected 0..1 or 0..255: scale it first"
    )


def _from_array(image: np.ndarray, background: tuple[int, int, int]) -> Image.Image:
    arr = image
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"the image array is empty (shape {arr.shape})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.asarray(np.round(arr.astype(np.float64) * (255.0 / 65535.0)), dtype=np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"image array has non-numeric dtype {arr.dtype}")
        arr = _scale_float(arr.astype(np.float64), "the image array")
    pil = Image.fromarray(np.ascontiguousarray(arr))
    if pil.mode == "RGBA":
        return _to_rgb(pil, background, "the image array")
    return pil.convert("RGB")
