"""Checkpoints: reading a model directory (full or LoRA), writing one atomically, and publishing a
finished run as ``out_dir`` itself (the model files, then ``fspo.json`` last: it marks completeness)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data import PROMPT_FORMAT_VERSION, CheckpointError
from .config import MANIFEST, TrainConfig

RESUME_DIR = "checkpoint-last"
RESUME_STATE = "trainer_state.pt"


def load_checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``fspo.json`` of a checkpoint, checking it exists and uses this prompt format."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"{path}: not an fspo checkpoint (no {MANIFEST}; an interrupted run keeps only checkpoint-last/)"
        )
    manifest = json.loads(mpath.read_text())
    fmt = manifest.get("prompt_format_version")
    if fmt != PROMPT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: prompt format {fmt!r} does not match this code's {PROMPT_FORMAT_VERSION!r}"
        )
    return manifest


def check_model_dir(path: str | Path) -> Path:
    """``path`` resolved, once ``modeling.models.check_causal_lm_dir`` accepts it (CheckpointError if not)."""
    from ..models import ModelError, check_causal_lm_dir

    try:
        check_causal_lm_dir(path)
    except ModelError as e:
        raise CheckpointError(str(e)) from None
    return Path(path).resolve()


def load_model(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu", trainable: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint directory: a full HF model, or a LoRA adapter whose base
    model is named in its adapter_config.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Absolute, so a LoRA adapter trained on it names a base that loads from any working directory.
    path = check_model_dir(path)
    torch_dtype = getattr(torch, dtype)
    model: Any
    try:
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
            model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
            if not trainable:
                # Inference and full fine-tuning run on the merged weights (one matmul per layer
                # instead of three: unmerged LoRA generation was 2x slower on SmolLM2).
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load model ({' '.join(str(e).split())[:200]})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batches pad with EOS where the model has no pad token
    return model.to(device), tokenizer


def _save(
    model: Any,
    tok: Any,
    path: Path,
    cfg: TrainConfig,
    extra: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically: into path.tmp, then rename over path. ``state_dict``: the weights
    to write when the model's own are not whole (a sharded model's, gathered: ``Ranks.full_state``)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(tmp)
    for name, payload in extra.get("files", {}).items():
        torch.save(payload, tmp / name)
    manifest = {
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "config": cfg.to_dict(),
        **{k: v for k, v in extra.items() if k != "files"},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_resume_state(out_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The trainer state of ``out_dir/checkpoint-last`` when a killed run left one, checked to be this
    config's (a field added to TrainConfig since it was written counts as its default); else None."""
    last = out_dir / RESUME_DIR
    if not (last / RESUME_STATE).is_file():
        return None
    if not cfg.trained_as(json.loads((last / MANIFEST).read_text())["config"]):
        raise CheckpointError(f"{last} was written with another config; delete it or rerun with that config")
    return torch.load(last / RESUME_STATE, weights_only=False)


def publish(
    model: Any,
    tok: Any,
    out_dir: Path,
    cfg: TrainConfig,
    extra: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The finished run's checkpoint is ``out_dir`` itself: written to ``out_dir/model``, its files moved
    up (the manifest last), then the resume state and the trained tokenizer's folder dropped."""
    _save(model, tok, out_dir / "model", cfg, extra, state_dict)
    final = out_dir / "model"
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for f in sorted(final.iterdir(), key=lambda f: f.name == MANIFEST):  # the manifest last
        os.replace(f, out_dir / f.name)
    final.rmdir()
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
