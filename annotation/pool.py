"""A study's question pool as rows, read from an uploaded file or from a synthetic dataset; nothing here
writes to the database (annotation.writers.question_pool_import does).

Uploaded files are CSV (a header row) or JSON Lines (one object a line) with the fields
`question`, `response_a`, `response_b` and `kind` (elicitation | evaluation), and optionally `topic` and
`id`. An elicitation row needs both responses: they are the pair a participant chooses between. An
evaluation row needs only the question (the arms write its responses); responses given there are ignored.
Every row is checked before anything is stored, and every problem is reported with its row and field.
"""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.core.exceptions import ValidationError

from .models import Question

FIELDS = ("question", "response_a", "response_b", "kind")
OPTIONAL_FIELDS = ("topic", "id")
KINDS = tuple(Question.Use.values)  # elicitation, evaluation
MAX_FIELD_CHARS = 20_000
MAX_ROWS = 20_000
MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class PoolRow:
    """One question of the pool; an elicitation question comes with the pair of responses to show."""

    kind: str  # Question.Use
    question: str
    response_a: str = ""
    response_b: str = ""
    topic: str = ""
    source_id: str = ""


@dataclass(frozen=True)
class PoolSource:
    """Rows read from one source, and what the source says about the study (a dataset knows its domain
    and the task instruction its models were trained with; a file does not)."""

    rows: tuple[PoolRow, ...]
    description: str
    domain: str = ""
    instruction: str = ""

    @property
    def elicitation_pairs(self) -> int:
        return sum(row.kind == Question.Use.ELICITATION for row in self.rows)

    @property
    def evaluation_questions(self) -> int:
        return sum(row.kind == Question.Use.EVALUATION for row in self.rows)


class _Problems:
    """Collects every problem of a file, so the coordinator can fix them all in one go."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, row: int, message: str) -> None:
        self.messages.append(f"Row {row}: {message}")

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_PROBLEMS_SHOWN]
        if len(self.messages) > MAX_PROBLEMS_SHOWN:
            shown.append(f"… and {len(self.messages) - MAX_PROBLEMS_SHOWN} more problems.")
        raise ValidationError(["Nothing was imported; fix these rows and upload the file again.", *shown])


def pool_from_file(name: str, data: bytes) -> PoolSource:
    """Parse an uploaded pool file (.csv or .jsonl). Raises ValidationError naming each bad row and field.

    Rows are numbered as a spreadsheet shows them: in a CSV file the header is row 1; in a JSON Lines file
    row n is line n."""
    suffix = Path(name).suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise ValidationError(f"{name} is not a .csv or .jsonl file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{name} is not UTF-8 text (byte {exc.start} cannot be read).") from None
    records = _csv_records(text) if suffix == ".csv" else _jsonl_records(text)
    problems = _Problems()
    rows: list[PoolRow] = []
    first_evaluation_row: dict[str, int] = {}
    for number, record in records:
        if isinstance(record, str):  # a problem with the row as a whole
            problems.add(number, record)
            continue
        row = _pool_row(number, record, problems)
        if row is None:
            continue
        if row.kind == Question.Use.EVALUATION:
            if row.question in first_evaluation_row:
                problems.add(
                    number,
                    f"'question' repeats the evaluation question of row {first_evaluation_row[row.question]}.",
                )
                continue
            first_evaluation_row[row.question] = number
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise ValidationError(f"{name} has more than {MAX_ROWS:,} rows; split it into smaller files.")
    problems.raise_if_any()
    if not rows:
        raise ValidationError(f"{name} has no rows.")
    return PoolSource(rows=tuple(rows), description=f"file {name}")


def _csv_records(text: str) -> list[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ValidationError("The file is empty.") from None
    except csv.Error as exc:
        raise ValidationError(f"Row 1: the header cannot be read as CSV ({exc}).") from None
    columns = [c.strip().lower() for c in header]
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise ValidationError(
            f"The header row has no {', '.join(repr(m) for m in missing)} column "
            f"(expected columns: {', '.join(FIELDS)}; optional: {', '.join(OPTIONAL_FIELDS)})."
        )
    records: list[tuple[int, dict[str, Any] | str]] = []
    number = 1
    while True:
        number += 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            records.append((number, f"cannot be read as CSV ({exc})."))
            break
        if not any(v.strip() for v in values):
            continue  # a blank line, as spreadsheets often leave at the end
        if len(values) > len(columns):
            records.append((number, f"{len(values)} cells, but the header has {len(columns)} columns."))
            continue
        records.append((number, dict(zip(columns, values, strict=False))))
    return records


def _jsonl_records(text: str) -> list[tuple[int, dict[str, Any] | str]]:
    records: list[tuple[int, dict[str, Any] | str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})."))
            continue
        if not isinstance(value, dict):
            records.append((number, "not a JSON object with the fields " + ", ".join(FIELDS) + "."))
            continue
        records.append((number, {str(k).lower(): v for k, v in value.items()}))
    return records


def _text(number: int, record: dict[str, Any], field: str, problems: _Problems) -> str | None:
    value = record.get(field)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        problems.add(number, f"'{field}' must be text, not {type(value).__name__}.")
        return None
    text = str(value).strip()
    if len(text) > MAX_FIELD_CHARS:
        problems.add(number, f"'{field}' is longer than {MAX_FIELD_CHARS:,} characters.")
        return None
    return text


def _pool_row(number: int, record: dict[str, Any], problems: _Problems) -> PoolRow | None:
    read = {field: _text(number, record, field, problems) for field in (*FIELDS, *OPTIONAL_FIELDS)}
    values = {field: text for field, text in read.items() if text is not None}
    if len(values) < len(read):
        return None
    kind = values["kind"].lower()
    if kind not in KINDS:
        shown = f"'{values['kind']}'" if values["kind"] else "empty"
        problems.add(number, f"'kind' must be elicitation or evaluation, not {shown}.")
        return None
    if not values["question"]:
        problems.add(number, "'question' is empty.")
        return None
    extra = {"topic": values["topic"][:200], "source_id": values["id"][:200]}
    if kind == Question.Use.EVALUATION:
        return PoolRow(kind, values["question"], **extra)
    for field in ("response_a", "response_b"):
        if not values[field]:
            problems.add(number, f"'{field}' is empty (an elicitation question needs two responses).")
            return None
    if values["response_a"] == values["response_b"]:
        problems.add(number, "'response_b' is the same as 'response_a' (there would be nothing to choose).")
        return None
    return PoolRow(kind, values["question"], values["response_a"], values["response_b"], **extra)


def pool_from_dataset(path: Path, *, elicitation: int, evaluation: int, seed: int = 0) -> PoolSource:
    """Take a study's pool from a synthetic dataset (modeling.synth): `elicitation` questions of the
    train split, each with the one candidate pair its synthetic users disagreed on most (the pick that
    says most about a person), and `evaluation` questions of the held-out split (topics no model was
    trained on), both drawn at random with `seed`. Raises ValidationError for a missing or broken
    dataset, or one with no labeled pairs."""
    from modeling.synth import DatasetError, load_dataset, load_domain

    try:
        dataset = load_dataset(path)
        questions = dataset.table("questions", ["question_id", "split", "topic", "text"]).to_pandas()
        prefs = dataset.table("preferences", ["question_id", "chosen_id", "rejected_id"]).to_pandas()
        responses = dataset.table("responses", ["response_id", "text"]).to_pandas()
    except DatasetError as exc:
        raise ValidationError(str(exc)) from None
    train_ids = set(questions.loc[questions.split == "train", "question_id"].tolist())
    prefs = prefs[prefs.question_id.isin(train_ids)]
    if prefs.empty:
        raise ValidationError(f"{path}: the dataset has no labeled pairs on train-split questions.")
    # Each labeled pair as an unordered pair of responses, and how its users split over it.
    lo = np.minimum(prefs.chosen_id, prefs.rejected_id)
    hi = np.maximum(prefs.chosen_id, prefs.rejected_id)
    votes = prefs.assign(a=lo, b=hi, a_won=(prefs.chosen_id == lo).astype(int))
    pairs = votes.groupby(["question_id", "a", "b"], as_index=False).agg(
        n=("a_won", "size"), a_won=("a_won", "sum")
    )
    pairs["minority"] = np.minimum(pairs.a_won, pairs.n - pairs.a_won)
    best = pairs.sort_values(
        ["question_id", "minority", "n", "a", "b"], ascending=[True, False, False, True, True]
    )
    best = best.drop_duplicates("question_id").set_index("question_id")
    rng = np.random.default_rng(seed)
    elicitation_ids = sorted(rng.permutation(best.index.to_numpy())[:elicitation].tolist())
    held_out = questions.loc[questions.split == "test", "question_id"].to_numpy()
    if not len(held_out):  # no held-out topics: fall back to train questions not used for picks
        held_out = np.setdiff1d(questions.question_id.to_numpy(), elicitation_ids)
    evaluation_ids = sorted(rng.permutation(held_out)[:evaluation].tolist())
    text = questions.set_index("question_id")
    response_text = responses.set_index("response_id").text
    name = Path(path).name
    rows = [
        PoolRow(
            Question.Use.ELICITATION,
            text.text[q],
            response_text[best.a[q]],
            response_text[best.b[q]],
            topic=text.topic[q][:200],
            source_id=f"{name}:q{q}:r{best.a[q]}-r{best.b[q]}",
        )
        for q in elicitation_ids
    ] + [
        PoolRow(Question.Use.EVALUATION, text.text[q], topic=text.topic[q][:200], source_id=f"{name}:q{q}")
        for q in evaluation_ids
    ]
    try:
        instruction = load_domain(dataset.manifest.get("domain_source", dataset.domain)).spec.task
    except Exception:  # noqa: BLE001 - a custom domain file may have moved; the coordinator then writes it
        instruction = ""
    return PoolSource(
        rows=tuple(rows), description=f"dataset {name}", domain=dataset.domain, instruction=instruction
    )
