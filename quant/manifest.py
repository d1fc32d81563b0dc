"""The manifest of a converted checkpoint, the progress journal of an unfinished one, and what loaders need.

Files `ascend-v4 quantize` leaves in the output directory:

* `ascend_v4_manifest.json` - written **last**; its presence means "complete". Holds the output format, the
  `--ep` layout, the converter version and options, the source checkpoint's identity (sha256 of config.json and
  of the index, and per shard its name, size and header sha256: the header fixes every tensor's name, dtype,
  shape and offsets, so any other checkpoint has another identity without hashing hundreds of GB), and every
  output file with its size and sha256. Deterministic (no timestamps): an interrupted-and-resumed run writes
  the same manifest as an uninterrupted one.
* `.ascend_v4_quantize.journal.json` - exists while a conversion is running or after it crashed: the
  conversion key and each output file finished so far (size, sha256). `--resume` continues from it; readers
  refuse a directory holding it without a manifest.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import recipes

MANIFEST_NAME = "ascend_v4_manifest.json"
JOURNAL_NAME = ".ascend_v4_quantize.journal.json"
MANIFEST_VERSION = 1
# ascendV1 quant type -> tensor format (third-party msModelSlim checkpoints without our manifest).
FORMAT_OF_QUANT_TYPE = {"W8A8_DYNAMIC": "int8_channel", "W4A8_DYNAMIC": "int4_channel", "FLOAT": "bf16"}


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of a complete conversion, or None (no manifest, or not one of ours)."""
    m = read_json(Path(root) / MANIFEST_NAME)
    return m if isinstance(m, dict) and m.get("manifest_version") == MANIFEST_VERSION else None


def is_unfinished(root: str | Path) -> bool:
    """A conversion was started here and never completed (journal present, manifest absent)."""
    root = Path(root)
    return (root / JOURNAL_NAME).is_file() and not (root / MANIFEST_NAME).is_file()


def is_converted(root: str | Path) -> bool:
    """The directory holds our manifest or an msModelSlim description (its linears may not be FP8/FP4)."""
    root = Path(root)
    return (root / MANIFEST_NAME).is_file() or (root / recipes.DESCRIPTION_NAME).is_file()


# ---------------------------------------------------------------------------------------------- source identity
def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(n)).hexdigest()


def source_identity(root: Path, shard_files: list[Path], index: Path | None) -> dict:
    """What identifies a source checkpoint without reading its data (see module docstring)."""
    return {
        "config_sha256": file_sha256(root / "config.json"),
        "index_sha256": file_sha256(index) if index is not None and index.is_file() else None,
        "shards": [{"name": p.name, "bytes": p.stat().st_size, "header_sha256": header_sha256(p)}
                   for p in shard_files],
    }


def conversion_key(identity: dict, output_format: str, ep: int | None, options: dict, converter_version: int) -> str:
    blob = json.dumps({"manifest_version": MANIFEST_VERSION, "converter_version": converter_version,
                       "format": output_format, "ep": ep, "options": options, "source": identity},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- file hashes
class NoManifestError(FileNotFoundError):
    """`verify_files` on a directory without our manifest: there are no recorded hashes to check against."""


def verify_files(root: str | Path, *, workers: int = 4,
                 on_file: Callable[[str, int], None] | None = None) -> list[str]:
    """Re-hash every output file the manifest of the complete conversion in `root` lists (name, bytes, sha256).

    Returns one problem line per bad file, naming it: missing, a size other than the manifest's (not hashed
    then), or another sha256 (expected vs found); an empty list when every file matches. Files are hashed in
    `workers` threads (sha256 releases the GIL); `on_file(name, nbytes)` is called as each one is done.

    Raises:
        NoManifestError: `root` has no `ascend_v4_manifest.json` of ours (an official checkpoint, an unfinished
            conversion, another tool's output): nothing to verify.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .st_io import sha256_file

    root = Path(root)
    m = read_manifest(root)
    if m is None or not isinstance(m.get("files"), list):
        why = "an unreadable or foreign" if (root / MANIFEST_NAME).exists() else "no"
        raise NoManifestError(f"{root}: nothing to verify: {why} {MANIFEST_NAME} (only `ascend-v4 quantize` outputs "
                              f"record file hashes)")

    def check(f: dict) -> str | None:
        name = str(f.get("name"))
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name}: missing (the manifest lists it with {f.get('bytes')} bytes)"
        try:
            if size != f.get("bytes"):
                return f"{name}: {size} bytes, the manifest says {f.get('bytes')} (sha256 not computed)"
            digest = sha256_file(path)
        except OSError as e:
            return f"{name}: cannot be read: {e.strerror or e}"
        finally:
            if on_file is not None:
                on_file(name, size)
        if digest != f.get("sha256"):
            return f"{name}: sha256 {digest}, the manifest says {f.get('sha256')} (same size, {size} bytes)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for p in pool.map(check, m["files"]) if p is not None]


# ---------------------------------------------------------------------------------------------- loading
def linear_formats(root: str | Path, official: dict[str, str]) -> dict[str, str]:
    """Stored tensor format of each official linear (`{base: format}`, only those that differ from `official`)
    of a converted directory: from our manifest's output format, else from an msModelSlim
    `quant_model_description.json`. Empty for an official checkpoint.

    Args:
        official: {linear base: its official format} (`fp8_block` / `fp4_mx`) for the model's architecture.
    """
    root = Path(root)
    m = read_manifest(root)
    out: dict[str, str] = {}
    if m is not None:
        for base, src in official.items():
            dst = recipes.target_format(m["format"], base)
            if dst is not None and dst != src:
                out[base] = dst
        return out
    desc = read_json(root / recipes.DESCRIPTION_NAME)
    if isinstance(desc, dict):
        for base, src in official.items():
            qt = desc.get(f"{base}.weight")
            fmt = FORMAT_OF_QUANT_TYPE.get(qt) if isinstance(qt, str) else None
            if fmt is not None and fmt != src:
                out[base] = fmt
    return out


@dataclass(frozen=True)
class RankFiles:
    """What one expert-parallel rank of a converted checkpoint has to read."""

    rank: int
    world: int
    experts: range  # routed experts this rank owns: [rank * E / world, (rank + 1) * E / world)
    files: list[str]  # files holding its tensors (shared ones and its own expert files), sorted
    tensors: list[str] = field(repr=False, default_factory=list)  # every tensor name it needs


def load_rank_experts(root: str | Path, rank: int, world: int) -> RankFiles:
    """Files and tensors rank `rank` of `world` expert-parallel ranks needs from a converted checkpoint.

    Rank r owns routed experts [r*E/world, (r+1)*E/world) and needs every non-expert tensor. When the
    checkpoint was written with `--ep world`, that is exactly the shared files plus its own `-ep<r>` files;
    with another split (or none) the selection still holds, only less tightly.

    Raises:
        ValueError: not a complete conversion, or `world` does not divide the number of routed experts.
    """
    root = Path(root)
    m = read_manifest(root)
    if m is None:
        raise ValueError(f"{root}: no {MANIFEST_NAME}: not a complete `ascend-v4 quantize` output")
    n_exp = int(m["n_routed_experts"])
    if world < 1 or n_exp % world or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}: the world size must divide the {n_exp} routed experts")
    per = n_exp // world
    own = range(rank * per, (rank + 1) * per)
    weight_map: dict[str, str] = json.loads((root / m["index"]).read_text())["weight_map"]
    tensors = [n for n in weight_map if (e := recipes.expert_id(n)) is None or e in own]
    return RankFiles(rank, world, own, sorted({weight_map[n] for n in tensors}), tensors)


__all__ = ["MANIFEST_NAME", "JOURNAL_NAME", "read_manifest", "is_unfinished", "linear_formats", "load_rank_experts",
           "RankFiles", "source_identity", "conversion_key", "is_converted", "verify_files", "NoManifestError"]
