"""Failure codes: one enum says each code's wire string, whether it is retried, whose fault."""

from __future__ import annotations

import ast
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jobmesh
from jobmesh import codes, telemetry
from jobmesh.codes import Code
from worker_service import HandlerError, JobCancelled, JobContext
from worker_service.outcomes import run_sync

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("gateway", "worker_service", "jobmesh")

# The flags each code had on the wire before the enum; the enum must not change them.
RETRIED_BEFORE = {
    "CANCELLED": False,
    "WORKER_LOST": True,
    "ASSIGN_NOT_ACKNOWLEDGED": True,
    "TIMEOUT": True,
    "SCHEDULE_TO_START_TIMEOUT": False,
    "DEADLINE_EXCEEDED": False,
    "INVALID_RESULT": False,
    "INVALID_PROGRESS": False,
    "INVALID_ERROR": None,
    "UNKNOWN_KIND": False,
    "INVALID_PARAMS": False,
    "HANDLER_ERROR": None,
    "MEMORY_LIMIT_EXCEEDED": False,
    "RESULT_TOO_LARGE": False,
    "RESULT_UNDELIVERABLE": True,
    "WORKER_PROCESS_DIED": True,
    "WORKER_SHUTDOWN": True,
    "PAYLOAD_TRANSFER_FAILED": True,
    "WORKER_ERROR": True,
    "FAILED_ON_PURPOSE": None,
    "MISSING_INPUT": False,
    "IMAGE_DECODE_ERROR": False,
    "UNSUPPORTED_FORMAT": False,
    "IMAGE_TOO_LARGE": False,
    "IMAGE_PROCESS_ERROR": False,
}
FAULTS_BEFORE = {
    "WORKER_LOST",
    "WORKER_PROCESS_DIED",
    "WORKER_ERROR",
    "WORKER_SHUTDOWN",
    "ASSIGN_NOT_ACKNOWLEDGED",
    "PAYLOAD_TRANSFER_FAILED",
}


def test_values_are_their_names_unique_and_upper_snake() -> None:
    values = [code.value for code in Code]
    assert len(values) == len(set(values))
    for code in Code:
        assert code.value == code.name
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", code.value), code
        assert re.fullmatch(r"[^|\n]+", code.meaning), code  # one table cell


def test_a_member_is_its_wire_string() -> None:
    assert Code.TIMEOUT == "TIMEOUT"
    assert f"{Code.TIMEOUT}" == str(Code.TIMEOUT) == "TIMEOUT"
    assert Code("WORKER_LOST") is Code.WORKER_LOST
    assert jobmesh.Code is Code


def test_flags_are_those_of_before() -> None:
    assert {code.value: code.retryable for code in Code} == RETRIED_BEFORE
    assert {code.value for code in Code if code.fault} == FAULTS_BEFORE


def test_fault_codes_are_the_members_with_fault() -> None:
    assert {code.value for code in Code if code.fault} == telemetry.FAULT_CODES
    assert "MY_OWN_CODE" not in telemetry.FAULT_CODES  # a handler's code is no fault


@pytest.mark.parametrize("code", [c for c in Code if c.retryable is not None])
def test_error_takes_retryable_from_the_member(code: Code) -> None:
    error = code.error("why")
    assert (error.code, error.message, error.retryable) == (code.value, "why", code.retryable)
    assert type(error.code) is str
    with pytest.raises(TypeError):
        code.error("why", retryable=not code.retryable)


@pytest.mark.parametrize("code", [c for c in Code if c.retryable is None])
def test_error_of_a_code_retried_as_raised_needs_the_flag(code: Code) -> None:
    with pytest.raises(TypeError):
        code.error("why")
    assert code.error("why", retryable=True).retryable is True
    assert code.error("why", retryable=False).retryable is False


def test_a_handlers_own_code_keeps_its_flag() -> None:
    def fail(ctx: JobContext) -> None:
        raise HandlerError("nope", code="MY_OWN_CODE", retryable=True)

    ctx = JobContext(job_id="j", attempt=1, kind="k")
    assert run_sync(fail, ctx) == codes.error("MY_OWN_CODE", "nope", True)


def test_handler_error_carries_the_wire_string_across_processes() -> None:
    error = pickle.loads(pickle.dumps(HandlerError("bad", Code.INVALID_PARAMS)))
    assert (type(error.code), error.code, error.retryable) == (str, "INVALID_PARAMS", False)
    assert HandlerError("x").code == Code.HANDLER_ERROR
    assert (JobCancelled().code, JobCancelled().retryable) == (Code.CANCELLED, False)


def _error_code_literals(path: Path) -> list[str]:
    """Where `path` passes a string literal as the code of a JobError or a HandlerError."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        codes_error = name == "error" and getattr(getattr(func, "value", None), "id", "") == "codes"
        if name not in ("JobError", "HandlerError") and not codes_error:
            continue
        args = [kw.value for kw in node.keywords if kw.arg == "code"]
        args += node.args[1:2] if name == "HandlerError" else node.args[:1] if codes_error else []
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}"
            for arg in args
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        ]
    return found


def test_our_code_names_failure_codes_through_the_enum() -> None:
    paths = [p for top in SOURCES for p in (ROOT / top).rglob("*.py") if "v1" not in p.parts]
    assert [where for p in paths for where in _error_code_literals(p)] == []


def test_the_module_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-m", "jobmesh.codes"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.stdout == codes.markdown_table() + "\n"
    assert out.stderr == ""
    rows = out.stdout.splitlines()
    assert rows[0] == "| code | retried | fault | meaning |"
    assert len(rows) == 2 + len(Code)


def test_readme_shows_the_table() -> None:
    assert codes.markdown_table() in (ROOT / "README.md").read_text()
