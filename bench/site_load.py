"""The site bench's load generator: simulated participants (studyapp.scripted_participant, choosing at
random) walked in phases, every request timed: one after another, all at once, arriving over a minute
and thinking between pages as people do (`HumanPacing`), or looping with no pause at a rising number at
once (`stress`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from site_setup import COMPLETION_CODE

from studyapp.scripted_participant import (
    SIDES,
    CheckFailed,
    Recorder,
    Sample,
    ScriptedParticipant,
    Walk,
    step_of,
)

READY_POLL_S = 0.05  # the sequential measurement polls faster, so it times the worker, not the interval
STATUS_POLL = "GET status"  # the waiting page's polls: counted apart from the pages
STRESS_P95_LIMIT_S = 0.5  # stress rises until the pages' p95 passes this


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


class RandomChoices:
    """A simulated participant's choices: a random side of each pair and A/B item, a random strength,
    from a generator seeded per participant (so a rerun makes the same choices)."""

    habit = "a random side each time"
    reason = "Simulated."
    survey = {"self_description": "A simulated participant.", "comments": ""}

    def __init__(self, seed: str) -> None:
        self.rng = random.Random(seed)

    def side(self, page: str) -> str:
        return self.rng.choice(SIDES)

    def strength(self) -> str:
        return str(self.rng.randint(1, 5))


class TimedSamples(list[Sample]):
    """A recorder's samples, each with when its request was sent (`sent_at`, perf_counter seconds), so
    that a stress level counts the requests sent in its window."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: list[float] = []

    def append(self, sample: Sample) -> None:
        super().append(sample)
        self.sent_at.append(time.perf_counter() - sample.seconds)


def samples_sent_between(rec: Recorder, start: float, end: float) -> list[Sample]:
    sent_at = rec.samples.sent_at if isinstance(rec.samples, TimedSamples) else []
    return [s for s, t in zip(rec.samples, sent_at, strict=True) if start <= t < end]


@dataclass
class Phase:
    """One phase's participants and every request they made. Each one's record goes into `walked` as
    they start and fills in as they go (so a timeout leaves what was done); `finished` counts those who
    completed or stopped at an error, not those the phase's timeout cut off. A stress phase's `levels`
    are its windows: (participants at once, start, end) on the perf_counter clock."""

    recorder: Recorder = field(default_factory=lambda: Recorder(samples=TimedSamples()))
    walked: list[Walk] = field(default_factory=list)
    finished: int = 0
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    levels: list[tuple[int, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class HumanPacing:
    """How long a person spends on a page before submitting it: log-normal (median `median_s` of the
    page's step, sigma `sigma`, so the 95th percentile is 2.7 x the median), capped at `cap_s`, all
    times `scale`. The defaults: 3 s on the consent page, the instructions and the survey, 4 s on a pick
    or a rating (two responses to read)."""

    median_s: tuple[tuple[str, float], ...] = (
        ("consent", 3.0),
        ("instructions", 3.0),
        ("pick", 4.0),
        ("rate", 4.0),
        ("survey", 3.0),
    )
    sigma: float = 0.6
    cap_s: float = 30.0
    scale: float = 1.0

    def think_s(self, step: str, rng: random.Random) -> float:
        median = dict(self.median_s).get(step, 3.0)
        return self.scale * min(self.cap_s, rng.lognormvariate(math.log(median), self.sigma))

    def describe(self) -> str:
        medians = ", ".join(f"{step} {m:g} s" for step, m in self.median_s)
        return (
            f"log-normal think time before each form is sent, median by page ({medians}), sigma "
            f"{self.sigma:g}, capped at {self.cap_s:g} s, x {self.scale:g}"
        )


def arrival_times(count: int, over_s: float, seed: int) -> list[float]:
    """Each participant's arrival, uniform at random over `over_s` seconds (seeded)."""
    rng = random.Random(f"arrivals:{seed}")
    return [rng.uniform(0.0, over_s) for _ in range(count)]


class PacedParticipant(ScriptedParticipant):
    """A scripted participant who, with `pacing`, reads each page before sending its form (a
    double-click's two POSTs wait for the same reading; a stale POST comes at once)."""

    def __init__(self, *args: Any, pacing: HumanPacing | None, seed: str, **options: Any) -> None:
        super().__init__(*args, **options)
        self.pacing = pacing
        self.rng = random.Random(f"think:{seed}")
        self._read: tuple[httpx.Response | None, asyncio.Future[None] | None] = (None, None)

    async def post(self, kind: str, page: httpx.Response, data: dict[str, str]) -> httpx.Response:
        if self.pacing is not None and not kind.endswith("(stale)"):
            read_page, reading = self._read
            if read_page is not page or reading is None:
                reading = asyncio.ensure_future(
                    asyncio.sleep(self.pacing.think_s(step_of(page.url.path), self.rng))
                )
                self._read = (page, reading)
            await reading
        return await super().post(kind, page, data)


async def walk_recorded(participant: ScriptedParticipant) -> Walk:
    """Walk the participant through; what goes wrong goes into their recorder, by category, not up."""
    try:
        await participant.walk()
    except CheckFailed as exc:
        participant.rec.error(exc.category, f"{participant.recruitment_id}: {exc}")
    except Exception as exc:  # a parse error: the site answered wrongly
        participant.rec.error("flow", f"{participant.recruitment_id}: {type(exc).__name__}: {exc}")
    return participant.walked


async def run_participants(
    make: Callable[[int], ScriptedParticipant],
    count: int,
    phase: Phase,
    *,
    starts: list[float] | None,
    label: str,
) -> None:
    """Walk `count` participants under a progress bar: participant i starting `starts[i]` seconds into
    the phase (all zeros: all at once), or with `starts` None, one after another."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}")) as progress:
        bar = progress.add_task(label, total=count, info="")

        async def one(i: int, delay_s: float = 0.0) -> None:
            await asyncio.sleep(delay_s)
            participant = make(i)
            phase.walked.append(participant.walked)
            await walk_recorded(participant)
            phase.finished += 1
            rec = participant.rec
            info = f"{len(rec.samples):,} requests, {sum(rec.errors.values())} errors"
            progress.update(bar, advance=1, info=info)

        if starts is not None:
            await asyncio.gather(*(one(i, delay) for i, delay in enumerate(starts)))
        else:
            for i in range(count):
                await one(i)


async def stress(
    make: Callable[[int], ScriptedParticipant], phase: Phase, *, levels: list[int], level_s: float
) -> None:
    """Each level, that many participants at once for `level_s` seconds, each starting another as soon
    as one is done (no pause anywhere); a level's walks in progress at its end finish before the next
    (their requests after the end count to no level). Stops after the first level whose pages' p95
    passes STRESS_P95_LIMIT_S."""
    made = 0

    def next_participant() -> ScriptedParticipant:
        nonlocal made
        made += 1
        return make(made - 1)

    for concurrency in levels:
        start = time.perf_counter()
        end = start + level_s

        async def loop(until: float) -> None:
            while time.perf_counter() < until:
                participant = next_participant()
                phase.walked.append(participant.walked)
                await walk_recorded(participant)
                phase.finished += 1

        await asyncio.gather(*(loop(end) for _ in range(concurrency)))
        phase.levels.append((concurrency, start, end))
        pages = [s.seconds for s in samples_sent_between(phase.recorder, start, end) if s.kind != STATUS_POLL]
        p95 = percentile(pages, 95)
        print(f"  {concurrency:>4} at once: {len(pages) / level_s:,.1f} pages/s, p95 {1000 * p95:,.0f} ms")
        if p95 > STRESS_P95_LIMIT_S:
            break


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each process, and by this one (the simulated browsers)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    own = os.times()
    return used | {"simulated participants (this process)": own.user + own.system}


class Phases:
    """The phases of one run against the site at `url`, by name; `pids` are the processes whose CPU time
    each phase reports."""

    def __init__(self, args: argparse.Namespace, url: str, pids: dict[str, int]) -> None:
        self.args, self.url, self.pids = args, url, pids
        self.run_id = secrets.token_hex(3)
        self.done: dict[str, Phase] = {}

    async def run(
        self,
        name: str,
        slug: str,
        count: int,
        *,
        starts: list[float] | None = None,
        levels: list[int] | None = None,
        pacing: HumanPacing | None = None,
        **options: Any,
    ) -> Phase:
        """One phase, bounded by --timeout: `count` participants (`run_participants`), or with `levels`
        the stress levels. `options` go to each ScriptedParticipant."""
        args = self.args
        self.done[name] = record = Phase()

        def make(i: int) -> ScriptedParticipant:
            rid = f"bench-{self.run_id}-{name.replace(' ', '-')}-{i:05d}"
            return PacedParticipant(
                self.url,
                slug,
                rid,
                pacing=pacing,
                seed=f"{args.seed}:{name}:{i}",
                chooser=RandomChoices(f"{name}:{i}"),
                study_id="bench",
                session_id=f"s-{rid}",
                recorder=record.recorder,
                wait_timeout_s=args.timeout,
                request_timeout_s=120,
                completion_code=COMPLETION_CODE,
                **options,
            )

        if levels is not None:
            work = stress(make, record, levels=levels, level_s=args.level_s)
        else:
            work = run_participants(make, count, record, starts=starts, label=f"{name:<12}")
        start, cpu_before = time.perf_counter(), cpu_seconds(self.pids)
        try:
            await asyncio.wait_for(work, timeout=args.timeout)
        except TimeoutError:
            for _ in range(max(1, count - record.finished)):
                record.recorder.error("timeout", f"{name}: not done within --timeout {args.timeout:.0f} s")
        record.cpu_s = {k: v - cpu_before[k] for k, v in cpu_seconds(self.pids).items()}
        record.seconds = time.perf_counter() - start
        return record

    async def warm_up(self, slug: str) -> None:
        """Every worker loads the model with its first task, and each web server process answers its first
        requests (slower: imports, templates): one participant per worker or web process first, not
        timed."""
        count = max(self.args.workers, self.args.web_workers)
        await self.run("warm-up", slug, count, starts=[0.0] * count, poll_s=READY_POLL_S)


async def measure_burst(
    args: argparse.Namespace, url: str, slugs: tuple[str, str], pids: dict[str, int]
) -> dict[str, Phase]:
    """The default mode's three phases: warm-up, sequential (on the first study), load (on the
    second); the load test's participants poll every --poll-interval, as the page does, and replay."""
    phases = Phases(args, url, pids)
    seq_slug, load_slug = slugs
    await phases.warm_up(seq_slug)
    await phases.run("sequential", seq_slug, args.sequential, replays=False, poll_s=READY_POLL_S)
    await phases.run(
        "load test",
        load_slug,
        args.participants,
        starts=[0.0] * args.participants,
        replays=True,
        poll_s=args.poll_interval,
    )
    return phases.done


async def measure_human(
    args: argparse.Namespace, url: str, slugs: tuple[str, str], pids: dict[str, int]
) -> dict[str, Phase]:
    """Warm-up (on the first study), then --participants arriving over --arrival-s (on the second),
    reading each page (`human_pacing`), polling every --poll-interval and replaying."""
    phases = Phases(args, url, pids)
    await phases.warm_up(slugs[0])
    await phases.run(
        "human pacing",
        slugs[1],
        args.participants,
        starts=arrival_times(args.participants, args.arrival_s, args.seed),
        pacing=human_pacing(args),
        replays=True,
        poll_s=args.poll_interval,
    )
    return phases.done


def human_pacing(args: argparse.Namespace) -> HumanPacing:
    return HumanPacing(scale=args.think_scale)


async def measure_stress(
    args: argparse.Namespace, url: str, slugs: tuple[str, str], pids: dict[str, int]
) -> dict[str, Phase]:
    """Warm-up (on the first study), then the --levels (on the second), replaying, polling every
    --poll-interval."""
    phases = Phases(args, url, pids)
    await phases.warm_up(slugs[0])
    await phases.run("stress", slugs[1], 0, levels=args.levels, replays=True, poll_s=args.poll_interval)
    return phases.done
