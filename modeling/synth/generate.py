"""The procedural data engine: users → questions → responses → labeled pairs, streamed to Parquet.

The paper's pipeline, with the procedural world standing in for the LLMs:
1. domain randomization: users sampled from attribute and trait priors (``world.sample_users``);
2. persona-steered responses: a pool per question, each written with known trait values;
3. labeling by a judge that reads the persona, asked in both orders; order-inconsistent pairs dropped;
4. iterative persona improvement: a persona that cannot decide some of its pairs gets the missing
   trait stated, and its pairs are relabeled, for up to ``max_rounds`` rounds.

Users are processed in fixed-size blocks with vectorized numpy, so memory stays flat however many
pairs are asked for, and the output depends only on the config (not on timing or block boundaries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from . import world
from .domain import Domain, load_domain
from .storage import PREFERENCES_SCHEMA, QUESTIONS_SCHEMA, DatasetWriter, responses_schema, users_schema

Progress = Callable[[int, int, str], None]
BLOCK_USERS = 2048  # users per vectorized block; fixed so that results do not depend on it
OVERSAMPLE = 3  # candidate pairs per kept pair (some get dropped as inconsistent)


@dataclass
class SynthConfig:
    """Everything that determines a synthetic dataset (saved in its manifest).

    domain: a built-in domain name (reviews, elix, roleplay) or a path to a domain YAML file.
    users / pairs_per_user: the dataset holds users * pairs_per_user preference pairs.
    mode: "structured" (labels follow the persona, with refinement) or "random" (the paper's
        unstructured ablation: labels are coin flips, not tied to the persona, no refinement).
    questions: how many questions to draw from the domain's bank (None = all of it).
    responses_per_question: size of each question's response pool.
    test_user_frac / test_topic_frac: held-out users and held-out question topics.
    max_rounds: iterative persona improvement rounds (0 disables refinement).
    structures: a mix of preference structures (``world.STRUCTURES``) by weight, e.g.
        {"weighted": 2, "topical": 1, "bimodal": 1, "noisy": 1}; None (the default): every user is
        ``weighted``, and the dataset is what it was before structures existed.
    held_out_structures: structures whose users are all held-out (test) users, never trained on.
    """

    domain: str = "elix"
    users: int = 1000
    pairs_per_user: int = 20
    seed: int = 0
    mode: Literal["structured", "random"] = "structured"
    questions: int | None = None
    responses_per_question: int = 16
    test_user_frac: float = 0.1
    test_topic_frac: float = 0.1
    max_rounds: int = 3
    judge: world.JudgeConfig = field(default_factory=world.JudgeConfig)
    structures: dict[str, float] | None = None
    held_out_structures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.judge, dict):
            self.judge = world.JudgeConfig(**self.judge)
        problems = []
        if self.users < 1:
            problems.append("users must be >= 1")
        if self.pairs_per_user < 1:
            problems.append("pairs_per_user must be >= 1")
        if self.mode not in ("structured", "random"):
            problems.append(f"mode must be 'structured' or 'random', not {self.mode!r}")
        if self.responses_per_question < 2:
            problems.append("responses_per_question must be >= 2")
        if self.questions is not None and self.questions < 2:
            problems.append("questions must be >= 2")
        for name in ("test_user_frac", "test_topic_frac"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1)")
        if self.max_rounds < 0:
            problems.append("max_rounds must be >= 0")
        try:
            world.check_structures(self.structures, self.held_out_structures)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("invalid synth config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.structures is None and not self.held_out_structures:
            del (
                d["structures"],
                d["held_out_structures"],
            )  # manifests of datasets without a mix stay as they were
        return d


@dataclass
class DatasetInfo:
    path: Path
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            **{k: self.manifest[k] for k in ("domain", "mode", "counts", "quality")},
        }


@dataclass
class _Quality:
    """Counters summed over blocks; turned into rates in the manifest."""

    rounds: int
    combos_possible: int
    candidates: int = 0
    consistent_by_round: list[int] = field(default_factory=list)
    repeat_asked: int = 0
    repeat_agree: int = 0
    triples: int = 0
    triples_cyclic: int = 0
    rounds_hist: list[int] = field(default_factory=list)
    stated_initial: int = 0
    stated_final: int = 0
    user_traits: int = 0
    users_short: int = 0
    pairs_missing: int = 0
    combo_counts: dict[tuple[int, ...], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.consistent_by_round = [0] * (self.rounds + 1)
        self.rounds_hist = [0] * (self.rounds + 1)

    def summary(self, mode: str) -> dict[str, Any]:
        c = max(self.candidates, 1)
        counts = np.asarray(list(self.combo_counts.values()), dtype=np.float64)
        p = counts / counts.sum() if counts.size else counts
        entropy = float(-(p * np.log2(p)).sum()) if counts.size else 0.0
        return {
            "order_swap_agreement_by_round": [round(x / c, 4) for x in self.consistent_by_round],
            "order_swap_agreement_initial": round(self.consistent_by_round[0] / c, 4),
            "order_swap_agreement_final": round(self.consistent_by_round[-1] / c, 4),
            "repeat_agreement": round(self.repeat_agree / max(self.repeat_asked, 1), 4),
            "transitivity_violation_rate": round(self.triples_cyclic / self.triples, 4)
            if self.triples
            else None,
            "triples_checked": self.triples,
            "candidate_pairs": self.candidates,
            "refinement_rounds_histogram": self.rounds_hist,
            "stated_trait_fraction_initial": round(self.stated_initial / max(self.user_traits, 1), 4),
            "stated_trait_fraction_final": round(self.stated_final / max(self.user_traits, 1), 4),
            "users_short_of_pairs": self.users_short,
            "pairs_missing": self.pairs_missing,
            "preference_combo_entropy_bits": round(entropy, 4),
            "preference_combo_entropy_normalized": round(entropy / np.log2(self.combos_possible), 4)
            if self.combos_possible > 1
            else 0.0,
            "preference_combos_seen": len(self.combo_counts),
            "preference_combos_possible": self.combos_possible,
            "labels_follow_persona": mode == "structured",
        }


def generate_dataset(
    *,
    out_dir: str | Path,
    domain: str = "elix",
    users: int = 1000,
    pairs_per_user: int = 20,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> DatasetInfo:
    """Generate a procedural dataset into ``out_dir`` (see ``SynthConfig`` for the options)."""
    cfg = SynthConfig(domain=domain, users=users, pairs_per_user=pairs_per_user, seed=seed, **options)
    return generate(cfg, Path(out_dir), overwrite=overwrite, progress=progress)


def generate(
    cfg: SynthConfig, out_dir: Path, *, overwrite: bool = False, progress: Progress | None = None
) -> DatasetInfo:
    dom = load_domain(cfg.domain)
    writer = DatasetWriter(out_dir, overwrite=overwrite)
    try:
        manifest = _run(cfg, dom, writer, progress)
        path = writer.close(manifest)
    except BaseException:
        writer.abort()
        raise
    from .storage import load_dataset  # re-read: what we return is what a reader sees

    return DatasetInfo(path=path, manifest=load_dataset(path).manifest)


def _run(cfg: SynthConfig, dom: Domain, writer: DatasetWriter, progress: Progress | None) -> dict[str, Any]:
    trait_names = [t.name for t in dom.traits]
    rng = np.random.default_rng([cfg.seed, 1])
    qs = world.build_questions(dom, rng, cfg.questions, cfg.test_topic_frac)
    resp = world.build_responses(dom, qs, cfg.responses_per_question, cfg.seed)
    write_questions(writer, qs)
    write_responses(writer, dom, resp.text, resp.question_id, resp.values, ["procedural"] * len(resp.text))

    q = _Quality(
        rounds=cfg.max_rounds if cfg.mode == "structured" else 0,
        combos_possible=int(np.prod(dom.trait_sizes)),
    )
    total = cfg.users * cfg.pairs_per_user
    next_pair = 0
    u_schema = users_schema(dom.attribute_names, trait_names, structures=cfg.structures is not None)
    for block, start in enumerate(range(0, cfg.users, BLOCK_USERS)):
        n = min(BLOCK_USERS, cfg.users - start)
        brng = np.random.default_rng([cfg.seed, 2, block])
        users, pairs = _label_block(cfg, dom, qs, resp, users_rng=brng, n=n, start=start, quality=q)
        is_test = brng.random(n) < cfg.test_user_frac
        if cfg.held_out_structures:
            held = [world.STRUCTURES.index(s) for s in cfg.held_out_structures]
            is_test |= np.isin(users.structure, held)
        writer.write("users", users_table(dom, users, is_test, u_schema))
        rows = pairs["user_row"]
        next_pair += write_preferences(
            writer,
            first_pair_id=next_pair,
            user_id=users.user_id[rows],
            question_id=pairs["question_id"],
            chosen=pairs["chosen"],
            rejected=pairs["rejected"],
            user_test=is_test[rows],
            question_split=qs.split[pairs["question_id"]],
            margin=pairs["margin"],
            repeat_agree=pairs["repeat_agree"],
            label_round=pairs["round"],
        )
        if progress:
            progress(min(next_pair + q.pairs_missing, total), total, "pairs")
    return {
        "domain": dom.name,
        "domain_source": dom.source,
        "domain_sha256": dom.sha256,
        "backend": "procedural",
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "traits": {t.name: [v.name for v in t.values] for t in dom.traits},
        "attributes": {a: list(dom.spec.attributes[a].values) for a in dom.attribute_names},
        "quality": q.summary(cfg.mode),
    }


def _label_block(
    cfg: SynthConfig,
    dom: Domain,
    qs: world.Questions,
    resp: world.Responses,
    *,
    users_rng: np.random.Generator,
    n: int,
    start: int,
    quality: _Quality,
) -> tuple[world.Users, dict[str, np.ndarray]]:
    """Sample a block of users, draw candidate pairs, label them (with refinement), keep the first
    ``pairs_per_user`` consistent ones per user."""
    rng = users_rng
    users = world.sample_users(dom, rng, n, start, cfg.structures)
    cq, ra, rb = _candidate_pairs(cfg, resp, rng, n, len(qs.text))
    valid = ~(resp.values[ra] == resp.values[rb]).all(axis=-1)
    va, vb = resp.values[ra], resp.values[rb]  # [n, C, T]
    # A noisy user's own flips, one per candidate: the same answer in both orders of the judge.
    sign = (
        np.ones(cq.shape)
        if cfg.structures is None
        else np.where(rng.random(cq.shape) < users.flip[:, None], -1.0, 1.0)
    )

    def margins(stated: np.ndarray) -> np.ndarray:
        w = (users.weight * stated)[:, None, :]
        return sign * _margin(dom, users, w, qs.kind[cq], va, vb, mixed=cfg.structures is not None)

    a_wins, consistent, label_round = _label_candidates(cfg, users, va, vb, valid, margins, rng, quality)
    quality.candidates += int(valid.sum())

    # Keep the first pairs_per_user consistent candidates of each user.
    keep = consistent & (np.cumsum(consistent, axis=1) <= cfg.pairs_per_user)
    got = keep.sum(axis=1)
    quality.users_short += int((got < cfg.pairs_per_user).sum())
    quality.pairs_missing += int((cfg.pairs_per_user - got).sum())
    rows, cols = np.nonzero(keep)
    aw = a_wins[rows, cols]
    final = margins(users.stated)[rows, cols]
    # Asked a second time in the first order: does the judge say the same?
    if cfg.mode == "random":
        again = rng.random(len(rows)) < 0.5
    else:
        again = world.judge_picks_first(final, rng, cfg.judge)
    repeat_agree = again == aw
    quality.repeat_asked += len(rows)
    quality.repeat_agree += int(repeat_agree.sum())

    # Transitivity: three responses of one of the user's questions, all three pairs asked both ways.
    _check_transitivity(cfg, dom, users, resp, cq[:, 0], qs.kind[cq[:, 0]], rng, quality)
    _count_users(quality, users)
    return users, {
        "user_row": rows,
        "question_id": cq[rows, cols],
        "chosen": np.where(aw, ra[rows, cols], rb[rows, cols]),
        "rejected": np.where(aw, rb[rows, cols], ra[rows, cols]),
        # The oracle's margin, not the user's answer: a noisy user's flipped pair has a negative one.
        "margin": np.where(aw, final, -final) * sign[rows, cols],
        "repeat_agree": repeat_agree,
        "round": label_round[rows, cols],
    }


def _margin(
    dom: Domain,
    users: world.Users,
    w: np.ndarray,
    kind: np.ndarray,
    va: np.ndarray,
    vb: np.ndarray,
    *,
    mixed: bool,
) -> np.ndarray:
    """utility(a) - utility(b) for each user's pairs [n, C] on questions of ``kind`` [n, C]; without a
    structure mix, the plain one-peak utility (the same floats as before structures existed)."""
    if not mixed:
        p = users.pref[:, None, :]
        return world.utility(dom, p, w, va) - world.utility(dom, p, w, vb)
    first, second = world.peaks(
        users.structure[:, None], users.pref[:, None, :], users.second[:, None, :], kind
    )
    return world.utility(dom, first, w, va, second) - world.utility(dom, first, w, vb, second)


def _candidate_pairs(
    cfg: SynthConfig, resp: world.Responses, rng: np.random.Generator, n: int, Q: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's candidates [n, C]: a question, and two responses of it (their ids), with different
    trait values where a few redraws find them."""
    K = cfg.responses_per_question
    C = cfg.pairs_per_user * OVERSAMPLE
    # Candidate questions: distinct per user while the bank allows, in random order.
    if C <= Q:
        r = rng.random((n, Q))
        part = np.argpartition(r, C - 1, axis=1)[:, :C]
        order = np.argsort(np.take_along_axis(r, part, axis=1), axis=1)
        cq = np.take_along_axis(part, order, axis=1)
    else:
        cq = rng.integers(0, Q, size=(n, C))
    # Two distinct responses of that question, with different trait values where possible.
    i = rng.integers(0, K, size=(n, C))
    j = (i + rng.integers(1, K, size=(n, C))) % K
    ra, rb = resp.offsets[cq] + i, resp.offsets[cq] + j
    for _ in range(4):
        same = (resp.values[ra] == resp.values[rb]).all(axis=-1)
        if not same.any():
            break
        jj = (i + rng.integers(1, K, size=(n, C))) % K
        rb = np.where(same, resp.offsets[cq] + jj, rb)
    return cq, ra, rb


def _label_candidates(
    cfg: SynthConfig,
    users: world.Users,
    va: np.ndarray,
    vb: np.ndarray,
    valid: np.ndarray,
    margins: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    quality: _Quality,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label every candidate in both orders, then refine the personas with undecided ones and relabel,
    up to ``max_rounds`` times (``random`` mode: coin flips). (first response wins, consistent, round
    of the label), each [n, C]."""
    label_round = np.zeros(valid.shape, dtype=np.int8)
    if cfg.mode == "random":
        a_wins = rng.random(valid.shape) < 0.5
        agree = (rng.random(valid.shape) < 0.5) == a_wins  # what asking again in the other order gives
        quality.consistent_by_round[0] += int((agree & valid).sum())
        return a_wins, valid, label_round
    a_wins, consistent = world.label_both_orders(margins(users.stated), rng, cfg.judge)
    consistent &= valid
    quality.consistent_by_round[0] += int(consistent.sum())
    for rnd in range(1, cfg.max_rounds + 1):
        # Iterative persona improvement: for each user with inconsistent pairs, state the unstated
        # trait on which those pairs differ most often, then relabel that user's pairs.
        bad = valid & ~consistent
        differs = (va != vb) & bad[..., None] & ~users.stated[:, None, :]
        votes = differs.sum(axis=1)  # [n, T]
        fix = votes.max(axis=1) > 0
        if fix.any():
            trait = votes.argmax(axis=1)
            users.stated[np.flatnonzero(fix), trait[fix]] = True
            users.rounds[fix] += 1
            m = margins(users.stated)
            a2, c2 = world.label_both_orders(m[fix], rng, cfg.judge)
            a_wins[fix], consistent[fix] = a2, c2 & valid[fix]
            label_round[fix] = rnd
        quality.consistent_by_round[rnd] += int(consistent.sum())
    return a_wins, consistent, label_round


def _count_users(quality: _Quality, users: world.Users) -> None:
    """Add a block's users to the refinement, stated-trait and preference-combination counters."""
    quality.rounds_hist = [
        a + b
        for a, b in zip(
            quality.rounds_hist,
            np.bincount(users.rounds, minlength=len(quality.rounds_hist)).tolist(),
            strict=False,
        )
    ]
    quality.stated_initial += int(users.stated_initial.sum())
    quality.stated_final += int(users.stated.sum())
    quality.user_traits += users.pref.size
    combos, counts = np.unique(users.pref, axis=0, return_counts=True)
    for combo, c in zip(map(tuple, combos.tolist()), counts.tolist(), strict=True):
        quality.combo_counts[combo] = quality.combo_counts.get(combo, 0) + c


def _check_transitivity(
    cfg: SynthConfig,
    dom: Domain,
    users: world.Users,
    resp: world.Responses,
    question: np.ndarray,
    kind: np.ndarray,
    rng: np.random.Generator,
    quality: _Quality,
) -> None:
    K = cfg.responses_per_question
    if K < 3:
        return
    n = len(users)
    base = resp.offsets[question][:, None] + (rng.integers(0, K, size=(n, 1)) + np.arange(3)) % K  # [n, 3]
    vals = resp.values[base]  # [n, 3, T]
    distinct = ~(
        (vals[:, 0] == vals[:, 1]).all(-1)
        | (vals[:, 1] == vals[:, 2]).all(-1)
        | (vals[:, 0] == vals[:, 2]).all(-1)
    )
    w = (users.weight * users.stated)[:, None, :]
    if cfg.structures is None:
        u = world.utility(dom, users.pref[:, None, :], w, vals)  # [n, 3]
    else:
        first, second = world.peaks(users.structure, users.pref, users.second, kind)
        u = world.utility(dom, first[:, None, :], w, vals, second[:, None, :])
    wins = []
    ok = distinct.copy()
    for x, y in ((0, 1), (1, 2), (2, 0)):
        if cfg.mode == "random":
            a, c = rng.random(n) < 0.5, rng.random(n) < 0.5
            wins.append(a)
            ok &= a == c
        else:
            sign = 1.0 if cfg.structures is None else np.where(rng.random(n) < users.flip, -1.0, 1.0)
            a, c = world.label_both_orders(sign * (u[:, x] - u[:, y]), rng, cfg.judge)
            wins.append(a)
            ok &= c
    cyclic = (wins[0] & wins[1] & wins[2]) | (~wins[0] & ~wins[1] & ~wins[2])
    quality.triples += int(ok.sum())
    quality.triples_cyclic += int((cyclic & ok).sum())


def write_questions(writer: DatasetWriter, qs: world.Questions) -> None:
    writer.write(
        "questions",
        pa.table(
            {
                "question_id": pa.array(np.arange(len(qs.text), dtype=np.int32)),
                "split": pa.array(qs.split.tolist()),
                "topic": pa.array(qs.topic),
                "text": pa.array(qs.text),
            },
            schema=QUESTIONS_SCHEMA,
        ),
    )


def write_responses(
    writer: DatasetWriter,
    dom: Domain,
    texts: list[str],
    question_id: np.ndarray,
    values: np.ndarray,
    source: list[str],
) -> None:
    cols: dict[str, Any] = {
        "response_id": pa.array(np.arange(len(texts), dtype=np.int32)),
        "question_id": pa.array(question_id.astype(np.int32)),
        "source": pa.array(source, pa.string()),
        "text": pa.array(texts, pa.string()),
    }
    for t, trait in enumerate(dom.traits):
        names = np.asarray([v.name for v in trait.values], dtype=object)
        cols[f"trait_{trait.name}"] = pa.array(names[values[:, t]].tolist(), pa.string())
    writer.write("responses", pa.table(cols, schema=responses_schema([t.name for t in dom.traits])))


def write_preferences(
    writer: DatasetWriter,
    *,
    first_pair_id: int,
    user_id: np.ndarray,
    question_id: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
    user_test: np.ndarray,
    question_split: np.ndarray,
    margin: np.ndarray,
    repeat_agree: np.ndarray,
    label_round: np.ndarray,
) -> int:
    """Append labeled pairs; returns how many."""
    m = len(user_id)
    writer.write(
        "preferences",
        pa.table(
            {
                "pair_id": pa.array(np.arange(first_pair_id, first_pair_id + m, dtype=np.int64)),
                "user_id": pa.array(user_id.astype(np.int64)),
                "question_id": pa.array(question_id.astype(np.int32)),
                "chosen_id": pa.array(chosen.astype(np.int32)),
                "rejected_id": pa.array(rejected.astype(np.int32)),
                "user_split": pa.array(np.where(user_test, "test", "train").tolist(), pa.string()),
                "question_split": pa.array(question_split.tolist(), pa.string()),
                "margin": pa.array(margin.astype(np.float32)),
                "repeat_agree": pa.array(repeat_agree.astype(bool)),
                "round": pa.array(label_round.astype(np.int8)),
            },
            schema=PREFERENCES_SCHEMA,
        ),
    )
    return m


def users_table(
    dom: Domain,
    users: world.Users,
    is_test: np.ndarray,
    schema: pa.Schema,
    descriptions: tuple[list[str], list[str]] | None = None,
) -> pa.Table:
    """The users table; descriptions (final, initial) default to the procedural persona texts."""
    n = len(users)
    if descriptions is None:
        descriptions = (
            [world.persona_description(dom, users, i) for i in range(n)],
            [world.persona_description(dom, users, i, initial=True) for i in range(n)],
        )
    cols: dict[str, Any] = {
        "user_id": pa.array(users.user_id),
        "split": pa.array(np.where(is_test, "test", "train").tolist()),
        "description": pa.array(descriptions[0], pa.string()),
        "description_initial": pa.array(descriptions[1], pa.string()),
        "refinement_rounds": pa.array(users.rounds),
    }
    for j, a in enumerate(dom.attribute_names):
        values = np.asarray(dom.spec.attributes[a].values, dtype=object)
        cols[f"attr_{a}"] = pa.array(values[users.attrs[:, j]].tolist(), pa.string())
    for t, trait in enumerate(dom.traits):
        names = np.asarray([v.name for v in trait.values], dtype=object)
        cols[f"pref_{trait.name}"] = pa.array(names[users.pref[:, t]].tolist(), pa.string())
        cols[f"weight_{trait.name}"] = pa.array(users.weight[:, t].astype(np.float32))
        cols[f"stated_{trait.name}"] = pa.array(users.stated[:, t])
        cols[f"stated_initial_{trait.name}"] = pa.array(users.stated_initial[:, t])
    if "structure" in schema.names:  # only datasets made with a structure mix carry these
        cols["structure"] = pa.array(np.asarray(world.STRUCTURES, dtype=object)[users.structure].tolist())
        cols["flip_rate"] = pa.array(users.flip.astype(np.float32))
        for t, trait in enumerate(dom.traits):
            names = np.asarray([v.name for v in trait.values], dtype=object)
            cols[f"second_{trait.name}"] = pa.array(names[users.second[:, t]].tolist(), pa.string())
    return pa.table(cols, schema=schema)
