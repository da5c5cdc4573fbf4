import json
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from annotation.pool import PoolRow, pool_from_dataset, pool_from_file
from modeling.synth import generate_dataset, load_dataset


def problems_of(name: str, text: str) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        pool_from_file(name, text.encode())
    return caught.value.messages


def test_it_reads_a_csv_pool_with_its_optional_columns() -> None:
    text = (
        "Question,Response_A,Response_B,Kind,Topic,Id\n"
        '"Why, exactly?",Because.,"Two\nlines.",elicitation,why,q1\n'
        "What is light?,,,Evaluation,physics,q2\n"
    )

    pool = pool_from_file("pool.csv", text.encode())

    assert pool.rows == (
        PoolRow("elicitation", "Why, exactly?", "Because.", "Two\nlines.", topic="why", source_id="q1"),
        PoolRow("evaluation", "What is light?", topic="physics", source_id="q2"),
    )


def test_it_names_the_row_and_field_of_every_bad_csv_row() -> None:
    text = (
        "question,response_a,response_b,kind\n"
        "Fine?,Yes.,No.,elicitation\n"
        ",Yes.,No.,elicitation\n"
        "Same?,Yes.,Yes.,elicitation\n"
        "Which?,A,B,evaluatoin\n"
        "Too many?,A,B,elicitation,extra\n"
    )

    assert problems_of("pool.csv", text) == [
        "Nothing was imported; fix these rows and upload the file again.",
        "Row 3: 'question' is empty.",
        "Row 4: 'response_b' is the same as 'response_a' (there would be nothing to choose).",
        "Row 5: 'kind' must be elicitation or evaluation, not 'evaluatoin'.",
        "Row 6: 5 cells, but the header has 4 columns.",
    ]


def test_it_refuses_a_csv_file_without_a_kind_column() -> None:
    assert problems_of("pool.csv", "question,response_a,response_b\nQ,A,B\n") == [
        "The header row has no 'kind' column (expected columns: question, response_a, response_b, kind; "
        "optional: topic, id)."
    ]


def test_it_names_a_jsonl_line_that_is_not_a_json_object() -> None:
    good = json.dumps({"question": "Q?", "kind": "evaluation"})

    assert problems_of("pool.jsonl", f'{good}\n{{"question": "Q2?",\n["a list"]\n')[1:] == [
        "Row 2: not valid JSON (Expecting property name enclosed in double quotes at column 20).",
        "Row 3: not a JSON object with the fields question, response_a, response_b, kind.",
    ]


def test_it_refuses_an_evaluation_question_given_twice() -> None:
    lines = [{"question": "Q?", "kind": "evaluation"}, {"question": "Q?", "kind": "evaluation"}]

    assert problems_of("pool.jsonl", "\n".join(map(json.dumps, lines)))[1:] == [
        "Row 2: 'question' repeats the evaluation question of row 1."
    ]


def test_it_refuses_a_file_that_is_not_csv_or_jsonl() -> None:
    assert problems_of("pool.xlsx", "") == ["pool.xlsx is not a .csv or .jsonl file."]


def test_it_takes_train_questions_with_a_labeled_pair_and_held_out_questions_from_a_dataset(
    tmp_path: Path,
) -> None:
    generate_dataset(out_dir=tmp_path / "ds", domain="elix", users=20, pairs_per_user=5)
    dataset = load_dataset(tmp_path / "ds")
    questions = dataset.table("questions").to_pandas().set_index("text")
    responses = set(dataset.table("responses").to_pandas().text)

    pool = pool_from_dataset(tmp_path / "ds", elicitation=5, evaluation=4)

    elicitation = [r for r in pool.rows if r.kind == "elicitation"]
    evaluation = [r for r in pool.rows if r.kind == "evaluation"]
    assert (len(elicitation), len(evaluation)) == (5, 4)
    assert {questions.split[r.question] for r in elicitation} == {"train"}
    assert {questions.split[r.question] for r in evaluation} == {"test"}
    assert all(r.response_a in responses and r.response_b in responses for r in elicitation)
    assert (pool.domain, pool.instruction != "") == ("elix", True)
