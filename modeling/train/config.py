"""What one training run is: ``TrainConfig``, validated up front and saved beside its checkpoint.

Each field's ``metadata["help"]`` is its one-line ``fspo train`` flag help (the flags are generated from
the fields: ``modeling.cli.flags``); the class docstring says more about each.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Progress = Callable[[int, int, str], None]
MANIFEST = "fspo.json"

STAGES = ("pretrain", "sft", "ipo", "dpo")
CONTEXTS = ("fewshot", "none", "description")
PREFERENCE_STAGES = ("ipo", "dpo")


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

    dataset: str = field(metadata={"help": "a synthetic dataset directory (fspo synth)"})
    out_dir: str = field(
        metadata={"help": "checkpoint directory (a killed run resumes from it)", "flag": "out"}
    )
    init: str | None = field(
        default=None,
        metadata={"help": "model to start from: an earlier stage's output or a local HF model dir"},
    )
    stage: Literal["pretrain", "sft", "ipo", "dpo"] = field(
        default="sft", metadata={"help": "pretrain (the base), sft (Pref-FT), ipo or dpo"}
    )
    context: Literal["fewshot", "none", "description"] = field(
        default="fewshot",
        metadata={"help": "what the prompt holds about the user: shots, nothing, or the true description"},
    )
    cot: bool = field(default=False, metadata={"help": "user-description chain-of-thought"})
    shots: tuple[int, int] = field(
        default=(1, 8),
        metadata={"help": "few-shot pairs per prompt, drawn per episode", "metavar": ("MIN", "MAX")},
    )
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "episodes per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "after the warm-up: cosine to 10% of the peak, or constant"}
    )
    optimizer: Literal["adamw", "rmsprop"] = field(
        default="adamw", metadata={"help": "AdamW (betas 0.9, 0.95) or RMSprop (the paper's)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this"})
    beta: float = field(default=0.01, metadata={"help": "IPO / DPO temperature"})
    average_logps: bool = field(
        default=False, metadata={"help": "length-average log-probs (TRL's IPO) instead of summing"}
    )
    sft_include_rejected: bool = field(
        default=False,
        metadata={"help": "Pref-FT also on the rejected response (the released code's variant)"},
    )
    shot_targets: bool = field(
        default=False,
        metadata={"help": "Pref-FT also on each shot's preferred response given the shots before it"},
    )
    lora: bool = field(default=False, metadata={"help": "train a peft LoRA adapter instead of all weights"})
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "keep token embeddings and the output head fixed (keeps a small model copying unseen topics)"
        },
    )
    pretrain_consistent: float = field(
        default=0.0,
        metadata={
            "help": "pretrain (and --ptx documents): this fraction of documents has one author (one style)",
            "metavar": "FRACTION",
        },
    )
    pretrain_quoted: float = field(
        default=0.0,
        metadata={
            "help": "pretrain (and --ptx documents): this fraction of one-author documents quotes another writer",
            "metavar": "FRACTION",
        },
    )
    ptx: float = field(
        default=0.0,
        metadata={
            "help": "sft/ipo/dpo: add WEIGHT x the language-modelling loss on the base's documents at each step",
            "metavar": "WEIGHT",
        },
    )
    cot_nll: float = field(
        default=0.0,
        metadata={
            "help": "ipo/dpo with --cot: add WEIGHT x the CoT Pref-FT loss (description, then chosen response)",
            "metavar": "WEIGHT",
        },
    )
    targets_per_episode: int = field(
        default=1,
        metadata={
            "help": "ipo/dpo: K held-out pairs of the user per episode, scored against the same shots",
            "metavar": "K",
        },
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "wrap prompts in the model's chat template (default: the paper's plain Markdown)"},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "the weights' dtype; bfloat16 on a GPU"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute activations in the backward pass: far less memory on long prompts, ~1/3 more compute"
        },
    )
    max_prompt_tokens: int = field(
        default=4096, metadata={"help": "the longest prompt; a longer one drops its earliest shots"}
    )
    max_target_tokens: int = field(default=256, metadata={"help": "the longest response trained on"})
    overfit_batches: int = field(
        default=0,
        metadata={
            "help": 'cycle over the first K batches only (the classic "can it overfit" check); 0: off',
            "metavar": "K",
        },
    )
    eval_every: int = field(default=50, metadata={"help": "evaluate on held-out users every this many steps"})
    eval_episodes: int = field(default=32, metadata={"help": "held-out episodes per evaluation"})
    save_every: int = field(
        default=50, metadata={"help": "write the resume checkpoint every this many steps"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the batches and of the tiny model"})
    # Shape of the tiny model built when init is None (set in a --config file; no flag): the demo's,
    # modeling.tinymodel.TINY_SHAPE with its vocabulary.
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
        problems = [
            *self._choice_problems(),
            *self._budget_problems(),
            *self._mix_problems(),
            *self._option_problems(),
        ]
        if problems:
            raise ValueError("invalid train config: " + "; ".join(problems))

    def _choice_problems(self) -> list[str]:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage must be pretrain, sft, ipo or dpo, not {self.stage!r}")
        if self.context not in CONTEXTS:
            problems.append(f"context must be fewshot, none or description, not {self.context!r}")
        if self.init is None and self.stage != "pretrain":
            problems.append(f"stage {self.stage!r} needs init (a base model or an earlier stage's output)")
        return problems

    def _budget_problems(self) -> list[str]:
        problems = []
        lo, hi = self.shots
        if not 0 <= lo <= hi:
            problems.append(f"shots must be a range lo..hi with 0 <= lo <= hi, got {self.shots}")
        if self.context == "fewshot" and hi == 0:
            problems.append("context 'fewshot' needs shots > 0")
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be >= 1")
        if not (self.lr > 0 and self.beta > 0):
            problems.append("lr and beta must be > 0")
        return problems

    def _mix_problems(self) -> list[str]:
        """The pretraining documents' mix and the auxiliary language-modelling terms."""
        problems = []
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
        if self.cot_nll and not (self.cot and self.stage in PREFERENCE_STAGES):
            problems.append("cot_nll is for a CoT preference stage (ipo or dpo with cot)")
        return problems

    def _option_problems(self) -> list[str]:
        problems = []
        if self.targets_per_episode < 1:
            problems.append(f"targets_per_episode must be >= 1, got {self.targets_per_episode}")
        elif self.targets_per_episode > 1 and self.stage not in PREFERENCE_STAGES:
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
        return problems

    @property
    def preference(self) -> bool:
        """Whether the stage learns from preferences (IPO / DPO) against a frozen reference."""
        return self.stage in PREFERENCE_STAGES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trained_as(self, saved: dict[str, Any]) -> bool:
        """Whether a manifest's saved config is this one. A field added to TrainConfig since it was
        written counts as its default (that is what the run trained with)."""
        defaults = {
            f.name: _field_default(f)
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        filled = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        return json.loads(json.dumps(filled)) == json.loads(json.dumps(self.to_dict()))


def _field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (made by its factory when it has one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()
