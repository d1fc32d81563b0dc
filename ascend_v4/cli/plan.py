"""`ascend-v4 plan`: weights per card, KV bytes per token, how many sequences fit, roofline decode speed.

Thin wrapper around `ascend_v4.runtime.planner.make_plan` (the arithmetic and the hardware table live there;
its KV numbers are `ascend_v4.model.kv_layout`, the engine's own memory model). Without `--tp`, every TP size
dividing --npus is evaluated and the smallest one that fits is detailed, so the output answers "does it fit,
and with how much context" directly; `--json` adds the recommended layout and the commands that deploy it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from ascend_v4.quant.recipes import OUTPUT_FORMATS


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.lru_cache(maxsize=8)
def _inventory(model: str):
    """(ModelArgs, official tensor inventory, display name) of a preset or a checkpoint directory."""
    from ascend_v4.checkpoint.spec import expected_tensors
    from ascend_v4.model.args import ModelArgs, preset_names

    if model in preset_names():
        args, name = ModelArgs.from_preset(model), model
    else:
        args, name = ModelArgs.from_dir(Path(model)), str(model)
    return args, expected_tensors(args), name


@functools.lru_cache(maxsize=32)
def _weights(model: str, fmt: str):
    from ascend_v4.runtime.planner import weight_split

    return weight_split(_inventory(model)[1], fmt)


def commands(r, model: str) -> dict:
    """The commands that deploy the layout of PlanReport `r` (None where the runtime lacks it)."""
    from ascend_v4.model.tp import check_tp

    args = _inventory(model)[0]
    src = model
    out: dict = {"quantize": None, "serve": None, "why_not": None}
    if r.output_format != "native":
        src = f"{model.rstrip('/')}-{r.output_format}"
        out["quantize"] = f"ascend-v4 quantize --model {model} --out {src} --format {r.output_format} --ep {r.npus}"
    if not r.fits:
        out["why_not"] = r.verdict
        return out
    try:
        check_tp(args, r.tp)
    except ValueError as e:  # fits by bytes, but the heads / output groups do not split that way
        out["why_not"] = str(e)
        return out
    kv = " --kv-cache-dtype fp8" if r.kv.name.startswith("fp8") else ""
    tp = f" --tp {r.tp} --dp {r.npus // r.tp}" if r.npus > 1 else ""
    out["serve"] = (f"ascend-v4 serve --model {src} --npus {r.npus}{tp} --hardware {r.hardware_key}"
                    f" --max-model-len {r.context}{kv}")
    return out


def run_plan(model: str, fmt: str, npus: int, hardware: str, *, context: int = 131072, batch: int = 1,
             tp: int | None = None, kv: str | None = None):
    """(chosen PlanReport, all evaluated PlanReports). `model`: flash / pro / any preset, or a checkpoint dir."""
    from ascend_v4.runtime.layout import engine_tps
    from ascend_v4.runtime.planner import make_plan

    args, specs, name = _inventory(model)
    ws = _weights(model, fmt)
    tps = [tp] if tp else _divisors(npus)
    reports = [make_plan(args, specs, fmt, hardware, npus, tp=t, context=context, batch=batch, kv=kv, model=name,
                         weights=ws) for t in tps]
    # Recommended: the fitting layout with the smallest TP (the most DP groups) that the model can be split into,
    # as `serve --hardware` picks; else the one closest to fitting.
    runs = engine_tps(npus, args)
    fitting = sorted((r for r in reports if r.fits), key=lambda r: (r.tp not in runs, r.tp))
    chosen = fitting[0] if fitting else max(reports, key=lambda r: r.free_per_card)
    return chosen, reports


@click.command("plan")
@click.option("--model", "-m", required=True, help="flash, pro (or another preset), or a checkpoint directory.")
@click.option("--format", "-f", "fmt", required=True, type=click.Choice(OUTPUT_FORMATS))
@click.option("--npus", "-n", required=True, type=click.IntRange(min=1), help="Cards (NPUs / GPUs / A3 dies).")
@click.option("--hardware", "-H", required=True, type=click.Choice(["910b", "910c", "950", "h100", "h200"]))
@click.option("--context", "-L", default=131072, show_default=True, type=click.IntRange(min=1),
              help="Sequence length (tokens) to size the KV cache for.")
@click.option("--batch", "-B", default=1, show_default=True, type=click.IntRange(min=1),
              help="Concurrent sequences per data-parallel group.")
@click.option("--tp", type=click.IntRange(min=1), help="Attention tensor-parallel size (default: try all).")
@click.option("--kv", type=click.Choice(["bf16", "bf16-int8idx", "fp8", "fp8-fp8idx"]),
              help="KV cache format (default per hardware: bf16-int8idx on 910b/910c, fp8 elsewhere).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: every evaluated layout, the recommended one and the commands that deploy it.")
def plan(model, fmt, npus, hardware, context, batch, tp, kv, as_json):
    """Will a DeepSeek-V4 deployment fit, with how much context, and how fast can it decode (roofline)?

    \b
    Examples:
      ascend-v4 plan --model pro --format w4a8 --npus 16 --hardware 910c --context 131072
      ascend-v4 plan --model flash --format w8a8 --npus 8 --hardware 910b --batch 16
    Hardware figures are vendor figures (unverified); reserves are estimates; decode speed is an upper bound.
    """
    from ascend_v4.model.args import ConfigError

    try:
        chosen, reports = run_plan(model, fmt, npus, hardware, context=context, batch=batch, tp=tp, kv=kv)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    cmds = commands(chosen, model)
    if as_json:
        click.echo(json.dumps({"recommended": chosen.as_dict() if chosen.fits else None, "commands": cmds,
                               "layouts": [r.as_dict() for r in reports]}, indent=1))
        return
    if len(reports) > 1:
        click.echo(f"{'TP':>3} {'weights/card GB':>16} {'free GB':>8} {'seqs@L/card':>12} {'max ctx @B':>11} "
                   f"{'tok/s/card':>10}  verdict")
        for r in reports:
            tok_s = f"{r.decode_tok_s_per_card:>10.1f}" if r.fits else f"{'-':>10}"
            click.echo(f"{r.tp:>3} {r.weights_per_card / 1e9:>16.2f} {r.free_per_card / 1e9:>8.2f} "
                       f"{r.seqs_per_card:>12} {r.max_context_at_batch:>11,} {tok_s}  {r.verdict}")
        click.echo("")
    click.echo(chosen.table())
    for k in ("quantize", "serve"):
        if cmds[k]:
            click.echo(f"  {k}: {cmds[k]}")
    if cmds["why_not"]:
        click.echo(f"  no serve command: {cmds['why_not']}")


__all__ = ["plan", "run_plan"]
