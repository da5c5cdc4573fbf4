"""The ``fspo`` command line: one module per command family (synth, models, train, evaluate, analyze),
dispatched by ``main``; ``serve-model`` lives in ``modeling.serve``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .analyze import _analysis_table, cmd_analyze, cmd_analyze_crowd
from .data import cmd_data
from .evaluate import _print_eval, cmd_eval, cmd_probe
from .models import cmd_models
from .synth import _stats_parser, _synth_parser, cmd_stats, cmd_synth, stats_table
from .train import cmd_paper_table, cmd_train, cmd_train_memory, train_parser
from .ui import console, out, progress_bar, quiet_library_progress_bars

__all__ = [
    "USAGE",
    "cmd_analyze",
    "cmd_analyze_crowd",
    "cmd_data",
    "cmd_eval",
    "cmd_models",
    "cmd_paper_table",
    "cmd_probe",
    "cmd_stats",
    "cmd_synth",
    "cmd_train",
    "cmd_train_memory",
    "console",
    "main",
    "out",
    "progress_bar",
    "quiet_library_progress_bars",
    "stats_table",
    "train_parser",
    "_analysis_table",
    "_print_eval",
    "_stats_parser",
    "_synth_parser",
]

USAGE = """usage: fspo COMMAND [ARGS]

commands:
  synth         generate a synthetic preference dataset (fspo synth --help)
  synth stats   print sizes, self-consistency and diversity of datasets
  models        get a real pretrained model ready: fspo models pull smollm2-135m | convert FILE.gguf
  serve-model   serve a local model over an OpenAI-compatible API (fspo serve-model --help)
  train         one FSPO training stage: pretrain | sft (Pref-FT) | ipo | dpo (fspo train --help)
  train memory  the memory per GPU a training config needs (fspo train memory --help)
  eval          win rates of checkpoints against a baseline on held-out synthetic users
  paper-table   train every arm of the paper's comparison, then evaluate them
  probe         does a checkpoint read the user's shots? (own vs another user's vs no shots)
  analyze       analyses of a human study from its export: win rates, transfer, consistency, ...
  analyze crowd agreement, judges and rankings of an imported crowd (fspo analyze crowd --help)
  data import   import real annotators' judgments: fspo data import llmfao SOURCE --out DIR
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in (
        "train",
        "eval",
        "probe",
        "paper-table",
        "serve-model",
        "models",
    ):  # commands that load models
        quiet_library_progress_bars()
    from ..analysis import AnalysisInputError
    from ..data import EpisodeError
    from ..llm import LLMError
    from ..models import ModelError
    from ..synth import DatasetError, DomainError
    from ..train import CheckpointError

    try:
        if argv[:2] == ["synth", "stats"]:
            return cmd_stats(argv[2:])
        if argv[:1] == ["synth"]:
            return cmd_synth(argv[1:])
        if argv[:1] == ["models"]:
            return cmd_models(argv[1:])
        if argv[:1] == ["train"]:
            return cmd_train(argv[1:])
        if argv[:1] == ["eval"]:
            return cmd_eval(argv[1:])
        if argv[:1] == ["probe"]:
            return cmd_probe(argv[1:])
        if argv[:1] == ["paper-table"]:
            return cmd_paper_table(argv[1:])
        if argv[:1] == ["data"]:
            return cmd_data(argv[1:])
        if argv[:2] == ["analyze", "crowd"]:
            return cmd_analyze_crowd(argv[2:])
        if argv[:1] == ["analyze"]:
            return cmd_analyze(argv[1:])
        if argv[:1] == ["serve-model"]:
            from ..serve import serve_model_main

            return serve_model_main(argv[1:])
    except (
        AnalysisInputError,
        DomainError,
        DatasetError,
        LLMError,
        CheckpointError,
        EpisodeError,
        ModelError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; nothing half-written was published")
        return 130
    print(USAGE, file=sys.stderr if argv else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2
