"""What every export table is read with: the options, the errors, the participants' pseudonyms, what a
study holds (and whether there is anything to export), and the pages of participants the tables walk.

Every per-participant table reads the study's participants, and each kind of row it needs (picks,
ratings, responses), with one query each, ordered by participant id, through server-side cursors that
fetch `chunk_size` rows at a time; participant_pages merges them on the participant id into pages of
about `chunk_size` rows. Memory holds about one page whatever the study's size, and the database does
one pass over each table (as a single query would), not one per page.

Withdrawn participants are left out of every table: their judgments, responses and survey were deleted
when they withdrew (studyapp.services.participant_withdraw), and their row says only that they did (the
study table counts them).
"""

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet
from django.utils import timezone

from modeling.export_schema import TABLES
from studyapp.models import Arm, Participant, Study

State = Participant.State
Row = tuple[Any, ...]

DEFAULT_CHUNK_SIZE = 10_000
# A median A/B rating faster than this cannot have read two responses (the participants table's
# too_fast flag; the threshold is exported with the flag, and `manage.py export --too-fast-ms` changes it).
DEFAULT_TOO_FAST_MS = 2_000

PSEUDONYM_SCHEME = (
    "p- + the first 16 hex digits of HMAC-SHA256(PARTICIPANT_ID_KEY, "
    "'fspo-export-pseudonym:<study id>:' + ('recruitment:' + recruitment id hash, or 'token:' + token))"
)


# What worker.tasks.generate_responses decodes with: it passes only max_new_tokens (the study's), so
# temperature and top_p are modeling.infer.generate_for_episodes' defaults (temperature 0 = greedy).
# tests/annotation/test_exports.py checks these against that signature.
@dataclass(frozen=True)
class WorkerDecoding:
    temperature: float = 0.0
    top_p: float = 1.0


WORKER_DECODING = WorkerDecoding()


class ExportError(ValueError):
    """An export that cannot be made as asked (one-line message for the command line and the pages)."""


class NothingToExport(ExportError):
    """The study has no participant data to export (none yet, or every one withdrew)."""


@dataclass(frozen=True)
class ExportOptions:
    """`chunk_size`: rows read from the database per page (memory is bounded by about this many rows);
    `too_fast_ms`: the participants table's too-fast rule."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    too_fast_ms: int = DEFAULT_TOO_FAST_MS
    exported_at: datetime = field(default_factory=timezone.now)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ExportError(f"chunk size must be at least 1, not {self.chunk_size}")
        if self.too_fast_ms < 0:
            raise ExportError(f"the too-fast threshold must be 0 ms or more, not {self.too_fast_ms}")


def participant_pseudonym(*, study_id: int, token: str, recruitment_id_hash: str | None) -> str:
    """The id a participant has in exports: a keyed hash (HMAC-SHA256 under settings.PARTICIPANT_ID_KEY,
    which never leaves the server) of their recruitment id's stored hash, or of their random token when
    they came without one. Stable (the same recruitment id is always the same participant, with the same
    token), scoped to the study (one person in two studies has two unrelated pseudonyms), and neither the
    token, which names the participant in URLs, nor the recruitment id can be read back from it."""
    subject = f"recruitment:{recruitment_id_hash}" if recruitment_id_hash else f"token:{token}"
    message = f"fspo-export-pseudonym:{study_id}:{subject}".encode()
    digest = hmac.new(settings.PARTICIPANT_ID_KEY.encode(), message, hashlib.sha256).hexdigest()
    return f"p-{digest[:16]}"


# ---------------------------------------------------------------------------------------------------
# What the study holds, and whether there is anything to export


@dataclass(frozen=True)
class ExportSummary:
    """How many participants an export holds and whether the data is final. `participants` counts
    everyone exported (all but the withdrawn); `in_progress` those not finished yet."""

    slug: str
    participants: int
    completed: int
    in_progress: int
    withdrawn: int
    is_open: bool

    @property
    def complete(self) -> bool:
        """Closed, and nobody is in progress: a later export would hold the same rows."""
        return not self.is_open and self.in_progress == 0

    @property
    def warnings(self) -> list[str]:
        notes = []
        if self.in_progress:
            notes.append(
                f"{self.in_progress} participant(s) are still in progress: the export holds what they have "
                "done so far (participant_complete is false on their rows)."
            )
        if self.is_open:
            notes.append("The study is still open: participants who arrive later are not in this export.")
        return notes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete, "warnings": self.warnings}


def export_summary(*, study: Study) -> ExportSummary:
    by_state = dict(
        Participant.objects.filter(study=study).values_list("state").annotate(n=Count("pk")).order_by()
    )
    withdrawn = by_state.pop(State.WITHDRAWN, 0)
    return ExportSummary(
        slug=study.slug,
        participants=sum(by_state.values()),
        completed=by_state.get(State.COMPLETED, 0),
        in_progress=sum(n for s, n in by_state.items() if s not in Participant.FINISHED_STATES),
        withdrawn=withdrawn,
        is_open=study.is_open,
    )


# Tables that describe the study itself: they export even before anyone has taken part.
STUDY_TABLES = ("study", "pool")


def export_check(*, study: Study, tables: Sequence[str]) -> ExportSummary:
    """The study's summary, or NothingToExport when a participant table is asked for and the study has
    no participant data (the study and pool tables alone always export)."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ExportError(f"no export table named {unknown[0]!r} (tables: {', '.join(TABLES)})")
    summary = export_summary(study=study)
    if summary.participants == 0 and any(t not in STUDY_TABLES for t in tables):
        if summary.withdrawn:
            raise NothingToExport(
                f"Study '{study.slug}' has no participant data to export: its {summary.withdrawn} "
                "participant(s) withdrew and their data was deleted."
            )
        raise NothingToExport(f"Study '{study.slug}' has no participants yet: there is nothing to export.")
    return summary


# ---------------------------------------------------------------------------------------------------
# Pages of participants


@dataclass(frozen=True)
class Who:
    """A participant as every row of theirs names them."""

    pk: int
    pseudonym: str
    state: str
    complete: bool
    n_picks: int


@dataclass(frozen=True)
class Member:
    """One exported participant on a page: who they are, the participant `fields` asked for, and their
    rows of each kind (in the order of that kind's query)."""

    who: Who
    fields: dict[str, Any]
    rows: dict[str, list[Row]]


Page = list[Member]

WHO_FIELDS = ("pk", "token", "recruitment_id_hash", "state", "n_picks")


def exported_participants(study: Study) -> QuerySet[Participant]:
    return Participant.objects.filter(study=study).exclude(state=State.WITHDRAWN)


def who_of(study: Study, p: dict[str, Any]) -> Who:
    pseudonym = participant_pseudonym(
        study_id=study.pk, token=p["token"], recruitment_id_hash=p["recruitment_id_hash"]
    )
    return Who(p["pk"], pseudonym, p["state"], p["state"] == State.COMPLETED, p["n_picks"])


def _runs(rows: Iterator[Row]) -> Iterator[tuple[int, list[Row]]]:
    """Consecutive rows with the same first value (a participant id), as (id, rows)."""
    run: list[Row] = []
    for row in rows:
        if run and row[0] != run[0][0]:
            yield run[0][0], run
            run = []
        run.append(row)
    if run:
        yield run[0][0], run


def participant_pages(
    study: Study, *, chunk_size: int, fields: Sequence[str] = (), rows: dict[str, QuerySet[Any]] | None = None
) -> Iterator[Page]:
    """The study's exported participants in id order, each with their rows of every kind in `rows`
    (values_list querysets whose first value is the participant id, ordered by it), in pages of about
    `chunk_size` rows.

    Each query is read once, through a server-side cursor `chunk_size` rows at a time (QuerySet.iterator),
    and the kinds are merged on the participant id as they arrive, so memory holds about one page
    whatever the study's size. Rows of someone not among the exported participants (who withdrew while the
    export ran) are skipped."""
    people = exported_participants(study).order_by("pk").values(*WHO_FIELDS, *fields)
    kinds = {kind: _runs(qs.iterator(chunk_size=chunk_size)) for kind, qs in (rows or {}).items()}
    heads = {kind: next(runs, None) for kind, runs in kinds.items()}
    page: Page = []
    size = 0
    for p in people.iterator(chunk_size=chunk_size):
        mine: dict[str, list[Row]] = {}
        for kind, runs in kinds.items():
            head = heads[kind]
            while head is not None and head[0] < p["pk"]:
                head = next(runs, None)
            if head is not None and head[0] == p["pk"]:
                mine[kind], head = head[1], next(runs, None)
            else:
                mine[kind] = []
            heads[kind] = head
        page.append(Member(who_of(study, p), p, mine))
        size += 1 + sum(map(len, mine.values()))
        if size >= chunk_size:
            yield page
            page, size = [], 0
    if page:
        yield page


@dataclass(frozen=True)
class ArmInfo:
    name: str
    method: str
    checkpoint: str
    uses_picks: bool
    cot: bool


def study_arms(study: Study) -> dict[int, ArmInfo]:
    return {
        arm.pk: ArmInfo(arm.name, arm.method, arm.checkpoint, arm.uses_picks, arm.cot)
        for arm in Arm.objects.filter(study=study)
    }


def comparisons_by_arms(study: Study) -> dict[frozenset[int], tuple[int, int]]:
    """The comparison (arm id, baseline id) each pair of arms belongs to; where two comparisons hold the
    same two arms, the first one (their items cannot be told apart)."""
    found: dict[frozenset[int], tuple[int, int]] = {}
    for arm_id, baseline_id in study.comparisons.order_by("pk").values_list("arm_id", "baseline_id"):
        found.setdefault(frozenset((arm_id, baseline_id)), (arm_id, baseline_id))
    return found
