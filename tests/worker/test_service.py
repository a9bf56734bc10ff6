"""`python -m worker_service` as a real process, against a real (scripted) Dispatcher server."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import psutil

from jobmesh.v1 import dispatcher_pb2 as d
from tests.worker.fake_gateway import FakeGateway, FakeSession, StartWorker, until


async def attached(gateway: FakeGateway, start_worker: StartWorker, *extra: str) -> FakeSession:
    await start_worker(*extra)
    return await gateway.session()


async def exit_code(proc: asyncio.subprocess.Process) -> int:
    return await asyncio.wait_for(proc.wait(), 30)


async def test_attach_says_what_the_worker_serves(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    a = session.attach
    assert (a.worker_id, a.slots, dict(a.labels), a.version) == ("w1", 2, {"zone": "a"}, "0.1.0")
    kinds = {k.kind: k.max_concurrency for k in a.kinds}
    assert {"echo": 0, "sleep": 0, "fail": 0, "test.one_at_a_time": 1}.items() <= kinds.items()
    assert not a.running


async def test_an_assigned_job_is_accepted_runs_and_completes(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    session.assign("e1", "echo", p="v")
    assert await session.next(d.Accepted, d.Failed) == d.Accepted(job_id="e1", attempt=1)
    done = await session.result_of("e1")
    assert isinstance(done, d.Completed)
    assert dict(done.result.outputs) == {"in": b"hi"}
    assert json.loads(done.result.metadata_json) == {"p": "v"}

    session.assign("s1", "sleep", seconds=0.6)
    progress: list[float] = []
    while True:
        item = await session.next(d.Progress, d.Completed, d.Failed)
        if not isinstance(item, d.Progress):
            break
        progress.append(item.fraction)
    assert isinstance(item, d.Completed), item
    assert json.loads(item.result.metadata_json) == {"slept": 0.6}
    assert progress, "no progress arrived"
    assert progress == sorted(progress)


async def test_params_reach_a_pool_handler_typed_and_exact(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    session.assign("t1", "test.types", count=3.0, ratio=2, mode="fast")
    done = await session.result_of("t1")
    assert isinstance(done, d.Completed), done
    assert json.loads(done.result.metadata_json) == {
        "params": {"count": 3, "ratio": 2.0, "mode": "Fast"},
        "types": {"count": "int", "ratio": "float", "mode": "str"},
    }
    # Without a schema the handler gets the JSON as sent; the largest exact integer stays so.
    session.assign("e1", "echo", big=2**53 - 1, neg=-(2**53 - 1))
    done = await session.result_of("e1")
    assert isinstance(done, d.Completed), done
    assert json.loads(done.result.metadata_json) == {"big": 2**53 - 1, "neg": -(2**53 - 1)}

    session.assign("t2", "test.types", count=-1)
    failed = await session.result_of("t2")
    assert isinstance(failed, d.Failed), failed
    assert (failed.error.code, failed.error.retryable) == ("INVALID_PARAMS", False)
    assert failed.error.message == "params.count: must be at least 0, got -1"
    session.assign("e2", "echo", big=2**53)  # past what JSON clients read exactly
    failed = await session.result_of("e2")
    assert isinstance(failed, d.Failed), failed
    assert failed.error.code == "INVALID_PARAMS"
    assert failed.error.message.startswith("params.big: the integer 9007199254740992 is beyond")


async def test_pings_are_answered_with_stats_and_cancel_reaches_the_job(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    proc = await start_worker()
    session = await gateway.session()
    session.assign("b1", "test.block")
    await session.next(d.Progress)  # it runs
    session.ping(7)
    pong = await session.next(d.Pong)
    assert isinstance(pong, d.Pong)
    assert pong.seq == 7
    assert (pong.stats.active_jobs, pong.stats.free_slots) == (1, 1)
    # The pool processes count too.
    assert pong.stats.rss_bytes > psutil.Process(proc.pid).memory_info().rss
    session.cancel("b1")
    failed = await session.result_of("b1")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("CANCELLED", False)
    session.ping(8)
    pong = await session.next(d.Pong)
    assert isinstance(pong, d.Pong)
    assert (pong.stats.active_jobs, pong.stats.jobs_failed) == (0, 1)


async def test_a_cancel_in_the_same_message_as_its_assign_is_not_lost(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    assign = d.Assign(job_id="s1", attempt=1, kind="sleep", params_json='{"seconds": 30}')
    session.send(d.SessionResponse(assign=[assign], cancel=[d.Cancel(job_id="s1", attempt=1)]))
    failed = await session.result_of("s1")
    assert isinstance(failed, d.Failed)
    assert failed.error.code == "CANCELLED"


async def test_assigns_it_cannot_take_are_refused_not_failed(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)

    async def refused(job_id: str) -> str:
        """Why the worker refused the job; '' if it accepted it."""
        item = await session.next(d.Accepted, d.Refused, d.Failed)
        assert isinstance(item, d.Accepted | d.Refused), item  # a refusal is not a failure
        assert (item.job_id, item.attempt) == (job_id, 1)
        return item.reason if isinstance(item, d.Refused) else ""

    session.assign("x", "no.such.kind")
    assert "no handler for kind 'no.such.kind'" in await refused("x")
    session.assign("o1", "test.one_at_a_time", seconds=30)
    assert not await refused("o1")
    session.assign("o2", "test.one_at_a_time", seconds=30)
    assert "its limit" in await refused("o2")
    session.assign("s1", "sleep", seconds=30)
    assert not await refused("s1")
    session.assign("s2", "sleep", seconds=30)
    assert "all 2 slots are busy" in await refused("s2")
    # Nothing else about the refused jobs follows: no result to acknowledge, none resent.
    later = [i for i in await session.settled() if isinstance(i, d.Completed | d.Failed)]
    assert not later


async def test_a_dying_pool_process_fails_its_job_and_the_worker_keeps_serving(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    session.assign("x1", "test.exit")
    failed = await session.result_of("x1")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("WORKER_PROCESS_DIED", True)
    for i in range(3):
        session.assign(f"p{i}", "test.pid")
        assert isinstance(await session.result_of(f"p{i}"), d.Completed)


async def test_jobs_outlive_a_broken_stream_and_report_after_reconnect(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    session.assign("long", "test.block", seconds=2.5)
    session.assign("short", "sleep", seconds=0.3)
    await session.next(d.Progress)
    gateway.refuse = True
    session.end()
    await asyncio.sleep(1.0)  # "short" ends while no stream is up
    gateway.refuse = False
    again = await gateway.session()
    # Listed: the attempt still running, and the one whose result waits to be acknowledged.
    assert sorted((r.job_id, r.attempt) for r in again.attach.running) == [
        ("long", 1),
        ("short", 1),
    ]
    short = await again.result_of("short")
    assert isinstance(short, d.Completed)
    assert json.loads(short.result.metadata_json) == {"slept": 0.3}
    assert isinstance(await again.result_of("long"), d.Completed)


async def test_sigterm_drains_in_flight_jobs_then_exits_0(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    proc = await start_worker()
    session = await gateway.session()
    session.assign("s1", "sleep", seconds=1.0)
    await session.next(d.Accepted)
    proc.send_signal(signal.SIGTERM)
    await session.next(d.Draining)
    session.assign("late", "echo")
    refused = await session.result_of("late")
    assert isinstance(refused, d.Refused)
    assert refused.reason == "the worker is draining"
    assert isinstance(await session.result_of("s1"), d.Completed)
    await asyncio.wait_for(session.ended.wait(), 30)
    assert await exit_code(proc) == 0


async def test_jobs_still_running_when_the_grace_ends_fail_retryably(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    proc = await start_worker("--drain-grace", "0.5")
    session = await gateway.session()
    session.assign("b1", "test.block")
    await session.next(d.Progress)
    proc.send_signal(signal.SIGTERM)
    failed = await session.result_of("b1")
    assert isinstance(failed, d.Failed)
    assert (failed.error.code, failed.error.retryable) == ("WORKER_SHUTDOWN", True)
    assert await exit_code(proc) == 0


async def test_a_second_signal_exits_at_once(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    proc = await start_worker()
    session = await gateway.session()
    session.assign("b1", "test.block")
    await session.next(d.Progress)
    proc.send_signal(signal.SIGINT)
    await session.next(d.Draining)
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 5) == 128 + signal.SIGINT


async def test_pool_processes_exit_when_the_worker_is_killed(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    proc = await start_worker()
    session = await gateway.session()
    session.assign("p", "test.pid")
    done = await session.result_of("p")
    assert isinstance(done, d.Completed)
    child = psutil.Process(json.loads(done.result.metadata_json)["pid"])
    proc.kill()
    await proc.wait()

    def gone() -> bool:
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await until(gone)


async def test_a_handler_module_that_does_not_import_exits_2(start_worker: StartWorker) -> None:
    proc = await start_worker("--handlers", "tests.worker.no_such_module")
    assert await exit_code(proc) == 2


# Stopping jobs by force, and the pool after.


async def pids_serve(session: FakeSession, n: int = 3) -> set[int]:
    """Runs `n` test.pid jobs one after the other; returns the pool pids that ran them."""
    pids: set[int] = set()
    for i in range(n):
        session.assign(f"pid{i}", "test.pid")
        done = await session.result_of(f"pid{i}")
        assert isinstance(done, d.Completed), done
        pids.add(json.loads(done.result.metadata_json)["pid"])
    return pids


async def pid_of_running(session: FakeSession) -> int:
    """The pool pid a stubborn or hog job reports first."""
    item = await session.next(d.Progress)
    assert isinstance(item, d.Progress)
    return int(item.message)


async def failure(session: FakeSession, job_id: str) -> d.Failed:
    item = await session.result_of(job_id)
    assert isinstance(item, d.Failed), item
    return item


async def test_a_pool_handler_that_ignores_its_timeout_is_killed_and_the_next_job_runs(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker, "--cancel-grace", "0.5")
    session.assign("t1", "test.stubborn", timeout=0.5)
    pid = await pid_of_running(session)
    failed = await failure(session, "t1")
    assert (failed.error.code, failed.error.retryable) == ("TIMEOUT", True)
    assert "0.5 s limit" in failed.error.message
    assert pid not in await pids_serve(session)
    session.ping(1)
    pong = await session.next(d.Pong)
    assert isinstance(pong, d.Pong)
    assert (pong.stats.active_jobs, pong.stats.free_slots) == (0, 2)


async def test_cancel_kills_a_pool_handler_that_ignores_it(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker, "--cancel-grace", "0.5")
    session.assign("c1", "test.stubborn")
    pid = await pid_of_running(session)
    session.cancel("c1", reason="not needed any more")
    failed = await failure(session, "c1")
    assert (failed.error.code, failed.error.retryable) == ("CANCELLED", False)
    assert failed.error.message.startswith("not needed any more")
    assert pid not in await pids_serve(session)


async def test_a_job_over_the_memory_limit_fails_and_the_worker_keeps_serving(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker, "--max-job-memory", "150M")
    session.assign("hog", "test.hog", mib=1024)
    pid = await pid_of_running(session)
    failed = await failure(session, "hog")
    assert (failed.error.code, failed.error.retryable) == ("MEMORY_LIMIT_EXCEEDED", False)
    assert "150.0 MiB" in failed.error.message
    session.assign("small", "test.hog", mib=32, hold=0)
    assert isinstance(await session.result_of("small"), d.Completed)
    assert pid not in await pids_serve(session)


async def test_a_segfault_fails_its_job_and_the_worker_keeps_serving(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    session = await attached(gateway, start_worker)
    session.assign("sig", "test.segfault")
    failed = await failure(session, "sig")
    assert (failed.error.code, failed.error.retryable) == ("WORKER_PROCESS_DIED", True)
    assert len(await pids_serve(session, 4)) >= 1


# Re-attach.


async def test_results_from_while_disconnected_arrive_once_after_reattach(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker(slots=3)
    session = await gateway.session()
    session.assign("long", "test.block", seconds=6)
    session.assign("a", "sleep", seconds=0.3)
    session.assign("b", "test.stubborn", seconds=0.3, timeout=0.1)  # a timeout while away
    await session.next(d.Progress)
    gateway.refuse = True
    session.end()
    await asyncio.sleep(1.5)  # "a" and "b" end while no stream is up
    gateway.refuse = False
    again = await gateway.session()
    assert sorted((r.job_id, r.attempt) for r in again.attach.running) == [
        ("a", 1),
        ("b", 1),
        ("long", 1),
    ]
    results: list[tuple[str, str]] = []
    while ("long", "Completed") not in results:
        results += [
            (item.job_id, type(item).__name__)
            for item in await again.settled()
            if isinstance(item, d.Completed | d.Failed)
        ]
    assert sorted(results) == [("a", "Completed"), ("b", "Failed"), ("long", "Completed")]


async def test_an_assign_sent_again_after_reattach_does_not_start_the_job_twice(
    gateway: FakeGateway, start_worker: StartWorker, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    session = await attached(gateway, start_worker)
    session.assign("once", "test.count", path=str(starts), seconds=1.5)
    assert await session.next(d.Accepted) == d.Accepted(job_id="once", attempt=1)
    await until(starts.exists)
    session.end()
    again = await gateway.session()
    assert [(r.job_id, r.attempt) for r in again.attach.running] == [("once", 1)]
    again.assign("once", "test.count", path=str(starts), seconds=1.5)
    assert await again.next(d.Accepted, d.Failed) == d.Accepted(job_id="once", attempt=1)
    assert isinstance(await again.result_of("once"), d.Completed)
    assert not [i for i in await again.settled() if isinstance(i, d.Completed | d.Failed)]
    assert starts.read_text() == "once 1\n"


async def test_a_thread_handler_that_outlives_its_timeout_keeps_its_slot_until_it_returns(
    gateway: FakeGateway, start_worker: StartWorker
) -> None:
    await start_worker("--cancel-grace", "0.2", slots=1)
    session = await gateway.session()
    session.assign("th", "test.stubborn_thread", timeout=0.2, seconds=3)
    failed = await failure(session, "th")
    assert (failed.error.code, failed.error.retryable) == ("TIMEOUT", True)
    session.ping(1)
    pong = await session.next(d.Pong)
    assert isinstance(pong, d.Pong)
    assert (pong.stats.active_jobs, pong.stats.free_slots) == (0, 0)
    session.assign("e1", "echo")
    refused = await session.result_of("e1")
    assert isinstance(refused, d.Refused)
    assert "held" in refused.reason

    async def echo_runs() -> bool:
        session.assign("e2", "echo")
        return isinstance(await session.result_of("e2"), d.Completed)

    for _ in range(50):  # the thread sleeps 3 s in all; then its slot is free again
        if await echo_runs():
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the slot never came back")
