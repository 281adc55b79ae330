"""The README cannot rot: every shell and Python block in it runs, in order, against the sample region.

The blocks run in one temporary folder holding what a reader has at that point: the README's job
spec as `job.yaml` and a store at `out/demo/romania-sample.zarr` (written like `make demo` writes it).
Both point at the sample region served by a real STAC API on loopback instead of Earth Search, and
use the tests' small untrained model on a one-month period so the whole README runs in a couple of
minutes; `README_TO_SAMPLE` lists every other value swapped for the sample's. Shell blocks run in
bash with the sr-batch environment first on PATH, Python blocks in a fresh interpreter. A block that
is not run must carry `<!-- readme-test: skip (reason) -->` on the line before it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sr_batch.demo import demo_job
from sr_batch.job import run_job
from sr_batch.sample import COLLECTION_ID, sample_aoi
from sr_batch.spec import parse_spec

from conftest import SMALL_HALO, SMALL_MODEL

README = Path(__file__).parents[1] / "README.md"
RUNNABLE = {"sh", "bash", "shell", "python"}
NOT_CODE = {"yaml", "text"}
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$")
SAMPLE_PERIOD = {"start": "2019-07-01", "end": "2019-07-31"}
README_TO_SAMPLE = {
    "tcp://scheduler:8786": None,  # the test suite's own cluster, filled in at run time
    "time.end=2023-05-31": "time.end=2019-08-15",
}


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    marker: str | None
    """The text of a `readme-test:` comment on the line before the block, if any."""

    @property
    def skip_reason(self) -> str | None:
        found = SKIP.match(self.marker or "")
        return found["reason"] if found else None


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with its language, first line number and the marker just before it."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        blocks.append(Block(fence[1], "\n".join(lines[index + 1 : end]) + "\n", index + 2, marker[1] if marker else None))
        index = end + 1
    return blocks


def test_every_code_block_is_run_or_says_why_not() -> None:
    text = README.read_text()
    blocks = readme_blocks(text)
    for block in blocks:
        where = f"README.md line {block.line}"
        assert block.language in RUNNABLE | NOT_CODE, f"{where}: give the block a language ({sorted(RUNNABLE | NOT_CODE)})"
        if block.marker is not None:
            assert block.language in RUNNABLE, f"{where}: a readme-test marker on a {block.language} block, which is never run"
            assert block.skip_reason, f"{where}: write the marker as <!-- readme-test: skip (reason) -->"
    assert len(MARKER.findall(text)) == sum(b.marker is not None for b in blocks), "a readme-test marker that is not right before a block"
    assert sum(b.language in RUNNABLE and b.skip_reason is None for b in blocks) >= 5, "most of the README's code runs"
    assert sum(b.language == "yaml" and "stac:" in b.code for b in blocks) == 1, "one job spec: the one the blocks use as job.yaml"
    for value in README_TO_SAMPLE:
        assert value in text, f"README_TO_SAMPLE lists {value!r}, which the README no longer has; update the test"


@pytest.fixture()
def reader_folder(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> Path:
    """What a reader has: the README's job spec as job.yaml, and the demo's output, both on the sample."""
    small = {"model": SMALL_MODEL, "tiling": {"tile": 48, "halo": SMALL_HALO}}
    spec = next(yaml.safe_load(b.code) for b in readme_blocks(README.read_text()) if b.language == "yaml" and "stac:" in b.code)
    spec.update(stac={**spec["stac"], "url": stac_url, "collection": COLLECTION_ID}, aoi={"geometry": sample_aoi(catalog)}, time=SAMPLE_PERIOD, **small)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    demo = demo_job(stac_url, tmp_path / "out" / "demo" / "romania-sample.zarr", **SAMPLE_PERIOD)
    run_job(parse_spec({**demo, **small}), scheduler=scheduler, show_progress=False, echo=lambda line: None)
    return tmp_path


def test_readme_code_runs(reader_folder: Path, scheduler: str) -> None:
    runnable = [b for b in readme_blocks(README.read_text()) if b.language in RUNNABLE]
    values = {**README_TO_SAMPLE, "tcp://scheduler:8786": scheduler}
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    ran = []
    for block in runnable:
        if block.skip_reason:
            continue
        code = block.code
        for readme_value, sample_value in values.items():
            code = code.replace(readme_value, sample_value)
        command = [sys.executable, "-c", code] if block.language == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=reader_folder, env=environment, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README.md line {block.line} ({block.language}) failed:\n{code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append(block.line)
    assert len(ran) + sum(b.skip_reason is not None for b in runnable) == len(runnable)

    # What the blocks say they make is there.
    assert (reader_folder / "out" / "my-fields.zarr" / "zarr.json").exists() and (reader_folder / "r.html").stat().st_size > 10_000
    header = (reader_folder / "field.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", header[16:20])[0] == 1000, "the quicklook has its 10 m input column"
