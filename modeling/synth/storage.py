"""On-disk format of a synthetic preference dataset (documented in docs/data-format.md).

A dataset is a directory:

    users.parquet        one row per user (persona, attributes, preferences, split)
    questions.parquet    one row per question (text, topic, split)
    responses.parquet    one row per candidate response (question_id, text, trait values)
    preferences.parquet  one row per labeled pair (user_id, question_id, chosen_id, rejected_id, ...)
    dataset.json         the manifest, written last: format version, config, counts, quality

It is written into ``<dir>.partial`` and renamed into place only when complete, so a directory
with a ``dataset.json`` is always a complete dataset, and an interrupted run leaves nothing that
looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "fspo-synth"
FORMAT_VERSION = 1
TABLES = ("users", "questions", "responses", "preferences")
MANIFEST = "dataset.json"


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete, corrupt or of another format (one-line message)."""


def users_schema(attributes: list[str], traits: list[str], *, structures: bool = False) -> pa.Schema:
    """The users table's columns; ``structures``: a dataset made with a structure mix also has each
    user's ``structure``, ``flip_rate`` and ``second_<trait>`` (see docs/data-format.md)."""
    fields = [
        pa.field("user_id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("description", pa.string()),
        pa.field("description_initial", pa.string()),
        pa.field("refinement_rounds", pa.int8()),
    ]
    fields += [pa.field(f"attr_{a}", pa.string()) for a in attributes]
    for t in traits:
        fields += [
            pa.field(f"pref_{t}", pa.string()),
            pa.field(f"weight_{t}", pa.float32()),
            pa.field(f"stated_{t}", pa.bool_()),
            pa.field(f"stated_initial_{t}", pa.bool_()),
        ]
    if structures:
        fields += [pa.field("structure", pa.string()), pa.field("flip_rate", pa.float32())]
        fields += [pa.field(f"second_{t}", pa.string()) for t in traits]
    return pa.schema(fields)


QUESTIONS_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("topic", pa.string()),
        pa.field("text", pa.string()),
    ]
)


def responses_schema(traits: list[str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("response_id", pa.int32()),
            pa.field("question_id", pa.int32()),
            pa.field("source", pa.string()),
            pa.field("text", pa.string()),
            *[pa.field(f"trait_{t}", pa.string()) for t in traits],
        ]
    )


PREFERENCES_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("question_id", pa.int32()),
        pa.field("chosen_id", pa.int32()),
        pa.field("rejected_id", pa.int32()),
        pa.field("user_split", pa.string()),
        pa.field("question_split", pa.string()),
        pa.field(
            "margin", pa.float32()
        ),  # oracle utility(chosen) - utility(rejected) for the final persona; NaN from an LLM judge
        pa.field("repeat_agree", pa.bool_()),  # asked again, the judge gave the same answer
        pa.field("round", pa.int8()),  # refinement round in which the pair was labeled
    ]
)


class DatasetWriter:
    """Streams tables into ``<out>.partial`` and publishes the directory on ``close(manifest)``."""

    def __init__(self, out_dir: Path, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise DatasetError(f"{self.out_dir} already exists (pass --overwrite to replace it)")
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = dict.fromkeys(TABLES, 0)

    def write(self, table: str, batch: pa.Table) -> None:
        if table not in self._writers:
            self._writers[table] = pq.ParquetWriter(
                self.tmp_dir / f"{table}.parquet", batch.schema, compression="zstd"
            )
        self._writers[table].write_table(batch)
        # Tables beyond TABLES (an import's judges, say) are counted in the manifest too.
        self.rows[table] = self.rows.get(table, 0) + batch.num_rows

    def close(self, manifest: dict[str, Any]) -> Path:
        for w in self._writers.values():
            w.close()
        missing = [t for t in TABLES if t not in self._writers]
        if missing:
            raise DatasetError(
                f"refusing to publish {self.out_dir}: tables never written: {', '.join(missing)}"
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "counts": dict(self.rows),
            "complete": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (self.tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(Exception):  # best effort while unwinding another error
                w.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


@dataclass
class Dataset:
    """A complete dataset on disk: its manifest, and its tables read lazily."""

    path: Path
    manifest: dict[str, Any]

    @property
    def domain(self) -> str:
        return self.manifest["domain"]

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.path / f"{name}.parquet"
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(
                f"{path}: cannot read ({_one_line(e)}); the file is truncated or corrupt"
            ) from None

    def iter_batches(
        self, name: str, batch_size: int = 65536, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        path = self.path / f"{name}.parquet"
        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(
                f"{path}: cannot read ({_one_line(e)}); the file is truncated or corrupt"
            ) from None


def load_dataset(path: str | Path) -> Dataset:
    """Open a dataset directory, checking it is complete, of this format and version, and readable."""
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        hint = " (an interrupted run left it incomplete)" if partial.exists() else ""
        raise DatasetError(f"{path}: no such dataset directory{hint}")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DatasetError(f"{path}: not a complete dataset (no {MANIFEST}; was the run interrupted?)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format version {manifest.get('format_version')} is not supported (this code reads {FORMAT_VERSION})"
        )
    if not manifest.get("complete"):
        raise DatasetError(f"{path}: the manifest does not mark the dataset complete")
    for t in TABLES:
        p = path / f"{t}.parquet"
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except FileNotFoundError:
            raise DatasetError(f"{path}: missing {t}.parquet") from None
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(
                f"{p}: cannot read ({_one_line(e)}); the file is truncated or corrupt"
            ) from None
        want = manifest.get("counts", {}).get(t)
        if want is not None and rows != want:
            raise DatasetError(f"{p}: has {rows} rows but the manifest says {want}")
    return Dataset(path=path, manifest=manifest)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
