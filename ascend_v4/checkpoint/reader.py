"""Read and validate a checkpoint directory in the official Hugging Face layout, from headers only.

Layout (model-spec.md §9.3): `config.json`, `model.safetensors.index.json` (`{"metadata": {"total_size": N},
"weight_map": {tensor: shard}}`) and shards `model-0000i-of-0000N.safetensors`; or a single
`model.safetensors` without index.

A safetensors file is `u64 little-endian header length N`, `N bytes of JSON`, then the data buffer; each
JSON entry is `{"dtype", "shape", "data_offsets": [begin, end]}` relative to the buffer. We parse it
ourselves (not through `safe_open`) so a truncated shard or a header whose offsets run past the end of
the file is reported with the file name before anything is mmapped.

`read_checkpoint` collects *every* problem (structure, then the inventory of
`checkpoint.spec.expected_tensors`) and raises one `CheckpointError` listing them.

Directories written by `ascend-v4 quantize` (`ascend_v4.quant`) are read the same way: their index may be
msModelSlim's `quant_model_weights.safetensors.index.json`, and the stored format of each linear comes from
their manifest (or an msModelSlim `quant_model_description.json`); a conversion that never finished (journal
present, manifest absent) is refused.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.spec import TensorSpec, expected_tensors, official_linears
from ascend_v4.model.args import ModelArgs
from ascend_v4.quant import manifest as quant_manifest

INDEX_NAME = "model.safetensors.index.json"
QUANT_INDEX_NAME = "quant_model_weights.safetensors.index.json"  # msModelSlim ascendV1 outputs
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MTP_PREFIX = "mtp."

# Bits per element of every safetensors dtype (F4 / F6 headers count unpacked values, model-spec.md §16).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# safetensors dtype name -> torch dtype, for the dtypes a V4 checkpoint uses (model-spec.md §8.1).
TORCH_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "BF16": torch.bfloat16,
    "F32": torch.float32, "I64": torch.int64, "F16": torch.float16, "F64": torch.float64, "I32": torch.int32,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2,
}
# A header longer than this is certainly corrupt (the Flash shards' headers are ~200 KB).
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard header describes it. `begin`/`end` are absolute byte offsets in the file."""

    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in data (file offset) order
    broken: frozenset[str] = frozenset()  # names whose header entry was reported as a problem


@dataclass
class CheckpointInfo:
    """A checkpoint directory whose headers were read (and validated, unless asked not to)."""

    path: Path
    args: ModelArgs
    shards: list[ShardHeader]  # in file-name order
    has_index: bool
    tensors: dict[str, TensorEntry] = field(default_factory=dict)  # every tensor listed by index and shard
    # Converted checkpoints: {linear base: ascend_v4.quant tensor format} of linears not in their official format.
    linear_formats: dict[str, str] = field(default_factory=dict)
    conversion: dict | None = None  # the `ascend-v4 quantize` manifest, when there is one

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dummy_tag(self) -> str | None:
        """The `ascend_v4.dummy` metadata written by the dummy writer, or None for a real checkpoint."""
        return self.shards[0].metadata.get("ascend_v4.dummy") if self.shards else None


# ---------------------------------------------------------------------------------------------- headers
def read_safetensors_header(path: str | Path, problems: list[str] | None = None) -> ShardHeader:
    """Parse the header of one safetensors file and check that it describes the file's bytes exactly.

    Problems (truncated file, unparsable JSON, offsets past the end of file, sizes that do not match
    shape x dtype, gaps/overlaps) are appended to `problems`, each naming the file and the tensor; when
    `problems` is None the first one raises `CheckpointError`. Broken entries are left out of the result.
    """
    path = Path(path)
    own = problems is None
    probs: list[str] = [] if own else problems  # type: ignore[assignment]
    n_before = len(probs)
    fname = path.name
    size = path.stat().st_size
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    broken: set[str] = set()

    def done() -> ShardHeader:
        if own and len(probs) > n_before:
            raise CheckpointError.from_problems(str(path), probs)
        return ShardHeader(path, size, metadata, tensors, frozenset(broken))

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            probs.append(f"{fname}: file is {size} bytes, too short for a safetensors header (truncated?)")
            return done()
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(size - 8, MAX_HEADER_BYTES):
            probs.append(f"{fname}: header length {hlen} exceeds the file size {size} (truncated or not safetensors)")
            return done()
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        probs.append(f"{fname}: unreadable safetensors header ({e})")
        return done()

    meta = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    base, buf_size = 8 + hlen, size - 8 - hlen
    spans: list[tuple[int, int, str]] = []
    past: list[tuple[int, str]] = []  # (absolute end, name) of entries running past the end of the file
    for name, ent in header.items():
        where = f"{fname}: {name}"
        broken.add(name)  # until every check below passed
        try:
            dtype, shape = ent["dtype"], tuple(int(x) for x in ent["shape"])
            b, e = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            probs.append(f"{where}: malformed header entry {ent!r}")
            continue
        if dtype not in DTYPE_BITS:
            probs.append(f"{where}: unknown dtype {dtype!r}")
            continue
        want = math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)
        if min(shape, default=0) < 0 or not 0 <= b <= e:
            probs.append(f"{where}: invalid shape {list(shape)} or data_offsets [{b}, {e}]")
            continue
        if e - b != want:
            probs.append(f"{where}: header says {e - b} bytes but {dtype} {list(shape)} needs {want}")
            continue
        if e > buf_size:
            past.append((base + e, name))
            continue
        spans.append((b, e, name))
        broken.discard(name)
        tensors[name] = TensorEntry(name, fname, dtype, shape, base + b, base + e)

    if past:  # one line per file: a truncated shard would otherwise flood the report
        end, name = min(past)
        more = f"; {len(past) - 1} more tensors of this file affected" if len(past) > 1 else ""
        probs.append(f"{fname}: {name}: data ends at byte {end}, past the end of the file ({size} bytes): "
                     f"truncated shard or a header that lies about sizes{more}")

    # safetensors requires the buffer to be covered exactly: no gaps, no overlaps, nothing after the end.
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes"
            probs.append(f"{fname}: {name}: data_offsets [{b}, {e}] {what}")
        pos = max(pos, e)
    if spans and pos < buf_size and len(tensors) == len(header):
        probs.append(f"{fname}: {buf_size - pos} trailing bytes after the last tensor")
    tensors = {name: tensors[name] for _, _, name in spans}
    return done()


# ---------------------------------------------------------------------------------------------- checkpoint
def read_checkpoint(path: str | Path, *, args: ModelArgs | None = None, include_mtp: bool = True,
                    check_spec: bool = True) -> CheckpointInfo:
    """Read config, index and every shard header of a checkpoint directory, and validate them.

    Args:
        path: checkpoint directory.
        args: architecture to validate against; default `ModelArgs.from_dir(path)` (its `ConfigError`
            propagates for a missing, corrupt or non-V4 `config.json`).
        include_mtp: when False, `mtp.*` tensors are neither required nor reported as unexpected. They are
            always ignored when `args.n_mtp_layers == 0` (e.g. DSpark checkpoints, model-spec.md §13.1).
        check_spec: also compare names, shapes and dtypes with `expected_tensors(args)`.

    Raises:
        CheckpointError listing every problem found (file and tensor named in each line).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    if quant_manifest.is_unfinished(root):
        raise CheckpointError(f"{root}: an `ascend-v4 quantize` conversion into this directory did not finish "
                              f"({quant_manifest.JOURNAL_NAME} present, no {quant_manifest.MANIFEST_NAME}); run it "
                              f"again with --resume")
    if args is None:
        args = ModelArgs.from_dir(root)
    problems: list[str] = []
    index_path = root / INDEX_NAME
    if not index_path.is_file() and (root / QUANT_INDEX_NAME).is_file():
        index_path = root / QUANT_INDEX_NAME
    index_name = index_path.name
    weight_map: dict[str, str] = {}
    has_index = index_path.is_file()
    if has_index:
        try:
            index = json.loads(index_path.read_text())
            wm = index["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("weight_map is not a {tensor: file} object")
            weight_map = dict(wm)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({type(e).__name__}: {e})") from e
        files = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).is_file():
        files = [SINGLE_NAME]
    else:
        raise CheckpointError(f"{root}: no {INDEX_NAME} or {SINGLE_NAME}; not a checkpoint directory or an "
                              f"incomplete one (the index is written last)")

    shards: list[ShardHeader] = []
    reported: set[str] = set()  # tensors already named in a problem: not reported again as "missing"
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname in files:
        fpath = root / fname
        if not fpath.is_file():
            names = by_file.get(fname, [])
            problems.append(f"{index_name}: names shard {fname} which does not exist "
                            f"({len(names)} tensors, e.g. {names[0] if names else '?'})")
            reported.update(names)
            continue
        shards.append(read_safetensors_header(fpath, problems))

    tensors: dict[str, TensorEntry] = {}
    for sh in shards:
        for name, ent in sh.tensors.items():
            if has_index and weight_map.get(name) != ent.file:
                where = weight_map.get(name)
                problems.append(f"{ent.file}: {name}: present in the shard but "
                                + (f"the index maps it to {where}" if where else "not listed in the index"))
                reported.add(name)
                continue
            tensors[name] = ent
    reported.update(n for sh in shards for n in sh.broken)
    if has_index:
        in_header = {sh.path.name: set(sh.tensors) | sh.broken for sh in shards}
        for name, fname in weight_map.items():
            if fname in in_header and name not in in_header[fname]:
                problems.append(f"{fname}: {name}: listed in the index but not in the shard")
                reported.add(name)

    official = expected_tensors(args)
    linear_formats = quant_manifest.linear_formats(root, official_linears(official)) \
        if quant_manifest.is_converted(root) else {}
    if check_spec:
        problems += validate_tensors(tensors, expected_tensors(args, linear_formats=linear_formats)
                                     if linear_formats else official, ignore_mtp=not include_mtp
                                     or args.n_mtp_layers == 0, index_name=index_name if has_index else SINGLE_NAME,
                                     already_reported=reported)
    if problems:
        raise CheckpointError.from_problems(str(root), problems)
    return CheckpointInfo(root, args, shards, has_index, tensors, linear_formats,
                          quant_manifest.read_manifest(root))


def validate_tensors(found: dict[str, TensorEntry], expected: dict[str, TensorSpec], *, ignore_mtp: bool = False,
                     index_name: str = INDEX_NAME, already_reported: set[str] | frozenset[str] = frozenset()
                     ) -> list[str]:
    """Compare the tensors found in the headers with the expected inventory; one line per problem.

    Names in `already_reported` (broken header entries, missing shards) are not reported again as missing.
    """
    problems: list[str] = []
    for name, spec in expected.items():
        if (ignore_mtp and name.startswith(MTP_PREFIX)) or name in already_reported:
            continue
        ent = found.get(name)
        if ent is None:
            problems.append(f"{index_name}: {name}: missing (expected {spec.dtype} {list(spec.shape)})")
            continue
        if ent.shape != spec.shape:
            problems.append(f"{ent.file}: {name}: shape {list(ent.shape)}, expected {list(spec.shape)}")
        if ent.dtype != spec.dtype:
            problems.append(f"{ent.file}: {name}: dtype {ent.dtype}, expected {spec.dtype}")
    for name, ent in found.items():
        if name not in expected and not (ignore_mtp and name.startswith(MTP_PREFIX)):
            problems.append(f"{ent.file}: {name}: unexpected tensor ({ent.dtype} {list(ent.shape)})")
    return problems


# ---------------------------------------------------------------------------------------------- progress
class ProgressBar:
    """A one-line progress bar on stderr: `desc  42%  1.2/2.9 GB  310 MB/s  ETA 0:05  <extra>`.

    No dependency; redraws at most every `interval` seconds; `close()` prints the final line and a newline.
    """

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total, self.desc, self.done = max(int(total), 1), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.extra = interval, ""
        self.t0 = self._last = time.monotonic()
        self._width = 0

    def update(self, n: int, extra: str | None = None) -> None:
        self.done += n
        if extra is not None:
            self.extra = extra
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = "--:--" if not math.isfinite(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        line = (f"{self.desc}  {100 * min(self.done / self.total, 1):3.0f}%  {_fmt_bytes(self.done)}/"
                f"{_fmt_bytes(self.total)}  {_fmt_bytes(rate)}/s  ETA {eta_s}  {self.extra}").rstrip()
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = ["TensorEntry", "ShardHeader", "CheckpointInfo", "read_safetensors_header", "read_checkpoint",
           "validate_tensors", "ProgressBar", "INDEX_NAME", "QUANT_INDEX_NAME", "SINGLE_NAME", "CONFIG_NAME",
           "DTYPE_BITS", "TORCH_DTYPES"]
