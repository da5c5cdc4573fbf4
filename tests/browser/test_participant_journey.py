"""A participant's whole journey in a real browser: Chromium on the live ASGI server, the real Celery
worker writing their responses with a tiny real model, and the waiting page told over its WebSocket.

Every page is saved as a screenshot (tests/browser/output/, copied to docs/screenshots/)."""

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from annotation.models import ElicitationPick, GeneratedResponse, Question, Rating, RatingItem, SurveyResponse
from studyapp.models import Participant, Study
from tests.browser.conftest import LiveServer, Screenshots, queue_paused
from tests.conftest import RunningWorker
from tests.factories import make_study

# The server and the worker are other processes: they see only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_MS = 30_000  # any page or element; generous, for a busy two-core machine
GENERATION_TIMEOUT_MS = 120_000  # the worker's first task loads torch and the model
VIEWPORTS = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "mobile": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True},
}
# Arm names that cannot turn up by chance in a page: neither may ever be shown to a participant.
ARM_NAMES = ("fspo-arm-q7x", "baseline-arm-k2z")

PAIRS = [
    (
        "I have a free Saturday. What should I do?",
        "Go for a long walk somewhere new, then cook a proper dinner.",
        "Here are a few ideas, depending on your mood:\n- Visit a museum or gallery you have not seen yet.\n"
        "- Take a day trip by train to a nearby town.\n- Invite friends over for a board-game afternoon.",
    ),
    (
        "How do I get better at remembering names?",
        "Repeat the name back when you hear it, and use it once more before you say goodbye.",
        "Memory researchers suggest three habits: pay attention at the moment of introduction, link the "
        "name to a vivid image or to someone you know with the same name, and retrieve it a few minutes "
        "later. Spaced retrieval is what moves it into long-term memory.",
    ),
    (
        "Is it worth learning to touch-type?",
        "Yes. A few weeks of practice pays back for the rest of your life.",
        "It depends on how much you type. If you write for more than an hour a day, touch-typing at 60+ "
        "words per minute saves real time and lets you keep your eyes on the text.",
    ),
    (
        "What should I read next?",
        "Pick the book a friend could not stop talking about.",
        "Try something outside your usual shelf: if you read novels, a narrative history such as "
        "'The Guns of August'; if you read non-fiction, a short novel like 'Never Let Me Go'.",
    ),
]
EVALUATION = [
    "What is a good way to start running?",
    "How should I plan a week of meals?",
    "How can I keep a houseplant alive?",
]
N_PICKS = 3  # drawn from the pool of PAIRS
N_EVALUATION = 2  # drawn from EVALUATION


def journey_study(checkpoint: Path) -> Study:
    """A study with readable questions and answers (the screenshots show them) and secret arm names."""
    study = make_study(
        n_pairs=N_PICKS,
        n_eval_questions=N_EVALUATION,
        checkpoint=str(checkpoint),
        title="Which answers suit you?",
        consent_text="This study is run by the FSPO research team. You will compare short answers to "
        "everyday questions; it takes about 10 minutes.\n\nWe store your choices and ratings under a "
        "random id, never your name, IP address or browser. You can withdraw at any time, and your data "
        "is then deleted.",
        max_new_tokens=40,
    )
    questions = Question.objects.filter(study=study, use=Question.Use.ELICITATION).order_by("id")
    for question, (text, a, b) in zip(questions, PAIRS, strict=True):
        question.text = text
        question.save()
        question.candidate_pairs.update(response_a=a, response_b=b)
    questions = Question.objects.filter(study=study, use=Question.Use.EVALUATION).order_by("id")
    for question, text in zip(questions, EVALUATION, strict=True):
        question.text = text
        question.save()
    for arm, name in zip(study.arms.order_by("id"), ARM_NAMES, strict=True):
        arm.name = name
        arm.save()
    return study


@pytest.fixture(params=list(VIEWPORTS))
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def context(chromium: Browser, device: str) -> Iterator[BrowserContext]:
    context = chromium.new_context(**VIEWPORTS[device])
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


def at(page: Page, server: LiveServer, path: str) -> None:
    """Wait until the page is at `path`, whatever its query (the server's redirects have landed)."""
    page.wait_for_url(lambda url: url.split("?", 1)[0] == f"{server.url}{path}")


def focus_by_tab(page: Page, selector: str, *, max_presses: int = 10) -> int:
    """Press Tab until the element matching `selector` has the focus; returns how many presses it took."""
    for presses in range(1, max_presses + 1):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement === document.querySelector(s)", selector):
            return presses
    raise AssertionError(f"{selector} never got the keyboard focus in {max_presses} presses of Tab")


def has_visible_focus(page: Page) -> bool:
    """Whether the focused element draws a focus indicator (an outline or a ring)."""
    return page.evaluate(
        """() => {
            const style = getComputedStyle(document.activeElement);
            return (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0)
                || style.boxShadow !== 'none';
        }"""
    )


def wait_until(page: Page, condition: Callable[[], bool], what: str, timeout_ms: int = TIMEOUT_MS) -> None:
    """Let the browser run until `condition()` holds (for what only Python sees, such as socket frames)."""
    for _ in range(timeout_ms // 50):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting until {what}")


def test_a_participant_goes_from_the_link_to_the_completion_code(
    asgi_server: LiveServer,
    celery_worker: RunningWorker,
    tiny_checkpoint: Path,
    context: BrowserContext,
    device: str,
    screenshots: Screenshots,
) -> None:
    study = journey_study(tiny_checkpoint)
    slug = study.slug
    server_log_start = asgi_server.log_size()
    page = context.new_page()
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(str(payload))))

    entry = f"{asgi_server.url}/s/{slug}/?PROLIFIC_PID=pw-{device}-5f1a&STUDY_ID=st-1&SESSION_ID=se-1"
    page.goto(entry)
    at(page, asgi_server, f"/s/{slug}/consent/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Before you start")
    screenshots.take(page, "consent")
    page.get_by_role("button", name="I agree to take part").click()

    at(page, asgi_server, f"/s/{slug}/instructions/")
    screenshots.take(page, "instructions")
    page.get_by_role("button", name="Start").click()

    # The picks. The first is made with the keyboard alone: Tab to answer B (it shows where the focus
    # is), Enter to choose it.
    n = N_PICKS
    at(page, asgi_server, f"/s/{slug}/pick/1/")
    expect(page.locator(".progress-label")).to_have_text("Step 3 of 6 · Your choices")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Question 1 of {n}")
    screenshots.take(page, "pick")
    focus_by_tab(page, "button[name=choice][value=right]")
    assert has_visible_focus(page)
    screenshots.take(page, "pick-keyboard-focus")
    page.keyboard.press("Enter")
    for number in range(2, n + 1):
        at(page, asgi_server, f"/s/{slug}/pick/{number}/")
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Question {number} of {n}")
        if number < n:
            page.locator("button[name=choice][value=left]").click()

    # The last pick sends `personalize` to the worker, which is held until the waiting page is open and
    # its socket has said hello: the page must then move on by itself when the worker is done.
    with queue_paused(celery_worker, "gpu"):
        page.locator("button[name=choice][value=left]").click()
        at(page, asgi_server, f"/s/{slug}/waiting/")
        expect(page.get_by_role("heading", name="Writing answers for you…")).to_be_visible()
        page.wait_for_function("() => document.readyState === 'complete'")
        wait_until(
            page, lambda: any('"waiting"' in f for f in frames), "the waiting page's socket said hello"
        )
        screenshots.take(page, "waiting")
    page.wait_for_url(f"{asgi_server.url}/s/{slug}/rate/1/", timeout=GENERATION_TIMEOUT_MS)
    # Told over the socket (the event may reach us just after the reload it caused), not by a reload of ours.
    wait_until(page, lambda: any('"ready"' in f for f in frames), f"the socket said ready (got {frames})")

    participant = Participant.objects.get(study=study)
    n_ratings = participant.n_ratings
    assert n_ratings == RatingItem.objects.filter(participant=participant).count() > 0
    for number in range(1, n_ratings + 1):
        at(page, asgi_server, f"/s/{slug}/rate/{number}/")
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Comparison {number} of {n_ratings}")
        html = page.content()
        for secret in (*ARM_NAMES, str(tiny_checkpoint)):
            assert secret not in html, f"rating page {number} shows {secret!r}"
        choice = "Response A" if number % 2 else "Response B"
        if "attention check" in page.locator(".question").inner_text().lower():
            # The check's answers say which one to choose: the one that asks to be chosen.
            asks = page.locator(".pair article", has_text="Please choose this response")
            choice = asks.get_by_role("heading").text_content().strip()
        page.get_by_role("radio", name=choice, exact=True).check()
        page.get_by_role("radio", name="4", exact=True).check()
        if number == 1:
            page.get_by_label(re.compile(r"^Why\?")).fill("It gets to the point.")
        screenshots.take(page, f"rate-{number}")
        page.get_by_role("button", name="Next").click()

    at(page, asgi_server, f"/s/{slug}/survey/")
    page.get_by_label(re.compile("describe yourself")).fill("I like short, practical answers.")
    page.get_by_label("Age", exact=True).select_option("25-34")
    page.get_by_label("Highest education").select_option("bachelor")
    screenshots.take(page, "survey")
    page.get_by_role("button", name="Finish").click()

    at(page, asgi_server, f"/s/{slug}/done/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Thank you!")
    expect(page.locator(".code")).to_contain_text(study.completion_code)
    screenshots.take(page, "done")

    # Refreshing, the back button and the link again all stay on the completion page.
    page.reload()
    at(page, asgi_server, f"/s/{slug}/done/")
    expect(page.locator(".code")).to_contain_text(study.completion_code)
    page.go_back()
    at(page, asgi_server, f"/s/{slug}/done/")
    page.goto(entry)
    at(page, asgi_server, f"/s/{slug}/done/")
    expect(page.locator(".code")).to_contain_text(study.completion_code)

    participant.refresh_from_db()
    assert participant.state == Participant.State.COMPLETED
    assert Participant.objects.filter(study=study).count() == 1
    assert ElicitationPick.objects.filter(item__participant=participant).count() == n
    assert ElicitationPick.objects.get(item__participant=participant, item__position=0).choice == "right"
    assert Rating.objects.filter(item__participant=participant).count() == n_ratings
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * N_EVALUATION
    assert SurveyResponse.objects.filter(participant=participant).count() == 1
    # No page, asset or socket failed on the server's side along the way.
    assert asgi_server.errors_since(server_log_start) == [], asgi_server.log_tail()
