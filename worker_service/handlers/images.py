"""The `images` product: image.thumbnail, .resize, .convert, .transform, .composite, .info.

Each takes its picture as the input `image` (or the job's only input; composite takes its
layers by name), writes the output `image` with metadata format, width, height, extension
and content_type, and reports progress at each stage: decode (0.2), process (0.6),
encode (1.0). Only the first frame of an animated image is used. Failures have codes,
none retried: INVALID_PARAMS, MISSING_INPUT, IMAGE_DECODE_ERROR, UNSUPPORTED_FORMAT,
IMAGE_TOO_LARGE (over `max_image_pixels`), IMAGE_PROCESS_ERROR.

The params are those of `jobmesh.image_params`, with the `format` choices narrowed to what
this worker's Pillow writes; the handlers read them typed, as the worker checked them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from PIL import Image

from jobmesh import image_params
from jobmesh.codes import Code
from jobmesh.image_params import MAX_LAYERS
from jobmesh.params import Schema
from jobmesh.worker import HandlerError, JobContext, Result, handler
from worker_service.handlers.imaging import (
    FORMAT_CHOICES,
    Format,
    check_pixels,
    configure,
    decode,
    encode,
    exif_summary,
    format_name,
    image_metadata,
    input_image,
    max_pixels,
    open_image,
    orient,
    output_format,
    parse_color,
    placements,
    stage,
)

__all__ = ["configure"]

DEFAULT_QUALITY = 85
_RESAMPLE = {name: Image.Resampling[name.upper()] for name in image_params.RESAMPLE_CHOICES}


def _writable(schema: Schema) -> Schema:
    """`schema` with the `format` choices this worker's Pillow can write, so the gateway
    refuses the others at Submit."""
    return tuple(
        dataclasses.replace(p, choices=FORMAT_CHOICES) if p.name == "format" else p for p in schema
    )


THUMBNAIL = _writable(image_params.THUMBNAIL)
RESIZE = _writable(image_params.RESIZE)
CONVERT = _writable(image_params.CONVERT)
TRANSFORM = _writable(image_params.TRANSFORM)
COMPOSITE = _writable(image_params.COMPOSITE)
INFO: Schema = ()


@handler("image.thumbnail", params=THUMBNAIL)
def thumbnail(ctx: JobContext) -> Result:
    """A thumbnail that fits within size x size."""
    size = ctx.params.get("size", 256)
    data = input_image(ctx)
    with stage("decode"):
        # JPEGs decode straight at a scale twice the box at least: far less work.
        image, source = decode(data, draft=(2 * size, 2 * size))
    fmt = output_format(ctx.params.get("format"), source)
    _progress(ctx, 0.2, "decode")
    with stage("process"):
        if ctx.params.get("auto_orient", True):
            image = orient(image)
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return _finish(ctx, image, fmt)


@handler("image.resize", params=RESIZE)
def resize(ctx: JobContext) -> Result:
    """Resized to width and/or height: contain, cover or fill."""
    width, height = ctx.params.get("width"), ctx.params.get("height")
    if width is None and height is None:  # beyond what a schema says
        raise HandlerError("image.resize needs width, height or both", code=Code.INVALID_PARAMS)
    fit = ctx.params.get("fit", "contain")
    resample = _RESAMPLE[ctx.params.get("resample", "lanczos")]
    data = input_image(ctx)
    with stage("decode"):
        image, source = decode(data)
    fmt = output_format(ctx.params.get("format"), source)
    _progress(ctx, 0.2, "decode")
    with stage("process"):
        if ctx.params.get("auto_orient", True):
            image = orient(image)
        target = _target_size(image.size, width, height, fit)
        check_pixels(*target, "the resized image")
        if fit == "cover" and width is not None and height is not None:
            box = _cover_box(image.size, target)
            image = image.resize(target, resample, box=box, reducing_gap=3.0)
        else:
            image = image.resize(target, resample, reducing_gap=3.0)
    return _finish(ctx, image, fmt)


@handler("image.convert", params=CONVERT)
def convert(ctx: JobContext) -> Result:
    """The same pixels in another format."""
    data = input_image(ctx)
    with stage("decode"):
        image, source = decode(data)
        keep = not ctx.params.get("strip_metadata", True)
        exif = image.getexif() if keep else None
    fmt = output_format(ctx.params["format"], source)
    _progress(ctx, 0.2, "decode")
    return _finish(ctx, image, fmt, exif=exif)


@handler("image.transform", params=TRANSFORM)
def transform(ctx: JobContext) -> Result:
    """Auto-oriented, cropped, rotated and flipped, in that order."""
    crop = ctx.params.get("crop")
    data = input_image(ctx)
    with stage("decode"):
        image, source = decode(data)
    fmt = output_format(ctx.params.get("format"), source)
    _progress(ctx, 0.2, "decode")
    with stage("process"):
        if ctx.params.get("auto_orient", True):
            image = orient(image)
        if crop is not None:
            image = image.crop(_crop_box(crop, image.size))
        image = _rotated(image, ctx.params.get("rotate", 0.0))
        flip = ctx.params.get("flip")
        if flip == "horizontal":
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif flip == "vertical":
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return _finish(ctx, image, fmt)


@handler("image.composite", params=COMPOSITE)
def composite(ctx: JobContext) -> Result:
    """Layers (inputs by name) drawn onto a canvas by z-order, with position and opacity."""
    width, height = ctx.params["width"], ctx.params["height"]
    check_pixels(width, height, "the canvas")
    fmt = output_format(ctx.params.get("format", "png"), None)
    given = ctx.params.get("background")
    background = parse_color(given, "background") if given else (0, 0, 0, 0)
    if given is None and not fmt.alpha:
        background = (255, 255, 255, 255)
    layers = [
        _layer(i, item, ctx)
        for i, item in enumerate(placements(ctx.params.get("layers", []), MAX_LAYERS))
    ]
    images: dict[str, Image.Image] = {}
    with stage("decode"):
        decoded = 0
        for name in dict.fromkeys(layer["input"] for layer in layers):
            image, _ = decode(ctx.inputs[name])
            decoded += image.width * image.height
            if decoded > 4 * max_pixels():
                raise HandlerError(
                    f"the layers hold {decoded} pixels in all, over 4 x max_image_pixels",
                    code=Code.IMAGE_TOO_LARGE,
                )
            images[name] = orient(image) if ctx.params.get("auto_orient", True) else image
    _progress(ctx, 0.2, "decode")
    with stage("process"):
        canvas = Image.new("RGBA", (width, height), background)
        for layer in sorted(layers, key=lambda layer: layer["z"]):  # stable: list order next
            _draw(canvas, images[layer["input"]], layer)
    return _finish(ctx, canvas, fmt, background=background[:3])


@handler("image.info", params=INFO)
def info(ctx: JobContext) -> dict[str, Any]:
    """What the image is: format, size, mode, frames and a few EXIF tags; no output."""
    data = input_image(ctx)
    with stage("decode"):
        image = open_image(data)
        frames = int(getattr(image, "n_frames", 1))
        exif = exif_summary(image)
    ctx.progress(1.0, "decode")
    return {
        "format": format_name(image.format),
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
        "frames": frames,
        "exif": exif,
    }


def _finish(
    ctx: JobContext,
    image: Image.Image,
    fmt: Format,
    *,
    background: tuple[int, ...] = (255, 255, 255),
    exif: Image.Exif | None = None,
) -> Result:
    _progress(ctx, 0.6, "process")
    with stage("encode"):
        icc = image.info.get("icc_profile")
        data = encode(
            image,
            fmt,
            ctx.params.get("quality", DEFAULT_QUALITY),
            background=(background[0], background[1], background[2]),
            exif=exif,
            icc_profile=icc if isinstance(icc, bytes) else None,
        )
    ctx.progress(1.0, "encode")
    return Result(outputs={"image": data}, metadata=image_metadata(fmt, image))


def _progress(ctx: JobContext, fraction: float, message: str) -> None:
    ctx.raise_if_cancelled()
    ctx.progress(fraction, message)


def _target_size(
    size: tuple[int, int], width: int | None, height: int | None, fit: str | None
) -> tuple[int, int]:
    w, h = size
    if width is None or height is None:
        scale = width / w if width is not None else (height or 1) / h
    elif fit == "contain":
        scale = min(width / w, height / h)
    else:  # cover and fill: exactly the box
        return width, height
    return max(1, round(w * scale)), max(1, round(h * scale))


def _cover_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered part of an image of `size` with the aspect of `target`."""
    w, h = size
    tw, th = target
    if w * th > h * tw:  # wider than the box: trim the sides
        cw = h * tw / th
        return ((w - cw) / 2, 0, (w + cw) / 2, h)
    ch = w * th / tw
    return (0, (h - ch) / 2, w, (h + ch) / 2)


def _crop_box(crop: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    keys = ("left", "top", "width", "height")
    if not isinstance(crop, dict) or set(crop) != set(keys):
        raise HandlerError(
            "param 'crop' must be an object with left, top, width and height", Code.INVALID_PARAMS
        )
    values: list[int] = []
    for key in keys:
        value = crop[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise HandlerError(
                f"crop.{key} must be a whole number, got {value!r}", Code.INVALID_PARAMS
            )
        values.append(int(value))
    left, top, width, height = values
    w, h = size
    if left < 0 or top < 0 or width < 1 or height < 1 or left + width > w or top + height > h:
        raise HandlerError(
            f"crop {width}x{height} at ({left}, {top}) is not within the {w}x{h} image",
            code=Code.INVALID_PARAMS,
        )
    return left, top, left + width, top + height


def _rotated(image: Image.Image, degrees: float) -> Image.Image:
    degrees %= 360
    right_angles = {
        90: Image.Transpose.ROTATE_270,  # Pillow turns counter-clockwise
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_90,
    }
    if degrees == 0:
        return image
    if degrees in right_angles:
        return image.transpose(right_angles[int(degrees)])
    radians = math.radians(degrees)
    w, h = image.size
    cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
    check_pixels(math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos), "the rotated image")
    if image.mode not in ("RGBA", "LA"):
        image = image.convert("RGBA")  # transparent corners
    return image.rotate(-degrees, Image.Resampling.BICUBIC, expand=True)


def _layer(i: int, item: Any, ctx: JobContext) -> dict[str, Any]:
    where = f"layers[{i}]"
    if unknown := sorted(set(item) - {"input", "x", "y", "opacity", "z"}):
        raise HandlerError(
            f"{where}: unknown keys {unknown}; a layer has input, x, y, opacity, z",
            Code.INVALID_PARAMS,
        )
    name = item.get("input")
    if not isinstance(name, str):
        raise HandlerError(f"{where}.input must name one of the job's inputs", Code.INVALID_PARAMS)
    if name not in ctx.inputs:
        raise HandlerError(
            f"{where}.input is {name!r}, not one of the job's inputs "
            f"({', '.join(map(repr, sorted(ctx.inputs))) or 'none'})",
            code=Code.MISSING_INPUT,
        )
    layer: dict[str, Any] = {"input": name}
    for key, default, low, high, whole in (
        ("x", 0, -1_000_000, 1_000_000, True),
        ("y", 0, -1_000_000, 1_000_000, True),
        ("opacity", 1.0, 0.0, 1.0, False),
        ("z", 0, -1_000_000, 1_000_000, False),
    ):
        value = item.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
            or (whole and value != int(value))
        ):
            kind = "a whole number" if whole else "a number"
            raise HandlerError(
                f"{where}.{key} must be {kind} from {low:g} to {high:g}, got {value!r}",
                Code.INVALID_PARAMS,
            )
        layer[key] = int(value) if whole else float(value)
    return layer


def _draw(canvas: Image.Image, image: Image.Image, layer: dict[str, Any]) -> None:
    x, y, opacity = layer["x"], layer["y"], layer["opacity"]
    w, h = image.size
    left, top = max(0, -x), max(0, -y)
    right, bottom = min(w, canvas.width - x), min(h, canvas.height - y)
    if right <= left or bottom <= top or opacity <= 0:
        return  # entirely off the canvas, or invisible
    part = image.crop((left, top, right, bottom)).convert("RGBA")
    if opacity < 1:
        part.putalpha(part.getchannel("A").point(lambda a: round(a * opacity)))
    canvas.alpha_composite(part, dest=(x + left, y + top))
