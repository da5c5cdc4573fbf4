"""Evaluation on held-out synthetic users (``fspo eval``): the paper's comparison table.

Each *arm* is a checkpoint plus what its prompt holds about the user (few-shot pairs, nothing, or the
true persona description) and whether it writes a user description first (CoT). Every arm answers the
same held-out episodes (held-out users, held-out question topics); a judge compares each arm's answer
with the baseline arm's answer for that user; the table reports win rates with 95% intervals.

Outputs in the run folder: ``report.md``, ``results.json``, ``generations.jsonl`` and PNG plots.

- ``arms``: ``Arm``, ``generate_arm`` and ``evaluate`` (every arm against the baseline, ``EvalResult``);
- ``report``: the run folder's files (``report_markdown`` and the plots);
- ``probes``: does the model read the user's shots at all (``shot_sensitivity``, ``style_following``:
  ``fspo probe``)?
"""

from .arms import Arm, EvalResult, Progress, evaluate, generate_arm
from .probes import (
    ShotSensitivity,
    StyleFollowing,
    shot_sensitivity,
    style_following,
    style_prompts,
    styles_read,
)
from .report import report_markdown

__all__ = [
    "Arm",
    "EvalResult",
    "Progress",
    "ShotSensitivity",
    "StyleFollowing",
    "evaluate",
    "generate_arm",
    "report_markdown",
    "shot_sensitivity",
    "style_following",
    "style_prompts",
    "styles_read",
]
