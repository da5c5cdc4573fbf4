from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningWorker


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random, tiny) Llama checkpoint with a locally trained tokenizer: it writes gibberish, but
    through exactly the loading and generation code a real checkpoint goes through. The one builder's
    model (``build_tiny_causal_lm``), smaller still than its defaults: hidden 32, 1 layer, 2 heads."""
    from modeling.tinymodel import build_tiny_causal_lm, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-checkpoint")
    texts = [
        f"Question {i}: which answer do you prefer? The short one, said user {i % 7}." for i in range(200)
    ]
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=300)
    return build_tiny_causal_lm(
        root / "model", tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )


@pytest.fixture
def tasks_go_to_the_worker(celery_worker: RunningWorker) -> Iterator[RunningWorker]:
    """Tasks this process enqueues (e.g. `personalize` on commit of a last pick) go to the test worker:
    its client app is made Celery's current app (what a shared task sends through), in this thread and,
    as the default, in the others (sync code called from async code runs in asgiref's thread)."""
    from studyapp.celery import app

    celery_worker.app.set_current()
    celery_worker.app.set_default()
    try:
        yield celery_worker
    finally:
        app.set_current()
        app.set_default()
