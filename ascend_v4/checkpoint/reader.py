"""Read and validate a checkpoint directory in the official Hugging Face layout, from headers only.

Layout (model-spec.md §9.3): `config.json`, `model.safetensors.index.json` (`{"metadata": {"total_size": N},
"weight_map": {tensor: shard}}`) and shards `model-0000i-of-0000N.safetensors`; or a single
`model.safetensors` without index.

Shard headers are parsed and checked by `ascend_v4.quant.st_io.parse_header` (the one safetensors module), so a
truncated shard or a header whose offsets run past the end of the file is reported with the file name before
anything is mmapped.

`read_checkpoint` collects *every* problem (structure, then the inventory of
`checkpoint.spec.expected_tensors`) and raises one `CheckpointError` listing them.

Directories written by `ascend-v4 quantize` (`ascend_v4.quant`) are read the same way: their index may be
msModelSlim's `quant_model_weights.safetensors.index.json`, and the stored format of each linear comes from
their manifest (or an msModelSlim `quant_model_description.json`); a conversion that never finished (journal
present, manifest absent) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.spec import TensorSpec, expected_tensors, mtp_copy_names, official_linears
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.placement import DRAFT_PREFIX
from ascend_v4.quant import manifest as quant_manifest
from ascend_v4.quant.progress import ProgressBar
from ascend_v4.quant.st_io import DTYPE_BITS, TORCH_DTYPES, ShardHeader, TensorEntry, parse_header

INDEX_NAME = "model.safetensors.index.json"
QUANT_INDEX_NAME = "quant_model_weights.safetensors.index.json"  # msModelSlim ascendV1 outputs
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MTP_PREFIX = DRAFT_PREFIX  # the draft blocks: April MTP blocks or DSpark stages

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


def skips_draft(args: ModelArgs, include_mtp: bool) -> bool:
    """Whether the `mtp.*` tensors are left alone (not checked, not loaded): asked to (`include_mtp=False`), or the
    config has no draft blocks (neither MTP blocks nor DSpark stages)."""
    return not include_mtp or args.n_draft_layers == 0


# ---------------------------------------------------------------------------------------------- headers
def read_safetensors_header(path: str | Path, problems: list[str] | None = None) -> ShardHeader:
    """`st_io.parse_header` of one file: problems are appended to `problems`, or, when it is None, raised as
    one `CheckpointError` naming the file and each tensor."""
    if problems is not None:
        return parse_header(path, problems)
    own: list[str] = []
    header = parse_header(path, own)
    if own:
        raise CheckpointError.from_problems(str(path), own)
    return header


# ---------------------------------------------------------------------------------------------- checkpoint
def read_checkpoint(path: str | Path, *, args: ModelArgs | None = None, include_mtp: bool = True,
                    check_spec: bool = True) -> CheckpointInfo:
    """Read config, index and every shard header of a checkpoint directory, and validate them.

    Args:
        path: checkpoint directory.
        args: architecture to validate against; default `ModelArgs.from_dir(path)` (its `ConfigError`
            propagates for a missing, corrupt or non-V4 `config.json`).
        include_mtp: when False, the draft blocks' `mtp.*` tensors (April MTP blocks or DSpark stages) are
            neither required nor reported as unexpected (backbone-only). They are also ignored when `args` has no
            draft blocks (`n_draft_layers == 0`); otherwise each is checked like any other tensor.
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
    if check_spec:  # msModelSlim's MTP embedding / head copies (ascendV1): all or none
        copies = quant_manifest.is_converted(root) and any(n in tensors for n in mtp_copy_names(args.n_mtp_layers))
        problems += validate_tensors(tensors, expected_tensors(args, linear_formats=linear_formats,
                                                               shared_copies=copies)
                                     if linear_formats or copies else official,
                                     ignore_mtp=skips_draft(args, include_mtp),
                                     index_name=index_name if has_index else SINGLE_NAME, already_reported=reported)
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


__all__ = ["TensorEntry", "ShardHeader", "CheckpointInfo", "read_safetensors_header", "read_checkpoint",
           "validate_tensors", "skips_draft", "ProgressBar", "INDEX_NAME", "QUANT_INDEX_NAME", "SINGLE_NAME",
           "CONFIG_NAME", "DTYPE_BITS", "TORCH_DTYPES"]
