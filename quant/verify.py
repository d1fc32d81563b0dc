"""`--verify`: re-read a converted checkpoint and measure it against the dequantised source.

* every output file's sha256 against the manifest;
* copied tensors: byte-identical to the source;
* converted linears: the output dequantised with its format vs the source dequantised with its own, per tensor
  `max_rel` = max over rows of max|dW_row| / max|W_row| (the row-normalised worst case, which min-max per-channel
  quantisation bounds by 0.5/qmax), `mean_rel` = mean|dW| / mean|W| and `rel_l2` = ||dW|| / ||W||, aggregated
  by layer kind (max of max_rel and rel_l2, mean of mean_rel); a NaN / inf statistic (a non-finite value in the
  source or the output) makes `VerifyReport.ok` False, and the table flags the kind and names the tensors;
* `logit_agreement`: mean KL(P_ref || P_test) and top-1 agreement of two logit sets (the end-to-end check is
  run by the CLI, which can load models).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ascend_v4.quant import get_format

from . import recipes
from .errors import QuantizeError
from .manifest import read_manifest
from .conversion_plan import SourceCheckpoint, make_plan
from .st_io import TensorEntry, parse_header, pread_exact, read_tensor, sha256_file


@dataclass
class KindStats:
    kind: str
    formats: str  # "src -> dst"
    tensors: int = 0
    max_rel: float = 0.0
    mean_rel_sum: float = 0.0
    rel_l2: float = 0.0
    nonfinite: list[str] = field(default_factory=list)  # "<tensor>: mean_rel nan, ..." per tensor

    @property
    def mean_rel(self) -> float:
        return self.mean_rel_sum / self.tensors if self.tensors else 0.0

    def add(self, name: str, max_rel: float, mean_rel: float, rel_l2: float) -> None:
        """Fold in one tensor's statistics; a non-finite one is recorded and kept (NaN-propagating max: the
        built-in `max(0.0, nan)` would drop it)."""
        self.tensors += 1
        stats = {"max_rel": max_rel, "mean_rel": mean_rel, "rel_l2": rel_l2}
        bad = [f"{k} {v}" for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            self.nonfinite.append(f"{name}: {', '.join(bad)}")
        self.max_rel = _nan_max(self.max_rel, max_rel)
        self.mean_rel_sum += mean_rel
        self.rel_l2 = _nan_max(self.rel_l2, rel_l2)

    @property
    def finite(self) -> bool:
        return not self.nonfinite and all(math.isfinite(v) for v in (self.max_rel, self.mean_rel, self.rel_l2))


def _nan_max(a: float, b: float) -> float:
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


@dataclass
class VerifyReport:
    files_checked: int = 0
    bad_files: list[str] = field(default_factory=list)
    copied_tensors: int = 0
    copy_mismatches: list[str] = field(default_factory=list)
    kinds: dict[str, KindStats] = field(default_factory=dict)

    @property
    def nonfinite_kinds(self) -> list[str]:
        """Layer kinds with a NaN / inf statistic (a NaN or inf in the source or the output)."""
        return sorted(k.kind for k in self.kinds.values() if not k.finite)

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.copy_mismatches and not self.nonfinite_kinds

    def table(self) -> str:
        lines = [f"verify: {self.files_checked} files (sha256 {'ok' if not self.bad_files else 'MISMATCH'}), "
                 f"{self.copied_tensors} copied tensors ({len(self.copy_mismatches)} differ)",
                 f"{'layer kind':<20} {'conversion':<28} {'tensors':>7} {'max_rel':>9} {'mean_rel':>9} {'rel_l2':>9}"]
        for k in sorted(self.kinds.values(), key=lambda k: k.kind):
            flag = "  NON-FINITE" if not k.finite else ""
            lines.append(f"{k.kind:<20} {k.formats:<28} {k.tensors:>7} {k.max_rel:>9.2e} {k.mean_rel:>9.2e} "
                         f"{k.rel_l2:>9.2e}{flag}")
        for kind in self.nonfinite_kinds:
            ks = self.kinds[kind]
            shown = ks.nonfinite[:5]
            more = f" (and {len(ks.nonfinite) - 5} more tensors)" if len(ks.nonfinite) > 5 else ""
            lines.append(f"NON-FINITE statistics in {kind}: {'; '.join(shown) or 'aggregate'}{more}")
        return "\n".join(lines)


def linear_error(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float, float]:
    """(max_rel, mean_rel, rel_l2) of `test` against `ref`, both dense [out, in]."""
    ref, d = ref.double(), (test.double() - ref.double())
    row_amax = ref.abs().amax(1).clamp_min(1e-30)
    max_rel = (d.abs().amax(1) / row_amax).max().item()
    mean_rel = (d.abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()
    rel_l2 = (d.norm() / ref.norm().clamp_min(1e-30)).item()
    return max_rel, mean_rel, rel_l2


def _output_header(path: Path) -> dict[str, TensorEntry]:
    problems: list[str] = []
    header = parse_header(path, problems)
    if problems:
        raise QuantizeError(f"{path}: not a valid safetensors file: " + "; ".join(problems[:3]))
    return header.tensors


def verify_conversion(src: SourceCheckpoint, out_dir: str | Path, *, check_hashes: bool = True) -> VerifyReport:
    """Re-read `out_dir` (a complete conversion of `src`) and compare it with the source (module docstring)."""
    out = Path(out_dir)
    m = read_manifest(out)
    if m is None:
        raise QuantizeError(f"{out}: no manifest: not a complete conversion")
    rep = VerifyReport()
    if check_hashes:
        for f in m["files"]:
            rep.files_checked += 1
            if sha256_file(out / f["name"]) != f["sha256"]:
                rep.bad_files.append(f["name"])
    plan = make_plan(src, m["format"], m["ep"])
    fds: dict[Path, int] = {}

    def fd(p: Path) -> int:
        if p not in fds:
            fds[p] = os.open(p, os.O_RDONLY)
        return fds[p]

    root = Path(src.path)
    try:
        for f in plan.files:
            entries = _output_header(out / f.name)
            for u in f.units:
                if u.is_copy:
                    s, o = u.src[0], entries[u.outputs[0].name]
                    rep.copied_tensors += 1
                    a = pread_exact(fd(root / s.file), s.begin, s.end - s.begin, s.name)
                    b = pread_exact(fd(out / f.name), o.begin, o.end - o.begin, o.name)
                    if a != b:
                        rep.copy_mismatches.append(s.name)
                    continue
                src_fmt, dst_fmt = get_format(u.src_fmt), get_format(u.dst_fmt)
                ref = src_fmt.dequantize({"weight": read_tensor(fd(root / u.src[0].file), u.src[0]),
                                          "scale": read_tensor(fd(root / u.src[1].file), u.src[1])})
                got = dst_fmt.dequantize({o.name.rsplit(".", 1)[1]: read_tensor(fd(out / f.name), entries[o.name])
                                          for o in u.outputs})
                mx, mean, l2 = linear_error(ref, got)
                kind = recipes.layer_kind(u.name)
                ks = rep.kinds.setdefault(kind, KindStats(kind, f"{u.src_fmt} -> {u.dst_fmt}"))
                ks.add(u.name, mx, mean, l2)
    finally:
        for x in fds.values():
            os.close(x)
    return rep


def logit_agreement(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(mean over rows of KL(softmax(ref) || softmax(test)), fraction of rows with the same argmax)."""
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(test.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == test.argmax(-1)).double().mean().item()
    return kl, top1


def expected_max_rel(dst_format: str) -> float:
    """Upper bound of `max_rel` for a conversion into `dst_format` (tests and the CLI check against it)."""
    from .formats.int4_channel import CLIP_GRID

    bounds = {"int8_channel": 0.5 / 127, "int4_channel": max(0.5 / 7, 1.0 - float(min(CLIP_GRID))),
              "bf16": 0.0, "fp8_block": 0.0, "fp4_mx": 0.0}
    return bounds[dst_format] * (1 + 1e-5) + 1e-12


__all__ = ["verify_conversion", "VerifyReport", "KindStats", "linear_error", "logit_agreement", "expected_max_rel"]
