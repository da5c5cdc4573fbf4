"""Exports of a study's data (annotation.exports): the studio's export page, and the JSON API scripts
use (an index of the tables, and each table as a download). Coordinators and analysts only: the page
takes a signed-in session; the API a session or a bearer token (studyapp.coordinators).

Tables stream: CSV and JSONL are sent as they are read from the database, Parquet is written to a
temporary file first and then sent from it; neither ever holds the whole table in memory. Under ASGI
(daphne) the stream is an async iterator that pulls each chunk in a thread, since Django would otherwise
read a synchronous stream to its end before sending it.
"""

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from annotation.exports import (
    EXPORT_SCHEMA_VERSION,
    TABLES,
    ExportError,
    ExportSummary,
    NothingToExport,
    export_check,
    export_summary,
    file_name,
    stream_table,
    table_spec,
    write_table,
)
from studyapp.coordinators import (
    API_TOKEN_MAX_AGE_S,
    api_token_for,
    api_viewer_required,
    studio_viewer_required,
)
from studyapp.models import Study

CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/jsonl; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
FILE_BLOCK = 1 << 20


def _download_url(slug: str, table: str, fmt: str) -> str:
    return reverse("api-study-export-table", kwargs={"slug": slug, "table": table, "fmt": fmt})


def _tables(study: Study) -> list[dict[str, Any]]:
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "downloads": {fmt: _download_url(study.slug, spec.name, fmt) for fmt in spec.formats},
            "columns": [] if spec.schema is None else [(f.name, str(f.type)) for f in spec.schema],
        }
        for spec in TABLES.values()
    ]


@studio_viewer_required
@require_http_methods(["GET", "POST"])
def export_page(request: HttpRequest, slug: str) -> HttpResponse:
    """The study's tables with a download link per format, what the export holds (and whether it is
    final), and a token for scripts (made when asked for, with a POST)."""
    study = get_object_or_404(Study, slug=slug)
    summary = export_summary(study=study)
    context = {
        "study": study,
        "summary": summary,
        "tables": _tables(study),
        "schema_version": EXPORT_SCHEMA_VERSION,
        "index_url": request.build_absolute_uri(reverse("api-study-export", kwargs={"slug": study.slug})),
        "token": api_token_for(request.user) if request.method == "POST" else None,
        "token_days": API_TOKEN_MAX_AGE_S // 86400,
    }
    return render(request, "studio/export.html", context)


def _summary_json(summary: ExportSummary) -> dict[str, Any]:
    return {"schema_version": EXPORT_SCHEMA_VERSION, **summary.to_json()}


@never_cache
@api_viewer_required
@require_GET
def export_index(request: HttpRequest, slug: str) -> JsonResponse:
    """The export API's index: the schema version, what the export holds, and every table's download
    URLs and columns."""
    study = Study.objects.filter(slug=slug).first()
    if study is None:
        return JsonResponse({"error": f"There is no study '{slug}'."}, status=404)
    tables = {
        t["name"]: {
            "description": t["description"],
            "downloads": {fmt: request.build_absolute_uri(url) for fmt, url in t["downloads"].items()},
            "columns": dict(t["columns"]),
        }
        for t in _tables(study)
    }
    return JsonResponse({**_summary_json(export_summary(study=study)), "tables": tables})


@never_cache
@api_viewer_required
@require_GET
def export_table(request: HttpRequest, slug: str, table: str, fmt: str) -> HttpResponse:
    """One table as a file in `fmt`. A study without participant data answers 409 with the reason; a
    running study's export says so in the X-Export-Complete and X-Export-Warnings headers."""
    study = Study.objects.filter(slug=slug).first()
    if study is None:
        return JsonResponse({"error": f"There is no study '{slug}'."}, status=404)
    try:
        table_spec(table, fmt)
        summary = export_check(study=study, tables=[table])
    except NothingToExport as exc:
        return JsonResponse({"error": str(exc), **_summary_json(export_summary(study=study))}, status=409)
    except ExportError as exc:
        return JsonResponse({"error": str(exc)}, status=404)
    if fmt == "parquet":
        chunks = _parquet_chunks(study, table)
    else:
        chunks = stream_table(study=study, table=table, fmt=fmt)
    response = StreamingHttpResponse(_for_server(request, chunks), content_type=CONTENT_TYPES[fmt])
    response["Content-Disposition"] = f'attachment; filename="{study.slug}-{file_name(table, fmt)}"'
    response["X-Export-Schema-Version"] = EXPORT_SCHEMA_VERSION
    response["X-Export-Complete"] = "true" if summary.complete else "false"
    if summary.warnings:
        response["X-Export-Warnings"] = " | ".join(summary.warnings)
    return response


def _parquet_chunks(study: Study, table: str) -> Iterator[bytes]:
    """Write the table to a temporary Parquet file now (errors surface before the response starts), then
    send it block by block; the file is removed once sent or when the client goes away."""
    fd, name = tempfile.mkstemp(prefix="fspo-export-", suffix=".parquet")
    os.close(fd)
    path = Path(name)
    try:
        write_table(study=study, table=table, fmt="parquet", path=path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise

    def blocks() -> Iterator[bytes]:
        try:
            with path.open("rb") as f:
                while block := f.read(FILE_BLOCK):
                    yield block
        finally:
            path.unlink(missing_ok=True)

    return blocks()


def _for_server(request: HttpRequest, chunks: Iterator[bytes]) -> Iterator[bytes] | AsyncIterator[bytes]:
    """The chunks as the server streams them: as they are under WSGI; under ASGI an async iterator that
    runs each step of the (database-reading) iterator in Django's sync thread."""
    if not isinstance(request, ASGIRequest):
        return chunks
    return _async_chunks(chunks)


async def _async_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    done = object()
    step = sync_to_async(next, thread_sensitive=True)
    try:
        while (chunk := await step(chunks, done)) is not done:
            yield chunk  # type: ignore[misc]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()
