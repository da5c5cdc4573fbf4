"""The FSPO prompt format (golden strings) and episodes from a synthetic dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modeling.data import (
    PROMPT_FORMAT_VERSION,
    Episode,
    EpisodeError,
    EpisodeSource,
    Pair,
    build_cot_prompt,
    build_prompt,
    cot_target,
    dumps_episodes,
    shot_response_spans,
    split_cot_output,
)
from modeling.synth import DatasetError, generate_dataset

SHOTS = [
    Pair("What is rain?", "Water falling from clouds.", "A liquid."),
    Pair("Why is the sky blue?", "Light scatters.", "It is."),
]

GOLDEN = """# Example 1
## Question
What is rain?
## Preferred Response
Water falling from clouds.
## Dispreferred Response
A liquid.

# Example 2
## Question
Why is the sky blue?
## Preferred Response
Light scatters.
## Dispreferred Response
It is.

# Task
The examples above show this user's preferences between pairs of responses. Explain the concept at the level this user wants.
## Question
What is wind?
## Preferred Response
"""


def test_it_renders_the_paper_markdown_layout():
    assert PROMPT_FORMAT_VERSION == "fspo-markdown-1"
    assert (
        build_prompt(SHOTS, "What is wind?", instruction="Explain the concept at the level this user wants.")
        == GOLDEN
    )


def test_shot_response_spans_cover_exactly_the_preferred_responses_of_the_shots():
    prompt = build_prompt(
        SHOTS, "What is wind?", instruction="Explain the concept at the level this user wants."
    )
    assert [prompt[a:b] for a, b in shot_response_spans(prompt)] == [
        "Water falling from clouds.",
        "Light scatters.",
    ]
    assert shot_response_spans(build_prompt([], "What is wind?", instruction="Explain.")) == []


def test_it_renders_zero_shots_and_the_user_description_sections():
    zero = build_prompt([], " What is wind? ", instruction="Explain it.")
    assert zero == "# Task\nExplain it.\n## Question\nWhat is wind?\n## Preferred Response\n"
    with_desc = build_prompt([], "What is wind?", instruction="Explain it.", description="I am eight.\n")
    assert (
        with_desc
        == "# Task\nExplain it.\n## Question\nWhat is wind?\n## User Description\nI am eight.\n## Preferred Response\n"
    )
    cot = build_cot_prompt(SHOTS[:1], "What is wind?", instruction="Explain it.")
    assert cot.endswith(
        "# Task\nThe examples above show this user's preferences between pairs of responses. Explain it.\n"
        "## Question\nWhat is wind?\n## User Description\n"
    )
    # teacher forcing: the CoT prompt + target is the description-given prompt + response
    full = cot + cot_target("I am eight.", "Air moving.")
    assert (
        full
        == build_prompt(SHOTS[:1], "What is wind?", instruction="Explain it.", description="I am eight.")
        + "Air moving."
    )
    assert split_cot_output("I am eight.\n## Preferred Response\nAir moving.") == (
        "I am eight.",
        "Air moving.",
    )
    assert split_cot_output("no header at all") == ("no header at all", "")


def test_episodes_round_trip_through_json_and_reject_other_schemas():
    ep = Episode(
        instruction="Explain it.", shots=tuple(SHOTS), question="What is wind?", user_id="p-1", domain="elix"
    )
    line = dumps_episodes([ep])
    assert Episode.from_json(json.loads(line)) == ep
    bad = json.loads(line)
    bad["format"] = "something-else"
    with pytest.raises(EpisodeError, match="format must be 'fspo-episode'"):
        Episode.from_json(bad)
    bad = json.loads(line)
    bad["shots"][1]["chosen"] = ""
    with pytest.raises(EpisodeError, match=r"shots\[1\]\.chosen must be a non-empty string"):
        Episode.from_json(bad)
    bad = json.loads(line)
    bad["version"] = 7
    with pytest.raises(EpisodeError, match="episode version 7 is not supported"):
        Episode.from_json(bad)


@pytest.fixture(scope="module")
def elix(tmp_path_factory):
    return generate_dataset(
        out_dir=tmp_path_factory.mktemp("ds") / "elix", domain="elix", users=300, pairs_per_user=12, seed=0
    ).path


def test_training_episodes_come_from_one_train_user_and_never_show_the_target(elix):
    src = EpisodeSource(elix, split="train")
    episodes = src.sample(200, shots=(1, 8), seed=0)
    assert {len(e.shots) for e in episodes} >= {1, 4, 8}
    for e in episodes:
        assert e.question not in [s.question for s in e.shots]
        assert e.chosen != e.rejected and e.description
    assert src.sample(5, shots=3, seed=1) == src.sample(5, shots=3, seed=1)


def test_a_group_is_several_targets_of_one_user_behind_the_same_shots(elix):
    src = EpisodeSource(elix, split="train")
    groups = src.sample_groups(100, shots=(1, 4), targets=3, seed=0)
    assert groups == src.sample_groups(100, shots=(1, 4), targets=3, seed=0)
    sizes = []
    for group in groups:
        sizes.append(len(group))
        first = group[0]
        questions = [e.question for e in group]
        assert len(set(questions)) == len(questions)  # different questions
        assert not set(questions) & {s.question for s in first.shots}  # none of them shown as a shot
        for e in group:
            assert (e.user_id, e.shots) == (first.user_id, first.shots)
            assert (e.question, e.chosen, e.rejected) in src_pairs(src, e.user_id)
    assert max(sizes) == 3
    with pytest.raises(ValueError, match="n_targets must be >= 1"):
        src.sample_groups(2, shots=2, targets=0, seed=0)


def src_pairs(src, user_id):
    return {(p.question, p.chosen, p.rejected) for p in map(src._pair, src.by_user[user_id]["targets"])}


def test_a_user_with_few_pairs_keeps_the_shots_and_gets_fewer_targets(elix):
    src = EpisodeSource(elix, split="train")
    user = int(src.user_ids[0])
    n = len(src.by_user[user]["targets"])  # all of them on different questions
    rng = np.random.default_rng(0)
    group = src.episode_group(user, n - 2, 5, rng)
    assert len(group) == 2 and len(group[0].shots) == n - 2
    group = src.episode_group(user, n, 5, rng)  # the shots cannot all be kept: one target still
    assert len(group) == 1 and len(group[0].shots) == n - 1


def test_evaluation_episodes_use_held_out_users_and_questions(elix):
    import pyarrow.parquet as pq

    users = pq.read_table(elix / "users.parquet").to_pandas()
    qs = pq.read_table(elix / "questions.parquet").to_pandas()
    test_users = set(users[users.split == "test"].user_id)
    test_questions = set(qs[qs.split == "test"].text)
    src = EpisodeSource(elix, split="test")
    for e in src.sample(50, shots=4, seed=0):
        assert e.user_id in test_users
        assert e.question in test_questions
        assert not {s.question for s in e.shots} & test_questions


def test_a_dataset_of_another_schema_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "dataset.json").write_text(json.dumps({"format": "alpaca", "format_version": 1}))
    with pytest.raises(DatasetError, match="format 'alpaca' is not 'fspo-synth'"):
        EpisodeSource(tmp_path / "x")
