import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from annotation.models import CandidatePair, Question
from modeling.synth import generate_dataset
from studyapp.coordinators import COORDINATORS_GROUP
from studyapp.models import Job, Participant, Study
from studyapp.services import (
    STUDY_FIELDS,
    participant_enroll,
    participant_generation_fail,
    participant_mark_returned,
    participant_withdraw,
    personalize_enqueue,
)
from tests.factories import (
    make_coordinator,
    make_job,
    make_study,
    participant_at_elicitation,
    participant_rating,
    participant_waiting,
)
from tests.support import browser_of, coordinator_browser

pytestmark = pytest.mark.django_db

GOOD_CSV = (
    "question,response_a,response_b,kind\n"
    "What is a black hole?,A star that collapsed.,A region where gravity traps light.,elicitation\n"
    "Why is the sky blue?,Air scatters blue light most.,Because of the ocean.,elicitation\n"
    "How do vaccines work?,,,evaluation\n"
)


@pytest.fixture
def coordinator() -> Client:
    return coordinator_browser(make_coordinator())


@pytest.fixture
def data_dir(settings, tmp_path: Path) -> Path:
    settings.STUDIO_DATA_DIR = str(tmp_path)
    return tmp_path


def new_study_form(**overrides: Any) -> dict[str, Any]:
    """What the new-study page posts: a closed study with two arms compared once, and no pool."""
    data: dict[str, Any] = {
        "title": "ELIX pilot",
        "slug": "elix-pilot",
        "domain": "elix",
        "instruction": "Explain the answer at this user's level.",
        "n_pairs": 2,
        "n_eval_questions": 1,
        "consistency_repeats": 0,
        "attention_checks": 1,
        "attention_failures_allowed": 0,
        "max_new_tokens": 64,
        "quota": 20,
        "consent_text": "You agree to take part.",
        "completion_code": "C0MPLETE",
        # A browser posts the blank extra rows too.
        "arms-TOTAL_FORMS": 3,
        "arms-INITIAL_FORMS": 0,
        "arms-0-name": "fspo",
        "arms-0-method": "fspo",
        "arms-0-checkpoint": "/models/fspo",
        "arms-1-name": "base",
        "arms-1-method": "no_context",
        "arms-1-checkpoint": "/models/base",
        "arms-2-name": "",
        "arms-2-method": "",
        "arms-2-checkpoint": "",
        "comparisons-TOTAL_FORMS": 2,
        "comparisons-INITIAL_FORMS": 0,
        "comparisons-0-arm": "fspo",
        "comparisons-0-baseline": "base",
        "comparisons-1-arm": "",
        "comparisons-1-baseline": "",
    }
    return {k: v for k, v in {**data, **overrides}.items() if v is not None}


def edit_study_form(study: Study, **overrides: Any) -> dict[str, Any]:
    """What the edit page posts when nothing is changed."""
    data: dict[str, Any] = {}
    for name in STUDY_FIELDS:
        value = getattr(study, name)
        if isinstance(value, bool):
            if value:
                data[name] = "on"
        else:
            data[name] = value
    arms = list(study.arms.order_by("id"))
    comparisons = list(study.comparisons.order_by("id"))
    data.update({"arms-TOTAL_FORMS": len(arms), "arms-INITIAL_FORMS": len(arms)})
    for i, arm in enumerate(arms):
        data.update(
            {
                f"arms-{i}-name": arm.name,
                f"arms-{i}-method": arm.method,
                f"arms-{i}-checkpoint": arm.checkpoint,
            }
        )
    data.update({"comparisons-TOTAL_FORMS": len(comparisons), "comparisons-INITIAL_FORMS": len(comparisons)})
    for i, c in enumerate(comparisons):
        data.update({f"comparisons-{i}-arm": c.arm.name, f"comparisons-{i}-baseline": c.baseline.name})
    data["pool-replace"] = "on"
    return {k: v for k, v in {**data, **overrides}.items() if v is not None}


def upload(name: str, text: str) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, text.encode(), content_type="text/plain")


def test_the_study_page_groups_every_setting_of_a_study_exactly_once() -> None:
    """The page's sections are the one list of what a coordinator sets (the service takes the same
    fields): a Study field in no section would be neither shown nor saved."""
    bookkeeping = {"id", "created_by", "created_at", "updated_at"}
    settable = {field.name for field in Study._meta.concrete_fields} - bookkeeping

    assert sorted(STUDY_FIELDS) == sorted(settable) and len(set(STUDY_FIELDS)) == len(STUDY_FIELDS)


def test_it_sends_an_anonymous_visitor_to_the_login_page(client: Client) -> None:
    response = client.get("/studio/")

    assert response.status_code == 302
    assert response.url == "/studio/login/?next=/studio/"


def test_it_never_lets_a_participant_session_reach_a_studio_page() -> None:
    study = make_study()
    participant = participant_at_elicitation(study)
    browser = browser_of(participant)

    responses = [
        browser.get(path)
        for path in (
            "/studio/",
            f"/studio/studies/{study.slug}/",
            f"/studio/studies/{study.slug}/dashboard.json",
        )
    ]

    assert [r.status_code for r in responses] == [302, 302, 302]
    assert all(r.url.startswith("/studio/login/") for r in responses)


def test_it_refuses_a_signed_in_user_who_is_not_a_coordinator() -> None:
    browser = coordinator_browser(make_coordinator(is_staff=False))

    response = browser.get("/studio/")

    assert response.status_code == 403


def test_it_lets_a_member_of_the_coordinators_group_in() -> None:
    user = make_coordinator(is_staff=False)
    user.groups.add(Group.objects.create(name=COORDINATORS_GROUP))

    response = coordinator_browser(user).get("/studio/")

    assert response.status_code == 200


def test_it_creates_a_study_with_its_arms_comparison_and_an_uploaded_csv_pool(coordinator: Client) -> None:
    response = coordinator.post(
        "/studio/studies/new/", new_study_form(**{"pool-file": upload("pool.csv", GOOD_CSV)})
    )

    assert response.status_code == 302
    study = Study.objects.get(slug="elix-pilot")
    assert response.url == f"/studio/studies/{study.slug}/"
    assert sorted(study.arms.values_list("name", "method")) == [("base", "no_context"), ("fspo", "fspo")]
    assert [str(c) for c in study.comparisons.all()] == ["fspo vs base"]
    assert CandidatePair.objects.filter(question__study=study).count() == 2
    assert list(Question.objects.filter(study=study, use="evaluation").values_list("text", flat=True)) == [
        "How do vaccines work?"
    ]


def test_it_shows_field_errors_and_creates_nothing_for_an_invalid_study(coordinator: Client) -> None:
    form = new_study_form(title="", slug="not a slug", attention_checks=1, attention_failures_allowed=3)

    response = coordinator.post("/studio/studies/new/", form)

    assert response.status_code == 400
    errors = response.context["editor"].settings.errors
    assert set(errors) == {"title", "slug", "attention_failures_allowed"}
    assert (
        "Cannot allow more failures than there are attention checks (1)."
        in errors["attention_failures_allowed"]
    )
    assert not Study.objects.exists()


def test_it_refuses_to_open_a_study_whose_pool_is_too_small(coordinator: Client) -> None:
    form = new_study_form(is_open="on", **{"pool-file": upload("pool.csv", GOOD_CSV)}, n_pairs=5)

    response = coordinator.post("/studio/studies/new/", form)

    assert response.status_code == 400
    assert (
        "The pool has 2 elicitation pair(s); each participant makes 5 picks."
        in (response.context["editor"].settings.errors["is_open"])
    )
    assert not Study.objects.exists()
    assert not Question.objects.exists()


def test_it_names_the_row_and_field_of_a_bad_csv_row_and_creates_nothing(coordinator: Client) -> None:
    bad = GOOD_CSV + "Is coffee good for you?,Yes.,,elicitation\n"

    response = coordinator.post(
        "/studio/studies/new/", new_study_form(**{"pool-file": upload("pool.csv", bad)})
    )

    assert response.status_code == 400
    assert (
        "Row 5: 'response_b' is empty (an elicitation question needs two responses)."
        in (response.context["editor"].pool.errors["file"])
    )
    assert b"Row 5: &#x27;response_b&#x27; is empty" in response.content
    assert not Study.objects.exists()
    assert not Question.objects.exists()


def test_it_names_the_row_and_field_of_a_bad_jsonl_row_and_changes_nothing(coordinator: Client) -> None:
    study = make_study(title="Before")
    questions_before = list(Question.objects.filter(study=study).values_list("text", flat=True))
    lines = [
        {
            "question": "What is DNA?",
            "response_a": "A molecule.",
            "response_b": "Life's code.",
            "kind": "elicitation",
        },
        {"question": "What is RNA?", "kind": "evaluaton"},
    ]
    jsonl = "\n".join(json.dumps(line) for line in lines) + "\n"
    form = edit_study_form(study, title="After", **{"pool-file": upload("pool.jsonl", jsonl)})

    response = coordinator.post(f"/studio/studies/{study.slug}/edit/", form)

    assert response.status_code == 400
    assert (
        "Row 2: 'kind' must be elicitation or evaluation, not 'evaluaton'."
        in (response.context["editor"].pool.errors["file"])
    )
    study.refresh_from_db()
    assert study.title == "Before"
    assert list(Question.objects.filter(study=study).values_list("text", flat=True)) == questions_before


def test_it_replaces_a_studys_pool_with_an_uploaded_jsonl_file(coordinator: Client) -> None:
    study = make_study(is_open=False)
    lines = [
        {
            "question": "What is DNA?",
            "response_a": "A molecule.",
            "response_b": "Life's code.",
            "kind": "elicitation",
        },
        {"question": "What is RNA?", "response_a": "", "response_b": "", "kind": "evaluation"},
    ]
    jsonl = "".join(json.dumps(line) + "\n" for line in lines)

    response = coordinator.post(
        f"/studio/studies/{study.slug}/edit/",
        edit_study_form(study, **{"pool-file": upload("pool.jsonl", jsonl)}),
    )

    assert response.status_code == 302
    assert sorted(Question.objects.filter(study=study).values_list("use", "text")) == [
        ("elicitation", "What is DNA?"),
        ("evaluation", "What is RNA?"),
    ]


def test_it_takes_the_pool_domain_and_instruction_from_a_synthetic_dataset(
    coordinator: Client, data_dir: Path
) -> None:
    generate_dataset(
        out_dir=data_dir / "datasets" / "reviews-small", domain="reviews", users=10, pairs_per_user=5
    )
    form = new_study_form(
        domain="",
        instruction="",
        **{
            "pool-dataset": "datasets/reviews-small",
            "pool-elicitation_questions": 4,
            "pool-evaluation_questions": 3,
        },
    )

    response = coordinator.post("/studio/studies/new/", form)

    assert response.status_code == 302
    study = Study.objects.get(slug="elix-pilot")
    assert study.domain == "reviews"
    assert study.instruction.startswith("Write a review")
    assert CandidatePair.objects.filter(question__study=study).count() == 4
    assert Question.objects.filter(study=study, use="evaluation").count() == 3


def test_it_refuses_a_dataset_outside_the_data_folder(coordinator: Client, data_dir: Path) -> None:
    response = coordinator.post("/studio/studies/new/", new_study_form(**{"pool-dataset": "/etc"}))

    assert response.status_code == 400
    assert (
        f"The dataset must be inside the data folder {data_dir.resolve()}; /etc is not."
        in (response.context["editor"].pool.errors["dataset"])
    )
    assert not Study.objects.exists()


def test_it_edits_a_studys_settings_and_arms(coordinator: Client) -> None:
    study = make_study()
    form = edit_study_form(study, title="Renamed", quota=99, **{"arms-0-checkpoint": "/models/fspo-v2"})

    response = coordinator.post(f"/studio/studies/{study.slug}/edit/", form)

    assert response.status_code == 302
    study.refresh_from_db()
    assert (study.title, study.quota) == ("Renamed", 99)
    assert study.arms.get(name="fspo").checkpoint == "/models/fspo-v2"


def test_it_refuses_to_remove_an_arm_that_has_written_responses(coordinator: Client) -> None:
    study = make_study()
    participant_rating(study)
    form = edit_study_form(study, title="Renamed", **{"arms-1-DELETE": "on"})

    response = coordinator.post(f"/studio/studies/{study.slug}/edit/", form)

    assert response.status_code == 400
    assert "Arm 'base' has already written responses for participants and cannot be removed." in (
        response.context["editor"].errors
    )
    assert study.arms.filter(name="base").exists()
    study.refresh_from_db()
    assert study.title != "Renamed"


def test_it_refuses_a_job_with_bad_parameters_and_launches_nothing(
    coordinator: Client, data_dir: Path
) -> None:
    response = coordinator.post(
        "/studio/jobs/new/train/",
        {
            "name": "fspo",
            "dataset": "datasets/missing",
            "stage": "sft",
            "context": "fewshot",
            "shots_min": 1,
            "shots_max": 8,
            "steps": 10,
            "batch_size": 2,
            "lr": 0.001,
            "seed": 0,
        },
    )

    assert response.status_code == 400
    (message,) = response.context["form"].errors["dataset"]
    assert "no such dataset directory" in message
    assert not Job.objects.exists()


def test_it_renders_an_evaluation_reports_table_and_serves_its_plot(
    coordinator: Client, tmp_path: Path
) -> None:
    (tmp_path / "report.md").write_text(
        "# FSPO evaluation\n\n| arm | win rate vs base |\n|---|---:|\n| fspo | 71.2% |\n\n![win rates](win_rates.png)\n"
    )
    (tmp_path / "win_rates.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    job = make_job(
        kind=Job.Kind.EVALUATE, status=Job.Status.SUCCEEDED, output_dir=str(tmp_path), result={"table": []}
    )

    page = coordinator.get(f"/studio/jobs/{job.pk}/")
    plot = coordinator.get(f"/studio/jobs/{job.pk}/files/win_rates.png")

    assert page.status_code == 200
    assert b'<td class="num">71.2%</td>' in page.content
    assert f'src="/studio/jobs/{job.pk}/files/win_rates.png"'.encode() in page.content
    assert plot.status_code == 200
    assert plot["Content-Type"] == "image/png"


def test_it_serves_job_files_only_to_coordinators(client: Client, tmp_path: Path) -> None:
    (tmp_path / "win_rates.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    job = make_job(kind=Job.Kind.EVALUATE, status=Job.Status.SUCCEEDED, output_dir=str(tmp_path))

    response = client.get(f"/studio/jobs/{job.pk}/files/win_rates.png")

    assert response.status_code == 302
    assert response.url.startswith("/studio/login/")


def test_it_answers_the_dashboards_polling_with_its_numbers(coordinator: Client) -> None:
    study = make_study()
    participant_at_elicitation(study)

    response = coordinator.get(f"/studio/studies/{study.slug}/dashboard.json")

    assert response.status_code == 200
    assert response.json()["participants"] == 1
    assert {row["step"]: row["count"] for row in response.json()["by_step"]}["elicitation"] == 1


def test_it_has_live_pages_poll_when_the_channel_layer_cannot_carry_the_workers_events(
    coordinator: Client, settings
) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    study = make_study()
    job = make_job(study=study)

    pages = [
        coordinator.get(path).content.decode()
        for path in (f"/studio/studies/{study.slug}/", f"/studio/jobs/{job.pk}/")
    ]

    assert all('data-socket-path=""' in page and "/ws/" not in page for page in pages)


def test_it_renders_every_studio_page_for_a_coordinator(coordinator: Client) -> None:
    study = make_study()
    job = make_job(study=study)
    pages = [
        "/studio/",
        "/studio/studies/new/",
        f"/studio/studies/{study.slug}/",
        f"/studio/studies/{study.slug}/edit/",
        "/studio/jobs/new/synth/",
        "/studio/jobs/new/train/",
        "/studio/jobs/new/evaluate/",
        f"/studio/jobs/{job.pk}/",
        f"/studio/jobs/{job.pk}/status.json",
    ]

    assert {page: coordinator.get(page).status_code for page in pages} == dict.fromkeys(pages, 200)


# ---------------------------------------------------------------------------------------------------
# Participants: marking one returned, retrying a failed generation


def return_url(study: Study, participant: Participant) -> str:
    return f"/studio/studies/{study.slug}/participants/{participant.token}/return/"


def retry_url(study: Study, participant: Participant) -> str:
    return f"/studio/studies/{study.slug}/participants/{participant.token}/retry-generation/"


def csrf_browser(user) -> Client:
    """A signed-in browser that, like a real one, must send the CSRF token its pages carry."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_token_of(client: Client, page: str) -> str:
    response = client.get(page)
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.content.decode())[1]


def failed_generation(study: Study) -> Participant:
    participant = participant_waiting(study)
    participant_generation_fail(participant_id=participant.pk, error="OSError: /models/fspo is not a folder")
    participant.refresh_from_db()
    return participant


def test_it_marks_a_participant_returned_from_the_dashboard() -> None:
    study = make_study()
    participant = participant_at_elicitation(study)
    browser = csrf_browser(make_coordinator())
    token = csrf_token_of(browser, f"/studio/studies/{study.slug}/")

    response = browser.post(return_url(study, participant), {"csrfmiddlewaretoken": token}, follow=True)

    participant.refresh_from_db()
    assert participant.state == Participant.State.RETURNED
    assert response.redirect_chain == [(f"/studio/studies/{study.slug}/#participants", 302)]
    page = response.content.decode()
    assert f"Participant {participant.token[:8]} is marked returned" in page
    assert response.context["dashboard"]["by_state"]["returned"] == 1


def test_it_refuses_a_return_without_the_csrf_token() -> None:
    study = make_study()
    participant = participant_at_elicitation(study)

    response = csrf_browser(make_coordinator()).post(return_url(study, participant))

    participant.refresh_from_db()
    assert response.status_code == 403
    assert participant.state == Participant.State.ELICITATION


def test_it_lets_only_coordinators_mark_a_participant_returned(client: Client) -> None:
    study = make_study()
    participant = participant_at_elicitation(study)

    anonymous = client.post(return_url(study, participant))
    not_a_coordinator = coordinator_browser(make_coordinator(is_staff=False)).post(
        return_url(study, participant)
    )
    the_participant = browser_of(participant).post(return_url(study, participant))

    participant.refresh_from_db()
    assert anonymous.status_code == 302 and anonymous.url.startswith("/studio/login/")
    assert not_a_coordinator.status_code == 403
    assert the_participant.status_code == 302 and the_participant.url.startswith("/studio/login/")
    assert participant.state == Participant.State.ELICITATION


def test_it_answers_404_for_a_participant_of_another_study(coordinator: Client) -> None:
    study, other = make_study(), make_study()
    participant = failed_generation(other)

    responses = [
        coordinator.post(return_url(study, participant)),
        coordinator.post(retry_url(study, participant)),
        coordinator.post(f"/studio/studies/{study.slug}/participants/{'0' * 32}/return/"),
    ]

    participant.refresh_from_db()
    assert [r.status_code for r in responses] == [404, 404, 404]
    assert (participant.state, participant.generation) == (
        Participant.State.WAITING,
        Participant.Generation.FAILED,
    )


def test_it_marks_a_participant_returned_only_by_post(coordinator: Client) -> None:
    study = make_study()
    participant = participant_at_elicitation(study)

    response = coordinator.get(return_url(study, participant))

    participant.refresh_from_db()
    assert response.status_code == 405
    assert participant.state == Participant.State.ELICITATION


def test_it_says_why_a_participant_cannot_be_marked_returned(coordinator: Client) -> None:
    study = make_study()
    participant = participant_withdraw(participant=participant_at_elicitation(study))

    response = coordinator.post(return_url(study, participant), follow=True)

    assert "A participant who is withdrawn cannot be marked returned." in response.content.decode()


def test_it_shows_a_failed_generations_error_with_a_retry_button(coordinator: Client) -> None:
    study = make_study()
    participant = failed_generation(study)

    page = coordinator.get(f"/studio/studies/{study.slug}/").content.decode()

    assert "OSError: /models/fspo is not a folder" in page
    assert f'action="{retry_url(study, participant)}"' in page


def test_it_retries_a_failed_generation_once_for_two_clicks(
    coordinator: Client, django_capture_on_commit_callbacks
) -> None:
    study = make_study()
    participant = failed_generation(study)

    with django_capture_on_commit_callbacks() as first:
        coordinator.post(retry_url(study, participant))
    with django_capture_on_commit_callbacks() as second:
        again = coordinator.post(retry_url(study, participant), follow=True)

    participant.refresh_from_db()
    assert (participant.generation, participant.generation_error) == (Participant.Generation.QUEUED, "")
    assert [c.args for c in first if getattr(c, "func", None) is personalize_enqueue] == [(participant.pk,)]
    assert [c for c in second if getattr(c, "func", None) is personalize_enqueue] == []
    assert "Only a generation that has failed or is stuck can be retried" in again.content.decode()


def test_it_retries_no_generation_that_has_not_failed(
    coordinator: Client, django_capture_on_commit_callbacks
) -> None:
    study = make_study()
    waiting, rating = participant_waiting(study), participant_rating(study)

    with django_capture_on_commit_callbacks() as callbacks:
        for participant in (waiting, rating):
            coordinator.post(retry_url(study, participant))

    assert [c for c in callbacks if getattr(c, "func", None) is personalize_enqueue] == []
    waiting.refresh_from_db()
    rating.refresh_from_db()
    assert (waiting.generation, rating.generation) == (
        Participant.Generation.QUEUED,
        Participant.Generation.READY,
    )


def test_it_lists_the_studys_participants_with_their_state_and_finds_one_by_id(coordinator: Client) -> None:
    study = make_study()
    wanted = participant_enroll(study=study, recruitment_id="5f1a2b", recruitment_session_id="sess-42")
    participant_mark_returned(participant=participant_at_elicitation(study))

    everyone = coordinator.get(f"/studio/studies/{study.slug}/")
    found = coordinator.get(f"/studio/studies/{study.slug}/", {"participant": "5f1a2b"})

    assert everyone.context["participants_total"] == 2
    assert ">returned</span>" in everyone.content.decode()
    assert list(found.context["participants"]) == [wanted]
    assert "sess-42" in found.content.decode()


# ---------------------------------------------------------------------------------------------------
# The study's time limit, and evaluating its arms


def test_it_edits_a_studys_time_limit(coordinator: Client) -> None:
    study = make_study()

    response = coordinator.post(
        f"/studio/studies/{study.slug}/edit/", edit_study_form(study, time_limit_minutes=25)
    )

    study.refresh_from_db()
    assert response.status_code == 302
    assert study.time_limit_minutes == 25


@pytest.mark.parametrize("minutes", [0, 7 * 24 * 60 + 1, "soon"])
def test_it_refuses_a_time_limit_out_of_range(coordinator: Client, minutes: object) -> None:
    study = make_study()

    response = coordinator.post(
        f"/studio/studies/{study.slug}/edit/", edit_study_form(study, time_limit_minutes=minutes)
    )

    study.refresh_from_db()
    assert response.status_code == 400
    assert response.context["editor"].settings.errors["time_limit_minutes"]
    assert study.time_limit_minutes == 60


def test_it_gives_a_new_study_the_default_time_limit(coordinator: Client) -> None:
    response = coordinator.post("/studio/studies/new/", new_study_form())

    assert response.status_code == 302
    assert Study.objects.get(slug="elix-pilot").time_limit_minutes == 60


def test_it_launches_an_evaluation_of_a_studys_arms_from_its_prefilled_form(
    coordinator: Client, data_dir: Path
) -> None:
    generate_dataset(
        out_dir=data_dir / "datasets" / "reviews-small", domain="reviews", users=8, pairs_per_user=4
    )
    for name in ("fspo", "base"):
        (data_dir / "checkpoints" / name).mkdir(parents=True)
    study = make_study(checkpoint=str(data_dir / "checkpoints" / "fspo"))
    study.arms.filter(name="base").update(checkpoint=f"hf:{data_dir}/checkpoints/base")

    dashboard = coordinator.get(f"/studio/studies/{study.slug}/").content.decode()
    form_page = coordinator.get(f"/studio/jobs/new/evaluate/?study={study.pk}")
    prefilled = {name: form_page.context["form"][name].value() for name in form_page.context["form"].fields}
    response = coordinator.post("/studio/jobs/new/evaluate/", prefilled)

    assert f'href="/studio/jobs/new/evaluate/?study={study.pk}">Evaluate these arms</a>' in dashboard
    assert prefilled["arms"] == "fspo=checkpoints/fspo\nbase=checkpoints/base:none"
    assert (prefilled["baseline"], prefilled["dataset"], prefilled["shots"]) == (
        "base",
        "datasets/reviews-small",
        study.n_pairs,
    )
    job = Job.objects.get()
    assert response.status_code == 302 and response.url == f"/studio/jobs/{job.pk}/"
    assert (job.kind, job.study, job.name) == (Job.Kind.EVALUATE, study, f"{study.slug}-arms")
    assert [(arm["name"], arm["context"]) for arm in job.params["arms"]] == [
        ("fspo", "fewshot"),
        ("base", "none"),
    ]
    assert job.params["arms"][1]["model"] == str(data_dir / "checkpoints" / "base")
