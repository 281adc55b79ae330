"""Training and evaluation on real Sentinel-2 patches (Wald's protocol), at a size two cores handle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from sr_batch.clouds import usable_reflectance
from sr_batch.cube import BANDS, SCL, load_cube
from sr_batch.job import run_job
from sr_batch.model import Architecture, load_checkpoint, untrained_model
from sr_batch.spec import parse_spec
from sr_batch.superres import superresolve
from sr_batch.training.data import BLUR_SIGMA, degrade, split_windows
from sr_batch.training.evaluate import evaluate
from sr_batch.training.train import load_config, train

from conftest import make_job

TINY = {
    "name": "tiny",
    "architecture": {"hidden_channels": 16, "encoder_blocks": 1, "residual": "bicubic"},
    "data": {"patch": 8, "validation_examples": 12},
    "loss": {"max_shift": 0},
    "optimiser": {"steps": 40, "batch_size": 8, "lr": 0.002},
    "validate_every": 20,
    "threads": 2,
}


def tiny_config(tmp_path: Path, **changes) -> Path:
    config = {**TINY, **changes, "output": str(tmp_path / "run")}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_degrade_blurs_then_area_averages() -> None:
    """A constant stays constant; an impulse spreads by the documented Gaussian and 4x4 box."""
    flat = np.full((1, 4, 32, 32), 0.2, np.float32)
    np.testing.assert_allclose(degrade(flat), 0.2, rtol=1e-6)
    impulse = np.zeros((1, 1, 32, 32), np.float32)
    impulse[0, 0, 16, 16] = 1.0
    low = degrade(impulse)[0, 0]
    assert low.shape == (8, 8) and low.sum() == pytest.approx(1 / 16, rel=1e-3)  # mass is conserved by the area mean
    assert low[4, 4] == low.max() and 0 < low[4, 4] < 1 / 16 and low[3, 3] > 0  # spread beyond one 40 m pixel
    cloudy = flat.copy()
    cloudy[0, :, 5, 5] = np.nan
    assert np.isnan(degrade(cloudy)[0, :, 1, 1]).all() and np.isfinite(degrade(cloudy)[0, :, 0, 0]).all()
    assert BLUR_SIGMA == pytest.approx(1.56)


def test_an_untrained_bicubic_residual_network_is_exactly_bicubic() -> None:
    """Its last layer starts at zero, so training starts from bicubic of the latest real frame."""
    model = untrained_model(Architecture(hidden_channels=16, encoder_blocks=1, residual="bicubic"), 8).network
    frames, alphas = torch.randn(2, 8, 4, 12, 12), torch.ones(2, 8)
    alphas[1, 5:] = 0
    with torch.no_grad():
        output = model(frames, alphas)
    for sample, latest in ((0, 7), (1, 4)):
        keys = torch.nn.functional.interpolate(frames[sample, latest : latest + 1], scale_factor=4, mode="bicubic")[0]
        torch.testing.assert_close(output[sample], keys)


def test_splits_keep_the_test_dates_out_of_training() -> None:
    splits = split_windows(8)
    for name in ("train", "validation"):
        for window in splits[name]:
            if window.series.name == "romania":
                assert all(str(window.series.dates[f]) < "2020-01-01" for f in window.frames)
    assert splits["test"] and all(str(w.series.dates[w.target]) >= "2020-01-01" for w in splits["test"])


def test_short_training_beats_its_start_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SR_BATCH_SHARED_DATA", str(tmp_path))  # the Romania series alone: the same data everywhere
    config = load_config(tiny_config(tmp_path))
    best = train(config)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[-1]["cpsnr"] > history[0]["cpsnr"] + 0.05, "training must improve on where it started (Keys bicubic)"
    loaded = load_checkpoint(best)
    assert loaded.info.trained and loaded.info.extra["training"]["sources"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    # Extending the run resumes from the saved step rather than starting again.
    longer = load_config(tiny_config(tmp_path, optimiser={**TINY["optimiser"], "steps": 60}))
    train(longer)
    assert [h["step"] for h in json.loads((tmp_path / "run" / "history.json").read_text())] == [0, 20, 40, 60]
    # Another config on the same folder is refused.
    with pytest.raises(Exception, match="another config"):
        train(load_config(tiny_config(tmp_path, loss={"max_shift": 1})))


def test_evaluate_scores_every_test_date_against_bicubic(tmp_path: Path) -> None:
    arch = Architecture(hidden_channels=16, encoder_blocks=1, residual="bicubic")
    path = tmp_path / "start.safetensors"
    model = untrained_model(arch, 8)
    from sr_batch.model import save_checkpoint

    save_checkpoint(path, model.network, model.info)
    report = evaluate(str(path), "test", tmp_path / "eval")
    assert report["windows"] == len(split_windows(8)["test"]) and report["windows"] >= 5
    summary = report["summary"]
    # Nearest neighbour is worse than the cubic-spline baseline on real data, and so is the untrained
    # network, which reproduces torch's bicubic (Keys) interpolation of the latest frame exactly.
    assert summary["nearest"]["cpsnr"][-1] < summary["bicubic"]["cpsnr"][-1]
    assert summary["model"]["cpsnr"][-1] < summary["bicubic"]["cpsnr"][-1]
    per_date = [s["bicubic.cpsnr"][0] for s in report["samples"]]
    assert len(set(per_date)) == len(per_date), "scores are computed per date, not copied"
    assert "| bicubic | cpsnr |" in (tmp_path / "eval" / "metrics.md").read_text()
    assert (tmp_path / "eval" / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_tiled_pipeline_and_superresolve_agree_on_one_window(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """The batch pipeline (tiles, halos, Dask) and the single-window API share one inference path."""
    model = untrained_model(Architecture(hidden_channels=16, encoder_blocks=2), 8, seed=3)
    checkpoint = tmp_path / "model.safetensors"
    from sr_batch.model import save_checkpoint

    save_checkpoint(checkpoint, model.network, model.info)
    job = make_job(stac_url, tmp_path / "out.zarr", catalog, time={"start": "2019-06-01", "end": "2019-08-31"})
    job["model"] = {"checkpoint": str(checkpoint), "frames": 8, "batch_size": 4}
    spec = parse_spec(job)
    result = run_job(spec, scheduler=scheduler, show_progress=False)
    plan = result.plan
    (row, col), windows = next((key, ws) for key, ws in plan.windows.items() if len(ws) >= 3)
    window = windows[-1]
    cube = load_cube([plan.days[d] for d in window.frames], plan.grid, spec.stac.assets.in_model_order(), [*BANDS, SCL], ((100,), (100,)))
    frames = usable_reflectance(cube.values, spec.cloud.dilate_pixels)
    whole = superresolve(frames, checkpoint=str(checkpoint), device="cpu")
    with xr.open_zarr(result.output, consolidated=False) as ds:
        tiled = ds.sr.sel(time=np.datetime64(plan.days[window.target].date)).values
    ys = slice(4 * plan.rows[row][0], 4 * plan.rows[row][1])
    xs = slice(4 * plan.cols[col][0], 4 * plan.cols[col][1])
    expected = np.clip(whole[:, ys, xs], 1e-4, 6.5535)
    assert np.isfinite(tiled[:, ys, xs]).mean() > 0.9
    np.testing.assert_allclose(tiled[:, ys, xs], expected, atol=1.01e-4, equal_nan=True)
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("network", ["random", "checkpoint"])
def test_perceptual_and_style_loss_pass_gradients(tmp_path: Path, network: str) -> None:
    """The reference method's perceptual term passed no gradient (detached hooks); this one must."""
    from sr_batch.model import save_checkpoint
    from sr_batch.training.train import Run, TrainConfig, _perceptual

    if network == "checkpoint":
        model = untrained_model(Architecture(hidden_channels=8, encoder_blocks=1), 8)
        network = str(tmp_path / "features.safetensors")
        save_checkpoint(network, model.network, model.info)
    config = TrainConfig(loss={"perceptual_weight": 0.05, "style_weight": 0.05, "perceptual_network": network}, output=tmp_path)
    run = Run(config=config, network=None, optimiser=None, info=None, device=torch.device("cpu"))  # type: ignore[arg-type]
    high = torch.rand(2, 4, 24, 24)
    sr = (high + 0.05 * torch.randn_like(high)).requires_grad_(True)
    loss = _perceptual(run, sr, high)
    loss.backward()
    assert loss.item() > 0 and sr.grad is not None and sr.grad.abs().sum() > 0
    assert _perceptual(run, high.clone(), high).item() == 0.0
