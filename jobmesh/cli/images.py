"""`jobmesh image OP FILES...`: the built-in image kinds run over many files as one batch,
with one progress bar, a line per failed file, and the outputs written to a directory."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from jobmesh import image_params
from jobmesh.cli import args as cli_args
from jobmesh.cli import batch
from jobmesh.cli.batch import Item, Outcome
from jobmesh.cli.jsonout import decode_object, print_json
from jobmesh.cli.progress import BatchLines, batch_view
from jobmesh.cli.render import size, stdout_console
from jobmesh.client import AsyncClient
from jobmesh.convert import SpecOptions, state_name
from jobmesh.errors import InvalidArgument, JobmeshError
from jobmesh.params import Param
from jobmesh.v1 import job_pb2

# The input, and the main output, of every image kind but composite's layers.
IMAGE = "image"
# The code of a file whose job succeeded but whose output could not be written.
NOT_WRITTEN = "NOT_WRITTEN"
EXIF_WIDTH = 60

# How a flag's text becomes a param's value, and what to say when it cannot.
_READERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "integer": (int, "must be an integer"),
    "number": (float, "must be a number"),
    "list": (json.loads, "must be a JSON list"),
    "object": (json.loads, "must be a JSON object"),
}
_PLACEMENT = re.compile(r"(-?\d+),(-?\d+)(?:,(\d*\.?\d+)(?:,(-?\d+))?)?")


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    image = commands.add_parser(
        "image",
        help="thumbnail, resize, convert, transform, composite or inspect image files",
        description="Runs an image kind on the workers for each file, as one batch; "
        "exits 0 only if every file succeeded, 1 if any failed.",
    )
    ops = image.add_subparsers(dest="op", required=True, metavar="OP")
    job = _job_options()

    for op, what in (
        ("thumbnail", "shrink images to fit a square, keeping their aspect"),
        ("resize", "resize images to a width and/or height"),
        ("convert", "convert images to another format"),
        ("transform", "rotate, flip, crop or auto-orient images"),
    ):
        p = _op(ops, op, what, common, job)
        _output(p)
        _flags(p, image_params.KINDS[f"image.{op}"])

    p = ops.add_parser(
        "composite",
        parents=[common, job],
        help="draw layers onto one canvas",
        description="Draws the layers, each an image at a position with an opacity and a "
        "z-order, onto a canvas; writes DIR/<first layer's name>.<extension>.",
    )
    p.add_argument(
        "--layer",
        dest="layers",
        action="append",
        type=layer,
        required=True,
        metavar="FILE[:X,Y[,OPACITY[,Z]]]",
        help="an image and where it goes (repeatable; later layers are drawn on top)",
    )
    _output(p)
    # The layers are the --layer flags.
    _flags(p, [param for param in image_params.COMPOSITE if param.name != "layers"])
    p.set_defaults(func=composite)

    p = _op(ops, "info", "show images' format, size, mode and EXIF", common, job, writes=False)
    p.set_defaults(params=())


def _op(
    ops: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    what: str,
    *parents: argparse.ArgumentParser,
    writes: bool = True,
) -> argparse.ArgumentParser:
    where = " to DIR/<name>.<extension>" if writes else ""
    p = ops.add_parser(
        name, parents=list(parents), help=what, description=f"{what.capitalize()}{where}."
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=files)
    return p


def _job_options() -> argparse.ArgumentParser:
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument(
        "-p",
        "--param",
        dest="extra",
        action="append",
        type=cli_args.param,
        default=[],
        metavar="KEY=VALUE",
        help="a param without a flag of its own; the value is read as JSON when it is JSON",
    )
    job.add_argument("--priority", type=int, default=0, help="higher runs first (default: 0)")
    job.add_argument(
        "--max-attempts", type=cli_args.positive, help="attempts in all (default: the gateway's)"
    )
    cli_args.add_labels(job, "a label on every job (repeatable)")
    return job


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        type=cli_args.output_dir,
        required=True,
        metavar="DIR",
        help="where the images go",
    )


def _flags(p: argparse.ArgumentParser, schema: Sequence[Param]) -> None:
    """A flag for each param the kind declares (`--auto-orient` for `auto_orient`), with its
    choices, bounds and description, checked by the param itself; `args.params` names them."""
    for param in schema:
        options: dict[str, Any] = {
            "required": param.required,
            "help": param.description.replace("%", "%%"),
        }
        if param.type == "boolean":
            options["action"] = argparse.BooleanOptionalAction
        elif param.name == "crop":
            options |= {"type": crop, "metavar": "LEFT,TOP,WIDTH,HEIGHT"}
        else:
            options["type"] = functools.partial(_typed, param)
            if param.choices:
                options["choices"] = param.choices
            elif param.type in ("integer", "number"):
                options["metavar"] = _bounds(param)
        p.add_argument(f"--{param.name.replace('_', '-')}", **options)
    p.set_defaults(params=tuple(param.name for param in schema))


def _typed(param: Param, text: str) -> Any:
    """argparse type of a param's flag: the value as the param takes it, else the reason."""
    value: Any = text
    if param.choices:
        # Any case goes; a value that is no choice is left for argparse to list them.
        try:
            return param.typed(text)
        except ValueError:
            return text
    try:
        if param.type in _READERS:
            reader, problem = _READERS[param.type]
            try:
                value = reader(text)
            except ValueError:
                raise ValueError(problem) from None
        return param.typed(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, got {text!r}") from None


def _bounds(param: Param) -> str:
    """'1..100' for an integer from 1 to 100."""
    low = "" if param.minimum is None else f"{param.minimum:g}"
    high = "" if param.maximum is None else f"{param.maximum:g}"
    return f"{low}..{high}" if low or high else param.type.upper()


def crop(text: str) -> dict[str, int]:
    """argparse type of LEFT,TOP,WIDTH,HEIGHT."""
    parts = text.split(",")
    try:
        left, top, width, height = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,TOP,WIDTH,HEIGHT, got {text!r}") from None
    return {"left": left, "top": top, "width": width, "height": height}


def layer(text: str) -> tuple[Path, dict[str, Any]]:
    """argparse type of FILE[:X,Y[,OPACITY[,Z]]]: the file and its placement."""
    file, sep, placement = text.rpartition(":")
    if sep and file:
        match = _PLACEMENT.fullmatch(placement)
        if match:
            x, y, opacity, z = match.groups()
            spec: dict[str, Any] = {"x": int(x), "y": int(y)}
            if opacity is not None:
                spec["opacity"] = float(opacity)
            if z is not None:
                spec["z"] = int(z)
            return Path(file), spec
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"expected FILE[:X,Y[,OPACITY[,Z]]], got {text!r}")
    return Path(text), {}


def files(args: argparse.Namespace) -> int:
    """An image kind over each file."""
    items: list[Item] = []
    seen: set[Path] = set()
    for path in args.files:
        resolved = path.resolve()
        if resolved not in seen:  # overlapping globs name a file twice
            seen.add(resolved)
            items.append(Item.of(str(path), {IMAGE: path}))
    output: Path | None = getattr(args, "output", None)
    stems = {item.name: Path(item.name).stem for item in items}
    if output is not None:
        _check_stems(stems, output)
    params = _params(args)
    if args.op == "resize" and "width" not in params and "height" not in params:
        # Refused here rather than by every job on the workers.
        raise InvalidArgument("resize needs --width, --height or both", "--width")
    return _run(args, f"image.{args.op}", params, items, output, stems)


def composite(args: argparse.Namespace) -> int:
    """One job drawing every layer; each distinct file is one input."""
    names: dict[Path, str] = {}
    inputs: dict[str, Path] = {}
    layers: list[dict[str, Any]] = []
    for path, placement in args.layers:
        resolved = path.resolve()
        if resolved not in names:
            names[resolved] = f"layer{len(names) + 1}"
            inputs[names[resolved]] = path
        layers.append({"input": names[resolved], **placement})
    first = str(args.layers[0][0])
    item = Item.of(first, inputs)
    params = {**_params(args), "layers": layers}
    return _run(args, "image.composite", params, [item], args.output, {first: Path(first).stem})


def _params(args: argparse.Namespace) -> dict[str, Any]:
    # Flags left unset are left out, so the handler's defaults apply.
    flags = {name: getattr(args, name) for name in args.params if getattr(args, name) is not None}
    return {**dict(args.extra), **flags}


def _check_stems(stems: Mapping[str, str], output: Path) -> None:
    first: dict[str, str] = {}
    for name, stem in stems.items():
        if stem in first:
            raise InvalidArgument(
                f"{first[stem]!r} and {name!r} would both be written as {output / stem}.*",
                "--output",
            )
        first[stem] = name


def _options(args: argparse.Namespace) -> SpecOptions:
    options = SpecOptions(priority=args.priority, labels=dict(args.labels))
    if args.max_attempts is not None:
        options["max_attempts"] = args.max_attempts
    return options


def _run(
    args: argparse.Namespace,
    kind: str,
    params: Mapping[str, Any],
    items: Sequence[Item],
    output: Path | None,
    stems: Mapping[str, str],
) -> int:
    if output is not None:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidArgument(f"cannot create {str(output)!r}: {e.strerror}", "--output") from e
    inputs = {path.resolve() for item in items for path in item.files.values()}
    view = batch_view(args.json, len(items), args.op)
    report = _Report(view, args.json, output, stems, inputs)

    async def main() -> None:
        async with AsyncClient(settings=cli_args.client_settings(args)) as client:
            on_end = functools.partial(report.on_end, client)
            await batch.run(client, kind, params, _options(args), items, view, on_end)

    try:
        with view:
            asyncio.run(main())
    finally:
        if report.ended and not args.json:
            view.note(report.summary(len(items)))
    if report.infos and not args.json:
        order = {item.name: i for i, item in enumerate(items)}
        infos = sorted(report.infos, key=lambda info: order[info[0]])
        stdout_console().print(info_table(infos))
    return 0 if report.failed == 0 else 1


class _NotWritten(Exception):
    pass


class _Report:
    """What is shown and written as each job ends."""

    def __init__(
        self,
        view: BatchLines,
        json_lines: bool,
        output: Path | None,
        stems: Mapping[str, str],
        inputs: set[Path],
    ) -> None:
        self._view = view
        self._json = json_lines
        self._output = output
        self._stems = stems
        self._inputs = inputs
        self.ended = 0
        self.failed = 0
        self.infos: list[tuple[str, dict[str, Any]]] = []

    async def on_end(self, client: AsyncClient, outcome: Outcome) -> None:
        end, name = outcome.end, outcome.item.name
        state = state_name(end.state)
        # The line of `--json`: every key always there (see `file_line`).
        line: dict[str, Any] = file_line(name, outcome.job_id, state)
        error: job_pb2.JobError | None = None
        text = ""
        if end.state == job_pb2.JOB_STATE_SUCCEEDED:
            metadata = decode_object(end.result.metadata_json, "result.metadata_json")
            line["metadata"] = metadata
            if self._output is None:
                self.infos.append((name, metadata))
                text = f"{name}: {metadata.get('format', '?')} {_dimensions(metadata)}"
            else:
                try:
                    path, written = await self._write(client, name, end.result, metadata)
                    line |= {"output": str(path), "bytes": written}
                    text = f"{name} -> {path} ({size(written)})"
                except _NotWritten as e:
                    error = job_pb2.JobError(code=NOT_WRITTEN, message=str(e))
        else:
            error = job_pb2.JobError(
                code=end.error.code or state,
                message=end.error.message,
                retryable=end.error.retryable,
            )
        self.ended += 1
        if error is not None:
            line["ok"] = False
            self.failed += 1
            line["error"] = {
                "code": error.code,
                "message": error.message,
                "retryable": error.retryable,
            }
            text = f"jobmesh: {name}: {error.code}: {error.message}"
        self._view.ended(outcome.job_id, text, failed=error is not None)
        if self._json:
            print_json(line)

    async def _write(
        self,
        client: AsyncClient,
        name: str,
        result: job_pb2.JobResult,
        metadata: Mapping[str, Any],
    ) -> tuple[Path, int]:
        """Writes the output image where it belongs; returns where, and its bytes."""
        assert self._output is not None
        if IMAGE not in result.outputs and IMAGE not in result.output_blobs:
            raise _NotWritten(f"the job returned no output named {IMAGE!r}")
        try:
            extension = cli_args.extension(metadata)
        except cli_args.OutputRefused as e:
            raise _NotWritten(str(e)) from None
        if not extension:
            raise _NotWritten("the job did not say the image's extension")
        path = self._output / f"{self._stems[name]}.{extension}"
        if path.resolve() in self._inputs:
            raise _NotWritten(f"refusing to overwrite the input {str(path)!r}")
        # Written aside and renamed, so an interrupted run leaves no half image.
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            if IMAGE in result.outputs:
                data = result.outputs[IMAGE]
                await asyncio.to_thread(part.write_bytes, data)
                written = len(data)
            else:  # a large output, kept by the gateway: streamed to disk
                blob = result.output_blobs[IMAGE]
                sink = await asyncio.to_thread(part.open, "wb")
                with sink:
                    await client.download(blob.id, sink)
                written = blob.size
            os.replace(part, path)
        except OSError as e:
            raise _NotWritten(f"cannot write {str(path)!r}: {e.strerror}") from None
        except JobmeshError as e:
            raise _NotWritten(f"cannot download it: {e.code.name}: {e.message}") from None
        finally:
            part.unlink(missing_ok=True)
        return path, written

    def summary(self, total: int) -> str:
        done = self.ended - self.failed
        text = f"jobmesh: {done} of {total} succeeded"
        if self.failed:
            text += f", {self.failed} failed"
        if self.ended < total:
            text += f", {total - self.ended} not done"
        if self._output is not None and done:
            text += f"; images in {self._output}"
        return text


def info_table(infos: Sequence[tuple[str, Mapping[str, Any]]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("FILE", "FORMAT", "WIDTH", "HEIGHT", "MODE", "FRAMES", "EXIF"):
        table.add_column(column, no_wrap=column != "EXIF")
    for name, info in infos:
        table.add_row(
            name,
            str(info.get("format", "-")),
            str(info.get("width", "-")),
            str(info.get("height", "-")),
            str(info.get("mode", "-")),
            str(info.get("frames", "-")),
            _summary(info.get("exif")),
        )
    return table


def file_line(name: str, job_id: str, state: str) -> dict[str, Any]:
    """The `--json` line of one file, as its job ended; what is not known yet is empty."""
    return {
        "file": name,
        "job_id": job_id,
        "state": state,
        "ok": True,
        "output": None,
        "bytes": 0,
        "metadata": {},
        "error": None,
    }


def _dimensions(metadata: Mapping[str, Any]) -> str:
    return f"{metadata.get('width', '?')}x{metadata.get('height', '?')}"


def _summary(exif: Any) -> str:
    if not exif:
        return "-"
    pairs = exif.items() if isinstance(exif, dict) else None
    text = ", ".join(f"{k}={v}" for k, v in pairs) if pairs is not None else str(exif)
    return text if len(text) <= EXIF_WIDTH else text[: EXIF_WIDTH - 1] + "…"
