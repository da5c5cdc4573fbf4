"""The analyses of a study read straight from the database: its export tables (annotation.exports, the
same rows an export file holds) built in memory and handed to modeling.analysis, so the studio's
analysis page and `fspo analyze` on an export of the same study compute the same numbers."""

import pyarrow as pa

from modeling.analysis import (
    AnalysisOptions,
    StudyAnalysis,
    StudyData,
    SyntheticInputs,
    analyze,
    study_data_from_tables,
)
from modeling.analysis.data import TABLES as ANALYSIS_TABLES
from modeling.analysis.population import Embedder
from studyapp.models import Study

from .exports import TABLES, ExportOptions, export_check, table_pages


def study_tables(*, study: Study, options: ExportOptions | None = None) -> dict[str, pa.Table]:
    """The export tables the analyses read (study, participants, judgments, responses) as pyarrow
    tables with the export schema. Raises NothingToExport for a study without participant data."""
    export_check(study=study, tables=list(ANALYSIS_TABLES))
    tables = {}
    for name in ANALYSIS_TABLES:
        schema = TABLES[name].schema
        assert schema is not None
        rows = [row for page in table_pages(study=study, table=name, options=options) for row in page]
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
        arrays = [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)]
        tables[name] = pa.Table.from_arrays(arrays, schema=schema)
    return tables


def study_data(*, study: Study, options: ExportOptions | None = None) -> StudyData:
    """The study's data as the analyses read it, from the database."""
    return study_data_from_tables(study_tables(study=study, options=options), source="the study's database")


def study_analysis(
    *,
    study: Study,
    options: AnalysisOptions | None = None,
    synthetic: SyntheticInputs | None = None,
    export_options: ExportOptions | None = None,
    embedder: Embedder | None = None,
) -> StudyAnalysis:
    """Every analysis of the study, on its current data (modeling.analysis.analyze)."""
    data = study_data(study=study, options=export_options)
    return analyze(data, options=options, synthetic=synthetic, embedder=embedder)
