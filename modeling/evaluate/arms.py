"""The evaluation proper: every arm answers the same held-out episodes and is judged against the
baseline arm's answers (``evaluate``); ``Arm`` and ``generate_arm`` run one arm. The run folder's files
are written by ``modeling.evaluate.report``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..data import Episode, EpisodeSource
from ..judges import Comparison, Judge, OracleJudge
from ..winrate import WinRate, win_rate
from .report import _write_run

if TYPE_CHECKING:
    from ..infer import Generation

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Arm:
    """name: shown in the table; model: a checkpoint directory; context: what the prompt holds about the
    user; cot: the model writes a user description before the response."""

    name: str
    model: str
    context: Literal["fewshot", "none", "description"] = "fewshot"
    cot: bool = False

    @classmethod
    def parse(cls, spec: str) -> Arm:
        """``name=path[:context][:cot]``, e.g. ``fspo=runs/ipo``, ``base=runs/base:none``, ``oracle=runs/o:description``."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"arm {spec!r}: expected name=path[:context][:cot]")
        parts = rest.split(":")
        path, opts = parts[0], parts[1:]
        context = next((o for o in opts if o in ("fewshot", "none", "description")), "fewshot")
        unknown = [o for o in opts if o not in ("fewshot", "none", "description", "cot")]
        if unknown:
            raise ValueError(
                f"arm {spec!r}: unknown option {unknown[0]!r} (use fewshot, none, description, cot)"
            )
        return cls(name=name, model=path, context=context, cot="cot" in opts)  # type: ignore[arg-type]


@dataclass
class EvalResult:
    out_dir: Path
    table: list[dict[str, Any]]
    shot_sweep: list[dict[str, Any]] = field(default_factory=list)
    # Pairs of arms judged against each other directly (their answers to the same episodes).
    head_to_head: list[dict[str, Any]] = field(default_factory=list)
    # Each arm's win rate against the baseline on the users of each preference structure (datasets made
    # with a structure mix only): the table's own comparisons, grouped.
    by_structure: list[dict[str, Any]] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.table if r["arm"] == name)


def _episodes_for(arm: Arm, episodes: Sequence[Episode]) -> list[Episode]:
    if arm.context == "fewshot":
        return list(episodes)
    return [dataclasses.replace(e, shots=()) for e in episodes]


def generate_arm(
    arm: Arm,
    episodes: Sequence[Episode],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    backend: Any = None,
) -> list[Generation]:
    """One response of one arm to each episode's target question (greedy at temperature 0, else
    sampled with a seed per question, so every arm and rerun draws the same way). ``max_new_tokens``
    is the response's budget (``generate_for_episodes`` adds a CoT arm's description budget). Each
    ``Generation`` also says how many earliest shots its prompt lost to fit the model's context."""
    from ..infer import LocalBackend, generate_for_episodes

    backend = backend or LocalBackend(arm.model)
    return generate_for_episodes(
        backend,
        _episodes_for(arm, episodes),
        cot=arm.cot,
        oracle_description=arm.context == "description",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed if temperature > 0 else None,
    )


def _cut_counts(gens: Sequence[Generation]) -> dict[str, int]:
    """How many prompts dropped shots to fit the context, and how many shots in all."""
    return {"prompts_cut": sum(1 for g in gens if g.shots_cut), "shots_cut": sum(g.shots_cut for g in gens)}


def _compare(
    judge: Judge, episodes: Sequence[Episode], mine: Sequence[str], theirs: Sequence[str]
) -> list[float]:
    return judge.score(
        [
            Comparison(
                e.question,
                a,
                b,
                user_id=e.user_id if e.user_id is not None else "",
                topic=e.meta.get("topic", ""),
                description=e.description,
            )
            for e, a, b in zip(episodes, mine, theirs, strict=True)
        ]
    )


def evaluate(
    dataset: str | Path,
    arms: Sequence[Arm],
    *,
    baseline: str,
    out_dir: str | Path,
    episodes: int = 100,
    shots: int = 4,
    judge: Judge | None = None,
    shot_sweep: Sequence[int] = (),
    sweep_arm: str | None = None,
    head_to_head: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 160,
    temperature: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> EvalResult:
    """Run every arm on the same held-out episodes and judge each against ``baseline``.

    ``temperature`` 0 decodes greedily; above 0 each arm samples (seeded), as the paper's arms do.
    ``head_to_head`` pairs ``(arm, other)`` are also judged directly against each other on the same
    answers (no extra generation): two arms can each beat the baseline by overlapping margins and
    still differ significantly when compared on the same episodes, or not."""
    _check_arms(
        arms, baseline=baseline, shot_sweep=shot_sweep, sweep_arm=sweep_arm, head_to_head=head_to_head
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = EpisodeSource(dataset, split="test")
    judge = judge or OracleJudge(dataset)
    max_shots = max([shots, *shot_sweep])
    pool = src.sample(episodes, shots=max_shots, seed=seed)  # the same users and targets for every arm and N
    eps = [dataclasses.replace(e, shots=e.shots[:shots]) for e in pool]
    report = _Progress(progress, total=len(arms) + len(shot_sweep))
    decode = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    texts, cuts = _generate_arms(arms, eps, decode, report)
    scores = {
        a.name: _compare(judge, eps, texts[a.name], texts[baseline]) for a in arms if a.name != baseline
    }
    table = [_table_row(arm, baseline, judge, eps, texts, cuts[arm.name], seed, scores) for arm in arms]
    by_structure = _by_structure(scores, *_structures(dataset, eps), seed=seed)
    sweep: list[dict[str, Any]] = []
    if shot_sweep:
        sweep_of = next(a for a in arms if a.name == sweep_arm)
        sweep = _shot_sweep(sweep_of, pool, shot_sweep, texts[baseline], judge, decode, report, len(arms))
    h2h = [
        {"arm": a, "vs": b, **_judged(judge, eps, texts[a], texts[b], seed).to_dict()}
        for a, b in head_to_head
    ]
    report(report.total, "done")
    result = EvalResult(
        out_dir=out, table=table, shot_sweep=sweep, head_to_head=h2h, by_structure=by_structure
    )
    meta = {
        "dataset": str(dataset),
        "episodes": len(eps),
        "shots": shots,
        "temperature": temperature,
        "judge": judge.name,
        "baseline": baseline,
        "split": "held-out users x held-out question topics",
        "seed": seed,
    }
    _write_run(out, eps, texts, result, meta)
    return result


def _structures(dataset: Any, eps: Sequence[Episode]) -> tuple[list[str] | None, list[str]]:
    """The preference structure of each episode's user, or None where the dataset has no structure
    mix; and the dataset's held-out structures (no training user has them)."""
    from ..synth import load_dataset

    ds = load_dataset(dataset) if not hasattr(dataset, "manifest") else dataset
    users = ds.table("users").to_pandas()
    if "structure" not in users.columns:
        return None, []
    of = dict(zip(users.user_id.astype(int), users.structure, strict=True))
    held = list(ds.manifest.get("config", {}).get("held_out_structures") or [])
    return [of[int(e.user_id)] for e in eps], held  # type: ignore[arg-type]


def _by_structure(
    scores: dict[str, list[float]], structures: list[str] | None, held_out: list[str], *, seed: int
) -> list[dict[str, Any]]:
    """Per arm and structure (in ``STRUCTURES`` order), the win rate of that structure's comparisons."""
    if structures is None:
        return []
    from ..synth.world import STRUCTURES

    rows = []
    for arm, arm_scores in scores.items():
        for name in (s for s in STRUCTURES if s in structures):
            mine = [x for x, s in zip(arm_scores, structures, strict=True) if s == name]
            wr = win_rate(mine, over="comparisons", seed=seed)
            rows.append({"arm": arm, "structure": name, "held_out": name in held_out, **wr.to_dict()})
    return rows


def _check_arms(
    arms: Sequence[Arm],
    *,
    baseline: str,
    shot_sweep: Sequence[int],
    sweep_arm: str | None,
    head_to_head: Sequence[tuple[str, str]],
) -> None:
    """ValueError unless the baseline, the sweep arm and every head-to-head pair name arms, uniquely."""
    names = [a.name for a in arms]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    if shot_sweep and (sweep_arm not in names):
        raise ValueError(f"shot_sweep needs sweep_arm, one of {names}")
    for pair in head_to_head:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in names for n in pair):
            raise ValueError(f"a head-to-head pair is two different arms of {names}, not {list(pair)}")


@dataclass(frozen=True)
class _Progress:
    """The run's steps (one per arm, one per swept N) reported to an optional callback."""

    callback: Progress | None
    total: int

    def __call__(self, done: int, stage: str) -> None:
        if self.callback:
            self.callback(done, self.total, stage)


def _generate_arms(
    arms: Sequence[Arm], eps: Sequence[Episode], decode: dict[str, Any], report: _Progress
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Each arm's answer to every episode, and how many of its prompts lost shots to fit."""
    texts: dict[str, list[str]] = {}
    cuts: dict[str, dict[str, int]] = {}
    for i, arm in enumerate(arms):
        report(i, f"generating: {arm.name}")
        gens = generate_arm(arm, eps, **decode)
        texts[arm.name] = [g.text for g in gens]
        cuts[arm.name] = _cut_counts(gens)
    return texts, cuts


def _judged(
    judge: Judge, eps: Sequence[Episode], mine: Sequence[str], theirs: Sequence[str], seed: int
) -> WinRate:
    """`mine` against `theirs` on the same episodes: one comparison each, a win rate over comparisons."""
    return win_rate(_compare(judge, eps, mine, theirs), over="comparisons", seed=seed)


def _table_row(
    arm: Arm,
    baseline: str,
    judge: Judge,
    eps: Sequence[Episode],
    texts: dict[str, list[str]],
    cuts: dict[str, int],
    seed: int,
    scores: dict[str, list[float]],
) -> dict[str, Any]:
    """The arm's row of the table: its win rate against the baseline (from ``scores``, its judged
    comparisons; the baseline's own row is 50% by definition), its shot cuts and, with the oracle
    judge, the oracle's mean score of its answers."""
    row: dict[str, Any] = {"arm": arm.name, "model": arm.model, "context": arm.context, "cot": arm.cot}
    if arm.name == baseline:
        row.update(win_rate=0.5, ci_low=0.5, ci_high=0.5, n=len(eps), p_value=None, baseline=True)
    else:
        row.update(win_rate(scores[arm.name], over="comparisons", seed=seed).to_dict())
    row.update(cuts)
    if isinstance(judge, OracleJudge):
        row["mean_oracle_score"] = float(
            np.mean(
                [
                    judge.text_score(int(e.user_id), e.meta.get("topic", ""), t, e.question)  # type: ignore[arg-type]
                    for e, t in zip(eps, texts[arm.name], strict=True)
                ]
            )
        )
    return row


def _shot_sweep(
    arm: Arm,
    pool: Sequence[Episode],
    counts: Sequence[int],
    baseline_texts: Sequence[str],
    judge: Judge,
    decode: dict[str, Any],
    report: _Progress,
    done: int,
) -> list[dict[str, Any]]:
    """The arm's win rate against the baseline's answers with each N of its shots (one backend)."""
    from ..infer import LocalBackend

    backend = LocalBackend(arm.model)
    sweep = []
    for j, n in enumerate(counts):
        report(done + j, f"shot sweep: {arm.name} N={n}")
        eps_n = [dataclasses.replace(e, shots=e.shots[:n]) for e in pool]
        gens = generate_arm(arm, eps_n, **decode, backend=backend)
        w = _judged(judge, eps_n, [g.text for g in gens], baseline_texts, decode["seed"])
        sweep.append({"shots": n, **w.to_dict(), **_cut_counts(gens)})
    return sweep
