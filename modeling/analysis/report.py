"""Every analysis of one study in one call (`analyze`), and its report: report.md, analysis.json and the
PNG plots (`write_report`, `report_files`), as `fspo analyze` writes them and the studio page offers them."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plots, population
from .agreement import Consistency, consistency
from .data import AnalysisInputError, StudyData
from .population import DescriptionQuality, DistributionShift, Embedder, PersonaDistribution
from .rules import ExclusionRules, Selection, select_participants
from .stats import DEFAULT_RESAMPLES, DEFAULT_SEED
from .winrates import (
    HumanWinRates,
    ShotSensitivity,
    SyntheticEval,
    Transfer,
    human_win_rates,
    shot_sensitivity,
    synthetic_transfer,
)

REPORT = "report.md"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_FORMAT = "fspo-study-analysis/1"


@dataclass(frozen=True)
class AnalysisOptions:
    """`rules`: who is counted; `seed`, `resamples`: the bootstraps; `embeddings`: compute description
    similarities with the offline MiniLM model (its first use loads it, a few seconds)."""

    rules: ExclusionRules = dataclasses.field(default_factory=ExclusionRules)
    seed: int = DEFAULT_SEED
    resamples: int = DEFAULT_RESAMPLES
    embeddings: bool = True

    def __post_init__(self) -> None:
        if self.resamples < 100:
            raise ValueError(f"a bootstrap needs at least 100 resamples, not {self.resamples}")


@dataclass(frozen=True)
class SyntheticInputs:
    """What the analyses compare real participants with: an `fspo eval` run (`evaluation`), the
    synthetic users' persona distribution (`personas`), and the data engine's consistency figures
    (`quality`, a dataset manifest's quality block, from `quality_source`)."""

    evaluation: SyntheticEval | None = None
    personas: PersonaDistribution | None = None
    quality: dict[str, Any] | None = None
    quality_source: str | None = None


def synthetic_inputs(
    *,
    domain: str,
    evaluation: SyntheticEval | None = None,
    dataset: str | Path | None = None,
) -> SyntheticInputs:
    """The synthetic side: a dataset gives the persona distribution and the engine's consistency
    figures; without one, a built-in domain's persona sampling weights stand in for the distribution."""
    quality = source = None
    if dataset is not None:
        personas = population.persona_distribution_from_dataset(dataset)
        manifest = json.loads((Path(dataset) / "dataset.json").read_text())
        if manifest.get("domain") != domain:
            raise AnalysisInputError(
                f"synthetic dataset {dataset} is of domain {manifest.get('domain')!r}, the study of {domain!r}"
            )
        quality, source = manifest.get("quality"), f"synthetic dataset {dataset}"
    else:
        try:
            personas = population.persona_distribution_from_domain(domain)
        except AnalysisInputError:
            personas = None
    return SyntheticInputs(evaluation, personas, quality, source)


@dataclass(frozen=True)
class StudyAnalysis:
    """Every analysis of one study, computed on the same counted participants."""

    study: dict[str, Any]
    source: str
    options: AnalysisOptions
    selection: Selection
    win_rates: HumanWinRates
    transfer: Transfer
    consistency: Consistency
    shots: ShotSensitivity
    shift: DistributionShift
    descriptions: DescriptionQuality

    @property
    def sections(self) -> list[tuple[str, Any]]:
        return [
            ("win_rates", self.win_rates),
            ("transfer", self.transfer),
            ("consistency", self.consistency),
            ("shots", self.shots),
            ("shift", self.shift),
            ("descriptions", self.descriptions),
        ]

    def own_rules(self, result: Any) -> list[str]:
        """A result's rules other than the exclusion rules (shown once, and summarized beside each)."""
        return [r for r in result.rules if r not in self.selection.lines]

    def to_json(self) -> dict[str, Any]:
        """Every number, rule and message, as analysis.json holds them (no NaN: a missing number is
        null, with the message that says why)."""
        return _clean(
            {
                "format": ANALYSIS_FORMAT,
                "study": self.study,
                "source": self.source,
                "options": dataclasses.asdict(self.options),
                "selection": self.selection.to_json(),
                **{name: dataclasses.asdict(result) for name, result in self.sections},
            }
        )

    def figures(self) -> dict[str, bytes]:
        """The plots, by file name, for the analyses that have numbers to show."""
        made = {
            "win_rates.png": plots.win_rates_plot(self.win_rates),
            "transfer.png": plots.transfer_plot(self.transfer),
            "consistency.png": plots.consistency_plot(self.consistency),
            "shots.png": plots.shots_plot(self.shots),
            "shift.png": plots.shift_plot(self.shift),
            "descriptions.png": plots.descriptions_plot(self.descriptions),
        }
        return {name: png for name, png in made.items() if png is not None}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("an analysis produced a NaN or infinite number")
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


STUDY_FIELDS = (
    "slug",
    "title",
    "domain",
    "n_pairs",
    "complete",
    "is_open",
    "participants",
    "participants_completed",
    "participants_in_progress",
    "participants_withdrawn",
    "schema_version",
)


def analyze(
    data: StudyData,
    *,
    options: AnalysisOptions | None = None,
    synthetic: SyntheticInputs | None = None,
    embedder: Embedder | None = None,
    embedder_name: str = population.MINILM,
) -> StudyAnalysis:
    """Run every analysis on `data` with the same exclusion rules. Descriptions are embedded with
    `embedder` (named `embedder_name`), by default the offline MiniLM model; not at all when
    options.embeddings is off."""
    options = options or AnalysisOptions()
    synthetic = synthetic or SyntheticInputs()
    selection = select_participants(data, options.rules)
    boot = {"seed": options.seed, "resamples": options.resamples}
    human = human_win_rates(data, selection, **boot)
    embed: Embedder | None
    if not options.embeddings:
        embed, model = None, "embeddings were turned off for this report"
    elif embedder is not None:
        embed, model = embedder, embedder_name
    else:
        embed, model = population.minilm_embedder()
    return StudyAnalysis(
        study={k: data.study[k] for k in STUDY_FIELDS},
        source=data.source,
        options=options,
        selection=selection,
        win_rates=human,
        transfer=synthetic_transfer(data, human, synthetic.evaluation),
        consistency=consistency(
            data,
            selection,
            synthetic_quality=synthetic.quality,
            synthetic_source=synthetic.quality_source,
            **boot,
        ),
        shots=shot_sensitivity(data, selection, **boot),
        shift=population.distribution_shift(data, selection, synthetic.personas),
        descriptions=population.description_quality(data, selection, embedder=embed, model=model, **boot),
    )


# ---------------------------------------------------------------------------------------------------
# report.md


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ci(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"{100 * low:.1f}–{100 * high:.1f}"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1e}" if 0 < value < 1e-4 else f"{value:.2g}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _table(header: list[str], align: str, rows: list[list[Any]]) -> list[str]:
    """A Markdown table; `align` has one letter per column, l or r."""
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(sep) + " |",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows),
    ]


def _section(
    analysis: StudyAnalysis, result: Any, body: list[str], figure: str | None, figures: set[str]
) -> list[str]:
    title = result.title
    lines = ["", f"## {title}", ""]
    if result.message:
        lines += [f"**Not computed:** {result.message}", ""]
    lines += body
    if figure and figure in figures:
        lines += ["", f"![{title}]({figure})"]
    notes = list(getattr(result, "notes", []))
    if notes:
        lines += ["", *(f"Note: {n}" for n in notes)]
    rules = [analysis.selection.summary, *analysis.own_rules(result)]
    lines += ["", "Rules:", "", *(f"- {r}" for r in rules)]
    return lines


def report_markdown(analysis: StudyAnalysis, figures: set[str]) -> str:
    """The report as Markdown, its images named as in `figures` (files beside it)."""
    lines = _heading(analysis)
    sections: list[tuple[Any, list[str], str]] = [
        (analysis.win_rates, _win_rates_body(analysis.win_rates), "win_rates.png"),
        (analysis.transfer, _transfer_body(analysis.transfer), "transfer.png"),
        (analysis.consistency, _consistency_body(analysis.consistency), "consistency.png"),
        (analysis.shots, _shots_body(analysis.shots), "shots.png"),
        (analysis.shift, _shift_body(analysis.shift), "shift.png"),
        (analysis.descriptions, _descriptions_body(analysis.descriptions), "descriptions.png"),
    ]
    for result, body, figure in sections:
        lines += _section(analysis, result, body, figure, figures)
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _heading(analysis: StudyAnalysis) -> list[str]:
    """The title, where the data comes from, and who is counted."""
    s = analysis.study
    status = (
        "final (closed, everyone finished)" if s["complete"] else "not final (the study is still running)"
    )
    return [
        f"# Analyses: {s['title']}",
        "",
        f"Study `{s['slug']}` (domain `{s['domain']}`); data from {analysis.source}, schema "
        f"`{s['schema_version']}`; {s['participants']} participants exported, {s['participants_completed']} "
        f"completed; {status}.",
        "",
        "## Who is counted",
        "",
        "Every analysis below counts the same participants, chosen by these rules:",
        "",
        *(f"- {line}" for line in analysis.selection.lines),
    ]


def _win_rates_body(w: HumanWinRates) -> list[str]:
    return (
        _table(
            [
                "arm",
                "baseline",
                "participants",
                "ratings",
                "wins",
                "ties",
                "win rate",
                "95% CI",
                "p (arm > 50%)",
                "p (two-sided)",
            ],
            "llrrrrrlrr",
            [
                [
                    r.arm,
                    r.baseline,
                    r.participants,
                    r.n,
                    f"{r.wins:g}",
                    r.ties,
                    _pct(r.win_rate),
                    _ci(r.ci_low, r.ci_high),
                    _p(r.p_greater),
                    _p(r.p_two_sided),
                ]
                for r in w.rows
            ],
        )  # fmt: skip
        + [""]
        + [f"- {r.arm} vs {r.baseline}: {r.message}" for r in w.rows if r.message]
    )


def _transfer_body(t: Transfer) -> list[str]:
    body = []
    if t.source:
        body += [f"Synthetic: `{t.source}`.", ""]
    if t.rows:
        body += _table(
            ["arm", "baseline", "synthetic arm", "synthetic win rate", "95% CI", "real win rate", "95% CI", "gap (synthetic − real)", "95% CI"],
            "lllrlrlrl",
            [
                [r.arm, r.baseline, r.synthetic_arm or "—", _pct(r.synthetic_win_rate),
                 _ci(*(r.synthetic_ci or (None, None))), _pct(r.real_win_rate), _ci(*(r.real_ci or (None, None))),
                 "—" if r.gap is None else f"{100 * r.gap:+.1f} pts",
                 "—" if r.gap_ci is None else f"{100 * r.gap_ci[0]:+.1f} to {100 * r.gap_ci[1]:+.1f}"]
                for r in t.rows
            ],
        )  # fmt: skip
        body += [""] + [f"- {r.arm} vs {r.baseline}: {m}" for r in t.rows for m in (*r.notes, r.message) if m]
    return body


def _consistency_body(c: Consistency) -> list[str]:
    body = []
    if c.agreement is not None:
        body += _table(
            ["who", "repeats", "agreement", "95% CI", "kappa"],
            "lrrlr",
            [["participants (pooled)", c.repeats, _pct(c.agreement), _ci(c.ci_low, c.ci_high), _num(c.kappa)]]
            + [[f"synthetic: {text}", "—", _pct(v), "—", "—"] for _, text, v in c.synthetic],
        )
        body += ["", "Per participant:", ""]
        body += _table(
            ["participant", "repeats", "consistent", "agreement"],
            "lrrr",
            [[p.participant, p.repeats, p.consistent, _pct(p.agreement)] for p in c.participants],
        )
    elif c.synthetic:
        body += [f"- synthetic: {text}: {_pct(v)}" for _, text, v in c.synthetic]
    ir = c.inter_rater
    body += ["", "Between participants (elicitation pairs they share):", ""]
    if ir.units:
        body += _table(
            ["shared pairs", "participants", "picks", "observed agreement", "Krippendorff's alpha", "mean Cohen's kappa", "participant pairs"],
            "rrrrrrr",
            [[ir.units, ir.raters, ir.judgments, _pct(ir.observed_agreement), _num(ir.alpha), _num(ir.kappa_mean), ir.kappa_pairs]],
        )  # fmt: skip
    if ir.message:
        body += ["", f"Not computed: {ir.message}"]
    return body


def _shots_body(sh: ShotSensitivity) -> list[str]:
    if not sh.rows:
        return []
    return _table(
        ["arm", "baseline", "N", "participants", "ratings", "win rate", "95% CI", "p (arm > 50%)"],
        "llrrrrlr",
        [
            [r.rate.arm, r.rate.baseline, r.shots, r.rate.participants, r.rate.n, _pct(r.rate.win_rate),
             _ci(r.rate.ci_low, r.rate.ci_high), _p(r.rate.p_greater)]
            for r in sh.rows
        ],
    )  # fmt: skip


def _shift_body(d: DistributionShift) -> list[str]:
    body = [f"Synthetic: {d.source}.", ""] if d.source else []
    for a in d.attributes:
        body += [
            f"### {a.survey.replace('_', ' ')} → synthetic `{a.synthetic}`",
            "",
            f"{a.answered} answered, {a.not_answered} did not. Jensen-Shannon divergence "
            f"{_num(a.js_divergence)} bits; total variation {_num(a.tv_distance)}."
            + (f" Not represented: {', '.join(a.missing)}." if a.missing else ""),
            "",
        ]
        if a.message:
            body += [f"Not computed: {a.message}", ""]
        if a.categories:
            body += _table(
                ["category", "participants", "share", "synthetic share"],
                "lrrr",
                [[x.category, x.real, _pct(x.real_share), _pct(x.synthetic_share)] for x in a.categories],
            ) + [""]
    if d.not_compared:
        body += [f"Not compared: {'; '.join(d.not_compared)}.", ""]
    if d.uncovered_share is not None:
        body += [
            f"Missing segments ({' × '.join(d.segment_attributes)}): {_pct(d.uncovered_share)} of synthetic "
            "users are in combinations no counted participant represents.",
            "",
        ]
        if d.segments:
            body += _table(
                ["segment", "synthetic share"],
                "lr",
                [
                    [", ".join(f"{k} = {v}" for k, v in seg.values), _pct(seg.synthetic_share)]
                    for seg in d.segments
                ],
            )
    return body


def _descriptions_body(q: DescriptionQuality) -> list[str]:
    body: list[str] = []
    if not q.pairs:
        return body
    if q.model:
        body += [f"Embeddings: {q.model}.", ""]
    if q.mean_similarity is not None:
        gain = "" if q.gain is None else (
            f"; to others' {_num(q.mean_others)}; own − others {q.gain:+.3f} "
            f"(95% CI {q.gain_ci[0]:+.3f} to {q.gain_ci[1]:+.3f})"  # type: ignore[index]
        )  # fmt: skip
        interval = "" if q.ci is None else f" (95% CI {_num(q.ci[0])}–{_num(q.ci[1])})"
        body += [
            f"Mean similarity to their own self-description {_num(q.mean_similarity)}{interval}{gain}.",
            "",
        ]
    body += _table(
        ["participant", "arm", "their self-description", "the model's description (first)", "predictions", "similarity", "to others"],
        "lllllrr",
        [[p.participant, p.arm, p.self_description, p.predicted, p.predictions, _num(p.similarity), _num(p.others_similarity)]
         for p in q.pairs],
    )  # fmt: skip
    return body


def report_files(analysis: StudyAnalysis) -> dict[str, bytes]:
    """report.md, analysis.json and the plots, by file name."""
    figures = analysis.figures()
    return {
        REPORT: report_markdown(analysis, set(figures)).encode(),
        ANALYSIS_JSON: (json.dumps(analysis.to_json(), indent=2, ensure_ascii=False) + "\n").encode(),
        **figures,
    }


def write_files(files: dict[str, bytes], out_dir: str | Path) -> list[Path]:
    """Write each named file into `out_dir` (created if needed); the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        (out / name).write_bytes(content)
        written.append(out / name)
    return written


def write_report(analysis: StudyAnalysis, out_dir: str | Path) -> list[Path]:
    """Write report.md, analysis.json and the PNG plots into `out_dir` (created if needed)."""
    return write_files(report_files(analysis), out_dir)
