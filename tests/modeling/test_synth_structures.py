"""Preference structures of the procedural world: what each one's oracle prefers, the mix, held-out
structures, and that a dataset without a mix is what it was before structures existed."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from modeling.judges import Comparison, OracleJudge
from modeling.synth import generate_dataset, load_dataset, load_domain, world
from modeling.synth.generate import SynthConfig

MIX = {"weighted": 1, "topical": 1, "bimodal": 1, "noisy": 1}


def content_digest(path: Path) -> str:
    """The tables' contents and the manifest without its creation time (parquet bytes aside)."""
    h = hashlib.sha256()
    for table in ("users", "questions", "responses", "preferences"):
        df = pq.read_table(path / f"{table}.parquet").to_pandas()
        h.update(",".join(df.columns).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    m = json.loads((path / "dataset.json").read_text())
    h.update(json.dumps({k: v for k, v in m.items() if k != "created"}, sort_keys=True).encode())
    return h.hexdigest()


def level_scores(user: world.UserPreference, question: str) -> list[float]:
    dom, rnd = load_domain("elix"), random.Random(0)
    texts = [world.render_response(dom, "gravity", [v], rnd) for v in range(5)]
    return [user.score(dom, question, "gravity", t) for t in texts]


def test_a_dataset_without_a_structure_mix_is_unchanged(tmp_path):
    # Digests of seed-5 datasets written by the code before preference structures existed (commit e410844).
    want = {
        "elix": "cf8a844e4ae4d7246eb8b6d07ceac0e9692b7cc4c11cbdb6ff2b209c44b04175",
        "roleplay": "1e628f30e829f8fcdcc53610d23297df4bf641213e156f15a8962bc848d7ebad",
    }
    for name, digest in want.items():
        info = generate_dataset(out_dir=tmp_path / name, domain=name, users=300, pairs_per_user=6, seed=5)
        assert content_digest(info.path) == digest, name
        assert "structure" not in pq.read_schema(info.path / "users.parquet").names


def test_the_question_kind_comes_from_the_template_a_question_was_written_from():
    dom = load_domain("elix")
    kinds = [world.question_kind(dom, t.format(topic="tides")) for t in dom.spec.questions.templates]
    assert kinds == [0, 1, 0, 1, 0]
    assert world.question_kind(dom, "Tell me a joke.") == 0


def test_a_topical_user_wants_one_level_on_what_questions_and_another_on_how_questions():
    user = world.UserPreference("topical", pref=(0,), weight=(1.0,), second=(4,))
    assert level_scores(user, "Can you explain gravity?") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert level_scores(user, "How does gravity work?") == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_bimodal_user_likes_both_peaks_and_dislikes_what_lies_between():
    user = world.UserPreference("bimodal", pref=(0,), weight=(1.0,), second=(4,))
    for q in ("Can you explain gravity?", "How does gravity work?"):
        assert level_scores(user, q) == [1.0, 0.75, 0.5, 0.75, 1.0]
    near = world.UserPreference("bimodal", pref=(1,), weight=(1.0,), second=(3,))
    assert level_scores(near, "Explain gravity to me.") == [0.75, 1.0, 0.75, 1.0, 0.75]


def test_a_weighted_user_trades_traits_off_by_its_own_weights():
    dom, rnd = load_domain("reviews"), random.Random(0)  # sentiment and length, both nominal
    texts = {
        (s, n): world.render_response(dom, "the blender", [s, n], rnd) for s in range(3) for n in range(3)
    }
    tone_first = world.UserPreference("weighted", pref=(0, 2), weight=(0.8, 0.2), second=(0, 2))
    length_first = world.UserPreference("weighted", pref=(0, 2), weight=(0.2, 0.8), second=(0, 2))
    q = "Write a review of the blender."
    # (positive, short) against (negative, long): each user picks the one its heavier trait decides.
    a, b = texts[(0, 0)], texts[(1, 2)]
    assert tone_first.score(dom, q, "the blender", a) == pytest.approx(0.8)
    assert tone_first.score(dom, q, "the blender", b) == pytest.approx(0.2)
    assert length_first.score(dom, q, "the blender", a) == pytest.approx(0.2)
    assert length_first.score(dom, q, "the blender", b) == pytest.approx(0.8)
    assert tone_first.score(dom, q, "the blender", texts[(0, 2)]) == pytest.approx(1.0)


def test_a_noisy_user_is_scored_by_its_underlying_preference():
    noisy = world.UserPreference("noisy", pref=(2,), weight=(1.0,), second=(2,), flip=0.25)
    plain = world.UserPreference("weighted", pref=(2,), weight=(1.0,), second=(2,))
    assert level_scores(noisy, "Why does gravity matter?") == level_scores(plain, "Why does gravity matter?")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "elix"
    generate_dataset(
        out_dir=out,
        domain="elix",
        users=800,
        pairs_per_user=8,
        seed=2,
        judge={"noise": 0.0, "position_bias": 0.8},
        structures=MIX,
        held_out_structures=["bimodal"],
    )
    return load_dataset(out)


def test_a_mix_draws_every_structure_and_holds_out_the_named_ones(mixed):
    users = mixed.table("users").to_pandas()
    share = users.structure.value_counts(normalize=True)
    assert set(share.index) == set(world.STRUCTURES)
    assert share.between(0.18, 0.32).all()
    assert (users[users.structure == "bimodal"].split == "test").all()
    rest = users[users.structure != "bimodal"]
    assert 0.05 < (rest.split == "test").mean() < 0.16  # test_user_frac of the others
    prefs = mixed.table("preferences").to_pandas()
    trained = users.set_index("user_id").loc[prefs[prefs.user_split == "train"].user_id, "structure"]
    assert "bimodal" not in set(trained)
    # Second peaks follow each structure's definition.
    levels = [v.name for v in load_domain("elix").traits[0].values]
    gap = (users.second_level.map(levels.index) - users.pref_level.map(levels.index)).abs()
    assert (gap[users.structure == "bimodal"] >= 2).all()
    assert (gap[users.structure == "topical"] >= 1).all()
    assert (gap[users.structure.isin(["weighted", "noisy"])] == 0).all()
    assert users.flip_rate[users.structure == "noisy"].between(0.1, 0.3).all()
    assert (users.flip_rate[users.structure != "noisy"] == 0).all()


def test_the_labels_of_every_structure_follow_its_oracle_and_noisy_users_flip(mixed):
    judge = OracleJudge(mixed)
    prefs = mixed.table("preferences").to_pandas()
    users = mixed.table("users").to_pandas().set_index("user_id")
    resp = mixed.table("responses").to_pandas().set_index("response_id")
    qs = mixed.table("questions").to_pandas().set_index("question_id")

    def scores(response_ids):  # topic "": the engine's labels do not see the oracle's off-topic penalty
        return [
            judge.prefs[u].score(judge.domain, qs.text[q], "", resp.text[r])
            for u, q, r in zip(prefs.user_id, prefs.question_id, response_ids, strict=True)
        ]

    sc, sr = scores(prefs.chosen_id), scores(prefs.rejected_id)
    diff = pd.Series(np.subtract(sc, sr), index=prefs.index)
    assert np.allclose(diff, prefs.margin, atol=1e-5)  # the stored margin is the oracle's, flips included
    structure = users.structure[prefs.user_id].to_numpy()
    wrong = diff < -1e-9
    for name in ("weighted", "topical", "bimodal"):
        assert not wrong[structure == name].any(), name  # a noise-free judge never picks the worse one
    flip = users.flip_rate[prefs.user_id].to_numpy()
    noisy = structure == "noisy"
    decided = noisy & (diff.abs() > 1e-9).to_numpy()
    assert wrong[decided].mean() == pytest.approx(flip[decided].mean(), abs=0.05)
    # The topical users' preference does change with the question's kind: the oracle's margin does too.
    topical = prefs[structure == "topical"]
    kinds = topical.question_id.map(lambda q: world.question_kind(judge.domain, qs.text[q]))
    assert set(kinds) == {0, 1}


def test_the_oracle_judge_reads_the_question_for_a_topical_user(mixed):
    judge = OracleJudge(mixed)
    users = mixed.table("users").to_pandas()
    levels = [v.name for v in judge.domain.traits[0].values]
    row = users[(users.structure == "topical") & users.stated_level].iloc[0]
    first, second = levels.index(row.pref_level), levels.index(row.second_level)
    rnd = random.Random(1)
    a, b = (world.render_response(judge.domain, "tides", [v], rnd) for v in (first, second))
    what = Comparison("What is tides, really?", a, b, user_id=int(row.user_id), topic="tides")
    how = Comparison("How does tides work?", a, b, user_id=int(row.user_id), topic="tides")
    assert judge.score([what, how]) == [1.0, 0.0]


def test_a_bad_structure_mix_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="unknown preference structures \\['zigzag'\\]"):
        SynthConfig(structures={"zigzag": 1.0})
    with pytest.raises(ValueError, match="not drawn by the structure mix"):
        SynthConfig(structures={"weighted": 1.0}, held_out_structures=["noisy"])
    with pytest.raises(ValueError, match="not drawn by the structure mix"):
        SynthConfig(held_out_structures=["noisy"])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        SynthConfig(structures={"weighted": -1.0, "noisy": 1.0})


def test_the_scalar_labeler_matches_the_vectorized_one_for_every_structure():
    dom = load_domain("roleplay")
    rng = np.random.default_rng(4)
    n, cfg = 600, world.JudgeConfig(noise=0.1, position_bias=0.8)
    users = world.sample_users(dom, rng, n, 0, structures=MIX)
    kind = rng.integers(0, 2, n)
    flipped = rng.random(n) < users.flip
    va = np.stack([rng.integers(0, k, n) for k in dom.trait_sizes], axis=1)
    vb = np.stack([rng.integers(0, k, n) for k in dom.trait_sizes], axis=1)
    first, second = world.peaks(users.structure, users.pref, users.second, kind)
    w = users.weight * users.stated
    margin = world.utility(dom, first, w, va, second) - world.utility(dom, first, w, vb, second)
    a_wins, consistent = world.label_both_orders(
        np.where(flipped, -margin, margin), np.random.default_rng(9), cfg
    )
    draws = np.random.default_rng(9).random((2, n))
    for i in range(n):
        got = world.label_pair(
            dom, first[i], users.weight[i], users.stated[i], va[i], vb[i], draws[:, i], cfg,
            second=second[i], flipped=bool(flipped[i]),
        )  # fmt: skip
        assert got == (bool(a_wins[i]), bool(consistent[i]))
    assert set(np.unique(users.structure)) == set(range(len(world.STRUCTURES)))
