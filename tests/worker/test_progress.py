"""Progress gets through at human rates, and a flood is cut down to its newest report."""

from __future__ import annotations

import asyncio
import threading

from jobmesh.v1 import dispatcher_pb2
from worker_service.progress import ProgressThrottle, loop_reporter

KEY = ("job", 1)


async def test_reports_spaced_wider_than_the_gap_all_go_out() -> None:
    sent: list[float] = []
    throttle = ProgressThrottle(lambda p: sent.append(p.fraction), gap=0.01)
    for i in range(1, 6):
        throttle.report(KEY, i / 5, "")
        await asyncio.sleep(0.03)
    assert sent == [0.2, 0.4, 0.6, 0.8, 1.0]


async def test_a_burst_sends_the_first_and_the_newest() -> None:
    sent: list[dispatcher_pb2.Progress] = []
    throttle = ProgressThrottle(sent.append, gap=0.05)
    for i in range(1000):
        throttle.report(KEY, i / 999, f"item {i}")
    await asyncio.sleep(0.2)
    assert [(p.job_id, p.attempt, p.message) for p in sent] == [
        ("job", 1, "item 0"),
        ("job", 1, "item 999"),
    ]


async def test_an_ended_attempt_sends_nothing_more() -> None:
    sent: list[dispatcher_pb2.Progress] = []
    throttle = ProgressThrottle(sent.append, gap=0.05)
    throttle.report(KEY, 0.1, "")
    throttle.report(KEY, 0.2, "")
    throttle.forget(KEY)
    await asyncio.sleep(0.1)
    assert [p.fraction for p in sent] == [0.1]


async def test_reports_from_a_thread_reach_the_loop_newest_last() -> None:
    seen: list[float] = []
    report = loop_reporter(lambda f, m: seen.append(f))
    thread = threading.Thread(target=lambda: [report(i / 100, "") for i in range(101)])
    thread.start()
    await asyncio.to_thread(thread.join)
    await asyncio.sleep(0.05)
    assert seen
    assert seen[-1] == 1.0
    assert seen == sorted(seen)
