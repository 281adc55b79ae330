"""`make demo`'s code path, on a shorter period, and the README's job example."""

from __future__ import annotations

import re
from pathlib import Path

import xarray as xr
import yaml

from sr_batch.demo import run_demo
from sr_batch.model import DEFAULT_CHECKPOINT
from sr_batch.spec import parse_spec

README = Path(__file__).parents[1] / "README.md"


def test_demo_writes_a_zarr_and_says_the_model_is_untrained(tmp_path: Path, capsys) -> None:
    result = run_demo(tmp_path / "demo", start="2019-07-01", end="2019-08-15")
    printed = capsys.readouterr().out
    assert f"Demo output written to {result.output}" in printed
    assert ("UNTRAINED" in printed) != result.model.info.trained, "the demo says plainly when its model is untrained"
    assert result.model.info.trained == DEFAULT_CHECKPOINT.exists()
    assert "CRS EPSG:3035" in printed and "dates written:" in printed and "time taken:" in printed
    assert (tmp_path / "demo" / "job.yaml").exists()
    picture = tmp_path / "demo" / "quicklook.png"
    assert f"Quicklook (10 m input vs 2.5 m output, latest date): {picture}" in printed
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 50_000
    with xr.open_zarr(result.output, decode_coords="all", consolidated=False) as ds:
        assert ds.sizes["time"] >= 2 and ds.sr.shape[1:] == (4, 400, 400)
        assert ds.attrs["model_trained"] is result.model.info.trained


def test_readme_job_example_is_a_valid_spec() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    job = next(yaml.safe_load(b) for b in blocks if "stac:" in b)
    spec = parse_spec(job)
    assert spec.stac.assets.red == "red" and spec.model.frames == 8 and spec.time.end is None
