"""The site bench's load generator: simulated participants (studyapp.scripted_participant, choosing at
random) walked in phases, one after another or all at once in one event loop, every request timed."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from site_setup import COMPLETION_CODE

from studyapp.scripted_participant import SIDES, CheckFailed, Recorder, ScriptedParticipant, Walk

READY_POLL_S = 0.05  # the sequential measurement polls faster, so it times the worker, not the interval


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


@dataclass
class Phase:
    """One phase's participants and every request they made. Each one's record goes into `walked` as
    they start and fills in as they go (so a timeout leaves what was done); `finished` counts those who
    completed or stopped at an error, not those the phase's timeout cut off."""

    recorder: Recorder = field(default_factory=Recorder)
    walked: list[Walk] = field(default_factory=list)
    finished: int = 0
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)


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
    concurrent: bool,
    label: str,
) -> None:
    """Walk `count` participants (all at once, or one after another) under a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}")) as progress:
        bar = progress.add_task(label, total=count, info="")

        async def one(i: int) -> None:
            participant = make(i)
            phase.walked.append(participant.walked)
            await walk_recorded(participant)
            phase.finished += 1
            rec = participant.rec
            info = f"{len(rec.samples):,} requests, {sum(rec.errors.values())} errors"
            progress.update(bar, advance=1, info=info)

        if concurrent:
            await asyncio.gather(*(one(i) for i in range(count)))
        else:
            for i in range(count):
                await one(i)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each process, and by this one (the simulated browsers)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    own = os.times()
    return used | {"simulated participants (this process)": own.user + own.system}


async def measure(
    args: argparse.Namespace, url: str, slugs: tuple[str, str], pids: dict[str, int]
) -> dict[str, Phase]:
    """The three phases: warm-up (every worker loads the model), sequential (on the first study), load
    (on the second), each bounded by --timeout; the load test's participants poll every
    --poll-interval, as the page does, and replay."""
    run_id = secrets.token_hex(3)
    phases: dict[str, Phase] = {}

    async def phase(name: str, slug: str, count: int, *, concurrent: bool, **options: Any) -> None:
        phases[name] = record = Phase()

        def make(i: int) -> ScriptedParticipant:
            rid = f"bench-{run_id}-{name.replace(' ', '-')}-{i:04d}"
            return ScriptedParticipant(
                url,
                slug,
                rid,
                chooser=RandomChoices(f"{name}:{i}"),
                study_id="bench",
                session_id=f"s-{rid}",
                recorder=record.recorder,
                wait_timeout_s=args.timeout,
                request_timeout_s=120,
                completion_code=COMPLETION_CODE,
                **options,
            )

        work = run_participants(make, count, record, concurrent=concurrent, label=f"{name:<12}")
        start, cpu_before = time.perf_counter(), cpu_seconds(pids)
        try:
            await asyncio.wait_for(work, timeout=args.timeout)
        except TimeoutError:
            for _ in range(count - record.finished):
                record.recorder.error("timeout", f"{name}: not done within --timeout {args.timeout:.0f} s")
        record.cpu_s = {k: v - cpu_before[k] for k, v in cpu_seconds(pids).items()}
        record.seconds = time.perf_counter() - start

    seq_slug, load_slug = slugs
    # Every worker loads the model with its first task: one participant per worker first, not timed.
    await phase("warm-up", seq_slug, args.workers, concurrent=True, replays=False, poll_s=READY_POLL_S)
    await phase("sequential", seq_slug, args.sequential, concurrent=False, replays=False, poll_s=READY_POLL_S)
    await phase(
        "load test", load_slug, args.participants, concurrent=True, replays=True, poll_s=args.poll_interval
    )
    return phases
