"""The benchmark runs end to end and writes its numbers (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from sr_batch.bench import main


def test_benchmark_writes_every_number(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    assert main(["--size", "48", "--dates", "2", "--tile", "48", "--batch", "1", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {row["variant"] for row in report["model_only"]} >= {"fp32 eager", "fp32 channels_last"}
    assert all(row["lr_mpx_per_s"] > 0 for row in report["model_only"])
    for factor in ("1x", "4x"):
        row = report[f"end_to_end_{factor}"]
        assert row["lr_mpx_per_s"] > 0 and row["peak_worker_memory_mb"] > 0 and row["tile_dates"] > 0
        assert 0 < row["sr_phase_seconds"] <= row["seconds"] and row["sr_task_seconds"] > 0 and row["before_sr_seconds"] > 0
    assert report["end_to_end_4x"]["pixels"] == 4 * report["end_to_end_1x"]["pixels"]
    assert report["ratio_end_to_end_over_model_only"] > 0
    assert "end to end ÷ best model only" in capsys.readouterr().out
