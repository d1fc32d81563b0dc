#!/usr/bin/env python3
"""`ascend-v4 quantize` (default w8a8) against plain file I/O of the same bytes, in the same run.

The source is a dummy checkpoint of a preset (default `small`, ~334 MB, official layout) written once with
`--shard-mb` shards (default 64 MB; a tensor larger than that gets a shard of its own) and cached under
`--work-dir`. Each repeat times, on the same filesystem:

  * quantize: `quantize(read_checkpoint(src), out, fmt, workers=K, read_baseline="off", force=True)` (fsync on,
    as the CLI runs it), the whole call, into an emptied output directory, with the source's pages dropped from
    the page cache first (posix_fadvise DONTNEED, as `quant/tool.py`'s raw-read baseline does);
  * peer: a cold sequential read of the source bytes the converter reads, each byte once (per shard, the span
    of its tensors; `measure_raw_read` of quant/tool.py, which drops the pages first), plus writing the same
    number of output bytes with plain `write()` calls, in files of the same sizes as the converter's output
    shards, each fsynced (then the directory once). The converter's "MB in" counts a tensor it copies twice
    (ascendV1's MTP copies of the embedding and head) twice; the peer reads it once.

Dirty pages are flushed (`os.sync()`) before every timed step, outside the timing. Quantize and peer alternate
(Q P, P Q, Q P, ...), so slow drift of the machine's load hits both; medians are reported. The ratio is
peer time / quantize time: the converter's speed as a fraction of plain I/O (target >= 0.8).

    python tools/bench_quantize.py --work-dir /tmp/bench_quantize --workers 2 --repeat 5 [--json]

Progress goes to stderr; the summary (or one JSON object with --json) to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from ascend_v4.quant.raw_read import evict, measure_raw_read  # the converter's own cold-read baseline

WRITE_CHUNK = 16 << 20


def log(msg: str) -> None:
    print(f"[bench_quantize {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- source
def ensure_source(work: Path, preset: str, shard_mb: int, seed: int = 0) -> Path:
    """The cached dummy checkpoint (built in a temporary sibling and renamed when complete)."""
    from ascend_v4.checkpoint.dummy import dummy_tag, write_dummy_checkpoint
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.model.args import ConfigError, ModelArgs

    src = work / f"src-{preset}-{shard_mb}m-seed{seed}"
    if (src / "model.safetensors.index.json").is_file():
        try:
            if read_checkpoint(src).dummy_tag == dummy_tag(seed):
                log(f"reusing {src}")
                return src
        except (CheckpointError, ConfigError, OSError) as e:  # stale (older spec) or broken cache entry: rebuild
            log(f"{src} unusable ({type(e).__name__}: {e}); rebuilding")
    tmp = work / f".{src.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    write_dummy_checkpoint(ModelArgs.from_preset(preset), tmp, seed=seed, shard_bytes=shard_mb << 20)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    log(f"wrote {src} in {time.perf_counter() - t0:.1f} s")
    return src


def read_ranges(info) -> list[tuple[Path, int, int]]:
    """Per source shard, the (path, first tensor byte, last tensor byte) span the converter reads."""
    spans: dict[str, list[int]] = {}
    for t in info.tensors.values():
        s = spans.setdefault(t.file, [t.begin, t.end])
        s[0], s[1] = min(s[0], t.begin), max(s[1], t.end)
    return [(Path(info.path) / name, b, e) for name, (b, e) in sorted(spans.items())]


# ---------------------------------------------------------------------------------------------- the two sides
def run_quantize(src: Path, out: Path, fmt: str, workers: int) -> dict:
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.quant.tool import quantize

    shutil.rmtree(out, ignore_errors=True)
    info = read_checkpoint(src)
    evict([Path(sh.path) for sh in info.shards])
    os.sync()
    t0 = time.perf_counter()
    r = quantize(info, out, fmt, workers=workers, read_baseline="off", force=True)
    wall = time.perf_counter() - t0
    files = sorted(out.glob("*.safetensors"))
    return {"seconds": wall, "convert_seconds": r.seconds, "input_bytes": r.input_bytes,
            "output_bytes": r.output_bytes, "files": len(files), "file_sizes": [p.stat().st_size for p in files],
            "thread_seconds": dict(r.thread_seconds), "peak_rss_bytes": r.peak_rss_bytes}


def run_peer(ranges: list[tuple[Path, int, int]], out: Path, file_sizes: list[int], payload: memoryview) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    nread, read_s = measure_raw_read(ranges, None)  # drops the source pages before (and after)
    os.sync()
    t0 = time.perf_counter()
    for i, size in enumerate(file_sizes):
        fd = os.open(out / f"peer-{i:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left:
                left -= os.write(fd, payload[:min(left, len(payload))])
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    write_s = time.perf_counter() - t0
    return {"seconds": read_s + write_s, "read_seconds": read_s, "write_seconds": write_s, "read_bytes": nread,
            "write_bytes": sum(file_sizes)}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_quantize"),
                    help="cached dummy source, output and peer files (all on this filesystem)")
    ap.add_argument("--model", default="small", help="dummy preset")
    ap.add_argument("--shard-mb", type=int, default=64, help="source shard size (MiB)")
    ap.add_argument("--format", default="w8a8")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="quantize / peer pairs (order alternates)")
    ap.add_argument("--keep", action="store_true", help="keep the last output and peer files")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from ascend_v4.checkpoint.reader import read_checkpoint

    a.work_dir.mkdir(parents=True, exist_ok=True)
    src = ensure_source(a.work_dir, a.model, a.shard_mb)
    ranges = read_ranges(read_checkpoint(src))
    out, peer_out = a.work_dir / f"out-{a.format}", a.work_dir / "peer-out"
    payload = memoryview(bytearray(os.urandom(WRITE_CHUNK)))  # incompressible, written over and over

    q_runs, p_runs = [], []
    for i in range(a.repeat):
        order = ("q", "p") if i % 2 == 0 else ("p", "q")
        for side in order:
            if side == "q":
                q = run_quantize(src, out, a.format, a.workers)
                q_runs.append(q)
                ts = q["thread_seconds"]
                tot = sum(ts.values()) or 1.0
                log(f"repeat {i + 1}/{a.repeat}: quantize {q['seconds']:.2f} s (conversion phase "
                    f"{q['convert_seconds']:.2f} s; {q['input_bytes'] / 1e6:.0f} MB -> {q['output_bytes'] / 1e6:.0f} "
                    f"MB in {q['files']} files; worker time "
                    + ", ".join(f"{k} {v:.2f} s ({100 * v / tot:.0f}%)" for k, v in ts.items()) + ")")
            else:
                p = run_peer(ranges, peer_out, q_runs[-1]["file_sizes"], payload)  # repeat 1 runs quantize first
                p_runs.append(p)
                log(f"repeat {i + 1}/{a.repeat}: peer {p['seconds']:.2f} s (cold read {p['read_bytes'] / 1e6:.0f} MB "
                    f"{p['read_seconds']:.2f} s, write+fsync {p['write_bytes'] / 1e6:.0f} MB {p['write_seconds']:.2f} s)")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(peer_out, ignore_errors=True)

    # Floor of the converter's own per-byte CPU work that plain I/O does not do: sha256 of every output byte.
    t0 = time.perf_counter()
    h = hashlib.sha256()
    left = q_runs[-1]["output_bytes"]
    while left:
        h.update(payload[:min(left, len(payload))])
        left -= min(left, len(payload))
    sha_s = time.perf_counter() - t0

    def med(rows: list[dict], k: str) -> float:
        return statistics.median(r[k] for r in rows)

    pair_ratios = [p["seconds"] / q["seconds"] for q, p in zip(q_runs, p_runs)]
    q_s, p_s = med(q_runs, "seconds"), med(p_runs, "seconds")
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(), "source": str(src), "format": a.format, "workers": a.workers,
        "repeat": a.repeat, "input_bytes": q_runs[-1]["input_bytes"], "output_bytes": q_runs[-1]["output_bytes"],
        "output_files": q_runs[-1]["files"],
        "quantize_s": q_s, "quantize_convert_phase_s": med(q_runs, "convert_seconds"),
        "peer_s": p_s, "peer_read_s": med(p_runs, "read_seconds"), "peer_write_s": med(p_runs, "write_seconds"),
        "ratio": p_s / q_s, "ratio_pairs_median": statistics.median(pair_ratios),
        "peer_read_bytes": p_runs[-1]["read_bytes"], "sha256_output_s": sha_s,
        "thread_seconds": {k: statistics.median(r["thread_seconds"][k] for r in q_runs)
                           for k in q_runs[-1]["thread_seconds"]},
        "peak_rss_MiB": max(r["peak_rss_bytes"] for r in q_runs) / 2 ** 20,
        "runs": {"quantize": [{k: v for k, v in r.items() if k != "file_sizes"} for r in q_runs], "peer": p_runs},
    }
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        mb = 1e6
        print(f"{a.format}, {a.workers} workers, {a.repeat} pairs, {res['cpus']} CPUs, load {res['loadavg'][0]:.1f}: "
              f"{res['input_bytes'] / mb:.0f} MB in -> {res['output_bytes'] / mb:.0f} MB out "
              f"({res['output_files']} files)")
        print(f"quantize  {q_s:6.2f} s  (conversion phase {res['quantize_convert_phase_s']:.2f} s; "
              f"{res['input_bytes'] / q_s / mb:.0f} MB/s of input)")
        print(f"peer      {p_s:6.2f} s  (cold read of {res['peer_read_bytes'] / mb:.0f} MB {res['peer_read_s']:.2f} s + "
              f"write/fsync {res['peer_write_s']:.2f} s)")
        print(f"ratio     {res['ratio']:6.2f}    (peer / quantize; median of per-pair ratios "
              f"{res['ratio_pairs_median']:.2f}; target >= 0.8)")
        tot = sum(res["thread_seconds"].values()) or 1.0
        print("worker time " + ", ".join(f"{k} {v:.2f} s ({100 * v / tot:.0f}%)"
                                          for k, v in res["thread_seconds"].items()))
        print(f"sha256 of {res['output_bytes'] / mb:.0f} MB in memory, 1 thread: {sha_s:.2f} s (the converter hashes "
              f"every output byte; plain I/O does not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
