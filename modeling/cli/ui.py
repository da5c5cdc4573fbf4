"""The CLI's output: rich consoles (tables on stdout, progress and messages on stderr) and the
progress bar every long command drives through the engine's ``progress(done, total, stage)`` callback."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
out = Console(soft_wrap=True)
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=132, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr, driven by the engine's ``progress(done, total, stage)`` callback."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None, stage="")

        def update(done: int, total: int, stage: str) -> None:
            bar.update(task, completed=done, total=total, stage=stage)

        yield update


def quiet_library_progress_bars() -> None:
    """Our own bar is the one to watch: silence the hub's and transformers' per-file bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
