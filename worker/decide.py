"""What to do with a result, given the receipt the API returned: a pure function.

The table of docs/interface.md (What happens to a result), in code:

    receipt                                   action
    fiscal_id set and != F                    CONFLICT      (never overwritten)
    closed, fiscal_id == F, lock true         DONE          (nothing to send)
    closed, fiscal_id == F, lock false        PATCH {lock}
    closed, no fiscal_id                      PATCH {fiscal_id, lock}
    not closed (status 1, closed_at null)     NOT_CLOSED    (retry within the not-ready window)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

STATUS_CLOSED = 2


class Action(Enum):
    PATCH = "patch"
    DONE = "done"
    CONFLICT = "conflict"
    NOT_CLOSED = "not_closed"


@dataclass(frozen=True)
class Decision:
    action: Action
    fields: dict[str, Any] = field(default_factory=dict)  # the PATCH body, for Action.PATCH
    detail: str = ""


def is_closed(receipt: Mapping[str, Any]) -> bool:
    return receipt.get("status") == STATUS_CLOSED or bool(receipt.get("closed_at"))


def current_fiscal_id(receipt: Mapping[str, Any]) -> str | None:
    value = receipt.get("fiscal_id")
    if value is None or value == "":
        return None
    return str(value)


def decide(receipt: Mapping[str, Any], fiscal_id: str) -> Decision:
    existing = current_fiscal_id(receipt)
    if existing is not None and existing != fiscal_id:
        return Decision(Action.CONFLICT, detail=f"receipt already has fiscal_id {existing!r}")
    if not is_closed(receipt):
        return Decision(Action.NOT_CLOSED, detail="receipt is not closed yet")
    if existing is None:
        return Decision(Action.PATCH, {"fiscal_id": fiscal_id, "lock": True}, "fiscalise")
    if receipt.get("lock") is True:
        return Decision(Action.DONE, detail="already fiscalised with this fiscal_id")
    return Decision(Action.PATCH, {"lock": True}, "fiscal_id present, lock missing")


def confirms(receipt: Mapping[str, Any], fiscal_id: str) -> bool:
    """Whether a PATCH response shows the receipt fiscalised with `fiscal_id` and locked."""
    return current_fiscal_id(receipt) == fiscal_id and receipt.get("lock") is True
