"""Every ```python block of README.md runs as written against a live mesh: a gateway, and a
worker that loads the README's handler modules (the blocks that start `# myapp/jobs.py`),
found as `jobmesh worker --handlers myapp.jobs` finds them. A block reaches the gateway the
way a reader's would, through `$JOBMESH_GATEWAY`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobmesh import Client, InvalidArgument, JobState
from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.processes

README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The first line of a block that is a module to import, not a script to run.
MODULE = re.compile(r"# ([\w/]+)\.py\b")
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Block:
    line: int
    """Where the block starts in README.md."""
    code: str

    @property
    def module(self) -> str | None:
        """'myapp/jobs' for a block that starts `# myapp/jobs.py`."""
        match = MODULE.match(self.code)
        return match.group(1) if match else None


def _blocks() -> list[Block]:
    text = README.read_text()
    return [Block(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = _blocks()
SCRIPTS = [b for b in BLOCKS if b.module is None]
MODULES = [b for b in BLOCKS if b.module is not None]


@dataclass(frozen=True)
class Mesh:
    address: str
    tmp: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("readme")
    for block in MODULES:
        path = tmp / f"{block.module}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
    handlers = ",".join(str(b.module).replace("/", ".") for b in MODULES)
    cluster = Cluster(tmp)
    try:
        gw = cluster.gateway()
        # The worker finds the modules as it would in the reader's current directory.
        with pytest.MonkeyPatch.context() as env:
            env.setenv(
                "PYTHONPATH",
                os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")])),
            )
            cluster.worker(gw, "readme", "--handlers", handlers)
        yield Mesh(gw.address, tmp)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_the_readme_has_its_examples() -> None:
    assert len(SCRIPTS) >= 4
    assert [b.module for b in MODULES] == ["myapp/jobs"]


@pytest.mark.parametrize("block", SCRIPTS, ids=lambda b: f"README.md:{b.line}")
def test_a_readme_block_runs_as_written(block: Block, mesh: Mesh) -> None:
    workdir = mesh.tmp / f"block{block.line}"
    workdir.mkdir()
    script = workdir / "example.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env={**os.environ, "JOBMESH_GATEWAY": mesh.address},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, f"README.md:{block.line} failed:\n{done.stdout}{done.stderr}"
    # The SDK speaks Python: no state as a number or a protobuf name, no protobuf text.
    assert "JOB_STATE_" not in done.stdout
    assert "fields {" not in done.stdout


def test_the_readme_handlers_serve_their_kinds(mesh: Mesh) -> None:
    with Client(mesh.address) as client:
        submitted = client.submit("thumbnail", params={"size": 64}, inputs={"image": b"pixels"})
        job = client.wait(submitted.job.id, check=True)
        assert job.state is JobState.SUCCEEDED
        assert job.result is not None
        assert job.result.outputs == {"thumb.jpg": b"..."}
        assert job.result.metadata == {"size": 64}
        # The schema `render` declares is applied at Submit.
        with pytest.raises(InvalidArgument, match="scene"):
            client.submit("render", params={"scene": 0})
        # ... and `thumbnail`'s: a whole number sent as 64.0 reaches the handler as the int 64.
        submitted = client.submit("thumbnail", params={"size": 64.0}, inputs={"image": b"x"})
        job = client.wait(submitted.job.id, check=True)
        assert job.result is not None
        assert job.result.metadata == {"size": 64}
        assert job.proto.result.metadata_json == '{"size":64}'
        with pytest.raises(InvalidArgument, match="size"):
            client.submit("thumbnail", params={"size": 5000})
