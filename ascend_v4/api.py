"""Offline Python API: `LLM(model=...)` with `generate(prompts)` and `chat(messages, thinking=...)`.

    from ascend_v4 import LLM, SamplingParams
    llm = LLM(model="tiny")                          # a preset, a checkpoint directory or a HF repo id
    out = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
    out = llm.chat([{"role": "user", "content": "hi"}], thinking="high")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ascend_v4.chat.encoding import encode_messages, thinking_options
from ascend_v4.chat.parsing import parse_completion
from ascend_v4.checkpoint.errors import CheckpointError
from ascend_v4.checkpoint.loader import BAD_VALUES, scan_values, verify_checkpoint_files
from ascend_v4.checkpoint.resolve import resolve_model
from ascend_v4.model.args import ModelArgs
from ascend_v4.model.layers import ModelOptions
from ascend_v4.model.load import load_model
from ascend_v4.runtime.generate import complete
from ascend_v4.runtime.layout import choose_layout, resolve_tp
from ascend_v4.runtime.node import NodeSpec
from ascend_v4.runtime.sampling import SamplingParams
from ascend_v4.tokenizer import Tokenizer

log = logging.getLogger("ascend_v4")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
# Below this many bytes of dense weights, CPU runs dequantise FP8/FP4 once at load (no FP8 matmul on CPU).
_CPU_DEQUANT_LIMIT = 8 << 30


@dataclass
class CompletionOutput:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    reasoning_content: str | None = None  # chat(): the thinking part
    tool_calls: list[Any] = field(default_factory=list)  # chat(): parsed DSML tool calls


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: dict[str, float] = field(default_factory=dict)


class LLM:
    """A loaded DeepSeek-V4 model ready to generate.

    Args:
        model: preset name (`tiny`, `small` run on a cached dummy checkpoint; `flash`, `pro` need the real
            weights), a checkpoint directory, or a Hugging Face repo id present in the local cache.
        device: "cpu" (default), "cuda" or "npu".
        dtype: "auto" (default: fp32 on CPU, bf16 on NPU/CUDA), "bf16" or "fp32". On CPUs without
            AVX512-BF16 torch's bf16 matmul is about 1000x slower than fp32 (docs/perf.md), hence auto.
        quant_sim: replay the official FP8/FP4 QAT numerics (default True).
        dequantize_weights: expand FP8/FP4 weights at load; None = automatic (on CPU for models whose
            dense weights fit in 8 GiB).
        dummy: for `flash` / `pro`, run a dummy checkpoint of the real shapes instead of real weights.
        npus: devices (ranks) to run on: N - 1 worker processes are started, each rank holds
            n_routed_experts / N routed experts (docs/parallel.md). Call `shutdown()` when done (exit also stops
            them).
        nnodes / master_addr / master_port: a multi-node run (this is node 0; the other nodes run
            `runtime.node.run_node`, i.e. the same CLI command with --node-rank K); torchrun-style NNODES,
            MASTER_ADDR, MASTER_PORT are read when not given.
        tp / dp: attention tensor-parallel size (heads, output groups and vocab split over a group of tp ranks)
            and data-parallel groups (each with its own scheduler and requests); tp x dp = npus, give either or
            both. None: DP over every rank (tp 1). `self.layout` says which (docs/parallel.md).
        engine_config: the `EngineConfig` of `self.engine`, the one engine `generate` / `chat` (and the server and
            `bench offline`) drive: an `Engine`, or with npus > 1 rank 0's `DistEngine`. Default: 8192-token
            steps, no prefix cache.
        speculative: speculative decoding, overriding `engine_config`'s: "auto" (what the checkpoint carries:
            DSpark for 0731/0813, MTP for April checkpoints), "none", "mtp" or "dspark" (docs/dspark.md). None:
            `engine_config`'s setting (default none, as vLLM).
        speculative_tokens: draft tokens per step (None: `engine_config`'s; 0: the method's default, MTP 1,
            DSpark the checkpoint's block size).
        speculative_threshold: DSpark's adaptive draft length: cut each chain before the first position whose
            confidence is below it (None: `engine_config`'s; 0: fixed length).
        check_weights: check every float weight for NaN / inf while loading (UE8M0 scales are always checked);
            with `npus > 1`, one pass over the whole checkpoint before the ranks load.
        verify_checkpoint: before loading, re-hash every file of an `ascend-v4 quantize` output against its
            manifest; a directory without a manifest raises (nothing to verify).

    Raises:
        CheckpointError: bad checkpoint, including bad values and (verify_checkpoint) file hash mismatches.
    """

    def __init__(self, model: str | Path = "tiny", *, device: str = "cpu", dtype: str = "auto",
                 quant_sim: bool = True, dequantize_weights: bool | None = None, dummy: bool = False,
                 progress: bool = False, npus: int = 1, tp: int | None = None, dp: int | None = None,
                 nnodes: int | None = None, master_addr: str | None = None, master_port: int | None = None,
                 engine_config=None, speculative: str | None = None, speculative_tokens: int | None = None,
                 speculative_threshold: float | None = None,
                 check_weights: bool = False, verify_checkpoint: bool = False):
        if dtype == "auto":
            dtype = "fp32" if torch.device(device).type == "cpu" else "bf16"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
        resolved = resolve_model(model, dummy=dummy)
        self.path = resolved.path
        if verify_checkpoint:
            verify_checkpoint_files(self.path)
        self.args = ModelArgs.from_dir(self.path)
        self.layout = choose_layout(self.args, npus, resolve_tp(npus, tp, dp))
        node = NodeSpec.from_env(nnodes, 0, master_addr, master_port)
        node.check(npus)
        tdtype = _DTYPES[dtype]
        if dequantize_weights is None:
            dense = self.args.param_counts()["total"] * torch.finfo(tdtype).bits // 8
            dequantize_weights = torch.device(device).type == "cpu" and dense <= _CPU_DEQUANT_LIMIT
        self.options = ModelOptions(dtype=tdtype, quant_sim=quant_sim, dequantize_weights=dequantize_weights)
        tok_file = self.path / "tokenizer.json"
        self.tokenizer = Tokenizer.from_dir(self.path) if tok_file.is_file() else Tokenizer.default()
        engine_config = _with_speculative(engine_config, self.args, speculative, speculative_tokens,
                                          speculative_threshold)
        self.speculative = engine_config.speculative if engine_config is not None else "none"  # method in use
        if npus > 1:
            from ascend_v4.runtime.config import EngineConfig
            from ascend_v4.runtime.dist_engine import DistEngine
            from ascend_v4.runtime.distributed import ParallelConfig

            if check_weights:  # the ranks load their own parts (scales checked there): check everything once here
                bad = scan_values(self.path, progress=progress)
                if bad:
                    raise CheckpointError.from_problems(f"{self.path}: {BAD_VALUES}", bad)
            self.engine = DistEngine(self.path, self.options,
                                     engine_config or EngineConfig(max_num_batched_tokens=8192,
                                                                   enable_prefix_caching=False),
                                     ParallelConfig.from_env(npus, tp=self.layout.tp,
                                                             nproc_per_node=npus // node.nnodes
                                                             if node.nnodes > 1 else None,
                                                             master_addr=node.master_addr,
                                                             master_port=node.master_port),
                                     device_type=torch.device(device).type,
                                     tokenizer_dir=str(self.path) if tok_file.is_file() else None,
                                     tokenizer=self.tokenizer)
            self.model = self.engine.model  # rank 0's share of the routed experts
        else:
            from ascend_v4.runtime.config import EngineConfig
            from ascend_v4.runtime.engine import Engine

            self.model = load_model(self.path, self.options, device=device, progress=progress,
                                    check_weights=check_weights)
            self.engine = Engine(self.model, self.tokenizer, engine_config or EngineConfig(
                max_num_batched_tokens=8192, enable_prefix_caching=False))
        if resolved.is_dummy:
            log.info("%s: dummy checkpoint (random weights) at %s", model, self.path)

    def shutdown(self) -> None:
        """Stop the worker processes of an `npus > 1` run (no-op otherwise)."""
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    def rank_info(self) -> list[dict]:
        """Per rank: what it holds (routed expert ids, TP place, resident weight bytes by placement, pid)."""
        if hasattr(self.engine, "rank_info"):
            return self.engine.rank_info()
        from ascend_v4.runtime.worker import rank_info

        return [rank_info(self.model, 0)]

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Continue raw prompts: strings are tokenized as they are (BOS prepended), id lists used verbatim."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts, ids = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                texts.append(p)
                ids.append([self.args.bos_token_id] + self.tokenizer.encode(p))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                texts.append(None)
                ids.append(list(p))
            else:
                raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        return self._run(texts, ids, sampling_params, parse=None)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], sampling_params=None, *,
             thinking: str = "none", tools: list[dict] | None = None) -> list[RequestOutput]:
        """Chat with the official V4 encoding. `thinking`: "none" (chat mode), "high" or "max".

        `messages` is one conversation (list of dicts) or a list of conversations. Outputs carry the
        completion split into `reasoning_content`, `text` (content) and parsed `tool_calls`.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        mode, effort = thinking_options(thinking)
        texts, ids = [], []
        for conv in convs:
            text = encode_messages(list(conv), mode, reasoning_effort=effort, tools=tools)
            texts.append(text)
            ids.append(self.tokenizer.encode(text))
        return self._run(texts, ids, sampling_params, parse=(mode == "thinking"))

    def _run(self, texts, ids, sampling_params, parse: bool | None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        comps = complete(self.engine, ids, params)
        results = []
        for text, comp in zip(texts, comps):
            out_ids = comp.token_ids
            decoded = comp.text  # stop tokens and text after a stop string are not part of it
            co = CompletionOutput(decoded, out_ids, comp.finish_reason)
            if parse is not None:
                pm = parse_completion(decoded, thinking=parse)
                co.text, co.reasoning_content, co.tool_calls = pm.content, pm.reasoning_content, pm.tool_calls
            n = len(out_ids)
            metrics = {"prefill_s": comp.prefill_s, "decode_s": comp.decode_s,
                       "decode_tok_s": (n - 1) / comp.decode_s if n > 1 and comp.decode_s > 0 else 0.0}
            results.append(RequestOutput(text, comp.prompt_token_ids, [co], metrics))
        return results


def _with_speculative(cfg, args, method: str | None, tokens: int | None, threshold: float | None):
    """`cfg` (None: the default `LLM` engine config) with the speculative settings given to `LLM`."""
    if method is None and tokens is None and threshold is None:
        return cfg
    import dataclasses

    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.speculative import resolve_method

    cfg = cfg or EngineConfig(max_num_batched_tokens=8192, enable_prefix_caching=False)
    change = {}
    if method is not None:
        change.update(speculative=resolve_method(method, args), speculative_mtp=False)
    if tokens is not None:
        change["speculative_tokens"] = tokens
    if threshold is not None:
        change["speculative_threshold"] = threshold
    return dataclasses.replace(cfg, **change)

