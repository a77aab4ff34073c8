"""The fleet view: one row per enrolled node, joining the inventory (its certificate) with the
gateways' latest reports (its connections), and what needs the operator's attention."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import TYPE_CHECKING, Iterable

from .logfmt import bare
from .renewal import certificate_state, renewal_time

if TYPE_CHECKING:
    from .authority import CertificateAuthority

__all__ = ["NodeRow", "GatewayState", "fleet_view", "gateway_states", "fleet_document", "render_nodes", "STALE_INTERVALS", "ATTENTION_STATES"]

STALE_INTERVALS = 3  # a gateway is "not reporting" after this many of its heartbeat intervals without a report
ATTENTION_STATES = ("expiring", "expired", "revoked", "pending approval", "none", "not yet valid")


@dataclasses.dataclass(frozen=True)
class NodeRow:
    """One node of the fleet (times aware UTC)."""

    name: str                                # node name as enrolled
    certificate_state: str                   # "ok", "renewal due", "expiring", "expired", "revoked", "pending approval", "none"
    serial: int | None
    not_valid_before: dt.datetime | None     # UTC
    not_valid_after: dt.datetime | None      # UTC
    renewal_due: dt.datetime | None          # UTC, the 2/3 point
    last_renewal: dt.datetime | None         # UTC, when the current certificate was issued
    last_renewal_peer: str | None            # address it was issued to over EST, when known
    connected: bool | None                   # None: no gateway reporting
    connected_since: dt.datetime | None
    peer: str | None                         # peer address of the latest open connection
    open_connections: int
    bytes_in: int
    bytes_out: int
    last_seen: dt.datetime | None
    last_refusal_reason: str | None
    last_refusal_at: dt.datetime | None
    attention: str | None                    # one line saying why this node needs attention, or None


@dataclasses.dataclass(frozen=True)
class GatewayState:
    """A gateway's latest report: whether it is fresh (``reporting``), when it came, its nodes (by name)."""

    name: str
    serial: int
    received_at: dt.datetime
    interval: float
    reporting: bool
    nodes: dict[str, dict]


def gateway_states(authority: "CertificateAuthority", *, now: dt.datetime) -> list[GatewayState]:
    """Every gateway that ever reported, by name; ``reporting`` is False once its latest report is
    older than :data:`STALE_INTERVALS` heartbeat intervals at ``now``."""
    states = []
    for name, serial, received_at, interval, report in authority.inventory.gateway_reports():
        nodes = {n["node"]: n for n in json.loads(report)["nodes"]}
        fresh = (now - received_at).total_seconds() <= STALE_INTERVALS * interval
        states.append(GatewayState(name, serial, received_at, interval, fresh, nodes))
    return states


def _time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value).astimezone(dt.timezone.utc)


def fleet_view(authority: "CertificateAuthority", *, now: dt.datetime, disconnected_after: dt.timedelta,
               expected: Iterable[str] = ()) -> list[NodeRow]:
    """One row per enrolled node (sorted by name), joining the inventory with the gateways' latest reports.

    Args:
        authority: the CA (its inventory is read, nothing is written).
        now: aware UTC.
        disconnected_after: a node that should be connected (it has connected before, or is
            in ``expected``) and has not been seen for longer than this needs attention.
        expected: names the operator says should be connected; one that is not enrolled gets a
            row with ``certificate_state`` ``none``.

    Returns:
        The rows; connection columns come from the gateways reporting now (summed over them,
        ``connected`` None when none is).
    """
    inventory = authority.inventory
    fraction = authority.settings.renewal_fraction
    records = {r.name.lower(): r for r in inventory.records() if r.kind == "node"}
    pending = {row["name_key"] for row in inventory.pending_requests(now=now, ttl=authority.settings.pending_request_ttl)}
    peers = inventory.issuance_peers()
    gateways = [g for g in gateway_states(authority, now=now) if g.reporting]
    expect = {name.lower() for name in expected}
    rows = []
    for key in sorted(set(records) | pending | expect):
        record = records.get(key)
        if key in pending:
            state = "pending approval"
        elif record is None:
            state = "none"
        elif record.status == "revoked":
            state = "revoked"
        else:
            assert record.not_before is not None and record.not_after is not None, "a signed record has its validity"
            state = certificate_state(now, record.not_before, record.not_after, fraction=fraction)
        seen = [g.nodes[key] for g in gateways if key in g.nodes]
        open_connections = sum(n["open_connections"] for n in seen)
        since = [t for n in seen if (t := _time(n["connected_since"])) is not None]
        last_seen = max((t for n in seen if (t := _time(n["last_seen"])) is not None), default=None)
        refusals = sorted((t, n["last_refusal_reason"]) for n in seen if (t := _time(n["last_refusal_at"])) is not None)
        latest_open = max(((_time(n["connected_since"]), n["peer"]) for n in seen if n["open_connections"]), default=None,
                          key=lambda pair: pair[0] or now)
        connected = (open_connections > 0) if gateways else None
        attention = None
        if state in ATTENTION_STATES:
            attention = {"none": "expected but not enrolled: pkictl enroll-node " + key}.get(state, f"certificate {state}")
        elif connected is False and (last_seen is not None or key in expect):
            if last_seen is None or now - last_seen > disconnected_after:
                attention = "not connected " + (f"since {last_seen.isoformat(timespec='seconds')}" if last_seen else "ever")
        rows.append(NodeRow(
            name=record.name if record is not None else key, certificate_state=state,
            serial=record.serial if record is not None else None,
            not_valid_before=record.not_before if record is not None else None,
            not_valid_after=record.not_after if record is not None else None,
            renewal_due=(renewal_time(record.not_before, record.not_after, fraction=fraction)
                         if record is not None and record.not_before and record.not_after else None),
            last_renewal=record.not_before if record is not None else None,
            last_renewal_peer=peers.get(record.serial) if record is not None else None,
            connected=connected, connected_since=min(since, default=None), peer=latest_open[1] if latest_open else None,
            open_connections=open_connections, bytes_in=sum(n["bytes_in"] for n in seen), bytes_out=sum(n["bytes_out"] for n in seen),
            last_seen=last_seen, last_refusal_reason=refusals[-1][1] if refusals else None,
            last_refusal_at=refusals[-1][0] if refusals else None, attention=attention,
        ))
    return rows


_HEADER = ("NAME", "CERTIFICATE", "SERIAL", "NOT AFTER (UTC)", "CONNECTED", "SINCE (UTC)", "PEER", "OPEN", "IN", "OUT",
           "LAST SEEN (UTC)", "LAST REFUSAL", "ATTENTION")


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def fleet_document(rows: list[NodeRow], gateways: list[GatewayState]) -> dict:
    """The fleet view as JSON-ready values: ``{"nodes": [...], "gateways": [...]}``, times ISO
    8601 UTC, serials hex (``pkictl nodes --json``, and the admin page's ``/fleet.json``)."""
    def value(v):
        return v.isoformat() if isinstance(v, dt.datetime) else v

    nodes = [{k: (f"{v:x}" if k == "serial" and v is not None else value(v)) for k, v in dataclasses.asdict(r).items()} for r in rows]
    states = [{"name": g.name, "serial": f"{g.serial:x}", "received_at": g.received_at.isoformat(), "interval": g.interval,
               "reporting": g.reporting} for g in gateways]
    return {"nodes": nodes, "gateways": states}


def render_nodes(rows: list[NodeRow], gateways: list[GatewayState], *, as_json: bool) -> str:
    """The text (or JSON: :func:`fleet_document`) of ``pkictl nodes``."""
    if as_json:
        return json.dumps(fleet_document(rows, gateways), indent=2)
    table = [_HEADER]
    for r in rows:
        connected = {True: "yes", False: "no", None: "unknown"}[r.connected]
        refusal = f"{_when(r.last_refusal_at)} {bare(r.last_refusal_reason)}" if r.last_refusal_reason else "-"
        known = r.connected is not None
        table.append((r.name, r.certificate_state, f"{r.serial:x}"[:16] if r.serial is not None else "-", _when(r.not_valid_after),
                      connected, _when(r.connected_since) if known else "unknown", bare(r.peer) if r.peer else "-",
                      str(r.open_connections) if known else "?", str(r.bytes_in) if known else "?",
                      str(r.bytes_out) if known else "?", _when(r.last_seen) if known else "unknown", refusal, r.attention or ""))
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    if not gateways:
        lines.append("no gateway has reported: connections are unknown (a gateway's pki-agent reports to pkictl serve or to this CA home)")
    for g in gateways:
        if not g.reporting:
            lines.append(f"gateway {g.name} NOT REPORTING since {_when(g.received_at)} UTC (heartbeat every {g.interval:g} s): "
                         "its connections are unknown; check its pki-agent (pki-agent status on the gateway)")
    return "\n".join(lines)
