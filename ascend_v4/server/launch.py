"""What `ascend-v4 serve` runs: options -> model + engine -> app -> uvicorn on a socket bound up front.

The socket is bound before the model loads, so a busy port fails at once; `--port 0` picks a free port and
the startup line prints the real URL. Ctrl-C (SIGINT) or SIGTERM: uvicorn stops accepting, waits up to
`drain_timeout_s` for in-flight requests (streams included) to finish, then the app's shutdown stops the
engine. A second Ctrl-C ends the open requests at once (as the drain timeout does), a third forces the exit.

At the drain timeout the server ends what is still open itself (`ServerState.stop_requests`): streams get
their API's terminal error events, non-streaming requests a 503, and their engine requests are aborted, so
every connection closes cleanly. uvicorn's own `timeout_graceful_shutdown` (which cancels the request tasks,
truncating bodies and logging CancelledError tracebacks) is only a backstop `SHUTDOWN_GRACE_S` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger("ascend_v4.server")

DEFAULT_MODEL = "tiny"
# After the drain timeout, time for open requests to send their terminal events before uvicorn cancels them.
SHUTDOWN_GRACE_S = 0.5
# Served names of the real presets (serving-notes §1.1); others serve the --model text itself.
PRESET_NAMES = {"flash": "deepseek-v4-flash", "pro": "deepseek-v4-pro"}


class ServeError(Exception):
    """Bad options or a start-up failure, reported as one line."""


@dataclass
class ServeOptions:
    """Options of `ascend-v4 serve` (see its --help for each)."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    npus: int = 1
    tp: int | None = None  # attention TP; None: the planner's choice with --hardware, else from dp (or 1)
    dp: int | None = None  # attention DP groups (tp x dp = npus)
    nnodes: int | None = None  # multi-node: this process is node 0 (runtime/node.py)
    master_addr: str | None = None
    master_port: int | None = None
    api_key: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    max_num_seqs: int = 32
    max_queue: int = 256
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    cache_gib: float = 4.0
    kv_cache_dtype: str = "auto"
    speculative: str = "auto"  # auto = what the checkpoint carries (DSpark / MTP); none | mtp | dspark
    speculative_tokens: int = 0
    speculative_threshold: float = 0.0
    speculative_draft_sampling: str = "greedy"
    block_size: int = 128
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "auto"
    dummy: bool = False
    hardware: str | None = None  # check the layout against this card's memory before loading (runtime.planner)
    check_weights: bool = False  # check every float weight for NaN / inf while loading
    verify_checkpoint: bool = False  # re-hash a quantize output against its manifest before loading
    require_reasoning_passback: bool = False
    honor_sampling_in_thinking: bool = False
    encoder_version: str = "auto"
    default_max_tokens: int = 4096
    drain_timeout_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"


def check_options(opts: ServeOptions) -> None:
    if opts.npus < 1:
        raise ServeError(f"--npus must be >= 1, got {opts.npus}")
    if opts.encoder_version not in ("auto", "april", "0731"):
        raise ServeError(f"--encoder-version must be auto, april or 0731, got {opts.encoder_version!r}")


def check_layout(spec: str, opts: ServeOptions) -> int:
    """Refuse, before anything is loaded or written, a deployment the planner says does not fit `opts.hardware`
    (the same memory model the engine's cache uses; ascend_v4.runtime.planner.check_deployment). Returns the
    attention TP to run (from `--tp` / `--dp`, or the smallest that fits: `runtime.layout.choose_layout`)."""
    from pathlib import Path

    from ascend_v4.model import kv_layout
    from ascend_v4.model.args import ModelArgs, preset_names
    from ascend_v4.runtime.layout import choose_layout, resolve_tp
    from ascend_v4.runtime.planner import DeploymentError, checkpoint_format

    if Path(spec).is_dir():
        args, fmt = ModelArgs.from_dir(spec), checkpoint_format(spec)
    elif spec in preset_names():
        args, fmt = ModelArgs.from_preset(spec), "native"  # official weights or their dummy
    else:
        raise ServeError(f"--hardware: cannot size {spec!r} before loading it: give a checkpoint directory or a preset")
    context = opts.max_model_len or min(args.max_seq_len, 131072)
    act = 4 if opts.dtype == "fp32" else 2  # the pool stores activations in the model dtype (bf16 on a device)
    try:
        lay = choose_layout(args, opts.npus, resolve_tp(opts.npus, opts.tp, opts.dp), hardware=opts.hardware,
                            output_format=fmt, context=context,
                            kv=kv_layout.runtime_format(args, opts.kv_cache_dtype, act), model=spec)
    except (DeploymentError, ValueError) as e:
        raise ServeError(str(e)) from None
    logging.getLogger("ascend_v4").info("--hardware %s: %s fits; loading", opts.hardware, lay.describe())
    return lay.tp


def served_names(opts: ServeOptions, preset: str | None) -> list[str]:
    if opts.served_model_names:
        return list(dict.fromkeys(opts.served_model_names))
    spec = opts.model or DEFAULT_MODEL
    names = [PRESET_NAMES[preset]] if preset in PRESET_NAMES else []
    return list(dict.fromkeys([*names, spec]))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a free port) in a background thread; yield its base URL.
    For tests and for embedding a server in another program; stops the server on exit."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t_end = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < t_end:
        time.sleep(0.02)
    if not server.started:
        sock.close()
        raise ServeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def exit_process(code: int = 0) -> None:
    """End the process now, after the atexit handlers (logging, worker processes) and a flush of stdout /
    stderr, but without the interpreter's module teardown: with torch loaded that alone takes 0.7-1.5 s,
    which would push a Ctrl-C exit past `--drain-timeout` + 1 s. For the `serve` command's process only."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def build_app(opts: ServeOptions):
    """Load the model, start the engine, and return (app, description of what is served)."""
    from ascend_v4.api import LLM
    from ascend_v4.checkpoint.resolve import resolve_model
    from ascend_v4.platform import detect_platform
    from ascend_v4.runtime.async_engine import AsyncEngine
    from ascend_v4.model.args import ModelArgs
    from ascend_v4.runtime.config import EngineConfig
    from ascend_v4.runtime.speculative import check_method, default_tokens, resolve_method

    from .app import create_app
    from .serving import ServerConfig, encoder_version_of

    spec = opts.model or DEFAULT_MODEL
    tp = opts.tp
    if opts.hardware:  # before resolving: `--model pro --dummy` would write a full-size dummy first
        tp = check_layout(spec, opts)
    device = detect_platform().device if opts.device == "auto" else opts.device
    resolved = resolve_model(spec, dummy=opts.dummy)
    try:
        margs = ModelArgs.from_dir(resolved.path)
        cfg = EngineConfig(max_num_seqs=opts.max_num_seqs, max_queue=opts.max_queue, max_model_len=opts.max_model_len,
                           max_num_batched_tokens=opts.max_num_batched_tokens, cache_gib=opts.cache_gib,
                           kv_cache_dtype=opts.kv_cache_dtype, block_size=opts.block_size,
                           enable_prefix_caching=opts.enable_prefix_caching,
                           speculative=resolve_method(opts.speculative, margs),
                           speculative_tokens=opts.speculative_tokens,
                           speculative_threshold=opts.speculative_threshold,
                           speculative_draft_sampling=opts.speculative_draft_sampling)
        check_method(cfg.speculative, margs, str(resolved.path)) if cfg.speculative != "none" else None
    except ValueError as e:
        raise ServeError(str(e)) from None
    # npus > 1: LLM starts the worker processes and its engine is rank 0's.
    llm = LLM(spec, device=device, dtype=opts.dtype, dummy=opts.dummy, progress=True,
              npus=opts.npus, tp=tp, dp=None if opts.hardware else opts.dp, nnodes=opts.nnodes,
              master_addr=opts.master_addr, master_port=opts.master_port, engine_config=cfg,
              check_weights=opts.check_weights,
              verify_checkpoint=opts.verify_checkpoint)
    engine = AsyncEngine(llm.engine)  # built by LLM with `cfg`: one Engine, or rank 0 of a multi-rank one
    encoder = encoder_version_of(llm.path) if opts.encoder_version == "auto" else opts.encoder_version
    names = served_names(opts, resolved.preset)
    config = ServerConfig(model_names=names, api_key=opts.api_key,
                          require_reasoning_passback=opts.require_reasoning_passback, encoder_version=encoder,
                          honor_sampling_in_thinking=opts.honor_sampling_in_thinking,
                          default_max_tokens=opts.default_max_tokens, model_root=str(llm.path))
    k = default_tokens(cfg.speculative, margs, cfg.speculative_tokens)
    drafts = f" x{k}" if cfg.speculative != "none" else ""
    dummy_note = ", dummy checkpoint: random weights, gibberish output" if resolved.is_dummy else ""
    what = (f"model {names[0]} ({llm.path}{dummy_note}; device {device}, {llm.layout.describe()}, max_model_len "
            f"{engine.engine.max_model_len}, max_num_seqs {cfg.max_num_seqs}, max_queue {cfg.max_queue}, "
            f"encoder {encoder}, speculative {cfg.speculative}{drafts})")
    return create_app(engine, config), what


def serve(opts: ServeOptions, echo: Callable[[str], None] = print) -> None:
    """Run the server until Ctrl-C / SIGTERM (blocking)."""
    import uvicorn

    check_options(opts)
    logging.basicConfig(level=opts.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ascend_v4").setLevel(opts.log_level.upper())
    if opts.model is None:
        echo(f"no --model given: serving the `{DEFAULT_MODEL}` dummy model (random weights, for trying the API; "
             "pass --model flash|pro|DIR for real weights)")
    sock = bind_socket(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    app, what = build_app(opts)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                echo(f"ascend-v4 serve: listening on {url} — {what}")
                echo(f"  OpenAI: {url}/v1   Anthropic: {url} (/v1/messages)   health: {url}/health   "
                     f"metrics: {url}/metrics   auth: {'API key required' if opts.api_key else 'none'}")
                if sys.stdout:
                    sys.stdout.flush()

        async def shutdown(self, sockets=None) -> None:
            state = app.state.server
            echo(f"ascend-v4 serve: shutting down; draining {state.engine.in_flight} in-flight request(s) "
                 f"(up to {opts.drain_timeout_s:g} s, Ctrl-C again to end them now)")
            loop = asyncio.get_running_loop()

            def stop_open_requests(why: str) -> None:
                if not state.stopping.is_set() and (state.engine.in_flight or state.admitted):
                    echo(f"ascend-v4 serve: {why}; ending {state.admitted} open request(s)")
                state.stop_requests()

            timer = loop.call_later(opts.drain_timeout_s, stop_open_requests, "drain timeout reached")
            self._stop_now = (loop, lambda: (timer.cancel(), stop_open_requests("Ctrl-C again")))
            try:
                await super().shutdown(sockets=sockets)
            finally:
                timer.cancel()

        def handle_exit(self, sig, frame) -> None:
            stop_now = getattr(self, "_stop_now", None)
            first_stop = stop_now is not None and not app.state.server.stopping.is_set()
            super().handle_exit(sig, frame)
            if self.force_exit and first_stop:
                # Second Ctrl-C while draining: end the open requests now (terminal events, as at the drain
                # timeout) and still stop in order, which takes moments; uvicorn's force exit would skip the
                # app's shutdown and log tracebacks. A further Ctrl-C forces.
                self.force_exit = False
                with contextlib.suppress(RuntimeError):  # loop already closed
                    stop_now[0].call_soon_threadsafe(stop_now[1])

    config = uvicorn.Config(app, log_level=opts.log_level.lower(), access_log=opts.access_log,
                            timeout_graceful_shutdown=opts.drain_timeout_s + SHUTDOWN_GRACE_S, timeout_keep_alive=5)
    try:
        _Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after the graceful shutdown
        pass
    echo("ascend-v4 serve: stopped")
