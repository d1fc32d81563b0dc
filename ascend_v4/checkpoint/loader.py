"""Load a checkpoint directory into a model built on the `meta` device.

Project rule: the model's `named_parameters()` / `named_buffers()` names are exactly the checkpoint tensor
names (model-spec.md §9.1), so loading is a strict copy with no rename table.

How a tensor is placed: the owning submodule is `model.get_submodule(prefix)`; a parameter is replaced by
`nn.Parameter(t, requires_grad=False)`, a buffer by `module._buffers[leaf] = t` (its persistence is kept).
Every tensor is copied exactly once from the shard's mmap into fresh storage on `device`: safetensors 0.8
returns views of a private file mapping that outlive the handle, but keeping them would pin every shard in
the address space and turn a later truncation of the file into SIGBUS, so we never keep them.

Dtype rule (the target dtype is what the model declared on `meta`):
* BF16 -> bfloat16 or float32 (cast on copy);
* F32 -> any floating dtype the model declares (float32 unless it says otherwise);
* F8_E4M3, F8_E8M0, I64 -> exactly float8_e4m3fn, float8_e8m0fnu, int64 (never converted: FP8 stays packed);
* I8 (packed FP4) -> int8, or float4_e2m1fn_x2 as a bit-for-bit view (same shape `[out, in/2]`);
* shapes must match exactly.

Converted checkpoints (`ascend-v4 quantize`): the reader reports which linears are stored in another tensor
format (`CheckpointInfo.linear_formats`); before matching names, each such module is re-declared on meta with
`module.set_format(format, down=...)` (`ascend_v4.model.layers.Linear`), so the copy stays strict by name.

Value checks (`ascend_v4.quant.value_checks`), on each tensor's checkpoint bytes as it is copied:
* UE8M0 scales (F8_E8M0) always: a NaN byte 0xFF, or a scale that overflows bfloat16 times the largest value
  of the weight it scales (`<base>.scale` scales `<base>.weight`: F8_E4M3 -> 448, I8 = packed FP4 -> 6). They
  are a small fraction of the bytes, already in memory, and a bad one turns a whole block into inf/NaN.
* every float tensor (BF16, F32, F16, F64, FP8 e4m3 / e5m2) only with `check_weights=True`: NaN / inf, FP8
  NaN bytes (about 3 GB/s per core, so a few seconds per 10 GB on top of the read).
All bad tensors are collected and raised together after the copy as one `CheckpointError` whose problems
read `<shard file>: <tensor>: element <i> [<row>, <col>] is nan (BF16)`.
`scan_values` runs the same checks over a checkpoint directory without a model (expert-parallel runs,
where the ranks load their own parts).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import (MTP_PREFIX, TORCH_DTYPES, ProgressBar, TensorEntry, read_checkpoint,
                                         skips_draft)
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.tp import TPShard, slice_dim
from ascend_v4.quant.ascend_v1 import is_shared_copy
from ascend_v4.quant.recipes import is_down_proj
from ascend_v4.quant.errors import SourceReadError
from ascend_v4.quant.st_io import pread_exact
from ascend_v4.quant.value_checks import NonFiniteValueError, can_be_bad, check_chunk, check_tensor, scaled_dtype

_FLOAT_TARGETS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Checkpoint dtype -> model dtypes it may be loaded into (besides its own torch dtype).
ALLOWED_TARGETS: dict[str, tuple[torch.dtype, ...]] = {
    "BF16": (torch.bfloat16, torch.float32),
    "F32": _FLOAT_TARGETS,
    "I8": (torch.int8, torch.float4_e2m1fn_x2),
}
_VIEW_TARGETS = {("I8", torch.float4_e2m1fn_x2)}  # reinterpretations, not conversions
BAD_VALUES = ("NaN / inf values or NaN / overflowing scales (corrupt checkpoint: re-download or re-convert the "
              "files named)")


@dataclass(frozen=True)
class LoadReport:
    tensors: int  # tensors copied into the model
    bytes: int  # bytes read from the checkpoint
    seconds: float
    shards: int
    skipped: int  # checkpoint tensors deliberately not loaded (mtp.* when excluded, `skip` filter, ascendV1 MTP copies)


@dataclass(frozen=True)
class _Target:
    module: nn.Module
    leaf: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]


def _targets(model: nn.Module) -> dict[str, _Target]:
    out: dict[str, _Target] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for leaf, p in mod._parameters.items():
            if p is not None:
                out[dot + leaf] = _Target(mod, leaf, True, p.dtype, tuple(p.shape))
        for leaf, b in mod._buffers.items():
            if b is not None and leaf not in mod._non_persistent_buffers_set:
                out[dot + leaf] = _Target(mod, leaf, False, b.dtype, tuple(b.shape))
    return out


def check_target(ent: TensorEntry, target: _Target) -> str | None:
    """A problem line when checkpoint tensor `ent` cannot be loaded into `target`, else None."""
    if ent.shape != target.shape:
        return f"{ent.file}: {ent.name}: checkpoint shape {list(ent.shape)}, model expects {list(target.shape)}"
    own = TORCH_DTYPES.get(ent.dtype)
    if target.dtype != own and target.dtype not in ALLOWED_TARGETS.get(ent.dtype, ()):
        return f"{ent.file}: {ent.name}: checkpoint dtype {ent.dtype} cannot be loaded into model dtype {target.dtype}"
    return None


def load_checkpoint(model: nn.Module, ckpt_dir: str | Path, *, args: ModelArgs | None = None, progress: bool = False,
                    include_mtp: bool = True, device: torch.device | str = "cpu",
                    skip: Callable[[str], bool] | None = None, check_weights: bool = False,
                    tp: TPShard = TPShard()) -> LoadReport:
    """Fill a `meta`-built model from a checkpoint directory, shard by shard.

    Args:
        model: built under `torch.device("meta")`; names mirror the checkpoint keys.
        ckpt_dir: directory in the official layout (validated first by `read_checkpoint`: headers, sizes,
            the full `expected_tensors(args)` inventory; all problems raised together).
        args: architecture to validate against; default: the directory's `config.json`.
        progress: progress bar on stderr (shard i/N, bytes, tensors, ETA).
        include_mtp: load the draft blocks' `mtp.*` tensors (April MTP blocks or DSpark stages); False loads the
            backbone only. They are skipped too when the config has no draft blocks (`n_draft_layers == 0`).
        device: where the loaded tensors live.
        skip: checkpoint tensor names for which it returns True are not loaded (counted in `skipped`), e.g.
            the routed experts of other ranks under expert parallelism (the model does not declare them).
        check_weights: also check every float tensor for NaN / inf (FP8: NaN bytes); UE8M0 scales are always
            checked (module docstring).
        tp: this rank's place in an attention TP group: the tensors `model.tp.is_tp_split` names are read as
            this rank's slice (only those bytes are read), the shape the model declares telling the size.

    After all shards, a parameter or persistent buffer still on `meta` is an error ("missing from
    checkpoint"); then `model.post_load()` is called when the model defines it.

    Raises:
        CheckpointError: invalid checkpoint, a checkpoint tensor the model lacks, shape/dtype mismatch,
            or a model tensor missing from the checkpoint; a NaN / inf value or a NaN / overflowing scale
            (after loading everything else, all such tensors listed).
    """
    t0 = time.monotonic()
    info = read_checkpoint(ckpt_dir, args=args, include_mtp=include_mtp)
    skip_mtp = skips_draft(info.args, include_mtp)
    where = str(info.path)
    _apply_linear_formats(model, info.linear_formats)
    targets = _targets(model)

    # Check everything we can from headers before copying a byte.
    problems: list[str] = []
    wanted: dict[str, TensorEntry] = {}
    bad: set[str] = set()
    sliced: dict[str, tuple[slice, ...]] = {}  # TP: this rank's part of the tensor
    skipped = 0
    for name, ent in info.tensors.items():
        if (skip_mtp and name.startswith(MTP_PREFIX)) or (skip is not None and skip(name)):
            skipped += 1
            continue
        tgt = targets.get(name)
        if tgt is None and is_shared_copy(name):  # msModelSlim's MTP copies of embed / head: the model shares them
            skipped += 1
            continue
        if tgt is None:
            problems.append(f"{ent.file}: {name}: the model has no parameter or buffer of this name")
            continue
        try:
            dim = slice_dim(name, ent.shape, tgt.shape, tp.size)
        except ValueError as e:
            problems.append(f"{ent.file}: {name}: {e} (attention tensor parallelism {tp.size})")
            bad.add(name)
            continue
        if (p := check_target(ent if dim is None else replace(ent, shape=tgt.shape), tgt)) is not None:
            problems.append(p)
            bad.add(name)
            continue
        wanted[name] = ent
        if dim is not None:
            n = tgt.shape[dim]
            sliced[name] = tuple(slice(tp.rank * n, (tp.rank + 1) * n) if d == dim else slice(None)
                                 for d in range(len(tgt.shape)))
    for name, tgt in targets.items():
        if name not in wanted and name not in bad and _is_meta(tgt):
            why = (" (draft tensors mtp.* are not loaded: include_mtp=False or a config without MTP / DSpark)"
                   if name in info.tensors else "")
            problems.append(f"{name}: missing from checkpoint{why}; the model declares it on meta")
    if problems:
        raise CheckpointError.from_problems(f"{where} (loading into {type(model).__name__})", problems)

    nbytes = {n: e.nbytes // (tp.size if n in sliced else 1) for n, e in wanted.items()}
    total = sum(nbytes.values())
    bar = ProgressBar(total, f"load {info.path.name}") if progress else None
    n_tensors = n_bytes = 0
    bad_values: list[str] = []
    shards = [sh for sh in info.shards if any(n in wanted for n in sh.tensors)]
    with torch.no_grad():
        for i, sh in enumerate(shards):
            names = [n for n in sh.tensors if n in wanted]  # file offset order: sequential reads
            with safe_open(str(sh.path), framework="pt") as f:
                for name in names:
                    tgt = targets[name]
                    src = f.get_slice(name)[sliced[name]] if name in sliced else f.get_tensor(name)
                    ent = wanted[name]
                    if can_be_bad(ent.dtype) and (check_weights or ent.dtype == "F8_E8M0"):
                        try:
                            check_tensor(ent.dtype, src, tensor=name, file=ent.file,
                                         scale_of=scaled_dtype(name, info.tensors))
                        except NonFiniteValueError as e:
                            bad_values.append(str(e))
                    if (info.tensors[name].dtype, tgt.dtype) in _VIEW_TARGETS:
                        src = src.view(tgt.dtype)
                    t = src.to(device=device, dtype=tgt.dtype, copy=True)
                    del src
                    if tgt.is_param:
                        tgt.module._parameters[tgt.leaf] = nn.Parameter(t, requires_grad=False)
                    else:
                        tgt.module._buffers[tgt.leaf] = t
                    n_tensors += 1
                    n_bytes += nbytes[name]
                    if bar:
                        bar.update(nbytes[name], f"shard {i + 1}/{len(shards)}  {n_tensors} tensors")
    if bar:
        bar.close()
    if bad_values:
        raise CheckpointError.from_problems(f"{where}: {BAD_VALUES}", bad_values)

    # Safety net (e.g. a parameter replaced under a name the model did not expose before loading).
    missing = [n for n, tgt in _targets(model).items() if _is_meta(tgt)]
    if missing:
        raise CheckpointError.from_problems(
            f"{where} (loading into {type(model).__name__})",
            [f"{n}: missing from checkpoint (model still has it on meta)" for n in missing])
    post = getattr(model, "post_load", None)
    if callable(post):
        post()
    return LoadReport(n_tensors, n_bytes, time.monotonic() - t0, len(shards), skipped)


def verify_checkpoint_files(ckpt_dir: str | Path) -> None:
    """Re-hash every file of an `ascend-v4 quantize` output against its manifest (`quant.manifest.verify_files`).

    Raises:
        CheckpointError: a file is missing, has another size or another sha256 (each named, expected vs found),
            or the directory has no manifest (nothing to verify: official checkpoints carry no file hashes).
    """
    from ascend_v4.quant.manifest import MANIFEST_NAME, NoManifestError, verify_files

    try:
        problems = verify_files(ckpt_dir)
    except NoManifestError as e:
        raise CheckpointError(f"{e}; checkpoint verification needs a directory written by `ascend-v4 quantize` "
                              f"(to check the values of any checkpoint, use the weight value checks: "
                              f"--check-weights)") from None
    if problems:
        raise CheckpointError.from_problems(f"{ckpt_dir}: files differ from {MANIFEST_NAME} (corrupted or modified "
                                            f"since `ascend-v4 quantize` wrote them)", problems)


SCAN_CHUNK = 64 << 20


def scan_values(ckpt_dir: str | Path, *, weights: bool = True, args: ModelArgs | None = None,
                include_mtp: bool = True, skip: Callable[[str], bool] | None = None,
                progress: bool = False) -> list[str]:
    """The value checks of `load_checkpoint` over a checkpoint directory, without a model: every UE8M0 scale,
    and with `weights` every float tensor, read with `pread` in 64 MiB chunks. Returns one problem line per bad
    tensor (the first bad element of each), empty when all are good. The directory is validated first
    (`read_checkpoint`, raising `CheckpointError`)."""
    info = read_checkpoint(ckpt_dir, args=args, include_mtp=include_mtp)
    skip_mtp = skips_draft(info.args, include_mtp)
    todo = [e for sh in info.shards for e in sh.tensors.values()
            if e.name in info.tensors and can_be_bad(e.dtype) and (weights or e.dtype == "F8_E8M0")
            and not (skip_mtp and e.name.startswith(MTP_PREFIX)) and not (skip is not None and skip(e.name))]
    bar = ProgressBar(sum(e.nbytes for e in todo), f"check {info.path.name}") if progress else None
    view = memoryview(bytearray(SCAN_CHUNK))
    problems: list[str] = []
    fds: dict[str, int] = {}
    try:
        for e in todo:
            if e.file not in fds:
                fds[e.file] = os.open(info.path / e.file, os.O_RDONLY)
            width = TORCH_DTYPES[e.dtype].itemsize
            scale_of = scaled_dtype(e.name, info.tensors)
            pos = e.begin
            while pos < e.end:
                n = min(SCAN_CHUNK, e.end - pos)
                try:
                    chunk = pread_exact(fds[e.file], pos, n, f"{e.file}: {e.name}", into=view)
                except SourceReadError as err:  # truncated or modified since read_checkpoint validated it
                    raise CheckpointError(str(err)) from None
                try:
                    check_chunk(e.dtype, chunk, tensor=e.name, file=e.file, first_element=(pos - e.begin) // width,
                                shape=e.shape, scale_of=scale_of)
                except NonFiniteValueError as err:
                    problems.append(str(err))
                    if bar:
                        bar.update(e.end - pos, e.name)
                    break
                pos += n
                if bar:
                    bar.update(n, e.name)
    finally:
        for fd in fds.values():
            os.close(fd)
        if bar:
            bar.close()
    return problems


def _apply_linear_formats(model: nn.Module, linear_formats: dict[str, str]) -> None:
    """Re-declare the linears a converted checkpoint stores in another format (absent modules are skipped: the
    name check below reports them)."""
    for base, fmt in linear_formats.items():
        try:
            mod = model.get_submodule(base)
        except AttributeError:
            continue
        set_format = getattr(mod, "set_format", None)
        if callable(set_format):
            set_format(fmt, down=is_down_proj(base))


def _is_meta(tgt: _Target) -> bool:
    t = tgt.module._parameters[tgt.leaf] if tgt.is_param else tgt.module._buffers[tgt.leaf]
    return t is not None and t.is_meta


__all__ = ["load_checkpoint", "LoadReport", "ALLOWED_TARGETS", "check_target", "scan_values",
           "verify_checkpoint_files", "BAD_VALUES"]
