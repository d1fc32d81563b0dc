"""Stress `ascend-v4 quantize` on a multi-GB dummy checkpoint with a real-shaped layer subset (not for CI).

The model is V4-Flash with only `--layers` main layers (CSA, then HCA, ...) plus its MTP block: every tensor
has the real Flash shape (256 experts of 2048 x 4096, vocab 129280, ...), so shards, tensor sizes and the
converter's per-tensor working set are those of the real 160 GB conversion; only the number of layers differs.
Shards are written at the official size (~3.5 GB) so the memory bound "peak RSS <= about 2 input shards" is
meaningful.

Each format is converted by a separate `ascend-v4 quantize` process (so its peak RSS is its own), with the raw
read baseline of the same bytes; the summary lines it prints are collected into a table. Outputs are deleted
after each format unless --keep (a bf16 output is ~3.5x the input).

    python tools/quantize_stress.py --root /tmp/qstress --layers 1 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

FORMATS = ("native", "fp8-experts", "w8a8", "w4a8", "bf16")


def write_source(root: Path, layers: int, shard_bytes: int, seed: int) -> Path:
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.model.args import ModelArgs

    src = root / f"flash-{layers}l"
    flash = ModelArgs.from_preset("flash").to_hf_config()
    cfg = dict(flash, num_hidden_layers=layers, compress_ratios=[(4, 128)[i % 2] for i in range(layers)] + [0])
    args = ModelArgs.from_hf_config(cfg, name=f"flash-{layers}l")
    try:
        read_checkpoint(src)
        print(f"reusing {src}", flush=True)
    except Exception:
        # In a child process: keeps this parent small (a child's getrusage peak would include the parent's).
        import multiprocessing as mp

        t0 = time.time()
        p = mp.get_context("spawn").Process(target=write_dummy_checkpoint, args=(args, src),
                                            kwargs=dict(seed=seed, shard_bytes=shard_bytes, progress=True))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"dummy writer failed ({p.exitcode})")
        print(f"wrote {src} in {time.time() - t0:.0f} s", flush=True)
    return src


def run_format(src: Path, out: Path, fmt: str, workers: int, verify: bool) -> dict:
    cmd = ["ascend-v4", "quantize", "-m", str(src), "-o", str(out), "-f", fmt, "-j", str(workers), "--force",
           "--read-baseline", "full"] + (["--verify"] if verify else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"{fmt} failed:\n{r.stdout}\n{r.stderr}")
    txt = r.stdout
    num = lambda pat: float(m.group(1)) if (m := re.search(pat, txt)) else float("nan")  # noqa: E731
    row = {"format": fmt, "wall_s": round(wall, 1),
           "in_GB": num(r"converted ([\d.]+) GB"), "out_GB": num(r"-> ([\d.]+) GB"),
           "MB_s": num(r"([\d.]+) MB/s of input"), "raw_MB_s": num(r"cold\): ([\d.]+) MB/s"),
           "ratio": num(r"throughput ratio ([\d.]+)"), "peak_rss_MiB": num(r"peak RSS ([\d.]+) MiB"),
           "start_rss_MiB": num(r"at start ([\d.]+) MiB"), "shard_MiB": num(r"largest input shard ([\d.]+) MiB"),
           "worker_time": (m.group(1) if (m := re.search(r"worker time: (.*)", txt)) else "")}
    print(txt, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/qstress"))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--shard-gb", type=float, default=3.5)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--verify", action="store_true", help="also run --verify (re-reads source and output)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    src = write_source(a.root, a.layers, int(a.shard_gb * 1e9), a.seed)
    rows = []
    for fmt in a.formats.split(","):
        out = a.root / f"out-{fmt}"
        rows.append(run_format(src, out, fmt, a.workers, a.verify))
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(rows, indent=1))
    print(f"{'format':<12} {'in GB':>6} {'out GB':>7} {'MB/s':>6} {'raw MB/s':>9} {'ratio':>6} {'peak RSS MiB':>12} "
          f"{'shard MiB':>9}  worker time")
    for r in rows:
        print(f"{r['format']:<12} {r['in_GB']:>6.2f} {r['out_GB']:>7.2f} {r['MB_s']:>6.0f} {r['raw_MB_s']:>9.0f} "
              f"{r['ratio']:>6.2f} {r['peak_rss_MiB']:>12.0f} {r['shard_MiB']:>9.0f}  {r['worker_time']}")


if __name__ == "__main__":
    sys.exit(main())
