"""The synthetic preference engine: domains, users, responses, labels, refinement, storage, stats."""

from .domain import BUILTIN_DOMAINS, Domain, DomainError, load_domain
from .generate import DatasetInfo, SynthConfig, generate, generate_dataset
from .storage import FORMAT_VERSION, Dataset, DatasetError, load_dataset

__all__ = [
    "BUILTIN_DOMAINS",
    "FORMAT_VERSION",
    "Dataset",
    "DatasetError",
    "DatasetInfo",
    "Domain",
    "DomainError",
    "SynthConfig",
    "generate",
    "generate_dataset",
    "load_dataset",
    "load_domain",
]
