"""Pillow, kept safe for the image kinds: decoding under a pixel limit, encoding to what the
installed Pillow can write, and every Pillow failure turned into a HandlerError with a code.

The pixel limit is per process: the worker sets it in each pool process (`configure`)
before any job, from its `max_image_pixels` setting.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from PIL import ExifTags, Image, ImageColor, ImageOps, UnidentifiedImageError, features

from jobmesh import image_params
from jobmesh.codes import Code
from jobmesh.params import MAX_SAFE_INTEGER
from jobmesh.worker import HandlerError, JobContext

_tracer = trace.get_tracer("jobmesh.worker")

DEFAULT_MAX_PIXELS = 64_000_000
INPUT_NAME = "image"

# Formats decoded; others (EPS runs Ghostscript, PSD, ...) are refused before decoding.
_READABLE = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "AVIF")
# Pillow's names of some formats as the image kinds call them.
_CANONICAL = {"MPO": "jpeg", "DIB": "bmp"}


@dataclass(frozen=True)
class Format:
    """An output format."""

    name: str
    """What the `format` param and the `format` metadata call it, e.g. jpeg."""
    pillow: str
    """Pillow's name, e.g. JPEG."""
    extension: str
    """For file names, without the dot, e.g. jpg."""
    modes: frozenset[str]
    """Pillow modes it writes as they are; others are converted first."""
    alpha: bool
    """Keeps transparency; without it, alpha is flattened onto the background."""
    lossy: bool
    """Takes a quality."""
    max_side: int
    """The largest width or height the format can hold."""
    metadata: bool
    """Can carry EXIF and an ICC profile."""

    @property
    def content_type(self) -> str:
        return Image.MIME.get(self.pillow, "application/octet-stream")


_CANDIDATES = (
    Format("jpeg", "JPEG", "jpg", frozenset({"L", "RGB", "CMYK"}), False, True, 65_500, True),
    Format(
        "png",
        "PNG",
        "png",
        frozenset({"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}),
        True,
        False,
        2**31 - 1,
        True,
    ),
    Format("webp", "WEBP", "webp", frozenset({"RGB", "RGBA"}), True, True, 16_383, True),
    Format("gif", "GIF", "gif", frozenset({"L", "P", "RGB", "RGBA"}), True, False, 65_535, False),
    Format(
        "bmp",
        "BMP",
        "bmp",
        frozenset({"1", "L", "P", "RGB", "RGBA"}),
        True,
        False,
        2**31 - 1,
        False,
    ),
    Format(
        "tiff",
        "TIFF",
        "tiff",
        frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"}),
        True,
        False,
        2**31 - 1,
        True,
    ),
    Format("avif", "AVIF", "avif", frozenset({"RGB", "RGBA"}), True, True, 65_535, True),
)
_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
_METADATA_KEYS = frozenset({"exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "iptc"})


def _writable() -> dict[str, Format]:
    Image.init()
    plugins = {"webp": features.check("webp"), "avif": features.check("avif")}
    return {f.name: f for f in _CANDIDATES if f.pillow in Image.SAVE and plugins.get(f.name, True)}


FORMATS = _writable()
"""What the installed Pillow can encode, by name."""
FORMAT_CHOICES = tuple(c for c in image_params.FORMAT_CHOICES if _ALIASES.get(c, c) in FORMATS)
"""The `format` choices this worker declares: those of `jobmesh.image_params` it can write."""


@dataclass
class _Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS


_LIMITS = _Limits()


def configure(max_image_pixels: int) -> None:
    """Sets this process's pixel limit (Pillow's `MAX_IMAGE_PIXELS` too)."""
    if max_image_pixels < 1:
        raise ValueError("max_image_pixels must be at least 1")
    _LIMITS.max_pixels = max_image_pixels
    Image.MAX_IMAGE_PIXELS = max_image_pixels


def max_pixels() -> int:
    return _LIMITS.max_pixels


def input_image(ctx: JobContext) -> bytes:
    """The input named `image`, or the job's only input."""
    if INPUT_NAME in ctx.inputs:
        return ctx.inputs[INPUT_NAME]
    if len(ctx.inputs) == 1:
        return next(iter(ctx.inputs.values()))
    raise HandlerError(
        f"expected an input named {INPUT_NAME!r} (or exactly one input), got "
        f"{', '.join(map(repr, sorted(ctx.inputs))) or 'none'}",
        code=Code.MISSING_INPUT,
    )


@contextmanager
def stage(name: str) -> Iterator[None]:
    """One stage of an image job (decode, process, encode), traced as a span of its own: what
    Pillow raises in it becomes a HandlerError with a code; Pillow's decompression-bomb
    warning is an error."""
    with _tracer.start_as_current_span(name), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt-EXIF and palette notes, on stderr otherwise
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except HandlerError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"has {found[1]} pixels" if found else "is too large"
            raise HandlerError(
                f"the image {size}, over this worker's limit of {_LIMITS.max_pixels} "
                "(max_image_pixels)",
                code=Code.IMAGE_TOO_LARGE,
            ) from None
        except MemoryError:
            raise HandlerError(
                "the image does not fit in this worker's memory", code=Code.IMAGE_TOO_LARGE
            ) from None
        except Exception as exc:
            code = Code.IMAGE_DECODE_ERROR if name == "decode" else Code.IMAGE_PROCESS_ERROR
            raise HandlerError(
                f"cannot {name} the image: {type(exc).__name__}: {exc}", code=code
            ) from None


def open_image(data: bytes) -> Image.Image:
    """The image's header, read (no pixels decoded yet); within a `stage("decode")`."""
    Image.MAX_IMAGE_PIXELS = _LIMITS.max_pixels
    try:
        image = Image.open(io.BytesIO(data), formats=_READABLE)
    except UnidentifiedImageError:
        found = _identify(data)
        if found:
            raise HandlerError(
                f"{found} images are not supported; "
                f"supported: {', '.join(f.lower() for f in _READABLE)}",
                code=Code.UNSUPPORTED_FORMAT,
            ) from None
        raise HandlerError(
            f"the input is not an image in a known format ({len(data)} bytes)",
            code=Code.IMAGE_DECODE_ERROR,
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise HandlerError(
            f"the image is {width}x{height}: it has no pixels", Code.IMAGE_DECODE_ERROR
        )
    check_pixels(width, height, "the image")
    return image


def decode(data: bytes, draft: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """The image's first frame, decoded, in a mode the other steps handle, and the name of
    its format; JPEGs are decoded straight at a smaller scale no smaller than `draft` if
    given. Within `stage("decode")`."""
    image = open_image(data)
    if draft is not None:
        image.draft(None, draft)
    image.load()
    return _workable(image), format_name(image.format)


def check_pixels(width: int, height: int, what: str) -> None:
    """IMAGE_TOO_LARGE if width x height is over the limit."""
    limit = _LIMITS.max_pixels
    if width * height > limit:
        raise HandlerError(
            f"{what} would be {width}x{height} = {width * height} pixels, over this worker's "
            f"limit of {limit} (max_image_pixels)",
            code=Code.IMAGE_TOO_LARGE,
        )


def format_name(pillow_format: str | None) -> str:
    """The lower-case name the image kinds use for a Pillow format, e.g. MPO -> jpeg."""
    name = (pillow_format or "").upper()
    return _CANONICAL.get(name, name.lower())


def output_format(name: str | None, source: str | None) -> Format:
    """The format asked for (one of `FORMAT_CHOICES`); else the `source` format if it can be
    written, else jpeg."""
    if name is not None:
        return FORMATS[_ALIASES.get(name, name)]
    return FORMATS.get(source or "", FORMATS["jpeg"])


def orient(image: Image.Image) -> Image.Image:
    """Turned upright by its EXIF orientation (in place: no copy when it is upright)."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )


def encode(
    image: Image.Image,
    fmt: Format,
    quality: int,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    exif: Image.Exif | None = None,
    icc_profile: bytes | None = None,
) -> bytes:
    """The image in `fmt`; alpha is flattened onto `background` for formats without it.
    Within `stage("encode")`."""
    width, height = image.size
    if max(width, height) > fmt.max_side:
        raise HandlerError(
            f"{fmt.name} images are at most {fmt.max_side} pixels on a side; "
            f"this one is {width}x{height}",
            code=Code.IMAGE_TOO_LARGE,
        )
    image = _writable_mode(image, fmt, background)
    if exif is None:
        # Some of Pillow's writers copy these from the source unless told otherwise.
        image.info = {k: v for k, v in image.info.items() if k not in _METADATA_KEYS}
    options: dict[str, Any] = {}
    if fmt.lossy:
        options["quality"] = quality
    if fmt.metadata and icc_profile:
        options["icc_profile"] = icc_profile
    if fmt.metadata and exif is not None and len(exif):
        options["exif"] = exif
    if fmt.name == "tiff":
        options["compression"] = "tiff_deflate"
    out = io.BytesIO()
    image.save(out, format=fmt.pillow, **options)
    return out.getvalue()


def image_metadata(fmt: Format, image: Image.Image) -> dict[str, Any]:
    width, height = image.size
    return {
        "format": fmt.name,
        "width": width,
        "height": height,
        "extension": fmt.extension,
        "content_type": fmt.content_type,
    }


_EXIF_TAGS = (
    ExifTags.Base.Make,
    ExifTags.Base.Model,
    ExifTags.Base.Software,
    ExifTags.Base.DateTime,
    ExifTags.Base.Orientation,
    ExifTags.Base.Artist,
    ExifTags.Base.Copyright,
)
_EXIF_IFD_TAGS = (
    ExifTags.Base.DateTimeOriginal,
    ExifTags.Base.ExposureTime,
    ExifTags.Base.FNumber,
    ExifTags.Base.ISOSpeedRatings,
    ExifTags.Base.FocalLength,
    ExifTags.Base.LensModel,
)


def exif_summary(image: Image.Image) -> dict[str, Any]:
    """A few readable EXIF tags by name (camera, date, exposure, orientation, GPS present)."""
    exif = image.getexif()
    summary: dict[str, Any] = {}
    for tags, source in (
        (_EXIF_TAGS, exif),
        (_EXIF_IFD_TAGS, exif.get_ifd(ExifTags.IFD.Exif)),
    ):
        for tag in tags:
            value = _plain(source.get(tag))
            if value is not None:
                summary[tag.name] = value
    if exif.get_ifd(ExifTags.IFD.GPSInfo):
        summary["GPS"] = True
    return summary


def _plain(value: object) -> Any:
    """An EXIF value as JSON: rationals as floats, text stripped; None for what is not."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip("\x00 ").strip()
        return text[:200] or None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):  # metadata takes what every JSON client reads exactly
        return value if abs(value) <= MAX_SAFE_INTEGER else None
    if isinstance(value, tuple | list):
        items = [_plain(v) for v in value[:16]]
        return items if all(i is not None for i in items) and items else None
    try:
        number = float(value)  # type: ignore[arg-type]  # IFDRational, Fraction...
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return round(number, 6) if math.isfinite(number) else None


def _identify(data: bytes) -> str:
    """The format Pillow recognizes in `data` among all it knows, or ''."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return format_name(Image.open(io.BytesIO(data)).format)
    except Exception:  # not an image at all, or a broken one: nothing to name
        return ""


def _workable(image: Image.Image) -> Image.Image:
    """The image in one of the modes every step handles: 1-bit, palette, 16-bit, float and
    CMYK images become L, LA, RGB or RGBA."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        return image.convert("RGBA" if has_alpha(image) else ("L" if mode == "1" else "RGB"))
    if mode.startswith("I") or mode == "F":
        high = image.getextrema()[1]
        scale = 255 / high if isinstance(high, int | float) and high > 255 else 1.0
        return image.convert("F").point(lambda v: v * scale).convert("L")
    return image.convert("RGBA" if has_alpha(image) else "RGB")


def _writable_mode(
    image: Image.Image, fmt: Format, background: tuple[int, int, int]
) -> Image.Image:
    if image.mode in fmt.modes and (fmt.alpha or not has_alpha(image)):
        return image
    if has_alpha(image):
        if fmt.alpha:
            return image.convert("RGBA")
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def parse_color(text: str, name: str) -> tuple[int, int, int, int]:
    """A CSS-like color (`#rrggbb`, `#rrggbbaa`, `white`, `rgb(...)`) as RGBA."""
    try:
        color = ImageColor.getrgb(text)
    except ValueError:
        raise HandlerError(
            f"param {name!r} must be a color such as #ffffff, #00000000 or white, got {text!r}",
            code=Code.INVALID_PARAMS,
        ) from None
    if len(color) == 3:
        return (*color, 255)
    return color


def placements(value: Any, limit: int) -> list[Mapping[str, Any]]:
    """`value` as a list of objects, at most `limit`; INVALID_PARAMS otherwise."""
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise HandlerError(
            f"param 'layers' must be a list of at most {limit} objects", code=Code.INVALID_PARAMS
        )
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise HandlerError(f"layers[{i}] must be an object", code=Code.INVALID_PARAMS)
    return list(value)
