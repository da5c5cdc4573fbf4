"""Writing the export tables as CSV, JSONL and Parquet, page by page, and reading them back typed.

CSV and JSONL are produced as a stream of byte chunks (one per page of rows), so a web response or a file
receives them as they are read; Parquet is written one row group per page. Each page is dropped once
written, so memory holds one page whatever the size of the table.

- CSV: a header row; strings are always quoted, so an empty string ("") and a missing value (nothing)
  differ; timestamps as `2025-01-31 12:00:00.000000Z`; booleans `true`/`false`.
- JSONL: one JSON object per line; timestamps as ISO 8601 (`2025-01-31T12:00:00.000000Z`); missing is null.
- Parquet: the schema itself, with each column's description and the schema version in its metadata.
- Episodes are JSONL only: the modeling episode schema (modeling.data.Episode.to_json).
"""

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from modeling.data import Episode, dumps_episodes
from modeling.export_schema import EXPORT_SCHEMA_VERSION, FORMATS, MANIFEST, TABLES, TableSpec
from studyapp.models import Study

from .paging import PSEUDONYM_SCHEME, ExportError, ExportOptions, ExportSummary, export_check
from .rows import table_pages


def table_spec(table: str, fmt: str) -> TableSpec:
    """The table, after checking that it exists and is written in `fmt` (ExportError otherwise)."""
    spec = TABLES.get(table)
    if spec is None:
        raise ExportError(f"no export table named {table!r} (tables: {', '.join(TABLES)})")
    if fmt not in spec.formats:
        raise ExportError(f"the {table} table is exported as {' or '.join(spec.formats)}, not {fmt}")
    return spec


def file_name(table: str, fmt: str) -> str:
    """The table's file name in `fmt` (episodes are always JSONL)."""
    return f"{table}.{fmt if fmt in TABLES[table].formats else TABLES[table].formats[0]}"


def _batch(schema: pa.Schema, rows: Sequence[tuple[Any, ...]]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    arrays = [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _csv_chunks(schema: pa.Schema, pages: Iterable[Sequence[tuple[Any, ...]]]) -> Iterator[bytes]:
    sink = io.BytesIO()
    writer = pa_csv.CSVWriter(sink, schema)
    for rows in pages:
        writer.write_batch(_batch(schema, rows))
        yield sink.getvalue()
        sink.seek(0)
        sink.truncate()
    writer.close()
    if tail := sink.getvalue():  # the header of a table without rows
        yield tail


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def _jsonl_chunks(schema: pa.Schema, pages: Iterable[Sequence[tuple[Any, ...]]]) -> Iterator[bytes]:
    names = schema.names
    for rows in pages:
        lines = [
            json.dumps(dict(zip(names, map(_json_value, row), strict=True)), ensure_ascii=False)
            for row in rows
        ]
        if lines:
            yield ("\n".join(lines) + "\n").encode()


def _episode_chunks(pages: Iterable[Sequence[Episode]]) -> Iterator[bytes]:
    for episodes in pages:
        yield dumps_episodes(episodes).encode()


def _chunks(spec: TableSpec, fmt: str, pages: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    if spec.schema is None:
        return _episode_chunks(pages)
    return (_csv_chunks if fmt == "csv" else _jsonl_chunks)(spec.schema, pages)


def stream_table(
    *, study: Study, table: str, fmt: str, options: ExportOptions | None = None
) -> Iterator[bytes]:
    """A CSV or JSONL table as byte chunks, read from the database as they are asked for."""
    spec = table_spec(table, fmt)
    if fmt == "parquet":
        raise ExportError("Parquet is not a stream: write it to a file with write_table")
    return _chunks(spec, fmt, table_pages(study=study, table=table, options=options))


@dataclass
class _Counted:
    """Counts the rows of the pages that pass through it."""

    pages: Iterable[Sequence[Any]]
    rows: int = 0

    def __iter__(self) -> Iterator[Sequence[Any]]:
        for page in self.pages:
            self.rows += len(page)
            yield page


def write_table(
    *, study: Study, table: str, fmt: str, path: Path, options: ExportOptions | None = None
) -> int:
    """Write one table to `path` in `fmt`; returns its row count. The file appears only once complete (it
    is written beside it as `<name>.partial` first), so a failed export never leaves a truncated table."""
    spec = table_spec(table, fmt)
    partial = path.with_name(path.name + ".partial")
    pages = _Counted(table_pages(study=study, table=table, options=options))
    try:
        if fmt == "parquet":
            assert spec.schema is not None
            with pq.ParquetWriter(partial, spec.schema, compression="zstd") as writer:
                for rows in pages:
                    writer.write_batch(_batch(spec.schema, rows))
        else:
            with partial.open("wb") as out:
                for chunk in _chunks(spec, fmt, pages):
                    out.write(chunk)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return pages.rows


@dataclass
class ExportResult:
    """What `export_study` wrote: the manifest it saved beside the tables."""

    out_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return list(self.manifest["summary"]["warnings"])


def export_study(
    *,
    study: Study,
    fmt: str,
    out_dir: Path,
    tables: Sequence[str] | None = None,
    options: ExportOptions | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> ExportResult:
    """Export the study's tables (all of them by default) in `fmt` into `out_dir`, then `manifest.json`:
    the schema version, the study, each table's file, row count and column types, and the summary
    (counts, whether the data is final, warnings). Raises ExportError (NothingToExport for a study
    without participant data) before writing anything."""
    options = options or ExportOptions()
    tables = list(tables or TABLES)
    if fmt not in FORMATS:
        raise ExportError(f"no export format {fmt!r} (formats: {', '.join(FORMATS)})")
    summary: ExportSummary = export_check(study=study, tables=tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for table in tables:
        name = file_name(table, fmt)
        rows = write_table(
            study=study, table=table, fmt=Path(name).suffix[1:], path=out_dir / name, options=options
        )
        schema = TABLES[table].schema
        written[table] = {
            "file": name,
            "rows": rows,
            "columns": {f.name: str(f.type) for f in schema} if schema is not None else "modeling episode",
        }
        if progress is not None:
            progress(table, rows)
    manifest: dict[str, Any] = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "study": study.slug,
        "exported_at": _json_value(options.exported_at),
        "format": fmt,
        "too_fast_ms": options.too_fast_ms,
        "pseudonym_scheme": PSEUDONYM_SCHEME,
        "summary": summary.to_json(),
        "tables": written,
    }
    if study.is_imported:  # the source's attribution travels with its data
        manifest["imported_from"] = study.instructions_text
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(out_dir, manifest)


def read_table(path: str | Path, table: str | None = None) -> pa.Table:
    """An exported table read back with its schema's types, whatever its format (the table is named by
    the file name unless given): what analyses should use to load CSV and JSONL exactly."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    spec = table_spec(table or path.name.split(".")[0], fmt)
    schema = spec.schema
    if schema is None:
        raise ExportError("episodes are modeling episodes: read them with read_episodes")
    if fmt == "parquet":
        return pq.read_table(path, schema=schema)
    if fmt == "csv":
        loaded = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False
            ),
        )
    else:
        loaded = pa_json.read_json(
            path,
            read_options=pa_json.ReadOptions(block_size=16 << 20),
            parse_options=pa_json.ParseOptions(explicit_schema=schema),
        )
    return loaded.select(schema.names).cast(schema)


def read_episodes(path: str | Path) -> Iterator[Episode]:
    """The episodes of an episodes.jsonl export, checked by the modeling schema (EpisodeError)."""
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield Episode.from_json(json.loads(line))
