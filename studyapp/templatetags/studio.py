"""Number formats of the studio's pages (studio.js formats live updates the same way)."""

import functools
from collections.abc import Callable
from typing import Any

from django import template

from studyapp import coordinators

register = template.Library()


NumberFormat = Callable[[float], str]


def number_filter(
    library: template.Library, *, missing: str = "—"
) -> Callable[[NumberFormat], Callable[[Any], str]]:
    """Registers a format of a number in `library` as a filter of template values, which shows
    `missing` where a value has no number (None, or an empty string)."""

    def register_format(fmt: NumberFormat) -> Callable[[Any], str]:
        @functools.wraps(fmt)
        def filter_(value: Any) -> str:
            return missing if value is None or value == "" else fmt(float(value))

        library.filter(fmt.__name__, filter_)
        return filter_

    return register_format


@number_filter(register)
def pct(x: float) -> str:
    """A proportion as a percentage with one decimal ("71.2%"), or "—" when there is none."""
    return f"{100 * x:.1f}%"


@register.filter
def wins(value: Any) -> str:
    """A count of wins with ties as halves: "6", "6.5" (as studio.js shows the JSON's 6.0 and 6.5)."""
    wins = float(value)
    return str(int(wins)) if wins.is_integer() else f"{wins:.1f}"


@number_filter(register, missing="0")
def width(x: float) -> str:
    """A proportion as a CSS width percentage, clamped to 0–100 ("71.2")."""
    return f"{min(100.0, max(0.0, 100 * x)):.1f}"


@number_filter(register)
def pvalue(p: float) -> str:
    """A p-value with two significant digits ("0.031", "4.2e-5"), or "—"."""
    if 0 < p < 1e-4:
        return f"{p:.1e}".replace("e-0", "e-")
    return f"{p:.2g}"


@register.filter
def metric(value: Any) -> str:
    """A metric for a table: floats with four significant digits, the rest as they are."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


@register.filter
def humanize_key(value: str) -> str:
    """A result key as a label: "order_swap_agreement_final" → "Order swap agreement final"."""
    text = str(value).replace("_", " ")
    return text[:1].upper() + text[1:]


@register.filter
def thousands(value: Any) -> str:
    """An integer with thousands separators ("1,000,000"); studio.js uses toLocaleString("en-US")."""
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


@register.filter
def is_coordinator(user: Any) -> bool:
    """Whether the user may change studies and launch jobs (analysts only see): hides what they cannot use."""
    return coordinators.is_coordinator(user)
