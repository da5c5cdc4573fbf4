"""FSPO meta-training: one visible loop for every stage (``fspo train``).

Stages (``TrainConfig.stage``):
- ``pretrain``: the tiny world's "base model". Language modelling on prompts in the FSPO format whose
  pairs are labeled at random and whose target is a random response, so the base knows the format and
  the domain's language but has never seen a preference signal.
- ``sft`` (Pref-FT): maximise log p(preferred response | few-shot prompt) on held-out pairs of a user.
- ``ipo`` / ``dpo``: initialised from the SFT model, which is also the frozen reference. The reference
  log-probs of every training pair are computed once, before training, and stored.

``context`` chooses what the prompt holds about the user: ``fewshot`` (FSPO), ``none`` (the aggregate
baselines: no user information) or ``description`` (the oracle-persona baseline: the true persona text).
``cot`` adds the user-description chain-of-thought (teacher-forced on the true description).

Every run writes a Hugging Face checkpoint (full model, or a peft LoRA adapter) plus ``fspo.json``
(config, prompt-format version, domain, metrics). A killed run resumes from ``checkpoint-last``.
"""

from ..data import CheckpointError
from .checkpoints import _save, check_model_dir, load_checkpoint_manifest, load_model, publish
from .config import MANIFEST, Progress, TrainConfig
from .examples import (
    Example,
    _batch_seed,
    _episodes_for_step,
    _examples,
    _ptx_config,
    _step_draw,
    consistent_document,
    episode_texts,
    held_out_examples,
    pretrain_episode,
    prompt_limit,
    tokenize_episode,
)
from .loop import TrainResult, train
from .objectives import _pair_logps, _pref_loss, _reference_logps, _sft_loss, evaluate_held_out
from .setup import (
    Run,
    _count_params,
    _init_is_lora,
    _lr_lambda,
    build_tiny_model,
    default_device,
    disable_dropout,
    setup_run,
)

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "Example",
    "Progress",
    "Run",
    "TrainConfig",
    "TrainResult",
    "build_tiny_model",
    "check_model_dir",
    "consistent_document",
    "default_device",
    "disable_dropout",
    "episode_texts",
    "evaluate_held_out",
    "held_out_examples",
    "load_checkpoint_manifest",
    "load_model",
    "pretrain_episode",
    "prompt_limit",
    "publish",
    "setup_run",
    "tokenize_episode",
    "train",
    # used by the tests and bench/bench_train.py
    "_batch_seed",
    "_count_params",
    "_episodes_for_step",
    "_examples",
    "_init_is_lora",
    "_lr_lambda",
    "_pair_logps",
    "_pref_loss",
    "_ptx_config",
    "_reference_logps",
    "_save",
    "_sft_loss",
    "_step_draw",
]
