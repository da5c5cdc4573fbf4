"""A coordinator in a real browser: signing in to the studio, creating a study with its form (a pool
uploaded as CSV, arms on the tiny real model), and watching the study's dashboard follow participants
live, over its WebSocket, while they go through the study in another browser and the real worker writes
their responses; and the same dashboard on a phone, on its polling fallback.

Every page is saved as a screenshot (tests/browser/output/coordinator-*.png, copied to docs/screenshots/
with FSPO_DOC_SCREENSHOTS=1)."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from annotation.analysis import study_analysis
from annotation.exports import export_study
from annotation.models import GeneratedResponse, Rating, RatingItem, Side
from modeling.analysis import AnalysisOptions, ExclusionRules, analyze, load_export
from studyapp.flow import STEPS
from studyapp.models import Participant, Study
from tests.browser.conftest import LiveServer, Screenshots, queue_paused
from tests.browser.test_participant_journey import at, has_visible_focus
from tests.conftest import RunningWorker
from tests.factories import make_coordinator

# The server and the worker are other processes: they see only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

SCREENSHOTS_PREFIX = "coordinator"  # not `studio`: the guide's hand-made studio-*.png stay
TIMEOUT_MS = 30_000  # any page, element or live number; generous, for a busy two-core machine
GENERATION_TIMEOUT_MS = 120_000  # the worker's first task loads torch and the model
POLL_TIMEOUT_MS = 20_000  # the polling fallback asks every 3 s
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
PASSWORD = "a-long-test-password"  # tests.factories.make_coordinator's

SLUG = "everyday-advice"
TITLE = "Everyday advice pilot"
N_PICKS = 3
N_EVALUATION = 2
COMPLETION_CODE = "C1X9ADVICE"
# The question pool as a coordinator would upload it: four pairs to pick from, three held-out questions.
POOL_CSV = """question,response_a,response_b,kind
I have a free Saturday. What should I do?,"Go for a long walk somewhere new, then cook a proper dinner.","Visit a museum you have not seen, take a day trip by train, or invite friends for board games.",elicitation
How do I get better at remembering names?,Repeat the name back and use it once more before you say goodbye.,"Pay attention at the introduction, link the name to a vivid image, and recall it a few minutes later.",elicitation
Is it worth learning to touch-type?,Yes. A few weeks of practice pays back for the rest of your life.,"It depends on how much you type: above an hour a day, 60+ words per minute saves real time.",elicitation
What should I read next?,Pick the book a friend could not stop talking about.,"Try something outside your usual shelf, such as a narrative history or a short novel.",elicitation
What is a good way to start running?,,,evaluation
How should I plan a week of meals?,,,evaluation
How can I keep a houseplant alive?,,,evaluation
"""


@pytest.fixture
def desktop(chromium: Browser) -> Iterator[BrowserContext]:
    context = chromium.new_context(**DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


def by_step(**counts: int) -> dict[str, int]:
    """The dashboard's 'Participants by step' column: every step, zero where not given."""
    unknown = set(counts) - {spec.name for spec in STEPS}
    assert not unknown, f"no such steps: {unknown}"
    return {spec.name: counts.get(spec.name, 0) for spec in STEPS}


def expect_live(
    dashboard: Page, *, steps: dict[str, int], timeout: int = TIMEOUT_MS, **fields: object
) -> None:
    """Wait until the dashboard shows these numbers: `steps` in 'Participants by step', `fields` in the
    elements marked data-field=<name>."""
    for name, value in fields.items():
        expect(dashboard.locator(f"[data-field={name}]")).to_have_text(str(value), timeout=timeout)
    for step, count in steps.items():
        expect(dashboard.locator(f"[data-step={step}]")).to_have_text(str(count), timeout=timeout)


def expect_win_rate(dashboard: Page, *, wins: float, n: int, timeout: int = TIMEOUT_MS) -> None:
    """The dashboard's one comparison shows `wins` (ties as halves) of `n` and their rate."""
    row = dashboard.locator("#win-rates tbody tr")
    expect(row).to_have_count(1)
    expect(row.get_by_role("rowheader")).to_have_text(re.compile(r"^\s*fspo\s+vs\s+base\s*$"))
    expect(row.locator("[data-wr=wins]")).to_have_text(f"{wins:g}", timeout=timeout)
    expect(row.locator("[data-wr=n]")).to_have_text(str(n), timeout=timeout)
    rate = f"{100 * wins / n:.1f}%" if n else "—"
    expect(row.locator("[data-wr=rate]")).to_have_text(rate, timeout=timeout)


def fspo_score(item: RatingItem, chosen: str) -> float:
    """What a rating of `item` choosing `chosen`'s response adds to FSPO's wins: 1 or 0, or 1/2 when the
    two responses are the same text (the tiny random model can write the same answer with and without
    the shots: neither was better, whatever was clicked; modeling.winrate)."""
    assert item.left is not None and item.right is not None
    if item.left.text == item.right.text:
        return 0.5
    return 1.0 if chosen == "fspo" else 0.0


def sticking_out(page: Page) -> list[str]:
    """The elements that reach past the right edge of the viewport, so the page scrolls sideways: each as
    tag#id.class and its right edge in CSS pixels. An element inside a box that scrolls or clips it (a
    wide table in its .table-scroll) is left out; an absolutely positioned one is clipped only by a box
    from its containing block up."""
    return page.evaluate(
        """() => {
            const width = document.documentElement.clientWidth;
            const clipped = (el) => {
                let position = getComputedStyle(el).position;
                if (position === 'fixed') return false;
                for (let box = el.parentElement; box && box !== document.body; box = box.parentElement) {
                    const style = getComputedStyle(box);
                    if (position === 'absolute' && style.position === 'static' && style.transform === 'none') {
                        continue;  // not its containing block: it does not clip it
                    }
                    if (style.overflowX !== 'visible') return true;
                    position = style.position;
                }
                return false;
            };
            const out = [];
            for (const el of document.body.querySelectorAll('*')) {
                const right = el.getBoundingClientRect().right;
                if (right <= width + 0.5 || clipped(el)) continue;
                const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                    + (e.classList.length ? '.' + [...e.classList].join('.') : '');
                const within = el.parentElement.closest('[id]');
                const where = within ? ` in ${name(within)}` : '';
                out.push(`${name(el)}${where} (right edge ${Math.round(right)} px)`);
            }
            return out;
        }"""
    )


def scrolled_to_end(page: Page) -> Page:
    """The page scrolled to its end, where the form's sticky bar of buttons sits in its own place (from
    anywhere else a full-page picture shows it over the part of the form that was at the window's
    bottom)."""
    page.evaluate("() => window.scrollTo(0, document.documentElement.scrollHeight)")
    return page


def side_label(side: str) -> str:
    return Side(side).label  # "Response A" (left) or "Response B" (right), as the rating page says


def arm_side(item: RatingItem, arm: str) -> str:
    """The side on which `arm`'s response is shown in this rating item."""
    assert item.left is not None and item.right is not None
    return Side.LEFT if item.left.arm.name == arm else Side.RIGHT


def test_a_coordinator_creates_a_study_and_watches_its_dashboard_follow_participants_live(
    asgi_server: LiveServer,
    celery_worker: RunningWorker,
    tiny_checkpoint: Path,
    chromium: Browser,
    desktop: BrowserContext,
    screenshots: Screenshots,
    tmp_path: Path,
) -> None:
    coordinator = make_coordinator()
    server_log_start = asgi_server.log_size()
    page = desktop.new_page()

    # Sign in with the keyboard alone: the studio sends a visitor to its login page, where the focus is
    # already in the first field (and shows it); Tab goes to the next, Enter submits.
    page.goto(f"{asgi_server.url}/studio/")
    page.wait_for_url(f"{asgi_server.url}/studio/login/?next=/studio/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    expect(page.get_by_label("Username")).to_be_focused()
    assert has_visible_focus(page)
    screenshots.take(page, "login")
    page.keyboard.type(coordinator.username)
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "id_password"
    page.keyboard.type(PASSWORD)
    screenshots.take(page, "login-keyboard")
    page.keyboard.press("Enter")

    at(page, asgi_server, "/studio/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Studies")
    expect(page.locator("header .who")).to_have_text(coordinator.username)
    expect(page.get_by_text("No studies yet.")).to_be_visible()
    screenshots.take(page, "home")
    # The first Tab shows the skip link; through it the next Tab is on the page's own button.
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    assert has_visible_focus(page)
    box = skip.bounding_box()
    assert box is not None and box["x"] >= 0 and box["y"] >= 0, f"the focused skip link is off-screen: {box}"
    screenshots.take(page, "home-keyboard-skip")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.get_by_role("main").get_by_role("link", name="New study")).to_be_focused()
    assert has_visible_focus(page)
    page.keyboard.press("Enter")

    # The form, filled in as a coordinator would: the settings, two arms on the tiny model, one
    # comparison, the texts and codes, opened at once.
    at(page, asgi_server, "/studio/studies/new/")
    expect(page.get_by_role("heading", level=1)).to_have_text("New study")
    page.get_by_label("Title").fill(TITLE)
    page.get_by_label("Slug").fill(SLUG)
    page.get_by_label("Domain").fill("reviews")
    page.get_by_label(re.compile(r"^Instruction\b")).fill("Answer the question the way this user prefers.")
    page.get_by_label("Elicitation pairs per participant (N shots)").fill(str(N_PICKS))
    page.get_by_label("Evaluation questions per participant").fill(str(N_EVALUATION))
    page.get_by_label("Consistency repeats").fill("1")
    page.get_by_label("Attention checks", exact=True).fill("1")
    page.get_by_label("Attention-check failures allowed").fill("0")
    page.get_by_label("Longest response (tokens)").fill("16")
    for number, (name, method) in enumerate((("fspo", "fspo"), ("base", "no_context")), start=1):
        page.get_by_label(f"Arm {number} name").fill(name)
        page.get_by_label(f"Arm {number} method").select_option(method)
        page.get_by_label(f"Arm {number} checkpoint").fill(str(tiny_checkpoint))
    page.get_by_label("Comparison 1 arm").fill("fspo")
    page.get_by_label("Comparison 1 baseline").fill("base")
    page.get_by_label("Quota").fill("20")
    page.get_by_label("Consent text").fill(
        "This study is run by the FSPO research team. You will compare short answers to everyday "
        "questions; it takes about 10 minutes.\n\nWe store your choices under a random id, never your "
        "name, IP address or browser. You can withdraw at any time."
    )
    page.get_by_label("Completion code", exact=True).fill(COMPLETION_CODE)
    page.get_by_label("Code when screened out").fill("FULL-7Q")
    page.get_by_label("Code after failed attention checks").fill("ATTN-3R")
    page.get_by_label("Code when consent is declined").fill("NOPE-5T")
    page.get_by_label("Completion link").fill("https://app.prolific.com/submissions/complete?cc={code}")
    page.get_by_label("Open: the study takes new participants").check()
    screenshots.take(scrolled_to_end(page), "new-study")

    # Forgetting the pool: nothing is saved, and the problems are listed at the top, where the focus goes.
    page.get_by_role("button", name="Create study").click()
    at(page, asgi_server, "/studio/studies/new/")
    summary = page.locator("#error-summary")
    expect(summary.get_by_role("heading")).to_have_text(
        re.compile(r"^Nothing was saved: \d+ problems? to fix$")
    )
    expect(summary).to_contain_text("The study cannot open yet.")
    expect(summary).to_contain_text("The pool has 0 elicitation pair(s); each participant makes 3 picks.")
    expect(summary).to_be_focused()
    screenshots.take(scrolled_to_end(page), "new-study-problems")
    assert not Study.objects.filter(slug=SLUG).exists()

    # What was typed is still there; the pool file is added and the study created.
    expect(page.get_by_label("Title")).to_have_value(TITLE)
    expect(page.get_by_label("Arm 1 checkpoint")).to_have_value(str(tiny_checkpoint))
    page.get_by_label("Or from a file").set_input_files(
        {"name": "everyday-pool.csv", "mimeType": "text/csv", "buffer": POOL_CSV.encode()}
    )
    page.get_by_role("button", name="Create study").click()

    at(page, asgi_server, f"/studio/studies/{SLUG}/")
    dashboard = page
    expect(dashboard.get_by_role("status")).to_have_text(f"Created {TITLE}.")
    expect(dashboard.get_by_role("heading", level=1)).to_have_text(re.compile(rf"^\s*{TITLE}\s+open\s*$"))
    summary_line = dashboard.locator(".page-head .muted")
    expect(summary_line).to_contain_text("reviews · 3 picks, 2 evaluation questions per participant")
    expect(summary_line).to_contain_text("pool: 4 pairs, 3 evaluation questions")
    expect(dashboard.get_by_role("table").filter(has_text="Checkpoint")).to_contain_text(str(tiny_checkpoint))
    study = Study.objects.get(slug=SLUG)
    assert study.created_by == coordinator
    assert (study.n_pairs, study.n_eval_questions, study.completion_code) == (
        N_PICKS,
        N_EVALUATION,
        COMPLETION_CODE,
    )

    # The dashboard is live (its socket is open) and empty. A mark on its window tells, at the end,
    # that every number below changed in this same page, never reloaded.
    expect(dashboard.locator("#dashboard-live")).to_have_attribute("data-live", "Live")
    expect_live(dashboard, steps=by_step(), participants=0, completed=0, ratings=0)
    expect(dashboard.locator("[data-field=median_completion]")).to_have_text("—")
    expect_win_rate(dashboard, wins=0, n=0)
    dashboard.evaluate("() => { window.fspoNotReloaded = true; }")
    screenshots.take(dashboard, "dashboard-new")

    # A participant comes through the link the dashboard gives, as a recruitment platform fills it in,
    # in a browser of their own.
    link = dashboard.locator("#entry-url").input_value()
    assert link.startswith(f"{asgi_server.url}/s/{SLUG}/?PROLIFIC_PID=")

    def link_for(pid: str) -> str:
        ids = {"PROLIFIC_PID": pid, "STUDY_ID": "st-1", "SESSION_ID": f"se-{pid}"}
        return re.sub(r"\{\{%(\w+)%\}\}", lambda m: ids[m[1]], link)

    people = chromium.new_context(**PHONE)
    people.set_default_timeout(TIMEOUT_MS)
    try:
        one = people.new_page()
        one.goto(link_for("pw-coord-1"))
        at(one, asgi_server, f"/s/{SLUG}/consent/")  # only opening the link stores nothing, takes no place

        one.get_by_role("button", name="I agree to take part").click()
        at(one, asgi_server, f"/s/{SLUG}/instructions/")
        expect_live(dashboard, steps=by_step(instructions=1), participants=1, places_taken=1)

        one.get_by_role("button", name="Start").click()
        at(one, asgi_server, f"/s/{SLUG}/pick/1/")
        expect_live(dashboard, steps=by_step(elicitation=1), participants=1)
        for number in range(1, N_PICKS):
            at(one, asgi_server, f"/s/{SLUG}/pick/{number}/")
            one.locator("button[name=choice][value=left]").click()

        # The last pick: the worker is held back, so the dashboard shows the participant waiting.
        with queue_paused(celery_worker, "gpu"):
            at(one, asgi_server, f"/s/{SLUG}/pick/{N_PICKS}/")
            one.locator("button[name=choice][value=right]").click()
            at(one, asgi_server, f"/s/{SLUG}/waiting/")
            expect_live(dashboard, steps=by_step(waiting=1), participants=1)
            screenshots.take(dashboard, "dashboard-preparing")
        one.wait_for_url(f"{asgi_server.url}/s/{SLUG}/rate/1/", timeout=GENERATION_TIMEOUT_MS)
        expect_live(dashboard, steps=by_step(rating=1), participants=1, generation_failed=0)

        # The ratings: FSPO's response in the first counted pair, the baseline's in the second; the
        # attention check as it asks; the repeat counts for neither. The win rate follows each one.
        participant = Participant.objects.get(study=study)
        items = RatingItem.objects.filter(participant=participant).select_related("left__arm", "right__arm")
        counted, wins = 0, 0.0
        for number in range(1, participant.n_ratings + 1):
            at(one, asgi_server, f"/s/{SLUG}/rate/{number}/")
            item = items.get(position=number - 1)
            if item.is_attention_check:
                side = item.expected_choice
            elif item.is_repeat:
                side = Side.LEFT
            else:
                chosen = "fspo" if counted == 0 else "base"
                side = arm_side(item, chosen)
                counted, wins = counted + 1, wins + fspo_score(item, chosen)
            one.get_by_role("radio", name=side_label(side), exact=True).check()
            one.get_by_role("radio", name="4", exact=True).check()
            one.get_by_role("button", name="Next").click()
            if counted == 1:
                expect_win_rate(dashboard, wins=wins, n=1)
                expect(dashboard.locator("[data-field=ratings]")).to_have_text("1")
        assert counted == N_EVALUATION
        expect_win_rate(dashboard, wins=wins, n=2)
        # One participant: no interval yet (it resamples participants; modeling.winrate).
        expect(dashboard.locator("#win-rates [data-wr=ci]")).not_to_have_text(re.compile(r"\d"))
        expect_live(dashboard, steps=by_step(survey=1), participants=1, ratings=N_EVALUATION)

        at(one, asgi_server, f"/s/{SLUG}/survey/")
        one.get_by_role("button", name="Finish").click()
        at(one, asgi_server, f"/s/{SLUG}/done/")
        expect(one.locator(".code")).to_have_text(COMPLETION_CODE)
        expect_live(dashboard, steps=by_step(done=1), participants=1, completed=1, failed_attention=0)
        expect(dashboard.locator("[data-state=completed]")).to_have_text("1")
        expect(dashboard.locator("[data-field=median_completion]")).to_have_text(
            re.compile(r"^\d+ (s|min \d+ s)$")
        )

        # A second participant declines consent; a third stops after their first pick.
        two = people.new_page()
        two.goto(link_for("pw-coord-2"))
        two.get_by_role("button", name="I do not want to take part").click()
        at(two, asgi_server, f"/s/{SLUG}/done/")
        expect_live(dashboard, steps=by_step(done=2), participants=2, places_taken=1, completed=1)
        expect(dashboard.locator("[data-state=declined]")).to_have_text("1")

        three = people.new_page()
        three.goto(link_for("pw-coord-3"))
        three.get_by_role("button", name="I agree to take part").click()
        three.get_by_role("button", name="Start").click()
        at(three, asgi_server, f"/s/{SLUG}/pick/1/")
        three.locator("button[name=choice][value=left]").click()
        at(three, asgi_server, f"/s/{SLUG}/pick/2/")
        expect_live(dashboard, steps=by_step(elicitation=1, done=2), participants=3, places_taken=2)

        # All of it arrived over the socket, in the page as it was first loaded.
        assert dashboard.evaluate("() => window.fspoNotReloaded === true")
        expect(dashboard.locator("#dashboard-live")).to_have_attribute("data-live", "Live")
        expect(dashboard.locator(".live-status")).to_have_text("Live")
        screenshots.take(dashboard, "dashboard-live")

        # The dashboard on a phone whose socket is refused: it says it polls, and still follows along.
        phone = chromium.new_context(**PHONE, storage_state=desktop.storage_state())
        phone.set_default_timeout(TIMEOUT_MS)
        try:
            small = phone.new_page()
            small.route_web_socket(re.compile(r"/ws/studies/"), lambda ws: ws.close())
            small.goto(f"{asgi_server.url}/studio/studies/{SLUG}/")
            expect(small.locator("#dashboard-live")).to_have_attribute(
                "data-live", "Updating every few seconds"
            )
            expect_live(small, steps=by_step(elicitation=1, done=2), participants=3, completed=1)
            four = people.new_page()
            four.goto(link_for("pw-coord-4"))
            four.get_by_role("button", name="I agree to take part").click()
            at(four, asgi_server, f"/s/{SLUG}/instructions/")
            expect_live(
                small,
                steps=by_step(instructions=1, elicitation=1, done=2),
                participants=4,
                places_taken=3,
                timeout=POLL_TIMEOUT_MS,
            )
            screenshots.take(small, "dashboard-phone")
            # Nothing wider than the phone: the page scrolls down, not sideways.
            assert (
                small.evaluate("() => document.documentElement.scrollWidth") <= PHONE["viewport"]["width"]
            ), sticking_out(small)
        finally:
            phone.close()
    finally:
        people.close()

    participant.refresh_from_db()
    assert participant.state == Participant.State.COMPLETED
    assert GeneratedResponse.objects.filter(participant=participant).count() == 2 * N_EVALUATION
    assert Rating.objects.filter(item__participant=participant).count() == participant.n_ratings
    assert sorted(Participant.objects.filter(study=study).values_list("state", flat=True)) == sorted(
        ["completed", "declined", "elicitation", "instructions"]
    )
    # The analyses count what the dashboard showed (fspo chosen in 1 of the 2 counted pairs; a pair
    # whose two texts are the same, which the tiny model can write, is a tie, half a win), from the
    # database and from an export read back alike. (A browser answers faster than the too-fast rule.)
    counted = Rating.objects.filter(
        item__participant=participant, item__is_attention_check=False, item__is_repeat=False
    ).select_related("item__left__arm", "item__right__arm")
    expected = sum(
        0.5 if r.item.left.text == r.item.right.text else float(r.item.text_on(r.choice) == fspo_text(r))
        for r in counted
    )
    options = AnalysisOptions(rules=ExclusionRules(drop_too_fast=False), embeddings=False)
    from_db = study_analysis(study=study, options=options).win_rates.rows
    export_study(study=study, fmt="parquet", out_dir=tmp_path / "export")
    from_export = analyze(load_export(tmp_path / "export"), options=options).win_rates.rows
    assert [(r.arm, r.baseline, r.participants, r.n, r.wins) for r in from_db] == [
        ("fspo", "base", 1, 2, expected)
    ]
    assert from_export == from_db
    # Nothing failed on the server's side. Its one warning is the form sent back without a pool.
    errors = asgi_server.errors_since(server_log_start)
    assert len(errors) == 1, errors
    assert re.search(r" WARNING +Bad Request: /studio/studies/new/$", errors[0]), errors


def fspo_text(rating: Rating) -> str:
    """The text of the fspo arm's response in a rated pair."""
    item = rating.item
    return item.left.text if item.left.arm.name == "fspo" else item.right.text
