"""Speculative decoding in the engine: the draft proposers (MTP, DSpark) and the chain verification rule.

A sequence with a draft `d_0 .. d_{K-1}` feeds `[last, d_0 .. d_{K-1}]` in one step; the target samples one token
per row (row j with the drafts before it counted as output: penalties, min_tokens). Verification keeps target
samples while they equal the draft: y_0 = d_0, ..., and stops at the first y_n != d_n (or after y_K, the bonus).
Every kept token is a sample of the target distribution given the tokens before it, so the output has exactly
the distribution of decoding without drafts (greedy: the same tokens). With a greedy draft (one-hot p_d) this is
the standard accept rule of speculative sampling: d_n is accepted with probability p_t(d_n), and at the first
rejection y_n is distributed as norm(max(p_t - p_d, 0)) = p_t without d_n, renormalised (dspark-spec.md §3).

With `speculative_draft_sampling="sample"` a sampled request's DSpark drafts are drawn at its temperature from
the Markov-corrected distribution q (as the official reference does) and verified by speculative sampling against
q (`verify_sampled`): the same output distribution, not the same tokens as without drafts.

Rejected positions are undone: MTP rolls the whole step back (the real token is fed again next step); DSpark
keeps the accepted prefix (`Transformer.truncate_step`: cache rollback, then the kept tokens' compressor updates
replayed from the recorded projections), so the next step starts right after the bonus token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ascend_v4.model.cache import SeqSlice, StepBatch

from .sampling import (SampleRow, Sampled, position_generator, sample_batch, target_probabilities,
                       with_logprobs)


DRAFT_SALT = 1 << 40  # draft slot generators: (seed, DRAFT_SALT + position), apart from the target's


def accepted_prefix(sampled: list[Sampled], draft: list[int]) -> int:
    """How many draft tokens the target's samples confirm (row j's sample against draft token j)."""
    n = 0
    while n < len(draft) and sampled[n].token == draft[n]:
        n += 1
    return n


@dataclass
class SpecStats:
    """Acceptance bookkeeping: `proposed` / `accepted` draft tokens, `verify_steps` (sequence-steps that carried a
    draft), per-position counts (position j = the j-th draft token of a chain: reached, accepted) and the time
    spent drafting."""

    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    positions: list[list[int]] = field(default_factory=list)  # [reached, accepted] per draft position
    draft_seconds: float = 0.0

    def record(self, k: int, n: int) -> None:
        self.proposed += k
        self.accepted += n
        self.verify_steps += 1
        while len(self.positions) < k:
            self.positions.append([0, 0])
        for j in range(min(n + 1, k)):  # positions up to the first rejection were checked
            self.positions[j][0] += 1
            self.positions[j][1] += j < n

    def as_dict(self) -> dict:
        """For `Engine.stats`: counts, per-position counts, and the ratios `spec_ratios` derives from them."""
        return spec_ratios({"spec_proposed": self.proposed, "spec_accepted": self.accepted,
                            "spec_verify_steps": self.verify_steps, "spec_draft_seconds": self.draft_seconds,
                            "spec_position_reached": [r for r, _ in self.positions],
                            "spec_position_accepted": [a for _, a in self.positions]})


def spec_ratios(st: dict) -> dict:
    """Adds to stats holding the speculative counts (one engine's, or several DP groups' summed) the tokens per
    verify step (accepted drafts + the target's own token) and the acceptance rate of each draft position
    (accepted / reached: the chance that position j is accepted given that 0 .. j-1 were)."""
    steps = st.get("spec_verify_steps", 0)
    reached, acc = st.get("spec_position_reached", []), st.get("spec_position_accepted", [])
    return {**st, "spec_tokens_per_step": (st.get("spec_accepted", 0) + steps) / steps if steps else 0.0,
            "spec_acceptance_per_position": [a / r if r else 0.0 for r, a in zip(reached, acc)]}


def spec_report(method: str, stats: dict) -> dict:
    """The speculative decoding figures of an engine's stats, keys without the `spec_` prefix (generate --json,
    bench offline)."""
    keys = ("spec_proposed", "spec_accepted", "spec_verify_steps", "spec_tokens_per_step",
            "spec_acceptance_per_position", "spec_draft_seconds")
    return {"method": method, **{k.removeprefix("spec_"): stats.get(k, 0) for k in keys}}


def mtp_propose(engine, x: torch.Tensor, kept: list) -> None:
    """Run the MTP block over every row the main model kept this step (its window cache needs them all) and draft
    one token for each sequence that just produced one."""
    model = engine.model
    live = [(c, s) for c, s in kept if not c.seq.finished]
    if not live:
        if engine.lockstep:  # the MTP block's MoE exchanges with every rank
            empty = engine._empty_batch()
            model.mtp_logits(x[:0], empty.tokens, empty, rows=empty.tokens)
        return
    seqs, toks, poss, idx, draft_rows, off = [], [], [], [], [], 0
    for c, s in live:
        seq, n = c.seq, len(c.tokens)
        seqs.append(SeqSlice(seq.cache, off, s.start, n))
        toks += seq.token_slice(s.start + 1, s.start + n + 1)  # the token after each position
        poss += range(s.start, s.start + n)
        idx += range(s.offset, s.offset + n)
        if c.needs_logits:
            draft_rows.append((seq, off + n - 1))
        off += n
    mb = StepBatch(torch.tensor(toks, device=x.device), torch.tensor(poss, device=x.device), seqs)
    rows = torch.tensor([r for _, r in draft_rows], dtype=torch.long, device=x.device)
    lg = model.mtp_logits(x[torch.tensor(idx, device=x.device)], mb.tokens, mb, rows=rows)
    drafts = lg.max(-1).indices.tolist()
    if engine.token_sync is not None:  # every rank must verify the same drafts
        drafts = [d.token for d in engine.token_sync([Sampled(t) for t in drafts])]
    for (seq, _), d in zip(draft_rows, drafts):
        # structured outputs: a draft the grammar forbids cannot be accepted; do not verify it
        seq.draft = [d] if seq.matcher is None or seq.matcher.valid_prefix([d]) else None


def dspark_propose(engine, seqs: list) -> None:
    """Draft the next chain of every sequence in `seqs` that just produced a token and may produce more: one
    DSpark forward for all of them (anchor = its last token, main position = its last computed one), cut to what
    the request can still use, under a grammar before its first disallowed token (each verify row then gets its
    own mask) and, with `speculative_threshold`, at the first position whose confidence falls below it."""
    cfg, model = engine.config, engine.model
    k = engine.spec_tokens
    want = []
    for seq in seqs:
        left = min(seq.params.max_tokens - len(seq.output_ids), engine.max_model_len - seq.num_tokens + 1) - 1
        if not seq.finished and left > 0:
            want.append((seq, min(k, left)))
    if not want and not engine.lockstep:
        return
    t0 = time.perf_counter()
    dev = engine.device
    anchors = torch.tensor([s.output_ids[-1] for s, _ in want], dtype=torch.long, device=dev)
    main_pos = torch.tensor([s.num_computed - 1 for s, _ in want], dtype=torch.long, device=dev)
    sample = {}  # sampled drafts: each slot its own generator, keyed like the target's (seed, position)
    if cfg.speculative_draft_sampling == "sample":
        sample = {i: (s.params.temperature, [position_generator(s.generator, DRAFT_SALT + len(s.output_ids) + j)
                                             for j in range(k)])
                  for i, (s, _) in enumerate(want) if not s.params.greedy}
    draft = model.dspark_draft(anchors, main_pos, [s.cache for s, _ in want], k, sample=sample)
    tokens = draft.tokens.tolist()
    conf = torch.sigmoid(draft.confidence).tolist()
    tau = cfg.speculative_threshold
    lengths = [n if tau <= 0 else next((j for j in range(n) if c[j] < tau), n) for (_, n), c in zip(want, conf)]
    if engine.token_sync is not None:  # a TP group verifies its leader's chains: tokens and lengths
        flat = engine.token_sync([Sampled(t) for row in tokens for t in row] + [Sampled(n) for n in lengths])
        tokens = [[flat[i * k + j].token for j in range(k)] for i in range(len(tokens))]
        lengths = [s.token for s in flat[len(tokens) * k:]]
    for i, ((seq, _), row, c, n) in enumerate(zip(want, tokens, conf, lengths)):
        if seq.matcher is not None and n:  # structured outputs: the draft stops before its first disallowed token
            n = seq.matcher.valid_prefix(row[:n])
        seq.draft = row[:n] or None
        seq.draft_confidence = c[:n] or None
        seq.draft_probs = draft.probs[i][:n] if n and i in draft.probs else None
    engine.spec_stats.draft_seconds += time.perf_counter() - t0


def carried_method(args) -> str:
    """The speculative method a checkpoint's weights allow: dspark (0731/0813), mtp (April), or none."""
    return "dspark" if args.has_dspark else ("mtp" if args.n_mtp_layers else "none")


def resolve_method(method: str | None, args) -> str:
    """`auto` (or None) -> what the checkpoint carries; anything else as given (checked by the engine)."""
    return carried_method(args) if method in (None, "auto") else method


def verify_sampled(logits: torch.Tensor, rows: list[SampleRow], draft: list[int], q: torch.Tensor) -> list[Sampled]:
    """Speculative sampling of one chain whose drafts were sampled: logits [k+1, V] (the rows of the last known
    token and of each draft token), their SampleRows, the draft d_0 .. d_{k-1} and the distributions q [k, V] it
    was drawn from. Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)) (p_j: the target's
    distribution after penalties, masks, temperature, top-k/p); at the first rejection the token is drawn from
    norm(max(p_j - q_j, 0)); after k acceptances a bonus token from p_k. Each row draws with its own position
    generator. Returns one Sampled per row like `sample_batch` (rows after the first rejection: token -1, never
    compared), so the caller's prefix match keeps exactly the accepted tokens and the final one."""
    out: list[Sampled] = []
    for j, d in enumerate(draft):
        row = rows[j]
        p = target_probabilities(logits[j], row)
        u = float(torch.rand((), generator=row.gen))
        if u * float(q[j, d]) < float(p[d]):
            out.append(with_logprobs(logits[j].float(), row.params, d))
            continue
        residual = (p - q[j]).clamp_min(0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p  # p == q: nothing left to correct
        out.append(with_logprobs(logits[j].float(), row.params, int(torch.multinomial(dist, 1, generator=row.gen))))
        return out + [Sampled(-1)] * (len(draft) - j)
    row = rows[len(draft)]
    tok = int(torch.multinomial(target_probabilities(logits[len(draft)], row), 1, generator=row.gen))
    return out + [with_logprobs(logits[len(draft)].float(), row.params, tok)]


def sample_step(logits: torch.Tensor, rows: list[SampleRow], chains: list[tuple[int, list[int], torch.Tensor]]):
    """Sample a step's logit rows: the chains with sampled drafts ((first row, draft, q)) by `verify_sampled`,
    every other row by `sample_batch`."""
    special = {r for first, d, _ in chains for r in range(first, first + len(d) + 1)}
    plain = [i for i in range(len(rows)) if i not in special]
    out: list[Sampled | None] = [None] * len(rows)
    if plain:
        sel = logits if len(plain) == len(rows) else logits[torch.tensor(plain, device=logits.device)]
        for i, s in zip(plain, sample_batch(sel, [rows[i] for i in plain])):
            out[i] = s
    for first, d, q in chains:
        end = first + len(d) + 1
        out[first:end] = verify_sampled(logits[first:end], rows[first:end], d, q)
    return out


def default_tokens(method: str, args, requested: int) -> int:
    """Draft tokens per step: `requested`, or the default of the method (MTP 1, DSpark the block size)."""
    if requested:
        return requested
    return 1 if method == "mtp" else (args.dspark_block_size if method == "dspark" else 0)


def check_method(method: str, args, where: str) -> None:
    """Refuse a speculative method the checkpoint cannot run, naming what it carries."""
    carries = carried_method(args)
    if method == "mtp" and not args.n_mtp_layers or method == "dspark" and not args.has_dspark:
        raise ValueError(f"speculative={method!r}: {where} carries no {method.upper()} weights "
                         f"(it has: {carries}); use speculative='none'" + (f" or '{carries}'" if carries != "none"
                                                                             else ""))


__all__ = ["accepted_prefix", "SpecStats", "spec_ratios", "spec_report", "verify_sampled", "sample_step",
           "DRAFT_SALT", "mtp_propose", "dspark_propose", "carried_method", "resolve_method", "default_tokens",
           "check_method"]
