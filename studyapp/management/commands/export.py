"""`manage.py export <study> --format csv|jsonl|parquet --out DIR`: a study's tables (annotation.exports)
written into a folder with their manifest. A study that cannot be exported (unknown, no participant data,
a bad option) exits with status 2 and a one-line reason; a running study exports what is recorded so far
and says so."""

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from annotation.exports import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOO_FAST_MS,
    EXPORT_SCHEMA_VERSION,
    FORMATS,
    MANIFEST,
    TABLE_NAMES,
    ExportError,
    ExportOptions,
    export_study,
)
from studyapp.models import Study


class Command(BaseCommand):
    help = (
        "Export a study's data (judgments, participants, responses, study, pool, episodes) as CSV, JSONL or "
        "Parquet into a folder, with a manifest.json (schema version, row counts, warnings). Participants "
        "appear under pseudonyms; episodes are always JSONL (the modeling episode schema)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("study", help="the study's slug")
        parser.add_argument("--format", choices=FORMATS, default="parquet")
        parser.add_argument("--out", type=Path, required=True, help="the folder to write (created if needed)")
        parser.add_argument(
            "--tables", nargs="+", choices=TABLE_NAMES, default=list(TABLE_NAMES), help="default: all"
        )
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=DEFAULT_CHUNK_SIZE,
            help="rows read from the database at a time (bounds memory)",
        )
        parser.add_argument(
            "--too-fast-ms",
            type=int,
            default=DEFAULT_TOO_FAST_MS,
            help="flag participants whose median A/B rating took less than this (participants.too_fast)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        study = Study.objects.filter(slug=options["study"]).first()
        if study is None:
            raise CommandError(f"There is no study '{options['study']}'.", returncode=2)
        try:
            result = export_study(
                study=study,
                fmt=options["format"],
                out_dir=options["out"],
                tables=options["tables"],
                options=ExportOptions(chunk_size=options["chunk_size"], too_fast_ms=options["too_fast_ms"]),
                progress=lambda table, rows: self.stdout.write(f"  {table:<13} {rows:>12,} rows"),
            )
        except ExportError as exc:
            raise CommandError(str(exc), returncode=2) from None
        except OSError as exc:
            raise CommandError(
                f"Cannot write {options['out']}: {exc.strerror or exc}", returncode=2
            ) from None
        for warning in result.warnings:
            self.stderr.write(f"warning: {warning}")
        self.stdout.write(
            f"Exported {study.slug} to {result.out_dir} ({EXPORT_SCHEMA_VERSION}; {MANIFEST} lists the files)."
        )
