"""The lossless FP4 -> FP8 recast of routed experts (model-spec.md §8.6; official `convert.py --expert-dtype fp8`).

Input: MXFP4 `weight` int8 [out, in/2] + UE8M0 `scale` [out, in/32] (`fp4_mx`).
Output: `fp8_block` layout, e4m3fn [out, in] + UE8M0 [ceil(out/128), ceil(in/128)].

Per 128x128 block B: `new(B) = max(sub-exponents of the 1x32 runs in B) - 6`; each run is multiplied by
`2^(sub - new(B))` and stored as e4m3. Exact because |e2m1| <= 6 and 6 * 2^6 = 384 <= 448, and because e4m3
represents every e2m1 value times 2^k down to k = -8 (subnormals), i.e. runs up to 14 binades below the
block's largest one. Any run below that would lose bits: we check every table and raise `LossyRecastError`
rather than write a silently different weight.
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.ops.reference.formats import E8M0_BIAS

from . import _fp4_table as fp4t

BLOCK = 128
HEADROOM = 6  # binades between the largest run of a block and its new FP8 scale


class LossyRecastError(ValueError):
    """The FP4 -> FP8 recast of a tensor would not be exact (runs of one 128x128 block span too many binades)."""


def recast_fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (int8 [o, i/2], UE8M0 [o, i/32]) -> (e4m3fn [o, i], UE8M0 [ceil(o/128), ceil(i/128)]), exactly."""
    b, e = fp4t.split(packed, scale)
    o, nb, _ = b.shape
    runs_per_block = BLOCK // fp4t.RUN
    ob, ib = -(-o // BLOCK), -(-nb // runs_per_block)
    pad = np.full((ob * BLOCK, ib * runs_per_block), np.iinfo(np.int32).min // 2, dtype=np.int64)
    pad[:o, :nb] = e
    new = pad.reshape(ob, BLOCK, ib, runs_per_block).max(axis=(1, 3)) - HEADROOM  # [ob, ib]
    if new.min() < -E8M0_BIAS or new.max() > 254 - E8M0_BIAS:
        raise LossyRecastError(f"FP8 block scale exponent out of the UE8M0 range: [{new.min()}, {new.max()}]")
    shift = e - np.repeat(np.repeat(new, BLOCK, 0)[:o], runs_per_block, 1)[:, :nb]  # [o, nb], <= 6
    tid, factors = fp4t.factor_tables(shift.astype(np.int32), np.ones(o, dtype=np.float32))
    vals = torch.from_numpy(np.ascontiguousarray(fp4t.PAIR[None] * factors[:, None, None]))  # exact pow2 scaling
    f8 = vals.to(torch.float8_e4m3fn)
    inexact = (f8.float() != vals).any(dim=(1, 2)).numpy()  # tables that cannot hold every code exactly
    if inexact.any():
        _check_used_codes_exact(b, tid, inexact, f8, vals)
    tables = f8.view(torch.int16).numpy().reshape(len(factors), 256)
    out = fp4t.gather(b, tid, tables)  # int16 = two e4m3 bytes
    w = torch.from_numpy(out).view(torch.float8_e4m3fn).reshape(o, -1)
    s = torch.from_numpy((new + E8M0_BIAS).astype(np.uint8)).view(torch.float8_e8m0fnu)
    return w, s


def _check_used_codes_exact(b: np.ndarray, tid: np.ndarray, inexact: np.ndarray, f8: torch.Tensor,
                            vals: torch.Tensor) -> None:
    bad_bytes = (f8.float() != vals).any(dim=2).numpy()  # [T, 256] byte entries that would change
    rows, runs = np.nonzero(inexact[tid])
    for n, j in zip(rows.tolist(), runs.tolist()):
        if bad_bytes[tid[n, j], b[n, j]].any():
            raise LossyRecastError(
                f"FP4 -> FP8 recast is not exact at row {n}, 1x32 run {j}: its scale is more than 14 binades "
                f"below the largest run of its 128x128 block (model-spec.md §8.6)")
