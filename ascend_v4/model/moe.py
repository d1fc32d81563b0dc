"""V4 MoE (model-spec §6): sqrt-softplus router scores, selection-only bias, hash routing (`tid2eid`) in the
first layers, clamped SwiGLU routed experts (FP4) plus one shared expert (FP8), routed scaling.

Expert parallelism: a rank may build only some routed experts (`experts=` global ids; parameter names keep the
global id, `experts.E.w1.weight`), and the runtime injects `MoE.expert_parallel`, a callable
`(x, ids, weights, run_local) -> routed [T, D] fp32` that dispatches (token, expert) pairs to the experts'
owners, runs `run_local` there and combines the results back (`ascend_v4.runtime.expert_parallel`). The model
itself never imports the runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ascend_v4 import ops
from ascend_v4.ops.reference.gemm import expert_groups

from .args import ModelArgs
from .layers import FP4, FP8, INT4, Linear, ModelOptions


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int):
        super().__init__()
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale
        self.hash = args.is_hash_layer(layer_id) and layer_id < args.n_layers
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=opts.dtype),
                                   requires_grad=False)
        if self.hash:
            self.tid2eid = nn.Parameter(torch.empty(args.vocab_size, self.topk, dtype=torch.long),
                                        requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k], weights [T, k] fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
        return ops.moe_gate(logits, None if self.hash else self.bias, self.tid2eid if self.hash else None, tokens,
                            self.topk, self.route_scale)


class Expert(nn.Module):
    """One SwiGLU expert: w2( silu(min(w1 x, L)) * clamp(w3 x, -L, L) )."""

    def __init__(self, dim: int, inter: int, fmt: str, opts: ModelOptions, limit: float):
        super().__init__()
        self.limit, self.opts = limit, opts
        self.w1 = Linear(dim, inter, fmt, opts)
        self.w2 = Linear(inter, dim, fmt, opts)
        self.w3 = Linear(dim, inter, fmt, opts)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D]; `weight` [T] (routing weight) multiplies the activation before w2, as the reference does."""
        xq = self.w1.quantize_input(x)  # shared by w1 and w3
        g = self.w1(xq, prequantized=True).float().clamp(max=self.limit)
        u = self.w3(xq, prequantized=True).float().clamp(-self.limit, self.limit)
        a = F.silu(g) * u
        if weight is not None:
            a = a * weight[:, None]
        return self.w2(a.to(x.dtype))


class ExpertSet(nn.ModuleDict):
    """The routed experts a rank holds, keyed by global expert id (as a string, so parameter names stay
    `experts.E.w1.weight`). Behaves like the former ModuleList: `experts[e]` takes the global id as an int,
    iteration yields the modules in ascending id order."""

    def __getitem__(self, key: int | str) -> nn.Module:
        return super().__getitem__(str(key))

    def __iter__(self):
        return iter(self.values())


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, opts: ModelOptions, layer_id: int, experts: range | None = None):
        """`experts`: global ids of the routed experts built here (default: all; expert parallelism builds a
        rank's share and needs `expert_parallel` set before forward)."""
        super().__init__()
        self.args, self.opts = args, opts
        self.gate = Gate(args, opts, layer_id)
        fmt = FP4 if args.expert_dtype == "fp4" else FP8
        self.expert_ids = sorted(experts if experts is not None else range(args.n_routed_experts))
        self.experts = ExpertSet({str(e): Expert(args.dim, args.moe_inter_dim, fmt, opts, args.swiglu_limit)
                                  for e in self.expert_ids})
        self.shared_experts = Expert(args.dim, args.moe_inter_dim, FP8, opts, args.swiglu_limit)
        self._lists: tuple | None = None
        self._plain_dense = False  # set with _lists: every routed expert a plain dense matrix, one format
        self._int_lists: tuple | None = None  # set with _lists: (w1, s1, w2, s2, w3, s3, int4) of integer experts
        self.expert_parallel = None  # injected by the runtime: (x, ids, w, run_local) -> routed [T, D] fp32

    def post_load(self) -> None:
        """Weights were (re)assigned or expanded: rebuild the per-expert lists lazily."""
        self._lists = None

    def _weight_lists(self) -> tuple:
        if self._lists is None:
            cols = []
            for w in ("w1", "w2", "w3"):
                lins = [getattr(e, w) for e in self.experts]
                cols.append([l.weight for l in lins])
                cols.append([l.scale if l.packed else None for l in lins])
            self._lists = tuple(cols)
            lins = [l for e in self.experts for l in (e.w1, e.w2, e.w3)]
            self._plain_dense = not any(l.packed for l in lins) and len({(e.w1.fmt, e.w2.fmt, e.w3.fmt)
                                                                          for e in self.experts}) == 1
            fmts = {l.fmt for l in lins}
            self._int_lists = None
            if all(l.is_int for l in lins) and len(fmts) == 1:  # integer weights, one format for all
                cols = [[getattr(getattr(e, w), a) for e in self.experts] for w in ("w1", "w2", "w3")
                        for a in ("weight", "weight_scale")]
                self._int_lists = (*cols, fmts == {INT4})
        return self._lists

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x [T, D] normed FFN input; tokens [T] ids (hash routing). Returns [T, D] in x.dtype."""
        ids, w = self.gate(x, tokens)
        if self.expert_parallel is not None:
            routed = self.expert_parallel(x, ids, w, self.run_local)
        elif len(self.expert_ids) != self.args.n_routed_experts:
            raise RuntimeError(f"MoE holds {len(self.expert_ids)} of {self.args.n_routed_experts} routed experts "
                               "but no expert_parallel dispatcher is set")
        else:
            routed = self.run_local(x, ids, w)
        return (routed + self.shared_experts(x).float()).to(x.dtype)

    def run_local(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Routed experts held here: x [T, D]; ids [T, k] positions in `expert_ids` (-1 = skip); w [T, k] fp32.
        Returns [T, D] fp32."""
        w1, s1, w2, s2, w3, s3 = self._weight_lists()
        if self._int_lists is not None:  # W8A8 / W4A8 experts kept packed: one seam op for all of them
            iw1, is1, iw2, is2, iw3, is3, int4 = self._int_lists
            return ops.moe_experts_int(x, ids, w, iw1, is1, iw2, is2, iw3, is3, self.args.swiglu_limit, int4)
        if s1[0] is None:  # not FP8/FP4-packed: dense (expanded at load)
            return self._dense_experts(x, ids, w)
        return ops.moe_experts(x, ids, w, w1, s1, w2, s2, w3, s3, self.args.swiglu_limit, self.opts.quant_sim)

    def _dense_experts(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Dense (dequantized) routed experts, the maths of `Expert.forward` for all (token, expert) pairs at
        once: the activation quantisation is per row (1x128 runs), so quantising x once equals quantising each
        expert's rows, and the SwiGLU runs once over all pairs. Only the matmuls go expert by expert, each on
        its contiguous run of pairs (sorted by expert), as before: a GEMM's row results depend on its row
        count, so a padded batched matmul would make an expert's bits depend on which other experts share the
        rank, and expert-/data-parallel layouts would stop matching one process."""
        w1, _, w2, _, w3, _ = self._weight_lists()
        if not self._plain_dense:  # integer weights kept packed (their own GEMM ops), or mixed formats
            return self._expert_loop(x, ids, w)
        lim = self.args.swiglu_limit
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        groups = list(expert_groups(ids, len(w1)))  # (expert, its pairs, their tokens); -1 pairs left out
        if not groups:
            return out
        runs, sizes = [e for e, _, _ in groups], [len(p) for _, p, _ in groups]
        order, tok = torch.cat([p for _, p, _ in groups]), torch.cat([t for _, _, t in groups])
        e0 = next(iter(self.experts))  # every expert quantises its inputs the same way (one format)
        xq = e0.w1.quantize_input(x)[tok].split(sizes)  # the [P, D] pair rows, one run per expert

        def per_expert(ws: list[torch.Tensor], parts) -> torch.Tensor:
            dt = parts[0].dtype  # (a no-op .to() still costs a dispatch: ~300 expert GEMMs per decode step)
            return torch.cat([F.linear(p, ws[e] if ws[e].dtype == dt else ws[e].to(dt)) for e, p in zip(runs, parts)])

        g, u = per_expert(w1, xq).float(), per_expert(w3, xq).float()
        a = F.silu(g.clamp(max=lim)) * u.clamp(-lim, lim)  # [P, I] fp32
        a = e0.w2.quantize_input((a * w.reshape(-1)[order][:, None]).to(x.dtype))
        return out.index_add_(0, tok, per_expert(w2, a.split(sizes)).float())

    def _expert_loop(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        experts = list(self.experts.values())  # local position -> module
        for e, pairs, tok in expert_groups(ids, len(experts)):
            out.index_add_(0, tok, experts[e](x[tok], w.reshape(-1)[pairs]).float())
        return out
