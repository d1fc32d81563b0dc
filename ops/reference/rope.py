"""Reference interleaved RoPE rotation (model-spec §4.2; the frequencies and factors are the model's,
`ascend_v4/model/rope.py`)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last rd = cos.shape[-1] dims of x [T, ..., D] (interleaved pairs; cos, sin =
    `model.rope.cos_sin`'s C, S) IN PLACE and return x; `inverse` = conjugate. Every caller passes a fresh activation, so the nope dims (448 of
    512) need no copy.

    Per pair (x0, x1): (x0 C + x1' S) with x1' the pair swapped gives x0 cos - x1 sin and x1 cos + x0 sin, the
    same IEEE results as the textbook x0 cos - x1 sin, x0 sin + x1 cos (negation and a commuted sum are exact)."""
    rd = cos.shape[-1]
    rope = x[..., -rd:]
    f = rope if rope.dtype == torch.float32 else rope.float()
    swapped = f.unflatten(-1, (rd // 2, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    extra = x.dim() - 2  # broadcast over head dims
    c = cos.view(cos.shape[0], *([1] * extra), rd)
    s = sin.view(sin.shape[0], *([1] * extra), rd)
    out = f * c + swapped * (-s if inverse else s)  # new memory: f and swapped are read first
    x[..., -rd:] = out
    return x
