import inspect
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext

from annotation.exports import (
    EXPORT_SCHEMA_VERSION,
    FORMATS,
    MANIFEST,
    TABLES,
    WORKER_DECODING,
    ExportOptions,
    NothingToExport,
    export_study,
    read_episodes,
    read_table,
    stream_table,
    table_pages,
)
from annotation.models import ElicitationPick, GeneratedResponse, Rating, RatingItem, Side
from annotation.selectors import personalization_request
from modeling.data import Episode, build_prompt
from studyapp.models import Participant, Study
from studyapp.services import participant_withdraw, responses_store, survey_record
from tests.factories import (
    fake_responses,
    make_analyst,
    make_coordinator,
    make_study,
    participant_at_elicitation,
    participant_completed,
    participant_rating,
    participant_waiting,
    pick,
    rate,
)
from tests.support import browser_of, coordinator_browser, run_async

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]
KEY = "export-test-key-5e1f0c0a9d"  # distinctive, so a leak into any file can be searched for
ROW_TABLES = [name for name, spec in TABLES.items() if spec.schema is not None]


@dataclass
class Cast:
    study: Study
    first: Participant  # completed, with a recruitment id and a survey
    careless: Participant  # completed, failed the attention check
    rating: Participant  # still rating (in progress)
    withdrawn: Participant


@pytest.fixture
def cast(settings) -> Cast:
    settings.PARTICIPANT_ID_KEY = KEY
    study = make_study(n_pairs=3, n_eval_questions=2)
    first = participant_completed(
        study,
        recruitment_id="PROLIFIC-AAA111",
        survey={"self_description": "I like short, direct answers.", "age_range": "25-34"},
    )
    careless = participant_completed(study, pass_attention_checks=False)
    rating = participant_rating(study)
    rate(rating, 0, Side.RIGHT, strength=2)
    withdrawn = participant_rating(study)
    rate(withdrawn, 0)
    participant_withdraw(participant=withdrawn)
    return Cast(study, first, careless, rating, withdrawn)


def export(study: Study, tmp_path: Path, fmt: str, **kwargs) -> Path:
    out = tmp_path / fmt
    export_study(study=study, fmt=fmt, out_dir=out, **kwargs)
    return out


def rows(out: Path, table: str, fmt: str) -> list[dict]:
    return read_table(out / f"{table}.{fmt}").to_pylist()


def pseudonym_of(participant: Participant, out: Path) -> str:
    """The participant's pseudonym, found by their arrival time in the participants table."""
    (path,) = out.glob("participants.*")
    by_start = {r["participant"]: r["created_at"] for r in read_table(path).to_pylist()}
    matches = [p for p, created in by_start.items() if created == participant.created_at]
    assert len(matches) == 1
    return matches[0]


# ---------------------------------------------------------------------------------------------------
# Schemas and round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_it_writes_every_table_with_exactly_its_schemas_columns_and_types(
    cast: Cast, tmp_path: Path, fmt: str
) -> None:
    out = export(cast.study, tmp_path, fmt)

    for table in ROW_TABLES:
        schema = TABLES[table].schema
        path = out / f"{table}.{fmt}"
        if fmt == "parquet":
            written = pq.read_schema(path)
            assert [(f.name, f.type) for f in written] == [(f.name, f.type) for f in schema], table
            assert written.metadata[b"fspo_export_schema"] == EXPORT_SCHEMA_VERSION.encode()
        elif fmt == "csv":
            assert path.read_text().splitlines()[0] == ",".join(f'"{n}"' for n in schema.names), table
        else:
            assert all(list(json.loads(line)) == schema.names for line in path.read_text().splitlines()), (
                table
            )
        assert read_table(path).schema.equals(schema), table  # every value parses as its column's type


def test_it_reads_back_the_same_rows_from_every_format(cast: Cast, tmp_path: Path) -> None:
    options = ExportOptions()  # one export time for the three
    outs = {fmt: export(cast.study, tmp_path, fmt, options=options) for fmt in FORMATS}

    for table in ROW_TABLES:
        parquet = rows(outs["parquet"], table, "parquet")
        assert rows(outs["csv"], table, "csv") == parquet, table
        assert rows(outs["jsonl"], table, "jsonl") == parquet, table


def test_it_exports_one_judgment_per_pick_and_rating_with_the_databases_values(
    cast: Cast, tmp_path: Path
) -> None:
    out = export(cast.study, tmp_path, "csv")
    exported = rows(out, "judgments", "csv")
    first = pseudonym_of(cast.first, out)

    picks = ElicitationPick.objects.filter(item__participant__study=cast.study)
    ratings = Rating.objects.filter(item__participant__study=cast.study)
    assert len(exported) == picks.count() + ratings.count()
    by_key = {(r["participant"], r["kind"], r["position"]): r for r in exported}
    for p in picks.filter(item__participant=cast.first).select_related("item__pair__question"):
        row = by_key[first, "pick", p.item.position]
        assert (row["chosen_side"], row["pair_id"], row["a_on_left"]) == (
            p.choice,
            p.item.pair_id,
            p.item.a_on_left,
        )
        assert (row["answered_at"], row["elapsed_ms"]) == (p.answered_at, p.elapsed_ms)
        assert row["question_text"] == p.item.pair.question.text
    for r in ratings.filter(item__participant=cast.first).select_related(
        "item__left__arm", "item__right__arm"
    ):
        row = by_key[first, "rating", r.item.position]
        assert (row["chosen_side"], row["strength"], row["reason"]) == (r.choice, r.strength, r.reason)
        assert (row["is_repeat"], row["is_attention_check"]) == (r.item.is_repeat, r.item.is_attention_check)
        if r.item.is_attention_check:
            assert row["attention_passed"] is True and row["chosen_arm"] is None
            continue
        chosen = r.item.left if r.choice == Side.LEFT else r.item.right
        assert (row["chosen_response_id"], row["chosen_arm"]) == (chosen.pk, chosen.arm.name)
        assert (row["arm"], row["baseline"], row["arm_won"]) == ("fspo", "base", chosen.arm.name == "fspo")
        if r.item.is_repeat:
            assert row["repeat_of_position"] == r.item.repeat_of.position
            assert row["repeat_consistent"] is False  # rate_all picks the left side: sides were swapped


def test_it_summarizes_each_participant_with_timings_survey_and_exclusion_flags(
    cast: Cast, tmp_path: Path
) -> None:
    Rating.objects.filter(item__participant=cast.first).update(elapsed_ms=1500)
    Rating.objects.filter(item__participant=cast.careless).update(elapsed_ms=2500)
    out = export(cast.study, tmp_path, "parquet")
    by_pseudonym = {r["participant"]: r for r in rows(out, "participants", "parquet")}

    first = by_pseudonym[pseudonym_of(cast.first, out)]
    careless = by_pseudonym[pseudonym_of(cast.careless, out)]
    rating = by_pseudonym[pseudonym_of(cast.rating, out)]
    assert len(by_pseudonym) == 3  # the withdrawn participant is not there
    assert (first["state"], first["complete"], first["has_recruitment_id"]) == ("completed", True, True)
    assert (first["self_description"], first["age_range"]) == ("I like short, direct answers.", "25-34")
    assert (first["failed_attention"], careless["failed_attention"]) == (False, True)
    assert (careless["attention_failures"], careless["attention_failures_allowed"]) == (1, 0)
    assert first["repeats_answered"] == 1 and first["repeats_consistent"] == 0
    assert (first["median_rating_ms"], first["too_fast"], first["too_fast_ms"]) == (1500.0, True, 2000)
    assert (careless["too_fast"], rating["too_fast"]) == (False, None)  # no timed rating: no verdict
    assert first["duration_s"] == (cast.first.finished_at - cast.first.consented_at).total_seconds()
    assert (rating["state"], rating["complete"], rating["ratings_done"]) == ("rating", False, 1)
    assert rating["survey_submitted_at"] is None and rating["self_description"] is None


def test_it_exports_each_generated_response_with_its_arm_and_decoding(cast: Cast, tmp_path: Path) -> None:
    out = export(cast.study, tmp_path, "jsonl")
    exported = {r["response_id"]: r for r in rows(out, "responses", "jsonl")}

    stored = GeneratedResponse.objects.filter(participant__study=cast.study).select_related("arm")
    assert set(exported) == set(stored.values_list("pk", flat=True))
    for response in stored:
        row = exported[response.pk]
        assert (row["text"], row["arm"], row["method"]) == (
            response.text,
            response.arm.name,
            response.arm.method,
        )
        assert row["checkpoint"] == response.arm.checkpoint
        assert row["shots"] == (3 if response.arm.uses_picks else 0)
        assert (row["temperature"], row["top_p"], row["max_new_tokens"]) == (
            0.0,
            1.0,
            cast.study.max_new_tokens,
        )


def test_it_states_the_decoding_settings_the_worker_actually_uses() -> None:
    from modeling.infer import generate_for_episodes  # loads torch: only in this test
    from worker.tasks import generate_responses

    defaults = inspect.signature(generate_for_episodes).parameters

    assert defaults["temperature"].default == WORKER_DECODING.temperature
    assert defaults["top_p"].default == WORKER_DECODING.top_p
    # The worker leaves both at their defaults; should it pass them, the export must say so.
    assert not re.search(r"\b(temperature|top_p)\s*=", inspect.getsource(generate_responses))


def test_it_exports_the_study_configuration_and_its_pool(cast: Cast, tmp_path: Path) -> None:
    out = export(cast.study, tmp_path, "parquet")
    (study,) = rows(out, "study", "parquet")
    pool = rows(out, "pool", "parquet")

    assert (study["schema_version"], study["slug"], study["n_pairs"]) == (
        EXPORT_SCHEMA_VERSION,
        cast.study.slug,
        3,
    )
    assert json.loads(study["comparisons"]) == [{"arm": "fspo", "baseline": "base"}]
    assert {a["name"] for a in json.loads(study["arms"])} == {"fspo", "base"}
    assert (study["participants"], study["participants_completed"]) == (3, 2)
    assert (study["participants_in_progress"], study["participants_withdrawn"]) == (1, 1)
    assert study["complete"] is False
    assert (
        sum(r["use"] == "elicitation" for r in pool) == 4 and sum(r["use"] == "evaluation" for r in pool) == 3
    )


# ---------------------------------------------------------------------------------------------------
# Pseudonyms


def every_exported_byte(out: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(out.iterdir()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_it_never_writes_the_key_a_token_or_a_recruitment_id(cast: Cast, tmp_path: Path, fmt: str) -> None:
    out = export(cast.study, tmp_path, fmt, tables=list(TABLES))
    everything = every_exported_byte(out)

    secrets = [KEY, "PROLIFIC-AAA111", cast.first.recruitment_id_hash, cast.study.completion_code]
    secrets += [p.token for p in Participant.objects.filter(study=cast.study)]
    assert [s for s in secrets if s.encode() in everything] == []
    if fmt == "parquet":  # compressed: look in the values too
        values = json.dumps([read_table(p).to_pylist() for p in out.glob("*.parquet")], default=str)
        assert [s for s in secrets if s in values] == []


def test_it_gives_each_participant_a_stable_pseudonym_of_their_own(cast: Cast, tmp_path: Path) -> None:
    once = {r["participant"] for r in rows(export(cast.study, tmp_path / "a", "csv"), "participants", "csv")}
    again = {r["participant"] for r in rows(export(cast.study, tmp_path / "b", "csv"), "participants", "csv")}

    assert once == again and len(once) == 3
    assert all(re.fullmatch(r"p-[0-9a-f]{16}", p) for p in once)


def test_it_gives_the_same_recruitment_id_unrelated_pseudonyms_in_two_studies(
    cast: Cast, tmp_path: Path
) -> None:
    other = make_study(n_pairs=3, n_eval_questions=2)
    participant_completed(other, recruitment_id="PROLIFIC-AAA111")

    here = pseudonym_of(cast.first, export(cast.study, tmp_path / "here", "parquet"))
    there = rows(export(other, tmp_path / "there", "parquet"), "participants", "parquet")[0]["participant"]

    assert here != there


# ---------------------------------------------------------------------------------------------------
# Streaming


def study_with_pickers(n: int) -> Study:
    """A study whose n participants have each made two of their three picks."""
    study = make_study(n_pairs=3, n_eval_questions=2)
    for _ in range(n):
        participant = participant_at_elicitation(study)
        pick(participant, 0)
        pick(participant, 1)
    return study


def test_it_yields_pages_of_about_the_chunk_size() -> None:
    study = study_with_pickers(6)

    pages = list(table_pages(study=study, table="judgments", options=ExportOptions(chunk_size=4)))

    # A page closes once it holds chunk_size rows, counting each participant as one: 2 x (1 + 2 picks).
    assert [len(page) for page in pages] == [4, 4, 4]


def test_it_reads_each_table_once_however_many_rows() -> None:
    small, large = study_with_pickers(2), study_with_pickers(6)

    def queries(study: Study) -> int:
        with CaptureQueriesContext(connection) as captured:
            list(table_pages(study=study, table="judgments", options=ExportOptions(chunk_size=2)))
        return len(captured)

    assert queries(large) == queries(small)  # 3x the rows, the same queries: one pass, not one per page


def test_it_leaves_the_rows_not_read_yet_on_the_server() -> None:
    study = study_with_pickers(6)
    pages = table_pages(study=study, table="judgments", options=ExportOptions(chunk_size=2))

    next(pages)
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_cursors")
        open_cursors = [row[0] for row in cursor.fetchall()]
    pages.close()

    # Mid-export the queries are open server-side cursors (QuerySet.iterator), fetched chunk by chunk.
    assert any(
        'FROM "studyapp_participant"' in sql or "annotation_elicitation" in sql for sql in open_cursors
    )


def test_it_streams_one_chunk_per_page(cast: Cast) -> None:
    chunks = list(
        stream_table(study=cast.study, table="judgments", fmt="jsonl", options=ExportOptions(chunk_size=1))
    )

    assert len(chunks) == 3  # one page per participant: each has more rows than the chunk size
    assert (
        sum(chunk.count(b"\n") for chunk in chunks)
        == Rating.objects.filter(item__participant__study=cast.study).count()
        + ElicitationPick.objects.filter(item__participant__study=cast.study).count()
    )


# ---------------------------------------------------------------------------------------------------
# Episodes: the modeling schema, the worker's prompt


def test_it_exports_rated_pairs_as_episodes_that_give_the_workers_exact_prompt(tmp_path: Path) -> None:
    study = make_study(n_pairs=3, n_eval_questions=2)
    participant = participant_waiting(study)
    worker = personalization_request(participant_id=participant.pk)
    fspo = next(arm for arm in worker.arms if arm.episodes[0].shots)
    worker_prompts = {
        e.meta["question_id"]: build_prompt(e.shots, e.question, instruction=e.instruction)
        for e in fspo.episodes
    }
    responses_store(participant_id=participant.pk, responses=fake_responses(participant))
    participant.refresh_from_db()
    for item in participant.rating_items.order_by("position"):
        rate(participant, item.position, item.expected_choice or Side.RIGHT)
    survey_record(participant=participant, answers={"self_description": "A student of physics."})

    out = export(study, tmp_path, "csv", tables=["episodes"])
    lines = (out / "episodes.jsonl").read_text().splitlines()
    episodes = list(read_episodes(out / "episodes.jsonl"))

    assert [Episode.from_json(json.loads(line)) for line in lines] == episodes
    assert len(episodes) == 2  # the two A/B pairs; the repeat and the attention check are not targets
    for episode in episodes:
        assert (
            build_prompt(episode.shots, episode.question, instruction=episode.instruction)
            == (worker_prompts[episode.meta["question_id"]])
        )
        right = RatingItem.objects.get(
            participant=participant, position=episode.meta["rating_position"]
        ).right
        assert (episode.chosen, episode.meta["chosen_response_id"]) == (right.text, right.pk)
        assert episode.description == "A student of physics."
        assert episode.user_id.startswith("p-") and episode.domain == study.domain


# ---------------------------------------------------------------------------------------------------
# Bad input: empty, running and withdrawn


def test_it_refuses_to_export_a_study_without_participants_with_a_clear_message(tmp_path: Path) -> None:
    study = make_study()

    with pytest.raises(CommandError) as raised:
        call_command("export", study.slug, "--format", "csv", "--out", str(tmp_path / "out"))

    assert raised.value.returncode == 2
    assert str(raised.value) == f"Study '{study.slug}' has no participants yet: there is nothing to export."
    assert not (tmp_path / "out").exists()


def test_it_still_exports_an_empty_studys_configuration(tmp_path: Path) -> None:
    study = make_study()

    export_study(study=study, fmt="csv", out_dir=tmp_path, tables=["study", "pool"])

    assert rows(tmp_path, "study", "csv")[0]["participants"] == 0


def test_it_says_when_every_participant_withdrew(tmp_path: Path) -> None:
    study = make_study()
    participant_withdraw(participant=participant_at_elicitation(study))

    with pytest.raises(NothingToExport, match="1 participant\\(s\\) withdrew and their data was deleted"):
        export_study(study=study, fmt="parquet", out_dir=tmp_path)


def test_it_refuses_an_unknown_study_with_exit_status_2(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="There is no study 'nope'.") as raised:
        call_command("export", "nope", "--out", str(tmp_path))

    assert raised.value.returncode == 2


def test_it_flags_a_running_studys_export_as_partial(cast: Cast, tmp_path: Path) -> None:
    stderr = io.StringIO()

    call_command(
        "export",
        cast.study.slug,
        "--format",
        "parquet",
        "--out",
        str(tmp_path),
        stderr=stderr,
        stdout=io.StringIO(),
    )

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["summary"]["complete"] is False
    assert "1 participant(s) are still in progress" in stderr.getvalue()
    partial = {r["participant_complete"] for r in rows(tmp_path, "judgments", "parquet")}
    assert partial == {True, False}


def test_it_calls_a_closed_study_with_everyone_finished_complete(tmp_path: Path) -> None:
    study = make_study()
    participant_completed(study)
    Study.objects.filter(pk=study.pk).update(is_open=False)

    result = export_study(study=Study.objects.get(pk=study.pk), fmt="jsonl", out_dir=tmp_path)

    assert result.manifest["summary"]["complete"] is True and result.warnings == []
    assert rows(tmp_path, "study", "jsonl")[0]["complete"] is True


def test_it_leaves_a_withdrawn_participant_out_of_every_table(cast: Cast, tmp_path: Path) -> None:
    out = export(cast.study, tmp_path, "parquet")
    withdrawn_at = cast.withdrawn.created_at

    assert not ElicitationPick.objects.filter(
        item__participant=cast.withdrawn
    ).exists()  # deleted on withdrawal
    assert withdrawn_at not in {r["created_at"] for r in rows(out, "participants", "parquet")}
    pseudonyms = {r["participant"] for r in rows(out, "participants", "parquet")}
    for table in ("judgments", "responses"):
        assert {r["participant"] for r in rows(out, table, "parquet")} <= pseudonyms
    assert rows(out, "study", "parquet")[0]["participants_withdrawn"] == 1


# ---------------------------------------------------------------------------------------------------
# Roles and the web


def api(study: Study, table: str = "", fmt: str = "") -> str:
    return f"/api/studies/{study.slug}/export/" + (f"{table}.{fmt}" if table else "")


def test_it_lets_an_analyst_see_and_download_but_not_change_anything(cast: Cast) -> None:
    analyst = coordinator_browser(make_analyst())
    slug = cast.study.slug

    page = analyst.get(f"/studio/studies/{slug}/export/")
    download = analyst.get(api(cast.study, "judgments", "csv"))

    assert page.status_code == 200 and download.status_code == 200
    assert b"".join(download.streaming_content).startswith(b'"participant"')
    assert analyst.get(f"/studio/studies/{slug}/").status_code == 200
    assert analyst.get("/studio/").status_code == 200
    refused = [
        analyst.get("/studio/studies/new/"),
        analyst.post("/studio/studies/new/", {}),
        analyst.get(f"/studio/studies/{slug}/edit/"),
        analyst.post(f"/studio/studies/{slug}/edit/", {}),
        analyst.post("/studio/jobs/new/synth/", {}),
        analyst.post(f"/studio/studies/{slug}/participants/{cast.rating.token}/return/"),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert "analyst account" in refused[0].content.decode()
    assert Participant.objects.get(pk=cast.rating.pk).state == "rating"


def test_it_lets_a_coordinator_download_every_table_in_every_format(cast: Cast) -> None:
    coordinator = coordinator_browser(make_coordinator())

    for name, spec in TABLES.items():
        for fmt in spec.formats:
            response = coordinator.get(api(cast.study, name, fmt))
            assert response.status_code == 200, (name, fmt)
            assert response["Content-Disposition"] == f'attachment; filename="{cast.study.slug}-{name}.{fmt}"'
            assert b"".join(response.streaming_content)


def test_it_never_lets_a_participant_or_a_visitor_reach_an_export(cast: Cast) -> None:
    participant = browser_of(cast.first)
    visitor = Client()

    for client in (participant, visitor):
        page = client.get(f"/studio/studies/{cast.study.slug}/export/")
        assert page.status_code == 302 and page.url.startswith("/studio/login/")
        for path in (api(cast.study), api(cast.study, "judgments", "csv")):
            response = client.get(path)
            assert response.status_code == 401 and "error" in response.json()


def test_it_refuses_a_signed_in_user_without_a_role() -> None:
    study = make_study()
    nobody = coordinator_browser(make_coordinator(is_staff=False))

    assert nobody.get(f"/studio/studies/{study.slug}/export/").status_code == 403
    assert nobody.get(api(study)).status_code == 403


def test_it_serves_scripts_that_send_a_token(cast: Cast, tmp_path: Path) -> None:
    user = make_analyst()
    page = coordinator_browser(user).post(f"/studio/studies/{cast.study.slug}/export/")
    token = re.search(r'id="api-token" type="text" readonly value="([^"]+)"', page.content.decode())[1]
    script = Client(headers={"Authorization": f"Bearer {token}"})

    index = script.get(api(cast.study)).json()
    download = script.get(api(cast.study, "judgments", "parquet"))
    (tmp_path / "judgments.parquet").write_bytes(b"".join(download.streaming_content))

    assert index["schema_version"] == EXPORT_SCHEMA_VERSION and index["complete"] is False
    assert index["tables"]["judgments"]["downloads"]["parquet"].endswith(
        api(cast.study, "judgments", "parquet")
    )
    assert download["X-Export-Complete"] == "false" and "still in progress" in download["X-Export-Warnings"]
    assert (
        read_table(tmp_path / "judgments.parquet").num_rows
        == Rating.objects.filter(item__participant__study=cast.study).count()
        + ElicitationPick.objects.filter(item__participant__study=cast.study).count()
    )
    user.set_password("another-long-password")
    user.save()
    assert script.get(api(cast.study)).status_code == 401  # a new password revokes the token
    assert Client(headers={"Authorization": "Bearer forged"}).get(api(cast.study)).status_code == 401


def test_it_answers_an_empty_studys_download_with_the_reason(cast: Cast) -> None:
    empty = make_study()
    analyst = coordinator_browser(make_analyst())

    response = analyst.get(api(empty, "judgments", "csv"))
    page = analyst.get(f"/studio/studies/{empty.slug}/export/").content.decode()

    assert response.status_code == 409
    assert (
        response.json()["error"]
        == f"Study '{empty.slug}' has no participants yet: there is nothing to export."
    )
    assert 'id="export-empty"' in page and api(empty, "judgments", "csv") not in page
    assert analyst.get(api(empty, "study", "csv")).status_code == 200


def test_it_shows_a_running_studys_warnings_on_the_export_page(cast: Cast) -> None:
    page = coordinator_browser(make_coordinator()).get(f"/studio/studies/{cast.study.slug}/export/")

    text = page.content.decode()
    assert "This study is still running." in text and "1 participant(s) are still in progress" in text


def test_it_answers_unknown_tables_and_formats_with_404(cast: Cast) -> None:
    analyst = coordinator_browser(make_analyst())

    assert analyst.get(api(cast.study, "episodes", "csv")).status_code == 404
    assert analyst.get(api(cast.study, "secrets", "csv")).status_code == 404
    assert analyst.get("/api/studies/nope/export/judgments.csv").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_it_streams_under_asgi_without_reading_the_table_first() -> None:
    study = make_study()
    participant = participant_at_elicitation(study)  # before the last pick, which would enqueue a task
    pick(participant, 0)
    user = make_coordinator()
    wsgi_body = b"".join(coordinator_browser(user).get(api(study, "judgments", "csv")).streaming_content)

    async def scenario() -> tuple[bool, bytes]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(api(study, "judgments", "csv"))
        return response.is_async, b"".join([chunk async for chunk in response.streaming_content])

    is_async, asgi_body = run_async(scenario())

    assert is_async and asgi_body == wsgi_body and wsgi_body.count(b"\n") == 2


# ---------------------------------------------------------------------------------------------------
# The analyst guide documents the schema


def documented_columns() -> dict[str, list[tuple[str, str]]]:
    text = (REPO / "docs" / "analyst-guide.md").read_text()
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if heading := re.match(r"^### `(\w+)`", line):
            current = heading[1]
            tables[current] = []
        elif current and (row := re.match(r"^\| `(\w+)` \| `([^`]+)` \|", line)):
            tables[current].append((row[1], row[2]))
    return tables


def test_it_documents_every_column_of_every_table_in_the_analyst_guide() -> None:
    documented = documented_columns()

    for table in ROW_TABLES:
        assert documented.get(table) == [(f.name, str(f.type)) for f in TABLES[table].schema], table
    assert EXPORT_SCHEMA_VERSION in (REPO / "docs" / "analyst-guide.md").read_text()
