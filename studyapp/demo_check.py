"""A scripted participant for `manage.py demo_site --check`: one person's whole journey over real HTTP
against a live server, as a browser without JavaScript would take it (a cookie jar, the pages' forms and
their CSRF tokens, the waiting page's polling endpoint).

It picks like someone who likes short explanations (the shorter response of each pair, and of each A/B
item), answers attention checks as they ask, and stops with CheckFailed at the first page that is not
the one the journey should reach.
"""

import html
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx

# The waiting page's script polls every 3 s; the check polls faster so that the wait it reports is the
# worker's time, not the polling interval's.
POLL_INTERVAL_S = 0.2


class CheckFailed(Exception):
    """The journey did not go as it should; the message says where and what the page said."""


@dataclass(frozen=True)
class Walk:
    """What the scripted participant did and saw."""

    recruitment_id: str
    picks: tuple[str, ...]  # the side chosen on each pair, in order
    ratings: int  # A/B items rated (attention checks included)
    attention_checks: int
    ready_after_s: float  # from sending the last pick to the status endpoint saying "ready"
    polls: int
    outcome: str  # the done page's heading
    code: str


def response_texts(page: str) -> tuple[str, str]:
    """The two responses a pick or rating page shows (A on the left, B on the right), as plain text."""
    found = re.findall(r'class="response-text">(.*?)</(?:span|div)>', page, re.DOTALL)
    if len(found) != 2:
        raise CheckFailed(f"expected two responses on the page, found {len(found)}")
    left, right = (html.unescape(re.sub(r"<br\s*/?>|\s+", " ", t)).strip() for t in found)
    return left, right


def attention_check_side(page: str) -> str | None:
    """On a rating page that is an attention check, the side it asks for (the response saying to choose
    it); None on any other page. (The models are imported here, so that bench/bench_site.py can use
    this module's page readers before it sets Django up.)"""
    from annotation.models import ATTENTION_CHECK_PICK_ME, ATTENTION_CHECK_QUESTION, Side

    question = re.search(r'<blockquote class="question">(.*?)</blockquote>', page, re.DOTALL)
    if not question or html.unescape(question[1]).strip() != ATTENTION_CHECK_QUESTION:
        return None
    return Side.LEFT if response_texts(page)[0] == ATTENTION_CHECK_PICK_ME else Side.RIGHT


def _shorter(left: str, right: str) -> str:
    from annotation.models import Side

    return Side.LEFT if len(left) <= len(right) else Side.RIGHT


def form_field(page: str, name: str) -> str:
    """The value of the form field `name` (a hidden input) on the page."""
    match = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', page)
    if match is None:
        raise CheckFailed(f"the page has no '{name}' field")
    return html.unescape(match[1])


def _page_error(page: str) -> str:
    """The message an error page or a form's error notice shows, as plain text."""
    match = re.search(r'class="notice error"[^>]*>(.*?)</(?:p|div)>', page, re.DOTALL)
    if match is None:
        match = re.search(r"<main[^>]*>(.*?)</main>", page, re.DOTALL)
    text = re.sub(r"<[^>]+>", " ", match[1]) if match else page[:300]
    return " ".join(html.unescape(text).split())


class ScriptedParticipant:
    """One participant of `slug` on the server at `base_url`, with their own cookie jar."""

    def __init__(self, base_url: str, slug: str, *, say: Callable[[str], None] = print) -> None:
        self.slug = slug
        self.root = f"/s/{slug}/"
        self.recruitment_id = f"demo-check-{uuid.uuid4().hex[:8]}"
        self.say = say
        self.client = httpx.Client(base_url=base_url, follow_redirects=True, timeout=60)

    def close(self) -> None:
        self.client.close()

    def _expect(self, response: httpx.Response, step: str, what: str) -> re.Match[str]:
        match = re.fullmatch(rf"{re.escape(self.root)}{step}", response.url.path)
        if response.status_code != 200 or match is None:
            raise CheckFailed(
                f"expected {what}, got HTTP {response.status_code} at {response.url.path}: "
                f"{_page_error(response.text)}"
            )
        return match

    def _submit(self, page: httpx.Response, data: dict[str, str]) -> httpx.Response:
        """Post the page's form (to the page's own address) with its CSRF token."""
        token = form_field(page.text, "csrfmiddlewaretoken")
        return self.client.post(page.url.path, data={"csrfmiddlewaretoken": token, **data})

    def walk(self, *, timeout_s: float) -> Walk:
        """Take the study from the entry link to the completion code; `timeout_s` bounds the wait for
        the worker."""
        r = self.client.get(
            self.root,
            params={"PROLIFIC_PID": self.recruitment_id, "STUDY_ID": "demo", "SESSION_ID": "check"},
        )
        self._expect(r, "consent/", "the consent page")
        r = self._submit(r, {"decision": "agree"})
        self._expect(r, "instructions/", "the instructions")
        self.say(f"  entry link (PROLIFIC_PID={self.recruitment_id}), consent, instructions: ok")
        r = self._submit(r, {})

        picks: list[str] = []
        last_pick_sent = time.monotonic()
        while re.fullmatch(rf"{re.escape(self.root)}pick/\d+/", r.url.path):
            self._expect(r, rf"pick/{len(picks) + 1}/", f"pick page {len(picks) + 1}")
            choice = _shorter(*response_texts(r.text))
            last_pick_sent = time.monotonic()
            r = self._submit(r, {"item": form_field(r.text, "item"), "choice": choice})
            picks.append(choice)
        if not picks:
            raise CheckFailed(f"expected the first pick page, got {r.url.path}: {_page_error(r.text)}")
        self._expect(r, "waiting/", "the waiting page after the last pick")
        self.say(f"  {len(picks)} picks ({', '.join(picks)}: the shorter response each time): ok")

        ready_after, polls = self._wait_for_responses(last_pick_sent, timeout_s)
        self.say(
            f"  responses ready {ready_after:.1f} s after the last pick "
            f"(status polled every {POLL_INTERVAL_S} s, {polls} polls)"
        )

        r = self.client.get(f"{self.root}waiting/")
        ratings = checks = 0
        while re.fullmatch(rf"{re.escape(self.root)}rate/\d+/", r.url.path):
            self._expect(r, rf"rate/{ratings + 1}/", f"rating page {ratings + 1}")
            choice = attention_check_side(r.text)
            if choice is not None:
                checks += 1
            else:
                choice = _shorter(*response_texts(r.text))
            data = {
                "item": form_field(r.text, "item"),
                "choice": choice,
                "strength": "4",
                "reason": "Shorter.",
            }
            r = self._submit(r, data)
            ratings += 1
        if not ratings:
            raise CheckFailed(f"expected the first rating page, got {r.url.path}: {_page_error(r.text)}")
        self._expect(r, "survey/", "the survey after the last rating")
        self.say(f"  {ratings} A/B ratings ({checks} attention check(s) answered as asked): ok")

        r = self._submit(
            r, {"self_description": "A scripted participant: I like short, simple explanations."}
        )
        self._expect(r, "done/", "the completion page")
        heading = re.search(r"<h1[^>]*>(.*?)</h1>", r.text, re.DOTALL)
        code = re.search(r"<output[^>]*>(.*?)</output>", r.text, re.DOTALL)
        outcome = html.unescape(heading[1]).strip() if heading else ""
        self.say(f"  survey: ok; the completion page says {outcome!r}")
        return Walk(
            recruitment_id=self.recruitment_id,
            picks=tuple(picks),
            ratings=ratings,
            attention_checks=checks,
            ready_after_s=ready_after,
            polls=polls,
            outcome=outcome,
            code=html.unescape(code[1]).strip() if code else "",
        )

    def _wait_for_responses(self, since: float, timeout_s: float) -> tuple[float, int]:
        """Poll the waiting page's status endpoint until the responses are ready; (seconds since
        `since`, number of polls)."""
        deadline = since + timeout_s
        polls = 0
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            response = self.client.get(f"{self.root}status/")
            polls += 1
            if response.status_code != 200:
                raise CheckFailed(
                    f"the status endpoint answered HTTP {response.status_code}: {response.text}"
                )
            status = response.json()
            if status.get("generation") == "failed":
                raise CheckFailed("the worker could not write the responses (generation failed)")
            if status.get("generation") == "ready" or status.get("state") != "waiting":
                return time.monotonic() - since, polls
            time.sleep(POLL_INTERVAL_S)
        raise CheckFailed(f"the responses were not ready within {timeout_s:.0f} s (last status {status})")
