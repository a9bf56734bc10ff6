"""The commands that talk to a gateway: submit, watch, get, cancel, list, workers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobmesh.blocking import Client
from jobmesh.cli import args as cli_args
from jobmesh.cli.jsonout import decode_object, print_json
from jobmesh.cli.progress import event_view
from jobmesh.cli.render import job_details, jobs_table, size, stdout_console, workers_table
from jobmesh.convert import is_terminal, state_name, terminal_event
from jobmesh.errors import FailedPrecondition, InvalidArgument, JobFailed
from jobmesh.v1 import admin_service_pb2, job_pb2, job_service_pb2

# The gateway's own bound on one List page.
MAX_PAGE = 1000


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = commands.add_parser("submit", parents=[common], help="submit a job")
    p.add_argument("kind", help="the handler to run, e.g. echo")
    p.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        type=cli_args.param,
        default=[],
        metavar="KEY=VALUE",
        help="a parameter; the value is read as JSON when it is JSON, else as a string",
    )
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=cli_args.input_file,
        default=[],
        metavar="[NAME=]FILE",
        help="a file to send as input NAME (default: the file's name)",
    )
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default: 0)")
    p.add_argument("--idempotency-key", default="", help="a resubmit with this key gets the job")
    cli_args.add_labels(p, "a label to find the job by")
    p.add_argument(
        "--max-attempts", type=cli_args.positive, help="attempts in all (default: the gateway's)"
    )
    p.add_argument(
        "--initial-backoff", type=cli_args.seconds, metavar="SECONDS", help="delay before a retry"
    )
    p.add_argument(
        "--max-backoff", type=cli_args.seconds, metavar="SECONDS", help="longest retry delay"
    )
    for flag, what in (
        ("--start-to-close-timeout", "one attempt may run (then TIMEOUT, retried)"),
        ("--schedule-to-start-timeout", "the job may wait in the queue for an attempt"),
        ("--schedule-to-close-timeout", "the whole job may take, retries included"),
    ):
        p.add_argument(flag, type=cli_args.seconds, metavar="SECONDS", help=f"longest {what}")
    p.add_argument(
        "--retention",
        type=cli_args.seconds,
        metavar="SECONDS",
        help="keep the job this long after it ends (default: the gateway's --retention)",
    )
    p.add_argument(
        "--not-before",
        type=cli_args.point_in_time,
        metavar="WHEN",
        help="do not run it before WHEN: seconds from now (90), or an ISO 8601 time with its "
        "offset (2026-12-01T08:00:00+01:00)",
    )
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.add_argument(
        "--output",
        type=cli_args.output_dir,
        metavar="DIR",
        help="with --wait: write the outputs here, one file per name",
    )
    p.set_defaults(func=submit)

    p = commands.add_parser("watch", parents=[common], help="follow a job until it ends")
    p.add_argument("job")
    p.add_argument(
        "--after-seq", type=cli_args.count, default=0, metavar="N", help="skip events up to N"
    )
    p.set_defaults(func=watch)

    p = commands.add_parser("get", parents=[common], help="show a job")
    p.add_argument("job")
    p.add_argument(
        "--output",
        type=cli_args.output_dir,
        metavar="DIR",
        help="write the outputs of the SUCCEEDED job here, one file per name",
    )
    p.set_defaults(func=get)

    p = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    p.add_argument("job")
    p.add_argument("--reason", default="", help="recorded with the job")
    p.set_defaults(func=cancel)

    p = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument(
        "--state",
        dest="states",
        action="append",
        type=cli_args.state,
        default=[],
        help="only jobs in this state (repeatable)",
    )
    p.add_argument("--kind", default="", help="only jobs of this kind")
    cli_args.add_labels(p, "only jobs with this label (repeatable)")
    p.add_argument(
        "--limit", type=cli_args.positive, default=50, help="at most this many (default: 50)"
    )
    p.add_argument("--page-token", default="", help="continue where a previous list stopped")
    p.set_defaults(func=list_jobs)

    p = commands.add_parser("workers", parents=[common], help="list attached worker replicas")
    p.set_defaults(func=workers)


def submit(args: argparse.Namespace) -> int:
    if args.output is not None and not args.wait:
        raise InvalidArgument("needs --wait", "--output")
    inputs = cli_args.read_inputs(args.inputs)
    with Client(settings=cli_args.client_settings(args)) as client:
        submitted = client.submit(
            args.kind,
            params=dict(args.params),
            inputs=inputs,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            labels=dict(args.labels),
            max_attempts=args.max_attempts,
            initial_backoff=args.initial_backoff,
            max_backoff=args.max_backoff,
            start_to_close_timeout=args.start_to_close_timeout,
            schedule_to_start_timeout=args.schedule_to_start_timeout,
            schedule_to_close_timeout=args.schedule_to_close_timeout,
            retention=args.retention,
            not_before=args.not_before,
        )
        for warning in submitted.warnings:
            print(f"jobmesh: warning: {warning}", file=sys.stderr)
        job = submitted.job.proto
        if args.json:
            response = job_service_pb2.SubmitResponse(
                job=job, existing=submitted.existing, warnings=submitted.warnings
            )
            print_json(response)
        else:
            print(job.id, flush=True)
            if submitted.existing:
                print(f"jobmesh: the idempotency key matched job {job.id}", file=sys.stderr)
        if not args.wait:
            return 0
        end = _follow(client, job.id, 0, args.json)
        if args.output is not None and end.state == job_pb2.JOB_STATE_SUCCEEDED:
            _write_outputs(client, args.output, end.result)
    return _outcome(end)


def watch(args: argparse.Namespace) -> int:
    with Client(settings=cli_args.client_settings(args)) as client:
        end = _follow(client, args.job, args.after_seq, args.json)
    return _outcome(end)


def get(args: argparse.Namespace) -> int:
    with Client(settings=cli_args.client_settings(args)) as client:
        job = client.get(args.job).proto
        if args.json:
            print_json(job)
        else:
            stdout_console().print(job_details(job))
        if args.output is None:
            return 0
        if not is_terminal(job.state):
            raise FailedPrecondition(
                f"job {job.id} is {state_name(job.state)}: it has no outputs until it ends"
            )
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            _write_outputs(client, args.output, job.result)
    return _outcome(terminal_event(job))


def cancel(args: argparse.Namespace) -> int:
    with Client(settings=cli_args.client_settings(args)) as client:
        job = client.cancel(args.job, args.reason).proto
    if args.json:
        print_json(job)
    else:
        print(f"{job.id} {state_name(job.state)}")
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    jobs: list[job_pb2.Job] = []
    token = args.page_token
    with Client(settings=cli_args.client_settings(args)) as client:
        while len(jobs) < args.limit:
            page, token = client.list(
                states=args.states,
                kind=args.kind,
                labels=dict(args.labels),
                page_size=min(args.limit - len(jobs), MAX_PAGE),
                page_token=token,
            )
            jobs += [job.proto for job in page]
            if not token:
                break
    if args.json:
        print_json(job_service_pb2.ListResponse(jobs=jobs, next_page_token=token))
        return 0
    stdout_console().print(jobs_table(jobs))
    if token:
        print(f"jobmesh: more with --page-token {token}", file=sys.stderr)
    return 0


def workers(args: argparse.Namespace) -> int:
    with Client(settings=cli_args.client_settings(args)) as client:
        found = client.list_workers()
    if args.json:
        print_json(admin_service_pb2.ListWorkersResponse(workers=found))
    else:
        stdout_console().print(workers_table(found))
    return 0


def _follow(client: Client, job_id: str, after_seq: int, json_lines: bool) -> job_pb2.JobEvent:
    """Shows the job's events as they happen; returns the terminal one."""
    last: job_pb2.JobEvent | None = None
    with event_view(json_lines) as view:
        for watched in client.watch(job_id, after_seq):
            event = watched.proto
            view.show(event)
            last = event
    if last is not None and is_terminal(last.state):
        return last
    # `after_seq` was already past the terminal event: the job tells how it ended.
    return terminal_event(client.get(job_id).proto)


def _outcome(end: job_pb2.JobEvent) -> int:
    if end.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise JobFailed(end.job_id, state_name(end.state), end.error.code, end.error.message)
    return 0


def _write_outputs(client: Client, directory: Path, result: job_pb2.JobResult) -> None:
    # Every name is checked before anything is written, so a bad one leaves no partial result.
    names = [*result.outputs, *result.output_blobs]
    metadata = decode_object(result.metadata_json, "result.metadata_json")
    paths = {name: cli_args.output_file(directory, name, metadata) for name in names}
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in sorted(paths.items()):
        if name in result.outputs:
            path.write_bytes(result.outputs[name])
            written = len(result.outputs[name])
        else:
            with path.open("wb") as sink:  # large outputs stream to disk
                client.download(result.output_blobs[name].id, sink)
            written = result.output_blobs[name].size
        print(f"jobmesh: wrote {path} ({size(written)})", file=sys.stderr)
