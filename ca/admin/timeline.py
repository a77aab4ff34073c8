"""The expiry timeline of the admin page: each certificate's validity as a bar, its renewal point
and now marked, drawn on the server as SVG (no script, nothing external)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from html import escape
from typing import Sequence

__all__ = ["Bar", "timeline_svg", "WIDTH"]

WIDTH = 960  # px of the whole drawing
_LABEL = 200  # px of the label column
_ROW = 22  # px per certificate
_TOP = 28  # px above the first bar, for the date axis
_COLOURS = {"ok": "#3b7d3b", "renewal due": "#b08a00", "expiring": "#c05800", "expired": "#9a1c1c", "revoked": "#666666"}


@dataclasses.dataclass(frozen=True)
class Bar:
    """One certificate on the timeline (times aware UTC).

    Attributes:
        label: what the row says (kind and name); escaped when drawn.
        serial: its serial number (shown in the bar's tooltip).
        not_valid_before, not_valid_after: its validity (RFC 5280 4.1.2.5).
        renewal_due: when its agent renews it (the renewal fraction, 2/3 by default), or None.
        state: ``ok``, ``renewal due``, ``expiring``, ``expired`` or ``revoked`` (the bar's colour).
    """

    label: str
    serial: int
    not_valid_before: dt.datetime
    not_valid_after: dt.datetime
    renewal_due: dt.datetime | None
    state: str


def _when(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def timeline_svg(bars: Sequence[Bar], *, now: dt.datetime) -> str:
    """An ``<svg>`` element (to embed in HTML) drawing ``bars`` on one time axis with ``now`` marked.

    The axis runs from the earliest notBefore (or ``now``) to the latest notAfter (or ``now``);
    a renewal point is a dark tick across its bar, now a red line across every bar.

    Args:
        bars: the certificates, drawn top to bottom in this order.
        now: aware UTC.

    Returns:
        The SVG markup; every label and tooltip is HTML-escaped (node-supplied names included).
    """
    height = _TOP + _ROW * max(len(bars), 1) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="certificate validity timeline">']
    if not bars:
        parts.append(f'<text x="0" y="{_TOP}" font-size="13">no certificates</text></svg>')
        return "".join(parts)
    start = min([b.not_valid_before for b in bars] + [now])
    end = max([b.not_valid_after for b in bars] + [now])
    span = max((end - start).total_seconds(), 1.0)
    plot = WIDTH - _LABEL - 10

    def x(value: dt.datetime) -> float:
        return round(_LABEL + plot * (value - start).total_seconds() / span, 1)

    for i in range(5):  # the date axis: five ticks from start to end
        tick = start + (end - start) * (i / 4)
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        parts.append(f'<line x1="{x(tick)}" y1="{_TOP - 6}" x2="{x(tick)}" y2="{height - 4}" stroke="#dddddd"/>'
                     f'<text x="{x(tick)}" y="{_TOP - 10}" font-size="11" text-anchor="{anchor}" fill="#444444">'
                     f'{escape(tick.strftime("%Y-%m-%d %H:%M"))}</text>')
    for row, bar in enumerate(bars):
        top = _TOP + row * _ROW
        left, right = x(bar.not_valid_before), x(bar.not_valid_after)
        colour = _COLOURS.get(bar.state, "#3b5b9a")
        tip = (f"{bar.label} serial {bar.serial:x}: {bar.state}; valid {_when(bar.not_valid_before)} to {_when(bar.not_valid_after)}"
               + (f"; renewal due {_when(bar.renewal_due)}" if bar.renewal_due else ""))
        parts.append(f'<g class="bar" data-serial="{bar.serial:x}"><title>{escape(tip)}</title>'
                     f'<text x="4" y="{top + 15}" font-size="12" fill="#222222">{escape(bar.label[:30])}</text>'
                     f'<rect x="{left}" y="{top + 4}" width="{max(right - left, 1.0)}" height="{_ROW - 8}" rx="3" fill="{colour}"/>')
        if bar.renewal_due is not None:
            due = x(bar.renewal_due)
            parts.append(f'<line class="renewal" x1="{due}" y1="{top + 1}" x2="{due}" y2="{top + _ROW - 1}" stroke="#111111" '
                         'stroke-width="3"/>')
        parts.append("</g>")
    parts.append(f'<line class="now" x1="{x(now)}" y1="{_TOP - 4}" x2="{x(now)}" y2="{height - 2}" stroke="#e00000" '
                 f'stroke-width="2"/><text x="{x(now) + 3}" y="{height - 2}" font-size="11" fill="#e00000">now</text></svg>')
    return "".join(parts)
