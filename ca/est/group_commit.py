"""Group commit: the issuances a signing worker has queued share one SQLite commit and one audit-log
fsync, and none of them is answered before that commit and that fsync are done.

A re-enrollment wrote four times to disk one after the other: the inventory's transaction (a WAL
fsync), the audit record (an fsync and the head's atomic replacement: two more) and, back in the
serving process on its event loop, the address it went to (another WAL fsync). Under a herd the
calls queue in the worker's pipe anyway (:mod:`pkictl.est.signers`), so the worker takes every call
waiting there (up to :data:`MAX_GROUP`) and runs them in one ``BEGIN IMMEDIATE`` transaction
(:meth:`pkictl.inventory.Inventory.group`), each call's own transactions becoming savepoints, with
the audit log's records held in memory (:meth:`pkictl.audit.AuditLog.hold`) and written together
after the commit. What each call checks and claims is unchanged and sees the calls before it in
the same group: serial numbers under the UNIQUE constraint, the successor claimed by
compare-and-set (one live certificate per identity), a key for one identity only. A call that is
refused rolls back its savepoint alone and is answered with its refusal; a commit or an audit
write that fails fails every call of the group, and none is answered with a certificate
(docs/design.md, "Group commit and load shedding").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import PKIError

if TYPE_CHECKING:
    from ..authority import CertificateAuthority

__all__ = ["MAX_GROUP", "Outcome", "note_peer", "run_group", "run_one"]

log = logging.getLogger("pkictl.serve")

MAX_GROUP = 16
"""Calls in one group at most: as many as a worker may have outstanding (pkictl.est.signers.QUEUE_DEPTH)."""

Outcome = tuple[str, object]
"""``("ok", value)`` or ``("error", exception)``: one call's answer, as a worker sends it."""


def run_one(call: Callable[[], object]) -> Outcome:
    """Run ``call`` on its own (its transactions commit as they go): its outcome."""
    try:
        return ("ok", call())
    except Exception as exc:  # noqa: BLE001 - every outcome goes back to the caller
        return ("error", exc)


def run_group(ca: CertificateAuthority, calls: Sequence[Callable[[], object]]) -> list[Outcome]:
    """Run ``calls`` (each an issuance of ``ca``) in one inventory transaction and one audit
    write, and return their outcomes once both are durable.

    Args:
        ca: the CA the calls issue with; its inventory and audit log are grouped.
        calls: what to run, in order; each raises to refuse.

    Returns:
        One outcome per call, in order. When the commit or the audit write fails, every outcome
        is that error: nothing of the group is answered as done.
    """
    try:
        inventory, audit = ca.inventory, ca.audit  # opened at the first call: a database may be away
    except Exception as exc:  # noqa: BLE001 - every call is answered with it; the worker lives on
        log.error("group of %d call(s) not run: %s", len(calls), exc)
        return [("error", exc)] * len(calls)
    outcomes: list[Outcome] = []
    audit.hold()
    try:
        with inventory.group():
            outcomes = [run_one(call) for call in calls]
    except Exception as exc:  # noqa: BLE001 - the commit failed: nothing of the group is recorded
        dropped = audit.discard()
        log.error("group commit of %d call(s) failed, %d audit record(s) dropped with it: %s", len(calls), dropped, exc)
        return [("error", exc)] * len(calls)
    try:
        audit.flush()
    except Exception as exc:  # noqa: BLE001 - recorded, not audited: no client is told it is done
        log.error("group commit of %d call(s): the audit log could not be written: %s", len(calls), exc)
        return [("error", exc)] * len(calls)
    return outcomes


def note_peer(ca: CertificateAuthority, serial: int, peer: str | None) -> None:
    """Remember where certificate ``serial`` went (the fleet view's renewal address) in the
    inventory; a failure is logged and the issuance stands (as the serving process does)."""
    if peer is None:
        return
    try:
        ca.inventory.record_issuance_peer(serial, peer)
    except (OSError, PKIError) as exc:
        log.error("cannot record where serial %x was issued to: %s", serial, exc)
