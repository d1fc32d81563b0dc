"""End-to-end accuracy of every `ascend-v4 quantize` format on a dummy checkpoint (the numbers in docs/quantize.md).

Writes the preset's dummy checkpoint, converts it to every format, and prints mean KL(official || format) and
top-1 agreement of the logits over `--tokens` random tokens, next to the baseline "official checkpoint with vs
without the FP8/FP4 QAT simulation" (a random model has flat logits: judge formats against that baseline).

    python tools/quantize_accuracy.py --preset small --tokens 256
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

FORMATS = ("w8a8", "w4a8", "bf16", "fp8-experts", "native")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=1, help="token sequences (and dummy seeds) to average over")
    ap.add_argument("--root", type=Path, default=None)
    a = ap.parse_args()

    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.cli.quantize import accuracy_report, format_accuracy
    from ascend_v4.model.args import ModelArgs
    from ascend_v4.quant.tool import quantize

    root = a.root or Path(tempfile.mkdtemp(prefix="qacc-"))
    try:
        for seed in range(a.seeds):
            src = write_dummy_checkpoint(ModelArgs.from_preset(a.preset), root / f"src{seed}", seed=seed)
            info = read_checkpoint(src)
            outs = {}
            for fmt in FORMATS:
                outs[fmt] = root / f"{fmt}{seed}"
                quantize(info, outs[fmt], fmt, workers=2, read_baseline="off", force=True)
            rows = accuracy_report(src, outs, n_tokens=a.tokens, seed=seed)
            print(f"{a.preset}, dummy seed {seed}")
            print(format_accuracy(rows, a.tokens), flush=True)
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
