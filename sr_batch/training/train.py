"""`sr-batch train CONFIG.yaml`: train HighRes-net on real Sentinel-2 by Wald's protocol.

The loss, in reflectance units, after registration (best integer shift within `max_shift`, with a
per-band brightness bias removed, as the challenge metrics do): L1 or MSE plus w·(1 − SSIM); plus a
term keeping each band's mean at the latest input frame's, so the output keeps Sentinel-2's
radiometry; plus, optionally, a perceptual feature + style (Gram) loss from a frozen network, kept
differentiable. Inputs pass through the same preparation as at inference (`prepare_windows`).

A run writes to its output folder: `best.safetensors` (selected on validation cSSIM), `last.safetensors`
with `optimiser.safetensors` and `state.json` (to resume), `history.json` and `curves.png`.
Checkpoints and optimiser state are safetensors; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from sr_batch import __version__
from sr_batch.errors import SpecError
from sr_batch.model import Architecture, HighResNet, ModelInfo, save_checkpoint
from sr_batch.superres import pick_device, prepare_windows
from sr_batch.training import metrics
from sr_batch.training.data import BLUR_SIGMA, Window, crop_example, normalisation, split_windows
from sr_batch.training.pairs import Pair, crop_pair, curate, histogram_match, load_pair


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureConfig(_Strict):
    hidden_channels: int = Field(64, ge=4, le=256)
    encoder_blocks: int = Field(8, ge=0, le=32)
    residual: Literal["none", "bicubic"] = "none"


class PairSource(_Strict):
    """A real pair: a Sentinel-2 series (.npz) and a 4x finer target raster on the same ground."""

    series: Path
    target: Path
    validation: bool = False
    match_histograms: bool = True


class DataConfig(_Strict):
    patch: int = Field(16, ge=4, le=64)
    """40 m input pixels per side of a training patch (targets are 4x)."""
    pseudo_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of examples from single-date scenes with simulated older frames (when available)."""
    validation_examples: int = Field(48, ge=1)
    pairs: list[PairSource] = []
    """Real pairs, used beside the Wald windows (see training/pairs.py); set loss.max_shift ≥ 1 with them."""
    pair_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of training examples drawn from real pairs, when there are any."""


class LossConfig(_Strict):
    pixel: Literal["l1", "mse"] = "l1"
    ssim_weight: float = Field(0.1, ge=0.0)
    max_shift: int = Field(1, ge=0, le=4)
    band_mean_weight: float = Field(10.0, ge=0.0)
    perceptual_weight: float = Field(0.0, ge=0.0)
    style_weight: float = Field(0.0, ge=0.0)
    perceptual_network: str = "random"
    """'random' (a fixed, seeded conv net) or a checkpoint path whose frozen encoder gives the features."""


class OptimiserConfig(_Strict):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(7e-4, gt=0)


class TrainConfig(_Strict):
    name: str = "highresnet-wald"
    architecture: ArchitectureConfig = ArchitectureConfig()
    frames: int = Field(8, ge=1, le=32)
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optimiser: OptimiserConfig = OptimiserConfig()
    validate_every: int = Field(250, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    output: Path = Path("out/train")


def load_config(path: Path) -> TrainConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read the training config ({type(err).__name__}); give a YAML file") from None
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    base = Path(path).parent
    pairs = [pair.model_copy(update={"series": (base / pair.series).resolve(), "target": (base / pair.target).resolve()}) for pair in config.data.pairs]
    data = config.data.model_copy(update={"pairs": pairs})
    return config.model_copy(update={"output": (base / config.output).resolve(), "data": data})


def load_pairs(config: TrainConfig, echo: Callable[[str], None]) -> dict[str, list[Pair]]:
    """Curated real pairs for training and validation; a listed pair that fails curation is reported."""
    kept: dict[str, list[Pair]] = {"train": [], "validation": []}
    for source in config.data.pairs:
        try:
            raw = load_pair(source.series, source.target, match_histograms=False)
        except ValueError as err:
            raise SpecError(f"data.pairs: {err}") from None
        keep, scores = curate(raw)
        echo(
            f"pair {raw.name}: bicubic vs target SSIM {scores['ssim']:.2f}, PSNR {scores['psnr']:.1f} dB, "
            f"MSE ratio {scores['mse_ratio']:.1f} -> {'kept' if keep else 'dropped'}"
        )
        if keep:
            high = histogram_match(raw.high, raw.low[-1]) if source.match_histograms else raw.high
            kept["validation" if source.validation else "train"].append(Pair(raw.name, raw.low, high, raw.dates))
    if config.data.pairs and not kept["train"]:
        raise SpecError("data.pairs: no training pair passed curation; check their alignment and dates, or remove them")
    return kept


@dataclasses.dataclass
class Run:
    """Everything a training run holds; `step` and `best` survive a resume."""

    config: TrainConfig
    network: HighResNet
    optimiser: torch.optim.Optimizer
    info: ModelInfo
    device: torch.device
    step: int = 0
    best: float = -math.inf
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def train(config: TrainConfig, echo: Callable[[str], None] = print) -> Path:
    """Train (or resume) and return the best checkpoint's path."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    splits = split_windows(config.frames)
    if not splits["train"] or not splits["validation"]:
        raise SpecError("data: no training or validation windows found; check the sample data download")
    mean, std = normalisation(splits["train"])
    pairs = load_pairs(config, echo)
    run = _new_run(config, mean, std, splits)
    _resume(run, echo)
    validation = _validation_examples(splits["validation"], pairs["validation"], config)
    baseline = _bicubic_scores(validation)
    echo(
        f"Training {config.name}: {sum(p.numel() for p in run.network.parameters()):,} parameters on {run.device}, "
        f"{len(splits['train'])} train / {len(splits['validation'])} validation windows; "
        f"validation bicubic cPSNR {baseline['cpsnr']:.2f} dB, cSSIM {baseline['cssim']:.4f}"
    )
    if not run.history:  # where training starts from: the curves begin at the untrained network
        run.history.append(
            {"step": 0, "train_loss": math.nan, **_validate(run, validation), "bicubic_cpsnr": baseline["cpsnr"], "bicubic_cssim": baseline["cssim"]}
        )
    rng = np.random.default_rng(config.seed + run.step)
    started, first_step, losses = time.monotonic(), run.step, []
    while run.step < config.optimiser.steps:
        losses.append(_train_step(run, _batch(splits["train"], pairs["train"], config, rng)))
        run.step += 1
        if run.step % config.validate_every == 0 or run.step == config.optimiser.steps:
            scores = _validate(run, validation)
            record = {"step": run.step, "train_loss": float(np.mean(losses)), **scores, "bicubic_cpsnr": baseline["cpsnr"], "bicubic_cssim": baseline["cssim"]}
            run.history.append(record)
            losses = []
            improved = scores["cssim"] > run.best
            if improved:
                run.best = scores["cssim"]
                _save_model(run, config.output / "best.safetensors", record)
            _save_state(run, record)
            rate = (run.step - first_step) / max(time.monotonic() - started, 1e-9)
            echo(
                f"step {run.step}/{config.optimiser.steps}  loss {record['train_loss']:.4f}  val cPSNR {scores['cpsnr']:.2f} dB "
                f"(bicubic {baseline['cpsnr']:.2f})  cSSIM {scores['cssim']:.4f}{'  *best' if improved else ''}  {rate:.2f} steps/s"
            )
            sys.stdout.flush()
    _plot_history(run.history, config.output / "curves.png")
    return config.output / "best.safetensors"


def _new_run(config: TrainConfig, mean: tuple[float, ...], std: tuple[float, ...], splits: dict[str, list[Window]]) -> Run:
    arch = Architecture(**config.architecture.model_dump())
    network = HighResNet(arch)
    device = pick_device(config.device)
    network.to(device)
    info = ModelInfo(
        name=config.name,
        architecture=arch,
        frames=config.frames,
        mean=mean,
        std=std,
        trained=True,
        extra={
            "training": {
                "protocol": f"Wald: 10 m frames degraded to 40 m (Gaussian sigma {BLUR_SIGMA} px at 10 m, then 4x4 area mean); trained 40 m -> 10 m",
                "sources": sorted({w.series.name for w in splits["train"]}),
                "train_windows": len(splits["train"]),
                "validation_windows": len(splits["validation"]),
                "config": json.loads(config.model_dump_json()),
            },
            "sr_batch_version": __version__,
        },
    )
    optimiser = torch.optim.Adam(network.parameters(), lr=config.optimiser.lr)
    return Run(config=config, network=network, optimiser=optimiser, info=info, device=device)


def _batch(windows: list[Window], pairs: list[Pair], config: TrainConfig, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    pseudo = [w for w in windows if w.pseudo]
    series = [w for w in windows if not w.pseudo]
    lows, highs = [], []
    for _ in range(config.optimiser.batch_size):
        if pairs and rng.random() < config.data.pair_fraction:
            low, high = crop_pair(pairs[int(rng.integers(len(pairs)))], config.data.patch, rng, config.frames)
        else:
            pool = pseudo if pseudo and (not series or rng.random() < config.data.pseudo_fraction) else series
            low, high = crop_example(pool[int(rng.integers(len(pool)))], config.data.patch, rng, config.frames)
        lows.append(low)
        highs.append(high)
    return lows, np.stack(highs)


def _tensors(run: Run, lows: list[np.ndarray], highs: np.ndarray) -> tuple[torch.Tensor, ...]:
    mean = np.asarray(run.info.mean, np.float32)
    std = np.asarray(run.info.std, np.float32)
    frames, alphas = prepare_windows(lows, run.config.frames, mean, std)
    high = torch.from_numpy(highs).to(run.device)
    mask = torch.isfinite(high).all(dim=1, keepdim=True)
    latest = torch.from_numpy(np.stack([np.nanmean(low[-1], axis=(1, 2)) for low in lows])).to(run.device)
    return torch.from_numpy(frames).to(run.device), torch.from_numpy(alphas).to(run.device), torch.nan_to_num(high), mask, latest


def _reflectance(run: Run, normalised: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(run.info.mean, device=normalised.device)[:, None, None]
    std = torch.tensor(run.info.std, device=normalised.device)[:, None, None]
    return normalised.float() * std + mean


def _train_step(run: Run, batch: tuple[list[np.ndarray], np.ndarray]) -> float:
    run.network.train()
    frames, alphas, high, mask, latest = _tensors(run, *batch)
    lr = run.config.optimiser.lr * 0.5 * (1 + math.cos(math.pi * run.step / run.config.optimiser.steps))
    for group in run.optimiser.param_groups:
        group["lr"] = lr
    with _autocast(run):
        output = run.network(frames, alphas)
    loss = _loss(run, _reflectance(run, output), high, mask, latest)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.network.parameters(), 1.0)
    run.optimiser.step()
    return float(loss.detach())


def _loss(run: Run, sr: torch.Tensor, high: torch.Tensor, mask: torch.Tensor, latest: torch.Tensor) -> torch.Tensor:
    cfg = run.config.loss

    def registered(sr_c: torch.Tensor, hr_w: torch.Tensor, mask_w: torch.Tensor) -> torch.Tensor:
        weight = mask_w.to(sr_c.dtype).expand_as(sr_c)
        error = (sr_c - hr_w).abs() if cfg.pixel == "l1" else (sr_c - hr_w) ** 2
        pixel = (error * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1)
        if cfg.ssim_weight:
            pixel = pixel + cfg.ssim_weight * (1 - metrics.ssim(sr_c, hr_w, mask_w).mean(dim=1))
        return pixel

    loss = metrics.best_shift_loss(sr, high, registered, mask, max_shift=cfg.max_shift).mean()
    if cfg.band_mean_weight:
        loss = loss + cfg.band_mean_weight * ((sr.mean(dim=(2, 3)) - latest) ** 2).mean()
    if cfg.perceptual_weight or cfg.style_weight:
        loss = loss + _perceptual(run, sr, high)
    return loss


_FEATURES: dict[str, torch.nn.Module] = {}


def _feature_network(run: Run) -> torch.nn.Module:
    """A frozen feature extractor: a seeded random conv stack, or the encoder of a given checkpoint."""
    key = run.config.loss.perceptual_network
    if key not in _FEATURES:
        if key == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                net = torch.nn.Sequential(
                    torch.nn.Conv2d(4, 32, 3, padding=1),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(32, 32, 3, padding=1),
                    torch.nn.ReLU(),
                    torch.nn.AvgPool2d(2),
                    torch.nn.Conv2d(32, 64, 3, padding=1),
                    torch.nn.ReLU(),
                )
        else:
            from sr_batch.model import load_checkpoint

            encoder = load_checkpoint(key).network.encoder
            net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, bias=False), encoder.head, encoder.blocks)
            with torch.no_grad():  # feed the image as both frame and reference
                net[0].weight.copy_(torch.cat([torch.eye(4), torch.eye(4)])[:, :, None, None])
        _FEATURES[key] = net.requires_grad_(False).eval()
    return _FEATURES[key].to(run.device)


def _perceptual(run: Run, sr: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Feature (L1) and style (Gram) distances; gradients flow through the frozen network to `sr`."""
    net = _feature_network(run)
    cfg = run.config.loss
    total = sr.new_zeros(())
    a, b = sr, high
    for layer in net:
        a, b = layer(a), layer(b)
        if isinstance(layer, torch.nn.ReLU | torch.nn.Sequential | torch.nn.PReLU):
            total = total + cfg.perceptual_weight * (a - b).abs().mean() + cfg.style_weight * (_gram(a) - _gram(b)).abs().mean()
    return total


def _gram(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def _autocast(run: Run) -> Any:
    precision = run.config.precision
    if precision == "auto":
        precision = "bf16" if run.device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(run.device.type, enabled=False)
    return torch.autocast(run.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _validation_examples(windows: list[Window], pairs: list[Pair], config: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of validation patches, the same at every validation and across resumes."""
    rng = np.random.default_rng(10_000 + config.seed)
    count = config.data.validation_examples
    examples = [crop_example(windows[i % len(windows)], config.data.patch, rng, config.frames, augment=False) for i in range(count)]
    return examples + [crop_pair(pairs[i % len(pairs)], config.data.patch, rng, config.frames, augment=False) for i in range(count if pairs else 0)]


def _scores(sr: np.ndarray, high: np.ndarray) -> dict[str, float]:
    sr_t, hr_t = torch.from_numpy(sr).double(), torch.from_numpy(high).double()
    return {"cpsnr": float(metrics.cpsnr(sr_t, hr_t, max_shift=2).mean()), "cssim": float(metrics.cssim(sr_t, hr_t, max_shift=2).mean())}


def _bicubic_scores(examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    from sr_batch.quicklook import bicubic

    sr = np.stack([bicubic(low[-1]) for low, _ in examples])
    return _scores(sr, np.stack([high for _, high in examples]))


def _validate(run: Run, examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    run.network.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(examples), 16):
            chunk = examples[start : start + 16]
            frames, alphas, *_ = _tensors(run, [low for low, _ in chunk], np.stack([high for _, high in chunk]))
            outputs.append(_reflectance(run, run.network(frames, alphas)).cpu().numpy())
    return _scores(np.concatenate(outputs), np.stack([high for _, high in examples]))


def _save_model(run: Run, path: Path, record: dict[str, float]) -> None:
    info = dataclasses.replace(run.info, extra={**run.info.extra, "validation": record})
    save_checkpoint(path, run.network, info)


def _save_state(run: Run, record: dict[str, float]) -> None:
    """Resumable state: weights, optimiser tensors (safetensors) and counters (JSON), replaced atomically."""
    out = run.config.output
    _save_model(run, out / "last.safetensors", record)
    state = run.optimiser.state_dict()
    tensors = {f"{index}.{name}": value for index, entry in state["state"].items() for name, value in entry.items() if torch.is_tensor(value)}
    partial = out / "optimiser.safetensors.partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.replace(out / "optimiser.safetensors")
    meta = {"step": run.step, "best": run.best, "history": run.history, "config": json.loads(run.config.model_dump_json())}
    (out / "state.json.partial").write_text(json.dumps(meta, indent=1))
    (out / "state.json.partial").replace(out / "state.json")
    (out / "history.json").write_text(json.dumps(run.history, indent=1))


def _resume(run: Run, echo: Callable[[str], None]) -> None:
    out = run.config.output
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "state.json"
    if not state_file.exists():
        return
    meta = json.loads(state_file.read_text())
    if _resumable(meta["config"]) != _resumable(json.loads(run.config.model_dump_json())):
        raise SpecError(f"output: {out} holds a run with another config; choose a new output folder or restore that config")
    from sr_batch.model import load_checkpoint

    run.network.load_state_dict(load_checkpoint(out / "last.safetensors").network.state_dict())
    tensors = load_file(str(out / "optimiser.safetensors"), device=str(run.device))
    state = run.optimiser.state_dict()
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state["state"].setdefault(int(index), {})[name] = value
    run.optimiser.load_state_dict(state)
    run.step, run.best, run.history = meta["step"], meta["best"], meta["history"]
    echo(f"Resuming {run.config.name} at step {run.step} (best validation cSSIM {run.best:.4f})")


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume: everything but the step count (a run may be extended)."""
    return {**config, "optimiser": {k: v for k, v in config["optimiser"].items() if k != "steps"}}


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(steps, [h["train_loss"] for h in history])
    left.set(xlabel="step", ylabel="training loss", title="loss")
    right.plot(steps, [h["cpsnr"] for h in history], label="model")
    right.plot(steps, [h["bicubic_cpsnr"] for h in history], "--", label="bicubic")
    right.set(xlabel="step", ylabel="validation cPSNR (dB)", title="validation")
    right.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
