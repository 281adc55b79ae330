"""HighRes-net: multi-frame super-resolution by recursive fusion (Deudon et al. 2020).

Configured as in Sentinel Hub's Sentinel-2 work: 4 bands, a median reference frame, a shared
residual encoder, one fusion block reused at every level with an alpha-residual (a padded frame adds
nothing), and a pixel-shuffle decoder. Pure PyTorch: it knows nothing of STAC, Dask or files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Everything that shapes the network's weights; stored with every checkpoint."""

    bands: int = 4
    hidden_channels: int = 64
    encoder_blocks: int = 8
    scale: int = 4
    residual: str = "none"
    """'none' (as in the method) or 'bicubic': the network adds a learned residual to the bicubic
    upsampling of the latest frame, so an untrained or briefly trained network starts at bicubic."""

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def receptive_radius(arch: Architecture, frames: int) -> int:
    """Low-resolution pixels on each side that can influence one output pixel.

    Every 3x3 convolution adds one: encoder (1 + 2 per block + 1), fusion (3 per level, log2(frames)
    levels), decoder (1). The default (8 blocks, 8 frames) gives 28, so a halo of 28 makes tiles seamless.
    """
    levels = max(frames - 1, 0).bit_length()
    return (2 + 2 * arch.encoder_blocks) + 3 * levels + 1


class ResidualBlock(nn.Module):
    """conv-PReLU-conv-PReLU plus skip, as in HighRes-net's encoder and fusion."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.PReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Shared across frames: each frame is encoded next to the reference (bands + reference bands)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        c = arch.hidden_channels
        self.head = nn.Sequential(nn.Conv2d(2 * arch.bands, c, 3, padding=1), nn.PReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(c) for _ in range(arch.encoder_blocks)])
        self.tail = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.blocks(self.head(x)))


class Fusion(nn.Module):
    """One block reused at every level: fuses a pair of encoded frames into one."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        c = arch.hidden_channels
        self.block = nn.Sequential(ResidualBlock(2 * c), nn.Conv2d(2 * c, c, 3, padding=1), nn.PReLU())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([a, b], dim=1))


class Decoder(nn.Module):
    """conv (reflect padding) + PReLU, then PixelShuffle: every output pixel is fed by the features.

    Reflect padding matters only at image borders; inside a tile the halo covers it.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        c = arch.hidden_channels
        if c % (arch.scale**2) or c // arch.scale**2 != arch.bands:
            # PixelShuffle(s) turns C channels into C/s² at s× resolution: keep C = bands·s² here.
            self.expand = nn.Conv2d(c, arch.bands * arch.scale**2, 1)
        else:
            self.expand = nn.Identity()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"), nn.PReLU())
        self.shuffle = nn.PixelShuffle(arch.scale)
        if arch.residual == "bicubic":
            # Start as bicubic: the last layer before the shuffle outputs zero until training moves it.
            last = self.expand if isinstance(self.expand, nn.Conv2d) else self.conv[0]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.expand(self.conv(x)))


class HighResNet(nn.Module):
    """(batch, frames, bands, H, W) normalised frames + (batch, frames) alphas → (batch, bands, sH, sW).

    Frames are oldest first, real frames before padding; alpha is 1 for a real frame and 0 for
    padding. The frame count is padded to a power of two with alpha-0 frames. The alpha-residual gates
    the second partner of each pair, which is where padding lands when it comes last, so trailing
    padding is an exact no-op. H and W must be at least 2 (the decoder pads by reflection).
    """

    def __init__(self, arch: Architecture = Architecture()) -> None:
        super().__init__()
        if arch.residual not in ("none", "bicubic"):
            raise ValueError(f"architecture.residual must be 'none' or 'bicubic', got {arch.residual!r}")
        self.arch = arch
        self.encoder = Encoder(arch)
        self.fusion = Fusion(arch)
        self.decoder = Decoder(arch)

    def forward(self, frames: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        frames, alphas = _pad_to_power_of_two(frames, alphas)
        batch, count, bands, height, width = frames.shape
        alphas = alphas.to(frames.dtype)
        latest = latest_frame(frames, alphas)
        reference = median_reference(frames, alphas)
        if one_frame_at_a_time(frames):
            fused = self._encode_and_fuse_one_at_a_time(frames, reference, alphas)
        else:
            paired = torch.cat([frames, reference.unsqueeze(1).expand(-1, count, -1, -1, -1)], dim=2).reshape(batch * count, 2 * bands, height, width)
            fused = self._encode_and_fuse_together(paired, alphas, batch, count)
        output = self.decoder(fused)
        if self.arch.residual == "bicubic":
            output = output + nn.functional.interpolate(latest, scale_factor=self.arch.scale, mode="bicubic", align_corners=False)
        return output

    def _encode_and_fuse_together(self, paired: torch.Tensor, alphas: torch.Tensor, batch: int, count: int) -> torch.Tensor:
        """Every frame of the batch in one encoder call, every pair of a level in one fusion call: the
        fewest, largest kernels, which a GPU needs to be busy (and autograd, which in-place updates break)."""
        hidden = self.encoder(paired)
        hidden = hidden.reshape(batch, count, *hidden.shape[1:])
        while hidden.shape[1] > 1:
            half = hidden.shape[1] // 2
            # First half with the reversed second half: (0, n-1), (1, n-2), ... as in HighRes-net.
            a, b = hidden[:, :half], hidden[:, half:].flip(1)
            alpha_a, alpha_b = alphas[:, :half], alphas[:, half:].flip(1)
            fused = self.fusion(a.reshape(batch * half, *a.shape[2:]), b.reshape(batch * half, *b.shape[2:]))
            gate = alpha_b[:, :, None, None, None]
            # where(), not a product: a padding frame holding NaN must still contribute nothing.
            hidden = a + torch.where(gate > 0, gate * fused.reshape(a.shape), torch.zeros_like(a))
            alphas = torch.maximum(alpha_a, alpha_b)
        return hidden[:, 0]

    def _encode_and_fuse_one_at_a_time(self, frames: torch.Tensor, reference: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """The same arithmetic, window by window, one frame per encoder call and one pair per fusion
        call, each pair's result added in place to its first partner. A frame is encoded (paired with
        the reference) only when the first level's fusion takes it, and its features are let go once
        fused into their partner: the first level fuses (0, n-1), (1, n-2), ..., so about half the
        frames' feature maps are alive at once, and the fusion's temporaries (`peak_feature_maps`),
        where the frames together hold 3 x frames. A pair whose second partner is padding (alpha 0, whose
        gate adds exactly nothing) is skipped, so a window of n real frames costs n encodings and n - 1
        fusions, not the padded count's: a series' first dates are that much cheaper. A CPU task of one
        1056 px window of 8 frames in bf16 allocates 1.77 GB at its peak, against 2.70 GB when every
        frame was encoded first; on a CPU it also runs a little faster (python -m sr_batch.bench), so a
        CPU job can afford larger tiles and less halo.

        The features are kept in the encoder's type. In float32 the output is the together path's bit
        for bit. Under bf16 autocast they stay bf16 where the together path's sums are float32: a fusion
        block's skip then adds bf16-rounded sums, as close to the float32 output (test_model), and a
        1056 px pass takes 11 % less time on a CPU with AMX."""
        fused = [self._fuse_window(frames[sample], reference[sample : sample + 1], alphas[sample]) for sample in range(frames.shape[0])]
        return fused[0] if len(fused) == 1 else torch.cat(fused)

    def _fuse_window(self, frames: torch.Tensor, reference: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """One window's (frames, bands, H, W) frames fused into (1, hidden, H, W) features (see above)."""
        count = frames.shape[0]
        features: list[torch.Tensor | None] = [None] * count

        def encoded(frame: int) -> torch.Tensor:
            known = features[frame]
            return known if known is not None else self.encoder(torch.cat([frames[frame : frame + 1], reference], dim=1))

        alphas = alphas.clone()
        # Which frames' fusions count, on the host. A compiled pass computes them all: reading the alphas
        # would break its graph, and it would compile again for each count of real frames.
        gated = [True] * count if torch.compiler.is_compiling() else (alphas > 0).tolist()
        level = count
        while level > 1:
            half = level // 2
            for pair in range(half):
                first, second = pair, level - 1 - pair
                if not gated[second]:
                    continue  # a padding partner adds exactly nothing: it is neither encoded nor fused
                kept, added = encoded(first), encoded(second)
                features[second] = None
                update = self.fusion(kept, added)
                del added
                gate = alphas[second]
                features[first] = kept.add_(torch.where(gate > 0, gate * update, 0.0))
                del update
            alphas[:half] = torch.maximum(alphas[:half], alphas[half:level].flip(0))
            gated[:half] = [a or b for a, b in zip(gated[:half], reversed(gated[half:level]))]
            level = half
        return encoded(0)


def infers_one_frame_at_a_time(device: torch.device) -> bool:
    """Whether inference on `device` encodes and fuses one frame at a time: on a CPU; a GPU needs the
    batched calls' large kernels to be busy."""
    return device.type != "cuda"


def one_frame_at_a_time(frames: torch.Tensor) -> bool:
    """Whether a forward pass encodes and fuses one frame at a time: in inference on such a device (autograd
    keeps the frames together: the in-place sums would break it)."""
    return infers_one_frame_at_a_time(frames.device) and not torch.is_grad_enabled()


def peak_feature_maps(frames: int, device: torch.device) -> int:
    """Feature maps (hidden channels x window) alive at an inference pass's peak on `device`, per window:
    3 per frame when the frames go together (the encoder's input, output and temporary of every frame),
    a few plus about a quarter per frame when they go one at a time (measured in float32: 25 maps together
    for 8 frames; one at a time, allocated, 3.7, 4.2, 4.7, 5.8 and 7.8 maps for 1, 2, 4, 8 and 16 frames,
    and up to 7.2 resident in glibc's heap)."""
    return frames // 4 + 7 if infers_one_frame_at_a_time(device) else 3 * frames


def latest_frame(frames: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Each sample's last real frame (real frames come first, so it sits at index count - 1)."""
    index = (alphas.sum(dim=1).long() - 1).clamp(min=0)
    return frames[torch.arange(frames.shape[0], device=frames.device), index]


def median_reference(frames: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Per-pixel median over the real frames only (padding frames are ignored)."""
    masked = frames.masked_fill(alphas[:, :, None, None, None] == 0, float("nan"))
    reference = masked.nanmedian(dim=1).values
    return torch.nan_to_num(reference, nan=0.0)


def _pad_to_power_of_two(frames: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = frames.shape[1]
    target = 1 << max(count - 1, 0).bit_length()
    if target == count:
        return frames, alphas
    pad = target - count
    frames = torch.cat([frames, frames.new_zeros(frames.shape[0], pad, *frames.shape[2:])], dim=1)
    alphas = torch.cat([alphas, alphas.new_zeros(alphas.shape[0], pad)], dim=1)
    return frames, alphas
