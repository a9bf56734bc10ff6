"""Live views of a job's events: a progress bar, plain lines, or JSON lines."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from jobmesh.cli.render import event_line, print_json
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
        print_json(event, lines=True)


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
        return JsonLines(Console(stderr=True))
    console = Console(stderr=True, highlight=False)
    return ProgressBar(console) if console.is_terminal else EventView(console)
