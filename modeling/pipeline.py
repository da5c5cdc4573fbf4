"""The paper's comparison end to end (``fspo paper-table``): train every arm, then evaluate them.

Stages, each a ``fspo train`` run in ``<out>/<name>`` (skipped when already complete, so a killed
pipeline resumes stage by stage):

    base            pretrain (the tiny world's base model: format and language, no preference signal)
    ipo-aggregate   IPO from base, no user context                     (the paper's "IPO" baseline)
    pref-ft         Pref-FT from base, few-shot context                 (few-shot Pref-FT)
    fspo            IPO from pref-ft, few-shot context                  (FSPO)
    pref-ft-cot     Pref-FT with the user-description chain-of-thought
    fspo-cot        IPO from pref-ft-cot                                (FSPO + CoT)
    oracle-sft      Pref-FT with the true persona description in the prompt
    oracle          IPO from oracle-sft                                 (oracle-persona model)
    random-sft      Pref-FT on the unstructured ablation dataset (when given)
    fspo-random     IPO from random-sft                                 (structure ablation)

Arms evaluated against ``base`` (no few-shot context): few-shot prompting of the base, the IPO
baseline, few-shot Pref-FT, FSPO, FSPO + CoT, the oracle and the ablation; plus FSPO's shot sweep,
and FSPO judged head to head against each of the other arms on the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .evaluate import Arm, EvalResult, evaluate
from .train import MANIFEST, TrainConfig, train

Progress = Callable[[int, int, str], None]


@dataclass
class PipelineConfig:
    """Budgets of the whole comparison. ``steps`` per stage kind; everything else is shared."""

    dataset: str
    out_dir: str
    random_dataset: str | None = None
    # A pretrained Hugging Face causal-LM directory (e.g. ``fspo models pull smollm2-135m``) as the base
    # model: no base is pretrained, every stage starts from it, and it is the no-context baseline arm.
    # None: the tiny world's base, pretrained from scratch on the dataset.
    base_model: str | None = None
    # Train LoRA adapters (peft, every linear layer) instead of all weights; FSPO's IPO then continues
    # the Pref-FT adapter.
    lora: bool = False
    lora_r: int = 16
    # The longest response a stage trains on (TrainConfig.max_target_tokens).
    max_target_tokens: int = 256
    shots: tuple[int, int] = (1, 4)
    # The most shots in one of the base model's documents (pretraining draws 0..this many); None: as
    # many as the fine-tuning stages show (shots[1]).
    pretrain_shots: int | None = None
    batch_size: int = 8
    # Short Pref-FT: its targets (the closer of two random responses) mostly teach the population's
    # average preference, and longer Pref-FT undid the base's reading of the preferred responses
    # (docs/results.md). IPO, where the preference signal is, gets the long budget; with the ptx term
    # below holding the base's language, it also takes a larger learning rate (5e-4: FSPO 66.5% against
    # 63.0% at 2e-4).
    # "sft-cot" is the CoT arm's Pref-FT (``sft`` when absent): it has a language to learn as well, the
    # user descriptions, which the base's documents never contain, so it trains the embeddings and runs
    # longer at a larger rate (100 steps at 3e-4 with fixed embeddings left 53% of its answers empty).
    steps: dict[str, int] = field(
        default_factory=lambda: {"pretrain": 1500, "sft": 100, "sft-cot": 400, "ipo": 900}
    )
    lr: dict[str, float] = field(
        default_factory=lambda: {"pretrain": 3e-3, "sft": 3e-4, "sft-cot": 1e-3, "ipo": 5e-4}
    )
    beta: float = 0.1
    # The tiny world's fine-tuning recipe (see TrainConfig): embeddings fixed after pretraining, and
    # Pref-FT supervising every shot's preferred response too.
    freeze_embeddings: bool = True
    shot_targets: bool = True
    # The base model's documents (TrainConfig.pretrain_consistent / pretrain_quoted): 80% one-author
    # documents, half of them quoting another writer beside each shot, give a base that continues the
    # style of the responses marked preferred, as an instruction-tuned model would.
    pretrain_consistent: float = 0.8
    pretrain_quoted: float = 0.5
    # Weight of the base's documents mixed into each fine-tuning stage's loss (TrainConfig.ptx), per
    # stage kind. IPO's loss is on summed log-probs (its gradient norm is ~100x a token-averaged NLL's),
    # so its weight is larger for the same pull. Without it FSPO answered 13.5% of held-out questions
    # off topic (docs/results.md).
    ptx: dict[str, float] = field(default_factory=lambda: {"sft": 1.0, "ipo": 100.0})
    # FSPO + CoT's IPO also keeps writing descriptions (TrainConfig.cot_nll; without it 900 IPO steps
    # unlearned them: 73.5% empty answers, 10.7% win rate).
    cot_nll: float = 100.0
    # Held-out pairs of the episode's user per IPO episode, all scored against the same shots
    # (TrainConfig.targets_per_episode), in every IPO stage alike (aggregate IPO sees as many pairs).
    ipo_targets: int = 1
    # Word-level in effect: the domain's vocabulary fits in 2048 BPE tokens, which halves the sequence
    # length of the byte-level 512-token vocabulary.
    tiny: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "intermediate_size": 384,
            "vocab_size": 2048,
        }
    )
    eval_episodes: int = 100
    eval_shots: int = 4
    shot_sweep: tuple[int, ...] = (0, 1, 2, 4, 8)
    max_new_tokens: int = 120
    # Sampled, as the paper's arms are: greedy decoding of a tiny model collapses into one repeated
    # sentence, which the oracle penalises in every arm alike.
    temperature: float = 0.7
    seed: int = 0
    # A subset of the stages to train (and of the arms to evaluate); None = all of them.
    only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.base_model is not None and not Path(self.base_model).is_dir():
            raise ValueError(f"base_model {self.base_model!r} is not a model directory")
        if self.ipo_targets < 1:
            raise ValueError(f"ipo_targets must be 1 or more, not {self.ipo_targets}")
        if self.pretrain_shots is not None and self.pretrain_shots < 0:
            raise ValueError(f"pretrain_shots must be 0 or more (or None), not {self.pretrain_shots}")
        unknown = sorted(set(self.ptx) - {"sft", "ipo"})
        if unknown:
            raise ValueError(f"ptx weights are per fine-tuning stage kind (sft, ipo), not {unknown}")
        for name, budget in (("steps", self.steps), ("lr", self.lr)):
            missing = sorted({"pretrain", "sft", "ipo"} - set(budget))
            unknown = sorted(set(budget) - {"pretrain", "sft", "sft-cot", "ipo"})
            if missing or unknown:
                raise ValueError(
                    f"{name} has a value per stage kind (pretrain, sft, ipo; sft-cot optional): "
                    f"missing {missing}, unknown {unknown}"
                )


def _stage(
    pc: PipelineConfig,
    name: str,
    stage: str,
    *,
    init: str | None,
    context: Literal["fewshot", "none", "description"] = "fewshot",
    cot: bool = False,
    dataset: str | None = None,
) -> TrainConfig:
    kind = "pretrain" if stage == "pretrain" else "sft" if stage == "sft" else "ipo"
    ptx = float(pc.ptx.get(kind, 0.0))  # __post_init__ allows sft and ipo weights only
    # The CoT arm's Pref-FT writes the user descriptions, words the base has never written: it needs
    # its own budget and trainable embeddings (the output head's rows for those words are still random).
    writes_descriptions = cot and stage == "sft"

    def budget(per_kind: dict[str, Any]) -> Any:
        return per_kind["sft-cot"] if writes_descriptions and "sft-cot" in per_kind else per_kind[kind]

    steps = int(budget(pc.steps))
    return TrainConfig(
        dataset=dataset or pc.dataset,
        out_dir=str(Path(pc.out_dir) / name),
        init=init,
        stage=stage,  # type: ignore[arg-type]
        context=context,
        cot=cot,
        shots=(0, pc.shots[1] if pc.pretrain_shots is None else pc.pretrain_shots)
        if stage == "pretrain"
        else pc.shots,
        steps=steps,
        lr=float(budget(pc.lr)),
        batch_size=pc.batch_size,
        beta=pc.beta,
        tiny=pc.tiny,
        eval_every=max(1, steps // 4),
        save_every=max(1, steps // 4),
        eval_episodes=16,
        warmup_steps=min(20, steps // 5),
        seed=pc.seed,
        lora=pc.lora and stage != "pretrain",
        lora_r=pc.lora_r,
        max_target_tokens=pc.max_target_tokens,
        freeze_embeddings=pc.freeze_embeddings and stage != "pretrain" and not writes_descriptions,
        shot_targets=pc.shot_targets and stage == "sft",
        # The base's document mix, for the pretrain stage and for a fine-tuning stage's ptx documents.
        pretrain_consistent=pc.pretrain_consistent if stage == "pretrain" or ptx else 0.0,
        pretrain_quoted=pc.pretrain_quoted if stage == "pretrain" or ptx else 0.0,
        ptx=ptx,
        cot_nll=pc.cot_nll if cot and kind == "ipo" else 0.0,
        targets_per_episode=pc.ipo_targets if kind == "ipo" else 1,
    )


def stages(pc: PipelineConfig) -> list[tuple[str, TrainConfig]]:
    out = Path(pc.out_dir)

    def p(name: str) -> str:
        if name == "base" and pc.base_model is not None:
            return str(Path(pc.base_model).resolve())
        return str(out / name)

    plan = [
        ("base", _stage(pc, "base", "pretrain", init=None)),
        ("ipo-aggregate", _stage(pc, "ipo-aggregate", "ipo", init=p("base"), context="none")),
        ("pref-ft", _stage(pc, "pref-ft", "sft", init=p("base"))),
        ("fspo", _stage(pc, "fspo", "ipo", init=p("pref-ft"))),
        ("pref-ft-cot", _stage(pc, "pref-ft-cot", "sft", init=p("base"), cot=True)),
        ("fspo-cot", _stage(pc, "fspo-cot", "ipo", init=p("pref-ft-cot"), cot=True)),
        ("oracle-sft", _stage(pc, "oracle-sft", "sft", init=p("base"), context="description")),
        ("oracle", _stage(pc, "oracle", "ipo", init=p("oracle-sft"), context="description")),
    ]
    if pc.random_dataset and (pc.only is None or "fspo-random" in pc.only):
        plan += [
            ("random-sft", _stage(pc, "random-sft", "sft", init=p("base"), dataset=pc.random_dataset)),
            (
                "fspo-random",
                _stage(pc, "fspo-random", "ipo", init=p("random-sft"), dataset=pc.random_dataset),
            ),
        ]
    if pc.base_model is not None:
        plan = [(name, cfg) for name, cfg in plan if name != "base"]  # the given model is the base
    if pc.only is not None:
        unknown = set(pc.only) - {name for name, _ in plan} - ({"base"} if pc.base_model else set())
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are {[n for n, _ in plan]}")
        needed = set(pc.only)
        for name, cfg in reversed(plan):  # a stage also needs the stages it starts from
            if name in needed and cfg.init:
                needed.add(Path(cfg.init).name)
        plan = [(name, cfg) for name, cfg in plan if name in needed]
    return plan


BASELINE = "base (no context)"
FSPO = "FSPO"  # the arm the shot sweep and the head-to-head comparisons are about


def base_dir(pc: PipelineConfig) -> Path:
    """The base model's directory: the given pretrained model, or the tiny base the pipeline trains."""
    return Path(pc.base_model).resolve() if pc.base_model is not None else Path(pc.out_dir) / "base"


def arms(pc: PipelineConfig) -> list[Arm]:
    out = Path(pc.out_dir)
    base = str(base_dir(pc))
    a = [
        Arm(BASELINE, base, "none"),
        Arm("few-shot prompting", base, "fewshot"),
        Arm("IPO (no user context)", str(out / "ipo-aggregate"), "none"),
        Arm("few-shot Pref-FT", str(out / "pref-ft"), "fewshot"),
        Arm(FSPO, str(out / "fspo"), "fewshot"),
        Arm("FSPO + CoT", str(out / "fspo-cot"), "fewshot", cot=True),
        Arm("oracle persona", str(out / "oracle"), "description"),
    ]
    if pc.random_dataset:
        a.append(Arm("FSPO on random data (ablation)", str(out / "fspo-random"), "fewshot"))
    trained = {str(Path(cfg.out_dir)) for _, cfg in stages(pc)}
    if pc.only is None or "base" in pc.only or pc.base_model is not None:
        trained.add(base)
    return [arm for arm in a if arm.model in trained or str(Path(arm.model)) in trained]


def _done(cfg: TrainConfig) -> bool:
    """Whether the stage's checkpoint was trained with this config (a field added to TrainConfig since
    counts as its default, so a new option does not retrain every stage that never used it)."""
    m = Path(cfg.out_dir) / MANIFEST
    return m.is_file() and cfg.trained_as(json.loads(m.read_text()).get("config") or {})


def run_pipeline(
    pc: PipelineConfig, *, progress: Progress | None = None, log: Callable[[str], None] | None = None
) -> EvalResult:
    plan = stages(pc)
    for i, (name, cfg) in enumerate(plan):
        if _done(cfg):
            if log:
                log(f"[{i + 1}/{len(plan)}] {name}: already trained, skipped")
            continue

        def stage_progress(done: int, total: int, what: str, _name: str = name, _i: int = i) -> None:
            if progress:
                progress(done, total, f"[{_i + 1}/{len(plan)}] {_name}: {what}")

        result = train(cfg, progress=stage_progress)
        if log:
            h = result.metrics["history"]
            log(
                f"[{i + 1}/{len(plan)}] {name}: held-out loss {h[0]['eval_loss']:.3f} → {h[-1]['eval_loss']:.3f}"
            )
    planned = arms(pc)
    names = [a.name for a in planned]
    has_fspo = FSPO in names
    return evaluate(
        pc.dataset,
        planned,
        baseline=BASELINE,
        out_dir=Path(pc.out_dir) / "eval",
        episodes=pc.eval_episodes,
        shots=pc.eval_shots,
        shot_sweep=pc.shot_sweep if has_fspo else (),
        sweep_arm=FSPO,
        # The paper's claim is FSPO over each baseline: judged directly on the same episodes too.
        head_to_head=[(FSPO, n) for n in names if n not in (FSPO, BASELINE)] if has_fspo else [],
        max_new_tokens=pc.max_new_tokens,
        temperature=pc.temperature,
        seed=pc.seed,
        progress=progress,
    )


def config_from_json(path: str | Path, **overrides: Any) -> PipelineConfig:
    data = {**json.loads(Path(path).read_text()), **overrides}
    for key in ("shots", "shot_sweep", "only"):  # JSON has lists where the config holds tuples
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return PipelineConfig(**data)
