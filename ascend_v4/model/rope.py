"""Interleaved RoPE on the trailing `rope_head_dim` dims, with YaRN for compressed layers (model-spec §4.2).

Channels (2i, 2i+1) of the rope slice form one complex number (not Llama's rotate-half layout).
Ratio-0 layers use theta=10000 unscaled; ratio>0 layers (their window branch too) theta=160000 + YaRN.
No mscale anywhere. cos/sin are computed per call for the positions at hand: a table for 1M positions
would cost 256 MB per rope kind.
"""

from __future__ import annotations

import torch

from ascend_v4 import ops

from .args import ModelArgs, yarn_low_high


def inv_freq(args: ModelArgs, compressed: bool) -> torch.Tensor:
    """[rope_head_dim/2] fp32 inverse frequencies for a layer kind."""
    rd = args.rope_head_dim
    theta = args.compress_rope_theta if compressed else args.rope_theta
    # Explicit CPU device: the model is built under torch.device("meta"), but these are constants, not weights.
    f = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32, device="cpu") / rd))
    if compressed and args.original_seq_len > 0:
        low, high = yarn_low_high(args)
        high = high if high > low else low + 0.001
        ramp = ((torch.arange(rd // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        f = f / args.rope_factor * ramp + f * (1 - ramp)
    return f


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> the rotation of each (even, odd) channel pair as two [T, rd] fp32 factors, interleaved
    per pair: C = (cos, cos), S = (-sin, sin). `apply_rope` then needs two products and a sum (see there)."""
    ang = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    c, s = ang.cos(), ang.sin()
    return torch.stack((c, c), -1).flatten(-2), torch.stack((-s, s), -1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last rd = cos.shape[-1] dims of x [T, ..., D] IN PLACE (interleaved pairs; cos, sin = `cos_sin`'s
    C, S) and return x; `inverse` = conjugate. Through the op seam: `ops.apply_rope`."""
    return ops.apply_rope(x, cos, sin, inverse)
