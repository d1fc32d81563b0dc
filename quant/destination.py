"""The output directory of `ascend-v4 quantize`: what it holds, the progress journal, side files, the manifest.

Crash safety: files are written as `<name>.partial`, fsynced and renamed (`st_io.HashingWriter`); the journal
(`manifest.JOURNAL_NAME`) records each output file's size and sha256 *as soon as that file is complete*, so a
run killed at any point keeps every finished file: `--resume` re-hashes the journaled files and redoes only the
rest. The index, `quant_model_description.json` and finally the manifest are written last; the manifest's
presence means "complete" (`manifest.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import ascend_v1, recipes
from .conversion_plan import CONVERTER_VERSION, OutFile, Plan, SourceCheckpoint, converter_options
from .errors import DestinationConflictError, InsufficientDiskSpaceError, ResumeMismatchError
from .manifest import JOURNAL_NAME, MANIFEST_NAME, MANIFEST_VERSION, read_json
from .st_io import sha256_file, write_json_atomic

SPACE_MARGIN = 64 << 20  # JSON side files, filesystem slack
OWN_SIDE_FILES = (MANIFEST_NAME, JOURNAL_NAME, recipes.DESCRIPTION_NAME) + tuple(
    sorted({s.index for s in recipes.STYLES.values()}))
SOURCE_SKIP = {"model.safetensors.index.json", "config.json", MANIFEST_NAME, JOURNAL_NAME, recipes.DESCRIPTION_NAME}


def own_files(out: Path) -> list[Path]:
    pats = ["*.safetensors", "*.partial"]
    found = {p for pat in pats for p in out.glob(pat)}
    found |= {out / n for n in OWN_SIDE_FILES if (out / n).exists()}
    return sorted(found)


def prepare_destination(out: Path, key: str, resume: bool, force: bool) -> tuple[str, dict]:
    """Decide what to do with `out`: ("fresh" | "resume" | "complete", journal files)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_json(out / MANIFEST_NAME)
    journal = read_json(out / JOURNAL_NAME)
    if force:
        return "fresh", {}
    if isinstance(manifest, dict):
        if manifest.get("key") == key:
            return ("resume", {f["name"]: f for f in manifest.get("files", [])}) if resume else ("complete", {})
        raise DestinationConflictError(
            f"{out} holds a different conversion ({manifest.get('format')!r} of "
            f"{manifest.get('source', {}).get('path', '?')}); pass --force to replace it")
    if isinstance(journal, dict):
        if journal.get("key") != key:
            raise ResumeMismatchError(
                f"{out} holds an unfinished conversion with another source or other arguments "
                f"({journal.get('format')!r}); pass --force to discard it")
        if not resume:
            raise DestinationConflictError(f"{out} holds an unfinished conversion of this checkpoint; pass --resume "
                                           f"to continue it or --force to start over")
        return "resume", dict(journal.get("files", {}))
    others = [p.name for p in out.iterdir()]
    if others:
        raise DestinationConflictError(f"{out} is not empty ({', '.join(sorted(others)[:5])}"
                                       f"{', ...' if len(others) > 5 else ''}) and holds no conversion; choose an "
                                       f"empty directory or pass --force (replaces *.safetensors and index files)")
    return "fresh", {}


def check_space(out: Path, need: int, reclaim: int) -> None:
    free = shutil.disk_usage(out).free
    if need + SPACE_MARGIN > free + reclaim:
        raise InsufficientDiskSpaceError(
            f"{out}: the conversion needs {need / 1e9:.2f} GB more but only {(free + reclaim) / 1e9:.2f} GB are "
            f"free (incl. {reclaim / 1e9:.2f} GB of files it replaces); nothing was written")


def write_side_files(src: SourceCheckpoint, out: Path, output_format: str, mindie: bool = False) -> None:
    """config.json (adjusted: `ascend_v1.adjust_config`) and the small top-level files of the source (tokenizer,
    generation config...)."""
    cfg = json.loads((Path(src.path) / "config.json").read_text())
    write_json_atomic(out / "config.json", ascend_v1.adjust_config(cfg, output_format, mindie=mindie))
    shard_names = {Path(sh.path).name for sh in src.shards}
    for p in sorted(Path(src.path).iterdir()):
        if not p.is_file() or p.name in SOURCE_SKIP or p.name in shard_names or p.suffix in (".safetensors",) \
                or p.name.endswith(".partial"):
            continue
        tmp = out / (p.name + ".partial")
        shutil.copyfile(p, tmp)
        os.replace(tmp, out / p.name)

class Journal:
    """The progress journal of a running conversion: `record` adds one finished (fsynced, renamed) output file
    and rewrites the journal atomically at once, from any worker thread."""

    def __init__(self, out: Path, key: str, output_format: str, ep: int | None, files: dict[str, dict],
                 fsync: bool) -> None:
        self.path, self.fsync = out / JOURNAL_NAME, fsync
        self.data = {"key": key, "format": output_format, "ep": ep, "files": dict(files)}
        self.lock = threading.Lock()

    @property
    def files(self) -> dict[str, dict]:
        return self.data["files"]

    def save(self) -> None:
        with self.lock:
            write_json_atomic(self.path, self.data, self.fsync)

    def record(self, name: str, nbytes: int, sha256: str) -> None:
        with self.lock:
            self.files[name] = {"name": name, "bytes": nbytes, "sha256": sha256}
            write_json_atomic(self.path, self.data, self.fsync)


def verified_files(out: Path, planned: list[OutFile], previous: dict[str, dict], workers: int) -> dict[str, dict]:
    """The planned files an earlier run finished: listed in its journal / manifest with this size, present with
    that size, and with that sha256 when re-hashed now."""
    cands = [f for f in planned if (rec := previous.get(f.name)) and (out / f.name).is_file()
             and (out / f.name).stat().st_size == rec.get("bytes") == f.size]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # sha256 releases the GIL
        digests = list(pool.map(lambda f: sha256_file(out / f.name), cands))
    return {f.name: {"name": f.name, "bytes": f.size, "sha256": sha} for f, sha in zip(cands, digests)
            if sha == previous[f.name].get("sha256")}


def manifest_for(plan: Plan, key: str, identity: dict, root: Path, files: list[dict], index: str) -> dict:
    by_name = {f.name: f for f in plan.files}
    ep_layout = None
    if plan.ep is not None:
        per = plan.n_routed_experts // plan.ep
        ep_layout = {"world": plan.ep, "experts_per_rank": per,
                     "shared_files": [f.name for f in plan.files if f.rank is None],
                     "ranks": [{"rank": r, "experts": [r * per, (r + 1) * per],
                                "files": [f.name for f in plan.files if f.rank == r]} for r in range(plan.ep)]}
    return {
        "manifest_version": MANIFEST_VERSION,
        "tool": "ascend-v4 quantize",
        "converter_version": CONVERTER_VERSION,
        "key": key,
        "format": plan.output_format,
        "ep": plan.ep,
        "n_routed_experts": plan.n_routed_experts,
        "options": converter_options(),
        "source": {"path": str(root.resolve()), **identity},
        "index": index,
        "description": recipes.DESCRIPTION_NAME if plan.description is not None else None,
        "tensors": plan.n_tensors,
        "total_bytes": sum(f["bytes"] for f in files),
        "files": [{**f, "tensors": sum(len(u.outputs) for u in by_name[f["name"]].units),
                   "rank": by_name[f["name"]].rank} for f in files],
        "ep_layout": ep_layout,
    }


__all__ = ["Journal", "verified_files", "prepare_destination", "check_space", "write_side_files", "own_files",
           "manifest_for", "OWN_SIDE_FILES", "SPACE_MARGIN"]
