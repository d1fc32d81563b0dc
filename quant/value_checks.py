"""Find non-finite values in the raw bytes of checkpoint tensors (shipped as `ascend_v4.quant.value_checks`).

A checkpoint holding a NaN or an infinity loads and converts silently and then generates garbage (token 0
forever), so the loader (`ascend_v4.checkpoint.loader`) and the converter check the bytes they read.

What counts as bad, per safetensors dtype:

| dtype | bad element |
|---|---|
| F64, F32, BF16, F16 | NaN or +-inf (exponent bits all ones) |
| F8_E4M3 (e4m3fn) | NaN: bytes 0x7F / 0xFF (the format has no inf) |
| F8_E5M2 | NaN or +-inf (exponent bits all ones) |
| F8_E8M0 (UE8M0 scale) | NaN (byte 0xFF), or a scale that *overflows* (below) |
| I8, U8, I16, U16, I32, U32, I64, U64, BOOL, F4, F6_E2M3, F6_E3M2 | never (no NaN/inf encodings) |

Overflowing UE8M0 scale (byte b, value 2^(b-127)): the scale times the largest magnitude of the format it
scales exceeds the largest finite bfloat16 (0x7F7F = (2 - 2^-7) * 2^127, slightly below the float32 maximum),
so dequantising a block holding that format's largest code gives inf in bfloat16 (for 448 and 6 the same bytes
overflow float32). The first bad byte `e8m0_limit(scaled)` is:

| scaled format (`scaled=`) | largest magnitude | first bad byte | largest good scale |
|---|---|---|---|
| `F8_E4M3` (FP8 e4m3 weights) | 448 | 247 (2^120) | 2^119 |
| `I8` / `F4` (packed FP4 e2m1 experts) | 6 | 253 (2^126) | 2^125 |
| None or any other name (unknown: the conservative bound) | 448 | 247 (2^120) | 2^119 |

(Weight scales of a trained model are far below 2^119, so the bound flags corrupt bytes, not real scales.)

Speed: the bytes are checked as int64 words, several elements per word (SWAR): for a condition
`(x & mask) >= lo` on lanes of `w` bits whose mask clears the lane's top bit, `(x & mask) + (2^(w-1) - lo)`
sets the lane's top bit exactly when the lane is bad and never carries into the next lane, so three
elementwise int64 ops and one `any()` per cache-sized block check 8 bytes at a time (about 3 GB/s per core
on one core of the development machine, for every dtype). Only a block that holds a bad element is
re-examined element by element to find the first one.

API:
* `find_bad(dtype, buf, *, scaled=None) -> (element index, description) | None` - one buffer;
* `check_chunk(dtype, buf, *, tensor, file, first_element=0, shape=None, scale_of=None)` - raises
  `NonFiniteValueError` naming file, tensor, the element index in the whole tensor (and [row, col] for 2-D);
* `TensorValueChecker` - feed a tensor's bytes in chunks split anywhere (even inside an element);
* `check_tensor(dtype, tensor, ...)` - a whole torch tensor (any dtype: its bytes are reinterpreted).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Largest magnitude of each format a UE8M0 scale may scale (keys: safetensors dtype names and format aliases).
SCALED_MAX = {"F8_E4M3": 448.0, "fp8": 448.0, "e4m3": 448.0, "fp8_block": 448.0,
              "I8": 6.0, "F4": 6.0, "fp4": 6.0, "e2m1": 6.0, "fp4_mx": 6.0}
CONSERVATIVE_SCALED_MAX = 448.0  # used when the scaled format is not known (the larger max: the stricter bound)
BF16_MAX = (2 - 2 ** -7) * 2.0 ** 127  # largest finite bfloat16, smaller than float32's
E8M0_NAN = 0xFF
E8M0_BIAS = 127

# Dtypes that have no NaN / inf encodings.
NEVER_BAD = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F4", "F6_E2M3", "F6_E3M2"})


@dataclass(frozen=True)
class _Rule:
    """Bad element: `(x & mask) >= lo` on the element's little-endian bits (`and_top`: also the top bit set)."""

    width: int  # bytes per element
    mask: int
    lo: int
    and_top: bool = False  # F8_E8M0: b >= lo with lo >= 128 is (b & 0x80) and (b & 0x7F) >= lo - 128


_FLOAT_RULES = {
    "F64": _Rule(8, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": _Rule(4, 0x7FFF_FFFF, 0x7F80_0000),
    "BF16": _Rule(2, 0x7FFF, 0x7F80),
    "F16": _Rule(2, 0x7FFF, 0x7C00),
    "F8_E4M3": _Rule(1, 0x7F, 0x7F),
    "F8_E5M2": _Rule(1, 0x7F, 0x7C),
}
_MANT_BITS = {"F64": 52, "F32": 23, "BF16": 7, "F16": 10, "F8_E5M2": 2}
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK_BYTES = 1 << 20  # SWAR block: fits in L2 together with its temporary
_TOP = {1: 0x80, 2: 0x8000, 4: 0x8000_0000, 8: 0x8000_0000_0000_0000}


def scaled_dtype(name: str, dtypes) -> str | None:
    """For a UE8M0 scale `<base>.scale`, the safetensors dtype of the weight `<base>.weight` it scales (the
    `scale_of` / `scaled` argument of the checks) when its range is known (F8_E4M3, I8 = packed FP4); else None
    (the conservative bound). `dtypes`: {tensor name: entry with a `.dtype`} of the checkpoint."""
    if not name.endswith(".scale"):
        return None
    w = dtypes.get(name[: -len("scale")] + "weight")
    return w.dtype if w is not None and w.dtype in SCALED_MAX else None


def e8m0_limit(scaled: str | None = None) -> int:
    """First UE8M0 byte that is bad when the scale multiplies `scaled` (see the module docstring): the
    smallest b with 2^(b-127) * max|scaled| > max bfloat16; 255 (NaN) at most. A `scaled` not in `SCALED_MAX`
    (None, or e.g. the dtype of some other tensor) gets the conservative bound."""
    m = SCALED_MAX.get(scaled, CONSERVATIVE_SCALED_MAX) if scaled is not None else CONSERVATIVE_SCALED_MAX
    for b in range(E8M0_NAN):
        if math.ldexp(m, b - E8M0_BIAS) > BF16_MAX:
            return b
    return E8M0_NAN


def _rule(dtype: str, scaled: str | None) -> _Rule | None:
    if dtype in _FLOAT_RULES:
        return _FLOAT_RULES[dtype]
    if dtype == "F8_E8M0":
        lo = e8m0_limit(scaled)
        assert lo >= 0x80, "the word test for F8_E8M0 needs a limit byte >= 128"
        return _Rule(1, 0xFF, lo, and_top=True)
    if dtype in NEVER_BAD:
        return None
    raise ValueError(f"unknown safetensors dtype {dtype!r}")


def can_be_bad(dtype: str) -> bool:
    """Whether elements of this safetensors dtype can be bad at all (False for integers, unknown dtypes too)."""
    return dtype in _FLOAT_RULES or dtype == "F8_E8M0"


def _lanes(value: int, width: int) -> int:
    """`value` repeated in every `width`-byte lane of an int64 word, as a signed int64."""
    word = 0
    for i in range(8 // width):
        word |= value << (8 * width * i)
    return word - (1 << 64) if word >= 1 << 63 else word


def _as_bytes(buf) -> torch.Tensor:
    """A flat uint8 torch tensor over the bytes of `buf` (no copy)."""
    if isinstance(buf, torch.Tensor):
        t = buf if buf.is_contiguous() else buf.contiguous()
        t = t.reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    if isinstance(buf, np.ndarray):
        a = buf.reshape(-1) if buf.flags.c_contiguous else np.ascontiguousarray(buf).reshape(-1)
        a = a.view(np.uint8)
        if a.size == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we never write
            return torch.from_numpy(a)
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("value check: buffer is not contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers (bytes): we never write
        return torch.frombuffer(mv, dtype=torch.uint8)


def _elements_bad(u8: torch.Tensor, rule: _Rule) -> torch.Tensor:
    """Bool mask of bad elements of an element-aligned uint8 slice (slow path, small slices)."""
    w = rule.width
    if u8.storage_offset() % w:
        u8 = u8.clone()
    x = u8.view(_INT_OF_WIDTH[w])
    return (x & rule.mask) >= rule.lo  # uint8, or masked to non-negative: the compare is exact


def _first_in(u8: torch.Tensor, rule: _Rule) -> int | None:
    """Element index (in `u8`) of the first bad element, element by element."""
    bad = _elements_bad(u8, rule)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else None


def _first_bad_index(u8: torch.Tensor, rule: _Rule) -> int | None:
    w = rule.width
    n = u8.numel()
    head = (-u8.storage_offset()) % 8
    if head % w:  # the words would not start on an element boundary: realign with one copy
        u8, head = u8.clone(), 0
    head = min(head, n)
    if head:
        i = _first_in(u8[:head], rule)
        if i is not None:
            return i
    words = (n - head) // 8
    if words:
        body = u8[head:head + words * 8].view(torch.int64)
        m1 = _lanes(rule.mask & ~_TOP[w] if rule.and_top else rule.mask, w)
        m2 = _lanes((_TOP[w] - (rule.lo - _TOP[w]) if rule.and_top else _TOP[w] - rule.lo), w)
        m3 = _lanes(_TOP[w], w)
        step = _BLOCK_BYTES // 8
        tmp = torch.empty(min(step, words), dtype=torch.int64, device=u8.device)
        for s in range(0, words, step):
            c = body[s:s + step]
            t = tmp[:c.numel()]
            torch.bitwise_and(c, m1, out=t)
            t.add_(m2)  # never carries out of a lane; the top lane may wrap the int64 sign (two's complement)
            if rule.and_top:
                t.bitwise_and_(c)
            t.bitwise_and_(m3)
            if bool(t.any()):
                i = _first_in(u8[head + s * 8:head + (s + c.numel()) * 8], rule)
                assert i is not None, "value check: word test and element test disagree"
                return (head + s * 8) // w + i
    rest = head + words * 8
    if rest < n:
        i = _first_in(u8[rest:], rule)
        if i is not None:
            return rest // w + i
    return None


def describe(dtype: str, raw: int, scaled: str | None = None) -> str:
    """Text for one bad element given its raw little-endian bits (`raw` as an unsigned int)."""
    if dtype == "F8_E4M3":
        return f"nan (byte {raw:#04x})"
    if dtype == "F8_E8M0":
        if raw == E8M0_NAN:
            return "nan (byte 0xff)"
        known = scaled in SCALED_MAX
        fmt = scaled if known else "values of an unknown format (conservative bound)"
        m = SCALED_MAX[scaled] if known else CONSERVATIVE_SCALED_MAX
        return (f"scale 2^{raw - E8M0_BIAS} (byte {raw:#04x}), which overflows bfloat16 when it scales "
                f"{fmt} values (max {m:g}): UE8M0 scales of this format must be below byte {e8m0_limit(scaled)}")
    mant = _MANT_BITS[dtype]
    bits = _FLOAT_RULES[dtype].width * 8
    if raw & ((1 << mant) - 1):
        return "nan"
    return "-inf" if raw >> (bits - 1) else "+inf"


def find_bad(dtype: str, buf, *, scaled: str | None = None) -> tuple[int, str] | None:
    """The first bad element of `buf` (module docstring) as (element index in `buf`, description), or None.

    Args:
        dtype: safetensors dtype name of the elements (`BF16`, `F32`, `F8_E4M3`, `F8_E8M0`, ...).
        buf: the raw bytes: bytes, bytearray, memoryview, numpy array or torch tensor (any dtype: its bytes
            are used; CPU or another device). It must start on an element boundary.
        scaled: for F8_E8M0 scales, the dtype / format of the tensor they scale (`F8_E4M3`, `I8` = FP4, ...);
            None: the conservative bound (448).

    Raises:
        ValueError: unknown dtype or scaled format, or a byte count that is not a whole number of elements.
    """
    rule = _rule(dtype, scaled)
    if rule is None:
        return None
    u8 = _as_bytes(buf)
    if u8.numel() % rule.width:
        raise ValueError(f"value check: {u8.numel()} bytes is not a whole number of {dtype} elements")
    i = _first_bad_index(u8, rule)
    if i is None:
        return None
    w = rule.width
    raw = int.from_bytes(bytes(u8[i * w:(i + 1) * w].cpu().numpy().tobytes()), "little")
    return i, describe(dtype, raw, scaled)


class NonFiniteValueError(ValueError):
    """A tensor holds a NaN / inf (or an overflowing / NaN UE8M0 scale). Attributes: file, tensor, index
    (element index in the whole tensor, row-major), value (description), dtype, position (the multi-index
    for tensors of 2+ dims, else None)."""

    def __init__(self, *, file: str | None, tensor: str, index: int, value: str, dtype: str,
                 shape: tuple[int, ...] | None = None) -> None:
        self.file, self.tensor, self.index, self.value, self.dtype = file, tensor, index, value, dtype
        self.shape = tuple(shape) if shape is not None else None
        self.position = _unravel(index, self.shape) if self.shape is not None and len(self.shape) >= 2 else None
        where = f"{file}: " if file else ""
        pos = f" {list(self.position)}" if self.position is not None else ""
        kind = f"{dtype} scale" if dtype == "F8_E8M0" else dtype
        super().__init__(f"{where}{tensor}: element {index}{pos} is {value} ({kind})")


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(shape):
        if d <= 0:
            return ()
        index, r = divmod(index, d)
        out.append(r)
    return tuple(reversed(out))


def check_chunk(dtype: str, buf, *, tensor: str, file: str | None = None, first_element: int = 0,
                shape: tuple[int, ...] | None = None, scale_of: str | None = None) -> None:
    """Raise `NonFiniteValueError` for the first bad element of one chunk of a tensor.

    Args:
        dtype: safetensors dtype of the tensor.
        buf: the chunk's bytes (any type `find_bad` takes), starting on an element boundary.
        tensor, file: names for the message (file: the shard's file name).
        first_element: index, in the whole tensor, of the chunk's first element (its byte offset from the
            tensor's start divided by the element size), so the reported index is the tensor's.
        shape: the whole tensor's shape (2+ dims: the message also gives the [row, col] position).
        scale_of: for F8_E8M0 scales, the dtype of the weight they scale (`F8_E4M3`, `I8` for packed FP4);
            None: the conservative bound.
    """
    hit = find_bad(dtype, buf, scaled=scale_of)
    if hit is not None:
        raise NonFiniteValueError(file=file, tensor=tensor, index=first_element + hit[0], value=hit[1],
                                  dtype=dtype, shape=shape)


def check_tensor(dtype: str, t, *, tensor: str, file: str | None = None, scale_of: str | None = None) -> None:
    """`check_chunk` of a whole tensor (shape taken from `t` when it is a torch tensor / numpy array)."""
    shape = tuple(t.shape) if isinstance(t, (torch.Tensor, np.ndarray)) else None
    check_chunk(dtype, t, tensor=tensor, file=file, first_element=0, shape=shape, scale_of=scale_of)


class TensorValueChecker:
    """Check one tensor whose bytes arrive in consecutive chunks split anywhere (even inside an element):

        chk = TensorValueChecker("BF16", tensor=name, file=shard, shape=shape)
        for chunk in chunks:          # in order, from the tensor's first byte
            chk.feed(chunk)           # raises NonFiniteValueError
        chk.finish()                  # raises ValueError if the bytes did not end on an element boundary

    Bytes of an element cut by a chunk boundary are carried to the next chunk (at most width-1 bytes copied).
    """

    def __init__(self, dtype: str, *, tensor: str, file: str | None = None, shape: tuple[int, ...] | None = None,
                 scale_of: str | None = None) -> None:
        self.dtype, self.tensor, self.file, self.shape, self.scale_of = dtype, tensor, file, shape, scale_of
        rule = _rule(dtype, scale_of)  # validates the names now
        self.width = rule.width if rule is not None else 1
        self.active = rule is not None
        self.bytes_seen = 0
        self._carry = b""

    def feed(self, buf) -> None:
        u8 = _as_bytes(buf)
        n = u8.numel()
        if not self.active or n == 0:
            self.bytes_seen += n
            return
        w = self.width
        start = self.bytes_seen - len(self._carry)  # byte offset (in the tensor) of the first unchecked byte
        self.bytes_seen += n
        if self._carry:
            need = w - len(self._carry)
            head = self._carry + u8[:need].cpu().numpy().tobytes()
            if len(head) < w:
                self._carry = head
                return
            self._check(bytearray(head), start // w)
            u8, start, self._carry = u8[need:], start + w, b""
        whole = (u8.numel() // w) * w
        if whole:
            self._check(u8[:whole], start // w)
        if whole < u8.numel():
            self._carry = u8[whole:].cpu().numpy().tobytes()

    def _check(self, buf, first_element: int) -> None:
        check_chunk(self.dtype, buf, tensor=self.tensor, file=self.file, first_element=first_element,
                    shape=self.shape, scale_of=self.scale_of)

    def finish(self) -> None:
        if self._carry:
            raise ValueError(f"{self.file + ': ' if self.file else ''}{self.tensor}: {self.bytes_seen} bytes is not "
                             f"a whole number of {self.dtype} elements")


__all__ = ["scaled_dtype", "can_be_bad", "find_bad", "check_chunk", "check_tensor", "TensorValueChecker", "NonFiniteValueError",
           "e8m0_limit", "describe", "SCALED_MAX", "CONSERVATIVE_SCALED_MAX", "NEVER_BAD"]


def _bench(mib: int = 64, repeat: int = 5) -> None:
    """`python -m ascend_v4.quant.value_checks`: MB/s of `find_bad` on one thread over clean chunks."""
    import time

    torch.set_num_threads(1)
    n = mib << 20
    g = torch.Generator().manual_seed(0)
    cases = {"BF16": torch.randn(n // 2, generator=g).bfloat16(), "F32": torch.randn(n // 4, generator=g),
             "F8_E4M3": (torch.randn(n, generator=g) * 50).to(torch.float8_e4m3fn),
             "F8_E8M0": torch.randint(100, 140, (n,), dtype=torch.uint8, generator=g)}
    for dtype, t in cases.items():
        raw = bytearray(t.view(torch.uint8).numpy().tobytes())
        best = min(_timed(time.perf_counter, dtype, raw) for _ in range(repeat))
        print(f"{dtype:8s} {mib} MiB chunk: {best * 1e3:6.1f} ms = {n / best / 1e6:6.0f} MB/s (1 thread)")


def _timed(clock, dtype: str, raw: bytearray) -> float:
    t0 = clock()
    assert find_bad(dtype, raw) is None
    return clock() - t0


if __name__ == "__main__":
    _bench()
