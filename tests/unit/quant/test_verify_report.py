"""`VerifyReport.ok` is False when a statistic is NaN / inf, and the table names the layer kind (and tensor)."""

from __future__ import annotations

import math

import pytest
import torch

from ascend_v4.quant.verify import KindStats, VerifyReport, linear_error


def _report(*stats: tuple[str, str, float, float, float]) -> VerifyReport:
    rep = VerifyReport(files_checked=2)
    for kind, name, mx, mean, l2 in stats:
        rep.kinds.setdefault(kind, KindStats(kind, "fp8_block -> int8_channel")).add(name, mx, mean, l2)
    return rep


def test_finite_report_is_ok():
    rep = _report(("attn.wq_a", "layers.0.attn.wq_a", 1e-3, 2e-4, 3e-4),
                  ("attn.wq_a", "layers.1.attn.wq_a", 2e-3, 1e-4, 1e-4))
    assert rep.ok and rep.nonfinite_kinds == []
    k = rep.kinds["attn.wq_a"]
    assert (k.tensors, k.max_rel, k.rel_l2) == (2, 2e-3, 3e-4)
    assert "NON-FINITE" not in rep.table()


@pytest.mark.parametrize("stat", ["max_rel", "mean_rel", "rel_l2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_statistic_fails(stat, bad):
    vals = {"max_rel": 1e-3, "mean_rel": 1e-4, "rel_l2": 1e-4, stat: bad}
    rep = _report(("ffn.shared_experts", "layers.0.ffn.shared_experts.w1", 1e-3, 1e-4, 1e-4),
                  ("attn.wo_b", "layers.3.attn.wo_b", vals["max_rel"], vals["mean_rel"], vals["rel_l2"]),
                  ("attn.wo_b", "layers.4.attn.wo_b", 1e-3, 1e-4, 1e-4))  # a later finite tensor must not hide it
    assert not rep.ok
    assert rep.nonfinite_kinds == ["attn.wo_b"]
    table = rep.table()
    row = next(line for line in table.splitlines() if line.startswith("attn.wo_b"))
    assert "NON-FINITE" in row
    assert f"NON-FINITE statistics in attn.wo_b: layers.3.attn.wo_b: {stat} {bad}" in table
    shared = next(line for line in table.splitlines() if line.startswith("ffn.shared_experts"))
    assert "NON-FINITE" not in shared


def test_nan_survives_aggregation_order():
    """`max(0.0, nan)` is 0.0 in Python: the aggregate must keep the NaN whatever the order."""
    rep = _report(("k", "a", math.nan, 0.1, math.nan), ("k", "b", 0.5, 0.1, 0.5))
    k = rep.kinds["k"]
    assert math.isnan(k.max_rel) and math.isnan(k.rel_l2)
    assert not rep.ok


def test_linear_error_of_nan_weights_is_nan():
    ref = torch.randn(4, 8)
    test = ref.clone()
    test[1, 2] = float("nan")
    assert all(math.isnan(v) for v in linear_error(ref, test))
    assert not _report(("k", "t", *linear_error(ref, test))).ok
