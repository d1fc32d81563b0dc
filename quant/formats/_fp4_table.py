"""Fast conversions out of MXFP4 (model-spec.md §8.4) by table lookup on whole bytes.

Every FP4 expert value is `LUT[code] * 2^e` with one exponent `e` per 1x32 run. Any per-block conversion
whose result depends only on (code, block factor) - int8/int4 requantisation, BF16 expansion, the FP8 recast -
is a 256-entry table per distinct block factor mapping one packed byte (two codes) to a *pair* of output
values. There are few distinct factors per tensor (exponents x row classes), so the whole conversion is
one gather per byte (`numpy.take`, ~1 ns/byte on one core) instead of a dozen float passes over the unpacked
values. The tables are computed with the same fp32 arithmetic as the generic float path, so both give
identical bytes (tests check it).
"""

from __future__ import annotations

import numpy as np
import torch

from ascend_v4.ops.reference.formats import E8M0_BIAS, FP4_LUT

RUN = 32  # values per scale
BYTES_PER_RUN = RUN // 2
_LUT = FP4_LUT.numpy().astype(np.float32)
_B = np.arange(256)
PAIR = np.stack([_LUT[_B & 15], _LUT[_B >> 4]], axis=1).astype(np.float32)  # [256, 2]: low nibble first
_MAG_VALUE = _LUT[:8]  # magnitude code -> |value|
# Working-set target of one gather chunk (index array in intp): keeps it in L2.
CHUNK_BYTES = 1 << 20


def split(packed: torch.Tensor, scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [o, i/2], UE8M0 [o, i/32]) -> (bytes uint8 [o, nb, 16], exponents int32 [o, nb])."""
    o = packed.shape[0]
    b = packed.contiguous().view(torch.uint8).numpy().reshape(o, -1, BYTES_PER_RUN)
    e = scale.contiguous().view(torch.uint8).numpy().astype(np.int32) - E8M0_BIAS
    if e.shape != b.shape[:2]:
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight {tuple(packed.shape)}")
    return b, e


def block_amax(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    """max |value| of each 1x32 run, fp32 [o, nb] (exact: a table value times a power of two)."""
    bt = torch.from_numpy(b)
    mag = torch.maximum(bt & 7, (bt >> 4) & 7).amax(-1).numpy()  # [o, nb] largest magnitude code
    return np.ldexp(_MAG_VALUE[mag], e).astype(np.float32)


def factor_tables(e: np.ndarray, row_value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct block factors `row_value[n] * 2^e[n, b]` (fp32, exact power-of-two scaling).

    Returns (tid intp [o, nb] index of each block's factor, factors fp32 [T]).
    """
    classes, row_cls = np.unique(row_value.astype(np.float32), return_inverse=True)
    e_min = int(e.min()) if e.size else 0
    span = int(e.max()) - e_min + 1 if e.size else 1
    key = row_cls.reshape(-1, 1).astype(np.intp) * span + (e - e_min)
    present = np.zeros(len(classes) * span, dtype=bool)
    present[key] = True
    keys = np.flatnonzero(present)
    compact = np.cumsum(present) - 1
    factors = np.ldexp(classes[keys // span], (keys % span + e_min).astype(np.int32)).astype(np.float32)
    return compact[key].astype(np.intp), factors


def gather(b: np.ndarray, tid: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """out[n, j, k] = tables[tid[n, j], b[n, j, k]]; tables [T, 256] of any dtype (a value pair per entry).

    The flat index `256 * tid + byte` is built one L2-sized chunk at a time with a single pass (the table base
    of each run is computed once per run, then added to the bytes), then gathered with `take`."""
    o, nb, w = b.shape
    flat = np.ascontiguousarray(tables).reshape(-1)
    out = np.empty(b.shape, dtype=tables.dtype)
    base = np.left_shift(tid, 8, dtype=np.intp)  # [o, nb]: start of each run's table
    rows = max(1, CHUNK_BYTES // (nb * w * 8))
    idx = np.empty((min(rows, o), nb, w), dtype=np.intp)
    for r in range(0, o, rows):
        n = min(rows, o - r)
        ix = idx[:n]
        np.add(b[r:r + n], base[r:r + n, :, None], out=ix)
        flat.take(ix, out=out[r:r + n], mode="clip")
    return out


# FP8 e4m3fn byte -> value (0x7F / 0xFF are NaN), for the same trick on 1x128 runs of FP8 weights.
FP8_BLOCK = 128
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
E4M3_FINITE = np.nan_to_num(E4M3, nan=0.0)
_E4M3_MAG = np.abs(E4M3_FINITE[:128])  # magnitude of byte & 0x7F: monotone in the byte (NaN 0x7F last, as 0)


def fp8_run_amax(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    """max |value| of each 1x128 run of an FP8 weight: bytes uint8 [o, runs, 128], exponents [o, runs]."""
    mag = (torch.from_numpy(b) & 0x7F).amax(-1).numpy()
    return np.ldexp(_E4M3_MAG[mag], e).astype(np.float32)


def pair_tables_int(factors: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tables of `clamp(round_half_even(value * factor), lo, hi)` as int8 pairs -> int16 [T, 256]."""
    q = np.clip(np.rint(PAIR[None] * factors[:, None, None]), lo, hi).astype(np.int8)  # [T, 256, 2]
    return q.view(np.int16).reshape(len(factors), 256)
