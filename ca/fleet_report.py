"""A gateway's report of its connection table to the CA: its schema, and who may send one.

A gateway agent POSTs its table as JSON to :data:`REPORT_PATH` of ``pkictl serve``,
authenticated by its own gateway certificate over mTLS (docs/design.md, "Fleet view"); one on
the CA host writes it into the inventory itself. Both go through :func:`parse_report`.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Optional

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AccessDenied, CertificateUnusable, PKIError
from .inventory import Inventory

__all__ = ["REPORT_PATH", "REPORT_CONTENT_TYPE", "MAX_REPORT_NODES", "GatewayReport", "ReportedNode", "parse_report",
           "accept_report", "store_report"]

REPORT_PATH = "/pkictl/v1/gateway-report"  # pkictl's own namespace: /.well-known/est is RFC 7030's
REPORT_CONTENT_TYPE = "application/json"
MAX_REPORT_NODES = 10_000

_Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]  # a node name, lower case (RFC 1123 label)
_Peer = Annotated[str, Field(max_length=64, pattern=r"^[0-9A-Za-z:.%\[\]?-]+$")]  # pkictl.logfmt.peer_name: host:port
_Reason = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9 ._:-]+$")]  # the listener's reasons


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportedNode(_Model):
    """One node as the gateway's listener sees it (pki_agent.listener.nodetable rows)."""

    node: _Name
    open_connections: int = Field(ge=0)
    connected_since: Optional[dt.datetime] = None
    peer: Optional[_Peer] = None
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)
    last_seen: Optional[dt.datetime] = None
    last_refusal_reason: Optional[_Reason] = None
    last_refusal_at: Optional[dt.datetime] = None


class GatewayReport(_Model):
    """A gateway's whole connection table at ``generated_at`` (its clock).

    Attributes:
        version: 1.
        interval: seconds between the gateway's heartbeats; the CA takes the gateway for "not
            reporting" after three of them without a report.
    """

    version: int = Field(1, ge=1, le=1)
    interval: float = Field(gt=0, le=3600)
    generated_at: dt.datetime
    nodes: list[ReportedNode] = Field(max_length=MAX_REPORT_NODES)


class MalformedReport(PKIError):
    """The body is no valid gateway report."""


def parse_report(body: bytes) -> GatewayReport:
    """Validate a report body (JSON of :class:`GatewayReport`).

    Raises:
        MalformedReport: not JSON, or a field missing, of the wrong type or out of range; the
            message names the fields (their values are not echoed).
    """
    try:
        return GatewayReport.model_validate_json(body)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
        raise MalformedReport(f"not a gateway report ({fields}); want JSON with version, interval, generated_at and nodes "
                              f"(at most {MAX_REPORT_NODES})") from None


def accept_report(inventory: Inventory, certificate: x509.Certificate | None, body: bytes, now: dt.datetime) -> tuple[str, GatewayReport]:
    """Store ``body`` as the latest report of the gateway ``certificate`` names, if it may report.

    Only a gateway certificate the inventory holds as issued (not revoked), valid at ``now``,
    may report; the TLS handshake has verified that it chains to this CA.

    Returns:
        ``(gateway name, report)``.

    Raises:
        AccessDenied: no certificate, or one that is no gateway's (a node's, the service's).
        CertificateUnusable: a gateway certificate that is revoked, expired or unknown.
        MalformedReport: the body is no valid report; nothing is stored.
    """
    if certificate is None:
        raise AccessDenied(f"a gateway report needs the gateway's TLS client certificate; POST {REPORT_PATH} with it")
    record = inventory.get(certificate.serial_number)
    serial = f"{certificate.serial_number:x}"
    if record is None:
        raise CertificateUnusable(f"certificate serial {serial} is not in the inventory", reason="unknown")
    if record.kind != "gateway":
        raise AccessDenied(f"certificate serial {serial} is a {record.kind}'s: only a gateway reports its connections")
    if record.status == "revoked":
        raise CertificateUnusable(f"certificate serial {serial} is revoked: a revoked gateway does not report", reason="revoked")
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CertificateUnusable(f"certificate serial {serial} is not valid now", reason="expired")
    report = parse_report(body)
    store_report(inventory, record.name, certificate.serial_number, report, now)
    return record.name, report


def store_report(inventory: Inventory, gateway: str, serial: int, report: GatewayReport, now: dt.datetime) -> None:
    """Keep ``report`` as the latest of ``gateway`` (received ``now``, by the CA's clock)."""
    inventory.record_gateway_report(gateway, serial=serial, received_at=now, interval=report.interval,
                                    report=report.model_dump_json())
