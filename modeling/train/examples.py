"""Episodes to token ids: what each step of a run trains on, drawn deterministically from (seed, step).

A step's batch: ``_examples`` draws its episodes (``_step_draw``: deterministic in seed and step, so a
resumed run sees exactly the batches it would have seen), turns them into the base model's documents for
the pretrain stage (``pretrain_episode``), and tokenizes each (``tokenize_episode``: the prompt cut to
fit by dropping its earliest shots).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import (
    Episode,
    EpisodeSource,
    Pair,
    build_cot_prompt,
    build_prompt,
    cot_target,
    shot_response_spans,
)
from .config import TrainConfig


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
        if cfg.preference:
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
    from ..llm import document_bos_id, fspo_prompt_ids

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


def held_out_examples(src: EpisodeSource, tok: Any, cfg: TrainConfig, limit: int) -> list[Example]:
    """The held-out users' examples every evaluation of a run scores (fixed by seed 10,007); for the
    pretrain stage, the base's documents made from them."""
    episodes = src.sample(cfg.eval_episodes, shots=cfg.shots, seed=10_007)
    if cfg.stage == "pretrain":
        rng = random.Random(10_007)
        episodes = [
            pretrain_episode(e, rng, src, cfg.pretrain_consistent, cfg.pretrain_quoted) for e in episodes
        ]
    return [tokenize_episode(tok, e, cfg, limit=limit) for e in episodes]


def pretrain_episode(
    ep: Episode, rng: random.Random, src: EpisodeSource, consistent: float = 0.0, quoted: float = 0.0
) -> Episode:
    """The base model's data: the same format, but each shot's pair in random order and as the target a
    random answer to the target question, so the base learns to answer on topic in the domain's language
    without ever seeing a preference signal.

    With probability ``consistent`` the document is one author's instead (``consistent_document``), and
    with probability ``quoted`` such a document quotes another writer beside each of the author's shots."""

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
