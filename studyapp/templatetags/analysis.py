"""Number formats of the analysis page (modeling.analysis results)."""

from typing import Any

from django import template

from studyapp.datastore import data_root
from studyapp.templatetags.studio import number_filter, pct

register = template.Library()


@number_filter(register)
def points(x: float) -> str:
    """A difference of two proportions in percentage points, signed ("+6.0 pts"), or "—"."""
    return f"{100 * x:+.1f} pts".replace("-", "−")


@register.filter
def points_range(pair: Any) -> str:
    """An interval of a difference in percentage points ("−6.6 to +18.7"), or "—"."""
    if not pair:
        return "—"
    low, high = pair
    return f"{100 * float(low):+.1f} to {100 * float(high):+.1f}".replace("-", "−")


@register.filter
def pct_range(pair: Any) -> str:
    """An interval of proportions as percentages ("70.5% – 92.1%"), or "—"."""
    if not pair or pair[0] is None:
        return "—"
    return f"{pct(pair[0])} – {pct(pair[1])}"


@number_filter(register)
def num3(x: float) -> str:
    """A statistic with three decimals ("0.743"), or "—"."""
    return f"{x:.3f}".replace("-", "−")


@register.filter
def num3_range(pair: Any) -> str:
    """An interval of a statistic with three decimals ("0.148 – 0.192"), or "—"."""
    if not pair or pair[0] is None:
        return "—"
    return f"{num3(pair[0])} – {num3(pair[1])}"


@register.filter
def in_data_folder(value: Any) -> str:
    """Text naming files of the studio's data folder, with those paths relative to it (as typed)."""
    return str(value).replace(f"{data_root()}/", "")


@register.filter
def words(value: Any) -> str:
    """A column or attribute name as words ("age_range" → "age range")."""
    return str(value).replace("_", " ")
