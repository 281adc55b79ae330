"""Image-quality metrics for super-resolution: PSNR, SSIM and their registration-aware forms.

Pure PyTorch, so they run on CPU or CUDA and are differentiable: training losses can reuse them.
Images are float reflectance tensors (B, C, H, W) with data range 1.0. Every metric returns one value
per sample and band, (B, C), so a single degraded band shows up in its own column.

Clear pixels: the optional boolean ``mask`` (B, 1, H, W) or (B, C, H, W) marks the pixels to use
(True = clear); a NaN in ``hr`` makes that pixel and band not clear as well. The mask and the NaNs
belong to the reference ``hr``; ``sr`` is expected to be finite. In psnr and ssim, which compare pixel
for pixel, values at non-clear pixels of either image never reach the result. A sample and band with no
clear pixel scores NaN. Identical images score psnr = +inf (no cap).

Registration-aware metrics (PROBA-V challenge / HighRes-net): the SR image is cropped by ``max_shift``
pixels on every side and compared with every HR window of the same size offset by (dy, dx) in
[-s, s]²; the mask moves with the HR window. Before comparing, the brightness bias
b = mean over clear pixels of (HR window − SR crop) is added to the SR crop, per sample and band.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 1.0
K1 = 0.01
K2 = 0.03

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def psnr(sr: Tensor, hr: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, C): −10·log10(MSE over clear pixels), per sample and band; +inf for identical images."""
    clear = _clear(sr, hr, mask)
    error = (_zero_outside(sr, clear) - _zero_outside(hr, clear)) ** 2
    return _decibels(_masked_mean(error, clear))


def ssim(sr: Tensor, hr: Tensor, mask: Tensor | None = None, window: int = 11, sigma: float = 1.5) -> Tensor:
    """(B, C): mean SSIM over the valid window positions whose centre pixel is clear.

    As scikit-image's structural_similarity with gaussian_weights=True, use_sample_covariance=False,
    data_range=1 (K1 = 0.01, K2 = 0.03): a Gaussian window of ``window`` taps and ``sigma``, no padding
    ("valid" positions only, exactly the positions scikit-image averages over). With a mask the local
    means, variances and covariance are weighted over the clear pixels of each window only (normalised
    convolution), so non-clear pixels never influence the score; without one this is plain SSIM.
    """
    clear = _clear(sr, hr, mask)
    _check_window(window, sigma, sr.shape[-2:])
    return _ssim_score(_zero_outside(sr, clear), _zero_outside(hr, clear), clear, window, sigma)


def cpsnr(sr: Tensor, hr: Tensor, mask: Tensor | None = None, max_shift: int = 2) -> Tensor:
    """(B, C): bias-corrected PSNR, the best over integer shifts of the HR window (PROBA-V cPSNR).

    cMSE = mean over clear pixels of (HR window − SR crop − b)², cPSNR = −10·log10(cMSE). The shift is
    chosen per sample, the one with the highest cPSNR averaged over bands (NaN bands ignored; the
    smallest shift wins a tie), and the per-band values at that shift are returned, so all bands of a
    sample share one registration. With max_shift=0 this is PSNR after brightness-bias correction.
    """
    clear = _clear(sr, hr, mask)
    scores = []
    for sr_crop, hr_window, clear_window in _windows(sr, hr, clear, max_shift):
        residual = hr_window - sr_crop
        bias = _bias(sr_crop, hr_window, clear_window)
        scores.append(_decibels(_masked_mean((residual - bias) ** 2, clear_window)))
    return _pick_best_shift(torch.stack(scores, dim=1))


def cssim(
    sr: Tensor,
    hr: Tensor,
    mask: Tensor | None = None,
    max_shift: int = 2,
    *,
    window: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """(B, C): SSIM of (SR crop + b) against the HR window, the best over shifts.

    Same crop, bias and shift-selection rule as cpsnr (the shift with the highest cSSIM averaged over
    bands, per sample; per-band values at that shift). The cropped image must still hold a window.
    """
    clear = _clear(sr, hr, mask)
    _check_window(window, sigma, (sr.shape[-2] - 2 * max_shift, sr.shape[-1] - 2 * max_shift))
    scores = []
    for sr_crop, hr_window, clear_window in _windows(sr, hr, clear, max_shift):
        corrected = _zero_outside(sr_crop + _bias(sr_crop, hr_window, clear_window), clear_window)
        scores.append(_ssim_score(corrected, hr_window, clear_window, window, sigma))
    return _pick_best_shift(torch.stack(scores, dim=1))


def best_shift_loss(sr: Tensor, hr: Tensor, loss_fn: LossFn, mask: Tensor | None = None, max_shift: int = 2) -> Tensor:
    """(B,): per-sample minimum over shifts of loss_fn(SR crop + b, HR window, clear window).

    For training on imperfectly registered targets: differentiable w.r.t. ``sr``, with the bias b
    computed as in cpsnr and gradients flowing through it. ``loss_fn(sr_c, hr_w, mask_w)`` receives
    (B, C, h, w) tensors and a boolean mask, and must return (B,); non-clear pixels of ``hr_w`` are set
    to 0, so the loss has to weight by the mask. The gradient reaches the winning shift only.
    """
    clear = _clear(sr, hr, mask)
    losses = []
    for sr_crop, hr_window, clear_window in _windows(sr, hr, clear, max_shift):
        loss = loss_fn(sr_crop + _bias(sr_crop, hr_window, clear_window), hr_window, clear_window)
        if loss.shape != sr.shape[:1]:
            raise ValueError(f"loss_fn must return one value per sample, shape ({sr.shape[0]},), got {tuple(loss.shape)}")
        losses.append(loss)
    return torch.stack(losses, dim=1).amin(dim=1)


def _clear(sr: Tensor, hr: Tensor, mask: Tensor | None) -> Tensor:
    """Boolean (B, C, H, W): the user's mask, broadcast over bands, and finite HR values."""
    if sr.ndim != 4 or sr.shape != hr.shape:
        raise ValueError(f"sr and hr must both be (B, C, H, W) of one shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if not (sr.is_floating_point() and hr.is_floating_point()):
        raise TypeError(f"sr and hr must be floating point, got {sr.dtype} and {hr.dtype}")
    clear = torch.isfinite(hr)
    if mask is None:
        return clear
    batch, bands, height, width = hr.shape
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True = clear), got {mask.dtype}")
    if mask.shape not in ((batch, 1, height, width), (batch, bands, height, width)):
        raise ValueError(f"mask must be ({batch}, 1, {height}, {width}) or ({batch}, {bands}, {height}, {width}), got {tuple(mask.shape)}")
    return clear & mask.to(hr.device)


def _zero_outside(x: Tensor, clear: Tensor) -> Tensor:
    """where(), not a product: NaN or garbage outside the clear pixels must not leak into sums."""
    return torch.where(clear, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(values: Tensor, clear: Tensor, empty: float = math.nan) -> Tensor:
    """Mean over the last two axes of the clear values; ``empty`` where there is none."""
    count = clear.sum(dim=(-2, -1))
    total = _zero_outside(values, clear).sum(dim=(-2, -1))
    mean = total / count.clamp_min(1).to(values.dtype)
    return torch.where(count > 0, mean, torch.full_like(mean, empty))


def _bias(sr_crop: Tensor, hr_window: Tensor, clear_window: Tensor) -> Tensor:
    """(B, C, 1, 1) brightness bias mean(HR − SR) over clear pixels; 0 where none is clear."""
    return _masked_mean(hr_window - sr_crop, clear_window, empty=0.0)[..., None, None]


def _decibels(mse: Tensor) -> Tensor:
    return -10.0 * torch.log10(mse / DATA_RANGE**2)


def _shifts(max_shift: int) -> list[tuple[int, int]]:
    """All (dy, dx) in [-s, s]², nearest first, so that argmax breaks ties towards no shift."""
    span = range(-max_shift, max_shift + 1)
    return sorted(((dy, dx) for dy in span for dx in span), key=lambda s: (s[0] ** 2 + s[1] ** 2, s))


def _windows(sr: Tensor, hr: Tensor, clear: Tensor, max_shift: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """For each shift: SR cropped by max_shift, the HR window offset by (dy, dx) (NaN-free), its mask.

    One shift at a time rather than stacked, so that memory stays that of one image.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    height, width = sr.shape[-2] - 2 * max_shift, sr.shape[-1] - 2 * max_shift
    if height < 1 or width < 1:
        raise ValueError(f"images of {tuple(sr.shape[-2:])} pixels are too small for max_shift={max_shift}")
    s = max_shift
    sr_crop = sr[..., s : s + height, s : s + width]
    hr = _zero_outside(hr, clear)
    for dy, dx in _shifts(max_shift):
        rows, cols = slice(s + dy, s + dy + height), slice(s + dx, s + dx + width)
        yield sr_crop, hr[..., rows, cols], clear[..., rows, cols]


def _pick_best_shift(scores: Tensor) -> Tensor:
    """(B, S, C) → (B, C): per sample, the shift with the best band-averaged score, all its bands."""
    key = torch.nanmean(scores, dim=2)
    key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
    best = key.argmax(dim=1)
    return scores[torch.arange(scores.shape[0], device=scores.device), best]


def _check_window(window: int, sigma: float, size: tuple[int, int] | torch.Size) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if min(size) < window:
        raise ValueError(f"images of {tuple(size)} pixels are smaller than the {window}-pixel SSIM window")


def _gaussian(window: int, sigma: float, like: Tensor) -> Tensor:
    """Normalised 1-D Gaussian taps, as scipy.ndimage.gaussian_filter (used by scikit-image) makes them."""
    x = torch.arange(window, dtype=like.dtype, device=like.device) - (window - 1) / 2
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _blur_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian blur of every channel, no padding: (N, K, H, W) → (N, K, H−w+1, W−w+1)."""
    n, k, height, width = x.shape
    w = taps.numel()
    # Grouped (depthwise) convolutions: one kernel per channel; far faster on CPU than a batch of 1-channel images.
    x = F.conv2d(x, taps.view(1, 1, 1, w).expand(k, 1, 1, w), groups=k)
    return F.conv2d(x, taps.view(1, 1, w, 1).expand(k, 1, w, 1), groups=k)


def _ssim_score(x: Tensor, y: Tensor, clear: Tensor, window: int, sigma: float) -> Tensor:
    """(B, C) mean SSIM; x and y already zero outside ``clear``."""
    weight = clear.to(x.dtype)
    stats = _blur_valid(torch.cat([weight, x, y, x * x, y * y, x * y], dim=1), _gaussian(window, sigma, x))
    total, sx, sy, sxx, syy, sxy = stats.chunk(6, dim=1)
    # Positions whose centre is clear carry at least the centre tap's weight; the clamp only keeps the
    # others finite (they are dropped below), so gradients stay finite too.
    total = total.clamp_min(torch.finfo(x.dtype).eps)
    mx, my = sx / total, sy / total
    vx, vy, cxy = sxx / total - mx * mx, syy / total - my * my, sxy / total - mx * my
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    similarity = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = window // 2
    centre = clear[..., r : clear.shape[-2] - r, r : clear.shape[-1] - r]
    return _masked_mean(similarity, centre)
