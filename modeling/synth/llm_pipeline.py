"""The data engine with an LLM instead of templates (``fspo synth --llm SPEC``).

Same steps and same output format as the procedural engine, each step a prompt from ``prompts.yaml``:
persona writing from randomized attributes and preferences, question writing, persona-steered response
writing, pairwise labeling given the persona, and persona refinement when a pair cannot be decided.

Labeling reads the probabilities of the two answers "A" and "B" where the back end gives them
(``ask_choices``: exact on a local model, ``logprobs`` over HTTP; otherwise a sampled letter counts as
probability 1). Each pair is asked in both orders and P(first response is better) is averaged over the
two, so a judge's position bias cancels; the pair is decided when that average clears ``judge_margin``
on either side of 1/2, and is otherwise dropped as inconsistent. Each stage samples at its own
temperature (``LLMStages``, saved in the manifest).

Every finished LLM call is appended to a journal in ``<out>.work/`` before the next batch is sent, keyed
by the call and a digest of its request, so an interrupted or refused run, started again, resumes
without redoing (or losing) any call that is still the same. Every stage's kept and dropped counts go
into the manifest (``stages``) and ``<out>.work/report.json``; a run in which the judge decides no pair
publishes nothing but keeps both. The journal is removed once the dataset is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..llm import ChatBackend, ChatRequest, LLMError, ask_choices, backend_from_spec
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


@dataclass(frozen=True)
class LLMStages:
    """How each LLM stage samples (saved in the manifest's ``config.llm``).

    The defaults suit a small instruct model such as SmolLM2-135M-Instruct: some temperature where
    variety matters (questions, responses, personas), little for the one-sentence persona refinement
    (at 1.0 a small model writes gibberish), and nucleus sampling to cut the long tail.
    question/response/persona/refine_temperature: each writing stage's temperature (0 = greedy).
    judge_temperature: how the judge's letter is picked (0 = the likelier one); the decision itself
        reads the two letters' probabilities where the back end gives them.
    top_p: nucleus of every sampled writing stage.
    judge_margin: a pair is decided when P(first is better), averaged over both orders, is more than
        this far from 1/2; otherwise it is dropped as inconsistent.
    """

    question_temperature: float = 0.7
    response_temperature: float = 0.7
    persona_temperature: float = 0.7
    refine_temperature: float = 0.3
    judge_temperature: float = 0.0
    top_p: float = 0.9
    judge_margin: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
        for name in ("question", "response", "persona", "refine", "judge"):
            t = getattr(self, f"{name}_temperature")
            if not 0 <= t <= 2:
                raise ValueError(f"{name}_temperature must be from 0 to 2, got {t!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.judge_margin < 0.5:
            raise ValueError(f"judge_margin must be from 0 to below 0.5, got {self.judge_margin!r}")


STAGE_FIELDS = tuple(f.name for f in fields(LLMStages))


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
        self.done: dict[str, Any] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the run died while writing this line; the call is simply redone
                self.done[item["k"]] = item["v"]
        self.reused = 0
        self.made = 0

    def add(self, items: Sequence[tuple[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for k, v in items:
                f.write(json.dumps({"k": k, "v": v}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(items)


def _call_key(name: str, request: ChatRequest) -> str:
    """The journal key of a call: its name and a digest of the request, so a reply is reused only for
    the very same request (a rerun with other temperatures, a refined persona, ... asks again)."""
    digest = hashlib.sha256(json.dumps(asdict(request), sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}#{digest}"


@dataclass
class _Caller:
    backend: ChatBackend
    journal: Journal
    progress: Progress | None

    def run(self, stage: str, calls: Sequence[tuple[str, ChatRequest]]) -> dict[str, str]:
        """Chat replies by call name."""
        return self._run(stage, calls, lambda batch: self.backend.chat(batch))

    def choices(self, stage: str, calls: Sequence[tuple[str, ChatRequest]]) -> dict[str, dict[str, Any]]:
        """Replies to calls with choices, by call name: {"text": reply, "probs": {choice: p} or None}."""
        return self._run(
            stage,
            calls,
            lambda batch: [{"text": r.text, "probs": r.probs} for r in ask_choices(self.backend, batch)],
        )

    def _run(self, stage: str, calls: Sequence[tuple[str, ChatRequest]], ask: Any) -> dict[str, Any]:
        keyed = [(name, _call_key(name, r), r) for name, r in calls]
        todo = [(k, r) for _, k, r in keyed if k not in self.journal.done]
        self.journal.reused += len(calls) - len(todo)
        done = len(calls) - len(todo)
        if self.progress:
            self.progress(done, len(calls), stage)
        for i in range(0, len(todo), BATCH):
            batch = todo[i : i + BATCH]
            replies = ask([r for _, r in batch])
            self.journal.add([(k, v) for (k, _), v in zip(batch, replies, strict=True)])
            self.journal.made += len(batch)
            done += len(batch)
            if self.progress:
                self.progress(done, len(calls), stage)
        return {name: self.journal.done[k] for name, k, _ in keyed}


_CHOICE = re.compile(r"\b(?:response\s+)?([AB])\b", re.IGNORECASE)


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' from a judge's reply ('A', 'Response B.', 'b'), or None if it names neither or both."""
    found = {m.upper() for m in _CHOICE.findall(reply.strip()[:40])}
    return found.pop() if len(found) == 1 else None


def p_first(reply: dict[str, Any], first: str) -> float | None:
    """P(the response shown first is better) from one judge reply: the probability of the letter
    ``first`` names where the back end gave probabilities, else 1 or 0 by the reply's letter (None:
    the reply names neither letter)."""
    if reply.get("probs"):
        return float(reply["probs"][first])
    letter = parse_choice(reply["text"])
    return None if letter is None else float(letter == first)


def judge_pair(ab: dict[str, Any], ba: dict[str, Any], margin: float) -> tuple[str, float | None]:
    """Decide one pair from the judge's replies in both orders (ab: A is the pair's first response; ba:
    shown swapped). Returns (outcome, P(first response is better) averaged over the two orders), the
    outcome being "first", "second", "unreadable", "position" (both orders prefer the same shown
    position, by no more than ``margin`` once averaged) or "close" (within ``margin`` of a tie)."""
    p_ab, p_ba = p_first(ab, "A"), p_first(ba, "B")
    if p_ab is None or p_ba is None:
        return "unreadable", None
    p = (p_ab + p_ba) / 2
    if p > 0.5 + margin:
        return "first", p
    if p < 0.5 - margin:
        return "second", p
    return ("position" if (p_ab > 0.5) == (p_ba < 0.5) else "close"), p


DROP_REASONS = {
    "position": "the same shown position preferred in both orders (position bias)",
    "close": "within the margin of a tie",
    "unreadable": "a reply that names neither A nor B",
}


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
    stages: LLMStages | None = None,
    llm_concurrency: int | None = None,
    **options: Any,
) -> DatasetInfo:
    """Generate a dataset with an LLM back end (a spec string for ``backend_from_spec`` or a backend).

    ``stages`` (or its fields given as keyword options, e.g. ``judge_margin=0.05``) sets how each stage
    samples; ``llm_concurrency`` how many requests a spec's HTTP back end keeps in flight. The rest of
    ``options`` are ``SynthConfig``'s. Raises LLMError, keeping the journal and the report in
    ``<out>.work/``, when the judge decides no pair."""
    given = {k: options.pop(k) for k in STAGE_FIELDS if k in options}
    if stages is not None and given:
        raise ValueError("pass either stages or its fields, not both")
    stages = stages or LLMStages(**given)
    if llm_concurrency is not None and (
        isinstance(llm_concurrency, bool) or not isinstance(llm_concurrency, int) or llm_concurrency < 1
    ):
        raise ValueError(f"llm_concurrency must be a positive integer, got {llm_concurrency!r}")
    cfg = SynthConfig(**options)
    dom = load_domain(cfg.domain)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DatasetError(f"{out_dir} already exists (pass --overwrite to replace it)")
    backend = backend_from_spec(llm, max_concurrency=llm_concurrency) if isinstance(llm, str) else llm
    work = _work_dir(out_dir, _fingerprint(cfg, dom, backend), overwrite=overwrite)
    caller = _Caller(backend, Journal(work / "calls.jsonl"), progress)
    writer = DatasetWriter(out_dir, overwrite=overwrite)
    try:
        manifest = _run(cfg, dom, writer, caller, stages, work)
        manifest["backend"] = f"llm:{backend.name}"
        manifest["llm_calls"]["concurrency"] = getattr(backend, "max_concurrency", None)
        path = writer.close(manifest)
    except BaseException:
        writer.abort()  # the journal in <out>.work stays, so a rerun resumes
        raise
    shutil.rmtree(work, ignore_errors=True)
    return DatasetInfo(path=path, manifest=load_dataset(path).manifest)


def _fingerprint(cfg: SynthConfig, dom: Domain, backend: ChatBackend) -> str:
    """What a journal's calls depend on besides their requests: the config, domain, prompts, back end.

    The stages' settings are not part of it: every journal entry is keyed by its request's digest, so a
    rerun with other temperatures or another margin reuses exactly the calls that are unchanged."""
    return hashlib.sha256(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "domain": dom.sha256,
                "prompts": prompts()["version"],
                "backend": backend.name,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()


def _work_dir(out_dir: Path, fingerprint: str, *, overwrite: bool) -> Path:
    """``<out>.work/``, holding the journal of a run with this ``fingerprint``: an interrupted run's is
    resumed, one with other options refused (discarded with ``overwrite``)."""
    work = out_dir.with_name(out_dir.name + ".work")
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
    return work


def stages_line(report: dict[str, Any]) -> str:
    """One line of what each stage kept and dropped, e.g. 'labels: kept 3 of 12 (dropped 9: 7 ...)'."""
    parts = []
    for stage, r in report.items():
        dropped = sum(r["dropped"].values())
        why = ", ".join(f"{n} {reason}" for reason, n in r["dropped"].items() if n)
        parts.append(
            f"{stage}: kept {r['kept']} of {r['asked']}" + (f" (dropped {dropped}: {why})" if why else "")
        )
    return "; ".join(parts)


def _style(dom: Domain, values: Sequence[int]) -> str:
    # The trait values' descriptions, as the reader would say them; the writer is steered by them.
    return "Write for a reader who says: " + " ".join(
        f'"{trait.values[v].describe[0]}"' for trait, v in zip(dom.traits, values, strict=True)
    )


def _run(
    cfg: SynthConfig, dom: Domain, writer: DatasetWriter, call: _Caller, st: LLMStages, work: Path
) -> dict[str, Any]:
    """The stages in order (each a batch of LLM calls): questions, responses, personas, labels with
    persona refinement, repeat asks, transitivity; then the users and preferences tables. Returns the
    manifest."""
    run = _Stages(cfg, dom, call, st, writer)
    rng = np.random.default_rng([cfg.seed, 1])
    qs = run.questions(rng)
    rtexts = run.responses(rng, qs)

    urng = np.random.default_rng([cfg.seed, 2, 0])
    n = cfg.users
    users = world.sample_users(dom, urng, n, 0)
    is_test = urng.random(n) < cfg.test_user_frac
    desc_initial = run.personas(users)
    judge = _Judge(run, qs.text, rtexts, list(desc_initial), *_candidate_pairs(urng, cfg, len(qs.text)))
    quality = _Quality(rounds=cfg.max_rounds, combos_possible=int(np.prod(dom.trait_sizes)))
    labels, replies = _label_rounds(judge, users, quality)
    C = judge.cq.shape[1]
    if cfg.mode == "random":  # the ablation: labels not tied to the persona
        labels.a_wins = urng.random((n, C)) < 0.5
        labels.consistent[:] = True
    quality.candidates = n * C

    keep = labels.consistent & (np.cumsum(labels.consistent, axis=1) <= cfg.pairs_per_user)
    rows, cols = np.nonzero(keep)
    undecided = run.report_labels(labels, keep, replies)
    (work / "report.json").write_text(json.dumps(run.report, indent=2) + "\n")
    if not len(rows):
        raise LLMError(
            f"the LLM judge decided no pair ({stages_line(run.report)}); nothing was published: the report "
            f"is in {work / 'report.json'} and the {len(call.journal.done)} finished calls stay in "
            f"{work / 'calls.jsonl'}, so a rerun (e.g. with a smaller judge margin) reuses them"
        )

    repeat_agree = judge.repeat_asks(labels.a_wins, rows, cols)
    _count_labels(quality, cfg, keep, users, repeat_agree)
    if cfg.mode == "structured" and cfg.responses_per_question >= 3:
        judge.transitivity(quality)
    aw = labels.a_wins[rows, cols]
    users_columns = users_schema(dom.attribute_names, [t.name for t in dom.traits])
    writer.write(
        "users", users_table(dom, users, is_test, users_columns, descriptions=(judge.desc, desc_initial))
    )
    write_preferences(
        writer,
        first_pair_id=0,
        user_id=users.user_id[rows],
        question_id=judge.cq[rows, cols],
        chosen=np.where(aw, judge.ra[rows, cols], judge.rb[rows, cols]),
        rejected=np.where(aw, judge.rb[rows, cols], judge.ra[rows, cols]),
        user_test=is_test[rows],
        question_split=qs.split[judge.cq[rows, cols]],
        margin=np.full(len(rows), np.nan),  # no oracle behind an LLM judge
        repeat_agree=repeat_agree,
        label_round=labels.label_round[rows, cols],
    )
    return run.manifest(quality, undecided["unreadable"])


@dataclass
class _Stages:
    """One LLM synthesis run: its settings, its caller, the dataset it writes and the per-stage report
    it fills."""

    cfg: SynthConfig
    dom: Domain
    call: _Caller
    st: LLMStages
    writer: DatasetWriter
    report: dict[str, dict[str, Any]] = field(default_factory=dict)

    def writing(
        self, step: str, max_tokens: int, temperature: float, call_seed: int, **fields: str
    ) -> ChatRequest:
        """A writing stage's request: nucleus sampling at ``temperature``, greedy at 0."""
        return ChatRequest(
            _messages(step, **fields),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=self.st.top_p if temperature > 0 else 1.0,
            seed=call_seed,
        )

    def questions(self, rng: np.random.Generator) -> world.Questions:
        """1. Questions, written from each topic (the template question is shown as an example), and
        written to the dataset."""
        qs = world.build_questions(self.dom, rng, self.cfg.questions, self.cfg.test_topic_frac)
        title, seed = self.dom.spec.title, self.cfg.seed
        calls = [
            (
                f"q{q}",
                self.writing(
                    "question",
                    64,
                    self.st.question_temperature,
                    _seed(seed, "question", q),
                    domain_title=title,
                    topic=qs.topic[q],
                ),
            )
            for q in range(len(qs.text))
        ]
        qreplies = self.call.run("questions", calls)
        written = [_first_line(qreplies[f"q{q}"], 300) for q in range(len(qs.text))]
        short = sum(len(w) < 3 for w in written)
        # an empty reply keeps the template
        qs.text = [w if len(w) >= 3 else qs.text[q] for q, w in enumerate(written)]
        self.report["questions"] = {
            "asked": len(written),
            "kept": len(written) - short,
            "dropped": {"empty replies (the template question is used instead)": short},
        }
        write_questions(self.writer, qs)
        return qs

    def responses(self, rng: np.random.Generator, qs: world.Questions) -> list[str]:
        """2. Responses, steered by sampled trait values (persona steering), written to the dataset;
        their texts."""
        K, sizes = self.cfg.responses_per_question, self.dom.trait_sizes
        picks = rng.integers(0, int(np.prod(sizes)), size=(len(qs.text), K))
        values = np.stack(np.unravel_index(picks.ravel(), sizes), axis=1).astype(np.int16)
        calls = [
            (
                f"r{i}",
                self.writing(
                    "response",
                    256,
                    self.st.response_temperature,
                    _seed(self.cfg.seed, "response", i),
                    question=qs.text[i // K],
                    style=_style(self.dom, values[i]),
                ),
            )
            for i in range(len(values))
        ]
        rreplies = self.call.run("responses", calls)
        rtexts = [rreplies[f"r{i}"].strip() for i in range(len(values))]
        self.report["responses"] = {"asked": len(rtexts), "kept": len(rtexts), "dropped": {}}
        if not all(rtexts):
            self.report["responses"]["notes"] = (
                f"{sum(not t for t in rtexts)} empty replies (kept, judged as they are)"
            )
        question_of = np.repeat(np.arange(len(qs.text)), K)
        sources = [f"llm:{self.call.backend.name}"] * len(rtexts)
        write_responses(self.writer, self.dom, rtexts, question_of, values, sources)
        return rtexts

    def personas(self, users: world.Users) -> list[str]:
        """3. Personas from randomized attributes and preferences (domain randomization)."""
        n = len(users.user_id)
        preplies = self.call.run("personas", [(f"p{u}", self._persona_call(users, u)) for u in range(n)])
        desc_initial = [preplies[f"p{u}"].strip() for u in range(n)]
        self.report["personas"] = {"asked": n, "kept": n, "dropped": {}}
        if not all(desc_initial):
            self.report["personas"]["notes"] = f"{sum(not d for d in desc_initial)} empty replies (kept)"
        return desc_initial

    def _persona_call(self, users: world.Users, u: int) -> ChatRequest:
        dom = self.dom
        attrs = "\n".join(
            f"- {a}: {dom.spec.attributes[a].values[users.attrs[u, j]]}"
            for j, a in enumerate(dom.attribute_names)
        )
        prefs = "\n".join(
            f"- {t.values[users.pref[u, ti]].describe[0]}"
            for ti, t in enumerate(dom.traits)
            if users.stated[u, ti]
        )
        return self.writing(
            "persona",
            160,
            self.st.persona_temperature,
            _seed(self.cfg.seed, "persona", u),
            attributes=attrs,
            domain_title=dom.spec.title,
            preferences=prefs or "- (none stated)",
        )

    def report_labels(
        self, labels: _Labels, keep: np.ndarray, replies: dict[str, dict[str, Any]]
    ) -> dict[str, int]:
        """Report the labels' (and the refinement's) kept and dropped counts; the undecided pairs by
        reason."""
        consistent = labels.consistent
        undecided = {reason: int((~consistent & (labels.outcome == reason)).sum()) for reason in DROP_REASONS}
        self.report["labels"] = {
            "asked": consistent.size,
            "kept": int(keep.sum()),
            "dropped": {DROP_REASONS[r]: k for r, k in undecided.items()}
            | {"decided beyond pairs_per_user": int((consistent & ~keep).sum())},
            "judge_margin": self.st.judge_margin,
            "judge_read": "probabilities" if _any_probs(replies) else "sampled letters",
        }
        if labels.refine_asked:
            self.report["refinement"] = {
                "asked": labels.refine_asked,
                "kept": labels.refine_kept,
                "dropped": {"empty replies": labels.refine_asked - labels.refine_kept},
            }
        return undecided

    def manifest(self, quality: _Quality, unparsed: int) -> dict[str, Any]:
        """The dataset's manifest (less what ``generate_with_llm`` and the writer add)."""
        cfg, dom = self.cfg, self.dom
        summary = quality.summary(cfg.mode)
        summary["stated_trait_fraction_final"] = (
            None  # an LLM persona's refinements are free text, not trait flags
        )
        summary["judge_replies_unparsed"] = unparsed
        return {
            "domain": dom.name,
            "domain_source": dom.source,
            "domain_sha256": dom.sha256,
            "mode": cfg.mode,
            "config": {**cfg.to_dict(), "llm": asdict(self.st)},
            "prompts_version": prompts()["version"],
            "llm_calls": {"made": self.call.journal.made, "reused_from_journal": self.call.journal.reused},
            "traits": {t.name: [v.name for v in t.values] for t in dom.traits},
            "attributes": {a: list(dom.spec.attributes[a].values) for a in dom.attribute_names},
            "quality": summary,
            "stages": self.report,
        }


def _candidate_pairs(
    urng: np.random.Generator, cfg: SynthConfig, Q: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4. Candidate pairs: distinct questions per user, two responses with different steering.
    (question of each candidate, its two responses), each [users, candidates]."""
    n, K = cfg.users, cfg.responses_per_question
    C = cfg.pairs_per_user * OVERSAMPLE
    cq = np.stack([urng.permutation(Q)[:C] if C <= Q else urng.integers(0, Q, C) for _ in range(n)])
    i = urng.integers(0, K, size=(n, C))
    j = (i + urng.integers(1, K, size=(n, C))) % K
    return cq, cq * K + i, cq * K + j


@dataclass
class _Labels:
    """Each candidate pair's judgment [users, candidates], and the refinement's counts."""

    a_wins: np.ndarray
    consistent: np.ndarray
    outcome: np.ndarray
    p_avg: np.ndarray
    label_round: np.ndarray
    refine_asked: int = 0
    refine_kept: int = 0

    @classmethod
    def empty(cls, n: int, C: int) -> _Labels:
        return cls(
            np.zeros((n, C), dtype=bool),
            np.zeros((n, C), dtype=bool),
            np.full((n, C), "", dtype=object),
            np.full((n, C), np.nan),
            np.zeros((n, C), dtype=np.int8),
        )


@dataclass
class _Judge:
    """The judge's questions about users' candidate pairs, asked with each user's current persona
    (``desc``, refined in place)."""

    run: _Stages
    questions: list[str]
    rtexts: list[str]
    desc: list[str]
    cq: np.ndarray
    ra: np.ndarray
    rb: np.ndarray

    def request(self, u: int, q: int, a: int, b: int, temperature: float, call_seed: int) -> ChatRequest:
        msgs = _messages(
            "judge",
            persona=self.desc[u],
            question=self.questions[q],
            response_a=self.rtexts[a],
            response_b=self.rtexts[b],
        )
        return ChatRequest(msgs, max_tokens=2, temperature=temperature, choices=("A", "B"), seed=call_seed)

    def pair_call(self, u: int, c: int, tag: str, order: str, temperature: float) -> tuple[str, ChatRequest]:
        """Candidate ``c`` of user ``u`` shown in ``order`` ("ab": its first response as A)."""
        a, b = (self.ra[u, c], self.rb[u, c]) if order == "ab" else (self.rb[u, c], self.ra[u, c])
        call_seed = _seed(self.run.cfg.seed, "label", u, c, tag, order)
        return f"L{u}_{c}_{tag}_{order}", self.request(u, self.cq[u, c], a, b, temperature, call_seed)

    def label_round(self, us: np.ndarray, rnd: int, labels: _Labels) -> dict[str, dict[str, Any]]:
        """Judge every candidate of the users ``us`` in both orders; record each decision in ``labels``."""
        st, C = self.run.st, self.cq.shape[1]
        calls = [
            self.pair_call(u, c, f"r{rnd}", o, st.judge_temperature)
            for u in us
            for c in range(C)
            for o in ("ab", "ba")
        ]
        replies = self.run.call.choices(f"labels (round {rnd})", calls)
        for u in us:
            for c in range(C):
                decided, p = judge_pair(
                    replies[f"L{u}_{c}_r{rnd}_ab"], replies[f"L{u}_{c}_r{rnd}_ba"], st.judge_margin
                )
                labels.outcome[u, c], labels.p_avg[u, c] = decided, np.nan if p is None else p
                labels.a_wins[u, c] = decided == "first"
                labels.consistent[u, c] = decided in ("first", "second")
                labels.label_round[u, c] = rnd
        return replies

    def refine(self, refine: list[int], rnd: int, labels: _Labels, users: world.Users) -> list[int]:
        """Iterative persona improvement: each of the users ``refine`` gets one more specific sentence
        about their first undecided pair. The users whose persona grew (they are judged again)."""
        st, rcalls = self.run.st, []
        for u in refine:
            c = int(np.flatnonzero(~labels.consistent[u])[0])
            request = self.run.writing(
                "refine",
                80,
                st.refine_temperature,
                _seed(self.run.cfg.seed, "refine", u, rnd),
                persona=self.desc[u],
                question=self.questions[self.cq[u, c]],
                response_a=self.rtexts[self.ra[u, c]],
                response_b=self.rtexts[self.rb[u, c]],
            )
            rcalls.append((f"F{u}_{rnd}", request))
        freplies = self.run.call.run(f"refine (round {rnd + 1})", rcalls)
        labels.refine_asked += len(rcalls)
        grown = []
        for u in refine:
            sentence = _first_line(freplies[f"F{u}_{rnd}"], 300)
            if sentence:
                self.desc[u] = f"{self.desc[u]} {sentence}".strip()
                users.rounds[u] += 1
                grown.append(u)
                labels.refine_kept += 1
        return grown

    def repeat_asks(self, a_wins: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Each kept pair asked once more, sampled: does the judge say the same?"""
        again_calls = [self.pair_call(u, c, "repeat", "ab", 1.0) for u, c in zip(rows, cols, strict=True)]
        again = self.run.call.run("repeat asks", again_calls)
        return np.asarray(
            [
                parse_choice(again[k]) == ("A" if a_wins[u, c] else "B")
                for (k, _), u, c in zip(again_calls, rows, cols, strict=True)
            ],
            dtype=bool,
        )

    def transitivity(self, quality: _Quality) -> None:
        """Three responses of one question per user (up to 50 users), each pair asked both ways: how
        many decided triples are cyclic."""
        st, K = self.run.st, self.run.cfg.responses_per_question
        tri_users = list(range(min(len(self.desc), 50)))
        tcalls = []
        for u in tri_users:
            trio = [int(self.cq[u, 0]) * K + k for k in range(3)]
            for x, y in _TRIO_PAIRS:
                for order, (a, b) in (("ab", (trio[x], trio[y])), ("ba", (trio[y], trio[x]))):
                    call_seed = _seed(self.run.cfg.seed, "triple", u, x, y, order)
                    request = self.request(u, int(self.cq[u, 0]), a, b, st.judge_temperature, call_seed)
                    tcalls.append((f"T{u}_{x}{y}_{order}", request))
        treplies = self.run.call.choices("transitivity", tcalls)
        for u in tri_users:
            wins, ok = [], True
            for x, y in _TRIO_PAIRS:
                decided, _ = judge_pair(
                    treplies[f"T{u}_{x}{y}_ab"], treplies[f"T{u}_{x}{y}_ba"], st.judge_margin
                )
                ok &= decided in ("first", "second")
                wins.append(decided == "first")
            if ok:
                quality.triples += 1
                quality.triples_cyclic += int(all(wins) or not any(wins))


_TRIO_PAIRS = ((0, 1), (1, 2), (2, 0))


def _label_rounds(
    judge: _Judge, users: world.Users, quality: _Quality
) -> tuple[_Labels, dict[str, dict[str, Any]]]:
    """Judge every user's candidates; a user with an undecided pair gets a refined persona and is judged
    again, up to ``max_rounds`` times (never in ``random`` mode). The labels, and the last round's
    replies."""
    cfg = judge.run.cfg
    n, C = judge.cq.shape
    labels = _Labels.empty(n, C)
    pending = np.ones(n, dtype=bool)
    for rnd in range(cfg.max_rounds + 1):
        us = np.flatnonzero(pending)
        replies = judge.label_round(us, rnd, labels)
        quality.consistent_by_round[rnd] = int(labels.consistent.sum())
        if rnd == cfg.max_rounds or cfg.mode == "random":
            break
        refine = [int(u) for u in us if not labels.consistent[u].all()]
        if not refine:
            break
        pending[:] = False
        pending[judge.refine(refine, rnd, labels, users)] = True
        if not pending.any():
            break
    for r in range(rnd + 1, cfg.max_rounds + 1):
        quality.consistent_by_round[r] = quality.consistent_by_round[rnd]
    return labels, replies


def _count_labels(
    quality: _Quality, cfg: SynthConfig, keep: np.ndarray, users: world.Users, repeat_agree: np.ndarray
) -> None:
    """The quality counters of the kept labels and of the users behind them."""
    quality.repeat_asked, quality.repeat_agree = len(repeat_agree), int(repeat_agree.sum())
    quality.users_short = int((keep.sum(axis=1) < cfg.pairs_per_user).sum())
    quality.pairs_missing = int((cfg.pairs_per_user - keep.sum(axis=1)).sum())
    quality.rounds_hist = np.bincount(users.rounds, minlength=cfg.max_rounds + 1).tolist()
    quality.stated_initial = quality.stated_final = int(users.stated_initial.sum())
    quality.user_traits = len(users) * users.pref.shape[1]
    for combo in map(tuple, users.pref.tolist()):
        quality.combo_counts[combo] = quality.combo_counts.get(combo, 0) + 1


def _any_probs(replies: dict[str, dict[str, Any]]) -> bool:
    return any(r.get("probs") for r in replies.values())
