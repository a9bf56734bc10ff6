"""Every `--json` has one shape: snake_case keys as in the proto, every field present, integers
as numbers, enum values as short names, one object per line. Each command is run against
real gateway and worker processes and each line checked against tests/client/schemas/."""

from __future__ import annotations

import argparse
import functools
import io
import json
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource

from jobmesh import image_params
from jobmesh.cli import build_parser, main
from jobmesh.cli.jsonout import decode_object, print_json, short_name, to_json
from jobmesh.errors import JobmeshError
from jobmesh.v1 import admin_service_pb2, dispatcher_pb2, job_pb2, job_service_pb2
from tests.client.test_cli import jobmesh
from tests.cluster import Cluster

SCHEMAS = Path(__file__).parent / "schemas"
NAMES = ("submit", "job", "event", "list", "workers", "stats", "image")


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """The schema `name`.json, its references to defs.json resolved."""
    registry: Registry[Any] = Registry().with_resources(
        (path.name, Resource.from_contents(json.loads(path.read_text())))
        for path in SCHEMAS.glob("*.json")
    )
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def check(name: str, value: Any) -> Any:
    errors = sorted(validator(name).iter_errors(value), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
    return value


def objects(done: subprocess.CompletedProcess[str], *names: str) -> list[Any]:
    """The output's lines as JSON objects, one per line, each checked against its schema: the
    first against names[0], and so on, the last name for every line after."""
    lines = done.stdout.splitlines()
    assert lines, done.stderr
    assert done.stdout.endswith("\n")
    found = []
    for i, line in enumerate(lines):
        # One object per line: not indented, not wrapped.
        assert line.startswith("{"), line
        assert line.endswith("}"), line
        found.append(check(names[min(i, len(names) - 1)], json.loads(line)))
    return found


def one(done: subprocess.CompletedProcess[str], name: str) -> Any:
    [value] = objects(done, name)
    return value


# --- the conversion, without processes -----------------------------------------------------


def test_the_schemas_are_valid_json_schemas() -> None:
    for name in NAMES:
        validator(name)


def test_a_job_has_every_field_numbers_short_names_and_its_params_as_an_object() -> None:
    job = job_pb2.Job(
        id="j1",
        state=job_pb2.JOB_STATE_RUNNING,
        event_seq=2**40,
        spec=job_pb2.JobSpec(kind="echo", params_json='{"n":9007199254740991,"s":"x"}'),
    )
    job.create_time.FromSeconds(1_700_000_000)
    shown = check("job", to_json(job))
    assert shown["state"] == "RUNNING"
    assert shown["event_seq"] == 2**40  # a number, not "1099511627776"
    assert shown["spec"]["params"] == {"n": 9007199254740991, "s": "x"}
    assert "params_json" not in shown["spec"]
    assert (shown["result"], shown["error"], shown["end_time"]) == (None, None, None)
    assert (shown["attempts"], shown["progress"], shown["worker_id"]) == ([], 0, "")
    assert shown["create_time"] == "2023-11-14T22:13:20Z"


def test_a_result_shows_its_metadata_and_outputs_as_base64() -> None:
    event = job_pb2.JobEvent(
        job_id="j1",
        seq=3,
        type=job_pb2.JOB_EVENT_TYPE_STATE,
        state=job_pb2.JOB_STATE_SUCCEEDED,
        result=job_pb2.JobResult(
            outputs={"a.txt": b"hi"},
            output_blobs={"big": job_pb2.BlobRef(id="b1", size=2**33)},
        ),
    )
    shown = check("event", to_json(event))
    assert (shown["type"], shown["state"]) == ("STATE", "SUCCEEDED")
    assert shown["result"] == {
        "outputs": {"a.txt": "aGk="},
        "output_blobs": {"big": {"id": "b1", "size": 2**33}},
        "metadata": {},
    }


def test_an_idle_worker_says_zero_and_an_unset_bound_is_null() -> None:
    spec = dispatcher_pb2.ParamSpec(name="n", type=dispatcher_pb2.PARAM_TYPE_INTEGER, minimum=1)
    worker = admin_service_pb2.Worker(
        worker_id="w1",
        state=admin_service_pb2.WORKER_STATE_ACTIVE,
        kinds=[dispatcher_pb2.KindCapacity(kind="k", params_schema={"params": [spec]})],
        stats=dispatcher_pb2.WorkerStats(),
    )
    shown = check("workers", to_json(admin_service_pb2.ListWorkersResponse(workers=[worker])))
    [w] = shown["workers"]
    assert (w["active_jobs"], w["stats"]["cpu_percent"], w["stats"]["rss_bytes"]) == (0, 0, 0)
    [param] = w["kinds"][0]["params_schema"]["params"]
    assert (param["type"], param["minimum"], param["maximum"]) == ("INTEGER", 1, None)
    assert check("list", to_json(job_service_pb2.ListResponse())) == {
        "jobs": [],
        "next_page_token": "",
    }
    check("stats", to_json(admin_service_pb2.ClusterStats()))


@pytest.mark.parametrize("module", [job_pb2, admin_service_pb2, dispatcher_pb2])
def test_every_enum_value_of_the_contract_has_a_short_name(module: Any) -> None:
    for enum in module.DESCRIPTOR.enum_types_by_name.values():
        for value in enum.values:
            short = short_name(enum, value.name)
            assert isinstance(short, str)
            assert short != value.name
            assert value.name.endswith(f"_{short}"), value.name
    # A value this client does not know stays its number.
    assert to_json(job_pb2.JobEvent(state=99))["state"] == 99


def test_print_json_writes_one_compact_line_per_object() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        print_json(job_pb2.JobEvent(job_id="j1", message="two\nlines"))
        print_json({"file": "a b.jpg"})
    [event, line] = out.getvalue().splitlines()
    assert json.loads(event)["message"] == "two\nlines"
    assert line == '{"file":"a b.jpg"}'


def test_json_text_that_is_no_object_is_one_clean_error() -> None:
    assert decode_object("", "params_json") == {}
    for text in ("[1]", "{", "nope"):
        with pytest.raises(JobmeshError, match="params_json: the gateway sent text"):
            decode_object(text, "params_json")


# --- the image flags come from jobmesh.image_params ------------------------------------------


def image_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["image", *argv])


@pytest.mark.parametrize("kind", sorted(image_params.KINDS))
def test_every_image_param_has_a_flag(kind: str) -> None:
    op = kind.removeprefix("image.")
    argv = [op, "-o", "out", "--format", "png"]
    argv += ["--layer", "a.png", "--width", "8", "--height", "8"] if op == "composite" else ["a"]
    args = image_args(*argv)
    declared = {p.name for p in image_params.KINDS[kind]} - {"layers"}
    assert set(args.params) == declared
    assert declared <= set(vars(args))


def test_image_flags_take_the_params_choices_and_bounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = image_args("thumbnail", "a.jpg", "-o", "out", "--format", "PNG", "--quality", "90")
    assert (args.format, args.quality) == ("png", 90)  # the declared spelling, an int
    assert image_args("transform", "a.jpg", "-o", "o", "--rotate", "-90").rotate == -90.0
    for argv, says in (
        (["thumbnail", "a.jpg", "-o", "o", "--quality", "101"], "--quality: must be at most 100"),
        (["thumbnail", "a.jpg", "-o", "o", "--size", "0"], "--size: must be at least 1"),
        (["resize", "a.jpg", "-o", "o", "--fit", "stretch"], "invalid choice: 'stretch'"),
        (["convert", "a.jpg", "-o", "o", "--format", "heic"], "invalid choice: 'heic'"),
        (["convert", "a.jpg", "-o", "o"], "the following arguments are required: --format"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["image", *argv])
        assert exited.value.code == 2
        assert says in capsys.readouterr().err, argv


# --- every command, against a live mesh ------------------------------------------------------


def test_every_job_command_prints_one_shape(cluster: Cluster) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1", slots=2)
    deadline = time.monotonic() + 30
    while not all(w.HasField("last_pong_time") for w in gw.workers()):
        assert time.monotonic() < deadline, "no pong"
        time.sleep(0.05)

    # Empty lists are there, zeros too.
    empty = jobmesh(gw.address, "list", "--kind", "nope", "--json")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == '{"jobs":[],"next_page_token":""}\n'
    [worker] = one(jobmesh(gw.address, "workers", "--json"), "workers")["workers"]
    assert (worker["worker_id"], worker["state"], worker["active_jobs"]) == ("w1", "ACTIVE", 0)
    assert "cpu_percent" in worker["stats"]
    stats = one(jobmesh(gw.address, "top", "--once", "--json", "--interval", "0.2"), "stats")
    assert stats["totals"]["submitted"] == 0
    assert [w["worker_id"] for w in stats["workers"]] == ["w1"]

    # submit: one line; with --wait, then one line per event.
    submitted = one(
        jobmesh(gw.address, "submit", "echo", "-p", "text=hi", "--label", "team=web", "--json"),
        "submit",
    )
    assert (submitted["job"]["state"], submitted["existing"]) == ("QUEUED", False)
    assert submitted["job"]["spec"]["params"] == {"text": "hi"}
    assert submitted["job"]["spec"]["labels"] == {"team": "web"}
    waited = jobmesh(gw.address, "submit", "sleep", "-p", "seconds=0.3", "--wait", "--json")
    assert waited.returncode == 0, waited.stderr
    [first, *events] = objects(waited, "submit", "event")
    job_id = first["job"]["id"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["type"] for e in events} == {"STATE", "PROGRESS"}
    assert [e["state"] for e in events if e["type"] == "STATE"][-1] == "SUCCEEDED"
    assert events[-1]["result"]["metadata"] == {"slept": 0.3}

    # get and watch show the same job and events.
    job = one(jobmesh(gw.address, "get", job_id, "--json"), "job")
    assert (job["state"], job["event_seq"], job["error"]) == ("SUCCEEDED", events[-1]["seq"], None)
    assert job["result"]["metadata"] == {"slept": 0.3}
    assert [a["worker_id"] for a in job["attempts"]] == ["w1"]
    watched = jobmesh(gw.address, "watch", job_id, "--json")
    assert watched.returncode == 0, watched.stderr
    assert objects(watched, "event") == events

    failed = jobmesh(gw.address, "submit", "fail", "-p", "message=boom", "--wait", "--json")
    assert failed.returncode == 1
    failed_id = objects(failed, "submit", "event")[0]["job"]["id"]
    job = one(jobmesh(gw.address, "get", failed_id, "--json"), "job")
    assert (job["state"], job["result"]) == ("FAILED", None)
    assert job["error"]["code"] == "FAILED_ON_PURPOSE"

    long = one(jobmesh(gw.address, "submit", "sleep", "-p", "seconds=60", "--json"), "submit")
    cancelled = one(jobmesh(gw.address, "cancel", long["job"]["id"], "--json"), "job")
    assert cancelled["state"] == "CANCELLED"

    listed = one(jobmesh(gw.address, "list", "--json"), "list")
    assert len(listed["jobs"]) == 4
    assert {j["state"] for j in listed["jobs"]} == {"SUCCEEDED", "FAILED", "CANCELLED"}
    stats = one(jobmesh(gw.address, "top", "--once", "--json", "--interval", "0.2"), "stats")
    assert stats["totals"]["submitted"] == 4


def test_image_prints_one_line_per_file(cluster: Cluster, tmp_path: Path) -> None:
    gw = cluster.gateway()
    cluster.worker(gw, "w1")
    good = tmp_path / "a.jpg"
    Image.new("RGB", (320, 240), (200, 80, 40)).save(good, "JPEG")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"

    done = jobmesh(
        gw.address, "image", "thumbnail", str(good), str(garbage), "--size", "64",
        "-o", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = {Path(d["file"]).name: d for d in objects(done, "image")}
    assert sorted(lines) == ["a.jpg", "garbage.jpg"]
    ok, bad = lines["a.jpg"], lines["garbage.jpg"]
    assert (ok["ok"], ok["state"], ok["output"], ok["error"]) == (
        True,
        "SUCCEEDED",
        str(out / "a.jpg"),
        None,
    )
    assert ok["bytes"] == (out / "a.jpg").stat().st_size
    assert ok["metadata"] | {"format": "jpeg", "width": 64, "height": 48} == ok["metadata"]
    assert (bad["ok"], bad["state"], bad["output"], bad["bytes"], bad["metadata"]) == (
        False,
        "FAILED",
        None,
        0,
        {},
    )
    assert bad["error"]["code"] == "IMAGE_DECODE_ERROR"

    [info] = objects(jobmesh(gw.address, "image", "info", str(good), "--json"), "image")
    assert (info["ok"], info["output"], info["bytes"]) == (True, None, 0)
    assert info["metadata"]["width"] == 320
