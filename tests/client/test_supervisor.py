"""The supervisor of `jobmesh serve`: restarts children that exit, stops them all in order."""

from __future__ import annotations

import asyncio
import sys

from jobmesh.supervisor import ChildSpec, RestartPolicy, Supervisor

QUICK = RestartPolicy(initial=0.05, maximum=0.1, stable_after=10.0)


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


async def test_a_child_that_exits_is_started_again() -> None:
    supervisor = Supervisor([ChildSpec("crashy", python("raise SystemExit(3)"))], QUICK)
    supervisor.start()
    for _ in range(200):
        if supervisor.restarts >= 2:
            break
        await asyncio.sleep(0.05)
    await supervisor.stop(grace=5)
    assert supervisor.restarts >= 2


async def test_stop_terminates_children_and_kills_those_that_ignore_it() -> None:
    polite = ChildSpec("polite", python("import time; time.sleep(60)"))
    stubborn = ChildSpec(
        "stubborn",
        python(
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "time.sleep(60)"
        ),
    )
    supervisor = Supervisor([polite, stubborn], QUICK)
    supervisor.start()
    for _ in range(200):
        if len(supervisor.pids()) == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let the stubborn one install its handler
    loop = asyncio.get_running_loop()
    started = loop.time()
    await supervisor.stop(grace=1.0)
    assert loop.time() - started < 10
    assert supervisor.pids() == {}
    assert supervisor.restarts == 0
