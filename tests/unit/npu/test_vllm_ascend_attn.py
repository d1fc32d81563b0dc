"""Attention on vllm-ascend's `npu_sparse_attn_sharedkv` (ops/npu/vllm_ascend_attn.py) through the paged seam op
`ascend_v4::sparse_attn_paged`, on CPU tensors: the _C_ascend double implements the op from its README and
kernel masks (tests/unit/npu/_vllm_ascend_double.py).

* the block-table form the model hands the seam names exactly the rows the reference reads, in every layer
  kind and every engine situation (chunked prefill, prefix-cache hits, MTP rollback, several sequences);
* the mapping equals the reference for window, CSA and HCA layers (HCA through 16-entry pages), Pro's 128 heads
  as two calls, and declines what the op's README rules out;
* a wrong kernel fails the self-check; a model sized to the op's limits gives the reference's logits through it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ascend_v4 import ops
from ascend_v4.ops.npu import kernels, selfcheck, vllm_ascend_attn, vllm_ascend_ops
from ascend_v4.ops.npu._loader import OpLibrary
from ascend_v4.ops.reference.paged import paged_rows

from . import _vllm_ascend_double as vad

NO_LIB = OpLibrary(False, Path("/nonexistent/vendors/ascend_v4"), Path("/nonexistent/lib.so"), "not built (test)")


@pytest.fixture
def va():
    vad.install()
    vad.CALLS.clear()
    vad.BUG.clear()
    vllm_ascend_attn._metadata_cache.clear()
    yield vad
    vad.BUG.clear()


def _backend(tnpu) -> kernels.Backend:
    lib = vllm_ascend_ops.VllmAscendLib(True, "double (test)", vllm_ascend_ops.present_ops())
    b = kernels.make_backend(tnpu, NO_LIB, vllm=lib, soc=-1, mx_requested=False)
    b.device = "cpu"
    return b


# ------------------------------------------------------------------------------ the model's paged form
def test_the_paged_form_names_the_rows_the_reference_reads(monkeypatch):
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.runtime.sampling import SamplingParams
    from ascend_v4.tokenizer import Tokenizer

    seen: dict[int, int] = {}

    def checked(q, kv, idx, sink, scale, win, comp, cu, used, picks, max_q, max_kv, window, wb, base, bs, ratio):
        assert cu.dtype == used.dtype == win.dtype == comp.dtype == torch.int32
        assert max_q == int((cu[1:] - cu[:-1]).max()) and max_kv == int(used.max())
        assert (picks is not None) == (ratio == 4)
        want = paged_rows(win, comp, cu, used, picks, window, wb, base, bs, ratio)
        assert torch.equal(idx.long(), want), f"ratio {ratio}: the paged form names other rows than idx"
        seen[ratio] = seen.get(ratio, 0) + 1
        return ops.reference.attention.sparse_attn(q, kv, idx, sink, scale)

    monkeypatch.setitem(ops._CPU, "sparse_attn_paged", checked)
    model = load_model(ensure_dummy_checkpoint("tiny"), ModelOptions(dtype=torch.float32, quant_sim=False))
    g = torch.Generator().manual_seed(5)
    base = [0] + torch.randint(3, 129280, (299,), generator=g).tolist()
    ps = [base, base[:140] + [5, 6], [0, 7, 8], base[:260] + [9]]  # prefix hits after the first
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    e = Engine(model, Tokenizer.default(), EngineConfig(max_num_batched_tokens=48, max_num_seqs=3,
                                                        speculative_mtp=True))
    for p in ps[:1], ps[1:]:
        e.generate(p, [greedy] * len(p))
    assert e.stats()["prefix_hit_rate"] > 0
    assert set(seen) == {0, 4, 128} and min(seen.values()) > 10, seen


# ------------------------------------------------------------------------------ the mapping
def _case(label: str):
    cases = dict(selfcheck.CASES["sparse_attn_paged"]["real"])
    return cases[label](selfcheck._g(7))


@pytest.mark.parametrize("label", ["window H64 D512 B128 T11", "CSA H64 D512 B128 T11", "HCA H64 D512 B128 T11",
                                   "window H128 D512 T2", "CSA H32 D512 T2"])
def test_mapping_equals_the_reference(tnpu, va, label):
    args = _case(label)
    want = ops.reference.attention.sparse_attn(*args[:5])
    assert vllm_ascend_attn.accepts(*args)
    got = vllm_ascend_attn.sparse_attn_paged(*args)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    heads = args[0].shape[1]
    assert va.CALLS["npu_sparse_attn_sharedkv"] == max(1, heads // 64)  # 64-head calls (32 heads: padded)
    assert va.CALLS["npu_sparse_attn_sharedkv_metadata"] == 1


def test_hca_entries_go_through_16_entry_pages_and_csa_reads_the_pool_in_place(tnpu, va, monkeypatch):
    seen = {}
    real = torch.ops._C_ascend.npu_sparse_attn_sharedkv

    def spy(q, **kw):
        seen[kw["cmp_ratio"]] = (kw.get("cmp_kv"), kw.get("cmp_sparse_indices"))
        # released window blocks (-1 in our tables: the cases release those before the window) reach the
        # kernel as block 0, a valid page
        assert kw["ori_block_table"].min() >= 0 and (kw.get("cmp_block_table") is None
                                                     or kw["cmp_block_table"].min() >= 0)
        return real(q, **kw)

    monkeypatch.setattr(vllm_ascend_attn.torch.ops._C_ascend, "npu_sparse_attn_sharedkv", spy, raising=False)
    for label in ("CSA H64 D512 B128 T11", "HCA H64 D512 B128 T11", "window H64 D512 B128 T11"):
        vllm_ascend_attn.sparse_attn_paged(*_case(label))
    csa_kv, csa_idx = seen[4]
    hca_kv, hca_idx = seen[128]
    assert csa_kv.shape[1:] == (32, 1, 512) and csa_idx.shape[1:] == (1, 512)  # 128-token blocks: 32 entries
    assert hca_kv.shape[1:] == (16, 1, 512) and hca_idx is None  # 1 entry per block: gathered into pages
    assert seen[1] == (None, None)  # window only: cmp_ratio 1, as vllm-ascend calls it


def test_what_the_readme_rules_out_is_declined(tnpu, va):
    args = list(_case("CSA H64 D512 B128 T11"))
    assert vllm_ascend_attn.accepts(*args)
    for i, bad in ((0, args[0][:, :48]), (0, args[0][:, :, :256]), (0, args[0].float()),
                   (9, torch.zeros(11, 1024, dtype=torch.int32)),
                   (12, 64), (13, 8)):
        changed = list(args)
        changed[i] = bad
        assert not vllm_ascend_attn.accepts(*changed), (i, getattr(bad, "shape", bad))
    # a declined call goes down the list: the row-list candidate (here: sparse_attn's reference)
    b = _backend(tnpu)
    small = selfcheck.CASES["sparse_attn_paged"]["small"][0][1](selfcheck._g(1))
    with kernels.use_backend(b):
        out = b.run("sparse_attn_paged", *small)
    assert va.CALLS["npu_sparse_attn_sharedkv"] == 0
    torch.testing.assert_close(out, ops.reference.attention.sparse_attn(*small[:5]))


def test_vllm_ascend_attention_is_chosen_and_a_wrong_kernel_is_dropped(tnpu, va, caplog):
    b = _backend(tnpu)
    rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b, ("small", "real"))}
    assert rows["sparse_attn_paged", "vllm-ascend"].status == "pass"
    assert rows["sparse_attn_paged", "row list (sparse_attn)"].status == "delegates"
    assert b.choice("sparse_attn_paged") == "vllm-ascend"
    va.BUG.add("npu_sparse_attn_sharedkv")  # one position too many in the window
    b2 = _backend(tnpu)
    with caplog.at_level(logging.WARNING, logger="ascend_v4.ops"):
        rows = {(r.op, r.backend): r for r in selfcheck.check_backend(b2, ("small", "real"))}
    assert rows["sparse_attn_paged", "vllm-ascend"].status == "FAIL"
    assert b2.choice("sparse_attn_paged") == "row list (sparse_attn)"
    assert any("sparse_attn_paged on vllm-ascend failed" in r.getMessage() for r in caplog.records)
    # an older library without the metadata op: not usable, named
    lib = vllm_ascend_ops.VllmAscendLib(True, "double", vllm_ascend_ops.present_ops()
                                        - {"npu_sparse_attn_sharedkv_metadata"})
    assert "lacks _C_ascend.npu_sparse_attn_sharedkv_metadata" in lib.missing("sparse_attn_paged")


# ------------------------------------------------------------------------------ the model through it
def test_model_sized_to_the_op_runs_every_layer_kind_through_it(tnpu, va, monkeypatch, tmp_path):
    """A tiny model with V4's attention shape (64 heads of 512, window 128, top-k 512), bf16, prompts of 300 and
    140 tokens: every layer kind (window, CSA, HCA) goes through the double; each call's output is within bf16
    rounding of the reference on the same inputs, and the logits follow the reference's (teacher-forced; a
    random-weight model amplifies the per-call rounding, so no bit equality)."""
    from ascend_v4.checkpoint.dummy import write_dummy_checkpoint
    from ascend_v4.model.args import ModelArgs
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    from .test_npu_double import _greedy

    cfg = ModelArgs.from_preset("tiny").to_hf_config()
    cfg.update(num_attention_heads=64, head_dim=512, sliding_window=128, index_topk=512)
    args = ModelArgs.from_hf_config(cfg, "tiny-h64")
    model = load_model(write_dummy_checkpoint(args, tmp_path / "ckpt"), ModelOptions(dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(3)
    prompts = [[0] + torch.randint(3, 129280, (n - 1,), generator=g).tolist() for n in (300, 140)]
    ref_toks, ref_logits = _greedy(model, prompts, 3)
    npu = kernels.kernel_table()["sparse_attn_paged"]
    worst: dict[int, float] = {}

    def checked(*a):
        out, want = npu(*a).float(), ops.reference.attention.sparse_attn(*a[:5]).float()
        worst[a[-1]] = max(worst.get(a[-1], 0.0), ((out - want).abs().max() / want.abs().max()).item())
        return out.to(a[0].dtype)

    monkeypatch.setitem(ops._CPU, "sparse_attn_paged", checked)  # what PrivateUse1 dispatch does on a device
    with kernels.use_backend(_backend(tnpu)):
        _toks, logits = _greedy(model, prompts, 3, forced=ref_toks)
    assert set(worst) == {0, 4, 128} and max(worst.values()) < 1e-2, worst
    assert va.CALLS["npu_sparse_attn_sharedkv"] == 3 * len(prompts) * args.n_layers  # standalone caches: a call each
    cos = torch.nn.functional.cosine_similarity(logits.flatten(1), ref_logits.flatten(1), dim=1)
    assert cos.min() > 0.95, cos  # (torch 2.13: >= 0.998; torch 2.10's bf16 GEMMs round otherwise: >= 0.977)

    # the engine: one shared pool, so one call carries several sequences (chunked prefill, a prefix hit, decodes)
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.engine import Engine
    from ascend_v4.runtime.sampling import SamplingParams
    from ascend_v4.tokenizer import Tokenizer

    batch_sizes = []
    real = vllm_ascend_attn.sparse_attn_paged

    def spy(*a):
        batch_sizes.append(a[8].shape[0])  # seqused_kv: sequences in this call
        return real(*a)

    monkeypatch.setattr(vllm_ascend_attn, "sparse_attn_paged", spy)
    from ascend_v4.ops.npu import candidates

    candidates.table.cache_clear()  # rebuild the table with the spy
    worst.clear()
    try:
        e = Engine(model, Tokenizer.default(), EngineConfig(max_num_batched_tokens=96, max_num_seqs=3))
        greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        with kernels.use_backend(_backend(tnpu)):
            e.generate([prompts[0], prompts[0][:200] + [7, 8], prompts[1]], [greedy] * 3)
    finally:
        candidates.table.cache_clear()
    assert e.stats()["prefix_hit_rate"] > 0 and max(batch_sizes) >= 2
    assert set(worst) == {0, 4, 128} and max(worst.values()) < 1e-2, worst


def test_with_2048_token_blocks_hca_reads_the_pool_in_place(tnpu, va, monkeypatch):
    # serve --block-size 2048: 16 HCA entries per comp block, a valid page: no gather, the pool itself is read
    args = selfcheck._paged(64, 512, 128, [(0, 5), (2600, 1), (4200, 2)], block_size=2048)(selfcheck._g(3))
    kv, base = args[1], args[14]
    real = torch.ops._C_ascend.npu_sparse_attn_sharedkv
    seen = {}

    def spy(q, **kw):
        seen.update(kw)
        return real(q, **kw)

    monkeypatch.setattr(vllm_ascend_attn.torch.ops._C_ascend, "npu_sparse_attn_sharedkv", spy, raising=False)
    got = vllm_ascend_attn.sparse_attn_paged(*args)
    assert seen["cmp_kv"].shape[1:] == (16, 1, 512) and seen["ori_kv"].shape[1] == 512
    assert seen["cmp_kv"].data_ptr() == kv[base:].data_ptr()  # a view of the pool's compressed region
    want = ops.reference.attention.sparse_attn(*args[:5])
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_not_used_on_a_950_and_no_tables_off_the_npu(tnpu, va):
    lib = vllm_ascend_ops.VllmAscendLib(True, "double (test)", vllm_ascend_ops.present_ops())
    b = kernels.make_backend(tnpu, NO_LIB, vllm=lib, soc=260, mx_requested=False)
    b.device = "cpu"
    assert b.choice("sparse_attn_paged") == "row list (sparse_attn)"  # its README: A2/A3 only
    row = next(r for r in selfcheck.check_backend(b, ("small",)) if r.op == "sparse_attn_paged"
               and r.backend == "vllm-ascend")
    assert row.status == "not usable" and "Ascend 950" in row.detail

    # a device without a paged kernel (here the meta device, as CUDA) never builds the tables
    q, kv, idx, sink, scale, paged = _small_case()

    def boom():
        raise AssertionError("tables built off the NPU")

    lazy = ops.PagedKV(paged.window, paged.window_block, paged.comp_base, paged.block_size, paged.ratio, boom)
    out = ops.sparse_attn_paged(q.to("meta"), kv.to("meta"), idx.to("meta"), sink.to("meta"), scale, lazy)
    assert out.shape == q.shape and out.device.type == "meta"


def _small_case():
    a = selfcheck.CASES["sparse_attn_paged"]["small"][0][1](selfcheck._g(2))
    tables = ops.PagedTables(*a[5:9], a[10], a[11])
    return (*a[:5], ops.PagedKV(a[12], a[13], a[14], a[15], a[16], lambda: tables))
