"""A scripted participant: one person's whole journey over real HTTP against a live server, as a browser
without JavaScript would take it (a cookie jar, the pages' forms and their CSRF tokens, redirects followed
one by one, the waiting page's polling endpoint), from the entry link to the completion page.

`manage.py demo_site --check` walks one (`PrefersShort`: the shorter response of each pair and of each A/B
item); bench/bench_site.py walks hundreds at once, with random choices, double-clicks and stale POSTs
(`replays`), and times every request. Attention checks are answered as they ask. The walk stops with
CheckFailed at the first request that fails or page that is not the one the journey should reach.

Nothing here needs Django set up (the bench uses it before it configures the site's settings); the one
import of the models is inside `attention_check_side`.
"""

import asyncio
import html
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

LEFT, RIGHT = "left", "right"
SIDES = (LEFT, RIGHT)
# The waiting page's script polls every 3 s; the demo's check polls faster so that the wait it reports is
# the worker's time, not the polling interval's.
POLL_INTERVAL_S = 0.2
# How long the participant's client keeps an idle connection (below the servers' 5 s keep-alive).
IDLE_CONNECTION_S = 3.0


class CheckFailed(Exception):
    """The journey did not go as it should; the message says where and what the page said, and
    `category` what kind of failure it was: "connection", "5xx", "unexpected 4xx" or "flow" (a page
    other than the one the journey should reach, or one without what it should have)."""

    def __init__(self, message: str, category: str = "flow") -> None:
        super().__init__(message)
        self.category = category


# ---------------------------------------------------------------------------------------------------
# Reading the pages


def response_texts(page: str) -> tuple[str, str]:
    """The two responses a pick or rating page shows (A on the left, B on the right), as plain text."""
    found = re.findall(r'class="response-text">(.*?)</(?:span|div)>', page, re.DOTALL)
    if len(found) != 2:
        raise CheckFailed(f"expected two responses on the page, found {len(found)}")
    left, right = (html.unescape(re.sub(r"<br\s*/?>|\s+", " ", t)).strip() for t in found)
    return left, right


def attention_check_side(page: str) -> str | None:
    """On a rating page that is an attention check, the side it asks for (the response saying to choose
    it); None on any other page."""
    from annotation.models import ATTENTION_CHECK_PICK_ME, ATTENTION_CHECK_QUESTION

    question = re.search(r'<blockquote class="question">(.*?)</blockquote>', page, re.DOTALL)
    if not question or html.unescape(question[1]).strip() != ATTENTION_CHECK_QUESTION:
        return None
    return LEFT if response_texts(page)[0] == ATTENTION_CHECK_PICK_ME else RIGHT


def form_field(page: str, name: str) -> str:
    """The value of the form field `name` (a hidden input) on the page."""
    match = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', page)
    if match is None:
        raise CheckFailed(f"the page has no '{name}' field")
    return html.unescape(match[1])


def page_error(page: str) -> str:
    """The message an error page or a form's error notice shows, as plain text."""
    match = re.search(r'class="notice error"[^>]*>(.*?)</(?:p|div)>', page, re.DOTALL)
    if match is None:
        match = re.search(r"<main[^>]*>(.*?)</main>", page, re.DOTALL)
    text = re.sub(r"<[^>]+>", " ", match[1]) if match else page[:300]
    return " ".join(html.unescape(text).split())


def _tag_text(page: str, tag: str) -> str:
    match = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", page, re.DOTALL)
    return html.unescape(match[1]).strip() if match else ""


def step_of(path: str) -> str:
    """The step a participant URL is for: /s/<slug>/pick/3/ -> pick; /s/<slug>/ -> entry."""
    match = re.match(r"/s/[^/]+/([a-z]+)/", path)
    return match[1] if match else "entry"


def other_side(side: str) -> str:
    return RIGHT if side == LEFT else LEFT


# ---------------------------------------------------------------------------------------------------
# What a participant chooses, and what the walk records


class Chooser(Protocol):
    """How a scripted participant chooses: a side of each pair and A/B item (attention checks aside),
    a strength for each rating, the reason they give, and their survey answers."""

    habit: str  # how the sides are chosen, for the check's report ("the shorter response each time")
    reason: str
    survey: dict[str, str]

    def side(self, page: str) -> str: ...

    def strength(self) -> str: ...


class PrefersShort:
    """Someone who likes short explanations: the shorter response each time, rated 4."""

    habit = "the shorter response each time"
    reason = "Shorter."
    survey = {"self_description": "A scripted participant: I like short, simple explanations."}

    def side(self, page: str) -> str:
        left, right = response_texts(page)
        return LEFT if len(left) <= len(right) else RIGHT

    def strength(self) -> str:
        return "4"


@dataclass
class Sample:
    kind: str  # "POST pick", "GET status", "POST rate (double-click)", ...
    status: int
    seconds: float


@dataclass
class Recorder:
    """Every request of participants who share it: its kind, status and latency, and every error by
    category."""

    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first three errors of each category

    def error(self, category: str, message: str) -> None:
        self.errors[category] += 1
        if self.errors[category] <= 3:
            self.examples.append(f"{category}: {message}")


@dataclass
class Walk:
    """What a scripted participant did and saw, filled in as they go (so a walk cut short shows how far
    it came)."""

    recruitment_id: str
    picks: list[str] = field(default_factory=list)  # the side sent first on each pair, once acknowledged
    ratings: list[str] = field(default_factory=list)  # the same for each A/B item (attention checks too)
    attention_checks: int = 0
    ready_s: float | None = None  # from the response to the last pick to the status saying "ready"
    ready_since_sent_s: float | None = None  # the same, from sending the last pick
    polls: int = 0
    outcome: str = ""  # the done page's heading
    code: str = ""
    completed: bool = False  # reached the completion page, with the code expected if one was


def _silent(line: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------
# The walk


class ScriptedParticipant:
    """One participant of `slug` on the server at `base_url`, with their own cookie jar.

    `chooser` decides their sides and strengths; `replays` adds what impatient people do: a double-click
    (the same POST twice at once) on the first and last pick, the first and last rating and the survey,
    and a stale POST of their first pick and first rating (the other side, from the old form) once they
    have moved on. Every request goes into `recorder`; `say` gets a line after each stage;
    `completion_code` is the code the completion page must show (None: any)."""

    def __init__(
        self,
        base_url: str,
        slug: str,
        recruitment_id: str,
        *,
        chooser: Chooser,
        study_id: str = "demo",
        session_id: str = "check",
        recorder: Recorder | None = None,
        replays: bool = False,
        poll_s: float = POLL_INTERVAL_S,
        wait_timeout_s: float = 120,
        request_timeout_s: float = 60,
        completion_code: str | None = None,
        say: Callable[[str], None] = _silent,
    ) -> None:
        self.root = f"/s/{slug}/"
        self.recruitment_id = recruitment_id
        self.entry = {"PROLIFIC_PID": recruitment_id, "STUDY_ID": study_id, "SESSION_ID": session_id}
        self.chooser = chooser
        self.rec = recorder if recorder is not None else Recorder()
        self.replays = replays
        self.poll_s = poll_s
        self.wait_timeout_s = wait_timeout_s
        self.completion_code = completion_code
        self.say = say
        self.walked = Walk(recruitment_id)
        self._last_pick = (0.0, 0.0)  # when the last pick's POST was sent, and when it was answered
        # Idle connections are dropped before the server drops them (uvicorn and daphne after 5 s), so a
        # form sent after a pause never goes out on a connection the server is closing at that moment: a
        # browser sends such a request again by itself, httpx does not.
        limits = httpx.Limits(keepalive_expiry=IDLE_CONNECTION_S)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=request_timeout_s, limits=limits)

    async def walk(self) -> Walk:
        """Take the study from the entry link to the completion page, then close the client; CheckFailed
        at the first thing that goes wrong."""
        try:
            r = await self._enter()
            r = await self._pick_all(r)
            r = await self._rate_all(await self._wait(r))
            await self._finish(r)
        finally:
            await self.client.aclose()
        self.walked.completed = True
        return self.walked

    # The stages, each from the page it starts on to the page it leaves the participant on.

    async def _enter(self) -> httpx.Response:
        r = await self.follow(await self.send("GET entry", "GET", self.root, params=self.entry))
        self.expect(r, "consent/", "the consent page")
        consent = {"decision": "agree", "enrolment": form_field(r.text, "enrolment")}
        r = await self.follow(await self.post("POST consent", r, consent))
        self.expect(r, "instructions/", "the instructions")
        self.say(f"  entry link (PROLIFIC_PID={self.recruitment_id}), consent, instructions: ok")
        return await self.follow(await self.post("POST instructions", r, {}))

    async def _pick_all(self, r: httpx.Response) -> httpx.Response:
        w, first_page, n = self.walked, r, 0
        sent = answered = 0.0
        while step_of(r.url.path) == "pick":
            n += 1
            self.expect(r, f"pick/{n}/", f"pick page {n}")
            data = {"item": form_field(r.text, "item"), "choice": self.chooser.side(r.text)}
            double = self.replays and (n == 1 or f"Question {n} of {n}<" in r.text)
            sent = time.perf_counter()
            answer = await self.submit("pick", r, data, double=double, record=w.picks)
            answered = time.perf_counter()
            if self.replays and n == 2:
                old = {"item": form_field(first_page.text, "item"), "choice": other_side(w.picks[0])}
                await self.stale("pick", first_page, old, now_at=answer)
            r = await self.follow(answer)
        if not n:
            self.expect(r, "pick/1/", "the first pick page")
        self.say(f"  {n} picks ({', '.join(w.picks)}: {self.chooser.habit}): ok")
        self._last_pick = (sent, answered)
        return r

    async def _wait(self, r: httpx.Response) -> httpx.Response:
        """The waiting page: poll its status endpoint until the responses are ready, then go on."""
        w, (sent, answered) = self.walked, self._last_pick
        if step_of(r.url.path) == "waiting":
            await self._poll_until_ready(since=answered)
            r = await self.follow(await self.send("GET waiting", "GET", f"{self.root}waiting/"))
        elif step_of(r.url.path) == "rate":  # ready before the redirect to the waiting page was followed
            w.ready_s = time.perf_counter() - answered
        else:
            self.expect(r, "waiting/", "the waiting page after the last pick")
        assert w.ready_s is not None
        w.ready_since_sent_s = w.ready_s + (answered - sent)
        self.say(
            f"  responses ready {w.ready_since_sent_s:.1f} s after the last pick "
            f"(status polled every {self.poll_s} s, {w.polls} polls)"
        )
        return r

    async def _poll_until_ready(self, *, since: float) -> None:
        deadline = since + self.wait_timeout_s
        status: dict[str, Any] = {}
        while time.perf_counter() < deadline:
            status = (await self.send("GET status", "GET", f"{self.root}status/")).json()
            self.walked.polls += 1
            if status.get("generation") == "failed":
                raise CheckFailed("the worker could not write the responses (generation failed)")
            if status.get("generation") == "ready" or status.get("state") != "waiting":
                self.walked.ready_s = time.perf_counter() - since
                return
            await asyncio.sleep(self.poll_s)
        raise CheckFailed(
            f"the responses were not ready within {self.wait_timeout_s:.0f} s (last status {status})"
        )

    async def _rate_all(self, r: httpx.Response) -> httpx.Response:
        w, first_page, n = self.walked, r, 0
        while step_of(r.url.path) == "rate":
            n += 1
            self.expect(r, f"rate/{n}/", f"rating page {n}")
            asked = attention_check_side(r.text)
            w.attention_checks += asked is not None
            data = {
                "item": form_field(r.text, "item"),
                "choice": asked or self.chooser.side(r.text),
                "strength": self.chooser.strength(),
                "reason": self.chooser.reason,
            }
            double = self.replays and (n == 1 or f"Comparison {n} of {n}<" in r.text)
            answer = await self.submit("rate", r, data, double=double, record=w.ratings)
            if self.replays and n == 2:
                old = {
                    **data,
                    "item": form_field(first_page.text, "item"),
                    "choice": other_side(w.ratings[0]),
                }
                await self.stale("rate", first_page, old, now_at=answer)
            r = await self.follow(answer)
        if not n:
            self.expect(r, "rate/1/", "the first rating page")
        self.expect(r, "survey/", "the survey after the last rating")
        self.say(f"  {n} A/B ratings ({w.attention_checks} attention check(s) answered as asked): ok")
        return r

    async def _finish(self, r: httpx.Response) -> None:
        """The survey, then the completion page and its code."""
        r = await self.follow(await self.submit("survey", r, self.chooser.survey, double=self.replays))
        self.expect(r, "done/", "the completion page")
        w = self.walked
        w.outcome, w.code = _tag_text(r.text, "h1"), _tag_text(r.text, "output")
        self.say(f"  survey: ok; the completion page says {w.outcome!r}")
        if self.completion_code is not None and w.code != self.completion_code:
            raise CheckFailed(
                f"the completion page shows {w.code!r} ({w.outcome!r}), "
                f"not the completion code {self.completion_code!r}"
            )

    # Requests

    async def send(
        self, kind: str, method: str, url: str, data: Any = None, **options: Any
    ) -> httpx.Response:
        """One request, timed and recorded under `kind`; CheckFailed unless it was answered below 400."""
        start = time.perf_counter()
        try:
            response = await self.client.request(method, url, data=data, **options)
        except httpx.HTTPError as exc:
            raise CheckFailed(f"{kind} {url}: {type(exc).__name__}: {exc}", "connection") from None
        self.rec.samples.append(Sample(kind, response.status_code, time.perf_counter() - start))
        if response.status_code >= 400:
            category = "5xx" if response.status_code >= 500 else "unexpected 4xx"
            said = page_error(response.text)
            raise CheckFailed(f"{kind} {url}: HTTP {response.status_code}: {said}", category)
        return response

    async def follow(self, response: httpx.Response) -> httpx.Response:
        """Follow redirects one by one, each a request of its own in the record."""
        while response.is_redirect:
            location = response.headers["location"]
            response = await self.send(f"GET {step_of(location)}", "GET", location)
        return response

    def expect(self, response: httpx.Response, step: str, what: str) -> None:
        """CheckFailed unless `response` is the page of `step` (e.g. "pick/2/"), shown without an error."""
        if response.status_code != 200 or response.url.path != f"{self.root}{step}":
            raise CheckFailed(
                f"expected {what}, got HTTP {response.status_code} at {response.url.path}: "
                f"{page_error(response.text)}"
            )

    async def post(self, kind: str, page: httpx.Response, data: dict[str, str]) -> httpx.Response:
        """POST the page's form (to the page's own address, its query included) with its CSRF token, not
        following the redirect."""
        token = form_field(page.text, "csrfmiddlewaretoken")
        return await self.send(
            kind, "POST", page.url.raw_path.decode(), {"csrfmiddlewaretoken": token, **data}
        )

    async def submit(
        self,
        name: str,
        page: httpx.Response,
        data: dict[str, str],
        *,
        double: bool,
        record: list[str] | None = None,
    ) -> httpx.Response:
        """Submit a form; with `double`, twice at once (a double-click), and both must be redirected to
        the same page. `record` gets the choice once the site has acknowledged it (answered a POST of it
        with a redirect), even if the other POST then failed. Returns the first POST's response."""
        posts = [self.post(f"POST {name}", page, data)]
        if double:
            posts.append(self.post(f"POST {name} (double-click)", page, data))
        # Both run to the end before either's error is raised: the client must not close under the other.
        outcomes = await asyncio.gather(*posts, return_exceptions=True)
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        if record is not None and any(o.is_redirect for o in answered):
            record.append(data["choice"])
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        first = outcomes[0]
        assert not isinstance(first, BaseException)
        if not first.is_redirect:
            raise CheckFailed(f"POST {name} was answered with its form: {page_error(first.text)}")
        if double and not self._moved_on_between(first, outcomes[1]):
            self.expect_redirect(outcomes[1], f"{name} double-click", first.headers["location"])
        return first

    def _moved_on_between(self, first: httpx.Response, second: Any) -> bool:
        """A double-clicked last pick whose responses were ready between its two answers: one went to
        the waiting page, the other to the first rating, where the waiting page itself goes next."""
        locations = {r.headers.get("location") for r in (first, second) if getattr(r, "is_redirect", False)}
        return locations == {f"{self.root}waiting/", f"{self.root}rate/1/"}

    def expect_redirect(self, response: Any, what: str, location: str) -> None:
        if not response.is_redirect or response.headers["location"] != location:
            got = response.headers.get("location", f"HTTP {response.status_code}")
            raise CheckFailed(f"{what} went to {got}, not {location}")

    async def stale(
        self, name: str, page: httpx.Response, data: dict[str, str], now_at: httpx.Response
    ) -> None:
        """Re-POST an earlier page's form (its old item, the other side): it must only be redirected to
        the participant's current step, which `now_at` (the previous submit's response) names."""
        response = await self.post(f"POST {name} (stale)", page, data)
        self.expect_redirect(response, f"stale {name}", now_at.headers.get("location", ""))
