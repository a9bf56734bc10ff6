"""Images the image tests make with Pillow."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def gradient(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A picture with detail in it (a flat one compresses to nothing and hides bugs)."""
    w, h = size
    image = Image.new("RGB", size)
    image.putdata([(x * 255 // w, y * 255 // h, (x * y) % 256) for y in range(h) for x in range(w)])
    return image.convert(mode)


def quadrants(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Red, green / blue, white quarters: where each ends up shows a transform."""
    w, h = size
    image = Image.new("RGB", size, "white")
    image.paste((255, 0, 0), (0, 0, w // 2, h // 2))
    image.paste((0, 255, 0), (w // 2, 0, w, h // 2))
    image.paste((0, 0, 255), (0, h // 2, w // 2, h))
    return image


def encoded(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def picture(
    fmt: str = "JPEG", size: tuple[int, int] = (64, 48), mode: str = "RGB", **options: Any
) -> bytes:
    return encoded(gradient(size, mode), fmt, **options)


def with_exif(fmt: str = "JPEG", size: tuple[int, int] = (60, 40), orientation: int = 1) -> bytes:
    """A picture whose EXIF names a camera and an orientation."""
    exif = Image.Exif()
    exif[0x010F] = "Acme"  # Make
    exif[0x0110] = "Cam 3"  # Model
    exif[0x0112] = orientation
    return encoded(gradient(size), fmt, exif=exif)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
