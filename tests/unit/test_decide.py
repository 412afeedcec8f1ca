"""decide(): every row of the outcome table (docs/interface.md), with plain values."""

import pytest

from worker.decide import Action, confirms, decide

F = "Twrewr89fnscvj22"


def receipt(**fields):
    base = {
        "id": 1,
        "status": 2,
        "closed_at": "2026-11-27 10:00:00",
        "fiscal_id": None,
        "lock": False,
    }
    base.update(fields)
    return base


def test_closed_without_fiscal_id_patches_both_fields():
    decision = decide(receipt(), F)
    assert decision.action is Action.PATCH
    assert decision.fields == {"fiscal_id": F, "lock": True}


def test_closed_with_same_fiscal_id_and_lock_needs_nothing():
    assert decide(receipt(fiscal_id=F, lock=True), F).action is Action.DONE


def test_closed_with_same_fiscal_id_unlocked_patches_lock_only():
    decision = decide(receipt(fiscal_id=F, lock=False), F)
    assert decision.action is Action.PATCH
    assert decision.fields == {"lock": True}


@pytest.mark.parametrize("status,closed_at", [(2, "2026-11-27 10:00:00"), (1, None)])
def test_a_different_fiscal_id_is_never_overwritten(status, closed_at):
    decision = decide(receipt(status=status, closed_at=closed_at, fiscal_id="OTHER"), F)
    assert decision.action is Action.CONFLICT
    assert "OTHER" in decision.detail


def test_open_receipt_is_not_ready():
    assert decide(receipt(status=1, closed_at=None), F).action is Action.NOT_CLOSED


@pytest.mark.parametrize("status,closed_at", [(2, None), (1, "2026-11-27 10:00:00")])
def test_closed_means_status_2_or_closed_at_set(status, closed_at):
    assert decide(receipt(status=status, closed_at=closed_at), F).action is Action.PATCH


def test_empty_fiscal_id_counts_as_none():
    assert decide(receipt(fiscal_id=""), F).action is Action.PATCH


def test_confirms_requires_our_fiscal_id_and_lock():
    assert confirms(receipt(fiscal_id=F, lock=True), F)
    assert not confirms(receipt(fiscal_id=F, lock=False), F)
    assert not confirms(receipt(fiscal_id="OTHER", lock=True), F)
