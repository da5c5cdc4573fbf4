"""Does the model read the user's shots at all? The diagnostics of ``fspo probe``: how a model's
preference between held-out pairs moves with whose shots it is shown (``shot_sensitivity``), and whether
it continues the style of its context (``style_following``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Episode, EpisodeSource
from .arms import Arm, generate_arm


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
    from ..train import TrainConfig, load_model

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

    def margins(batch: list[Episode]) -> np.ndarray:
        chosen, rejected = pair_logps(model, tok, batch, cfg)
        return chosen - rejected

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


def pair_logps(
    model: Any, tok: Any, episodes: Sequence[Episode], cfg: Any, *, rows_per_call: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of each episode's target ``chosen`` and ``rejected`` given its prompt (shots and
    question, tokenized as training does under ``cfg``, a TrainConfig), as two float64 arrays.

    Consecutive episodes whose prompts are the same tokens (one user's shots and question, several
    response pairs) are one group of ``modeling.losses.packed_group_logps``: the prompt is encoded once
    for all of them. ``rows_per_call`` groups go through the model per forward."""
    import torch

    from ..losses import packed_group_logps
    from ..train import tokenize_episode

    groups: list[list[tuple[list[int], list[int], list[int]]]] = []
    for ep in episodes:
        x = tokenize_episode(tok, ep, cfg)
        if groups and groups[-1][0][0] == x.prompt:
            groups[-1].append((x.prompt, x.chosen, x.rejected))
        else:
            groups.append([(x.prompt, x.chosen, x.rejected)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    chosen: list[float] = []
    rejected: list[float] = []
    for i in range(0, len(groups), rows_per_call):
        with torch.no_grad():
            c, r, _ = packed_group_logps(model, groups[i : i + rows_per_call], pad_id=pad)
        chosen += c.double().cpu().tolist()
        rejected += r.double().cpu().tolist()
    return np.asarray(chosen), np.asarray(rejected)


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
    from ..synth import DatasetError, load_dataset, load_domain

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

    from ..data import Pair

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
    from ..synth import world

    names = [tuple(v.name for v in t.values) for t in domain.traits]
    return [
        tuple(None if v is None else names[i][v] for i, v in enumerate(world.detect_traits(domain, t)))
        for t in texts
    ]
