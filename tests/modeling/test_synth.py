"""The procedural synthetic engine: oracle exactness, labels, refinement, reproducibility, storage."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from modeling.synth import BUILTIN_DOMAINS, DatasetError, generate_dataset, load_dataset, load_domain, world
from modeling.synth.generate import SynthConfig


def read(path, table):
    return pq.read_table(path / f"{table}.parquet").to_pandas()


@pytest.mark.parametrize("name", BUILTIN_DOMAINS)
def test_it_reads_back_exactly_the_trait_values_a_response_was_rendered_with(name):
    dom = load_domain(name)
    rng = np.random.default_rng(0)
    rnd = random.Random(0)
    for _ in range(300):
        values = [int(rng.integers(k)) for k in dom.trait_sizes]
        topic = dom.topics[int(rng.integers(len(dom.topics)))]
        text = world.render_response(dom, topic, values, rnd)
        assert world.detect_traits(dom, text) == values, text


def test_it_renders_varied_text_for_the_same_trait_values():
    dom = load_domain("roleplay")
    texts = {world.render_response(dom, dom.topics[0], [0, 0, 0, 0, 0], random.Random(s)) for s in range(40)}
    assert len(texts) >= 30
    # No single sentence carries a value: the same values come out with different marker phrases.
    first_sentences = {t.split(". ")[0] for t in texts}
    assert len(first_sentences) >= 10


def test_it_detects_traits_in_hand_written_text_and_none_when_absent():
    dom = load_domain("roleplay")
    text = "- Hey there, here is a sneaky trick.\n- Keep a scoreboard of your streak.\n- Just keep going."
    tone, formality, fmt, detail, interests = world.detect_traits(dom, text)
    names = lambda t, v: None if v is None else dom.traits[t].values[v].name  # noqa: E731
    assert names(0, tone) == "playful"
    assert names(1, formality) == "casual"
    assert names(2, fmt) == "bullets"
    assert names(3, detail) == "brief"
    assert names(4, interests) == "sports"
    assert world.detect_traits(dom, "Okay.")[0] is None  # no tone marker at all
    tied = "Plot twist: bottom line, it works."  # one playful and one blunt marker: undecided
    assert world.detect_traits(dom, tied)[0] is None


def test_the_oracle_scores_the_preferred_rendering_above_the_others():
    dom = load_domain("elix")
    topic = "gravity"
    rnd = random.Random(1)
    pref, weight = [3], [1.0]  # wants college level
    scores = [
        world.score_text(dom, pref, weight, topic, world.render_response(dom, topic, [v], rnd))
        for v in range(5)
    ]
    assert scores == [0.25, 0.5, 0.75, 1.0, 0.75]  # ordinal: 1 - |v - 3| / 4
    off_topic = world.render_response(dom, "tides", [3], rnd)
    assert world.score_text(dom, pref, weight, topic, off_topic) == pytest.approx(0.5)
    repeated = " ".join(["Formally, gravity is an optimisation problem."] * 4)
    assert world.score_text(dom, pref, weight, topic, repeated) == pytest.approx(0.5)


def test_vectorized_labels_match_the_scalar_rule():
    dom = load_domain("roleplay")
    rng = np.random.default_rng(3)
    n, cfg = 500, world.JudgeConfig(noise=0.1, position_bias=0.8)
    users = world.sample_users(dom, rng, n, 0)
    va = np.stack([rng.integers(0, k, n) for k in dom.trait_sizes], axis=1)
    vb = np.stack([rng.integers(0, k, n) for k in dom.trait_sizes], axis=1)
    w = users.weight * users.stated
    margin = world.utility(dom, users.pref, w, va) - world.utility(dom, users.pref, w, vb)
    a_wins, consistent = world.label_both_orders(margin, np.random.default_rng(9), cfg)
    draws = np.random.default_rng(9).random((2, n))
    for i in range(n):
        got = world.label_pair(
            dom, users.pref[i], users.weight[i], users.stated[i], va[i], vb[i], draws[:, i], cfg
        )
        assert got == (bool(a_wins[i]), bool(consistent[i]))
    assert 0 < consistent.mean() < 1


def test_it_labels_by_the_persona(tmp_path):
    info = generate_dataset(
        out_dir=tmp_path / "d",
        domain="reviews",
        users=300,
        pairs_per_user=8,
        seed=1,
        judge={"noise": 0.0, "position_bias": 0.8},
    )
    ds = load_dataset(info.path)
    prefs, users, resp = read(ds.path, "preferences"), read(ds.path, "users"), read(ds.path, "responses")
    dom = load_domain("reviews")
    u = users.set_index("user_id")
    r = resp.set_index("response_id")
    checked = 0
    for row in prefs.sample(400, random_state=0).itertuples():
        pref = [[v.name for v in t.values].index(u.at[row.user_id, f"pref_{t.name}"]) for t in dom.traits]
        weight = [
            u.at[row.user_id, f"weight_{t.name}"] * u.at[row.user_id, f"stated_{t.name}"] for t in dom.traits
        ]
        sc = world.score_text(dom, pref, weight, "", r.at[row.chosen_id, "text"])
        sr = world.score_text(dom, pref, weight, "", r.at[row.rejected_id, "text"])
        assert sc - sr == pytest.approx(row.margin, abs=1e-5)
        assert sc >= sr  # noise-free judge: never prefers the worse response (ties may pass by position)
        checked += sc > sr
    assert checked > 250
    assert set(prefs.groupby("user_id").size()) == {8}
    assert (prefs.chosen_id != prefs.rejected_id).all()
    # chosen and rejected answer the pair's question
    assert (r.loc[prefs.chosen_id, "question_id"].to_numpy() == prefs.question_id.to_numpy()).all()


def test_it_is_reproducible_from_a_seed(tmp_path):
    kw = dict(domain="roleplay", users=2100, pairs_per_user=5)  # more than one block of users
    a = generate_dataset(out_dir=tmp_path / "a", seed=7, **kw)
    b = generate_dataset(out_dir=tmp_path / "b", seed=7, **kw)
    c = generate_dataset(out_dir=tmp_path / "c", seed=8, **kw)
    for table in ("users", "questions", "responses", "preferences"):
        assert read(a.path, table).equals(read(b.path, table)), table
    assert not read(a.path, "preferences").equals(read(c.path, "preferences"))
    assert a.manifest["quality"] == b.manifest["quality"]


def _domain_needing_refinement(tmp_path):
    """Roleplay whose personas start out stating no preference at all: every pair is a tie for them."""
    text = load_domain("roleplay").source
    src = load_domain(text).spec.model_dump()
    for t in src["traits"]:
        t["stated_prob"] = 0.0
    import yaml

    path = tmp_path / "vague.yaml"
    path.write_text(yaml.safe_dump(src, sort_keys=False))
    return path


def test_persona_refinement_raises_consistency(tmp_path):
    path = _domain_needing_refinement(tmp_path)
    kw = dict(domain=str(path), users=400, pairs_per_user=6, seed=3)
    none = generate_dataset(out_dir=tmp_path / "none", max_rounds=0, **kw).manifest["quality"]
    refined = generate_dataset(out_dir=tmp_path / "refined", max_rounds=4, **kw).manifest["quality"]
    # With nothing stated the judge falls back on position: agreement is near 2 * 0.8 * 0.2 = 0.32.
    assert none["order_swap_agreement_final"] == pytest.approx(0.32, abs=0.03)
    assert none["stated_trait_fraction_final"] == 0.0
    by_round = refined["order_swap_agreement_by_round"]
    assert by_round[0] == pytest.approx(0.32, abs=0.03)
    assert all(b >= a for a, b in itertools.pairwise(by_round))
    assert by_round[-1] > 0.85
    assert refined["stated_trait_fraction_final"] > 0.6
    assert sum(refined["refinement_rounds_histogram"][1:]) == 400  # every user needed at least one round
    # the refined personas say more than the initial ones
    users = read(tmp_path / "refined", "users")
    assert (users.description.str.len() > users.description_initial.str.len()).all()


def test_random_mode_ties_labels_to_nothing(tmp_path):
    q = generate_dataset(
        out_dir=tmp_path / "r", domain="elix", users=500, pairs_per_user=10, seed=0, mode="random"
    )
    from modeling.synth.stats import dataset_stats

    s = dataset_stats(q.path, embeddings=False)
    assert s["consistency"]["labels_agree_with_oracle"] == pytest.approx(0.5, abs=0.05)
    assert s["consistency"]["repeat_agreement"] == pytest.approx(0.5, abs=0.05)
    assert s["consistency"]["mean_refinement_rounds"] == 0
    structured = generate_dataset(out_dir=tmp_path / "s", domain="elix", users=500, pairs_per_user=10, seed=0)
    assert dataset_stats(structured.path, embeddings=False)["consistency"]["labels_agree_with_oracle"] > 0.9


def test_it_keeps_held_out_users_and_topics_apart(tmp_path):
    info = generate_dataset(out_dir=tmp_path / "d", domain="elix", users=1000, pairs_per_user=5, seed=0)
    users, qs, prefs = read(info.path, "users"), read(info.path, "questions"), read(info.path, "preferences")
    assert 0.05 < (users.split == "test").mean() < 0.15
    test_topics = set(qs[qs.split == "test"].topic)
    assert test_topics and not test_topics & set(qs[qs.split == "train"].topic)
    merged = prefs.merge(users[["user_id", "split"]], on="user_id").merge(
        qs[["question_id", "split"]], on="question_id", suffixes=("_u", "_q")
    )
    assert (merged.user_split == merged.split_u).all() and (merged.question_split == merged.split_q).all()


def test_it_can_be_read_with_hugging_face_datasets_conventions(tmp_path):
    info = generate_dataset(out_dir=tmp_path / "d", domain="reviews", users=50, pairs_per_user=4, seed=0)
    table = pq.read_table(info.path / "preferences.parquet")
    assert table.schema.field("pair_id").type == "int64"
    assert table.num_rows == 200 == info.manifest["counts"]["preferences"]


def test_it_rejects_a_bad_config():
    with pytest.raises(ValueError, match="users must be >= 1"):
        SynthConfig(users=0)
    with pytest.raises(ValueError, match="mode must be"):
        SynthConfig(mode="chaos")


# --- bad input: nothing half-written is ever marked complete -------------------------------------


def test_an_interrupted_run_leaves_no_dataset(tmp_path):
    out = tmp_path / "d"

    def boom(done, total, stage):
        if done > 1000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out_dir=out, domain="elix", users=5000, pairs_per_user=5, seed=0, progress=boom)
    assert not out.exists()
    assert not (tmp_path / "d.partial").exists()
    with pytest.raises(DatasetError, match="no such dataset"):
        load_dataset(out)


def test_it_refuses_to_overwrite_unless_asked(tmp_path):
    generate_dataset(out_dir=tmp_path / "d", users=10, pairs_per_user=2)
    with pytest.raises(DatasetError, match="already exists"):
        generate_dataset(out_dir=tmp_path / "d", users=10, pairs_per_user=2)
    generate_dataset(out_dir=tmp_path / "d", users=12, pairs_per_user=2, overwrite=True)
    assert load_dataset(tmp_path / "d").manifest["counts"]["users"] == 12


def test_a_truncated_parquet_file_gets_a_clear_error(tmp_path):
    info = generate_dataset(out_dir=tmp_path / "d", users=200, pairs_per_user=5)
    f = info.path / "preferences.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"preferences.parquet: cannot read .* truncated or corrupt"):
        load_dataset(info.path)


def test_a_dataset_without_a_manifest_is_not_complete(tmp_path):
    info = generate_dataset(out_dir=tmp_path / "d", users=20, pairs_per_user=2)
    (info.path / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="not a complete dataset"):
        load_dataset(info.path)


def test_a_dataset_of_another_version_is_refused(tmp_path):
    import json

    info = generate_dataset(out_dir=tmp_path / "d", users=20, pairs_per_user=2)
    m = json.loads((info.path / "dataset.json").read_text())
    m["format_version"] = 99
    (info.path / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format version 99 is not supported"):
        load_dataset(info.path)
