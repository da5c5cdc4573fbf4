"""Exporting a large study's judgments: the streaming exporter against the naive path, same run.

    ./run bench export                                  # 1,000,000 judgments, csv jsonl parquet
    ./run bench export --judgments 100000 --formats parquet
    ./run bench export --database-url postgres://postgres@127.0.0.1:5432/fspo_bench_export --rebuild

The study is built once in a PostgreSQL database of its own (created if missing; reused while it holds a
study of the asked size, --rebuild starts again) with COPY: completed participants with 9 picks and 14
A/B ratings each (11 pairs of an FSPO arm against a baseline, 2 consistency repeats, 1 attention check),
their 22 generated responses and a survey, like the paper's study.

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:
- stream: annotation.exports.write_table, as `manage.py export` runs it (server-side cursors read
  --chunk-size rows at a time, merged into pages that are written and dropped);
- naive: the same rows built by the same code from one query per kind of row held in a list
  (list(queryset)), then pandas.DataFrame(...).to_parquet / to_csv / to_json(lines=True).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/fspo_bench_export"
PICKS, QUESTIONS, REPEATS = 9, 11, (2, 5)  # repeats: the originals shown again
RATINGS = QUESTIONS + len(REPEATS) + 1  # + one attention check
JUDGMENTS_PER_PARTICIPANT = PICKS + RATINGS
POOL_PAIRS, POOL_QUESTIONS = 30, 40
FILLER = (
    " It weighs the options, gives one concrete example and ends with a short recommendation that the "
    "reader can act on today."
)


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studyapp.settings")
    import django

    django.setup()


def ensure_database(database_url: str, *, rebuild: bool) -> None:
    import psycopg
    from psycopg import sql

    base, name = database_url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and rebuild:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            exists = None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------------
# Building the study with COPY


def _copy(model: Any, rows: Iterator[dict[str, Any]]) -> int:
    """COPY rows (dicts by field attname; other fields take their defaults) into the model's table."""
    from django.db import connection

    fields = model._meta.concrete_fields
    defaults = {f.attname: f.get_default() for f in fields}
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    n = 0
    with connection.cursor() as cursor:
        copy_sql = f"COPY {connection.ops.quote_name(model._meta.db_table)} ({columns}) FROM STDIN"
        with cursor.cursor.copy(copy_sql) as copy:
            for row in rows:
                values = {**defaults, **row}
                copy.write_row([values[f.attname] for f in fields])
                n += 1
    return n


@dataclass(frozen=True)
class BenchStudy:
    """What the copied rows point at: the study, its pool's pair and evaluation question ids, its two
    arms, and the clock every participant's timestamps are read from (one participant every 40 s)."""

    study_id: int
    participants: int
    pairs: list[int]
    questions: list[int]
    arms: tuple[Any, Any]  # fspo, base
    start: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def when(self, i: int, seconds: float) -> datetime:
        return self.start + timedelta(seconds=i * 40 + seconds)


def build_study(slug: str, participants: int) -> None:
    """The study, its pool and arms through the ORM, then its participants' rows with COPY."""
    from django.core.management.color import no_style
    from django.db import connection, transaction

    from annotation.models import (
        ElicitationItem,
        ElicitationPick,
        GeneratedResponse,
        Rating,
        RatingItem,
        SurveyResponse,
    )
    from studyapp.models import Participant

    rng = random.Random(0)
    with transaction.atomic():
        s = _create_study(slug, participants)
        _copy(Participant, _people(s))
        _copy(ElicitationItem, (item for item, _ in _picks(s, rng)))
        rng.seed(0)  # the same draws again, so each pick matches its item
        _copy(ElicitationPick, (pick for _, pick in _picks(s, rng)))
        _copy(GeneratedResponse, _responses(s))
        rng.seed(1)
        # Originals before repeats: a repeat's repeat_of points at an item already copied.
        _copy(RatingItem, (item for item, _ in _ratings(s, rng)))
        rng.seed(1)
        _copy(Rating, (rating for _, rating in _ratings(s, rng)))
        _copy(SurveyResponse, _surveys(s))
        models = [
            Participant,
            ElicitationItem,
            ElicitationPick,
            GeneratedResponse,
            RatingItem,
            Rating,
            SurveyResponse,
        ]
        with connection.cursor() as cursor:
            for statement in connection.ops.sequence_reset_sql(no_style(), models):
                cursor.execute(statement)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def _create_study(slug: str, participants: int) -> BenchStudy:
    from annotation.models import CandidatePair, Question
    from studyapp.models import Arm, Comparison, Study

    study = Study.objects.create(
        slug=slug,
        title=f"Export benchmark ({participants:,} participants)",
        domain="elix",
        instruction="Explain the answer at the level this user prefers.",
        n_pairs=PICKS,
        n_eval_questions=QUESTIONS,
        consistency_repeats=len(REPEATS),
        attention_checks=1,
        quota=participants,
        consent_text="You agree to take part.",
        completion_code="BENCH",
    )
    pairs = []
    for k in range(POOL_PAIRS):
        q = Question.objects.create(study=study, use="elicitation", text=f"Elicitation question {k}?")
        pairs.append(
            CandidatePair.objects.create(
                question=q,
                response_a=f"A short answer {k}." + FILLER,
                response_b=f"A long answer {k}." + FILLER,
            ).pk
        )
    questions = [
        Question.objects.create(study=study, use="evaluation", text=f"Evaluation question {k}?").pk
        for k in range(POOL_QUESTIONS)
    ]
    fspo = Arm.objects.create(study=study, name="fspo", method="fspo", checkpoint="/models/fspo")
    base = Arm.objects.create(study=study, name="base", method="no_context", checkpoint="/models/base")
    Comparison.objects.create(study=study, arm=fspo, baseline=base)
    return BenchStudy(study.pk, participants, pairs, questions, (fspo, base))


def _people(s: BenchStudy) -> Iterator[dict[str, Any]]:
    for i in range(s.participants):
        yield {
            "id": i + 1,
            "study_id": s.study_id,
            "token": secrets.token_hex(16),
            "recruitment_id_hash": hashlib.sha256(f"PID{i}".encode()).hexdigest(),
            "state": "completed",
            "n_picks": PICKS,
            "picks_done": PICKS,
            "n_ratings": RATINGS,
            "ratings_done": RATINGS,
            "generation": "ready",
            "created_at": s.when(i, 0),
            "consented_at": s.when(i, 5),
            "finished_at": s.when(i, 600),
            "updated_at": s.when(i, 600),
        }


def _picks(s: BenchStudy, rng: random.Random) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each elicitation item with its pick."""
    for i in range(s.participants):
        for k in range(PICKS):
            item = i * PICKS + k + 1
            yield (
                {
                    "id": item,
                    "participant_id": i + 1,
                    "pair_id": s.pairs[(i * 7 + k) % POOL_PAIRS],
                    "position": k,
                    "a_on_left": rng.random() < 0.5,
                    "shown_at": s.when(i, 10 + 8 * k),
                },
                {
                    "id": item,
                    "item_id": item,
                    "choice": rng.choice(("left", "right")),
                    "answered_at": s.when(i, 16 + 8 * k),
                    "elapsed_ms": rng.randint(2000, 9000),
                },
            )


def _responses(s: BenchStudy) -> Iterator[dict[str, Any]]:
    for i in range(s.participants):
        for a, arm in enumerate(s.arms):
            for q in range(QUESTIONS):
                yield {
                    "id": (i * 2 + a) * QUESTIONS + q + 1,
                    "participant_id": i + 1,
                    "arm_id": arm.pk,
                    "question_id": s.questions[(i + q) % POOL_QUESTIONS],
                    "text": f"{arm.name} answers question {q} for participant {i}." + FILLER,
                    "prompt_tokens": 1200,
                    "new_tokens": 48,
                    "finish_reason": "stop",
                    "created_at": s.when(i, 90),
                }


def _ratings(s: BenchStudy, rng: random.Random) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each A/B item with its rating: the pairs, then the repeats, then the attention check."""
    for i in range(s.participants):
        first_item = i * RATINGS + 1
        sides: dict[int, tuple[int, int]] = {}
        for position in range(RATINGS):
            item = _rating_item(s, i, position, sides, rng)
            choice = "left" if item.get("is_attention_check") else rng.choice(("left", "right"))
            yield (
                item,
                {
                    "id": first_item + position,
                    "item_id": first_item + position,
                    "choice": choice,
                    "strength": rng.randint(1, 5),
                    "reason": "Clearer for me." if rng.random() < 0.3 else "",
                    "answered_at": s.when(i, 115 + 20 * position),
                    "elapsed_ms": rng.randint(3000, 20000),
                },
            )


def _rating_item(
    s: BenchStudy, i: int, position: int, sides: dict[int, tuple[int, int]], rng: random.Random
) -> dict[str, Any]:
    """Participant i's A/B item at `position`; `sides` keeps each pair's (left, right) for its repeat."""
    first_item = i * RATINGS + 1
    fspo_first, base_first = i * 2 * QUESTIONS + 1, (i * 2 + 1) * QUESTIONS + 1  # response ids
    item: dict[str, Any] = {
        "id": first_item + position,
        "participant_id": i + 1,
        "position": position,
        "shown_at": s.when(i, 100 + 20 * position),
    }
    if position < QUESTIONS:
        q = position
        pair = (fspo_first + q, base_first + q)
        left, right = pair if rng.random() < 0.5 else pair[::-1]
        sides[position] = (left, right)
        item.update(question_id=s.questions[(i + q) % POOL_QUESTIONS], left_id=left, right_id=right)
    elif position < QUESTIONS + len(REPEATS):
        original = REPEATS[position - QUESTIONS]
        left, right = sides[original]
        item.update(
            question_id=s.questions[(i + original) % POOL_QUESTIONS],
            left_id=right,
            right_id=left,
            is_repeat=True,
            repeat_of_id=first_item + original,
        )
    else:
        item.update(is_attention_check=True, expected_choice="left")
    return item


def _surveys(s: BenchStudy) -> Iterator[dict[str, Any]]:
    for i in range(s.participants):
        yield {
            "id": i + 1,
            "participant_id": i + 1,
            "self_description": "I study biology and like worked examples.",
            "age_range": "25-34",
            "education": "bachelor",
            "submitted_at": s.when(i, 600),
        }


def ensure_study(judgments: int, *, rebuild: bool) -> tuple[str, int]:
    from django.core.management import call_command

    from annotation.models import ElicitationPick, Rating
    from studyapp.models import Study

    participants = -(-judgments // JUDGMENTS_PER_PARTICIPANT)
    slug = f"bench-export-{participants}"
    call_command("migrate", verbosity=0)
    study = Study.objects.filter(slug=slug).first()
    if study is None or Study.objects.count() != 1 or rebuild:
        if Study.objects.exists():
            raise SystemExit(
                "the benchmark database holds another study: run again with --rebuild (it drops the database)"
            )
        t0 = time.perf_counter()
        build_study(slug, participants)
        print(f"built {slug} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    n = ElicitationPick.objects.filter(item__participant__study__slug=slug).count()
    n += Rating.objects.filter(item__participant__study__slug=slug).count()
    return slug, n


# ---------------------------------------------------------------------------------------------------
# One measurement (in its own process)


def naive(study: Any, fmt: str, path: Path) -> int:
    """list(queryset) of every pick and rating, the exporter's own row code, then pandas."""
    import pandas as pd

    from annotation.exports import TABLES
    from annotation.exports.paging import WHO_FIELDS, comparisons_by_arms, study_arms, who_of
    from annotation.exports.rows import PICK_FIELDS, RATING_FIELDS, _pick_row, _rating_row
    from annotation.models import ElicitationPick, Rating
    from studyapp.models import Participant

    arms, comparison_of = study_arms(study), comparisons_by_arms(study)
    who = {
        p["pk"]: who_of(study, p)
        for p in Participant.objects.filter(study=study).exclude(state="withdrawn").values(*WHO_FIELDS)
    }
    picks = list(
        ElicitationPick.objects.filter(item__participant__study=study)
        .order_by("item__participant_id", "item__position")
        .values_list(*PICK_FIELDS)
    )
    ratings = list(
        Rating.objects.filter(item__participant__study=study)
        .order_by("item__participant_id", "item__position")
        .values_list(*RATING_FIELDS)
    )
    rows = [_pick_row(who[r[0]], r) for r in picks]
    rows += [_rating_row(who[r[0]], r, arms, comparison_of) for r in ratings]
    frame = pd.DataFrame.from_records(rows, columns=TABLES["judgments"].schema.names)
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, date_format="iso")
    return len(frame)


def one(kind: str, fmt: str, slug: str, chunk_size: int) -> dict[str, Any]:
    import pandas  # noqa: F401 - imports are not part of the measurement
    import pyarrow.parquet  # noqa: F401

    from annotation.exports import ExportOptions, write_table
    from studyapp.models import Study

    study = Study.objects.get(slug=slug)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        path = Path(tmp) / f"judgments.{fmt}"
        t0 = time.perf_counter()
        if kind == "stream":
            rows = write_table(
                study=study,
                table="judgments",
                fmt=fmt,
                path=path,
                options=ExportOptions(chunk_size=chunk_size),
            )
        else:
            rows = naive(study, fmt, path)
        seconds = time.perf_counter() - t0
        size = path.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "kind": kind,
        "format": fmt,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mb": peak / 1024,
        "rss_before_mb": base_rss / 1024,
        "bytes": size,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--judgments", type=int, default=1_000_000)
    p.add_argument(
        "--formats", nargs="+", choices=("csv", "jsonl", "parquet"), default=["csv", "jsonl", "parquet"]
    )
    p.add_argument("--chunk-size", type=int, default=10_000)
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    p.add_argument("--rebuild", action="store_true", help="drop the benchmark database and build it again")
    p.add_argument("--one", nargs=3, metavar=("KIND", "FORMAT", "SLUG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        setup_django(args.database_url)
        print(json.dumps(one(*args.one, args.chunk_size)))
        return 0
    ensure_database(args.database_url, rebuild=args.rebuild)
    setup_django(args.database_url)
    slug, judgments = ensure_study(args.judgments, rebuild=args.rebuild)
    print(f"{slug}: {judgments:,} judgments", file=sys.stderr)
    results = {}
    for fmt in args.formats:
        for kind in ("stream", "naive"):
            argv = [sys.executable, __file__, "--one", kind, fmt, slug]
            argv += ["--chunk-size", str(args.chunk_size), "--database-url", args.database_url]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {kind} {fmt} run failed (status {proc.returncode})")
            r = results[kind, fmt] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"  {kind:6s} {fmt:7s} {r['rows']:>9,} rows: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:6.0f} MB "
                f"(before {r['rss_before_mb']:.0f} MB), {r['bytes'] / 1e6:.0f} MB written",
                file=sys.stderr,
            )
    print(f"\nExporting {judgments:,} judgments (chunk size {args.chunk_size:,}): streaming vs naive\n")
    print(
        "| format | stream s | naive s | stream peak RSS (MB) | naive peak RSS (MB) | naive / stream peak "
        "| stream above baseline (MB) | naive above baseline (MB) | file (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in args.formats:
        s, v = results["stream", fmt], results["naive", fmt]
        print(
            f"| {fmt} | {s['seconds']:.1f} | {v['seconds']:.1f} | {s['peak_rss_mb']:,.0f} | {v['peak_rss_mb']:,.0f} | "
            f"{v['peak_rss_mb'] / s['peak_rss_mb']:.1f}x | {s['peak_rss_mb'] - s['rss_before_mb']:,.0f} | "
            f"{v['peak_rss_mb'] - v['rss_before_mb']:,.0f} | {s['bytes'] / 1e6:,.0f} |"
        )
    print(f"\n(Baseline: {results['stream', args.formats[0]]['rss_before_mb']:.0f} MB of RSS after imports.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
