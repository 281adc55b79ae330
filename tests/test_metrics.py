"""Super-resolution metrics: planted degradations must move the scores by the amounts theory predicts.

Each test builds an image pair with a known defect (noise of known sigma, a brightness offset, an
integer misregistration, garbage under a mask, one bad band) and checks the metric against a value
derived independently: from the planted noise, from a NumPy reference, or from the aligned pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter

from sr_batch.training.metrics import best_shift_loss, cpsnr, cssim, psnr, ssim

Metric = Callable[..., torch.Tensor]
NIR = 3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: a second thread gains nothing and, on shared cores, costs milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_image(seed: int, batch: int = 2, bands: int = 4, size: int = 48, blur: float = 1.5) -> torch.Tensor:
    """Textured but smooth reflectance in [0.1, 0.6]: correlated over ~blur pixels, so a shift of one hurts."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, bands, size, size))
    field = gaussian_filter(noise, sigma=(0, 0, blur, blur), mode="wrap")
    low = field.min(axis=(2, 3), keepdims=True)
    high = field.max(axis=(2, 3), keepdims=True)
    return torch.from_numpy(0.1 + 0.5 * (field - low) / (high - low))


def gaussian_noise(like: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(sigma * rng.standard_normal(tuple(like.shape)))


def random_mask(shape: tuple[int, ...], clear_fraction: float, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random(shape) < clear_fraction)


def masked_mse(sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A training loss of the shape best_shift_loss expects: (B,) mean squared error over clear pixels."""
    weight = mask.to(sr.dtype)
    return ((sr - hr) ** 2 * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))


def masked_l1(sr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(sr.dtype)
    return ((sr - hr).abs() * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))


# --- NumPy references, written independently of the torch code ---------------------------------------


def ssim_reference(x: np.ndarray, y: np.ndarray, clear: np.ndarray | None = None, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one 2-D band by explicit windows: weights = Gaussian × clear, renormalised per window."""
    clear = np.ones(x.shape, bool) if clear is None else clear
    offsets = np.arange(window) - (window - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(g, g)
    xw, yw = sliding_window_view(np.where(clear, x, 0.0), (window, window)), sliding_window_view(np.where(clear, y, 0.0), (window, window))
    w = kernel * sliding_window_view(clear, (window, window))
    w = w / np.maximum(w.sum(axis=(-2, -1), keepdims=True), 1e-300)

    def local(a: np.ndarray) -> np.ndarray:
        return (w * a).sum(axis=(-2, -1))

    mx, my = local(xw), local(yw)
    vx, vy, cxy = local(xw * xw) - mx**2, local(yw * yw) - my**2, local(xw * yw) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    r = window // 2
    centre = clear[r : x.shape[0] - r, r : x.shape[1] - r]
    return float(s[centre].mean())


def cpsnr_reference(sr: np.ndarray, hr: np.ndarray, clear: np.ndarray, max_shift: int) -> np.ndarray:
    """cPSNR (B, C) by loops, literally as in the PROBA-V definition with the band-mean shift rule."""
    batch, bands, height, width = sr.shape
    s = max_shift
    h, w = height - 2 * s, width - 2 * s
    out = np.empty((batch, bands))
    for b in range(batch):
        best_key, best = -np.inf, None
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                per_band = []
                for c in range(bands):
                    crop = sr[b, c, s : s + h, s : s + w]
                    window = hr[b, c, s + dy : s + dy + h, s + dx : s + dx + w]
                    ok = clear[b, c, s + dy : s + dy + h, s + dx : s + dx + w]
                    diff = window[ok] - crop[ok]
                    per_band.append(-10 * np.log10(np.mean((diff - diff.mean()) ** 2)))
                if np.mean(per_band) > best_key:
                    best_key, best = np.mean(per_band), per_band
        out[b] = best
    return out


# --- PSNR and SSIM on planted degradations ------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.05])
def test_psnr_of_gaussian_noise_follows_its_sigma(sigma: float) -> None:
    """Additive noise of std sigma gives MSE ≈ sigma², so PSNR ≈ −10·log10(sigma²)."""
    hr = smooth_image(seed=1, batch=4, size=64)
    noise = gaussian_noise(hr, sigma, seed=2)
    scores = psnr(hr + noise, hr)
    assert scores.shape == (4, 4)
    # Exactly the PSNR of the planted noise realisation ...
    realised = -10 * torch.log10((noise**2).mean(dim=(2, 3)))
    torch.testing.assert_close(scores, realised, rtol=0, atol=1e-9)
    # ... and, over 65 536 samples, within 0.1 dB of the theoretical value.
    assert abs(scores.mean().item() - (-10 * math.log10(sigma**2))) < 0.1
    assert (scores - (-10 * math.log10(sigma**2))).abs().max() < 0.3


def test_identical_images_score_infinite_psnr_and_unit_ssim() -> None:
    hr = smooth_image(seed=3)
    assert torch.isposinf(psnr(hr.clone(), hr)).all()
    torch.testing.assert_close(ssim(hr.clone(), hr), torch.ones(2, 4, dtype=hr.dtype), rtol=0, atol=1e-12)
    assert torch.isposinf(cpsnr(hr.clone(), hr)).all()
    torch.testing.assert_close(cssim(hr.clone(), hr), torch.ones(2, 4, dtype=hr.dtype), rtol=0, atol=1e-12)


def test_ssim_falls_with_noise() -> None:
    hr = smooth_image(seed=4)
    mild = ssim(hr + gaussian_noise(hr, 0.01, seed=5), hr)
    strong = ssim(hr + gaussian_noise(hr, 0.05, seed=5), hr)
    assert (strong < mild).all() and (mild < 1).all() and (strong > 0).all()


@pytest.mark.parametrize(("window", "sigma"), [(11, 1.5), (7, 1.0)])
def test_ssim_matches_numpy_reference(window: int, sigma: float) -> None:
    hr = smooth_image(seed=6, size=32)
    sr = (hr + gaussian_noise(hr, 0.03, seed=7)) * 0.9
    scores = ssim(sr, hr, window=window, sigma=sigma)
    for b in range(2):
        for c in range(4):
            expected = ssim_reference(sr[b, c].numpy(), hr[b, c].numpy(), window=window, sigma=sigma)
            assert scores[b, c].item() == pytest.approx(expected, abs=1e-10)


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    hr = smooth_image(seed=8, size=40)
    sr = hr + gaussian_noise(hr, 0.03, seed=9) - 0.02
    scores = ssim(sr, hr)
    for b in range(2):
        for c in range(4):
            expected = metrics.structural_similarity(
                hr[b, c].numpy(), sr[b, c].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            assert scores[b, c].item() == pytest.approx(expected, abs=1e-8)


# --- Brightness bias and misregistration ----------------------------------------------------------------


def test_brightness_offset_costs_psnr_but_not_cpsnr() -> None:
    hr = smooth_image(seed=10)
    sr = hr - 0.05
    torch.testing.assert_close(psnr(sr, hr), torch.full((2, 4), -10 * math.log10(0.05**2), dtype=hr.dtype), rtol=0, atol=1e-6)
    assert (cpsnr(sr, hr, max_shift=0) > 100).all()
    torch.testing.assert_close(cssim(sr, hr, max_shift=0), torch.ones(2, 4, dtype=hr.dtype), rtol=0, atol=1e-9)
    assert (ssim(sr, hr) < 0.995).all()


def test_bias_correction_never_hurts() -> None:
    hr = smooth_image(seed=11)
    sr = hr + gaussian_noise(hr, 0.02, seed=12) + 0.01
    assert (cpsnr(sr, hr, max_shift=0) >= psnr(sr, hr)).all()


@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (-2, 1), (2, -2)])
def test_shift_search_recovers_the_aligned_scores(shift: tuple[int, int]) -> None:
    """np.roll by ≤ 2 pixels: the cropped SR then holds no wrapped pixel, and the best HR window is exact."""
    dy, dx = shift
    s = 2
    hr = smooth_image(seed=13)
    aligned = hr + gaussian_noise(hr, 0.01, seed=14)
    shifted = torch.from_numpy(np.roll(aligned.numpy(), shift, axis=(2, 3)))
    size = hr.shape[-1]
    # The aligned pair over exactly the pixels the shifted SR crop shows.
    rows, cols = slice(s - dy, size - s - dy), slice(s - dx, size - s - dx)
    aligned_cpsnr = cpsnr(aligned[..., rows, cols], hr[..., rows, cols], max_shift=0)
    aligned_cssim = cssim(aligned[..., rows, cols], hr[..., rows, cols], max_shift=0)

    torch.testing.assert_close(cpsnr(shifted, hr, max_shift=s), aligned_cpsnr, rtol=0, atol=1e-9)
    torch.testing.assert_close(cssim(shifted, hr, max_shift=s), aligned_cssim, rtol=0, atol=1e-9)
    # Close to the aligned pair's own registered scores too (a slightly different set of pixels).
    torch.testing.assert_close(cpsnr(shifted, hr, max_shift=s), cpsnr(aligned, hr, max_shift=s), rtol=0, atol=0.2)
    # Without the search, the misregistration shows.
    assert (psnr(shifted, hr) < psnr(aligned, hr) - 5).all()
    assert (ssim(shifted, hr) < ssim(aligned, hr) - 0.05).all()
    assert (cpsnr(shifted, hr, max_shift=0) < aligned_cpsnr - 5).all()
    assert (cssim(shifted, hr, max_shift=0) < aligned_cssim - 0.05).all()


@pytest.mark.parametrize("metric", [cpsnr, cssim])
def test_one_shift_serves_all_bands(metric: Metric) -> None:
    """Three bands misregistered by (1, 0), NIR by (0, 1): the band-mean rule registers NIR at (1, 0) too."""
    hr = smooth_image(seed=58, size=32)
    sr = torch.from_numpy(np.roll(hr.numpy(), (1, 0), axis=(2, 3)))
    sr[:, NIR] = torch.from_numpy(np.roll(hr[:, NIR].numpy(), (0, 1), axis=(1, 2)))
    sr = sr + gaussian_noise(hr, 0.01, seed=59)
    joint = metric(sr, hr, max_shift=1)
    alone = metric(sr[:, NIR:], hr[:, NIR:], max_shift=1)[:, 0]
    majority = metric(sr[:, :NIR], hr[:, :NIR], max_shift=1)
    torch.testing.assert_close(joint[:, :NIR], majority, rtol=0, atol=1e-12)
    assert (joint[:, NIR] < alone - 0.05 * alone.abs()).all()


def test_cpsnr_matches_numpy_reference_with_mask_and_shifts() -> None:
    hr = smooth_image(seed=15, size=24)
    sr = torch.from_numpy(np.roll(hr.numpy(), (1, -1), axis=(2, 3))) * 1.02 + gaussian_noise(hr, 0.03, seed=16)
    mask = random_mask((2, 4, 24, 24), 0.8, seed=17)
    expected = cpsnr_reference(sr.numpy(), hr.numpy(), mask.numpy(), max_shift=2)
    torch.testing.assert_close(cpsnr(sr, hr, mask, max_shift=2), torch.from_numpy(expected), rtol=0, atol=1e-9)


# --- Masks -------------------------------------------------------------------------------------------


def with_garbage(image: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(mask.expand_as(image), image, torch.full_like(image, fill))


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_pixels_outside_the_mask_do_not_count(metric: Metric) -> None:
    hr = smooth_image(seed=18)
    sr = hr + gaussian_noise(hr, 0.02, seed=19)
    mask = random_mask((2, 1, 48, 48), 0.7, seed=20)
    clean = metric(sr, hr, mask)
    assert torch.isfinite(clean).all()
    for fill_sr, fill_hr in [(1e3, math.nan), (math.nan, -5.0), (0.0, 1.0)]:
        torch.testing.assert_close(metric(with_garbage(sr, mask, fill_sr), with_garbage(hr, mask, fill_hr), mask), clean, rtol=0, atol=1e-12)
    assert not torch.allclose(metric(sr, hr), clean, rtol=0, atol=1e-6)


def test_masked_psnr_is_the_psnr_of_the_clear_pixels() -> None:
    hr = smooth_image(seed=21)
    sr = hr + gaussian_noise(hr, 0.02, seed=22)
    mask = random_mask((2, 1, 48, 48), 0.5, seed=23)
    scores = psnr(sr, with_garbage(hr, mask, math.nan), mask)
    for b in range(2):
        for c in range(4):
            keep = mask[b, 0].numpy()
            mse = np.mean((sr[b, c].numpy()[keep] - hr[b, c].numpy()[keep]) ** 2)
            assert scores[b, c].item() == pytest.approx(-10 * math.log10(mse), abs=1e-9)


def test_masked_ssim_matches_numpy_reference() -> None:
    hr = smooth_image(seed=24, size=32)
    sr = hr + gaussian_noise(hr, 0.03, seed=25)
    mask = random_mask((2, 4, 32, 32), 0.6, seed=26)
    scores = ssim(sr, hr, mask)
    for b in range(2):
        for c in range(4):
            expected = ssim_reference(sr[b, c].numpy(), hr[b, c].numpy(), mask[b, c].numpy())
            assert scores[b, c].item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("metric", [psnr, ssim, cpsnr, cssim])
def test_nan_in_hr_acts_as_a_mask(metric: Metric) -> None:
    hr = smooth_image(seed=27)
    sr = hr + gaussian_noise(hr, 0.02, seed=28)
    mask = random_mask((2, 4, 48, 48), 0.8, seed=29)  # per band: NaN hides one band's pixel only
    torch.testing.assert_close(metric(sr, with_garbage(hr, mask, math.nan)), metric(sr, hr, mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", [cpsnr, cssim])
def test_registered_metrics_ignore_hr_outside_the_mask(metric: Metric) -> None:
    hr = smooth_image(seed=30)
    sr = torch.from_numpy(np.roll(hr.numpy(), (1, 1), axis=(2, 3))) + gaussian_noise(hr, 0.02, seed=31)
    mask = random_mask((2, 1, 48, 48), 0.7, seed=32)
    clean = metric(sr, hr, mask)
    torch.testing.assert_close(metric(sr, with_garbage(hr, mask, 7.0), mask), clean, rtol=0, atol=1e-12)
    assert not torch.allclose(metric(sr, with_garbage(hr, mask, 7.0)), clean, rtol=0, atol=1e-6)


def test_a_band_with_no_clear_pixel_scores_nan() -> None:
    hr = smooth_image(seed=33)
    sr = hr + gaussian_noise(hr, 0.02, seed=34)
    hr[0, NIR] = math.nan
    for metric in (psnr, ssim, cpsnr, cssim):
        scores = metric(sr, hr)
        assert torch.isnan(scores[0, NIR]) and torch.isfinite(scores[0, :NIR]).all() and torch.isfinite(scores[1]).all()


# --- Per-band independence ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [psnr, ssim, cpsnr, cssim])
def test_degrading_nir_lowers_only_the_nir_column(metric: Metric) -> None:
    hr = smooth_image(seed=35)
    sr = hr + gaussian_noise(hr, 0.01, seed=36)
    worse = sr.clone()
    worse[:, NIR] += gaussian_noise(hr[:, NIR], 0.05, seed=37)
    before, after = metric(sr, hr), metric(worse, hr)
    torch.testing.assert_close(after[:, :NIR], before[:, :NIR], rtol=0, atol=1e-12)
    assert (after[:, NIR] < before[:, NIR] - 0.01).all()


# --- Training loss ------------------------------------------------------------------------------------


def test_best_shift_loss_is_differentiable() -> None:
    hr = smooth_image(seed=38, size=32)
    sr = (hr + gaussian_noise(hr, 0.02, seed=39)).requires_grad_(True)
    loss = best_shift_loss(sr, hr, masked_mse, max_shift=2)
    assert loss.shape == (2,)
    loss.sum().backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0


def test_best_shift_loss_gradient_is_exact() -> None:
    """L1, not MSE: the bias minimises the MSE, so an MSE gradient would not notice a detached bias."""
    hr = smooth_image(seed=40, batch=2, bands=2, size=10)
    sr = (hr + gaussian_noise(hr, 0.05, seed=41)).requires_grad_(True)
    mask = random_mask((2, 1, 10, 10), 0.8, seed=42)
    assert torch.autograd.gradcheck(lambda x: best_shift_loss(x, hr, masked_l1, mask, max_shift=1), (sr,))


def test_ssim_gradient_is_exact() -> None:
    hr = smooth_image(seed=43, batch=1, bands=1, size=9)
    sr = (hr + gaussian_noise(hr, 0.05, seed=44)).requires_grad_(True)
    mask = random_mask((1, 1, 9, 9), 0.8, seed=45)
    assert torch.autograd.gradcheck(lambda x: ssim(x, hr, mask, window=5, sigma=1.0), (sr,))


@pytest.mark.parametrize("shift", [(1, 1), (-2, 0)])
def test_best_shift_loss_forgives_misregistration(shift: tuple[int, int]) -> None:
    dy, dx = shift
    s = 2
    hr = smooth_image(seed=46)
    aligned = hr + gaussian_noise(hr, 0.01, seed=47) + 0.03
    shifted = torch.from_numpy(np.roll(aligned.numpy(), shift, axis=(2, 3)))
    size = hr.shape[-1]
    rows, cols = slice(s - dy, size - s - dy), slice(s - dx, size - s - dx)
    expected = best_shift_loss(aligned[..., rows, cols], hr[..., rows, cols], masked_mse, max_shift=0)
    torch.testing.assert_close(best_shift_loss(shifted, hr, masked_mse, max_shift=s), expected, rtol=0, atol=1e-15)
    assert (best_shift_loss(shifted, hr, masked_mse, max_shift=0) > 10 * expected).all()


def test_best_shift_loss_of_mse_agrees_with_cpsnr() -> None:
    """For one band the minimum bias-corrected MSE is the cMSE at cPSNR's shift: two code paths, one number."""
    hr = smooth_image(seed=48, bands=1)
    sr = torch.from_numpy(np.roll(hr.numpy(), (0, 1), axis=(2, 3))) + gaussian_noise(hr, 0.02, seed=49) + 0.02
    mask = random_mask((2, 1, 48, 48), 0.9, seed=50)
    loss = best_shift_loss(sr, hr, masked_mse, mask)
    torch.testing.assert_close(-10 * torch.log10(loss), cpsnr(sr, hr, mask)[:, 0], rtol=0, atol=1e-9)


def test_loss_fn_must_return_one_value_per_sample() -> None:
    hr = smooth_image(seed=51, size=16)
    with pytest.raises(ValueError, match="one value per sample"):
        best_shift_loss(hr.clone(), hr, lambda s, h, m: ((s - h) ** 2).mean(), max_shift=1)


# --- Input checks and devices -------------------------------------------------------------------------


def test_bad_inputs_are_refused() -> None:
    hr = smooth_image(seed=52, size=16)
    with pytest.raises(ValueError, match="one shape"):
        psnr(hr[..., :15], hr)
    with pytest.raises(TypeError, match="boolean"):
        psnr(hr, hr, torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="mask must be"):
        psnr(hr, hr, torch.ones(2, 2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="smaller than"):
        cssim(hr, hr, max_shift=3)
    with pytest.raises(ValueError, match="too small"):
        cpsnr(hr, hr, max_shift=8)
    with pytest.raises(ValueError, match="odd"):
        ssim(hr, hr, window=10)


def test_float32_agrees_with_float64() -> None:
    hr = smooth_image(seed=53)
    sr = hr + gaussian_noise(hr, 0.02, seed=54)
    for metric, tol in [(psnr, 1e-3), (ssim, 1e-5), (cpsnr, 1e-3), (cssim, 1e-5)]:
        torch.testing.assert_close(metric(sr.float(), hr.float()), metric(sr, hr).float(), rtol=0, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu() -> None:
    hr = smooth_image(seed=55)
    sr = hr + gaussian_noise(hr, 0.02, seed=56)
    mask = random_mask((2, 1, 48, 48), 0.8, seed=57)
    for metric in (psnr, ssim, cpsnr, cssim):
        on_gpu = metric(sr.cuda(), hr.cuda(), mask.cuda())
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), metric(sr, hr, mask), rtol=0, atol=1e-9)
    loss = best_shift_loss(sr.cuda().requires_grad_(True), hr.cuda(), masked_mse, mask.cuda())
    torch.testing.assert_close(loss.cpu(), best_shift_loss(sr, hr, masked_mse, mask), rtol=0, atol=1e-12)
