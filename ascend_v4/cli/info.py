"""`ascend-v4 info`: architecture, parameter counts, KV-cache and checkpoint sizes of a model.

Reads only the config (a bundled preset or `<dir>/config.json`), never weights, so `info --model flash`
works on any machine. KV numbers follow model-spec.md §10.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ascend_v4.model.args import CSA, HCA, WINDOW, ConfigError, ModelArgs, preset_names

DEFAULT_CONTEXT = 1 << 20  # 1M tokens = max_position_embeddings of Flash and Pro
_KIND_LETTER = {WINDOW: "W", CSA: "C", HCA: "H"}


# The two cache formats `info` reports (their arithmetic: ascend_v4.model.kv_layout, shared with plan and the engine).
INFO_FORMATS = {"bf16": "bf16", "fp8_fp4": "fp8"}  # info key -> kv_layout format


def compact_schedule(kinds: list[str]) -> str:
    """Run-length form of a layer schedule: Flash -> 'Wx2 (CH)x20 C' (W window, C CSA, H HCA)."""
    s = "".join(_KIND_LETTER[k] for k in kinds)
    out, i = [], 0
    while i < len(s):
        best_p, best_n = 1, 1
        for p in range(1, 5):
            n = 1
            while s[i + n * p:i + (n + 1) * p] == s[i:i + p] and len(s[i:i + p]) == p:
                n += 1
            if n >= 2 and n * p > best_n * best_p:
                best_p, best_n = p, n
        unit = s[i:i + best_p]
        if best_n == 1:
            out.append(unit)
        else:
            out.append(f"{unit}x{best_n}" if best_p == 1 else f"({unit})x{best_n}")
        i += best_p * best_n
    return " ".join(out)


# ----------------------------------------------------------------------------------------- the report
def load_model_args(model: str) -> tuple[ModelArgs, str]:
    """ModelArgs of a checkpoint directory, a config.json, a preset name or a cached HF repo id.

    Returns (args, where they came from). Presets need no weights; nothing is downloaded.

    Raises:
        ConfigError: none of the above, or a config that is not DeepSeek-V4.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelArgs.from_dir(path), f"directory {path}"
    if path.is_file() and path.name.endswith(".json"):
        return ModelArgs.from_hf_config(json.loads(path.read_text()), name=str(path)), f"file {path}"
    if model in preset_names():
        return ModelArgs.from_preset(model), "bundled preset, no weights needed"
    # A Hugging Face repo id in the local cache (resolve_model never downloads).
    from ascend_v4.checkpoint.errors import ModelNotFoundError
    from ascend_v4.checkpoint.resolve import resolve_model

    try:
        resolved = resolve_model(model, allow_dummy=False)
    except ModelNotFoundError as e:
        raise ConfigError(str(e)) from None
    return ModelArgs.from_dir(resolved.path), f"directory {resolved.path}"


def model_info(args: ModelArgs, context: int = DEFAULT_CONTEXT, source: str = "") -> dict[str, Any]:
    """Everything `info` prints, as a JSON-ready dict (bytes are exact integers or floats)."""
    from ascend_v4.checkpoint.spec import checkpoint_nbytes
    from ascend_v4.model import kv_layout

    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    kinds = args.layer_kinds
    counts = {k: kinds.count(k) for k in (WINDOW, CSA, HCA)}
    kv: dict[str, Any] = {}
    formats = kv_layout.kv_formats(args)
    for key, name in INFO_FORMATS.items():
        f = formats[name]
        ring = kv_layout.window_ring_bytes(args, f)
        kv[key] = {
            "kv_entry_bytes": f.main_entry,
            "index_entry_bytes": f.index_entry,
            "bytes_per_token": kv_layout.kv_bytes_per_token(args, f),
            "window_ring_bytes_per_seq": ring,
            "bytes_at_context": kv_layout.kv_bytes_at(args, f, context) + ring,
        }
    return {
        "name": args.name,
        "source": source,
        "params": args.param_counts(),
        "vocab_size": args.vocab_size,
        "dim": args.dim,
        "layers": {
            "n": args.n_layers,
            "counts": counts,
            "schedule": compact_schedule(kinds),
            "kinds": kinds,
        },
        "hash_layers": args.n_hash_layers,
        "mtp_blocks": {"n": args.n_mtp_layers,
                       "kinds": [args.kind(args.n_layers + i) for i in range(args.n_mtp_layers)]},
        "draft": draft_info(args),
        "attention": {
            "heads": args.n_heads, "head_dim": args.head_dim, "window": args.window_size,
            "index_heads": args.index_n_heads, "index_head_dim": args.index_head_dim,
            "index_topk": args.index_topk, "max_seq_len": args.max_seq_len,
        },
        "experts": {
            "routed": args.n_routed_experts, "shared": args.n_shared_experts,
            "top_k": args.n_activated_experts, "width": args.moe_inter_dim, "dtype": args.expert_dtype,
        },
        "context": context,
        "kv_cache": kv,
        "checkpoint_bytes": checkpoint_nbytes(args),
    }


def draft_info(args: ModelArgs) -> dict[str, Any]:
    """The draft module `mtp.*`: April MTP blocks (`kind` "mtp"), DSpark stages ("dspark", dspark-spec.md) or none
    (None); its blocks' layer kinds, the DSpark settings, and its weights' bytes in the official checkpoint (routed
    experts apart; embedding and head are shared with the main model and not counted)."""
    from ascend_v4.checkpoint.spec import draft_nbytes

    dense, routed = draft_nbytes(args)
    n = args.n_draft_layers
    out: dict[str, Any] = {
        "kind": "dspark" if args.has_dspark else "mtp" if n else None,
        "stages": n,
        "kinds": [args.kind(args.n_layers + i) for i in range(n)],
        "bytes": {"dense": dense, "routed_experts": routed, "total": dense + routed},
    }
    if args.has_dspark:
        out.update(block_size=args.dspark_block_size, markov_rank=args.dspark_markov_rank,
                   noise_token_id=args.dspark_noise_token_id, target_layers=list(args.dspark_target_layer_ids))
    return out


def _draft_line(d: dict[str, Any]) -> str:
    if d["kind"] is None:
        return "none"
    kinds = ", ".join(sorted(set(d["kinds"])))
    b = d["bytes"]
    size = f"weights {_dec(b['total'])} ({_dec(b['dense'])} dense + {_dec(b['routed_experts'])} routed experts)"
    if d["kind"] == "mtp":
        return f"MTP, {d['stages']} block{'s' if d['stages'] > 1 else ''} ({kinds}); {size}"
    return (f"DSpark, {d['stages']} stages ({kinds}), block {d['block_size']}, Markov rank {d['markov_rank']}, "
            f"target layers {', '.join(map(str, d['target_layers']))}; {size}")


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _dec(n: float) -> str:
    """Decimal units, as checkpoint sizes are quoted: 595182108 -> '595.18 MB'."""
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def _bytes(n: float) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n:,.0f} B"


def format_model_info(info: dict[str, Any]) -> str:
    """The human-readable report of `model_info`."""
    p, lay, ex, at, kv = info["params"], info["layers"], info["experts"], info["attention"], info["kv_cache"]
    c = lay["counts"]
    bf, q = kv["bf16"], kv["fp8_fp4"]
    h = info["hash_layers"]
    over = f"; beyond max context {at['max_seq_len']:,}!" if info["context"] > at["max_seq_len"] else ""
    rows = [
        ("model", f"{info['name']}  ({info['source']})" if info["source"] else info["name"]),
        ("parameters", f"{_count(p['total'])} total, {_count(p['routed_experts'])} in routed experts, "
                       f"{_count(p['active'])} active per token (draft module excluded)"),
        ("layers", f"{lay['n']}: {c[WINDOW]} window-only, {c[CSA]} CSA (ratio 4), {c[HCA]} HCA (ratio 128)"),
        ("schedule", f"{lay['schedule']}   (W window-only, C CSA, H HCA)"),
        ("hash layers", f"{h} (layers 0-{h - 1} route by token id)" if h else "0"),
        ("draft module", _draft_line(info["draft"])),
        ("experts", f"{ex['routed']} routed + {ex['shared']} shared, top-{ex['top_k']}, "
                    f"width {ex['width']}, {ex['dtype']}"),
        ("attention", f"{at['heads']} heads x {at['head_dim']}, window {at['window']}, "
                      f"indexer {at['index_heads']}x{at['index_head_dim']} top-{at['index_topk']}, "
                      f"max context {at['max_seq_len']:,}"),
        ("KV / token", f"BF16 KV + BF16 indexer: {bf['bytes_per_token']:,.0f} B;  "
                       f"FP8 KV ({q['kv_entry_bytes']} B) + FP4 indexer ({q['index_entry_bytes']} B): "
                       f"{q['bytes_per_token']:,.0f} B"),
        ("window ring", f"{_bytes(bf['window_ring_bytes_per_seq'])} BF16, "
                        f"{_bytes(q['window_ring_bytes_per_seq'])} FP8 per sequence (fixed)"),
        (f"cache @ {info['context']:,}", f"{_bytes(bf['bytes_at_context'])} BF16, "
                                         f"{_bytes(q['bytes_at_context'])} FP8+FP4 per sequence "
                                         "(ring included)" + over),
        ("checkpoint", f"{info['checkpoint_bytes'] / 1e9:,.1f} GB ({_bytes(info['checkpoint_bytes'])}) "
                       "of tensor data on disk"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_tokens(text: str) -> int:
    """'1M' -> 1048576, '128k' -> 131072, '4096' -> 4096 (K and M are binary, as context lengths are)."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise ValueError(f"{text!r} is not a token count (examples: 4096, 128k, 1M)") from None
    if value < 1:
        raise ValueError(f"{text!r}: the context must be at least 1 token")
    return value


class _Tokens(click.ParamType):
    name = "N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_tokens(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command("info")
@click.option("--model", "-m", required=True, metavar="PRESET_OR_DIR",
              help=f"Preset ({', '.join(preset_names())}), checkpoint directory, config.json, or a HF repo id "
                   "already in the local Hugging Face cache.")
@click.option("--context", default="1M", show_default=True, type=_Tokens(),
              help="Context length for the cache-size line (K/M suffixes are binary: 1M = 1,048,576).")
@click.option("--json", "as_json", is_flag=True, help="Print the same information as JSON.")
def info(model: str, context: int, as_json: bool) -> None:
    """Show the architecture and sizes of a DeepSeek-V4 model, from its config alone.

    Prints parameter counts (total, routed experts, active per token), the layer schedule (window-only,
    CSA and HCA layers), hash-routed layers, the draft module (MTP blocks or DSpark stages, with their
    weight bytes), experts, KV-cache bytes per token of context
    in BF16 and in the FP8 KV + FP4 indexer deployment layout, the fixed sliding-window ring per
    sequence, the cache of one sequence at --context tokens, and the checkpoint size on disk.
    No weights are read: `flash` and `pro` work without their checkpoints.

    \b
    Examples:
      ascend-v4 info --model flash
      ascend-v4 info --model pro --context 128k
      ascend-v4 info --model flash-0731
      ascend-v4 info --model /data/DeepSeek-V4-Flash --json
    """
    try:
        args, source = load_model_args(model)
        report = model_info(args, context, source)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report, indent=2) if as_json else format_model_info(report))
