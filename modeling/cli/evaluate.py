"""``fspo eval`` and ``fspo probe``: win rates of checkpoints on held-out synthetic users, and whether a
checkpoint reads the user's shots."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from .ui import out, progress_bar


def _print_eval(result: Any) -> None:
    table = Table(
        title=f"Win rate vs the baseline on held-out synthetic users ({result.out_dir}/report.md)",
        title_justify="left",
    )
    for col in ("arm", "win rate", "95% CI", "p (one-sided)", "mean oracle score"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in result.table:
        p = "—" if r.get("p_value") is None else f"{r['p_value']:.2g}"
        score = f"{r['mean_oracle_score']:.3f}" if "mean_oracle_score" in r else "—"
        table.add_row(
            r["arm"],
            f"{100 * r['win_rate']:.1f}%",
            f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}",
            p,
            score,
        )
    out.print(table)
    if result.shot_sweep:
        out.print(
            "shot sweep: "
            + ", ".join(f"N={r['shots']}: {100 * r['win_rate']:.1f}%" for r in result.shot_sweep)
        )
    for r in result.head_to_head:
        out.print(
            f"head to head: {r['arm']} vs {r['vs']} {100 * r['win_rate']:.1f}% "
            f"({100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}, p {r['p_value']:.2g}, {int(r['ties'])} ties)"
        )


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo eval", description="Win rates of arms against a baseline on held-out synthetic users."
    )
    p.add_argument("--dataset", required=True)
    p.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=PATH[:CONTEXT][:cot]",
        help="repeatable; CONTEXT is fewshot (default), none or description",
    )
    p.add_argument("--baseline", required=True, help="name of the arm the others are compared with")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--shot-sweep", type=int, nargs="*", default=[])
    p.add_argument("--sweep-arm", default=None)
    p.add_argument(
        "--head-to-head",
        nargs=2,
        action="append",
        default=[],
        metavar=("ARM", "OTHER"),
        help="repeatable; also judge ARM's answers directly against OTHER's on the same episodes",
    )
    p.add_argument(
        "--judge",
        default="oracle",
        metavar="oracle|SPEC",
        help="who compares each arm's answer with the baseline's. 'oracle' (default): the exact oracle of "
        "a procedural dataset. Otherwise an LLM judge, shown the user's description and asked in both "
        "orders (a judge that always picks the first position scores a tie; ties count as half a win): "
        "http(s)://HOST:PORT/v1#MODEL for an OpenAI-compatible chat endpoint (vLLM or fspo serve-model, "
        "which honour guided_choice; API key from OPENAI_API_KEY), or hf:/path/to/model-dir",
    )
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy; above 0 every arm samples with a fixed seed",
    )
    return p


def cmd_eval(argv: list[str]) -> int:
    from ..evaluate import Arm, evaluate

    args = eval_parser().parse_args(argv)
    judge = None
    if args.judge != "oracle":
        from ..judges import LLMJudge
        from ..llm import backend_from_spec

        judge = LLMJudge(backend_from_spec(args.judge))
    with progress_bar("eval") as update:
        result = evaluate(
            args.dataset,
            [Arm.parse(a) for a in args.arm],
            baseline=args.baseline,
            out_dir=args.out,
            episodes=args.episodes,
            shots=args.shots,
            judge=judge,
            shot_sweep=args.shot_sweep,
            sweep_arm=args.sweep_arm,
            head_to_head=[tuple(pair) for pair in args.head_to_head],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            progress=update,
        )
    _print_eval(result)
    return 0


def probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fspo probe",
        description="Does a checkpoint read the user's shots? Held-out pairs scored with the user's own shots, "
        "another user's shots and none.",
    )
    p.add_argument("--model", required=True, help="a checkpoint directory")
    p.add_argument("--dataset", required=True, help="a synthetic dataset (its held-out users are used)")
    p.add_argument("--episodes", type=int, default=96)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--style",
        action="store_true",
        help="instead: does it continue its context's style? (every shot in one style; answers read by the oracle)",
    )
    p.add_argument(
        "--contrast",
        action="store_true",
        help="with --style: the preferred responses in one style, the dispreferred in another",
    )
    p.add_argument("--json", action="store_true")
    return p


def cmd_probe(argv: list[str]) -> int:
    from ..evaluate import shot_sensitivity, style_following

    p = probe_parser()
    args = p.parse_args(argv)
    if args.contrast and not args.style:
        p.error("--contrast goes with --style")
    if args.style:
        s = style_following(
            args.model,
            args.dataset,
            episodes=args.episodes,
            shots=args.shots,
            seed=args.seed,
            contrast=args.contrast,
        )
        _print_style(s, as_json=args.json)
        return 0
    r = shot_sensitivity(args.model, args.dataset, episodes=args.episodes, shots=args.shots, seed=args.seed)
    if args.json:
        out.print_json(json.dumps(r.to_dict()))
        return 0
    lo, hi = r.margin_gain_ci
    out.print(
        f"{r.episodes} held-out pairs, {r.shots} shots: log p(chosen) > log p(rejected) in "
        f"{100 * r.accuracy_own:.1f}% with the user's own shots, {100 * r.accuracy_other:.1f}% with another "
        f"user's, {100 * r.accuracy_none:.1f}% with none; own-minus-other margin {r.margin_gain:+.3f} nats "
        f"(95% CI {lo:+.3f} to {hi:+.3f})"
    )
    return 0


def _print_style(s: Any, *, as_json: bool) -> None:
    """``fspo probe --style``'s answer: how often the answers continue the shots' style."""
    if as_json:
        out.print_json(json.dumps(s.to_dict()))
    elif s.contrast:
        out.print(
            f"{s.episodes} held-out prompts whose {s.shots} preferred responses share one style and "
            f"dispreferred responses another: {100 * s.match_rate:.1f}% of the answers in the preferred "
            f"style, {100 * (s.dispreferred_rate or 0):.1f}% in the dispreferred one (chance "
            f"{100 * s.chance:.1f}% each; style readable in {100 * s.detected:.1f}%)"
        )
    else:
        out.print(
            f"{s.episodes} held-out prompts whose {s.shots} shots share one style: "
            f"{100 * s.match_rate:.1f}% of the answers in that style (chance {100 * s.chance:.1f}%; "
            f"style readable in {100 * s.detected:.1f}%)"
        )
