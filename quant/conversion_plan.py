"""What `ascend-v4 quantize` converts: the plan, made before a byte is written.

Every source tensor becomes a *unit* - a byte copy, or a linear (`.weight` + `.scale`) converted to the target
tensor format of its role (`recipes.py`). Units go to one output file per (source shard, EP rank): the source
shard of a unit is that of its weight, its rank that of its routed expert under `--ep N` (shared tensors: no
rank). Output shapes, dtypes, headers and sizes are all known up front, so free disk space is checked before
writing and each file is written header first, then tensor by tensor (`writer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ascend_v4.quant import get_format

from . import ascend_v1, recipes
from .errors import UnsupportedConversionError
from .formats.base import TensorLayout
from .formats.int4_channel import CLIP_GRID
from .st_io import build_header, order_for_writing
from .value_checks import scaled_dtype

CONVERTER_VERSION = 2  # 2: ascendV1 outputs carry msModelSlim's MTP copies and description header
FLOAT = "FLOAT"


class SourceTensor(Protocol):
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SourceShard(Protocol):
    path: Path
    tensors: dict[str, SourceTensor]


class SourceCheckpoint(Protocol):
    """What the converter needs from a validated checkpoint (`ascend_v4.checkpoint.reader.CheckpointInfo`)."""

    path: Path
    shards: list[SourceShard]
    tensors: dict[str, SourceTensor]
    has_index: bool
    args: Any  # ModelArgs: n_routed_experts is read



@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Unit:
    """One step of the conversion: a byte copy of `src[0]`, or a linear converted from `src_fmt` to `dst_fmt`."""

    name: str  # tensor name (copy) or linear base name (linear)
    src: list[SourceTensor]  # copy: [tensor]; linear: [weight, scale]
    outputs: list[OutTensor]
    src_fmt: str | None = None
    dst_fmt: str | None = None
    down: bool = False
    scale_of: str | None = None  # a copied UE8M0 scale: dtype of the weight it scales (value checks)
    duplicate: bool = False  # a second copy of a tensor another unit of the plan copies too (values checked there)

    @property
    def is_copy(self) -> bool:
        return self.dst_fmt is None

    @property
    def src_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.src)


@dataclass
class OutFile:
    name: str
    rank: int | None
    units: list[Unit] = field(default_factory=list)
    order: list[OutTensor] = field(default_factory=list)  # on-disk order
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.order)

    @property
    def src_bytes(self) -> int:
        return sum(u.src_bytes for u in self.units)


@dataclass
class Plan:
    output_format: str
    ep: int | None
    n_routed_experts: int
    files: list[OutFile]
    description: dict[str, Any] | None  # ascendV1 quant_model_description.json, or None
    weight_map: dict[str, str]
    n_tensors: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.order)


def _linear_src_format(weight: SourceTensor) -> str:
    return {"F8_E4M3": "fp8_block", "I8": "fp4_mx", "BF16": "bf16"}[weight.dtype]


def _out_in(src_fmt: str, weight: SourceTensor) -> tuple[int, int]:
    o, i = weight.shape
    return (o, 2 * i) if src_fmt == "fp4_mx" else (o, i)


def _outs(base: str, layout: dict[str, TensorLayout]) -> list[OutTensor]:
    return [OutTensor(f"{base}.{sfx}", lay.st_dtype, lay.shape, lay.nbytes) for sfx, lay in layout.items()]


def plan_units(src: SourceCheckpoint, output_format: str) -> list[tuple[Unit, SourceTensor]]:
    """Every unit with its primary source tensor (which decides its output file), in source order."""
    tensors = src.tensors
    units: list[tuple[Unit, SourceTensor]] = []
    done: set[str] = set()
    for sh in src.shards:
        for name, ent in sh.tensors.items():  # file offset order
            if name in done or name not in tensors:
                continue
            base, _, leaf = name.rpartition(".")
            if leaf in ("weight", "scale") and f"{base}.scale" in tensors and f"{base}.weight" in tensors:
                w, s = tensors[f"{base}.weight"], tensors[f"{base}.scale"]
                src_fmt = _linear_src_format(w)
                dst = recipes.target_format(output_format, base)
                if dst is not None and dst != src_fmt:
                    down = recipes.is_down_proj(base)
                    o, i = _out_in(src_fmt, w)
                    units.append((Unit(base, [w, s], _outs(base, get_format(dst).layout(o, i, down)), src_fmt, dst,
                                       down), w))
                    done.update((w.name, s.name))
                    continue
            units.append((Unit(name, [ent], [OutTensor(name, ent.dtype, tuple(ent.shape), ent.end - ent.begin)],
                               scale_of=scaled_dtype(name, tensors)), ent))
            done.add(name)
    return units


def make_plan(src: SourceCheckpoint, output_format: str, ep: int | None) -> Plan:
    if output_format not in recipes.OUTPUT_FORMATS:
        raise UnsupportedConversionError(f"unknown format {output_format!r}; "
                                         f"one of {', '.join(recipes.OUTPUT_FORMATS)}")
    n_exp = int(src.args.n_routed_experts)
    if ep is not None and (ep < 1 or n_exp % ep):
        raise UnsupportedConversionError(f"--ep {ep} must divide the {n_exp} routed experts")
    style = recipes.STYLES[output_format]
    shard_idx = {sh.path.name: i for i, sh in enumerate(src.shards)}
    n_shards = len(src.shards)
    files: dict[tuple[int, int | None], OutFile] = {}
    units = plan_units(src, output_format)
    if style.ascend_v1:  # msModelSlim's MTP copies of the main embedding and head (byte copies; none for DSpark)
        units += [(Unit(dst, [ent], [OutTensor(dst, ent.dtype, tuple(ent.shape), ent.nbytes)], duplicate=True), ent)
                  for dst, name in ascend_v1.shared_copies(src.tensors, src.args.n_mtp_layers)
                  for ent in (src.tensors[name],)]
    for unit, primary in units:
        i = shard_idx[primary.file]
        e = recipes.expert_id(unit.outputs[0].name)
        rank = None if ep is None or e is None else e // (n_exp // ep)
        key = (i, rank)
        if key not in files:
            stem = f"{style.stem}-{i + 1:05d}-of-{n_shards:05d}"
            name = f"{stem}.safetensors" if rank is None else f"{stem}-ep{rank:03d}-of-{ep:03d}.safetensors"
            files[key] = OutFile(name, rank)
        files[key].units.append(unit)

    meta = {"format": "pt", "ascend_v4.quantize": f"{output_format} v{CONVERTER_VERSION}"}
    weight_map: dict[str, str] = {}
    quant_types: dict[str, str] = {}
    for f in files.values():
        outs = [t for u in f.units for t in u.outputs]
        f.order = [outs[j] for j in order_for_writing([(t.name, t.dtype, t.nbytes) for t in outs])]
        f.header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in f.order], meta)
        for u in f.units:
            qt = get_format(u.dst_fmt).quant_type if u.dst_fmt else FLOAT
            for t in u.outputs:
                weight_map[t.name] = f.name
                quant_types[t.name] = qt
    description = ascend_v1.description(quant_types, output_format) if style.ascend_v1 else None
    ordered = sorted(files.values(), key=lambda f: f.name)
    return Plan(output_format, ep, n_exp, ordered, description, dict(sorted(weight_map.items())), len(weight_map))


def converter_options() -> dict:
    """Options that change output bytes (part of the conversion key)."""
    return {"int4_clip_grid": [float(a) for a in CLIP_GRID]}


__all__ = ["SourceTensor", "SourceShard", "SourceCheckpoint", "OutTensor", "Unit", "OutFile", "Plan", "plan_units",
           "make_plan", "converter_options", "CONVERTER_VERSION", "FLOAT"]
