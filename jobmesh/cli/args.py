"""Parsing of command-line values, and where outputs may be written."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from jobmesh.channels import TLSConfig
from jobmesh.convert import JobState, parse_state
from jobmesh.errors import InvalidArgument
from jobmesh.limits import is_payload_name
from jobmesh.settings import ClientSettings, parse_address

# A job says the extension of its output in its result's metadata; only letters and digits
# become part of a file name.
_EXTENSION = re.compile(r"[a-z0-9]{1,10}")


def address(text: str) -> str:
    """argparse type of HOST:PORT."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# The TLS flags and the TLSConfig fields they set.
_TLS_FLAGS = {
    "tls_ca": "ca",
    "tls_cert": "cert",
    "tls_key": "key",
    "tls_server_name": "server_name",
}


def add_connection(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """How to reach the gateway: --gateway, --token and the TLS flags. They are given to the
    top parser too (`top`), so `jobmesh --tls-ca CA list` works as `jobmesh list --tls-ca CA`;
    the subcommands' copies then default to nothing, so as not to undo the top's."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--gateway",
        type=address,
        default=default,
        metavar="HOST:PORT",
        help="the gateway (default: $JOBMESH_GATEWAY, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--token",
        default=default,
        help="bearer token sent with every call (default: $JOBMESH_TOKEN, which is better: "
        "a flag is visible to anyone who can list processes)",
    )
    parser.add_argument(
        "--token-file",
        default=default,
        metavar="PATH",
        help="file holding the bearer token, read again when it changes, e.g. a Kubernetes "
        "service-account token ($JOBMESH_TOKEN_FILE)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default,
        help="use TLS, verifying the gateway against the system's roots ($JOBMESH_TLS)",
    )
    parser.add_argument(
        "--tls-ca",
        default=default,
        metavar="PEM",
        help="use TLS, verifying the gateway against these CAs ($JOBMESH_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=default,
        metavar="PEM",
        help="client certificate, for the gateway's mTLS port ($JOBMESH_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", default=default, metavar="PEM", help="its key ($JOBMESH_TLS_KEY)"
    )
    parser.add_argument(
        "--tls-server-name",
        default=default,
        metavar="NAME",
        help="the name the gateway's certificate must carry, if not the host dialed "
        "($JOBMESH_TLS_SERVER_NAME)",
    )


def client_settings(args: argparse.Namespace) -> ClientSettings:
    """The environment's client settings with the connection flags given laid over them."""
    settings = ClientSettings.from_env()
    changes: dict[str, Any] = {}
    if getattr(args, "gateway", None):
        changes["gateway"] = args.gateway
    # Either one replaces both of the environment's; both given is an error.
    if getattr(args, "token", None) is not None:
        changes.update(token=args.token, token_file=None)
    if getattr(args, "token_file", None) is not None:
        changes.update(token_file=args.token_file, token=changes.get("token", ""))
    files = {
        field: value for flag, field in _TLS_FLAGS.items() if (value := getattr(args, flag, None))
    }
    if getattr(args, "tls", None) or files:
        changes["tls"] = replace(settings.tls or TLSConfig(), **files)
    return replace(settings, **changes)


def count(text: str) -> int:
    """argparse type of a number that is 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive(text: str) -> int:
    """argparse type of a number that is 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type of a positive number of seconds."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def point_in_time(text: str) -> datetime | float:
    """argparse type of a time: seconds from now, or ISO 8601 with an offset."""
    try:
        return seconds(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"neither seconds from now nor an ISO 8601 time: {text!r}"
        ) from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give the time's offset (e.g. {text}+00:00 or {text}Z)")
    return at


def state(text: str) -> JobState:
    """argparse type of a job state: QUEUED, succeeded, JOB_STATE_FAILED..."""
    try:
        return parse_state(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(e.message) from None


def add_labels(parser: argparse.ArgumentParser, help: str) -> None:
    """A repeatable `--label KEY=VALUE`, collected as `args.labels`."""
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def key_value(text: str) -> tuple[str, str]:
    """argparse type of KEY=VALUE (the value may be empty or hold more '=')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def param(text: str) -> tuple[str, Any]:
    """argparse type of -p KEY=VALUE: the value as JSON when it is JSON, else as a string.

    So `n=3`, `flag=true`, `sizes=[64,128]` and `opts={"q":90}` are typed, and `name=cat`
    stays the string "cat". NaN and Infinity stay strings: protobuf's JSON has no place for them.
    """
    key, raw = key_value(text)
    try:
        value: Any = json.loads(raw, parse_constant=_reject)
    except ValueError:
        value = raw
    return key, value


def _reject(constant: str) -> Any:
    raise ValueError(constant)


def input_file(text: str) -> tuple[str, Path]:
    """argparse type of --input FILE (named after the file) or --input NAME=FILE."""
    name, sep, path = text.partition("=")
    if sep and name and path and not os.path.exists(text):
        return name, Path(path)
    file = Path(text)
    return file.name, file


def read_inputs(files: list[tuple[str, Path]]) -> dict[str, Path]:
    """The input files by name, each checked to be readable; the SDK streams them."""
    inputs: dict[str, Path] = {}
    for name, path in files:
        if name in inputs:
            raise InvalidArgument(f"two inputs are named {name!r}", "--input")
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise InvalidArgument(f"cannot read {str(path)!r}: {e.strerror}", "--input") from None
        inputs[name] = path
    return inputs


def output_dir(text: str) -> Path:
    """argparse type of --output DIR: checked before any job is submitted, so that a job
    does not run only for its outputs to find nowhere to go."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path


class OutputRefused(Exception):
    """An output the CLI will not write, because its name could not safely name a file."""


def output_path(directory: Path, name: str) -> Path:
    """Where the job's output `name` goes under `directory`; OutputRefused unless `name` is
    a payload name.

    Output names come from a handler, which is not the user. Only a payload name (the rule
    of `jobmesh.limits`, which the gateway applies too) becomes a file name: no separator,
    no '..', no control character, no leading dot.
    """
    if not is_payload_name(name):
        raise OutputRefused(
            f"refusing to write output named {name[:70]!r}: not an output name (letters, "
            "digits, '._ -', at most 128, no '..')"
        )
    return directory / name


def extension(metadata: Mapping[str, Any]) -> str:
    """The file extension the job's result metadata gives ('' when it gives none), from
    `extension`, else `format` (as the image kinds say it); OutputRefused unless it is at most
    10 letters and digits."""
    value = str(metadata.get("extension") or metadata.get("format") or "").lower()
    if value and not _EXTENSION.fullmatch(value):
        raise OutputRefused(
            f"refusing the extension {value[:40]!r} the job gave (at most 10 letters and digits)"
        )
    return value


def output_file(directory: Path, name: str, metadata: Mapping[str, Any]) -> Path:
    """Where the job's output `name` goes under `directory`: a name without an extension
    takes the one the result's metadata gives (`image` of a thumbnail job is `image.jpg`)."""
    path = output_path(directory, name)
    ext = extension(metadata)
    if not ext or "." in name:
        return path
    return output_path(directory, f"{name}.{ext}")
