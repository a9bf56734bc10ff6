"""The `jobmesh` command.

Exit codes: 0 ok, 1 the job did not succeed, 2 bad usage or INVALID_ARGUMENT, 3 any other
error (NOT_FOUND, UNAVAILABLE, an output the CLI refuses to write...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import grpc
from opentelemetry import trace

from jobmesh import __version__, telemetry
from jobmesh.cli import args as cli_args
from jobmesh.cli import images, jobs, services, top
from jobmesh.errors import JobFailed, JobmeshError

SERVICES = ("gateway", "worker", "serve")

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130
# Seconds the command may spend sending its trace to the collector when it ends.
EXPORT_TIMEOUT = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobmesh", description="Submit and follow jobs on a jobmesh gateway, or run one."
    )
    parser.add_argument("--version", action="version", version=f"jobmesh {__version__}")
    cli_args.add_connection(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    cli_args.add_connection(common)
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON for programs: one object per line (README: JSON output)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    jobs.add_commands(commands, common)
    top.add_commands(commands, common)
    images.add_commands(commands, common)
    services.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "forward", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if args.command not in SERVICES:
        logging.basicConfig(level=logging.WARNING, format="jobmesh: %(message)s")
        # With OTEL_EXPORTER_OTLP_ENDPOINT set, the command's calls start the job's trace;
        # a collector that is down costs the command at most EXPORT_TIMEOUT at its end.
        telemetry.setup("jobmesh-cli", export_timeout=EXPORT_TIMEOUT)
    try:
        if args.command in SERVICES:
            code: int = args.func(args)
            return code
        # The command's span is the parent of the trace of every job it submits.
        with trace.get_tracer("jobmesh.cli").start_as_current_span(f"jobmesh {args.command}"):
            code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:
        # The reader went away (`jobmesh top --json | head -1`): nothing left to say to it.
        _silence_stdout()
        return EXIT_OK
    except JobmeshError as e:
        print(f"jobmesh: {describe(e)}", file=sys.stderr)
        return exit_code(e)
    except (OSError, cli_args.OutputRefused) as e:
        print(f"jobmesh: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        telemetry.shutdown()


def _silence_stdout() -> None:
    # Python's recipe: what is still buffered would fail again when Python flushes at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def exit_code(error: JobmeshError) -> int:
    if isinstance(error, JobFailed):
        return EXIT_JOB_FAILED
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_USAGE
    return EXIT_ERROR


def describe(error: JobmeshError) -> str:
    """The error line after 'jobmesh: ': the status code, then what went wrong."""
    if isinstance(error, JobFailed):
        return error.message
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"RESOURCE_EXHAUSTED: the gateway refused because of a limit: {error.message}"
    return f"{error.code.name}: {error.message}"
