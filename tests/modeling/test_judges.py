"""Judges: the exact oracle, the LLM judge's position-bias handling, win rates with intervals."""

from __future__ import annotations

import random

import pytest

from modeling.judges import Comparison, LLMJudge, OracleJudge
from modeling.llm import ChoiceReply, LLMError, TransformersBackend, ask_choices
from modeling.synth import generate_dataset, load_domain
from modeling.synth.world import render_response


@pytest.fixture(scope="module")
def elix(tmp_path_factory):
    return generate_dataset(
        out_dir=tmp_path_factory.mktemp("ds") / "elix", domain="elix", users=50, pairs_per_user=4, seed=0
    ).path


def test_the_oracle_prefers_the_level_the_user_wants(elix):
    import pyarrow.parquet as pq

    judge = OracleJudge(elix)
    users = pq.read_table(elix / "users.parquet").to_pandas()
    dom = load_domain("elix")
    levels = [v.name for v in dom.traits[0].values]
    rnd = random.Random(0)
    for row in users.head(20).itertuples():
        want = levels.index(row.pref_level)
        other = (want + 2) % 5
        good = render_response(dom, "tides", [want], rnd)
        bad = render_response(dom, "tides", [other], rnd)
        c = Comparison("How do tides work?", good, bad, user_id=row.user_id, topic="tides")
        assert judge.score([c]) == [1.0]
        assert judge.score([Comparison(c.question, bad, good, row.user_id, "tides")]) == [0.0]
        assert judge.score([Comparison(c.question, good, good, row.user_id, "tides")]) == [0.5]


class AlwaysFirst:
    """A judge with total position bias: whatever it is shown, it answers that the first output is better."""

    name = "always-first"

    def chat(self, requests, *, progress=None):
        return ["a" for _ in requests]


def test_asking_both_orders_cancels_position_bias():
    judge = LLMJudge(AlwaysFirst())
    c = [Comparison("q?", "one answer", "another answer", user_id=1, description="I like short answers.")]
    assert judge.score(c) == [0.5]


class Scripted:
    """A judge back end that gives one fixed reply and records what it was asked."""

    name = "scripted"

    def __init__(self, reply):
        self.reply = reply
        self.asked = []

    def chat(self, requests, *, progress=None):
        self.asked += requests
        return [self.reply for _ in requests]


def test_identical_responses_tie_without_asking_the_judge():
    backend = Scripted("a")
    c = Comparison("q?", "one answer", "another answer", user_id=1, description="I like short answers.")
    same = Comparison("q?", "one answer", "one answer", user_id=1, description="I like short answers.")

    assert LLMJudge(backend).score([same, c, same]) == [0.5, 0.5, 0.5]
    assert len(backend.asked) == 2  # both orders of the one comparison that differs


def test_a_judge_that_never_answers_a_or_b_is_an_error_not_a_tie():
    c = Comparison("q?", "one answer", "another answer", user_id=1, description="I like short answers.")

    with pytest.raises(LLMError, match=r"LLM judge scripted answered none of its 2 prompts with 'a' or 'b'"):
        LLMJudge(Scripted("Output")).score([c])


def test_a_deterministic_llm_judge_is_antisymmetric(tiny_model_dir):
    judge = LLMJudge(TransformersBackend(tiny_model_dir), temperature=0.0)
    pairs = [
        ("Short answer.", "A much longer and rambling answer about everything."),
        ("Yes.", "No."),
        ("Maybe so.", "Never."),
    ]
    forward = judge.score(
        [Comparison("What do you think?", a, b, user_id=1, description="I like brevity.") for a, b in pairs]
    )
    backward = judge.score(
        [Comparison("What do you think?", b, a, user_id=1, description="I like brevity.") for a, b in pairs]
    )
    assert all(s in (0.0, 0.5, 1.0) for s in forward)
    assert [1 - s for s in forward] == backward


@pytest.fixture
def one_torch_thread():
    """SmolLM2 in this process on one thread: two threads on a busy 2-core machine run several times
    slower (each waits for the other's core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_llm_judge_on_smollm2_decides_by_both_orders_probabilities(smollm2_dir, one_torch_thread):
    backend = TransformersBackend(smollm2_dir)
    short = "The Moon's gravity pulls the oceans into bulges that the Earth turns through."
    long = (
        "Great question! Tides are a fascinating phenomenon. The gravitational interplay between the Earth, "
        "the Moon and the Sun raises bulges of water on opposite sides of the planet, and as the Earth "
        "spins, every coast passes through them, so the sea rises and falls twice a day."
    )
    c = Comparison("How do tides work?", short, long, user_id=1, description="I want one short sentence.")
    swapped = Comparison(c.question, long, short, user_id=1, description=c.description)
    judge = LLMJudge(backend, margin=0.0)  # any lean decides, so the test sees a win or a loss

    [forward], [backward] = judge.score([c]), judge.score([swapped])

    shown = ask_choices(backend, [judge._request(c, short, long), judge._request(c, long, short)])
    assert all(r.probs is not None and r.probs.keys() == {"a", "b"} for r in shown)
    p_short_better = (shown[0].probs["a"] + shown[1].probs["b"]) / 2
    assert forward == (1.0 if p_short_better > 0.5 else 0.0)
    assert backward == 1 - forward


class Leaning:
    """A back end that reads choice probabilities: P("a") is 0.9 whatever is shown first (position
    bias), plus 0.04 when the first output shown is the word it likes."""

    name = "leaning"

    def chat(self, requests, *, progress=None):
        return [r.text for r in self.choice_replies(requests)]

    def choice_replies(self, requests, *, progress=None):
        out = []
        for r in requests:
            first = r.messages[-1]["content"].split("Output (a):\n")[1].split("\n")[0]
            p_a = 0.9 + (0.04 if first == "liked" else 0.0)
            out.append(ChoiceReply("a", {"a": p_a, "b": 1 - p_a}))
        return out


def test_the_llm_judge_averages_both_orders_probabilities_against_a_margin():
    c = Comparison("q?", "liked", "other", user_id=1, description="I like the word liked.")
    # P(first is better) = (0.94 + (1 - 0.9)) / 2 = 0.52: a lean of 0.02 past a tie.
    assert LLMJudge(Leaning(), margin=0.01).score([c]) == [1.0]
    assert LLMJudge(Leaning(), margin=0.01).score([Comparison("q?", "other", "liked", 1, "")]) == [0.0]
    assert LLMJudge(Leaning()).score([c]) == [0.5]  # within the default margin of 0.1: a tie
    with pytest.raises(ValueError, match="margin must be from 0 to below 0.5"):
        LLMJudge(Leaning(), margin=0.5)
