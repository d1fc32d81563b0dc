"""`ascend-v4 generate`: run one prompt (raw or chat-encoded) through a model and print the completion."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click


@dataclass
class GenerateRequest:
    model: str = "tiny"
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    chat: bool = False
    thinking: str = "none"
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    dtype: str = "auto"
    device: str = "cpu"
    quant_sim: bool = True
    dummy: bool = False
    check_weights: bool = False
    verify_checkpoint: bool = False
    npus: int = 1
    tp: int | None = None
    dp: int | None = None
    nnodes: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    speculative: str = "auto"
    speculative_tokens: int = 0
    speculative_threshold: float = 0.0
    speculative_draft_sampling: str = "greedy"


def run_generate(req: GenerateRequest) -> dict:
    """Load the model, generate, and return a JSON-able result (ids, text, timings)."""
    from ascend_v4.api import LLM
    from ascend_v4.runtime.sampling import SamplingParams

    if (req.prompt is None) == (req.prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-ids")
    if req.chat and req.prompt is None:
        raise click.UsageError("--chat needs --prompt (a user message), not --prompt-ids")
    from ascend_v4.checkpoint.resolve import resolve_model
    from ascend_v4.model.args import ModelArgs
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.speculative import spec_report

    args = ModelArgs.from_dir(resolve_model(req.model, dummy=req.dummy).path)
    cfg = EngineConfig(max_num_batched_tokens=8192, enable_prefix_caching=False,
                       **engine_speculative(args, req.speculative, req.speculative_tokens, req.speculative_threshold,
                                            req.speculative_draft_sampling))
    llm = LLM(req.model, device=req.device, dtype=req.dtype, quant_sim=req.quant_sim, dummy=req.dummy,
              progress=True, check_weights=req.check_weights,
              verify_checkpoint=req.verify_checkpoint, npus=req.npus, tp=req.tp, dp=req.dp, nnodes=req.nnodes,
              master_addr=req.master_addr, master_port=req.master_port, engine_config=cfg)
    try:
        if req.npus > 1:
            click.echo(f"[generate] layout: {llm.layout.describe()}", err=True)
        sp = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed)
        if req.chat:
            res = llm.chat([{"role": "user", "content": req.prompt}], sp, thinking=req.thinking)[0]
        else:
            res = llm.generate([req.prompt if req.prompt is not None else req.prompt_ids], sp)[0]
        ranks = llm.rank_info()
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    out = res.outputs[0]
    keep = ("rank", "tp_rank", "experts", "weight_bytes", "routed_bytes", "tp_bytes", "replicated_bytes")
    return {"model": str(llm.path), "prompt_token_ids": res.prompt_token_ids, "token_ids": out.token_ids,
            "text": out.text, "reasoning_content": out.reasoning_content,
            "tool_calls": [getattr(t, "__dict__", t) for t in out.tool_calls],
            "finish_reason": out.finish_reason, "metrics": res.metrics, "layout": llm.layout.as_dict(),
            "speculative": spec_report(cfg.speculative, stats),
            "ranks": [{k: r[k] for k in keep} for r in ranks]}


# Shared with `ascend-v4 serve` and `bench offline`.
def speculative_options(f):
    """--speculative / --speculative-tokens / --speculative-threshold / --speculative-draft-sampling
    (docs/dspark.md)."""
    f = click.option("--speculative-draft-sampling", type=click.Choice(["greedy", "sample"]), default="greedy",
                     show_default=True,
                     help="DSpark drafts for sampled requests (temperature > 0): greedy (vLLM's recipe; a seeded "
                          "request gives the same tokens as without drafts) or sample (drawn at the request's "
                          "temperature as the official reference, verified by speculative sampling: the same output "
                          "distribution, more drafts accepted).")(f)
    f = click.option("--speculative-threshold", default=0.0, show_default=True,
                     type=click.FloatRange(0, 1, max_open=True),
                     help="DSpark adaptive draft length: cut each draft before the first position whose confidence "
                          "(sigmoid of the confidence head) is below this. 0 = fixed length.")(f)
    f = click.option("--speculative-tokens", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Draft tokens per step and request. 0 = the method's default: MTP 1, DSpark the "
                          "checkpoint's dspark_block_size (5; vLLM's DSpark recipe uses 7).")(f)
    return click.option("--speculative", type=click.Choice(["auto", "none", "mtp", "dspark"]), default="auto",
                        show_default=True,
                        help="Speculative decoding. auto = what the checkpoint carries: DSpark for V4-Flash-0731 / "
                             "V4-Pro-0813, MTP (1 token) for the April checkpoints. Output is the same as without "
                             "drafts (greedy: identical; sampling: the same tokens for a seeded request).")(f)


def engine_speculative(model_args, speculative: str, tokens: int, threshold: float, draft_sampling: str) -> dict:
    """EngineConfig keyword arguments for the --speculative options of a model."""
    from ascend_v4.runtime.speculative import resolve_method

    return dict(speculative=resolve_method(speculative, model_args), speculative_tokens=tokens,
                speculative_threshold=threshold, speculative_draft_sampling=draft_sampling)


def multinode_options(f):
    """--nnodes / --node-rank / --master-addr / --master-port (torchrun-style variables as defaults)."""
    f = click.option("--master-port", type=click.IntRange(1, 65535), default=None,
                     help="Port of node 0's rendezvous (default: MASTER_PORT; a free one on a single node).")(f)
    f = click.option("--master-addr", default=None, help="Node 0's address (default: MASTER_ADDR).")(f)
    f = click.option("--node-rank", type=click.IntRange(min=0), default=None,
                     help="This node's index (default: NODE_RANK / GROUP_RANK, else 0). Node 0 runs the engine "
                          "front; node K > 0 only starts its --npus / --nnodes ranks and waits for node 0.")(f)
    return click.option("--nnodes", type=click.IntRange(min=1), default=None,
                        help="Nodes of a multi-node run (default: NNODES, else 1); run the same command on every "
                             "node with its --node-rank.")(f)


def run_other_node(npus: int, nnodes, node_rank, master_addr, master_port) -> bool:
    """For node K > 0: start its ranks, wait for them, exit with their status (True: this was such a node)."""
    from ascend_v4.runtime.node import NodeSpec, run_node

    node = NodeSpec.from_env(nnodes, node_rank, master_addr, master_port)
    if node.node_rank == 0:
        return False
    try:
        node.check(npus)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    r = node.local_ranks(npus)
    click.echo(f"[node {node.node_rank}] ranks {r.start}..{r.stop - 1} of {npus}; rank 0 at "
               f"{node.master_addr}:{node.master_port}", err=True)
    code = run_node(node, npus)
    click.echo(f"[node {node.node_rank}] ranks ended (status {code})", err=True)
    raise SystemExit(code)


NPUS_HELP = ("Devices (ranks): N - 1 worker processes are started; the routed experts are split over all N "
             "(expert parallelism). Several nodes: --nnodes / --node-rank.")
TP_HELP = ("Attention tensor parallelism: the query heads, output groups and vocab are split over groups of T "
           "ranks (the KV cache, indexer and compressors stay whole); T must divide the model's o_groups. "
           "Default: the planner's choice (serve --hardware: the smallest T that fits), else 1; the layout is "
           "printed at start.")
DP_HELP = ("Attention data parallelism: --npus / --tp groups, each with its own scheduler, cache and requests "
           "(routed to the least loaded group, or with prefix caching to the group holding the prompt's first "
           "blocks); every group's tokens meet the expert owners in one exchange per MoE layer. --tp x --dp = "
           "--npus; give either.")
CHECK_WEIGHTS_HELP = ("While loading, check every float weight for NaN / inf (FP8: NaN bytes) and fail naming the "
                      "file, tensor and element. UE8M0 scales are always checked (NaN byte, overflowing scale).")
VERIFY_CHECKPOINT_HELP = ("Before loading, re-hash every file of an `ascend-v4 quantize` output against its "
                          "ascend_v4_manifest.json and fail naming any file that differs. A directory without a "
                          "manifest (official checkpoints, dummies) is an error: there is nothing to verify.")


def _parse_ids(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")


@click.command("generate")
@click.option("--model", default="tiny", show_default=True,
              help="Preset (tiny/small: dummy weights made on the fly; flash/pro: real weights), "
                   "checkpoint directory, or Hugging Face repo id in the local cache.")
@click.option("--prompt", help="Prompt text (raw continuation, BOS prepended; with --chat: the user message).")
@click.option("--prompt-ids", callback=_parse_ids, help="Prompt as comma-separated token ids, used verbatim.")
@click.option("--chat", is_flag=True, help="Encode --prompt as a user turn with the official V4 chat encoding.")
@click.option("--thinking", type=click.Choice(["none", "high", "max"]), default="none", show_default=True,
              help="Chat thinking mode: none = non-think; high = <think>; max = think with the max-effort preamble.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=-1), help="0 or -1 = off.")
@click.option("--seed", type=int, help="Sampling seed (reproducible output).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="Activation dtype; auto = fp32 on CPU (bf16 matmul is very slow on most CPUs), bf16 elsewhere.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or npu.")
@click.option("--no-quant-sim", is_flag=True,
              help="Skip the FP8/FP4 QAT numerics simulation (matches plain-precision implementations).")
@click.option("--dummy", is_flag=True, help="With --model flash/pro: random weights of the real shapes.")
@click.option("--check-weights", is_flag=True, help=CHECK_WEIGHTS_HELP)
@click.option("--verify-checkpoint", is_flag=True, help=VERIFY_CHECKPOINT_HELP)
@click.option("--npus", default=1, show_default=True, type=click.IntRange(min=1), help=NPUS_HELP)
@click.option("--tp", type=click.IntRange(min=1), default=None, help=TP_HELP)
@click.option("--dp", type=click.IntRange(min=1), default=None, help=DP_HELP)
@multinode_options
@speculative_options
@click.option("--json", "as_json", is_flag=True,
              help="Print ids, text, timings, the parallel layout, each rank's resident weight bytes and the "
                   "speculative decoding figures (drafted / accepted tokens, per-position acceptance) as JSON.")
def generate(model, prompt, prompt_ids, chat, thinking, max_tokens, temperature, top_p, top_k, seed, dtype,
             device, no_quant_sim, dummy, check_weights, verify_checkpoint, npus, tp, dp, nnodes, node_rank,
             master_addr, master_port, speculative, speculative_tokens, speculative_threshold,
             speculative_draft_sampling, as_json):
    """Generate a completion for one prompt.

    \b
    Examples:
      ascend-v4 generate --prompt "The capital of France is" --max-tokens 16
      ascend-v4 generate --model tiny --chat --thinking high --prompt "Why is the sky blue?"
      ascend-v4 generate --model /data/DeepSeek-V4-Flash --prompt-ids 0,1234,5678 --json
      ascend-v4 generate --model tiny --npus 2 --tp 2 --prompt "Hello" --json
      ascend-v4 generate --model tiny --npus 4 --nnodes 2 --node-rank 0 --master-addr HEAD --master-port 29500 ...
      (and on the second node the same command with --node-rank 1)
    Dummy checkpoints have random weights: their text is gibberish by design.
    """
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError

    run_other_node(npus, nnodes, node_rank, master_addr, master_port)
    req = GenerateRequest(model, prompt, prompt_ids, chat, thinking, max_tokens, temperature, top_p, top_k,
                          seed, dtype, device, not no_quant_sim, dummy, check_weights, verify_checkpoint, npus, tp, dp,
                          nnodes, master_addr, master_port, speculative, speculative_tokens, speculative_threshold,
                          speculative_draft_sampling)
    try:
        res = run_generate(req)
    except (CheckpointError, ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False))
        return
    if res["reasoning_content"]:
        click.echo(f"[reasoning] {res['reasoning_content']}")
    click.echo(res["text"])
    m = res["metrics"]
    sp = res["speculative"]
    drafts = "" if sp["method"] == "none" or not sp["proposed"] else \
        f", {sp['method']}: {sp['accepted']}/{sp['proposed']} draft tokens accepted, " \
        f"{sp['tokens_per_step']:.2f} tokens per verify step"
    click.echo(f"[{len(res['token_ids'])} tokens, finish={res['finish_reason']}, prefill {m['prefill_s']:.2f}s, "
               f"decode {m['decode_tok_s']:.1f} tok/s{drafts}]", err=True)
