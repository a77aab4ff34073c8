"""The admin page's HTML, its script and its style sheet: every value that came from a node or a
gateway (names, peers, refusal reasons) is HTML-escaped here, once, on its way into the page."""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any, Sequence

from ..crl import REASONS

__all__ = ["SCRIPT", "STYLE", "FIELDS", "cell", "dashboard", "how_to_page", "refused_page", "result_page"]

# The fleet table's columns: (header, key of a row of `pkictl nodes --json`). The script fills the
# same cells from /fleet.json, so that both spell a value alike (:func:`cell`).
FIELDS = (("Node", "name"), ("Certificate", "certificate_state"), ("Serial", "serial"), ("Not after (UTC)", "not_valid_after"),
          ("Connected", "connected"), ("Since (UTC)", "connected_since"), ("Peer", "peer"), ("Open", "open_connections"),
          ("In", "bytes_in"), ("Out", "bytes_out"), ("Last seen (UTC)", "last_seen"), ("Attention", "attention"))


def cell(field: str, value: Any) -> str:
    """The text of one fleet cell (not yet escaped), as admin.js writes it too."""
    if value is None:
        return "-"
    if field == "connected":
        return "yes" if value else "no"
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        return value.replace("T", " ")[:19]
    if field == "serial":
        return str(value)[:16]
    return str(value)


def _shell(title: str, body: str, *, attributes: str = "") -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><link rel=\"stylesheet\" href=\"/admin.css\">"
            f"<script src=\"/admin.js\" defer></script></head><body{attributes}>{body}</body></html>\n")


def _form(action: str, token: str, fields: dict[str, str], label: str, extra: str = "") -> str:
    hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items())
    return (f'<form method="post" action="{escape(action)}" class="action"><input type="hidden" name="csrf" value="{escape(token)}">'
            f'{hidden}{extra}<button type="submit">{escape(label)}</button></form>')


def dashboard(*, operator: str, fleet: dict, requests: Sequence[dict], timeline: str, token: str, refresh: float,
              now: dt.datetime) -> str:
    """The page an operator sees.

    Args:
        operator: the operator's name (from their certificate).
        fleet: ``{"nodes": [...], "gateways": [...]}`` as ``pkictl nodes --json`` prints it.
        requests: pending pairing requests, each ``{"name", "code", "peer", "age_seconds"}``.
        timeline: the SVG of :func:`pkictl.admin.timeline.timeline_svg` (already escaped inside).
        token: the CSRF token of this operator's certificate, put into every form.
        refresh: seconds between the script's polls of /fleet.json.
        now: aware UTC.
    """
    head = "".join(f"<th>{escape(h)}</th>" for h, _ in FIELDS) + "<th>Revoke</th>"
    rows = []
    # No "superseded": the gateway keeps a superseded certificate's open connections (its successor
    # is on the way), which is not what an operator revoking from here wants.
    reasons = "".join(f'<option value="{escape(r)}">{escape(r)}</option>' for r in REASONS if r != "superseded")
    for node in fleet["nodes"]:
        cells = "".join(f'<td data-field="{k}">{escape(cell(k, node.get(k)))}</td>' for _, k in FIELDS)
        revoke = ""
        if node.get("serial") and node.get("certificate_state") not in ("revoked", "pending approval", "none"):
            revoke = _form("/revoke", token, {"serial": node["serial"], "name": node["name"]}, "Revoke",
                           f'<select name="reason" aria-label="reason">{reasons}</select>')
        rows.append(f'<tr data-node="{escape(node["name"].lower())}">{cells}<td>{revoke}</td></tr>')
    if not rows:
        rows.append(f'<tr><td colspan="{len(FIELDS) + 1}">no node enrolled</td></tr>')
    gateways = "".join(
        f"<li>gateway {escape(g['name'])}: {'reporting' if g['reporting'] else 'NOT REPORTING'} "
        f"(last report {escape(cell('received_at', g['received_at']))} UTC, every {g['interval']:g} s)</li>"
        for g in fleet["gateways"]) or "<li>no gateway has reported: connections are unknown</li>"
    pending = []
    for request in requests:
        name, code = request["name"], request["code"]
        actions = (_form("/approve", token, {"name": name, "code": code}, f"Approve {name}")
                   + _form("/deny", token, {"name": name}, f"Deny {name}"))
        pending.append(f'<tr data-request="{escape(code)}"><td>{escape(name)}</td><td class="code">{escape(code)}</td>'
                       f"<td>{escape(request['peer'] or '?')}</td><td>{int(request['age_seconds'])} s</td><td>{actions}</td></tr>")
    if not pending:
        pending.append('<tr><td colspan="5">no pending requests</td></tr>')
    codes = ",".join(r["code"] for r in requests)
    body = (f'<header><h1>pkictl fleet</h1><p>operator <strong id="operator">{escape(operator)}</strong> &middot; '
            f'<span id="updated">updated {escape(now.strftime("%Y-%m-%d %H:%M:%S"))} UTC</span></p></header>'
            f'<section><h2>Nodes</h2><table id="nodes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<ul id="gateways">{gateways}</ul></section>'
            '<section><h2>Pending pairing requests</h2><p>Approve only a code that matches the one the node shows.</p>'
            '<table id="requests"><thead><tr><th>Name</th><th>Code</th><th>From</th><th>Waiting</th><th></th></tr></thead>'
            f'<tbody>{"".join(pending)}</tbody></table></section>'
            '<section><h2>Expiry timeline</h2><p>Bars: validity; black tick: renewal point; red line: now.</p>'
            f'{timeline}</section>')
    return _shell("pkictl fleet", body, attributes=f' data-refresh="{refresh:g}" data-requests="{escape(codes)}"')


def how_to_page(*, origin: str) -> str:
    """What a browser without an operator certificate gets: how to get one and import it."""
    body = ("<h1>An operator certificate is needed</h1>"
            "<p>This page shows and changes the CA's fleet; it opens only with an operator's TLS client certificate "
            "from this CA, and your browser sent none.</p><h2>Get one</h2>"
            "<p>On the CA host, as the user who runs the CA:</p><pre>pkictl enroll-operator NAME</pre>"
            "<p>It writes <code>operator.p12</code> (and key.pem, cert.pem) to <code>&lt;CA home&gt;/operators/NAME/</code> "
            "and prints the password of <code>operator.p12</code> once.</p><h2>Import it</h2><ul>"
            "<li>Chromium / Chrome: Settings, Privacy and security, Security, Manage certificates, Your certificates, "
            "Import: choose operator.p12 and give the password.</li>"
            "<li>Firefox: Settings, Privacy &amp; Security, Certificates, View Certificates, Your Certificates, Import.</li>"
            "<li>curl: <code>curl --cacert ca.pem --cert fullchain.pem --key key.pem " + escape(origin) + "/fleet.json</code></li>"
            "</ul><p>Then reload this page and pick that certificate when the browser asks.</p>")
    return _shell("pkictl: operator certificate needed", body)


def refused_page(*, title: str, detail: str) -> str:
    """A refusal (a node's certificate, a request without its CSRF token): what and why, escaped."""
    return _shell(f"pkictl: {title}", f"<h1>{escape(title)}</h1><p class=\"detail\">{escape(detail)}</p>"
                                      '<p><a href="/">Back to the fleet</a></p>')


def result_page(*, message: str) -> str:
    """The answer to an action done."""
    return _shell("pkictl: done", f"<h1>Done</h1><p id=\"result\">{escape(message)}</p><p><a href=\"/\">Back to the fleet</a></p>")


# Served as /admin.js (script-src 'self': no inline script at all). It only writes text
# (textContent), never markup, and reloads the page when the set of nodes or requests changed.
SCRIPT = """\
"use strict";
(function () {
  const body = document.body;
  const every = Number(body.dataset.refresh || "0") * 1000;
  const updated = document.getElementById("updated");
  if (!every || !updated) return;
  function cell(field, value) {
    if (value === null || value === undefined) return "-";
    if (field === "connected") return value ? "yes" : "no";
    if (typeof value === "string" && value.length >= 19 && value[4] === "-" && value[10] === "T") return value.replace("T", " ").slice(0, 19);
    if (field === "serial") return String(value).slice(0, 16);
    return String(value);
  }
  async function refresh() {
    try {
      const answer = await fetch("/fleet.json", {credentials: "same-origin", cache: "no-store"});
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const data = await answer.json();
      const rows = Array.from(document.querySelectorAll("#nodes tbody tr[data-node]"));
      const shown = rows.map(function (r) { return r.dataset.node; }).join(",");
      const names = data.nodes.map(function (n) { return n.name.toLowerCase(); }).join(",");
      const codes = data.requests.map(function (r) { return r.code; }).join(",");
      if (shown !== names || codes !== (body.dataset.requests || "")) { location.reload(); return; }
      data.nodes.forEach(function (node, i) {
        rows[i].querySelectorAll("td[data-field]").forEach(function (td) { td.textContent = cell(td.dataset.field, node[td.dataset.field]); });
      });
      updated.textContent = "updated " + cell("now", data.now) + " UTC";
    } catch (error) {
      updated.textContent = "refresh failed: " + error.message;
    }
  }
  setInterval(refresh, every);
})();
"""

STYLE = """\
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 0.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; font-size: 0.9em; text-align: left; }
th { background: #eef; }
form.action { display: inline; margin-right: 0.3em; }
td.code { font-family: monospace; font-size: 1.1em; }
pre, code { background: #f4f4f4; padding: 0.1em 0.3em; }
.detail { font-family: monospace; }
"""
