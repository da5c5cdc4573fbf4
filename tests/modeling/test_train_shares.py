"""How a run's processes share out work (``modeling.train.distributed``), without launching any."""

from __future__ import annotations

import pytest

from modeling.train.distributed import Ranks, round_robin, sharding_requested


def test_round_robin_gives_every_item_to_exactly_one_process() -> None:
    shares = [round_robin(7, rank, 3, lockstep=False) for rank in range(3)]
    assert shares == [[(0, True), (3, True), (6, True)], [(1, True), (4, True)], [(2, True), (5, True)]]


def test_round_robin_in_lockstep_pads_the_short_shares_with_an_uncounted_item() -> None:
    shares = [round_robin(7, rank, 3, lockstep=True) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert shares[1][-1] == (0, False) and shares[2][-1] == (0, False)
    assert sorted(i for s in shares for i, counted in s if counted) == list(range(7))


def test_one_process_scores_every_item() -> None:
    assert Ranks().share(3) == [(0, True), (1, True), (2, True)]


def test_sharding_is_asked_for_by_accelerates_fsdp_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not sharding_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding_requested()


def test_fsdp1_is_refused_with_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="set fsdp_config.fsdp_version to 2"):
        sharding_requested()
