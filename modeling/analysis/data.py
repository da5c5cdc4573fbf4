"""A study's data as the analyses read it: the export tables (schema `fspo-study-export-2`, written by
annotation.exports) as typed pandas DataFrames.

Two ways in, one result: `load_export(folder)` reads an export folder (CSV, JSONL or Parquet, as its
manifest says), and `study_data_from_tables(tables)` takes pyarrow tables built in memory (the studio page
builds them from the database through the exporter). Both go through `study_data_from_tables`, so an
analysis of an export and of the database it came from see the same values.

`COLUMNS` holds the columns the analyses read (`READ`) with their types, which come from the export
schema (modeling.export_schema, which annotation.exports writes with). A file that lacks one of them, or an
export of another schema version, is refused with a one-line reason.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..export_schema import EXPORT_SCHEMA_VERSION, MANIFEST, READABLE_SCHEMA_VERSIONS
from ..export_schema import TABLES as EXPORT_TABLES

# Where a folder has no manifest, each table is looked for in this order.
FORMATS = ("parquet", "jsonl", "csv")

# The columns each table's analyses read (their types are the export schema's).
READ: dict[str, tuple[str, ...]] = {
    table: tuple(names.split())
    for table, names in {
        "study": """schema_version slug title domain n_pairs n_eval_questions consistency_repeats
            attention_checks attention_failures_allowed is_open arms comparisons participants
            participants_completed participants_in_progress participants_withdrawn complete too_fast_ms""",
        "participants": """participant state complete excluded n_picks picks_done n_ratings ratings_done
            median_rating_ms attention_checks_answered attention_failures attention_failures_allowed
            failed_attention repeats_answered repeats_consistent too_fast_ms too_fast self_description
            age_range gender education occupation""",
        "judgments": """participant participant_state kind position question_id pair_id a_on_left
            left_response_id right_response_id left_arm right_arm chosen_side chosen_response_id chosen_arm
            arm baseline arm_won is_repeat repeat_of_position repeat_consistent is_attention_check
            expected_choice attention_passed elapsed_ms""",
        "responses": """response_id participant arm method checkpoint cot shots question_id text
            user_description""",
    }.items()
}


def _export_types(table: str) -> dict[str, pa.DataType]:
    schema = EXPORT_TABLES[table].schema
    assert schema is not None
    return {name: schema.field(name).type for name in READ[table]}


COLUMNS: dict[str, dict[str, pa.DataType]] = {table: _export_types(table) for table in READ}
REQUIRED_TABLES = ("study", "participants", "judgments")
TABLES = tuple(COLUMNS)


class AnalysisInputError(ValueError):
    """Data the analyses cannot read: a missing table or column, another schema version, a corrupt file
    (a one-line message for the command line and the pages)."""


def _schema(table: str) -> pa.Schema:
    return pa.schema([pa.field(name, type_) for name, type_ in COLUMNS[table].items()])


@dataclass(frozen=True)
class StudyArm:
    name: str
    method: str
    checkpoint: str

    @property
    def cot(self) -> bool:
        return self.method == "fspo_cot"


@dataclass(frozen=True)
class StudyData:
    """One study's export tables, typed: booleans and integers as pandas' nullable dtypes (a missing value
    stays missing), text as strings. `responses` is None when the export left that table out."""

    study: dict[str, Any]
    participants: pd.DataFrame
    judgments: pd.DataFrame
    responses: pd.DataFrame | None
    source: str  # where it was read from, for the report ("export folder ...", "database")

    @property
    def arms(self) -> list[StudyArm]:
        return [StudyArm(a["name"], a["method"], a["checkpoint"]) for a in json.loads(self.study["arms"])]

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        """(arm, baseline) of each comparison, in the order the study's items were built."""
        return [(c["arm"], c["baseline"]) for c in json.loads(self.study["comparisons"])]


_PANDAS_TYPES = {pa.bool_(): pd.BooleanDtype(), pa.int32(): pd.Int64Dtype(), pa.int64(): pd.Int64Dtype()}


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


def _checked(name: str, table: pa.Table) -> pa.Table:
    """The analyses' columns of `table`, cast to their export types (AnalysisInputError if one lacks)."""
    missing = [c for c in COLUMNS[name] if c not in table.column_names]
    if missing:
        raise AnalysisInputError(
            f"the {name} table has no column {missing[0]!r}"
            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f": is it an {EXPORT_SCHEMA_VERSION} export?"
        )
    try:
        return table.select(list(COLUMNS[name])).cast(_schema(name))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise AnalysisInputError(
            f"the {name} table has a column of the wrong type: {_one_line(exc)}"
        ) from None


def study_data_from_tables(tables: Mapping[str, pa.Table], *, source: str = "database") -> StudyData:
    """StudyData from pyarrow tables in the export schema (study, participants, judgments; responses
    optional). Raises AnalysisInputError for a missing table or column or another schema version."""
    for name in REQUIRED_TABLES:
        if name not in tables:
            raise AnalysisInputError(f"no {name} table: the analyses need {', '.join(REQUIRED_TABLES)}")
    study = _checked("study", tables["study"]).to_pylist()
    if len(study) != 1:
        raise AnalysisInputError(f"the study table has {len(study)} rows, not one")
    version = study[0]["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS:
        raise AnalysisInputError(
            f"the export is of schema {version!r}; these analyses read {' and '.join(READABLE_SCHEMA_VERSIONS)}"
        )
    for key in ("arms", "comparisons"):
        try:
            parsed = json.loads(study[0][key] or "")
        except ValueError:
            raise AnalysisInputError(f"the study table's {key} is not JSON") from None
        if not isinstance(parsed, list):
            raise AnalysisInputError(f"the study table's {key} is not a JSON list")
    responses = tables.get("responses")
    return StudyData(
        study=study[0],
        participants=_frame(_checked("participants", tables["participants"])),
        judgments=_frame(_checked("judgments", tables["judgments"])),
        responses=None if responses is None else _frame(_checked("responses", responses)),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------
# Reading an export folder


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _jsonl_keys(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a line is not a JSON object")
                return list(row)
    return []


def read_export_table(path: Path, table: str) -> pa.Table:
    """The analyses' columns of one exported table file, typed (AnalysisInputError when unreadable)."""
    fmt = path.suffix.lstrip(".")
    schema = _schema(table)
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
        elif fmt == "csv":
            names = _csv_header(path)
        else:
            names = _jsonl_keys(path)
        missing = [c for c in schema.names if c not in names]
        if missing and (names or fmt != "jsonl"):  # an empty JSONL file has no keys to check
            raise AnalysisInputError(
                f"{path.name} has no column {missing[0]!r}: is it an {EXPORT_SCHEMA_VERSION} export?"
            )
        if fmt == "parquet":
            loaded = pq.read_table(path, columns=schema.names)
        elif fmt == "csv":
            loaded = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(
                    column_types=schema,
                    include_columns=schema.names,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        elif path.stat().st_size == 0:
            loaded = schema.empty_table()
        else:
            loaded = pa_json.read_json(
                path,
                read_options=pa_json.ReadOptions(block_size=16 << 20),
                parse_options=pa_json.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="ignore"
                ),
            )
    except AnalysisInputError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise AnalysisInputError(f"cannot read {path.name}: {_one_line(exc)}") from None
    return _checked(table, loaded)


def _table_file(folder: Path, table: str, manifest: dict[str, Any] | None) -> Path | None:
    if manifest is not None:
        entry = manifest.get("tables", {}).get(table)
        if entry is None:
            return None
        path = folder / str(entry.get("file", ""))
        if not path.is_file():
            raise AnalysisInputError(f"{folder}: the manifest lists {path.name}, which is not there")
        return path
    found = [folder / f"{table}.{fmt}" for fmt in FORMATS if (folder / f"{table}.{fmt}").is_file()]
    if len(found) > 1:
        raise AnalysisInputError(
            f"{folder}: {' and '.join(p.name for p in found)} both hold the {table} table; keep one"
        )
    return found[0] if found else None


def load_export(folder: str | Path) -> StudyData:
    """An export folder (annotation.exports.export_study, `manage.py export`, or the export page's
    downloads saved under their table names) as StudyData. The manifest, when there, says which file
    holds each table and must be of this schema version. Raises AnalysisInputError with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisInputError(f"{folder}: no such export folder")
    manifest = None
    if (folder / MANIFEST).is_file():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except ValueError as exc:
            raise AnalysisInputError(f"{folder / MANIFEST}: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(manifest, dict):
            raise AnalysisInputError(f"{folder / MANIFEST}: not a JSON object")
        version = manifest.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise AnalysisInputError(
                f"{folder} is an export of schema {version!r}; these analyses read {' and '.join(READABLE_SCHEMA_VERSIONS)}"
            )
    tables = {}
    for table in TABLES:
        path = _table_file(folder, table, manifest)
        if path is None:
            if table == "study":
                raise AnalysisInputError(f"{folder}: not a study export (no study table)")
            if table in REQUIRED_TABLES:
                raise AnalysisInputError(
                    f"{folder}: no {table} table (an export of a study without participants holds only "
                    "its configuration; export every table to analyse it)"
                )
            continue
        tables[table] = read_export_table(path, table)
    return study_data_from_tables(tables, source=f"export {folder}")
