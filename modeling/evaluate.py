"""Evaluation on held-out synthetic users (``fspo eval``): the paper's comparison table.

Each *arm* is a checkpoint plus what its prompt holds about the user (few-shot pairs, nothing, or the
true persona description) and whether it writes a user description first (CoT). Every arm answers the
same held-out episodes (held-out users, held-out question topics); a judge compares each arm's answer
with the baseline arm's answer for that user; the table reports win rates with 95% intervals.

Outputs in the run folder: ``report.md``, ``results.json``, ``generations.jsonl`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .data import Episode, EpisodeSource
from .judges import Comparison, Judge, OracleJudge
from .winrate import WinRate, win_rate

if TYPE_CHECKING:
    from .infer import Generation

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
    from .infer import LocalBackend, generate_for_episodes

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
    table = [_table_row(arm, baseline, judge, eps, texts, cuts[arm.name], seed) for arm in arms]
    sweep: list[dict[str, Any]] = []
    if shot_sweep:
        sweep_of = next(a for a in arms if a.name == sweep_arm)
        sweep = _shot_sweep(sweep_of, pool, shot_sweep, texts[baseline], judge, decode, report, len(arms))
    h2h = [
        {"arm": a, "vs": b, **_judged(judge, eps, texts[a], texts[b], seed).to_dict()}
        for a, b in head_to_head
    ]
    report(report.total, "done")
    result = EvalResult(out_dir=out, table=table, shot_sweep=sweep, head_to_head=h2h)
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
) -> dict[str, Any]:
    """The arm's row of the table: its win rate against the baseline (the baseline's own row is 50% by
    definition), its shot cuts and, with the oracle judge, the oracle's mean score of its answers."""
    row: dict[str, Any] = {"arm": arm.name, "model": arm.model, "context": arm.context, "cot": arm.cot}
    if arm.name == baseline:
        row.update(win_rate=0.5, ci_low=0.5, ci_high=0.5, n=len(eps), p_value=None, baseline=True)
    else:
        row.update(_judged(judge, eps, texts[arm.name], texts[baseline], seed).to_dict())
    row.update(cuts)
    if isinstance(judge, OracleJudge):
        row["mean_oracle_score"] = float(
            np.mean(
                [
                    judge.text_score(int(e.user_id), e.meta.get("topic", ""), t)  # type: ignore[arg-type]
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
    from .infer import LocalBackend

    backend = LocalBackend(arm.model)
    sweep = []
    for j, n in enumerate(counts):
        report(done + j, f"shot sweep: {arm.name} N={n}")
        eps_n = [dataclasses.replace(e, shots=e.shots[:n]) for e in pool]
        gens = generate_arm(arm, eps_n, **decode, backend=backend)
        w = _judged(judge, eps_n, [g.text for g in gens], baseline_texts, decode["seed"])
        sweep.append({"shots": n, **w.to_dict(), **_cut_counts(gens)})
    return sweep


def _write_run(
    out: Path, eps: Sequence[Episode], texts: dict[str, list[str]], result: EvalResult, meta: dict[str, Any]
) -> None:
    """generations.jsonl, results.json, report.md and the plots."""
    with open(out / "generations.jsonl", "w") as f:
        for k, e in enumerate(eps):
            f.write(
                json.dumps({"user_id": e.user_id, "question": e.question, **{a: texts[a][k] for a in texts}})
                + "\n"
            )
    results = {
        **meta,
        "table": result.table,
        "shot_sweep": result.shot_sweep,
        "head_to_head": result.head_to_head,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result, meta))
    _plots(result, meta["baseline"], out)


def report_markdown(result: EvalResult, meta: dict[str, Any]) -> str:
    t = meta.get("temperature", 0.0)
    decoding = f"sampled at temperature {t}" if t else "greedy"
    lines = [
        "# FSPO evaluation on held-out synthetic users",
        "",
        f"Dataset `{meta['dataset']}`; {meta['episodes']} episodes ({meta['split']}); {meta['shots']} shots; "
        f"decoding: {decoding}; judge: {meta['judge']}; win rate against `{meta['baseline']}`, ties counted as halves, 95% bootstrap interval; "
        "p: one-sided binomial test of win rate > 50%.",
        "",
        "| arm | context | CoT | win rate vs base | 95% CI | p | mean oracle score |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in result.table:
        p = "—" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        score = f"{r['mean_oracle_score']:.3f}" if "mean_oracle_score" in r else "—"
        lines.append(
            f"| {r['arm']} | {r['context']} | {'yes' if r['cot'] else ''} | {100 * r['win_rate']:.1f}% | "
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} | {p} | {score} |"
        )
    cut = [r for r in result.table if r.get("prompts_cut")]
    if cut:
        lines += [
            "",
            "Prompts too long for the model's context dropped their earliest shots: "
            + "; ".join(f"`{r['arm']}` {r['prompts_cut']} prompts ({r['shots_cut']} shots)" for r in cut)
            + ".",
        ]
    if result.shot_sweep:
        lines += ["", "## Shot-count sensitivity", "", "| shots | win rate | 95% CI |", "|---:|---:|---|"]
        lines += [
            f"| {r['shots']} | {100 * r['win_rate']:.1f}% | {100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} |"
            for r in result.shot_sweep
        ]
    if result.head_to_head:
        lines += [
            "",
            "## Head to head",
            "",
            "Each pair's answers to the same episodes, judged against each other.",
            "",
            "| arm | vs | win rate | 95% CI | p | ties |",
            "|---|---|---:|---|---:|---:|",
        ]
        lines += [
            f"| {r['arm']} | {r['vs']} | {100 * r['win_rate']:.1f}% | "
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f} | {r['p_value']:.3g} | {int(r['ties'])} |"
            for r in result.head_to_head
        ]
    lines += ["", "![win rates](win_rates.png)"] + (
        ["", "![shot sweep](shot_sweep.png)"] if result.shot_sweep else []
    )
    return "\n".join(lines) + "\n"


def _plots(result: EvalResult, baseline: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.table if r["arm"] != baseline]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(rows))))
    y = np.arange(len(rows))
    wr = np.array([r["win_rate"] for r in rows]) * 100
    err = (
        np.array([[r["win_rate"] - r["ci_low"], r["ci_high"] - r["win_rate"]] for r in rows]).T * 100
        if rows
        else None
    )
    ax.barh(y, wr, xerr=err, color="#4C72B0", capsize=3)
    ax.axvline(50, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [r["arm"] for r in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate vs {baseline} (%)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=120)
    plt.close(fig)
    if result.shot_sweep:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        n = [r["shots"] for r in result.shot_sweep]
        w = np.array([r["win_rate"] for r in result.shot_sweep]) * 100
        lo = np.array([r["ci_low"] for r in result.shot_sweep]) * 100
        hi = np.array([r["ci_high"] for r in result.shot_sweep]) * 100
        ax.plot(n, w, marker="o")
        ax.fill_between(n, lo, hi, alpha=0.2)
        ax.axhline(50, color="grey", ls="--", lw=1)
        ax.set_xlabel("few-shot pairs in the prompt (N)")
        ax.set_ylabel(f"win rate vs {baseline} (%)")
        ax.set_ylim(0, 100)
        fig.tight_layout()
        fig.savefig(out / "shot_sweep.png", dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Does the model read the user's shots at all?


@dataclass
class ShotSensitivity:
    """How a model's preference between a held-out pair moves with what its prompt holds about the user.

    ``accuracy_*``: share of held-out pairs where log p(chosen) > log p(rejected) (summed log-probs) given
    the user's own shots, another held-out user's shots, and no shots. ``margin_gain``: mean over pairs
    of (chosen - rejected margin with own shots) - (the same with another user's shots), with a 95%
    bootstrap interval; about 0 means the model ignores whose shots it is shown."""

    episodes: int
    shots: int
    accuracy_own: float
    accuracy_other: float
    accuracy_none: float
    margin_gain: float
    margin_gain_ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shot_sensitivity(
    model_dir: str | Path, dataset: str | Path, *, episodes: int = 96, shots: int = 4, seed: int = 0
) -> ShotSensitivity:
    """Score held-out pairs under own / another user's / no shots (see :class:`ShotSensitivity`)."""
    import torch

    from .losses import packed_pair_logps
    from .train import TrainConfig, load_model, tokenize_episode

    if episodes < 2:
        raise ValueError("shot sensitivity needs at least 2 episodes (one user's shots go to another)")
    model, tok = load_model(model_dir)
    model.eval()
    src = EpisodeSource(dataset, split="test")
    eps = src.sample(episodes, shots=shots, seed=seed)
    # Each episode borrows the shots of the next one, so the target pair is the same in all three.
    borrowed = [dataclasses.replace(e, shots=o.shots) for e, o in zip(eps, eps[1:] + eps[:1], strict=True)]
    bare = [dataclasses.replace(e, shots=()) for e in eps]
    cfg = TrainConfig(dataset=str(dataset), out_dir="unused", init=str(model_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def margins(batch: list[Episode]) -> np.ndarray:
        out: list[float] = []
        for i in range(0, len(batch), 8):
            ex = [tokenize_episode(tok, e, cfg) for e in batch[i : i + 8]]
            with torch.no_grad():
                c, r, _ = packed_pair_logps(
                    model,
                    [x.prompt for x in ex],
                    [x.chosen for x in ex],
                    [x.rejected for x in ex],
                    pad_id=pad,
                )
            out += (c - r).double().cpu().tolist()
        return np.asarray(out)

    own, other, none = margins(eps), margins(borrowed), margins(bare)
    gain = own - other
    rng = np.random.default_rng(seed)
    boots = gain[rng.integers(0, len(gain), size=(2000, len(gain)))].mean(axis=1)
    return ShotSensitivity(
        episodes=len(eps),
        shots=shots,
        accuracy_own=float((own > 0).mean()),
        accuracy_other=float((other > 0).mean()),
        accuracy_none=float((none > 0).mean()),
        margin_gain=float(gain.mean()),
        margin_gain_ci=(float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))),
    )


@dataclass
class StyleFollowing:
    """Does a model continue the style of its context? (The in-context skill FSPO builds on.)

    Every response in the prompt (both of each shot's) answers its question in one style drawn at
    random; ``match_rate`` is the share of the model's answers whose style the oracle reads as that one
    (all traits), ``detected`` the share with every trait readable, ``chance`` what answering in a style
    of its own choosing would match by luck (1 / the number of styles)."""

    episodes: int
    shots: int
    match_rate: float
    detected: float
    chance: float
    # contrast=True: the preferred responses are in one style, the dispreferred in another; the share of
    # answers in the dispreferred style (a model that reads only "the style of the context" copies both).
    contrast: bool = False
    dispreferred_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def style_following(
    model_dir: str | Path,
    dataset: str | Path,
    *,
    episodes: int = 40,
    shots: int = 4,
    max_new_tokens: int = 120,
    temperature: float = 0.7,
    seed: int = 0,
    contrast: bool = False,
) -> StyleFollowing:
    """Prompt held-out episodes whose shots all share one style (see :class:`StyleFollowing`) and read
    the style of the model's answers with the domain's oracle. With ``contrast`` only the preferred
    responses share the wanted style and every dispreferred one is in a second style: does the model
    follow the responses the format marks as preferred rather than any response in its context?"""
    from .synth import DatasetError, load_dataset, load_domain

    ds = load_dataset(dataset)
    src = EpisodeSource(ds, split="test")
    if src.styled_answers is None:
        raise DatasetError(f"{ds.path}: responses carry no trait values, so styles cannot be told apart")
    domain = load_domain(ds.manifest.get("domain_source", ds.domain))
    prompts, wanted, avoided = style_prompts(
        src, episodes=episodes, shots=shots, seed=seed, contrast=contrast
    )
    if not prompts:
        raise DatasetError(f"{ds.path}: no held-out episode has every shot question answered in one style")
    gens = generate_arm(
        Arm("probe", str(model_dir)),
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    texts = [g.text for g in gens]
    got = styles_read(domain, texts)
    return StyleFollowing(
        episodes=len(prompts),
        shots=shots,
        match_rate=float(np.mean([g == w for g, w in zip(got, wanted, strict=True)])),
        detected=float(np.mean([None not in g for g in got])),
        chance=1 / len(_styles(src)),
        contrast=contrast,
        dispreferred_rate=float(np.mean([g == a for g, a in zip(got, avoided, strict=True)]))
        if contrast
        else None,
    )


def style_prompts(
    src: EpisodeSource, *, episodes: int, shots: int, seed: int, contrast: bool = False
) -> tuple[list[Episode], list[tuple[str, ...]], list[tuple[str, ...] | None]]:
    """Up to ``episodes`` held-out episodes whose shot responses (both of each pair) all answer their
    questions in one style drawn at random, that style (trait value names) for each, and None.

    ``contrast``: only the preferred responses are in that style; the dispreferred ones are all in a
    second style drawn at random, returned in place of None."""
    import random

    from .data import Pair

    assert src.styled_answers is not None
    styles = _styles(src)
    rng = random.Random(seed)
    prompts: list[Episode] = []
    wanted: list[tuple[str, ...]] = []
    avoided: list[tuple[str, ...] | None] = []

    def answers_in(style: tuple[str, ...], ep: Episode) -> list[list[str]]:
        return [
            [t for t, s in src.styled_answers[src.question_ids[p.question]] if s == style]  # type: ignore[index]
            for p in ep.shots
        ]

    for ep in src.sample(episodes * 3, shots=shots, seed=seed):
        style = rng.choice(styles)
        second = rng.choice([s for s in styles if s != style]) if contrast else style
        in_style = answers_in(style, ep)
        in_second = answers_in(second, ep) if contrast else in_style
        if len(prompts) == episodes or not all(in_style) or not all(in_second):
            continue  # a shot question never answered in one of the styles
        pairs = tuple(
            Pair(p.question, rng.choice(a), rng.choice(b))
            for p, a, b in zip(ep.shots, in_style, in_second, strict=True)
        )
        prompts.append(dataclasses.replace(ep, shots=pairs))
        wanted.append(style)
        avoided.append(second if contrast else None)
    return prompts, wanted, avoided


def _styles(src: EpisodeSource) -> list[tuple[str, ...]]:
    """Every style (trait value names) some answer of the dataset is written in, sorted."""
    assert src.styled_answers is not None
    return sorted({s for answers in src.styled_answers.values() for _, s in answers})


def styles_read(domain: Any, texts: Sequence[str]) -> list[tuple[str | None, ...]]:
    """The style the domain's oracle reads in each text: a value name per trait, None where unreadable."""
    from .synth import world

    names = [tuple(v.name for v in t.values) for t in domain.traits]
    return [
        tuple(None if v is None else names[i][v] for i, v in enumerate(world.detect_traits(domain, t)))
        for t in texts
    ]
