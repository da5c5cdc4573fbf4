"""Analyses of a human study (`fspo analyze`, and the studio's analysis page): human win rates per arm
pair, synthetic-to-real transfer, consistency, shot-count sensitivity, distribution shift and
user-description quality, with their plots and a report.

Plain pandas/numpy/scipy on the study export's tables (schema `fspo-study-export-2`): `load_export` reads
an export folder, `study_data_from_tables` takes the same tables built in memory, `analyze` runs every
analysis under declared exclusion rules, and `write_report` writes report.md, analysis.json and the PNGs.
Each result says which rules it applied and, when the data is too thin, why a number is missing.

- data: loading and the columns the analyses read;  rules: the exclusion rules;  stats: the statistics;
- winrates: human win rates, shot-count sensitivity, synthetic-to-real transfer;
- agreement: consistency on repeats and between participants;
- population: distribution shift and user-description quality;  plots, report: the output.
"""

from .agreement import Consistency, InterRater, ParticipantConsistency, consistency
from .data import (
    COLUMNS,
    EXPORT_SCHEMA_VERSION,
    AnalysisInputError,
    StudyData,
    load_export,
    study_data_from_tables,
)
from .population import (
    DescriptionQuality,
    DistributionShift,
    PersonaDistribution,
    description_quality,
    distribution_shift,
    minilm_embedder,
    persona_distribution_from_dataset,
    persona_distribution_from_domain,
)
from .report import (
    ANALYSIS_JSON,
    REPORT,
    AnalysisOptions,
    StudyAnalysis,
    SyntheticInputs,
    analyze,
    report_files,
    report_markdown,
    synthetic_inputs,
    write_report,
)
from .rules import ExclusionRules, Selection, select_participants
from .winrates import (
    HumanWinRates,
    ShotSensitivity,
    SyntheticEval,
    Transfer,
    WinRate,
    human_win_rates,
    read_synthetic_eval,
    shot_sensitivity,
    synthetic_transfer,
)

__all__ = [
    "ANALYSIS_JSON",
    "COLUMNS",
    "EXPORT_SCHEMA_VERSION",
    "REPORT",
    "AnalysisInputError",
    "AnalysisOptions",
    "Consistency",
    "DescriptionQuality",
    "DistributionShift",
    "ExclusionRules",
    "HumanWinRates",
    "InterRater",
    "ParticipantConsistency",
    "PersonaDistribution",
    "Selection",
    "ShotSensitivity",
    "StudyAnalysis",
    "StudyData",
    "SyntheticEval",
    "SyntheticInputs",
    "Transfer",
    "WinRate",
    "analyze",
    "consistency",
    "description_quality",
    "distribution_shift",
    "human_win_rates",
    "load_export",
    "minilm_embedder",
    "persona_distribution_from_dataset",
    "persona_distribution_from_domain",
    "read_synthetic_eval",
    "report_files",
    "report_markdown",
    "select_participants",
    "shot_sensitivity",
    "study_data_from_tables",
    "synthetic_inputs",
    "synthetic_transfer",
    "write_report",
]
