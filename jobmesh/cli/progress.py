"""Live views of a job's events (a progress bar, plain lines, or JSON lines), and of a
batch of jobs (one overall bar, or a line per job)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from jobmesh.cli.jsonout import print_json
from jobmesh.cli.render import console as make_console
from jobmesh.cli.render import event_line
from jobmesh.convert import is_terminal, state_name
from jobmesh.v1 import job_pb2


class EventView:
    """One line of text per event on stderr; the base of the other views."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def __enter__(self) -> EventView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def show(self, event: job_pb2.JobEvent) -> None:
        self._console.print(event_line(event), markup=False, highlight=False)


class JsonLines(EventView):
    """One JSON event per line on stdout, for programs."""

    def show(self, event: job_pb2.JobEvent) -> None:
        print_json(event)


class ProgressBar(EventView):
    """A live bar for progress; state changes stay on screen as lines above it."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._progress = Progress(
            SpinnerColumn(finished_text=" "),
            TextColumn("{task.fields[state]:<9}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}", markup=False),
            console=console,
        )
        self._task = self._progress.add_task("", total=1.0, state="WAITING")

    def __enter__(self) -> EventView:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def show(self, event: job_pb2.JobEvent) -> None:
        if event.type == job_pb2.JOB_EVENT_TYPE_PROGRESS:
            self._progress.update(self._task, completed=event.progress, description=event.message)
            return
        super().show(event)
        completed = None
        if event.state == job_pb2.JOB_STATE_QUEUED:
            completed = 0.0  # a retry starts over
        elif event.state == job_pb2.JOB_STATE_SUCCEEDED:
            completed = 1.0
        self._progress.update(
            self._task, completed=completed, description="", state=state_name(event.state)
        )
        if is_terminal(event.state):
            self._progress.stop_task(self._task)


def event_view(json_lines: bool) -> EventView:
    """JSON lines when asked, a live bar on a terminal, else plain lines."""
    if json_lines:
        return JsonLines(make_console(stderr=True))
    console = make_console(stderr=True)
    return ProgressBar(console) if console.is_terminal else EventView(console)


class BatchLines:
    """A batch as plain lines on stderr: each job's line as it ends (or only failures)."""

    def __init__(self, console: Console, *, every_job: bool) -> None:
        self._console = console
        self._every_job = every_job

    def __enter__(self) -> BatchLines:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def progress(self, job_id: str, fraction: float) -> None:
        pass

    def note(self, line: str) -> None:
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def ended(self, job_id: str, line: str, *, failed: bool) -> None:
        if failed or self._every_job:
            self.note(line)


class BatchBar(BatchLines):
    """One bar for the whole batch, counting jobs and the progress of running ones;
    failures stay on screen as lines above it."""

    def __init__(self, console: Console, total: int, title: str) -> None:
        super().__init__(console, every_job=False)
        self._progress = Progress(
            SpinnerColumn(finished_text=" "),
            TextColumn(title, markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}", markup=False),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task("", total=total, failed="")
        self._running: dict[str, float] = {}
        self._ended = 0
        self._failed = 0

    def __enter__(self) -> BatchLines:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def progress(self, job_id: str, fraction: float) -> None:
        self._running[job_id] = min(max(fraction, 0.0), 1.0)
        self._update()

    def ended(self, job_id: str, line: str, *, failed: bool) -> None:
        self._running.pop(job_id, None)
        self._ended += 1
        if failed:
            self._failed += 1
            self.note(line)
        self._update()

    def _update(self) -> None:
        failed = f"{self._failed} failed" if self._failed else ""
        completed = self._ended + sum(self._running.values())
        self._progress.update(self._task, completed=completed, failed=failed)


def batch_view(json_lines: bool, total: int, title: str) -> BatchLines:
    """A live bar on a terminal, else a line per job; with JSON on stdout, only failures."""
    console = make_console(stderr=True)
    if json_lines:
        return BatchLines(console, every_job=False)
    if console.is_terminal:
        return BatchBar(console, total, title)
    return BatchLines(console, every_job=True)
