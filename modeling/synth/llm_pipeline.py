"""The data engine with an LLM instead of templates (``fspo synth --llm SPEC``).

Same steps and same output format as the procedural engine, each step a prompt from ``prompts.yaml``:
persona writing from randomized attributes and preferences, question writing, persona-steered response
writing, pairwise labeling given the persona (both orders; constrained to "A"/"B" where the server
supports vLLM's ``guided_choice``), and persona refinement when a pair cannot be decided consistently.

Every finished LLM call is appended to a journal in ``<out>.work/`` before the next batch is sent, so
an interrupted run, started again with the same options, resumes without redoing (or losing) any call.
The journal is removed once the dataset is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..llm import ChatBackend, ChatRequest, LLMError, backend_from_spec
from . import world
from .domain import Domain, load_domain
from .generate import (
    OVERSAMPLE,
    DatasetInfo,
    Progress,
    SynthConfig,
    _Quality,
    users_table,
    write_preferences,
    write_questions,
    write_responses,
)
from .storage import DatasetError, DatasetWriter, load_dataset, users_schema

PROMPTS_PATH = Path(__file__).with_name("prompts.yaml")
BATCH = 64  # calls sent together; the journal is flushed after each batch


@lru_cache(maxsize=1)
def prompts() -> dict[str, Any]:
    return yaml.safe_load(PROMPTS_PATH.read_text())


def _messages(step: str, **fields: str) -> list[dict[str, str]]:
    p = prompts()[step]
    return [
        {"role": "system", "content": p["system"]},
        {"role": "user", "content": p["user"].format(**fields)},
    ]


class Journal:
    """Append-only JSON lines of finished calls: {"k": key, "v": reply}. A torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the run died while writing this line; the call is simply redone
                self.done[item["k"]] = item["v"]
        self.reused = 0
        self.made = 0

    def add(self, items: Sequence[tuple[str, str]]) -> None:
        with open(self.path, "a") as f:
            for k, v in items:
                f.write(json.dumps({"k": k, "v": v}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(items)


@dataclass
class _Caller:
    backend: ChatBackend
    journal: Journal
    progress: Progress | None

    def run(self, stage: str, calls: Sequence[tuple[str, ChatRequest]]) -> dict[str, str]:
        todo = [(k, r) for k, r in calls if k not in self.journal.done]
        self.journal.reused += len(calls) - len(todo)
        done = len(calls) - len(todo)
        if self.progress:
            self.progress(done, len(calls), stage)
        for i in range(0, len(todo), BATCH):
            batch = todo[i : i + BATCH]
            replies = self.backend.chat([r for _, r in batch])
            self.journal.add([(k, v) for (k, _), v in zip(batch, replies, strict=True)])
            self.journal.made += len(batch)
            done += len(batch)
            if self.progress:
                self.progress(done, len(calls), stage)
        return {k: self.journal.done[k] for k, _ in calls}


_CHOICE = re.compile(r"\b(?:response\s+)?([AB])\b", re.IGNORECASE)


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' from a judge's reply ('A', 'Response B.', 'b'), or None if it names neither or both."""
    found = {m.upper() for m in _CHOICE.findall(reply.strip()[:40])}
    return found.pop() if len(found) == 1 else None


def _seed(*parts: object) -> int:
    """A per-call sampling seed derived from the run's seed and the call's identity (stable across runs)."""
    return int.from_bytes(
        hashlib.sha256(
            repr(tuple(int(p) if isinstance(p, np.integer) else p for p in parts)).encode()
        ).digest()[:4],
        "big",
    )


def _first_line(text: str, limit: int = 400) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def generate_with_llm(
    *,
    llm: str | ChatBackend,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Progress | None = None,
    judge_temperature: float = 0.0,
    **options: Any,
) -> DatasetInfo:
    """Generate a dataset with an LLM back end (a spec string for ``backend_from_spec`` or a backend)."""
    cfg = SynthConfig(**options)
    dom = load_domain(cfg.domain)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists (pass --overwrite to replace it)")
    backend = backend_from_spec(llm) if isinstance(llm, str) else llm
    work = out_dir.with_name(out_dir.name + ".work")
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "domain": dom.sha256,
                "prompts": prompts()["version"],
                "backend": backend.name,
                "judge_temperature": judge_temperature,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    fp_path = work / "fingerprint"
    if fp_path.exists() and fp_path.read_text() != fingerprint and overwrite:
        shutil.rmtree(work)  # --overwrite: an interrupted run with other options is discarded too
    work.mkdir(parents=True, exist_ok=True)
    if fp_path.exists() and fp_path.read_text() != fingerprint:
        raise DatasetError(
            f"{work} holds an interrupted run with other options; rerun with those options to resume, "
            f"or delete {work}"
        )
    fp_path.write_text(fingerprint)
    caller = _Caller(backend, Journal(work / "calls.jsonl"), progress)
    writer = DatasetWriter(out_dir, overwrite=overwrite)
    try:
        manifest = _run(cfg, dom, writer, caller, judge_temperature)
        manifest["backend"] = f"llm:{backend.name}"
        path = writer.close(manifest)
    except BaseException:
        writer.abort()  # the journal in <out>.work stays, so a rerun resumes
        raise
    shutil.rmtree(work, ignore_errors=True)
    return DatasetInfo(path=path, manifest=load_dataset(path).manifest)


def _style(dom: Domain, values: Sequence[int]) -> str:
    # The trait values' descriptions, as the reader would say them; the writer is steered by them.
    return "Write for a reader who says: " + " ".join(
        f'"{trait.values[v].describe[0]}"' for trait, v in zip(dom.traits, values, strict=True)
    )


def _run(
    cfg: SynthConfig, dom: Domain, writer: DatasetWriter, call: _Caller, judge_temperature: float
) -> dict[str, Any]:
    seed = cfg.seed
    rng = np.random.default_rng([seed, 1])
    qs = world.build_questions(dom, rng, cfg.questions, cfg.test_topic_frac)
    title = dom.spec.title

    # 1. Questions, written from each topic (the template question is shown as an example).
    qreplies = call.run(
        "questions",
        [
            (
                f"q{q}",
                ChatRequest(
                    _messages("question", domain_title=title, topic=qs.topic[q]),
                    max_tokens=64,
                    temperature=1.0,
                    seed=_seed(seed, "question", q),
                ),
            )
            for q in range(len(qs.text))
        ],
    )
    written = [_first_line(qreplies[f"q{q}"], 300) for q in range(len(qs.text))]
    qs.text = [
        w if len(w) >= 3 else qs.text[q] for q, w in enumerate(written)
    ]  # an empty reply keeps the template
    write_questions(writer, qs)

    # 2. Responses, steered by sampled trait values (persona steering).
    K = cfg.responses_per_question
    sizes = dom.trait_sizes
    picks = rng.integers(0, int(np.prod(sizes)), size=(len(qs.text), K))
    values = np.stack(np.unravel_index(picks.ravel(), sizes), axis=1).astype(np.int16)
    rreplies = call.run(
        "responses",
        [
            (
                f"r{i}",
                ChatRequest(
                    _messages("response", question=qs.text[i // K], style=_style(dom, values[i])),
                    max_tokens=256,
                    temperature=1.0,
                    seed=_seed(seed, "response", i),
                ),
            )
            for i in range(len(values))
        ],
    )
    rtexts = [rreplies[f"r{i}"].strip() for i in range(len(values))]
    write_responses(
        writer,
        dom,
        rtexts,
        np.repeat(np.arange(len(qs.text)), K),
        values,
        [f"llm:{call.backend.name}"] * len(rtexts),
    )

    # 3. Personas from randomized attributes and preferences (domain randomization).
    urng = np.random.default_rng([seed, 2, 0])
    n = cfg.users
    users = world.sample_users(dom, urng, n, 0)
    is_test = urng.random(n) < cfg.test_user_frac

    def persona_call(u: int) -> ChatRequest:
        attrs = "\n".join(
            f"- {a}: {dom.spec.attributes[a].values[users.attrs[u, j]]}"
            for j, a in enumerate(dom.attribute_names)
        )
        prefs = "\n".join(
            f"- {t.values[users.pref[u, ti]].describe[0]}"
            for ti, t in enumerate(dom.traits)
            if users.stated[u, ti]
        )
        return ChatRequest(
            _messages(
                "persona", attributes=attrs, domain_title=title, preferences=prefs or "- (none stated)"
            ),
            max_tokens=160,
            temperature=1.0,
            seed=_seed(seed, "persona", u),
        )

    preplies = call.run("personas", [(f"p{u}", persona_call(u)) for u in range(n)])
    desc_initial = [preplies[f"p{u}"].strip() for u in range(n)]
    desc = list(desc_initial)

    # 4. Candidate pairs: distinct questions per user, two responses with different steering.
    C = cfg.pairs_per_user * OVERSAMPLE
    Q = len(qs.text)
    cq = np.stack([urng.permutation(Q)[:C] if C <= Q else urng.integers(0, Q, C) for _ in range(n)])
    i = urng.integers(0, K, size=(n, C))
    j = (i + urng.integers(1, K, size=(n, C))) % K
    ra, rb = cq * K + i, cq * K + j

    def judge_calls(u: int, c: int, tag: str, order: str, temperature: float) -> tuple[str, ChatRequest]:
        a, b = (ra[u, c], rb[u, c]) if order == "ab" else (rb[u, c], ra[u, c])
        msgs = _messages(
            "judge", persona=desc[u], question=qs.text[cq[u, c]], response_a=rtexts[a], response_b=rtexts[b]
        )
        return f"L{u}_{c}_{tag}_{order}", ChatRequest(
            msgs,
            max_tokens=2,
            temperature=temperature,
            choices=("A", "B"),
            seed=_seed(seed, "label", u, c, tag, order),
        )

    quality = _Quality(rounds=cfg.max_rounds, combos_possible=int(np.prod(sizes)))
    a_wins = np.zeros((n, C), dtype=bool)
    consistent = np.zeros((n, C), dtype=bool)
    label_round = np.zeros((n, C), dtype=np.int8)
    unparsed = 0
    pending = np.ones(n, dtype=bool)
    for rnd in range(cfg.max_rounds + 1):
        us = np.flatnonzero(pending)
        calls = [
            judge_calls(u, c, f"r{rnd}", o, judge_temperature)
            for u in us
            for c in range(C)
            for o in ("ab", "ba")
        ]
        replies = call.run(f"labels (round {rnd})", calls)
        for u in us:
            for c in range(C):
                first = parse_choice(replies[f"L{u}_{c}_r{rnd}_ab"])
                second = parse_choice(replies[f"L{u}_{c}_r{rnd}_ba"])
                unparsed += (first is None) + (second is None)
                a_wins[u, c] = first == "A"
                consistent[u, c] = (
                    first is not None and second is not None and (first == "A") == (second == "B")
                )
                label_round[u, c] = rnd
        quality.consistent_by_round[rnd] = int(consistent.sum())
        if rnd == cfg.max_rounds or cfg.mode == "random":
            break
        # Iterative persona improvement: a user with an undecided pair gets one more specific sentence.
        refine = [u for u in us if not consistent[u].all()]
        if not refine:
            break
        rcalls = []
        for u in refine:
            c = int(np.flatnonzero(~consistent[u])[0])
            msgs = _messages(
                "refine",
                persona=desc[u],
                question=qs.text[cq[u, c]],
                response_a=rtexts[ra[u, c]],
                response_b=rtexts[rb[u, c]],
            )
            rcalls.append(
                (
                    f"F{u}_{rnd}",
                    ChatRequest(msgs, max_tokens=80, temperature=0.7, seed=_seed(seed, "refine", u, rnd)),
                )
            )
        freplies = call.run(f"refine (round {rnd + 1})", rcalls)
        pending[:] = False
        for u in refine:
            sentence = _first_line(freplies[f"F{u}_{rnd}"], 300)
            if sentence:
                desc[u] = f"{desc[u]} {sentence}".strip()
                users.rounds[u] += 1
                pending[u] = True
        if not pending.any():
            break
    for r in range(rnd + 1, cfg.max_rounds + 1):
        quality.consistent_by_round[r] = quality.consistent_by_round[rnd]
    if cfg.mode == "random":  # the ablation: labels not tied to the persona
        a_wins = urng.random((n, C)) < 0.5
        consistent[:] = True
    quality.candidates = n * C

    keep = consistent & (np.cumsum(consistent, axis=1) <= cfg.pairs_per_user)
    rows, cols = np.nonzero(keep)
    # Asked once more, sampled: does the judge say the same?
    again_calls = [judge_calls(u, c, "repeat", "ab", 1.0) for u, c in zip(rows, cols, strict=True)]
    again = call.run("repeat asks", again_calls)
    repeat_agree = np.asarray(
        [
            parse_choice(again[k]) == ("A" if a_wins[u, c] else "B")
            for (k, _), u, c in zip(again_calls, rows, cols, strict=True)
        ],
        dtype=bool,
    )
    quality.repeat_asked, quality.repeat_agree = len(rows), int(repeat_agree.sum())
    quality.users_short = int((keep.sum(axis=1) < cfg.pairs_per_user).sum())
    quality.pairs_missing = int((cfg.pairs_per_user - keep.sum(axis=1)).sum())
    quality.rounds_hist = np.bincount(users.rounds, minlength=cfg.max_rounds + 1).tolist()
    quality.stated_initial = quality.stated_final = int(users.stated_initial.sum())
    quality.user_traits = n * len(sizes)
    for combo in map(tuple, users.pref.tolist()):
        quality.combo_counts[combo] = quality.combo_counts.get(combo, 0) + 1

    # Transitivity: three responses of one question per user (up to 50 users), each pair asked both ways.
    if cfg.mode == "structured" and K >= 3:
        tri_users = list(range(min(n, 50)))
        tcalls = []
        for u in tri_users:
            trio = [int(cq[u, 0]) * K + k for k in range(3)]
            for x, y in ((0, 1), (1, 2), (2, 0)):
                for order, (a, b) in (("ab", (trio[x], trio[y])), ("ba", (trio[y], trio[x]))):
                    msgs = _messages(
                        "judge",
                        persona=desc[u],
                        question=qs.text[cq[u, 0]],
                        response_a=rtexts[a],
                        response_b=rtexts[b],
                    )
                    tcalls.append(
                        (
                            f"T{u}_{x}{y}_{order}",
                            ChatRequest(
                                msgs,
                                max_tokens=2,
                                temperature=judge_temperature,
                                choices=("A", "B"),
                                seed=_seed(seed, "triple", u, x, y, order),
                            ),
                        )
                    )
        treplies = call.run("transitivity", tcalls)
        for u in tri_users:
            wins, ok = [], True
            for x, y in ((0, 1), (1, 2), (2, 0)):
                f, s2 = parse_choice(treplies[f"T{u}_{x}{y}_ab"]), parse_choice(treplies[f"T{u}_{x}{y}_ba"])
                ok &= f is not None and s2 is not None and (f == "A") == (s2 == "B")
                wins.append(f == "A")
            if ok:
                quality.triples += 1
                quality.triples_cyclic += int(all(wins) or not any(wins))

    aw = a_wins[rows, cols]
    writer.write(
        "users",
        users_table(
            dom,
            users,
            is_test,
            users_schema(dom.attribute_names, [t.name for t in dom.traits]),
            descriptions=(desc, desc_initial),
        ),
    )
    write_preferences(
        writer,
        first_pair_id=0,
        user_id=users.user_id[rows],
        question_id=cq[rows, cols],
        chosen=np.where(aw, ra[rows, cols], rb[rows, cols]),
        rejected=np.where(aw, rb[rows, cols], ra[rows, cols]),
        user_test=is_test[rows],
        question_split=qs.split[cq[rows, cols]],
        margin=np.full(len(rows), np.nan),
        repeat_agree=repeat_agree,
        label_round=label_round[rows, cols],
    )
    summary = quality.summary(cfg.mode)
    summary["stated_trait_fraction_final"] = (
        None  # an LLM persona's refinements are free text, not trait flags
    )
    summary["judge_replies_unparsed"] = unparsed
    if not len(rows):
        raise LLMError(
            f"the LLM judge decided no pair consistently ({unparsed} unparseable replies); "
            "check the model and prompts — no dataset was written"
        )
    return {
        "domain": dom.name,
        "domain_source": dom.source,
        "domain_sha256": dom.sha256,
        "mode": cfg.mode,
        "config": {**cfg.to_dict(), "judge_temperature": judge_temperature},
        "prompts_version": prompts()["version"],
        "llm_calls": {"made": call.journal.made, "reused_from_journal": call.journal.reused},
        "traits": {t.name: [v.name for v in t.values] for t in dom.traits},
        "attributes": {a: list(dom.spec.attributes[a].values) for a in dom.attribute_names},
        "quality": summary,
    }
