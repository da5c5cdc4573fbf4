"""``fspo data import llmfao``: real annotators' judgments imported into the preference dataset format."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from .ui import console, out

SHOWN = 20  # skipped rows and repeats printed before "... and N more" (all of them are in dataset.json)


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo data import llmfao",
        description="Import the LLMFAO crowd (real crowd workers' pairwise judgments of LLM responses, with "
        "GPT-4's and GPT-3.5's judgments of the same pairs; CC BY 4.0, D. Ustalov) as a preference dataset: "
        "user = worker, question = prompt, the two responses, the winner (ties kept and marked). The "
        "manifest (dataset.json) carries the license, the attribution and the import report.",
    )
    p.add_argument("source", type=Path, help="the LLMFAO folder (crowd-comparisons.csv, results.jsonl, ...)")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def cmd_data(argv: list[str]) -> int:
    if argv[:2] != ["import", "llmfao"]:
        console.print("usage: fspo data import llmfao SOURCE --out DIR (the one importer so far)")
        return 2
    from ..llmfao import LICENSE, import_llmfao

    args = data_parser().parse_args(argv[2:])
    report = import_llmfao(args.source, args.out, overwrite=args.overwrite)
    table = Table(title=f"Imported {args.source} → {args.out}", title_justify="left")
    table.add_column("what")
    table.add_column("n", justify="right")
    rows = [
        ("judgments (crowd)", report.judgments),
        ("of them ties (kept, marked)", report.ties),
        ("workers (users)", report.workers),
        ("pairs", report.pairs),
        ("prompts (questions)", report.prompts),
        ("models", report.models),
        ("responses", report.responses),
        *((f"judgments by {judge}", n) for judge, n in report.judge_judgments.items()),
        ("consistency repeats (kept)", len(report.repeats)),
        ("broken rows skipped", len(report.skipped)),
        ("prompts no judgment uses (not imported)", report.unjudged_prompts),
        ("blank responses (a model answered nothing; kept)", report.empty_responses),
        ("judgments with a blank response on one side", report.judgments_of_empty),
    ]
    for what, n in rows:
        table.add_row(what, f"{n:,}")
    out.print(table)
    for s in report.skipped[:SHOWN]:
        out.print(f"skipped {s.file} line {s.line}: {s.reason}")
    for r in report.repeats[:SHOWN]:
        agree = "the same answer" if r["agree"] else "another answer"
        out.print(
            f"repeat: worker {r['worker']} judged pair again (judgment {r['judgment']} of {r['repeat_of']}): {agree}"
        )
    hidden = max(0, len(report.skipped) - SHOWN) + max(0, len(report.repeats) - SHOWN)
    if hidden:
        out.print(f"... and {hidden} more, listed in {args.out / 'dataset.json'} (import)")
    out.print(f"license {LICENSE}; attribution in {args.out / 'dataset.json'}")
    return 0
