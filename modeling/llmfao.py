"""The LLMFAO crowd (real annotators' pairwise judgments of LLM responses) imported into the project's
preference dataset format (docs/data-format.md), so the analyses run on real people offline.

Source: D. Ustalov, "Large Language Model Feedback Analysis and Optimization (LLMFAO)", 2023 (the public
repository dustalov/llmfao), CC BY 4.0; its prompts, models and responses come from the Crowdsourced LLM
Benchmark by llmonitor.com. The attribution travels in every imported dataset's manifest.

One crowd judgment becomes one row of ``preferences.parquet``: user = worker, question = prompt, the two
responses (``left_id`` shown on the left, ``right_id`` on the right) and ``winner`` (left, right or tie).
A tie is kept and marked (``tie``; its chosen/rejected are left/right only to fill the columns: readers
that train must drop ties). The GPT-4 and GPT-3.5 judgments of the same pairs go to ``judges.parquet``.

Checks on the way in: a missing file, a malformed reference table (prompts, models, results), an unknown
prompt or model id, a pair with no response text, a pair id that names two different pairs, or a judge's
duplicate judgment id is an error (nothing is written). A crowd or judge row that cannot be read (a missing
field, a non-integer id, an unknown winner, a display name that is not its model's, both sides the same
model) is skipped and listed with its line. A worker who judged the same pair twice keeps both judgments;
the second is marked as a consistency repeat (``repeat_of``, ``repeat_agree``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .synth.storage import (
    PREFERENCES_SCHEMA,
    QUESTIONS_SCHEMA,
    DatasetError,
    DatasetWriter,
    load_dataset,
    responses_schema,
    users_schema,
)

ENV_DIR = "FSPO_LLMFAO_DIR"  # where the source files are, when not given (tests, docs)
BACKEND = "imported:llmfao"
LICENSE = "CC BY 4.0"
ATTRIBUTION = (
    "LLMFAO by Dmitry Ustalov (D. Ustalov, 'Large Language Model Feedback Analysis and Optimization "
    "(LLMFAO)', 2023; github.com/dustalov/llmfao), CC BY 4.0: the pairs, the crowd and GPT comparisons and "
    "the instructions. The prompts, models and responses come from the Crowdsourced LLM Benchmark by "
    "llmonitor.com. Imported unchanged in content; converted to the fspo preference format."
)
CROWD_FILE = "crowd-comparisons.csv"
JUDGE_FILES = {"gpt-4": "gpt4-crowd-comparisons.csv", "gpt-3.5": "gpt3-crowd-comparisons.csv"}
REFERENCE_FILES = ("prompts.jsonl", "models.jsonl", "results.jsonl")
WINNERS = ("left", "right", "tie")
SPLIT = "test"  # nobody trains on real people's judgments: every user and question is held out
MAX_LISTED = 5  # lines an error message names before "and N more"

JUDGES_SCHEMA = pa.schema(
    [
        pa.field("judge", pa.string()),
        pa.field("llmfao_pair_id", pa.int64()),
        pa.field("question_id", pa.int32()),
        pa.field("left_id", pa.int32()),
        pa.field("right_id", pa.int32()),
        pa.field("winner", pa.string()),
    ]
)
IMPORT_COLUMNS = [
    pa.field("llmfao_pair_id", pa.int64()),  # the source's pair id (its `id` column)
    pa.field("left_id", pa.int32()),
    pa.field("right_id", pa.int32()),
    pa.field("winner", pa.string()),  # left, right or tie
    pa.field("tie", pa.bool_()),
    pa.field("repeat_of", pa.int64()),  # the earlier judgment of the same pair by the same worker
]


class LLMFAOError(DatasetError):
    """The LLMFAO files cannot be imported as they are (a one-line message; nothing was written)."""


@dataclass(frozen=True)
class Skip:
    file: str
    line: int  # 1-based line of the file (the CSV header is line 1)
    reason: str


@dataclass
class ImportReport:
    """What an import read, kept, skipped and found repeated."""

    source: str
    judgments: int = 0
    workers: int = 0
    pairs: int = 0
    prompts: int = 0
    models: int = 0
    responses: int = 0
    ties: int = 0
    judge_judgments: dict[str, int] = field(default_factory=dict)
    repeats: list[dict[str, int]] = field(default_factory=list)  # judgment, repeat_of, worker, agree
    skipped: list[Skip] = field(default_factory=list)
    unjudged_prompts: int = 0  # prompts (and their responses) no crowd judgment uses: not imported
    empty_responses: int = 0  # imported responses whose text is blank (a model that answered nothing): kept
    judgments_of_empty: int = 0  # crowd judgments with a blank response on one side

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Where this workplace keeps the shared data, for a clone that does not sit beside it (CI's clean clone).
WORKPLACE_SHARED = Path("/work/shared/data/llmfao")


def default_source() -> Path:
    """The LLMFAO folder: ``$FSPO_LLMFAO_DIR``, else ``shared/data/llmfao`` beside the repository, else
    the workplace's shared folder (WORKPLACE_SHARED) when the clone is elsewhere."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llmfao"
    return beside if beside.is_dir() or not WORKPLACE_SHARED.is_dir() else WORKPLACE_SHARED


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def _read_jsonl(
    path: Path, required: tuple[str, ...], key: Callable[[dict[str, Any]], Any]
) -> dict[Any, Any]:
    """A reference table as {key: row}; any unreadable line, missing field or duplicate key is an error."""
    rows: dict[Any, Any] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMFAOError(f"{path.name} line {n}: not valid JSON ({e.msg})") from None
        missing = [f for f in required if not isinstance(row, dict) or row.get(f) is None]
        if missing:
            raise LLMFAOError(f"{path.name} line {n}: missing {', '.join(missing)}")
        k = key(row)
        if k in rows:
            raise LLMFAOError(f"{path.name} line {n}: duplicate id {k}")
        rows[k] = row
    return rows


@dataclass
class _Reference:
    prompts: dict[int, dict[str, Any]]
    models: dict[int, dict[str, Any]]
    results: dict[tuple[int, int], dict[str, Any]]  # (prompt, model) -> the response


def _read_reference(source: Path) -> _Reference:
    prompts = _read_jsonl(source / "prompts.jsonl", ("id", "text", "slug"), lambda r: int(r["id"]))
    models = _read_jsonl(source / "models.jsonl", ("id", "name"), lambda r: int(r["id"]))
    results = _read_jsonl(
        source / "results.jsonl",
        ("id", "model", "prompt", "result"),
        lambda r: (int(r["prompt"]), int(r["model"])),
    )
    unknown = [
        f"response {r['id']} (prompt {p}, model {m})"
        for (p, m), r in results.items()
        if p not in prompts or m not in models
    ]
    if unknown:
        raise LLMFAOError(f"results.jsonl: responses to unknown prompts or models: {_listed(unknown)}")
    ids = [int(r["id"]) for r in results.values()]
    if len(set(ids)) != len(ids):
        raise LLMFAOError("results.jsonl: duplicate response ids")
    return _Reference(prompts, models, results)


@dataclass(frozen=True)
class _Row:
    line: int
    pair: int
    prompt: int
    left: int  # model ids
    right: int
    winner: str
    worker: int | None  # None for a judge's row


def _parse_row(raw: dict[str, str | None], line: int, ref: _Reference, *, crowd: bool) -> _Row | str:
    """One CSV row, or why it cannot be read (a broken row: skipped and listed)."""
    names = ["id", "prompt", "model_x", "model_y"] + (["worker"] if crowd else [])
    try:
        ints = [int(str(raw.get(c)).strip()) for c in names]
    except ValueError:
        return f"a missing or non-integer field among {', '.join(names)}"
    winner = (raw.get("winner") or "").strip()
    if winner not in WINNERS:
        return f"winner {winner!r} is not one of left, right, tie"
    pair, prompt, left, right = ints[:4]
    if left == right:
        return f"both sides are model {left}"
    for side, model in (("left", left), ("right", right)):
        shown = (raw.get(side) or "").strip()
        known = ref.models.get(model)
        if known is not None and shown != known["name"]:
            return f"{side} {shown!r} is not the name of model {model} ({known['name']!r})"
    return _Row(line, pair, prompt, left, right, winner, ints[4] if crowd else None)


def _read_rows(path: Path, ref: _Reference, report: ImportReport, *, crowd: bool) -> list[_Row]:
    """Every readable row of a comparisons CSV; broken rows go to the report's skips."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"id", "prompt", "model_x", "model_y", "winner", "left", "right"} | (
            {"worker"} if crowd else set()
        )
        missing = sorted(need - set(reader.fieldnames or []))
        if missing:
            raise LLMFAOError(f"{path.name}: missing columns {', '.join(missing)}")
        rows: list[_Row] = []
        for raw in reader:
            parsed = _parse_row(raw, reader.line_num, ref, crowd=crowd)
            if isinstance(parsed, str):
                report.skipped.append(Skip(path.name, reader.line_num, parsed))
            else:
                rows.append(parsed)
    return rows


def _check_known(rows: list[_Row], ref: _Reference, file: str) -> None:
    """Unknown prompt or model ids, and pairs with no response text, are errors: the files do not belong
    together."""
    bad = []
    for r in rows:
        if r.prompt not in ref.prompts:
            bad.append(f"line {r.line}: unknown prompt {r.prompt}")
        for m in (r.left, r.right):
            if m not in ref.models:
                bad.append(f"line {r.line}: unknown model {m}")
            elif r.prompt in ref.prompts and (r.prompt, m) not in ref.results:
                bad.append(f"line {r.line}: no response of model {m} to prompt {r.prompt} in results.jsonl")
    if bad:
        raise LLMFAOError(f"{file}: {_listed(bad)}")


def _pairs(rows: list[_Row]) -> dict[int, tuple[int, int, int]]:
    """The source's pair ids, each naming one (prompt, left model, right model)."""
    pairs: dict[int, tuple[int, int, int]] = {}
    first: dict[int, int] = {}
    for r in rows:
        key = (r.prompt, r.left, r.right)
        if pairs.setdefault(r.pair, key) != key:
            raise LLMFAOError(
                f"{CROWD_FILE}: pair id {r.pair} names two different pairs (lines {first[r.pair]} and {r.line})"
            )
        first.setdefault(r.pair, r.line)
    return pairs


def _judge_rows(
    source: Path, ref: _Reference, pairs: dict[int, tuple[int, int, int]], report: ImportReport
) -> list[tuple[str, _Row]]:
    """The GPT judges' rows: one per pair id and judge, on the crowd's pairs with the same sides."""
    out: list[tuple[str, _Row]] = []
    for judge, name in JUDGE_FILES.items():
        rows = _read_rows(source / name, ref, report, crowd=False)
        _check_known(rows, ref, name)
        seen: dict[int, int] = {}
        for r in rows:
            if r.pair in seen:
                raise LLMFAOError(
                    f"{name}: duplicate judgment id {r.pair} (lines {seen[r.pair]} and {r.line})"
                )
            seen[r.pair] = r.line
            if pairs.get(r.pair) != (r.prompt, r.left, r.right):
                raise LLMFAOError(
                    f"{name} line {r.line}: pair {r.pair} is not the crowd's pair "
                    f"(prompt {r.prompt}, models {r.left} and {r.right})"
                )
            out.append((judge, r))
        report.judge_judgments[judge] = len(rows)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_source_files(source: Path) -> None:
    """LLMFAOError, naming the folder and what it lacks, when `source` is not a folder of LLMFAO's files."""
    if not source.is_dir():
        raise LLMFAOError(
            f"{source}: no such folder (the LLMFAO files; set {ENV_DIR} or pass the folder that holds them)"
        )
    names = [CROWD_FILE, *JUDGE_FILES.values(), *REFERENCE_FILES]
    missing = [n for n in names if not (source / n).is_file()]
    if missing:
        raise LLMFAOError(f"{source}: missing {', '.join(missing)}")


def read_llmfao(source: str | Path) -> tuple[ImportReport, dict[str, pa.Table]]:
    """Read and check the LLMFAO folder; its tables in the dataset format, and what was read. Raises
    LLMFAOError (nothing to write) on files that do not belong together."""
    source = Path(source)
    check_source_files(source)
    report = ImportReport(source=str(source))
    ref = _read_reference(source)
    crowd = _read_rows(source / CROWD_FILE, ref, report, crowd=True)
    if not crowd:
        raise LLMFAOError(f"{CROWD_FILE}: no readable judgment")
    _check_known(crowd, ref, CROWD_FILE)
    pairs = _pairs(crowd)
    judged = _judge_rows(source, ref, pairs, report)
    tables = _tables(crowd, judged, ref, report)
    return report, tables


def _preferences(crowd: list[_Row], ref: _Reference, report: ImportReport) -> pa.Table:
    """One row per crowd judgment; a worker's second judgment of the same pair (either side order) is a
    repeat of the first."""
    response = {k: int(r["id"]) for k, r in ref.results.items()}
    first: dict[tuple[int, int, frozenset[int]], tuple[int, int]] = {}  # -> (judgment id, chosen or -1)
    cols: dict[str, list[Any]] = {f.name: [] for f in [*PREFERENCES_SCHEMA, *IMPORT_COLUMNS]}
    for jid, r in enumerate(crowd):
        left, right = response[(r.prompt, r.left)], response[(r.prompt, r.right)]
        chosen, rejected = (right, left) if r.winner == "right" else (left, right)
        verdict = -1 if r.winner == "tie" else chosen
        key = (int(r.worker or 0), r.prompt, frozenset((left, right)))
        earlier = first.setdefault(key, (jid, verdict))
        is_repeat = earlier[0] != jid
        if is_repeat:
            report.repeats.append(
                {
                    "judgment": jid,
                    "repeat_of": earlier[0],
                    "worker": key[0],
                    "agree": int(earlier[1] == verdict),
                }
            )
        values = {
            "pair_id": jid,
            "user_id": key[0],
            "question_id": r.prompt,
            "chosen_id": chosen,
            "rejected_id": rejected,
            "user_split": SPLIT,
            "question_split": SPLIT,
            "margin": float("nan"),
            "repeat_agree": (earlier[1] == verdict) if is_repeat else None,
            "round": 0,
            "llmfao_pair_id": r.pair,
            "left_id": left,
            "right_id": right,
            "winner": r.winner,
            "tie": r.winner == "tie",
            "repeat_of": earlier[0] if is_repeat else None,
        }
        for name, value in values.items():
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=pa.schema([*PREFERENCES_SCHEMA, *IMPORT_COLUMNS]))


def _people_and_prompts(crowd: list[_Row], ref: _Reference) -> dict[str, pa.Table]:
    """The users (workers), questions (the prompts the crowd judged) and responses tables."""
    prompts = sorted({r.prompt for r in crowd})
    workers = sorted({int(r.worker or 0) for r in crowd})
    results = sorted(
        (r for (p, _), r in ref.results.items() if p in set(prompts)), key=lambda r: int(r["id"])
    )
    n = len(workers)
    users = {"user_id": workers, "split": [SPLIT] * n, "description": [""] * n}
    users |= {"description_initial": [""] * n, "refinement_rounds": [0] * n}
    questions = {
        "question_id": prompts,
        "split": [SPLIT] * len(prompts),
        "topic": [str(ref.prompts[p]["slug"]) for p in prompts],
        "text": [str(ref.prompts[p]["text"]) for p in prompts],
    }
    names = [str(ref.models[int(r["model"])]["name"]) for r in results]
    responses = {
        "response_id": [int(r["id"]) for r in results],
        "question_id": [int(r["prompt"]) for r in results],
        "source": [f"llmfao:{name}" for name in names],
        "text": [str(r["result"]) for r in results],
        "model_id": [int(r["model"]) for r in results],
        "model_name": names,
    }
    extra = [pa.field("model_id", pa.int32()), pa.field("model_name", pa.string())]
    return {
        "users": pa.Table.from_pydict(users, schema=users_schema([], [])),
        "questions": pa.Table.from_pydict(questions, schema=QUESTIONS_SCHEMA),
        "responses": pa.Table.from_pydict(responses, schema=pa.schema([*responses_schema([]), *extra])),
    }


def _judges(judged: list[tuple[str, _Row]], ref: _Reference) -> pa.Table:
    response = {k: int(r["id"]) for k, r in ref.results.items()}
    columns = {
        "judge": [j for j, _ in judged],
        "llmfao_pair_id": [r.pair for _, r in judged],
        "question_id": [r.prompt for _, r in judged],
        "left_id": [response[(r.prompt, r.left)] for _, r in judged],
        "right_id": [response[(r.prompt, r.right)] for _, r in judged],
        "winner": [r.winner for _, r in judged],
    }
    return pa.Table.from_pydict(columns, schema=JUDGES_SCHEMA)


def _tables(
    crowd: list[_Row], judged: list[tuple[str, _Row]], ref: _Reference, report: ImportReport
) -> dict[str, pa.Table]:
    tables = _people_and_prompts(crowd, ref)
    tables["preferences"] = _preferences(crowd, ref, report)
    tables["judges"] = _judges(judged, ref)
    report.judgments, report.workers = len(crowd), tables["users"].num_rows
    report.prompts, report.responses = tables["questions"].num_rows, tables["responses"].num_rows
    report.pairs = len({r.pair for r in crowd})
    report.models = len({m for r in crowd for m in (r.left, r.right)})
    report.ties = sum(r.winner == "tie" for r in crowd)
    report.unjudged_prompts = len(ref.prompts) - report.prompts
    texts = tables["responses"].to_pandas()
    blank = set(texts.loc[texts["text"].str.strip() == "", "response_id"])
    report.empty_responses = len(blank)
    report.judgments_of_empty = sum(
        int(left in blank or right in blank)
        for left, right in zip(
            tables["preferences"]["left_id"].to_pylist(),
            tables["preferences"]["right_id"].to_pylist(),
            strict=True,
        )
    )
    return tables


def import_llmfao(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ImportReport:
    """Import the LLMFAO folder `source` as a dataset at `out_dir` (format fspo-synth 1, backend
    ``imported:llmfao``, plus ``judges.parquet``), its manifest carrying the license, the attribution,
    the source files' hashes and the import report. Everything is read and checked before anything is
    written; the dataset is published whole or not at all."""
    source = Path(source)
    report, tables = read_llmfao(source)
    writer = DatasetWriter(Path(out_dir), overwrite=overwrite)
    try:
        for name, table in tables.items():
            writer.write(name, table)
        writer.close(
            {
                "domain": "llmfao",
                "domain_source": str(source),
                "domain_sha256": None,
                "backend": BACKEND,
                "mode": "imported",
                "config": {},
                "traits": {},
                "attributes": {},
                "quality": {},
                "license": LICENSE,
                "attribution": ATTRIBUTION,
                "source_files": {
                    n: _sha256(source / n) for n in [CROWD_FILE, *JUDGE_FILES.values(), *REFERENCE_FILES]
                },
                "import": report.to_json(),
            }
        )
    except BaseException:
        writer.abort()
        raise
    return report


# --- an imported dataset read back, for loading into a study on the site --------------------------------


@dataclass(frozen=True)
class CrowdJudgment:
    """One crowd judgment of an imported dataset: the worker, the prompt, the responses shown left and
    right, the winner (left, right or tie), and the judgment it repeats (its index in ``judgments``)."""

    worker: int
    question_id: int
    left_id: int
    right_id: int
    winner: str
    repeat_of: int | None


@dataclass(frozen=True)
class ImportedCrowd:
    """An imported LLMFAO dataset as plain rows: prompts (id -> (topic, text)), responses (id -> (model
    name, prompt id, text)), the judgments in the dataset's order, and the manifest's license, attribution
    and source hashes (``fingerprint``: one hash over them, the same for the same source files)."""

    prompts: dict[int, tuple[str, str]]
    responses: dict[int, tuple[str, int, str]]
    judgments: list[CrowdJudgment]
    license: str
    attribution: str
    fingerprint: str


def read_imported(path: str | Path) -> ImportedCrowd:
    """The dataset `fspo data import llmfao` wrote at `path`; LLMFAOError when it is not one."""
    ds = load_dataset(path)
    manifest = ds.manifest
    if manifest.get("backend") != BACKEND or not manifest.get("attribution"):
        raise LLMFAOError(
            f"{path}: not an imported LLMFAO dataset (backend {manifest.get('backend')!r}); "
            "make one with fspo data import llmfao"
        )
    questions = ds.table("questions", columns=["question_id", "topic", "text"]).to_pylist()
    responses = ds.table("responses", columns=["response_id", "model_name", "question_id", "text"])
    prefs = ds.table(
        "preferences",
        columns=["pair_id", "user_id", "question_id", "left_id", "right_id", "winner", "repeat_of"],
    ).to_pylist()
    index = {int(p["pair_id"]): i for i, p in enumerate(prefs)}
    judgments = [
        CrowdJudgment(
            worker=int(p["user_id"]),
            question_id=int(p["question_id"]),
            left_id=int(p["left_id"]),
            right_id=int(p["right_id"]),
            winner=str(p["winner"]),
            repeat_of=None if p["repeat_of"] is None else index[int(p["repeat_of"])],
        )
        for p in prefs
    ]
    sources = json.dumps(manifest.get("source_files", {}), sort_keys=True)
    return ImportedCrowd(
        prompts={int(q["question_id"]): (str(q["topic"]), str(q["text"])) for q in questions},
        responses={
            int(r["response_id"]): (str(r["model_name"]), int(r["question_id"]), str(r["text"]))
            for r in responses.to_pylist()
        },
        judgments=judgments,
        license=str(manifest.get("license", "")),
        attribution=str(manifest["attribution"]),
        fingerprint=hashlib.sha256(sources.encode()).hexdigest(),
    )
