"""Compile every Triton kernel of ops/triton/ for an Ascend NPU target, without an NPU or CANN.

Two steps per kernel (ascend-notes.md §10.1):
1. triton-ascend lowers the kernel TTIR -> Ascend linalg (`*.ttadapter` in TRITON_CACHE_DIR); its binary
   stage then stops with "ASCEND_HOME_PATH is not set", which is expected here;
2. ascendnpu-ir's `bishengir-compile` runs the HFusion / HIVM lowering of that `.ttadapter`.
Pass = the only error is the missing closed `hivmc` binary ("Cannot find hivmc under $PATH" and its
follow-ups); anything earlier (e.g. "ub overflow") is a real failure on the NPU.

triton-ascend and upstream triton both install the `triton` module, so this needs its own environment:

    python -m venv /opt/triton-ascend
    /opt/triton-ascend/bin/pip install torch==2.13.0 triton-ascend pybind11 "numpy<2.4" ascendnpu-ir

Run from any environment: `python tools/check_ascend_lowering.py` re-executes itself with
/opt/triton-ascend/bin/python (or --python / $ASCEND_V4_TRITON_ASCEND_PYTHON) when `triton` here is not
triton-ascend. `--interpret` also runs each launcher under triton-ascend's own interpreter on small random
inputs against the reference (numerics with triton-ascend's language version; `tl.dot` included).
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = os.environ.get("ASCEND_V4_TRITON_ASCEND_PYTHON", "/opt/triton-ascend/bin/python")
PKG = "av4_triton_kernels"  # ops/triton/ loaded under this name: ascend_v4 need not be installed here
HIVMC_MISSING = "Cannot find hivmc under $PATH"
# Messages that only follow from the missing hivmc binary.
HIVMC_FOLLOW_UPS = ("hivmc", "Failed to run BiShengIR pipeline")


@dataclasses.dataclass
class Case:
    name: str
    kernel: str  # "module.function" in ops/triton/
    signature: dict[str, str]
    constants: dict[str, object]


def _i32(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


def cases(npu_block_n: dict[str, int]) -> list[Case]:
    """One compile per kernel variant, with the block shapes the launchers pick for V4 Flash shapes, except
    the GEMM output width, which is the NPU variant's (`gemm.NPU_BLOCK_N`)."""
    out = [
        Case("sparse_attn (H=64, D=512, bf16)", "attention._sparse_attn_kernel",
             {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*bf16",
              **_i32("H", "D", "K"), "scale": "fp32",
              **_i32("stride_qt", "stride_qh", "stride_kv", "stride_it", "stride_ot", "stride_oh")},
             # plain bf16 rows; FP8_ENTRY (sparse_attn_fp8) is CUDA only: it overflows 910B UB (docs/kernels.md)
             {"BLOCK_H": 16, "BLOCK_K": 32, "BLOCK_D": 512, "F32": False, "FP8_ENTRY": False, "NOPE": 0,
              "ROPE_OFF": 0, "SCALE_OFF": 0, "SCALE_BLOCK_": 64}),
        Case("indexer scores (h=64, d=128, bf16)", "attention._indexer_scores_kernel",
             {"q_ptr": "*bf16", "k_ptr": "*bf16", "w_ptr": "*bf16", "start_ptr": "*i64", "len_ptr": "*i64",
              "out_ptr": "*fp32", **_i32("t0", "NH", "DI", "S_BUF", "stride_qt", "stride_qh", "stride_kn",
                                         "stride_wt", "stride_ot")},
             {"BLOCK_H": 64, "BLOCK_S": 64, "BLOCK_D": 128, "F32": False}),
    ]
    for L, bd in ((8, 128), (128, 64)):
        out.append(Case(f"compress_kv (L={L}, fp32)", "attention._compress_kv_kernel",
                        {"kv_ptr": "*fp32", "score_ptr": "*fp32", "out_ptr": "*fp32",
                         **_i32("L", "D", "stride_kn", "stride_kl", "stride_sn", "stride_sl", "stride_on")},
                        {"BLOCK_L": L, "BLOCK_D": bd}))
    for fmt in ("fp8", "fp4"):
        out.append(Case(f"quant_gemm ({fmt}, act_quant, BN={npu_block_n['quant_gemm']})", "gemm._quant_gemm_kernel",
                        {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "y_ptr": "*bf16",
                         **_i32("M", "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_ym")},
                        {"IS_FP4": fmt == "fp4", "ACT_QUANT": True, "BLOCK_M": 16,
                         "BLOCK_N": npu_block_n["quant_gemm"], "BLOCK_K": 128, "F32": False}))
    sched = {"order_ptr": "*i32", "blk_expert_ptr": "*i32", "blk_row0_ptr": "*i32", "grp_start_ptr": "*i32",
             "grp_count_ptr": "*i32"}
    moe_c = {"IS_FP4": True, "ACT_QUANT": True, "BLOCK_M": 16, "BLOCK_K": 128, "F32": False}
    out += [
        Case(f"moe gate/up+SwiGLU (fp4, aq, BN={npu_block_n['moe_gate_up']})", "gemm._moe_gate_up_kernel",
             {"x_ptr": "*bf16", **sched, "tw_ptr": "*fp32", "w1_ptr": "*u8", "s1_ptr": "*u8", "w3_ptr": "*u8",
              "s3_ptr": "*u8", "off_ptr": "*i64", "a_ptr": "*bf16",
              **_i32("E", "D", "I", "TOPK", "stride_xm", "stride_wn", "stride_sn"), "limit": "fp32"},
             {**moe_c, "BLOCK_N": npu_block_n["moe_gate_up"]}),
        Case(f"moe down (fp4, act_quant, BN={npu_block_n['moe_down']})", "gemm._moe_down_kernel",
             {"a_ptr": "*bf16", **sched, "w2_ptr": "*u8", "s2_ptr": "*u8", "off_ptr": "*i64", "y_ptr": "*fp32",
              **_i32("E", "D", "I", "stride_wn", "stride_sn")}, {**moe_c, "BLOCK_N": npu_block_n["moe_down"]}),
    ]
    hc = {"x_ptr": "*bf16", "fn_ptr": "*fp32", "base_ptr": "*fp32", "scale_ptr": "*fp32", "y_ptr": "*bf16",
          "post_ptr": "*fp32", "comb_ptr": "*fp32", **_i32("NS", "D"), "norm_eps": "fp32", "hc_eps": "fp32",
          **_i32("sinkhorn_iters", "stride_xt", "stride_yt")}
    out += [
        Case("hc_pre (n=4, Sinkhorn)", "mhc._hc_collapse_kernel", hc,
             {"FULL": True, "BLOCK_N": 4, "BLOCK_F": 512, "BLOCK_D": 256}),
        Case("hc_head (n=4)", "mhc._hc_collapse_kernel", hc,
             {"FULL": False, "BLOCK_N": 4, "BLOCK_F": 512, "BLOCK_D": 256}),
        Case("hc_post (n=4)", "mhc._hc_post_kernel",
             {"f_ptr": "*bf16", "res_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "out_ptr": "*bf16",
              **_i32("NS", "D", "stride_ft", "stride_rt")}, {"BLOCK_N": 4, "BLOCK_D": 256}),
    ]
    return out


def _load_package(name: str, src: pathlib.Path) -> None:
    # Import a folder of ops/ as a standalone package (ops/triton and ops/reference need only torch / triton).
    spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)


def _load_kernels():
    _load_package(PKG, REPO / "ops" / "triton")
    return {m: importlib.import_module(f"{PKG}.{m}") for m in ("attention", "gemm", "mhc")}


def _bishengir() -> str:
    import ascendnpuir  # noqa: F401  (ascendnpu-ir ships the binary inside the package)

    found = shutil.which("bishengir-compile") or next(iter(glob.glob(
        str(pathlib.Path(ascendnpuir.__file__).parent / "bin" / "bishengir-compile"))), None)
    if not found:
        raise SystemExit("bishengir-compile not found: pip install ascendnpu-ir")
    return found


def _first_error(text: str) -> str:
    """The most telling error line that is not a consequence of the missing hivmc ("" if none)."""
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln for ln in lines if "error" in ln.lower() and not any(f in ln for f in HIVMC_FOLLOW_UPS)]
    ub = [ln for ln in errors if "ub overflow" in ln.lower()]
    line = (ub or errors or [""])[0]
    return line[line.find("error:"):][:160] if "error:" in line else line[:160]


def check(case: Case, mods, target: str, work: pathlib.Path, bishengir: str) -> tuple[str, str]:
    """(result, detail) for one kernel: PASS, FAIL(triton) or FAIL(bishengir)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, fn = case.kernel.split(".")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    try:
        triton.compile(ASTSource(getattr(mods[mod], fn), case.signature, case.constants),
                       target=GPUTarget("npu", target, 0))
        note = "compiled to a binary (CANN present?)"
    except Exception as e:  # the binary stage needs CANN; anything before the .ttadapter is a real failure
        note = str(e)
    adapters = glob.glob(str(cache / "**" / "*.ttadapter"), recursive=True)
    if not adapters:
        return "FAIL(triton)", _first_error(note) or note.strip().splitlines()[0][:160]
    temps = work / "temps"
    shutil.rmtree(temps, ignore_errors=True)
    temps.mkdir(parents=True)
    env = dict(os.environ, PATH=f"{pathlib.Path(bishengir).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([bishengir, adapters[0], f"--target={target}", "--enable-hfusion-compile=true",
                        "--enable-hivm-compile=true", "--enable-triton-kernel-compile=true", f"--save-temps={temps}",
                        "-o", str(work / "out")], capture_output=True, text=True, env=env, timeout=600)
    text = r.stdout + r.stderr
    other = _first_error(text)
    if HIVMC_MISSING in text and not other:
        return "PASS", "stopped only at the missing hivmc"
    return "FAIL(bishengir)", other or text.strip().splitlines()[-1][:160]


def interpret_check() -> int:
    """Each launcher vs the reference under triton-ascend's interpreter (TRITON_INTERPRET=1 must be set
    before triton is first imported); prints op -> max |difference| and PASS/FAIL."""
    import torch

    mods = _load_kernels()
    _load_package("av4_reference", REPO / "ops" / "reference")
    ra, rg, rm, fmt = (importlib.import_module(f"av4_reference.{m}") for m in ("attention", "gemm", "mhc", "formats"))
    ka, kg, km = mods["attention"], mods["gemm"], mods["mhc"]
    torch.manual_seed(0)
    rows = []  # (name, difference, tolerance)

    def diff(a, b):
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))

    for dt in (torch.float32, torch.bfloat16):
        # fp32: summation order only (GEMMs sum over K = 128..256); bf16: one output rounding (the MoE chains
        # several bf16 roundings and an fp8 re-quantisation, so a flip there moves the result more)
        tol, gemm_tol, moe_tol, tag = ((1e-5, 1e-4, 1e-4, "fp32") if dt == torch.float32 else
                                       (2e-2, 2e-2, 5e-2, "bf16"))
        q, kv = torch.randn(3, 5, 40).to(dt), torch.randn(20, 40).to(dt)
        idx = torch.stack([torch.randperm(20)[:13] for _ in range(3)])
        idx[1, 5:] = -1
        sink = torch.randn(5)
        rows.append((f"sparse_attn {tag}", diff(ka.sparse_attn(q, kv, idx, sink, 0.2),
                                                ra.sparse_attn(q, kv, idx, sink, 0.2)), tol))
        qi, k, w = torch.randn(4, 3, 24).to(dt), torch.randn(30, 24).to(dt), torch.randn(4, 3).to(dt)
        ks, kl = torch.tensor([0, 0, 10, 10]), torch.tensor([5, 0, 20, 7])
        same = torch.equal(ka.indexer_topk(qi, k, w, ks, kl, 8), ra.indexer_topk(qi, k, w, ks, kl, 8))
        rows.append((f"indexer_topk {tag} (rows equal)", 0.0 if same else 1.0, 0.0))
        c, sc = torch.randn(5, 8, 33).to(dt), torch.randn(5, 8, 33).to(dt)
        sc[0, :4] = float("-inf")
        rows.append((f"compress_kv {tag}", diff(ka.compress_kv(c, sc), ra.compress_kv(c, sc)), 1e-5))
        for fp4 in (False, True):
            x = torch.randn(5, 256).to(dt)
            wq, sq = (fmt.quant_fp4 if fp4 else fmt.quant_fp8_block)(0.05 * torch.randn(70, 256))
            rows.append((f"quant_gemm {'fp4' if fp4 else 'fp8'} act_quant {tag}",
                         diff(kg.quant_gemm(x, wq, sq, True), rg.quant_gemm(x, wq, sq, True)), gemm_tol))
        W = {n: [] for n in ("w1", "s1", "w2", "s2", "w3", "s3")}
        for _ in range(4):
            for n, shape in (("1", (128, 128)), ("3", (128, 128)), ("2", (128, 128))):
                a, b = fmt.quant_fp4(0.1 * torch.randn(*shape))
                W["w" + n].append(a)
                W["s" + n].append(b)
        x, ids, tw = torch.randn(6, 128).to(dt), torch.randint(-1, 4, (6, 2)), torch.rand(6, 2)
        args = (W["w1"], W["s1"], W["w2"], W["s2"], W["w3"], W["s3"], 10.0, True)
        rows.append((f"moe_experts fp4 act_quant {tag}", diff(kg.moe_experts(x, ids, tw, *args),
                                                               rg.moe_experts(x, ids, tw, *args)), moe_tol))
        xh, fn, base, s3 = torch.randn(3, 4, 96).to(dt), 0.05 * torch.randn(24, 384), torch.randn(24), torch.rand(3)
        rows.append((f"hc_pre {tag}", diff(km.hc_pre(xh, fn, base, s3, 1e-6, 1e-6, 20),
                                           rm.hc_pre(xh, fn, base, s3, 1e-6, 1e-6, 20)), tol))
        rows.append((f"hc_head {tag}", diff(km.hc_head(xh, fn[:4], base[:4], s3[:1], 1e-6, 1e-6),
                                            rm.hc_head(xh, fn[:4], base[:4], s3[:1], 1e-6, 1e-6)), tol))
        f, post, comb = torch.randn(3, 96).to(dt), torch.rand(3, 4), torch.rand(3, 4, 4)
        rows.append((f"hc_post {tag}", diff(km.hc_post(f, xh, post, comb), rm.hc_post(f, xh, post, comb)), tol))
    print(f"{'interpreted launcher vs reference':40s} {'result':16s} max |diff|")
    bad = 0
    for name, d, tol in rows:
        ok = d <= tol
        bad += not ok
        print(f"{name:40s} {'PASS' if ok else 'FAIL':16s} {d:.3g} (tol {tol:g})")
    return 1 if bad else 0


def _is_triton_ascend() -> bool:
    try:
        return importlib.util.find_spec("ascendnpuir") is not None and importlib.util.find_spec("triton") is not None
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="Ascend910B4", help="Ascend SoC name for GPUTarget and bishengir-compile")
    ap.add_argument("--python", default=DEFAULT_PYTHON, help="interpreter of the triton-ascend environment")
    ap.add_argument("-k", dest="only", default="", help="only kernels whose name contains this text")
    ap.add_argument("--keep", default="", help="keep the compile artefacts under this folder")
    ap.add_argument("--interpret", action="store_true", help="also check numerics under triton-ascend's interpreter")
    ap.add_argument("--interpret-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not _is_triton_ascend():
        if not pathlib.Path(args.python).exists():
            print(f"triton-ascend environment not found at {args.python}; see this script's docstring",
                  file=sys.stderr)
            return 2
        return subprocess.call([args.python, __file__, *(argv if argv is not None else sys.argv[1:])])

    if args.interpret_worker:  # triton is not imported yet in this process
        os.environ["TRITON_INTERPRET"] = "1"
        return interpret_check()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    mods = _load_kernels()
    bishengir = _bishengir()
    root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="av4-ascend-"))
    print(f"triton {triton.__version__} (triton-ascend), {bishengir}, target {args.target}")
    print(f"{'kernel':40s} {'result':16s} {'s':>5s}  detail")
    failed = 0
    for i, case in enumerate(c for c in cases(mods["gemm"].NPU_BLOCK_N) if args.only in c.name):
        t = time.time()
        result, detail = check(case, mods, args.target, root / f"k{i}", bishengir)
        failed += result != "PASS"
        print(f"{case.name:40s} {result:16s} {time.time() - t:5.1f}  {detail}", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if args.interpret:  # a fresh process: TRITON_INTERPRET must be set before triton is imported
        print(flush=True)
        failed += subprocess.call([sys.executable, __file__, "--interpret-worker"],
                                  env=dict(os.environ, TRITON_INTERPRET="1")) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
