"""Fixtures: a `cluster` that starts real processes and stops them after the test;
`postgres`, a PostgreSQL server of each test process's own, and `pg_dsn`, a new database
on it for each test (tests/postgres.py).

Tests that start processes get the `processes` marker here, so `make test-fast`
(`pytest -m "not processes"`) runs the rest in seconds. A test that starts one in a way
`pytest_collection_modifyitems` cannot see says so itself: `@pytest.mark.processes`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.postgres import PostgresCluster, start_cluster

TESTS = Path(__file__).parent
# Fixtures that start processes: gateways and workers, a worker against the scripted
# gateway (tests/worker/conftest.py), a handler process pool (tests/worker/test_*.py),
# a PostgreSQL server (tests/postgres.py).
PROCESS_FIXTURES = frozenset({"cluster", "start_worker", "pool", "postgres", "pg_dsn"})
# Suites that are all real processes.
PROCESS_DIRS = ("faults/", "integration/", "hostile/")
# What a test, or a helper of its module it calls, says when it starts a process.
SPAWNS = re.compile(r"subprocess|Popen|sys\.executable|ProcessPool\(")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks `processes` the tests that start processes, so `-m "not processes"` is fast."""
    for item in items:
        try:
            where = item.path.relative_to(TESTS).as_posix()
        except ValueError:
            where = ""
        if (
            set(getattr(item, "fixturenames", ())) & PROCESS_FIXTURES
            or where.startswith(PROCESS_DIRS)
            or _spawns(item)
        ):
            item.add_marker(pytest.mark.processes)


def _spawns(item: pytest.Item) -> bool:
    fn = getattr(item, "function", None)
    if not inspect.isfunction(fn):
        return False
    helpers = vars(inspect.getmodule(fn) or object)
    called = [helpers.get(name) for name in fn.__code__.co_names]
    return any(_says_spawn(f) for f in (fn, *called) if inspect.isfunction(f))


@functools.cache
def _says_spawn(fn: Callable[..., object]) -> bool:
    try:
        return bool(SPAWNS.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


# Suites that run against each store: their `cluster`'s gateways keep jobs in SQLite, then
# in PostgreSQL. A test that sets up its own store says so: `@pytest.mark.one_store`.
BOTH_STORES = ("faults/", "integration/")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" not in metafunc.fixturenames or metafunc.definition.get_closest_marker(
        "one_store"
    ):
        return
    where = metafunc.definition.path.relative_to(TESTS).as_posix()
    if where.startswith(BOTH_STORES):
        metafunc.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Gateways and workers; their jobs in SQLite, or in PostgreSQL where a suite runs
    against both (BOTH_STORES)."""
    store = getattr(request, "param", "sqlite")
    c = Cluster(tmp_path, request.getfixturevalue("pg_dsn") if store == "postgresql" else "")
    try:
        yield c
    finally:
        c.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(c.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of this test process's own (skipped where it is not installed)."""
    server = start_cluster()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_dsn(postgres: PostgresCluster) -> Iterator[str]:
    """The URL of a new empty database, dropped after the test."""
    name = postgres.create_database()
    try:
        yield postgres.dsn(name)
    finally:
        postgres.drop_database(name)
