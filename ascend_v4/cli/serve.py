"""`ascend-v4 serve`: the OpenAI- and Anthropic-compatible HTTP server (ascend_v4.server; docs/serving.md)."""

from __future__ import annotations

import sys

import click

from ascend_v4.cli.generate import (CHECK_WEIGHTS_HELP, DP_HELP, NPUS_HELP, TP_HELP, VERIFY_CHECKPOINT_HELP,
                                   multinode_options, run_other_node, speculative_options)


def _echo(line: str) -> None:
    click.echo(line)


@click.command("serve")
@click.option("--model", default=None,
              help="Preset (flash/pro: real weights; tiny/small: dummy weights), checkpoint directory, or Hugging "
                   "Face repo id in the local cache. Default: the tiny dummy, for trying the API.")
@click.option("--npus", default=1, show_default=True, type=int, help=NPUS_HELP)
@click.option("--tp", type=click.IntRange(min=1), default=None, help=TP_HELP)
@click.option("--dp", type=click.IntRange(min=1), default=None, help=DP_HELP)
@multinode_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--api-key", default=None, help="Require this key (Authorization: Bearer KEY or x-api-key: KEY).")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Model name clients use (repeatable; the first is reported). Default: deepseek-v4-flash / "
                   "deepseek-v4-pro for those presets, else the --model text. deepseek-chat and "
                   "deepseek-reasoner are always accepted as aliases fixing the thinking mode.")
@click.option("--max-num-seqs", default=32, show_default=True, type=click.IntRange(min=1),
              help="Sequences decoded together at most.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting beyond the running ones; more get HTTP 429 with Retry-After.")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Context length (prompt + output) per request. Default: the model's.")
@click.option("--max-num-batched-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Token budget of one engine step (longer prompts are prefilled in chunks).")
@click.option("--cache-gib", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory for the compressed part of the paged cache (CSA/HCA entries, indexer keys); the "
                   "sliding-window blocks are sized from --max-num-seqs on top.")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="Cache entries in the activation dtype, or as 584-byte FP8 entries (e4m3 latent + bf16 RoPE "
                   "dims + UE8M0 scales; about half the bytes of bf16).")
@speculative_options
@click.option("--block-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens per cache block (a multiple of 128 for V4): the unit of paging and prefix-cache hits.")
@click.option("--no-prefix-caching", is_flag=True, help="Do not reuse cached prompt prefixes.")
@click.option("--device", default="auto", show_default=True, help="auto (detect), cpu, cuda or npu.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@click.option("--dummy", is_flag=True, help="With --model flash/pro: random weights of the real shapes.")
@click.option("--hardware", type=click.Choice(["910b", "910c", "950", "h100", "h200"]), default=None,
              help="The card the --npus run on: before loading anything, refuse a layout that does not fit its memory "
                   "(weights per card + reserve + one --max-model-len sequence of KV cache; `ascend-v4 plan`).")
@click.option("--check-weights", is_flag=True, help=CHECK_WEIGHTS_HELP)
@click.option("--verify-checkpoint", is_flag=True, help=VERIFY_CHECKPOINT_HELP)
@click.option("--require-reasoning-passback", is_flag=True,
              help="Answer 400, as DeepSeek's API does, when an assistant tool-call turn in thinking mode comes "
                   "back without its reasoning_content.")
@click.option("--honor-sampling-in-thinking", is_flag=True,
              help="Apply temperature, top_p, presence_penalty and frequency_penalty in thinking mode too. Default: "
                   "as DeepSeek's API, they are accepted but ignored there (temperature 1.0, top_p 1.0 are used).")
@click.option("--encoder-version", type=click.Choice(["auto", "april", "0731"]), default="auto", show_default=True,
              help="Chat encoder's effort-preamble ladder; auto = 0731 for checkpoints with DSpark heads.")
@click.option("--default-max-tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Chat output budget when a request gives no max_tokens.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On Ctrl-C, seconds to let in-flight requests finish.")
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(model, npus, tp, dp, nnodes, node_rank, master_addr, master_port, host, port, api_key, served_model_names, max_num_seqs, max_queue, max_model_len,
          max_num_batched_tokens, cache_gib, kv_cache_dtype, speculative, speculative_tokens, speculative_threshold,
          speculative_draft_sampling, block_size, no_prefix_caching, device, dtype, dummy,
          hardware, check_weights, verify_checkpoint, require_reasoning_passback, honor_sampling_in_thinking, encoder_version,
          default_max_tokens, drain_timeout, access_log, log_level):
    """Serve a model over HTTP: OpenAI (/v1/chat/completions, /v1/completions, /v1/models) and Anthropic
    (/v1/messages, /v1/messages/count_tokens) APIs with DeepSeek's semantics, plus /health, /metrics,
    /tokenize and /detokenize.

    \b
    Examples:
      ascend-v4 serve                                   # tiny dummy model on 127.0.0.1:8000
      ascend-v4 serve --model flash --api-key sk-local --max-model-len 131072
      ascend-v4 serve --model /data/DeepSeek-V4-Flash --host 0.0.0.0 --port 8000
      ascend-v4 serve --model /data/pro-w4a8 --npus 16 --tp 16 --hardware 910c   # `ascend-v4 plan` prints this
      ascend-v4 serve --model /data/flash-w8a8 --npus 16 --tp 2 --dp 8
    """
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"the server needs the `server` extra: pip install 'ascend-v4[server]' ({e})") \
            from None
    run_other_node(npus, nnodes, node_rank, master_addr, master_port)  # node K > 0: its ranks only, no server
    from ascend_v4.server.launch import ServeError, ServeOptions, exit_process, serve as run_serve
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError

    opts = ServeOptions(model=model, host=host, port=port, npus=npus, tp=tp, dp=dp, nnodes=nnodes, master_addr=master_addr,
                        master_port=master_port, api_key=api_key,
                        served_model_names=list(served_model_names), max_num_seqs=max_num_seqs, max_queue=max_queue,
                        max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                        cache_gib=cache_gib, kv_cache_dtype=kv_cache_dtype, speculative=speculative,
                        speculative_tokens=speculative_tokens, speculative_threshold=speculative_threshold,
                        speculative_draft_sampling=speculative_draft_sampling,
                        block_size=block_size,
                        enable_prefix_caching=not no_prefix_caching, device=device, dtype=dtype,
                        dummy=dummy, hardware=hardware, check_weights=check_weights, verify_checkpoint=verify_checkpoint,
                        require_reasoning_passback=require_reasoning_passback,
                        honor_sampling_in_thinking=honor_sampling_in_thinking,
                        encoder_version=encoder_version, default_max_tokens=default_max_tokens,
                        drain_timeout_s=drain_timeout, access_log=access_log, log_level=log_level)
    try:
        run_serve(opts, echo=_echo)
    except (ServeError, CheckpointError, ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    # Stopped cleanly (Ctrl-C / SIGTERM): leave without the slow interpreter teardown, so the exit stays
    # within --drain-timeout + 1 s. Only in a real `ascend-v4 serve` process: not where stdout is swapped
    # (click's CliRunner, pytest's capture), which means serve() was called inside another program.
    if sys.stdout is sys.__stdout__:
        exit_process(0)
