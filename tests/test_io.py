"""Every image a user has, read by captum_vit.io.read_image (generated here with PIL)."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captum_vit.io import DEFAULT_BACKGROUND, SmallImageWarning, read_image
from captum_vit.models import ImageTransform, load_image
from captum_vit.viz import image_to_array


def _ramp16(h: int = 32, w: int = 48) -> np.ndarray:
    """A 16-bit horizontal ramp 0..65535 (a white square if read as clipped 8-bit)."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_by_its_bit_depth(tmp_path: Path, suffix: str) -> None:
    ramp = _ramp16()
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155  # not a white square


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    ramp = _ramp16().astype(np.int32)
    Image.fromarray(ramp, mode="I").save(tmp_path / "i32.tif")
    np.testing.assert_array_equal(
        np.asarray(read_image(tmp_path / "i32.tif"))[..., 0],
        np.round(ramp * 255 / 65535).astype(np.uint8),
    )
    Image.fromarray(ramp * 4, mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        read_image(tmp_path / "wide.tif")
    unit = np.linspace(0, 1, 48, dtype=np.float32)[None].repeat(8, 0)
    Image.fromarray(unit, mode="F").save(tmp_path / "f.tif")
    assert np.asarray(read_image(tmp_path / "f.tif"))[0, -1, 0] == 255
    Image.fromarray(unit * 1000, mode="F").save(tmp_path / "f_wide.tif")
    with pytest.raises(ValueError, match=r"expected 0\.\.1 or 0\.\.255"):
        read_image(tmp_path / "f_wide.tif")


def test_8_bit_grayscale_1_bit_and_palette(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "l.png")), np.repeat(gray[..., None], 3, -1))
    Image.fromarray(gray > 127).save(tmp_path / "bw.png")
    assert set(np.unique(np.asarray(read_image(tmp_path / "bw.png")))) == {0, 255}
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png")
    rgb = np.asarray(read_image(tmp_path / "p.png"))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[1, 1]) == (255, 0, 0)


def test_alpha_is_composited_over_the_documented_background(tmp_path: Path) -> None:
    assert DEFAULT_BACKGROUND == (255, 255, 255)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, with alpha 0 / 128 / 255 in three columns
    rgba[:, 1, 3] = 128
    rgba[:, 2, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = np.asarray(read_image(tmp_path / "rgba.png")).astype(int)
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # fully transparent -> background
    assert tuple(rgb[0, 2]) == (200, 0, 0)  # opaque -> the colour itself
    assert abs(rgb[0, 1, 0] - (200 * 128 + 255 * 127) / 255) <= 1 and abs(rgb[0, 1, 1] - 127) <= 1
    black = np.asarray(read_image(tmp_path / "rgba.png", background=(0, 0, 0)))
    assert tuple(black[0, 0]) == (0, 0, 0)
    la = np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert tuple(np.asarray(read_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "ptrans.png", transparency=0)
    assert tuple(np.asarray(read_image(tmp_path / "ptrans.png"))[0, 0]) == (255, 255, 255)
    # the same rule for RGBA arrays (and in the overlay's image reader)
    assert tuple(np.asarray(read_image(rgba))[0, 0]) == (255, 255, 255)
    np.testing.assert_allclose(image_to_array(rgba)[0, 0], 1.0)
    np.testing.assert_allclose(image_to_array(tmp_path / "rgba.png")[0, 2], (200 / 255, 0, 0))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red ink
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = np.asarray(read_image(tmp_path / "cmyk.jpg"))[8, 8].astype(int)
    assert r > 230 and g < 25 and b < 25


def test_exif_rotated_photo_is_turned_upright(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored landscape, red top-left corner
    pixels[:5, :5] = (255, 0, 0)
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = read_image(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)  # displayed portrait
    arr = np.asarray(upright).astype(int)
    assert arr[2, -3, 0] > 200 and arr[2, -3, 1] < 60  # the red corner is now top-right
    assert read_image(Image.open(tmp_path / "rot.jpg")).size == (20, 40)  # PIL input too


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_very_large_images_are_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 100_000, 100_000)
    with pytest.raises(ValueError, match="decompression"):
        read_image(bomb)
    medium = tmp_path / "medium.png"
    _png_claiming(medium, 12_000, 10_000)  # 120 Mpx: above the default limit, below PIL's 2x
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
        ValueError, match=r"12000x10000 = 120,000,000 pixels, more than the limit"
    ):
        read_image(medium)  # PIL warns between its limit and twice it; we refuse
    Image.new("RGB", (100, 100)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="more than the limit of 5,000"):
        read_image(tmp_path / "ok.png", max_pixels=5000)
    assert read_image(tmp_path / "ok.png", max_pixels=None).size == (100, 100)


def test_images_smaller_than_a_patch_warn_that_they_are_upsampled(tmp_path: Path) -> None:
    Image.new("RGB", (5, 3), (10, 20, 30)).save(tmp_path / "tiny.png")
    with pytest.warns(SmallImageWarning, match=r"tiny.png is 5x3 pixels, smaller than one 16x16 patch: it is upsampled"):
        read_image(tmp_path / "tiny.png", min_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallImageWarning)
        read_image(tmp_path / "tiny.png", min_size=3)  # not smaller than a 3x3 patch
    from torchvision import transforms as T

    transform = ImageTransform(T.Compose([T.Resize((32, 32)), T.ToTensor()]), (0, 0, 0), (1, 1, 1), (32, 32), patch_size=(8, 8))
    with pytest.warns(SmallImageWarning, match="smaller than one 8x8 patch"):
        x = transform(tmp_path / "tiny.png")
    assert x.shape == (3, 32, 32)


def test_unreadable_inputs_fail_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        read_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(TypeError, match="expected a PIL image"):
        read_image(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"expected 0\.\.1 or 0\.\.255"):
        read_image(np.full((4, 4), 300.0))


def test_arrays_and_the_load_image_alias() -> None:
    ramp = _ramp16(4, 8)
    scaled = np.round(ramp.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(np.asarray(read_image(ramp))[..., 0], scaled.astype(np.uint8))
    np.testing.assert_allclose(image_to_array(ramp)[..., 0], scaled / 255)
    unit = np.random.default_rng(0).random((4, 4, 3))
    np.testing.assert_array_equal(np.asarray(read_image(unit)), np.round(unit * 255).astype(np.uint8))
    assert load_image(ramp).tobytes() == read_image(ramp).tobytes()
    source = Image.new("RGB", (4, 4))
    assert read_image(source) is not source  # never the caller's own image


def _png_rgb16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    arr = np.zeros((4, 6, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 65535, 32768, 257
    _png_rgb16(tmp_path / "rgb16.png", arr)
    assert np.asarray(read_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [255, 128, 1]
