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

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .data import (
    PROMPT_FORMAT_VERSION,
    CheckpointError,
    Episode,
    EpisodeSource,
    build_cot_prompt,
    build_prompt,
    cot_target,
    shot_response_spans,
)

Progress = Callable[[int, int, str], None]
MANIFEST = "fspo.json"


@dataclass
class TrainConfig:
    """One training run. Saved as JSON beside the checkpoint.

    dataset: a synthetic dataset directory (``fspo synth``).
    out_dir: where the checkpoint goes.
    init: a local HF model directory (or an earlier ``fspo train`` output) to start from; None builds a
        tiny decoder from scratch with a tokenizer trained on the dataset's text (``pretrain`` only).
    stage: pretrain | sft | ipo | dpo.
    context: fewshot | none | description (see the module docstring).
    cot: train the user-description chain-of-thought (teacher forcing on the true description).
    shots: range of few-shot pairs per prompt, drawn per episode, so one model serves N = lo..hi.
    beta: IPO / DPO temperature; IPO's target margin is 1 / (2 beta).
    average_logps: length-average sequence log-probs (TRL's IPO) instead of summing them (FSPO's code).
    sft_include_rejected: Pref-FT also on the rejected response as a second target (the released code's
        variant; the paper trains on the preferred one only).
    shot_targets: Pref-FT also on each shot's preferred response given the shots before it. Every prefix
        of an episode is then a training task (shot i is the target of an (i-1)-shot prompt), which gives
        up to hi+1 supervised responses per forward pass instead of one. Off by default (the paper
        supervises the final target only).
    lora: train a peft LoRA adapter instead of all weights.
    pretrain_consistent: the fraction of the base model's pretraining documents written by one author
        (every response in one style; see ``consistent_document``). Needs a dataset that records each
        response's trait values (the procedural engine's do).
    pretrain_quoted: of those one-author documents, the fraction whose shots quote the author's answer
        (under ``## Preferred Response``) beside another writer's answer to the same question (under
        ``## Dispreferred Response``). The base then continues the style of the answers the format marks
        as preferred: the in-context skill an instruction-tuned model brings to FSPO, taught with the
        responses' own styles (no synthetic user and no judge's label is involved).
    freeze_embeddings: keep the token embeddings (and the output head) fixed. A small model fine-tuned
        on the train-split questions otherwise unlearns the words of held-out topics (they are never a
        target, so the softmax pushes them down) and stops copying the question's topic.
    ptx: a fine-tuning stage (sft, ipo, dpo) adds ``ptx`` times a language-modelling loss on a batch of
        the base model's own documents (``pretrain_episode``, mixed by ``pretrain_consistent`` and
        ``pretrain_quoted``, every topic's text included) at each step, as InstructGPT's PPO-ptx does.
        It keeps the skills fine-tuning on the train-split topics wears away: copying an unseen topic
        into the answer, and writing in one readable style. 0 (the default) turns it off. IPO's and DPO's
        losses are on summed log-probs, with gradients ~100x a token-averaged NLL's: the tiny world's
        recipe weighs ptx 1 in Pref-FT and 100 in IPO.
    cot_nll: a CoT preference stage (ipo, dpo with ``cot``) adds ``cot_nll`` times the CoT Pref-FT loss
        (the user's true description, then the chosen response, given the shots) on the step's own
        episodes, as RPO adds an NLL term to DPO. The preference loss puts the true description in the
        prompt and never trains the model to write one; without this term 900 IPO steps unlearned it
        (73.5% of the CoT arm's answers empty). Weighed like ptx (IPO's gradients are ~100x an NLL's).
    targets_per_episode: a preference stage (ipo, dpo) draws this many held-out pairs of each episode's
        user (different questions, none among the shots) as targets of the same shots, and scores them
        with the shots encoded once (``packed_group_logps``). A step then carries up to
        ``batch_size * targets_per_episode`` pairs: more of the signal that only the user's shots
        explain, for little more compute, since the shots are most of each prompt. A user with too few
        pairs gets fewer targets. 1 (the default) is the paper's episode.
    chat_template: wrap each prompt in the model's chat template as one user turn (generation then
        does the same: the checkpoint records it). Off by default: the paper's prompt is plain Markdown.
    max_prompt_tokens: the longest prompt; a longer one drops its earliest shots (never the target)
        until it fits. The model's context also bounds it: a prompt always leaves
        ``max_target_tokens + 1`` positions of the context for its response. How many prompts were
        cut and shots dropped is in the run's metrics (``prompts_cut``, ``shots_cut``).
    gradient_checkpointing: recompute each layer's activations in the backward pass instead of keeping
        them (far less memory on long few-shot prompts, about a third more compute); works with LoRA.
    dtype: float32, or bfloat16 (GPU): the weights' dtype; log-softmax and losses stay in float32.
    lora: with ``init`` an fspo LoRA checkpoint (Pref-FT), IPO/DPO continue training that adapter (it is
        the reference too); with a plain model directory, a new adapter on all its linear layers but
        the output head (peft's ``all-linear``: found from the architecture).

    Dropout is always off in the trained model (TRL and the FSPO code do the same): the preference
    losses compare the policy's log-probs with the reference's, computed once without dropout, so
    dropout noise in the policy alone would bias every margin.
    """

    dataset: str
    out_dir: str
    init: str | None = None
    stage: Literal["pretrain", "sft", "ipo", "dpo"] = "sft"
    context: Literal["fewshot", "none", "description"] = "fewshot"
    cot: bool = False
    shots: tuple[int, int] = (1, 8)
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.01
    average_logps: bool = False
    sft_include_rejected: bool = False
    shot_targets: bool = False
    lora: bool = False
    freeze_embeddings: bool = False
    pretrain_consistent: float = 0.0
    pretrain_quoted: float = 0.0
    ptx: float = 0.0
    cot_nll: float = 0.0
    targets_per_episode: int = 1
    chat_template: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    max_prompt_tokens: int = 4096
    max_target_tokens: int = 256
    overfit_batches: int = 0  # > 0: cycle over the first K batches only (the classic "can it overfit" check)
    eval_every: int = 50
    eval_episodes: int = 32
    save_every: int = 50
    seed: int = 0
    # shape of the tiny model built when init is None
    tiny: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "intermediate_size": 384,
            "vocab_size": 1024,
        }
    )

    def __post_init__(self) -> None:
        self.shots = tuple(self.shots)  # type: ignore[assignment]
        problems = []
        if self.stage not in ("pretrain", "sft", "ipo", "dpo"):
            problems.append(f"stage must be pretrain, sft, ipo or dpo, not {self.stage!r}")
        if self.context not in ("fewshot", "none", "description"):
            problems.append(f"context must be fewshot, none or description, not {self.context!r}")
        if self.init is None and self.stage != "pretrain":
            problems.append(f"stage {self.stage!r} needs init (a base model or an earlier stage's output)")
        lo, hi = self.shots
        if not 0 <= lo <= hi:
            problems.append(f"shots must be a range lo..hi with 0 <= lo <= hi, got {self.shots}")
        if self.context == "fewshot" and hi == 0:
            problems.append("context 'fewshot' needs shots > 0")
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be >= 1")
        if not (self.lr > 0 and self.beta > 0):
            problems.append("lr and beta must be > 0")
        if not 0 <= self.pretrain_consistent <= 1:
            problems.append(
                f"pretrain_consistent must be a fraction in [0, 1], got {self.pretrain_consistent}"
            )
        if not 0 <= self.pretrain_quoted <= 1:
            problems.append(f"pretrain_quoted must be a fraction in [0, 1], got {self.pretrain_quoted}")
        if not self.ptx >= 0:
            problems.append(f"ptx must be a weight >= 0, got {self.ptx}")
        if self.ptx and self.stage == "pretrain":
            problems.append(
                "ptx mixes pretraining documents into a fine-tuning stage; pretrain is one already"
            )
        if not self.cot_nll >= 0:
            problems.append(f"cot_nll must be a weight >= 0, got {self.cot_nll}")
        if self.cot_nll and not (self.cot and self.stage in ("ipo", "dpo")):
            problems.append("cot_nll is for a CoT preference stage (ipo or dpo with cot)")
        if self.targets_per_episode < 1:
            problems.append(f"targets_per_episode must be >= 1, got {self.targets_per_episode}")
        elif self.targets_per_episode > 1 and self.stage not in ("ipo", "dpo"):
            problems.append("targets_per_episode > 1 is for a preference stage (ipo or dpo)")
        if self.chat_template and self.shot_targets:
            problems.append(
                "shot_targets labels spans of the plain prompt; it cannot be used with chat_template"
            )
        if self.chat_template and self.init is None:
            problems.append(
                "chat_template needs a model with a chat template (init), not the tiny model built here"
            )
        if self.max_prompt_tokens < 1 or self.max_target_tokens < 1:
            problems.append("max_prompt_tokens and max_target_tokens must be >= 1")
        if self.cot and self.context == "description":
            problems.append("cot with context 'description' would copy the description it is given")
        if problems:
            raise ValueError("invalid train config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trained_as(self, saved: dict[str, Any]) -> bool:
        """Whether a manifest's saved config is this one. A field added to TrainConfig since it was
        written counts as its default (that is what the run trained with)."""
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        filled = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        return json.loads(json.dumps(filled)) == json.loads(json.dumps(self.to_dict()))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


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
    from .models import ModelError, check_causal_lm_dir

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


def disable_dropout(model: Any) -> int:
    """Turn every dropout in ``model`` off (nn.Dropout modules and attention dropout rates); returns
    how many were on."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, n = 0.0, n + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, n = 0.0, n + 1
    return n


# ---------------------------------------------------------------------------------------------------
# Tokenized examples


@dataclass
class Example:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    # Labels over the prompt (-100 = not supervised), set for Pref-FT with shot_targets.
    prompt_labels: list[int] | None = None
    # Examples of one group (one user's shots, several targets: TrainConfig.targets_per_episode) share
    # this id and sit next to each other in a batch; None: a group of its own.
    group: int | None = None
    # Earliest shots dropped so that the prompt fits (TrainConfig.max_prompt_tokens).
    shots_cut: int = 0


def episode_texts(ep: Episode, cfg: TrainConfig) -> tuple[str, str, str]:
    """(prompt, chosen target, rejected target) for one episode under the config's context and CoT.

    With CoT the user description is teacher-forced: for Pref-FT it is part of the target (the model
    learns to write it); for IPO/DPO it is moved into the shared prompt, so the preference signal is
    only on the responses."""
    shots = ep.shots if cfg.context == "fewshot" else ()
    assert ep.chosen is not None and ep.rejected is not None
    if cfg.context == "description":
        return (
            build_prompt(shots, ep.question, instruction=ep.instruction, description=ep.description or ""),
            ep.chosen,
            ep.rejected,
        )
    if cfg.cot:
        desc = ep.description or ""
        if cfg.stage in ("ipo", "dpo"):
            return (
                build_prompt(shots, ep.question, instruction=ep.instruction, description=desc),
                ep.chosen,
                ep.rejected,
            )
        prompt = build_cot_prompt(shots, ep.question, instruction=ep.instruction)
        return prompt, cot_target(desc, ep.chosen), cot_target(desc, ep.rejected)
    return build_prompt(shots, ep.question, instruction=ep.instruction), ep.chosen, ep.rejected


def prompt_limit(cfg: TrainConfig, context: int | None) -> int:
    """The longest prompt a run trains on: ``max_prompt_tokens``, and never so long that the response
    (up to ``max_target_tokens`` and its EOS) would run past the model's context."""
    if context is None:
        return cfg.max_prompt_tokens
    room = context - cfg.max_target_tokens - 1
    if room < 1:
        raise ValueError(
            f"max_target_tokens {cfg.max_target_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens"
        )
    return min(cfg.max_prompt_tokens, room)


def tokenize_episode(tok: Any, ep: Episode, cfg: TrainConfig, *, limit: int | None = None) -> Example:
    """Token ids; a prompt over ``limit`` (default ``max_prompt_tokens``) drops its earliest shots until
    it fits, never the target (``Example.shots_cut`` counts them). Encoded as generation encodes it
    (``modeling.llm.fspo_prompt_ids``): the document BOS, or the model's chat template."""
    from .llm import document_bos_id, fspo_prompt_ids

    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    limit = cfg.max_prompt_tokens if limit is None else limit
    # Shot targets need character offsets into the plain prompt (chat_template is refused with them).
    label_shots = cfg.shot_targets and cfg.stage == "sft" and cfg.context == "fewshot"
    bos_id = document_bos_id(tok) if label_shots else None
    bos = [bos_id] if bos_id is not None else []
    n_shots = len(ep.shots)
    while True:
        prompt, chosen, rejected = episode_texts(ep, cfg)
        if label_shots:
            enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
            p = bos + enc["input_ids"]
        else:
            p = fspo_prompt_ids(tok, prompt, chat_template=cfg.chat_template)
        if len(p) <= limit or not ep.shots:
            break
        ep = dataclasses.replace(ep, shots=ep.shots[1:])
    c = tok(chosen, add_special_tokens=False)["input_ids"][: cfg.max_target_tokens] + eos
    r = tok(rejected, add_special_tokens=False)["input_ids"][: cfg.max_target_tokens] + eos
    labels = None
    if label_shots:
        spans = shot_response_spans(prompt)
        inside = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
        labels = [-100] * len(bos) + [t if i else -100 for t, i in zip(enc["input_ids"], inside, strict=True)]
        labels = labels[-limit:]
    return Example(p[-limit:], c, r, labels, shots_cut=n_shots - len(ep.shots))


def pretrain_episode(
    ep: Episode, rng: random.Random, src: EpisodeSource, consistent: float = 0.0, quoted: float = 0.0
) -> Episode:
    """The base model's data: the same format, but each shot's pair in random order and as the target a
    random answer to the target question, so the base learns to answer on topic in the domain's language
    without ever seeing a preference signal.

    With probability ``consistent`` the document is one author's instead (``consistent_document``), and
    with probability ``quoted`` such a document quotes another writer beside each of the author's shots."""
    from .data import Pair

    if consistent and src.styled_answers is not None and rng.random() < consistent:
        return consistent_document(ep, rng, src, quoted=bool(quoted) and rng.random() < quoted)
    shots = tuple(
        Pair(s.question, *((s.chosen, s.rejected) if rng.random() < 0.5 else (s.rejected, s.chosen)))
        for s in ep.shots
    )
    options = src.answers[int(ep.meta["question_id"])]
    return dataclasses.replace(ep, shots=shots, chosen=rng.choice(options), rejected=rng.choice(options))


def consistent_document(
    ep: Episode, rng: random.Random, src: EpisodeSource, *, quoted: bool = False
) -> Episode:
    """One author's document: every response in it (both of each shot's and the target) is an answer
    to its question in one style, the one nearest a style drawn at random (most trait values shared).

    Style persists within a document, as it does in the text real language models are pretrained on;
    the labels carry nothing (both responses of a shot share the style), so the base still never sees a
    preference. What it does learn is to continue in the style of its context: in the tiny world that
    in-context skill appeared between 300 and 1,000 pretraining steps (docs/benchmarks.md), and without
    it Pref-FT never learned to read a user's shots.

    ``quoted``: each shot's second response is instead another writer's answer to that question, in
    another style where one exists; the author's stays first, under ``## Preferred Response``."""
    from .data import Pair

    assert src.styled_answers is not None
    target_q = int(ep.meta["question_id"])
    anchor = rng.choice(src.styled_answers[target_q])[1]

    def answer(question_id: int) -> str:
        options = src.styled_answers[question_id]  # type: ignore[index]
        shared = [sum(a == b for a, b in zip(style, anchor, strict=True)) for _, style in options]
        best = max(shared)
        return rng.choice([text for (text, _), n in zip(options, shared, strict=True) if n == best])

    def other(question_id: int, mine: str) -> str:
        options = src.styled_answers[question_id]  # type: ignore[index]
        style = next(style for text, style in options if text == mine)
        pool = [text for text, s in options if s != style] or [text for text, _ in options if text != mine]
        return rng.choice(pool or [mine])

    shots = []
    for s in ep.shots:
        q = src.question_ids[s.question]
        mine = answer(q)
        shots.append(Pair(s.question, mine, other(q, mine) if quoted else answer(q)))
    return dataclasses.replace(ep, shots=tuple(shots), chosen=answer(target_q), rejected=answer(target_q))


# ---------------------------------------------------------------------------------------------------
# Models


def build_tiny_model(src: EpisodeSource, out_dir: Path, cfg: TrainConfig) -> tuple[Any, Any]:
    """A tiny Llama-architecture decoder with random weights and a byte-level BPE tokenizer trained on
    the dataset's own text (questions, responses, personas and the prompt format's headers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tinymodel import train_tokenizer

    rng = random.Random(cfg.seed)
    texts = list(src.questions.text) + rng.sample(src.responses, min(len(src.responses), 5000))
    texts += rng.sample(list(src.descriptions.values()), min(len(src.descriptions), 2000))
    texts += [
        build_cot_prompt(e.shots, e.question, instruction=e.instruction)
        + cot_target(e.description or "", e.chosen or "")
        for e in src.sample(50, shots=2, seed=cfg.seed)
    ]
    tok = train_tokenizer(texts, out_dir / "tokenizer", vocab_size=cfg.tiny["vocab_size"])
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_heads"],
        num_key_value_heads=t["num_heads"],
        max_position_embeddings=max(4096, cfg.max_prompt_tokens + 2 * cfg.max_target_tokens + 8),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config), tok


def _count_params(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ---------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]


def _batch_seed(cfg: TrainConfig, step: int) -> int:
    return cfg.seed * 1_000_003 + step


def _step_draw(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """The seed and shot count of a step's batch: deterministic in (seed, step), so a resumed run sees
    exactly the batches it would have seen."""
    if cfg.overfit_batches:
        step %= cfg.overfit_batches
    # One shot count per batch (drawn from the range): the rows then have nearly the same length, so
    # padding wastes little compute; over many steps every N in the range is still trained.
    seed = _batch_seed(cfg, step)
    return seed, int(np.random.default_rng(seed).integers(cfg.shots[0], cfg.shots[1] + 1))


def _episodes_for_step(src: EpisodeSource, cfg: TrainConfig, step: int) -> list[Episode]:
    seed, shots = _step_draw(cfg, step)
    return src.sample(cfg.batch_size, shots=shots, seed=seed)


def _examples(
    src: EpisodeSource, tok: Any, cfg: TrainConfig, step: int, *, limit: int | None = None
) -> list[Example]:
    if cfg.targets_per_episode > 1:
        seed, shots = _step_draw(cfg, step)
        groups = src.sample_groups(cfg.batch_size, shots=shots, targets=cfg.targets_per_episode, seed=seed)
        return [
            dataclasses.replace(tokenize_episode(tok, e, cfg, limit=limit), group=g)
            for g, group in enumerate(groups)
            for e in group
        ]
    eps = _episodes_for_step(src, cfg, step)
    if cfg.stage == "pretrain":
        rng = random.Random(_batch_seed(cfg, step))
        eps = [pretrain_episode(e, rng, src, cfg.pretrain_consistent, cfg.pretrain_quoted) for e in eps]
    return [tokenize_episode(tok, e, cfg, limit=limit) for e in eps]


def _ptx_config(cfg: TrainConfig) -> TrainConfig:
    """How a fine-tuning stage draws and scores its ptx documents: as the pretrain stage does, with the
    few-shot format, 0..hi shots, and a seed of their own (not the stage's batches)."""
    return dataclasses.replace(
        cfg,
        stage="pretrain",
        context="fewshot",
        cot=False,
        shots=(0, max(1, cfg.shots[1])),
        ptx=0.0,
        cot_nll=0.0,
        targets_per_episode=1,
        seed=cfg.seed + 7919,
    )


def _sft_loss(model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int) -> tuple[torch.Tensor, int]:
    """Token-averaged NLL of the targets (all tokens for pretrain). Returns (loss, tokens processed).

    When only the responses are supervised (Pref-FT without shot targets), the logits are computed for
    the response positions alone (``response_logits``): on a real vocabulary the full [B, T, V] logits
    of a few-shot prompt are most of a step's memory."""
    from .losses import response_logits, sft_loss

    if cfg.stage != "pretrain" and all(ex.prompt_labels is None for ex in examples):
        prompts, targets = [], []
        for ex in examples:
            for t in [ex.chosen] + ([ex.rejected] if cfg.sft_include_rejected else []):
                prompts.append(ex.prompt)
                targets.append(t)
        logits, labels, mask, n = response_logits(model, prompts, targets, pad_id=pad_id)
        return sft_loss(logits, labels, mask), n
    rows, labels = [], []
    for ex in examples:
        targets = [ex.chosen] + ([ex.rejected] if cfg.sft_include_rejected else [])
        for t in targets:
            rows.append(ex.prompt + t)
            # pretrain: the whole sequence is text to model; Pref-FT: only the response (prompt masked).
            if cfg.stage == "pretrain":
                labels.append(ex.prompt + t)
            else:
                labels.append((ex.prompt_labels or [-100] * len(ex.prompt)) + t)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(r)] = 1
    out = model(
        input_ids=ids.to(model.device), attention_mask=att.to(model.device), labels=lab.to(model.device)
    )
    return out.loss, int(att.sum())


def _pair_logps(
    model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chosen and rejected log-probs of a batch, the shared prompt computed once per pair (packed), and
    once per group for the targets of one group (``Example.group``)."""
    from .losses import packed_group_logps, packed_pair_logps

    if any(e.group is not None for e in examples):
        groups: list[list[tuple[list[int], list[int], list[int]]]] = []
        for i, e in enumerate(examples):
            if i == 0 or e.group is None or e.group != examples[i - 1].group:
                groups.append([])
            groups[-1].append((e.prompt, e.chosen, e.rejected))
        return packed_group_logps(model, groups, average=cfg.average_logps, pad_id=pad_id)
    return packed_pair_logps(
        model,
        [e.prompt for e in examples],
        [e.chosen for e in examples],
        [e.rejected for e in examples],
        average=cfg.average_logps,
        pad_id=pad_id,
    )


def _pref_loss(
    model: Any, examples: list[Example], ref: torch.Tensor, cfg: TrainConfig, pad_id: int
) -> tuple[torch.Tensor, dict[str, float], int]:
    from .losses import dpo_loss, ipo_loss

    pc, pr, n_tokens = _pair_logps(model, examples, cfg, pad_id)
    fn = ipo_loss if cfg.stage == "ipo" else dpo_loss
    losses, rc, rr = fn(pc, pr, ref[:, 0].to(pc), ref[:, 1].to(pc), cfg.beta)
    acc = float(((pc - pr) - (ref[:, 0] - ref[:, 1]).to(pc) > 0).float().mean())
    metrics = {"reward_margin": float((rc - rr).mean()), "pref_accuracy": acc, "pairs": len(examples)}
    return losses.mean(), metrics, n_tokens


@torch.no_grad()
def _reference_logps(
    model: Any, batches: list[list[Example]], cfg: TrainConfig, pad_id: int, progress: Progress | None
) -> torch.Tensor:
    """Log-probs of chosen and rejected under the frozen reference (the initial model), once:
    [steps, pairs, 2], pairs = the largest batch's (batch_size, times up to targets_per_episode)."""
    model.eval()
    out = torch.zeros(len(batches), max(map(len, batches)), 2, dtype=torch.float64)
    for s, ex in enumerate(batches):
        c, r, _ = _pair_logps(model, ex, cfg, pad_id)
        out[s, : len(ex), 0], out[s, : len(ex), 1] = c.double().cpu(), r.double().cpu()
        if progress and (s % 10 == 0 or s == len(batches) - 1):
            progress(s + 1, len(batches), "reference log-probs")
    model.train()
    return out


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))  # cosine to 10% of the peak

    return f


def _save(model: Any, tok: Any, path: Path, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Write a checkpoint atomically: into path.tmp, then rename over path."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
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


def _init_is_lora(init: str | None) -> bool:
    return init is not None and (Path(init) / "adapter_config.json").is_file()


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def train(
    cfg: TrainConfig,
    *,
    progress: Progress | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Run one stage. Resumes from ``out_dir/checkpoint-last`` when it holds the same config.

    ``device``: where the model trains (default: cuda when visible, else cpu); not part of the config,
    so a run started on one device resumes on another."""
    from .llm import context_length

    device = device or default_device()
    if cfg.init is not None:  # bad input changes nothing: refused before the run folder exists
        check_model_dir(cfg.init)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = EpisodeSource(cfg.dataset, split="train", all_questions=cfg.stage == "pretrain")
    # The base's documents (the pretrain stage's, or a fine-tuning stage's ptx batches) need the styles.
    if (cfg.stage == "pretrain" or cfg.ptx) and cfg.pretrain_consistent and src.styled_answers is None:
        raise ValueError(
            f"{cfg.dataset}: pretrain_consistent needs each response's trait values (trait_* columns in "
            "responses.parquet), and this dataset has none; use pretrain_consistent 0"
        )
    eval_src = EpisodeSource(cfg.dataset, split="test")
    # Language-modelling terms beside the stage's loss: (metric, weight, source, how its batches are
    # drawn and scored). ptx: the base's documents; cot_nll: the CoT Pref-FT view of the step's own
    # episodes (same seed, so the same users and targets).
    aux_terms: list[tuple[str, float, EpisodeSource, TrainConfig]] = []
    if cfg.ptx:
        ptx_src = EpisodeSource(cfg.dataset, split="train", all_questions=True)
        aux_terms.append(("ptx_loss", cfg.ptx, ptx_src, _ptx_config(cfg)))
    if cfg.cot_nll:
        aux_terms.append(
            (
                "cot_nll",
                cfg.cot_nll,
                src,
                dataclasses.replace(cfg, stage="sft", cot_nll=0.0, ptx=0.0, targets_per_episode=1),
            )
        )
    torch.manual_seed(cfg.seed)
    last = out_dir / "checkpoint-last"
    start_step, state = 0, None
    init_manifest: dict[str, Any] = {}
    if (last / "trainer_state.pt").is_file():
        # A field added to TrainConfig since the checkpoint was written counts as its default.
        if not cfg.trained_as(json.loads((last / MANIFEST).read_text())["config"]):
            raise CheckpointError(
                f"{last} was written with another config; delete it or rerun with that config"
            )
        model, tok = load_model(last, dtype=cfg.dtype, trainable=True, device=device)
        state = torch.load(last / "trainer_state.pt", weights_only=False)
        start_step = state["step"]
    elif cfg.init is None:
        model, tok = build_tiny_model(src, out_dir, cfg)
        model = model.to(device)
    elif cfg.lora and _init_is_lora(cfg.init):
        # Stage 2 from a LoRA Pref-FT: IPO is initialised from stage 1, so it trains the same adapter on
        # (the reference log-probs are computed from it before the first step). A new adapter on the
        # merged weights would be saved naming the bare base, and load without stage 1's update.
        init_manifest = load_checkpoint_manifest(cfg.init)
        model, tok = load_model(cfg.init, dtype=cfg.dtype, trainable=True, device=device)
    else:
        init_manifest = load_checkpoint_manifest(cfg.init) if (Path(cfg.init) / MANIFEST).exists() else {}
        model, tok = load_model(cfg.init, dtype=cfg.dtype, device=device)
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    target_modules="all-linear",
                    lora_dropout=0.0,
                    task_type="CAUSAL_LM",
                ),
            )
    if cfg.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with LoRA (whose
        # frozen embeddings would otherwise leave the checkpointed blocks without a gradient path).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_dropout(model)
    limit = prompt_limit(cfg, context_length(model))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    preference = cfg.stage in ("ipo", "dpo")

    # Reference log-probs for every training batch, once, from the initial (= reference) model.
    ref_all = None
    if preference:
        if state is not None:
            ref_all = state["ref"]
        else:
            batches = [_examples(src, tok, cfg, s, limit=limit) for s in range(cfg.steps)]
            ref_all = _reference_logps(model, batches, cfg, pad_id, progress)

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    else:
        opt = torch.optim.RMSprop(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    history: list[dict[str, Any]] = []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]

    eval_examples = [
        tokenize_episode(tok, e, cfg, limit=limit)
        for e in eval_src.sample(cfg.eval_episodes, shots=cfg.shots, seed=10_007)
    ]
    if cfg.stage == "pretrain":
        rng = random.Random(10_007)
        eval_examples = [
            tokenize_episode(
                tok,
                pretrain_episode(e, rng, eval_src, cfg.pretrain_consistent, cfg.pretrain_quoted),
                cfg,
                limit=limit,
            )
            for e in eval_src.sample(cfg.eval_episodes, shots=cfg.shots, seed=10_007)
        ]
    # The held-out pairs' reference log-probs, also once (a resumed run reads them back).
    eval_batches = [
        eval_examples[i : i + cfg.batch_size] for i in range(0, len(eval_examples), cfg.batch_size)
    ]
    if not preference:
        eval_ref = None
    elif state is not None:
        eval_ref = state["eval_ref"]
    else:
        eval_ref = _reference_logps(model, eval_batches, cfg, pad_id, None)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            if preference:
                assert eval_ref is not None
                vals, accs = [], []
                for b, ex in enumerate(eval_batches):
                    loss, m, _ = _pref_loss(model, ex, eval_ref[b, : len(ex)], cfg, pad_id)
                    vals.append(float(loss) * len(ex))
                    accs.append(m["pref_accuracy"] * len(ex))
                res = {
                    "eval_loss": sum(vals) / len(eval_examples),
                    "eval_pref_accuracy": sum(accs) / len(eval_examples),
                }
            else:
                res = {
                    "eval_loss": float(
                        np.mean([float(_sft_loss(model, ex, cfg, pad_id)[0]) for ex in eval_batches])
                    )
                }
        model.train()
        return res

    total, trainable = _count_params(model)
    model.train()
    if not history:
        history.append({"step": 0, **evaluate()})
    tokens, t0 = 0, time.perf_counter()
    cut = (state or {}).get("cut") or {"prompts_cut": 0, "shots_cut": 0}
    for step in range(start_step, cfg.steps):
        examples = _examples(src, tok, cfg, step, limit=limit)
        cut["prompts_cut"] += sum(ex.shots_cut > 0 for ex in examples)
        cut["shots_cut"] += sum(ex.shots_cut for ex in examples)
        if preference:
            assert ref_all is not None
            loss, metrics, n = _pref_loss(model, examples, ref_all[step, : len(examples)], cfg, pad_id)
        else:
            loss, n = _sft_loss(model, examples, cfg, pad_id)
            metrics = {}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for metric, weight, aux_src, aux_cfg in aux_terms:  # a backward each: one graph held at a time
            lm, n_lm = _sft_loss(model, _examples(aux_src, tok, aux_cfg, step, limit=limit), aux_cfg, pad_id)
            (weight * lm).backward()
            metrics[metric] = float(lm.detach())
            loss, n = loss.detach() + weight * lm.detach(), n + n_lm
        # Clip the global gradient norm: from-scratch tiny models spike early otherwise.
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        sched.step()
        tokens += n
        done = step + 1
        loss_value = float(loss.detach())
        if progress:
            progress(done, cfg.steps, f"{cfg.stage} loss {loss_value:.3f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            row = {
                "step": done,
                "loss": loss_value,
                "grad_norm": gnorm,
                "lr": sched.get_last_lr()[0],
                "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
                **metrics,
                **cut,
                **evaluate(),
            }
            history.append(row)
            if log:
                log(row)
        if done % cfg.save_every == 0 and done < cfg.steps:
            _save(
                model,
                tok,
                last,
                cfg,
                {
                    "files": {
                        "trainer_state.pt": {
                            "step": done,
                            "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "history": history,
                            "cut": cut,
                            "ref": ref_all,
                            "eval_ref": eval_ref,
                        }
                    }
                },
            )

    metrics = {
        "history": history,
        "final": history[-1],
        "params": total,
        "trainable_params": trainable,
        "prompt_limit": limit,
        **cut,
    }
    extra = {
        "stage": cfg.stage,
        "context": cfg.context,
        "cot": cfg.cot,
        "domain": src.domain,
        "instruction": src.instruction,
        "init": cfg.init,
        "init_stage": init_manifest.get("stage"),
        "metrics": metrics,
        "tokenizer": getattr(tok, "name_or_path", None) or "trained-from-dataset",
    }
    _save(model, tok, out_dir / "model", cfg, extra)
    # The published checkpoint is out_dir itself: move the model files up, then drop the resume state.
    final = out_dir / "model"
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for f in sorted(
        final.iterdir(), key=lambda f: f.name == MANIFEST
    ):  # the manifest last: it marks completeness
        os.replace(f, out_dir / f.name)
    final.rmdir()
    shutil.rmtree(last, ignore_errors=True)
    shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
    return TrainResult(out_dir=out_dir, metrics=metrics)
