"""The NPU code path (ops/npu/kernels.py) run on CPU tensors against a torch_npu test double.

* tests/unit/npu/double/torch_npu: the torch_npu functions ascend-v4 calls, in plain torch, to their documented
  semantics; put on sys.path only here (monkeypatch.syspath_prepend) and removed from sys.modules after.
* tests/unit/npu/_kernel_model.py: a tile-by-tile model of the two Ascend C kernels standing in for the
  compiled op library (`ascend_v4::npu_sparse_attn`, `ascend_v4::npu_moe_gemm`).

The model runs end to end on the `tiny` dummy checkpoint with the seam's CPU implementations swapped for the
NPU kernels, once with the op library "missing" (fallbacks: torch_npu routing + npu_grouped_matmul, FP8-free
decode, references) and once with the kernel model as the library, and is compared with the reference path:
logits close, greedy tokens equal.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import ascend_v4.ops as ops
from ascend_v4.ops import _library
from ascend_v4.ops.npu import kernels
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference import formats as fmt
from ascend_v4.ops.reference import gemm as ref_gemm
from ascend_v4.ops.reference.attention import sparse_attn as ref_sparse_attn

DOUBLE = Path(__file__).with_name("double")
NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")
LIB = OpLibrary(True, Path("/model/vendors/ascend_v4"), Path("/model/lib.so"), "kernel model (test)")



@pytest.fixture
def kernel_model():
    from . import _kernel_model

    _kernel_model.install()
    return _kernel_model


def _route_seam_through_npu(monkeypatch):
    """Make the seam's eager-CPU path call the NPU kernels (what PrivateUse1 dispatch does on a device)."""
    for op, fn in kernels.kernel_table().items():
        monkeypatch.setitem(_library.REFERENCE, op, fn)
        monkeypatch.setitem(ops._CPU, op, fn)  # what the seam's CPU path runs (references + CPU kernels)


# ------------------------------------------------------------------------------------------ the double itself
def test_double_matches_documented_examples(tnpu):
    # npu_moe_token_unpermute example of _op_plugin_docs.py: tokens 1..4 come back, averaged over top-2.
    pt = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=torch.float16)
    out = tnpu.npu_moe_token_unpermute(pt, torch.tensor([0, 4, 5, 1, 2, 6, 7, 3], dtype=torch.int32),
                                       probs=torch.ones(4, 2, dtype=torch.float16) / 2)
    assert out.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
    # aclnnMoeInitRoutingV2 formulas on x [3, 4], expert_idx [[1, 2], [0, 1], [0, 2]]
    x = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
    ex, ri, cnt, _ = tnpu.npu_moe_init_routing_v2(x, torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32),
                                                  expert_num=3, expert_tokens_num_type=1,
                                                  expert_tokens_num_flag=True)
    assert cnt.tolist() == [2, 2, 2]
    assert ex[:, 0].tolist() == pytest.approx([0.2, 0.3, 0.1, 0.2, 0.1, 0.3])  # x[sorted_row // k]
    assert ri.tolist() == [2, 4, 0, 3, 1, 5]  # expanded_row_idx[sorted_row[i]] = i, stable sort
    with pytest.raises(RuntimeError, match="int32"):
        tnpu.npu_moe_init_routing_v2(x, torch.zeros(3, 2, dtype=torch.int64), expert_num=3,
                                     expert_tokens_num_type=1, expert_tokens_num_flag=True)
    with pytest.raises(RuntimeError, match="128"):
        tnpu.npu_grouped_matmul([x], [torch.zeros(4, 2)] * 129, group_list=torch.zeros(129, dtype=torch.int64),
                                split_item=3, group_type=0, group_list_type=1)


# ------------------------------------------------------------------------------------------ kernels vs reference
def test_fp8_roundtrip_without_fp8_dtype_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.logspace(-12, 6, 512)  # normals, subnormals, big values
    x[0, :128] = 0
    for dt in (torch.float32, torch.bfloat16):
        xi = x.to(dt)
        assert torch.equal(kernels.fp8_roundtrip(xi, 128), fmt.fp8_roundtrip(xi, 128))
        assert torch.equal(kernels.fp8_roundtrip(xi, 64), fmt.fp8_roundtrip(xi, 64))


def _expert_weights(E, N, K, fp4, g):
    ws, ss = [], []
    for _ in range(E):
        w = torch.randn(N, K, generator=g) * 0.05
        q, s = fmt.quant_fp4(w) if fp4 else fmt.quant_fp8_block(w)
        ws.append(q)
        ss.append(s)
    return ws, ss


@pytest.mark.parametrize("fp4", [True, False])
def test_dense_weight_decode_matches_reference(fp4):
    g = torch.Generator().manual_seed(1)
    (w,), (s,) = _expert_weights(1, 256, 384, fp4, g)
    ref = fmt.dequant_fp4(w, s) if fp4 else fmt.dequant_fp8_block(w, s)
    assert torch.equal(kernels.dense_weight(w, s, torch.float32), ref)


def _moe_inputs(g, T=9, D=256, I=128, E=8, k=3, fp4=True, dtype=torch.float32):
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[1, 0] = -1  # experts of another EP rank
    ids[4] = -1
    wts = torch.rand(T, k, generator=g)
    w1, s1 = _expert_weights(E, I, D, fp4, g)
    w3, s3 = _expert_weights(E, I, D, fp4, g)
    w2, s2 = _expert_weights(E, D, I, fp4, g)
    return x, ids, wts, w1, s1, w2, s2, w3, s3


@pytest.mark.parametrize("fp4,act_quant", [(True, True), (False, False)])
def test_moe_experts_torch_npu_path_matches_reference(tnpu, fp4, act_quant):
    g = torch.Generator().manual_seed(2)
    args = _moe_inputs(g, fp4=fp4)
    ref = ref_gemm.moe_experts(*args, 10.0, act_quant)
    with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)):
        out = kernels.moe_experts(*args, 10.0, act_quant)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # fp32 rows: npu_moe_token_unpermute takes float16/bfloat16 only, so the final sum runs in plain torch
    assert tnpu.CALLS["npu_moe_init_routing_v2"] == 1 and tnpu.CALLS["npu_moe_token_unpermute"] == 0
    assert tnpu.CALLS["npu_grouped_matmul"] == 3  # w1, w3, w2: one call each (<= 128 active experts)


def test_moe_experts_torch_npu_path_bf16_unpermutes_on_the_npu(tnpu):
    g = torch.Generator().manual_seed(3)
    args = _moe_inputs(g, dtype=torch.bfloat16)
    ref = ref_gemm.moe_experts(*args, 10.0, True)
    with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)):
        out = kernels.moe_experts(*args, 10.0, True)
    assert tnpu.CALLS["npu_moe_token_unpermute"] == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # the expert outputs summed in bf16 there


def test_moe_experts_op_library_path_matches_reference(tnpu, kernel_model):
    g = torch.Generator().manual_seed(3)
    args = _moe_inputs(g, dtype=torch.bfloat16)
    ref = ref_gemm.moe_experts(*args, 10.0, True)
    before = kernel_model.calls["npu_moe_gemm"]
    with kernels.use_backend(kernels.Backend(tnpu, LIB)):
        out = kernels.moe_experts(*args, 10.0, True)
    assert kernel_model.calls["npu_moe_gemm"] - before == 3 and tnpu.CALLS["npu_grouped_matmul"] == 0
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_quant_gemm_paths_match_reference(tnpu, kernel_model):
    g = torch.Generator().manual_seed(4)
    for fp4 in (True, False):
        (w,), (s,) = _expert_weights(1, 384, 256, fp4, g)
        x = torch.randn(5, 256, generator=g)
        with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)):
            torch.testing.assert_close(kernels.quant_gemm(x, w, s, True), ref_gemm.quant_gemm(x, w, s, True))
        xb = x.bfloat16()
        with kernels.use_backend(kernels.Backend(tnpu, LIB)):
            out = kernels.quant_gemm(xb, w, s, True)
        torch.testing.assert_close(out.float(), ref_gemm.quant_gemm(xb, w, s, True).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T,H,K", [(1, 64, 640), (3, 16, 300), (40, 4, 40)])
def test_sparse_attn_kernel_model_matches_reference(tnpu, kernel_model, T, H, K):
    g = torch.Generator().manual_seed(T + H)
    D, N = 512, 900
    q = torch.randn(T, H, D, generator=g).bfloat16()
    kv = torch.randn(N, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)]).int()
    idx[:, ::7] = -1
    idx[0] = -1  # a query with no key at all: the sink alone -> zeros
    sink = torch.randn(H, generator=g)
    with kernels.use_backend(kernels.Backend(tnpu, LIB)):
        out = kernels.sparse_attn(q, kv, idx, sink, D ** -0.5)
    ref = ref_sparse_attn(q, kv, idx, sink, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-2)
    assert bool((out[0] == 0).all())


@pytest.mark.skipif("w8a8_gemm" not in _library.REFERENCE, reason="integer-format ops not defined")
def test_int8_ops_through_dynamic_quant_and_quant_matmul(tnpu):
    from ascend_v4.ops.reference import int_gemm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 256, generator=g).bfloat16()
    x[3] = 0  # all-zero token
    w = torch.randint(-127, 128, (96, 256), generator=g, dtype=torch.int8)
    ws = torch.rand(96, 1, generator=g) * 1e-2
    w4 = int_gemm.pack_int4_rows(torch.randint(-8, 8, (96, 256), generator=g, dtype=torch.int8))
    with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)):
        y8, y4 = kernels.w8a8_gemm(x, w, ws), kernels.w4a8_gemm(x, w4, ws)
        rt = kernels.int8_act_roundtrip(x.view(7, 2, 128))
        y32 = kernels.w8a8_gemm(x.float(), w, ws)  # fp32 activations: npu_dynamic_quant cannot, reference runs
    torch.testing.assert_close(y8, int_gemm.w8a8_gemm(x, w, ws), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y4, int_gemm.w4a8_gemm(x, w4, ws), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rt, int_gemm.int8_act_roundtrip(x.view(7, 2, 128)))
    assert torch.equal(y32, int_gemm.w8a8_gemm(x.float(), w, ws))
    assert tnpu.CALLS["npu_dynamic_quant"] == 3 and tnpu.CALLS["npu_quant_matmul"] == 2


# ------------------------------------------------------------------------------------------ end to end
def _greedy(model, prompts, steps, forced=None):
    """Prefill + greedy decode; returns (tokens per prompt, last-position logits [steps, B, V] fp32).
    `forced` (tokens from another run) makes it teacher-forced, so positions stay comparable."""
    from ascend_v4.model.cache import StepBatch, new_seq_cache

    caches = [new_seq_cache(model.args, model.opts.dtype) for _ in prompts]
    toks, logits = [list(p) for p in prompts], []
    feed = [list(p) for p in prompts]
    for step in range(steps):
        b = StepBatch.build(list(zip(caches, feed)))
        lg = model.logits(model(b))
        b.commit()
        last = torch.stack([lg[s.offset + s.n - 1] for s in b.seqs]).float()
        logits.append(last)
        nxt = last.argmax(-1).tolist()
        if forced is not None:
            nxt = [f[len(p) + step] for f, p in zip(forced, prompts)]
        feed = [[t] for t in nxt]
        for tk, t in zip(toks, nxt):
            tk.append(t)
    return toks, torch.stack(logits)


PROMPTS = [[0, 17, 4242, 99, 123, 5000, 77, 31, 8, 1024, 3, 3, 3, 64, 65, 66, 67, 68, 69, 70], [0, 11, 12, 13]]
STEPS = 4


@pytest.fixture(scope="module")
def tiny_ckpt():
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint

    return ensure_dummy_checkpoint("tiny")


@pytest.fixture(scope="module")
def model32(tiny_ckpt):
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    return load_model(tiny_ckpt, ModelOptions(dtype=torch.float32))


@pytest.fixture(scope="module")
def ref32(model32):
    return _greedy(model32, PROMPTS, STEPS)


def test_model_end_to_end_through_npu_fallback_path(tnpu, monkeypatch, model32, ref32):
    # fp32, op library missing: torch_npu routing + npu_grouped_matmul, FP8-free decode and rounding, references
    _route_seam_through_npu(monkeypatch)
    with kernels.use_backend(kernels.Backend(tnpu, NO_LIB)):
        toks, logits = _greedy(model32, PROMPTS, STEPS)
    assert tnpu.CALLS["npu_moe_init_routing_v2"] > 0 and tnpu.CALLS["npu_grouped_matmul"] > 0
    torch.testing.assert_close(logits, ref32[1], rtol=1e-4, atol=1e-4)
    assert toks == ref32[0]


def test_model_end_to_end_through_op_library_path(tnpu, kernel_model, monkeypatch, tiny_ckpt, ref32):
    # bf16 (the Ascend C kernels take bf16/fp16 only), teacher-forced on the fp32 reference's tokens. With
    # random tiny weights bf16 rounding alone moves logits by several percent (the bf16 reference differs
    # from the fp32 one as much), so the check is: the NPU path is no further from fp32 than bf16 itself.
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    model = load_model(tiny_ckpt, ModelOptions(dtype=torch.bfloat16))
    _, ref_bf16 = _greedy(model, PROMPTS, 2, forced=ref32[0])
    _route_seam_through_npu(monkeypatch)
    before = dict(kernel_model.calls)
    with kernels.use_backend(kernels.Backend(tnpu, LIB)):
        _, logits = _greedy(model, PROMPTS, 2, forced=ref32[0])
    assert all(kernel_model.calls[k] > before[k] for k in before), kernel_model.calls
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)  # noqa
    gold = ref32[1][:2]
    c_npu, c_bf16 = cos(logits, gold), cos(ref_bf16, gold)
    assert c_npu.mean() >= c_bf16.mean() - 0.01 and c_npu.min() >= c_bf16.min() - 0.03, (c_npu, c_bf16)
    assert bool((cos(logits, ref_bf16) > 0.95).all())


# ------------------------------------------------------------------------------------------ registration
def test_register_installs_privateuse1_kernels_without_importing_torch_npu():
    from ascend_v4.ops import npu

    had = "torch_npu" in sys.modules
    assert npu.register() == {}  # no NPU here: nothing reported, but the dispatcher entries exist
    assert npu.register(force=True) == {"npu": "npu"}
    for op in kernels.kernel_table():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ascend_v4::{op}", "PrivateUse1"), op
    assert ("torch_npu" in sys.modules) == had
    assert ops.active_backends()["cpu"] == "cpu"  # the CPU kernels (ops/cpu.py): NPU registration leaves them


def test_missing_op_library_warns_once_and_falls_back(tnpu, caplog):
    with caplog.at_level(logging.WARNING, logger="ascend_v4.ops"):
        b = kernels.make_backend(tnpu, NO_LIB)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "op library unavailable" in warnings[0].getMessage()
    assert b.choice("sparse_attn") == "reference" and b.choice("moe_experts") == "torch_npu+grouped_matmul"
    assert kernels.Backend(tnpu, LIB).choice("sparse_attn") == "ascendc"
