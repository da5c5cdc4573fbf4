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
baseline, few-shot Pref-FT, FSPO, FSPO + CoT, the oracle and the ablation; plus FSPO's shot sweep.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import Arm, EvalResult, evaluate
from .train import MANIFEST, TrainConfig, train

Progress = Callable[[int, int, str], None]


@dataclass
class PipelineConfig:
    """Budgets of the whole comparison. ``steps`` per stage kind; everything else is shared."""

    dataset: str
    out_dir: str
    random_dataset: str | None = None
    shots: tuple[int, int] = (1, 4)
    batch_size: int = 8
    steps: dict[str, int] = field(default_factory=lambda: {"pretrain": 400, "sft": 300, "ipo": 150})
    lr: dict[str, float] = field(default_factory=lambda: {"pretrain": 3e-3, "sft": 1e-3, "ipo": 5e-5})
    beta: float = 0.1
    tiny: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 96,
            "num_layers": 3,
            "num_heads": 4,
            "intermediate_size": 256,
            "vocab_size": 512,
        }
    )
    eval_episodes: int = 100
    eval_shots: int = 4
    shot_sweep: tuple[int, ...] = (0, 1, 2, 4)
    max_new_tokens: int = 120
    seed: int = 0


def _stage(
    pc: PipelineConfig,
    name: str,
    stage: str,
    *,
    init: str | None,
    context: str = "fewshot",
    cot: bool = False,
    dataset: str | None = None,
) -> TrainConfig:
    kind = "pretrain" if stage == "pretrain" else "sft" if stage == "sft" else "ipo"
    return TrainConfig(
        dataset=dataset or pc.dataset,
        out_dir=str(Path(pc.out_dir) / name),
        init=init,
        stage=stage,  # type: ignore[arg-type]
        context=context,
        cot=cot,
        shots=(0, pc.shots[1]) if stage == "pretrain" else pc.shots,  # type: ignore[arg-type]
        steps=pc.steps[kind],
        lr=pc.lr[kind],
        batch_size=pc.batch_size,
        beta=pc.beta,
        tiny=pc.tiny,
        eval_every=max(1, pc.steps[kind] // 4),
        save_every=max(1, pc.steps[kind] // 4),
        eval_episodes=16,
        warmup_steps=min(20, pc.steps[kind] // 5),
        seed=pc.seed,
    )


def stages(pc: PipelineConfig) -> list[tuple[str, TrainConfig]]:
    out = Path(pc.out_dir)

    def p(name: str) -> str:
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
    if pc.random_dataset:
        plan += [
            ("random-sft", _stage(pc, "random-sft", "sft", init=p("base"), dataset=pc.random_dataset)),
            (
                "fspo-random",
                _stage(pc, "fspo-random", "ipo", init=p("random-sft"), dataset=pc.random_dataset),
            ),
        ]
    return plan


def arms(pc: PipelineConfig) -> list[Arm]:
    out = Path(pc.out_dir)
    a = [
        Arm("base (no context)", str(out / "base"), "none"),
        Arm("few-shot prompting", str(out / "base"), "fewshot"),
        Arm("IPO (no user context)", str(out / "ipo-aggregate"), "none"),
        Arm("few-shot Pref-FT", str(out / "pref-ft"), "fewshot"),
        Arm("FSPO", str(out / "fspo"), "fewshot"),
        Arm("FSPO + CoT", str(out / "fspo-cot"), "fewshot", cot=True),
        Arm("oracle persona", str(out / "oracle"), "description"),
    ]
    if pc.random_dataset:
        a.append(Arm("FSPO on random data (ablation)", str(out / "fspo-random"), "fewshot"))
    return a


def _done(cfg: TrainConfig) -> bool:
    m = Path(cfg.out_dir) / MANIFEST
    return m.is_file() and json.loads(m.read_text()).get("config") == json.loads(json.dumps(cfg.to_dict()))


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
    return evaluate(
        pc.dataset,
        arms(pc),
        baseline="base (no context)",
        out_dir=Path(pc.out_dir) / "eval",
        episodes=pc.eval_episodes,
        shots=pc.eval_shots,
        shot_sweep=pc.shot_sweep,
        sweep_arm="FSPO",
        max_new_tokens=pc.max_new_tokens,
        seed=pc.seed,
        progress=progress,
    )


def config_from_json(path: str | Path, **overrides: Any) -> PipelineConfig:
    data = {**json.loads(Path(path).read_text()), **overrides}
    return PipelineConfig(**data)
