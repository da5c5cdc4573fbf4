"""Study exports for analysts: long-format tables in CSV, JSONL and Parquet, with pseudonymous ids.

- the schema: each table's columns, defined once in modeling.export_schema (pyarrow schemas with
  descriptions, which the analyses read too), and EXPORT_SCHEMA_VERSION; docs/analyst-guide.md documents
  the same columns;
- paging: the options and errors, the pseudonyms, what a study holds and whether an export makes sense
  (an empty study, a running one), and the pages of participants every table is read in (bounded memory);
- rows, episodes: each table's rows, page by page;
- formats: the writers (streamed CSV/JSONL, Parquet by row group), `export_study` (every table into a
  folder with a manifest) and `read_table` / `read_episodes` to load an export back.

Entry points: `manage.py export`, the studio's export page and its JSON API (studyapp.export_views).
"""

from modeling.export_schema import EXPORT_SCHEMA_VERSION, FORMATS, MANIFEST, TABLE_NAMES, TABLES, TableSpec

from .formats import (
    ExportResult,
    export_study,
    file_name,
    read_episodes,
    read_table,
    stream_table,
    table_spec,
    write_table,
)
from .paging import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOO_FAST_MS,
    PSEUDONYM_SCHEME,
    WORKER_DECODING,
    ExportError,
    ExportOptions,
    ExportSummary,
    NothingToExport,
    export_check,
    export_summary,
    participant_pseudonym,
)
from .rows import table_pages

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TOO_FAST_MS",
    "EXPORT_SCHEMA_VERSION",
    "FORMATS",
    "MANIFEST",
    "PSEUDONYM_SCHEME",
    "TABLES",
    "TABLE_NAMES",
    "WORKER_DECODING",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "ExportSummary",
    "NothingToExport",
    "TableSpec",
    "export_check",
    "export_study",
    "export_summary",
    "file_name",
    "participant_pseudonym",
    "read_episodes",
    "read_table",
    "stream_table",
    "table_pages",
    "table_spec",
    "write_table",
]
