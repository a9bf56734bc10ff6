"""The image kinds' params, declared once: the worker's handlers take them, the gateway
checks Submits against them (through the worker's Attach) and the CLI's image flags take
their choices and help from them. Plain data: no Pillow needed to read it."""

from __future__ import annotations

from jobmesh.params import Param

FORMAT_CHOICES = ("avif", "bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp")
"""The output formats a worker may write; each worker declares those its Pillow can
encode, so the gateway refuses the others at Submit."""
RESAMPLE_CHOICES = ("nearest", "bilinear", "bicubic", "lanczos")
FIT_CHOICES = ("contain", "cover", "fill")
FLIP_CHOICES = ("horizontal", "vertical")

FORMAT = Param(
    "format",
    "string",
    choices=FORMAT_CHOICES,
    description="output format (default: the input's if it can be written, else jpeg)",
)
QUALITY = Param(
    "quality", "integer", minimum=1, maximum=100, description="for jpeg, webp, avif (default 85)"
)
AUTO_ORIENT = Param(
    "auto_orient", "boolean", description="turn the image upright from its EXIF (default true)"
)

MAX_SIDE = 20_000
MAX_LAYERS = 64


def _side(name: str, what: str, required: bool = False) -> Param:
    return Param(name, "integer", required=required, minimum=1, maximum=MAX_SIDE, description=what)


THUMBNAIL = (
    Param(
        "size",
        "integer",
        minimum=1,
        maximum=10_000,
        description="fit within size x size, keeping the aspect; never enlarges (default 256)",
    ),
    FORMAT,
    QUALITY,
    AUTO_ORIENT,
)
RESIZE = (
    _side("width", "output width in pixels (give width, height or both)"),
    _side("height", "output height in pixels (give width, height or both)"),
    Param(
        "fit",
        "string",
        choices=FIT_CHOICES,
        description="with both sides: fit inside, fill and crop the overflow, or stretch "
        "(default contain)",
    ),
    Param(
        "resample",
        "string",
        choices=RESAMPLE_CHOICES,
        description="resampling filter (default lanczos)",
    ),
    FORMAT,
    QUALITY,
    AUTO_ORIENT,
)
CONVERT = (
    Param(
        "format",
        "string",
        required=True,
        choices=FORMAT_CHOICES,
        description="output format",
    ),
    QUALITY,
    Param(
        "strip_metadata",
        "boolean",
        description="drop EXIF; the ICC colour profile is kept (default true)",
    ),
)
TRANSFORM = (
    Param(
        "rotate",
        "number",
        minimum=-360,
        maximum=360,
        description="degrees clockwise; the canvas grows to fit, corners transparent",
    ),
    Param("flip", "string", choices=FLIP_CHOICES, description="mirror the image"),
    Param(
        "crop",
        "object",
        description="{left, top, width, height} in pixels, within the (upright) image",
    ),
    AUTO_ORIENT,
    FORMAT,
    QUALITY,
)
COMPOSITE = (
    _side("width", "canvas width in pixels", required=True),
    _side("height", "canvas height in pixels", required=True),
    Param(
        "background",
        "string",
        description="canvas color, e.g. #ffffff or #00000000 (default transparent; white "
        "in formats without alpha)",
    ),
    Param(
        "layers",
        "list",
        description="[{input, x, y, opacity 0..1, z}]: images by input name, drawn by z "
        "then list order",
    ),
    Param(
        "format",
        "string",
        choices=FORMAT_CHOICES,
        description="output format (default png)",
    ),
    QUALITY,
    AUTO_ORIENT,
)

KINDS = {
    "image.thumbnail": THUMBNAIL,
    "image.resize": RESIZE,
    "image.convert": CONVERT,
    "image.transform": TRANSFORM,
    "image.composite": COMPOSITE,
}
