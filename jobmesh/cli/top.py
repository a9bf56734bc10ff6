"""`jobmesh top`: the cluster live (AdminService.WatchStats): workers, queues, job rates."""

from __future__ import annotations

import argparse
import time
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from typing import cast

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from jobmesh.blocking import Client
from jobmesh.cli import args as cli_args
from jobmesh.cli.jsonout import print_json
from jobmesh.cli.render import ago, duration, size, stdout_console, worker_state
from jobmesh.v1 import admin_service_pb2


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = commands.add_parser(
        "top", parents=[common], help="watch workers, queues and job rates live"
    )
    p.add_argument(
        "--interval",
        type=cli_args.seconds,
        default=1.0,
        metavar="SECONDS",
        help="time between updates, 0.1 to 60 (default: 1)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one update and exit (after one interval, so that its rates cover it)",
    )
    p.set_defaults(func=top)


def top(args: argparse.Namespace) -> int:
    settings = cli_args.client_settings(args)
    with Client(settings=settings) as client, closing(_generator(client, args.interval)) as updates:
        stream: Iterable[admin_service_pb2.ClusterStats] = (
            _first_with_rates(updates) if args.once else updates
        )
        if args.json:
            for stats in stream:
                print_json(stats)
            return 0
        console = stdout_console()
        title = f"jobmesh top · {client.settings.gateway} · every {args.interval:g}s"
        if args.once or not console.is_terminal:
            for stats in stream:
                console.print(view(stats, title))
            return 0
        with Live(console=console, auto_refresh=False, screen=False) as live:
            for stats in stream:
                live.update(view(stats, title), refresh=True)
    return 0


def _generator(client: Client, interval: float) -> Generator[admin_service_pb2.ClusterStats]:
    # A generator indeed, closed when done: that ends the stream at once.
    return cast(Generator[admin_service_pb2.ClusterStats], client.watch_stats(interval))


def _first_with_rates(
    updates: Iterator[admin_service_pb2.ClusterStats],
) -> Iterator[admin_service_pb2.ClusterStats]:
    # The stream's first update covers no time: its rates are zero.
    for stats in updates:
        if stats.period.ToNanoseconds() > 0:
            yield stats
            return


def view(stats: admin_service_pb2.ClusterStats, title: str) -> RenderableType:
    rates, totals = stats.rates, stats.totals
    header = Text(f"{title} · {time.strftime('%H:%M:%S')}", style="bold")
    per_second = Text(
        f"jobs/s  submitted {rates.submitted_per_second:.1f}  "
        f"completed {rates.completed_per_second:.1f}  failed {rates.failed_per_second:.1f}  "
        f"cancelled {rates.cancelled_per_second:.1f}"
    )
    total = Text(
        f"total   submitted {totals.submitted}  completed {totals.completed}  "
        f"failed {totals.failed}  cancelled {totals.cancelled}"
    )
    if stats.recent_jobs:
        mean = _seconds(stats.mean_processing_time.ToNanoseconds() / 1e9)
        recent = Text(
            f"recent  {stats.success_rate:.0%} succeeded of the last {stats.recent_jobs}, "
            f"mean processing time {mean}"
        )
    else:
        recent = Text("recent  no job has ended yet")
    return Group(
        header, per_second, total, recent, Text(), workers(stats.workers), Text(), kinds(stats)
    )


def workers(found: Iterable[admin_service_pb2.Worker]) -> Table:
    """The workers; with a GATEWAY column when gateways share a database."""
    found = list(found)
    shared = any(w.gateway for w in found)
    table = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    columns = ("WORKER", "STATE", "ACTIVE/SLOTS", "CPU %", "RSS", "LOOP LAG", "DONE", "FAILED")
    for column in (*columns, "LAST PONG", *(("GATEWAY",) if shared else ())):
        left = column in ("WORKER", "GATEWAY")
        table.add_column(column, no_wrap=True, justify="left" if left else "right")
    now = time.time()
    rows = 0
    for w in found:
        ponged = w.HasField("last_pong_time")
        s = w.stats
        table.add_row(
            w.worker_id,
            worker_state(w.state),
            f"{w.active_jobs}/{w.slots}",
            f"{s.cpu_percent:.0f}" if ponged else "-",
            size(s.rss_bytes) if ponged else "-",
            f"{s.loop_lag_seconds * 1000:.0f} ms" if ponged else "-",
            str(s.jobs_done) if ponged else "-",
            str(s.jobs_failed) if ponged else "-",
            ago(w.last_pong_time, now),
            *((w.gateway,) if shared else ()),
        )
        rows += 1
    if not rows:
        table.add_row("(no worker attached)", *[""] * (len(columns)))
    return table


def kinds(stats: admin_service_pb2.ClusterStats) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("KIND", no_wrap=True)
    table.add_column("QUEUED", justify="right")
    table.add_column("RUNNING", justify="right")
    table.add_column("OLDEST", justify="right")
    for k in stats.kinds:
        age = k.oldest_queued_age.ToNanoseconds() / 1e9
        table.add_row(k.kind, str(k.queued), str(k.running), _seconds(age) if age else "-")
    if not stats.kinds:
        table.add_row("(no job queued or running)", "", "", "")
    return table


def _seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else duration(seconds)
