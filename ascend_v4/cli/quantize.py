"""`ascend-v4 quantize`: official FP8/FP4 checkpoint -> w8a8 / w4a8 / bf16 / fp8-experts / native, streamed.

Thin wrapper: `run_quantize` validates the source with the checkpoint reader (named `CheckpointError` /
`ConfigError` for missing or truncated shards, lying headers, unexpected dtypes, non-V4 configs), then calls
`ascend_v4.quant.tool.quantize`, and optionally `ascend_v4.quant.verify` and the end-to-end logits check
(`accuracy_report`, which loads models and therefore lives here, above the model layer). docs/quantize.md
describes formats, layouts and every difference from msModelSlim's ascendV1 output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from ascend_v4.quant.recipes import OUTPUT_FORMATS

# End-to-end accuracy loads the source and the output model on CPU: refuse anything bigger than this.
E2E_MAX_PARAMS = 2_000_000_000


@dataclass
class QuantizeRequest:
    model: str
    out: Path
    format: str
    ep: int | None = None
    workers: int = 1
    resume: bool = False
    force: bool = False
    verify: bool = False
    verify_e2e: bool = False
    e2e_tokens: int = 256
    read_baseline: str = "sample"
    fsync: bool = True
    progress: bool = False
    allow_nonfinite: bool = False
    mindie: bool = False


def _progress_factory():
    from ascend_v4.quant.progress import ProgressBar

    return lambda total, desc: ProgressBar(total, desc)


def run_quantize(req: QuantizeRequest, log=None) -> dict:
    """Validate the source, convert, optionally verify. Returns the result objects (tests use them).

    Raises:
        CheckpointError / ConfigError (bad source), QuantizeError subclasses (destination, disk space, options,
        source changing under us).
    """
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.checkpoint.reader import read_checkpoint
    from ascend_v4.checkpoint.resolve import resolve_model
    from ascend_v4.quant.errors import QuantizeError
    from ascend_v4.quant.tool import quantize

    say = log or (lambda s: None)
    if req.mindie and req.format not in ("w8a8", "w4a8"):
        raise QuantizeError(f"--mindie-config writes MindIE's fields for w8a8 / w4a8 outputs, not {req.format}")
    src_dir = resolve_model(req.model).path
    info = read_checkpoint(src_dir)
    if info.conversion is not None or info.linear_formats:
        raise QuantizeError(f"{src_dir} is already a converted checkpoint "
                            f"({(info.conversion or {}).get('format', 'ascendV1')}); convert from the official one")
    if Path(req.out).resolve() == Path(src_dir).resolve():
        raise QuantizeError("--out must differ from the source checkpoint directory")
    if not isinstance(info.args.n_routed_experts, int):
        raise CheckpointError(f"{src_dir}: unexpected config")
    res = quantize(info, req.out, req.format, ep=req.ep, workers=req.workers, resume=req.resume, force=req.force,
                   fsync=req.fsync, read_baseline=req.read_baseline,
                   progress_factory=_progress_factory() if req.progress else None, log=say,
                   allow_nonfinite=req.allow_nonfinite, mindie=req.mindie)
    out = {"result": res, "source": src_dir}
    if req.verify or req.verify_e2e:
        from ascend_v4.quant.verify import verify_conversion

        out["verify"] = verify_conversion(info, req.out)
    if req.verify_e2e:
        out["accuracy"] = accuracy_report(src_dir, {req.format: Path(req.out)}, n_tokens=req.e2e_tokens)
    return out


def model_logits(path: Path, ids: list[int], quant_sim: bool = True):
    """fp32 logits [len(ids), V] of one sequence (prefilled in one step) through the model at `path`."""
    import torch

    from ascend_v4.model.cache import StepBatch, new_seq_cache
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    m = load_model(path, ModelOptions(dtype=torch.float32, quant_sim=quant_sim, dequantize_weights=True))
    cache = new_seq_cache(m.args, m.opts.dtype)
    b = StepBatch.build([(cache, ids)])
    x = m(b)
    b.commit()
    return m.logits(x)


def accuracy_report(src: Path, outputs: dict[str, Path], n_tokens: int = 256, seed: int = 0) -> list[dict]:
    """Logits of each converted output vs the source under the official numerics (QAT simulation on), next to
    the baseline "official checkpoint without the simulation" vs "with it". Rows: {name, kl, top1}.

    The converted models run with the simulation on too (KV / indexer round-trips as the source); their linears
    use their own format's numerics (int8 per-token activations for int formats, none for BF16 ones).
    """
    import torch

    from ascend_v4.model.args import ModelArgs
    from ascend_v4.quant.verify import logit_agreement

    args = ModelArgs.from_dir(src)
    if args.param_counts()["total"] > E2E_MAX_PARAMS:
        raise click.UsageError(f"the end-to-end check runs on CPU for models up to {E2E_MAX_PARAMS / 1e9:.0f}B "
                               f"params (e.g. the tiny / small presets); {src} is bigger")
    g = torch.Generator().manual_seed(seed)
    ids = [args.bos_token_id] + torch.randint(3, args.vocab_size, (n_tokens - 1,), generator=g).tolist()
    ref = model_logits(src, ids, quant_sim=True)
    kl, top1 = logit_agreement(ref, model_logits(src, ids, quant_sim=False))
    rows = [{"name": "baseline: official, QAT simulation off", "kl": kl, "top1": top1}]
    for name, path in outputs.items():
        kl, top1 = logit_agreement(ref, model_logits(path, ids, quant_sim=True))
        rows.append({"name": name, "kl": kl, "top1": top1})
    return rows


def format_accuracy(rows: list[dict], n_tokens: int) -> str:
    lines = [f"end-to-end vs the official checkpoint (QAT simulation on), {n_tokens} tokens:",
             f"  {'':<42} {'mean KL':>10} {'top-1':>7}"]
    lines += [f"  {r['name']:<42} {r['kl']:>10.5f} {r['top1']:>7.3f}" for r in rows]
    return "\n".join(lines)


@click.command("quantize")
@click.option("--model", "-m", required=True,
              help="Source: official checkpoint directory (FP8/FP4), HF repo id in the local cache, or preset.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (empty, or holding this conversion; --force replaces another one).")
@click.option("--format", "-f", "fmt", required=True, type=click.Choice(OUTPUT_FORMATS),
              help="w8a8 / w4a8 (Ascend A2/A3, msModelSlim ascendV1 layout), bf16, fp8-experts, native.")
@click.option("--ep", type=click.IntRange(min=1), help="Pre-split routed experts for N expert-parallel ranks.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=None,
              help="Converter threads (default: number of CPUs, at most 8).")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion (verified outputs are kept).")
@click.option("--force", is_flag=True, help="Replace whatever conversion the output directory holds.")
@click.option("--verify", is_flag=True, help="Re-read the output: hashes, copied bytes, per-kind error statistics.")
@click.option("--verify-e2e", is_flag=True,
              help="Also compare logits with the source (KL, top-1; small models only, e.g. tiny / small).")
@click.option("--e2e-tokens", default=256, show_default=True, type=click.IntRange(min=2))
@click.option("--read-baseline", type=click.Choice(["sample", "full", "off"]), default="sample", show_default=True,
              help="Cold raw read of the same source bytes for the throughput ratio (sample = up to 4 GiB).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync before renames (benchmarks only: not crash safe).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Warn about NaN / inf source values (and FP8 NaN bytes, NaN or overflowing UE8M0 scales) and go "
                   "on; by default the first one stops the run, naming file, tensor and element.")
@click.option("--mindie-config", is_flag=True,
              help="w8a8 / w4a8: also write MindIE's config.json fields (quantize: w8a8_dynamic, and moe_quantize: "
                   "w4a8_dynamic for w4a8). msModelSlim writes none for V4; vllm-ascend accepts either.")
def quantize_cmd(model, out, fmt, ep, workers, resume, force, verify, verify_e2e, e2e_tokens, read_baseline,
                 no_fsync, allow_nonfinite, mindie_config):
    """Convert an official DeepSeek-V4 checkpoint for Ascend NPUs (or to BF16 / FP8 experts / re-sharded).

    Streams shard by shard with bounded memory, writes every file under a temporary name, records each
    finished file in a journal so --resume keeps it after a crash, Ctrl-C or a full disk, and writes the
    manifest last. Every source value is checked: NaN / inf stop the run (see --allow-nonfinite). Progress
    is a bar on a terminal and a log line every few seconds when stderr is piped. The output loads with
    ascend-v4 (generate, LLM(...)); w8a8 / w4a8 follow msModelSlim's ascendV1 conventions (docs/quantize.md).

    \b
    Examples:
      ascend-v4 quantize -m /data/DeepSeek-V4-Flash -o /data/V4-Flash-w8a8 -f w8a8 --ep 16
      ascend-v4 quantize -m /data/DeepSeek-V4-Pro -o /data/V4-Pro-w4a8 -f w4a8 -j 16 --resume
      ascend-v4 quantize -m tiny -o /tmp/tiny-w8a8 -f w8a8 --verify --verify-e2e
    """
    from ascend_v4.checkpoint.errors import CheckpointError
    from ascend_v4.model.args import ConfigError
    from ascend_v4.quant.errors import QuantizeError

    req = QuantizeRequest(model, out, fmt, ep, workers or min(8, os.cpu_count() or 1), resume, force, verify,
                          verify_e2e, e2e_tokens, read_baseline, not no_fsync, True, allow_nonfinite,
                          mindie_config)
    try:
        res = run_quantize(req, log=lambda s: click.echo(s, err=True))
    except (CheckpointError, ConfigError, QuantizeError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    click.echo(res["result"].summary())
    if "verify" in res:
        click.echo(res["verify"].table())
        if not res["verify"].ok:
            raise click.ClickException("verification failed: see the table above")
    if "accuracy" in res:
        click.echo(format_accuracy(res["accuracy"], e2e_tokens))


quantize = quantize_cmd

__all__ = ["quantize", "run_quantize", "QuantizeRequest", "accuracy_report", "model_logits", "format_accuracy"]
