"""``fspo synth`` and ``fspo synth stats``: generate a synthetic preference dataset, and describe datasets."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from .ui import out, progress_bar


def stats_table(stats: Sequence[dict[str, Any]], title: str = "Synthetic datasets") -> Table:
    from ..synth.stats import stats_rows

    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    columns = [dict(stats_rows(s)) for s in stats]
    for s in stats:
        name = s["domain"] + (" (random)" if s["mode"] == "random" else "")
        table.add_column(name, justify="right")
    for label in columns[0]:
        table.add_row(label, *[c[label] for c in columns])
    return table


def _synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo synth",
        description="Generate a synthetic preference dataset "
        "(procedural world by default, or an LLM through --llm).",
    )
    p.add_argument(
        "--domain", default="elix", help="reviews | elix | roleplay | path/to/domain.yaml (default: elix)"
    )
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--pairs-per-user", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (default: data/<domain>-<users>x<pairs>)")
    p.add_argument(
        "--mode",
        choices=["structured", "random"],
        default="structured",
        help="random = the unstructured ablation: labels not tied to personas, no refinement",
    )
    p.add_argument(
        "--questions", type=int, default=None, help="questions drawn from the domain's bank (default: all)"
    )
    p.add_argument("--responses-per-question", type=int, default=16)
    p.add_argument("--max-rounds", type=int, default=3, help="iterative persona improvement rounds")
    p.add_argument(
        "--structures",
        type=_structure_mix,
        default=None,
        metavar="NAME=WEIGHT,...",
        help="draw users' preference structures from this mix, e.g. weighted=2,topical=1,bimodal=1,noisy=1 "
        "(default: every user weighted, as before structures existed)",
    )
    p.add_argument(
        "--held-out-structures",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        default=[],
        metavar="NAME,...",
        help="structures whose users are all held-out test users (never trained on)",
    )
    p.add_argument(
        "--llm",
        default=None,
        metavar="SPEC",
        help="use an LLM instead of the procedural world: http://HOST:PORT/v1#MODEL or a local model directory",
    )
    _llm_stage_flags(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _structure_mix(text: str) -> dict[str, float]:
    """``weighted=2,topical=1`` -> {"weighted": 2.0, "topical": 1.0} (argparse reports a bad one)."""
    mix = {}
    for item in text.split(","):
        name, eq, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight) if eq else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=WEIGHT with a number") from None
    return mix


def _llm_stage_flags(p: argparse.ArgumentParser) -> None:
    """How the LLM stages sample (``LLMStages``' fields, None unless given) and the endpoint's concurrency."""
    from ..synth.llm_pipeline import LLMStages

    d = LLMStages()
    g = p.add_argument_group("LLM stages (with --llm; saved in the manifest's config.llm)")
    for stage, what in (
        ("question", "question writing"),
        ("response", "response writing"),
        ("persona", "persona writing"),
        ("refine", "persona refinement"),
    ):
        default = getattr(d, f"{stage}_temperature")
        g.add_argument(
            f"--{stage}-temperature",
            type=float,
            default=None,
            help=f"temperature of {what} (default {default:g})",
        )
    g.add_argument(
        "--judge-temperature",
        type=float,
        default=None,
        help=f"how the judge's letter is picked where no probabilities come back (default {d.judge_temperature:g}: "
        "the likelier)",
    )
    g.add_argument(
        "--top-p", type=float, default=None, help=f"nucleus of the writing stages (default {d.top_p:g})"
    )
    g.add_argument(
        "--judge-margin",
        type=float,
        default=None,
        help="a pair is decided when P(first is better), averaged over both orders, is more than this far "
        f"from 1/2 (default {d.judge_margin:g})",
    )
    g.add_argument(
        "--llm-concurrency",
        type=int,
        default=None,
        help="requests kept in flight to an http(s) endpoint (default 8; 1 = one at a time)",
    )


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo synth stats", description="Sizes, self-consistency and diversity of datasets."
    )
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument(
        "--no-embeddings", action="store_true", help="skip the MiniLM embedding diversity (faster)"
    )
    p.add_argument("--json", action="store_true")
    return p


def _synth_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SynthConfig`` fields the flags set (a structure mix only for the procedural world)."""
    options = dict(
        domain=args.domain,
        users=args.users,
        pairs_per_user=args.pairs_per_user,
        seed=args.seed,
        mode=args.mode,
        questions=args.questions,
        responses_per_question=args.responses_per_question,
        max_rounds=args.max_rounds,
    )
    if args.structures is not None or args.held_out_structures:
        if args.llm:
            raise ValueError(
                "--structures and --held-out-structures apply to the procedural world, not --llm"
            )
        options.update(structures=args.structures, held_out_structures=args.held_out_structures)
    return options


def cmd_synth(argv: list[str]) -> int:
    args = _synth_parser().parse_args(argv)
    out_dir = args.out or Path("data") / f"{Path(args.domain).stem}-{args.users}x{args.pairs_per_user}"
    options = _synth_options(args)
    from ..synth import SynthConfig, load_domain
    from ..synth.llm_pipeline import STAGE_FIELDS, LLMStages

    llm_only = {k: getattr(args, k) for k in (*STAGE_FIELDS, "llm_concurrency")}
    llm_only = {k: v for k, v in llm_only.items() if v is not None}
    if llm_only and not args.llm:
        flags = ", ".join("--" + k.replace("_", "-") for k in llm_only)
        raise ValueError(f"{flags} only apply with --llm")
    stages = LLMStages(**{k: v for k, v in llm_only.items() if k in STAGE_FIELDS})
    concurrency = llm_only.get("llm_concurrency")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--llm-concurrency must be >= 1, got {concurrency}")
    load_domain(args.domain)  # bad input fails here, before anything starts
    SynthConfig(**options)
    with progress_bar(f"synth {Path(args.domain).stem}") as update:
        if args.llm:
            from ..synth.llm_pipeline import generate_with_llm

            info = generate_with_llm(
                llm=args.llm,
                out_dir=out_dir,
                overwrite=args.overwrite,
                progress=update,
                stages=stages,
                llm_concurrency=concurrency,
                **options,
            )
        else:
            from ..synth import generate_dataset

            info = generate_dataset(out_dir=out_dir, overwrite=args.overwrite, progress=update, **options)
    if args.json:
        out.print_json(json.dumps(info.to_dict()))
    else:
        c = info.manifest["counts"]
        q = info.manifest["quality"]
        out.print(
            f"wrote {info.path}: {c['preferences']:,} pairs, {c['users']:,} users, {c['questions']:,} questions, "
            f"{c['responses']:,} responses; order-swap agreement {q['order_swap_agreement_initial']:.3f} → "
            f"{q['order_swap_agreement_final']:.3f} after refinement"
        )
        if "stages" in info.manifest:
            from ..synth.llm_pipeline import stages_line

            out.print(stages_line(info.manifest["stages"]), markup=False)
    return 0


def cmd_stats(argv: list[str]) -> int:
    args = _stats_parser().parse_args(argv)
    from ..synth.stats import dataset_stats

    stats = [dataset_stats(p, embeddings=not args.no_embeddings) for p in args.datasets]
    if args.json:
        out.print_json(json.dumps(stats))
    else:
        out.print(stats_table(stats))
    return 0
