"""Turn what the user typed (`--model ...`) into a checkpoint directory. Never downloads anything.

`spec` may be
  (a) a directory holding `config.json`;
  (b) a Hugging Face repo id (`deepseek-ai/DeepSeek-V4-Flash`), looked up in the local HF cache only:
      `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, layout
      `models--<org>--<name>/snapshots/<rev>/` (`refs/main` preferred, else the newest snapshot);
  (c) a preset name: `flash` / `pro` mean the real weights, searched in `$ASCEND_V4_MODEL_DIR` (the checkpoint
      itself or its subdirectory `DeepSeek-V4-Flash` / `DeepSeek-V4-Pro`) and then in the HF cache; the test
      presets (`tiny`, `small`) have no real weights and resolve to a cached dummy checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ascend_v4 import envs
from ascend_v4.checkpoint.dummy import DUMMY_META_KEY, ensure_dummy_checkpoint
from ascend_v4.checkpoint.errors import ModelNotFoundError
from ascend_v4.checkpoint.reader import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, read_safetensors_header
from ascend_v4.model.args import ConfigError, ModelArgs, preset_names

MODEL_DIR_ENV = "ASCEND_V4_MODEL_DIR"  # read through envs.model_dir(); the name is only quoted in messages
# Presets with public weights: HF repo id, subdirectory name under $ASCEND_V4_MODEL_DIR, approximate size.
REAL_PRESETS = {
    "flash": ("deepseek-ai/DeepSeek-V4-Flash", "160 GB"),
    "pro": ("deepseek-ai/DeepSeek-V4-Pro", "865 GB"),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    preset: str | None  # bundled preset whose architecture the checkpoint has, if any
    is_dummy: bool


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hf_cache_snapshot(repo_id: str, looked: list[str] | None = None) -> Path | None:
    """The local snapshot directory of `repo_id` holding a config.json, or None. Appends places to `looked`."""
    repo_dir = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snaps = repo_dir / "snapshots"
    if looked is not None:
        looked.append(f"HF cache: {snaps}/<revision>/")
    if not snaps.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    candidates: list[Path] = []
    if ref.is_file():
        candidates.append(snaps / ref.read_text().strip())
    candidates += sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if _looks_like_checkpoint(c):
            return c
    return None


def _looks_like_checkpoint(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and ((path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file())


def match_preset(args: ModelArgs) -> str | None:
    """The bundled preset with exactly this architecture, if any."""
    for name in preset_names():
        if replace(ModelArgs.from_preset(name), name=args.name) == args:
            return name
    return None


def _is_dummy(path: Path) -> bool:
    """Whether the first shard carries the dummy writer's metadata tag (one header read)."""
    try:
        if (path / INDEX_NAME).is_file():
            wm = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            first = path / sorted(set(wm.values()))[0]
        else:
            first = path / SINGLE_NAME
        return DUMMY_META_KEY in read_safetensors_header(first).metadata
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _resolved_dir(path: Path) -> ResolvedModel:
    args = ModelArgs.from_dir(path)  # ConfigError for a corrupt or non-V4 config
    return ResolvedModel(path, match_preset(args), _is_dummy(path))


def _find_real(preset: str, looked: list[str]) -> Path | None:
    repo_id, _ = REAL_PRESETS[preset]
    want = ModelArgs.from_preset(preset)
    base = envs.model_dir()
    if base is not None:
        for cand in (base, base / repo_id.split("/")[1]):
            looked.append(f"${MODEL_DIR_ENV}: {cand}")
            if (cand / CONFIG_NAME).is_file():
                try:
                    args = ModelArgs.from_dir(cand)
                except ConfigError as e:
                    looked[-1] += f" (unusable config.json: {e})"
                    continue
                if replace(args, name=want.name) == want:
                    return cand
                looked[-1] += " (has a config.json of another model)"
    else:
        looked.append(f"${MODEL_DIR_ENV}: not set")
    return hf_cache_snapshot(repo_id, looked)


def resolve_model(spec: str | Path, *, allow_dummy: bool = True, dummy: bool = False,
                  progress: bool = False) -> ResolvedModel:
    """Find the checkpoint directory for `spec` (a directory, a HF repo id or a preset name).

    Args:
        spec: see the module docstring.
        allow_dummy: allow random weights: `tiny` / `small` (which have no real weights) and `dummy=True`.
        dummy: for a preset name, use a cached dummy checkpoint of that preset even when real weights exist
            (the CLI's `--dummy`).
        progress: progress bar on stderr while a dummy checkpoint is being written.

    Raises:
        ModelNotFoundError: nothing found; the message lists every place looked and how to get the weights.
        ConfigError: the directory found has a corrupt or non-V4 `config.json`.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{path}: directory has no {CONFIG_NAME}; not a checkpoint directory")
        return _resolved_dir(path)

    presets = preset_names()
    if text in presets:
        if dummy or text not in REAL_PRESETS:
            if not allow_dummy:
                raise ModelNotFoundError(f"preset {text!r}: {'--dummy requested' if dummy else 'no real weights'} "
                                         f"but dummy checkpoints are not allowed here")
            return ResolvedModel(ensure_dummy_checkpoint(text, progress=progress), text, True)
        looked: list[str] = []
        found = _find_real(text, looked)
        if found is not None:
            return ResolvedModel(found, text, False)
        repo_id, size = REAL_PRESETS[text]
        sub = repo_id.split("/")[1]
        raise ModelNotFoundError("\n".join([
            f"no checkpoint found for preset {text!r} ({repo_id}). Looked in:",
            *(f"  - {p}" for p in looked),
            "Get the weights (about " + size + ") with:",
            f"  huggingface-cli download {repo_id} --local-dir <DIR>/{sub}",
            f"then pass the directory as the model or set {MODEL_DIR_ENV}=<DIR>;",
            "or use --dummy to run a random checkpoint of the same architecture.",
        ]))

    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        looked = []
        snap = hf_cache_snapshot(text, looked)
        if snap is not None:
            return _resolved_dir(snap)
        raise ModelNotFoundError("\n".join([
            f"{text!r} is not a directory and not in the local Hugging Face cache (no download is attempted). "
            "Looked in:",
            *(f"  - {p}" for p in looked),
            f"Download it with: huggingface-cli download {text}",
        ]))
    raise ModelNotFoundError(f"{text!r} is not a checkpoint directory, a Hugging Face repo id (org/name) or a "
                             f"preset ({', '.join(presets)})")


__all__ = ["resolve_model", "ResolvedModel", "hf_hub_cache", "hf_cache_snapshot", "match_preset", "REAL_PRESETS",
           "MODEL_DIR_ENV"]
