"""The files coordinators work with through the studio: synthetic datasets, checkpoints and evaluation
runs, all under settings.STUDIO_DATA_DIR. Paths typed into the studio are resolved here and refused when
they point outside that folder, so the web pages never read or write anywhere else on the server."""

import json
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError

from modeling.synth.storage import MANIFEST as DATASET_MANIFEST  # present once a dataset is complete

# Where each kind of job writes its output, under the data folder.
OUTPUT_FOLDERS = {
    "synth": "datasets",
    "train": "checkpoints",
    "evaluate": "evaluations",
    "crowd_report": "crowd-reports",
}
# modeling.train.MANIFEST, present once a checkpoint is complete (not imported: modeling.train loads torch).
CHECKPOINT_MANIFEST = "fspo.json"


def data_root() -> Path:
    return Path(settings.STUDIO_DATA_DIR).resolve()


def resolve_in_data_root(path: str, *, what: str) -> Path:
    """`path` (relative to the data folder, or absolute inside it) resolved; a ValidationError naming
    `what` when it is empty or points outside the data folder."""
    root = data_root()
    if not path.strip():
        raise ValidationError(f"Give the {what}.")
    given = Path(path.strip())
    resolved = (given if given.is_absolute() else root / given).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValidationError(f"The {what} must be inside the data folder {root}; {path} is not.")
    return resolved


def output_dir_for(kind: str, name: str) -> Path:
    """Where a job of this kind named `name` writes."""
    return data_root() / OUTPUT_FOLDERS[kind] / name


def relative_to_root(path: str | Path) -> str:
    """A path as the studio shows it: relative to the data folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(data_root()))
    except ValueError:
        return str(path)


def _complete_dirs(folder: str, manifest: str) -> list[Path]:
    base = data_root() / folder
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if (p / manifest).is_file())


def _dataset_domain(path: Path) -> str | None:
    try:
        return json.loads((path / DATASET_MANIFEST).read_text()).get("domain")
    except (OSError, ValueError, AttributeError):
        return None


def datasets_available(*, domain: str | None = None) -> list[str]:
    """Complete synthetic datasets in the data folder's datasets/ (relative paths), for pickers; with
    `domain`, only the datasets of that domain (as their manifest says)."""
    found = _complete_dirs(OUTPUT_FOLDERS["synth"], DATASET_MANIFEST)
    if domain is not None:
        found = [p for p in found if _dataset_domain(p) == domain]
    return [relative_to_root(p) for p in found]


def checkpoints_available() -> list[str]:
    """Complete checkpoints in the data folder's checkpoints/ (relative paths), for pickers."""
    return [relative_to_root(p) for p in _complete_dirs(OUTPUT_FOLDERS["train"], CHECKPOINT_MANIFEST)]


def output_name_free(kind: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first that no output of this kind of job uses yet."""
    candidate, n = name, 1
    while output_dir_for(kind, candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate
