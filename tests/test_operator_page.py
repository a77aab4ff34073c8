"""The operator's web page in a real headless Chromium (Debian's, driven by Playwright): every other
part a real process too (pkictl serve with --admin-listen, a gateway agent reporting its
connections, nodes connecting through it, pki-agent enroll waiting for approval).

Playwright presents a client certificate through its own TLS proxy (``client_certificates``);
NODE_EXTRA_CA_CERTS makes that proxy verify the page's server certificate against this CA. A
context without a client certificate talks to the server directly and cannot be told about the
CA, so it ignores the server certificate (its refusal is what is checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pkictl.cli import cli
from pkictl.est.wire import root_fingerprint

from est_support import ServeProcess
from support import (DEADLINE, AgentProcess, EchoServer, LogWatcher, TLSClient, bundle_context, close_pipes, command, free_port,
                     require_tool)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
BOUND = 10.0  # seconds: the page shows a change within this (the gateway reports every 1 s, the page polls every 3 s)
CODE = r"([A-Z2-7]{4}-[A-Z2-7]{4})"


class Site:
    """pkictl serve with its admin page, a gateway agent reporting to it, operators alice and bob."""

    def __init__(self, pki, tmp_path: Path, upstream: int) -> None:
        self.pki = pki
        self.passwords = {}
        for name in ("alice", "bob"):
            result = CliRunner().invoke(cli, ["--home", str(pki.home), "enroll-operator", name])
            assert result.exit_code == 0, result.output
            self.passwords[name] = re.search(r"operator\.p12 password \(shown once\): (\S+)", result.output).group(1)
        self.serve = ServeProcess(pki.home, "--check-interval", "1", "--retry-after", "1", "--admin-listen", "127.0.0.1:0")
        self.admin = self.serve.log.wait_for(r"admin page on (https://127\.0\.0\.1:\d+)/").group(1)
        (pki.gateway / "agent.yaml").write_text(yaml.safe_dump({
            "name": "gw", "kind": "gateway", "credential_dir": ".", "renewal": {"check_interval": "1h", "ca_url": self.serve.url},
            "listener": {"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream}", "crl": str(pki.ca.crl_path), "allow": ["*"],
                         "report_interval": "1s"},
        }))
        self.gateway = AgentProcess(pki.gateway / "agent.yaml")
        _, self.gateway_port = self.gateway.wait_ready()

    def operator(self, name: str) -> dict:
        """Alice's client certificate as PEM files; bob's as the PKCS#12 a browser imports, with its printed password."""
        directory = self.pki.home / "operators" / name
        if name == "bob":
            return {"origin": self.admin, "pfxPath": str(directory / "operator.p12"), "passphrase": self.passwords[name]}
        return {"origin": self.admin, "certPath": str(directory / "fullchain.pem"), "keyPath": str(directory / "key.pem")}

    def audit(self, event: str) -> list[dict]:
        return [r for r in map(json.loads, (self.pki.home / "audit.log").read_text().splitlines()) if r["event"] == event]

    def stop(self) -> None:
        self.gateway.stop()
        self.serve.stop()
        close_pipes(self.serve.proc)


@pytest.fixture
def site(pki, tmp_path):
    with EchoServer() as upstream:
        running = Site(pki, tmp_path, upstream.port)
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def browser(site, monkeypatch) -> Browser:
    """Chromium, its Playwright driver started after the CA exists (NODE_EXTRA_CA_CERTS is read once)."""
    require_tool("chromium", "chromium")
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium"
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(site.pki.home / "ca.pem"))
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=DEADLINE * 1000)
        try:
            yield chromium
        finally:
            chromium.close()


def operator_page(browser: Browser, site: Site, name: str = "alice") -> Page:
    page = browser.new_context(client_certificates=[site.operator(name)]).new_page()
    page.set_default_timeout(DEADLINE * 1000)
    return page


def png_colours(data: bytes) -> tuple[int, float]:
    """(distinct colours, share of pixels unlike the top-left one) of an 8-bit RGB(A) PNG, decoded
    here with zlib (PNG spec 9: the five scanline filters)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6), header
    bpp = 3 if colour == 2 else 4
    raw, stride, previous, pixels = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = line[i - bpp] if i >= bpp else 0, previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.extend(bytes(line[i:i + 3]) for i in range(0, stride, bpp))
        previous = line
    background = pixels[0]
    return len(set(pixels)), sum(p != background for p in pixels) / len(pixels)


def test_the_page_lists_a_connected_node_live_with_its_timeline(site, browser, tmp_path):
    """With alice's certificate the page (CSP without inline script, no framing, nosniff) shows TW
    not connected, then connected with its peer once it connects through the gateway, updated by
    the page's script without a reload; the timeline draws a bar per certificate, renewal ticks
    and the now line. A screenshot of it is not blank (also written to $PKICTL_SCREENSHOT_DIR)."""
    page = operator_page(browser, site)
    response = page.goto(site.admin + "/")
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, csp
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    expect(page.locator("#operator")).to_have_text("alice")
    connected = page.locator('tr[data-node="tw"] td[data-field="connected"]')
    expect(connected).to_have_text("no", timeout=BOUND * 1000)  # the gateway's first report, brought by the script
    page.evaluate("window.pkictlSamePage = true")
    client = TLSClient(site.gateway_port, bundle_context(site.pki.node))
    try:
        assert client.echo(b"through the gateway") == b"through the gateway"
        started = time.monotonic()
        expect(connected).to_have_text("yes", timeout=BOUND * 1000)
        print(f"connection shown on the page {time.monotonic() - started:.2f} s after the echo")
        assert page.evaluate("window.pkictlSamePage === true"), "the page reloaded instead of updating its table"
        expect(page.locator('tr[data-node="tw"] td[data-field="peer"]')).to_have_text(re.compile(r"^127\.0\.0\.1:\d+$"))
        expect(page.locator('tr[data-node="tw"] td[data-field="open_connections"]')).to_have_text("1")
        page.reload()
        labels = page.locator("svg.timeline g.bar text").all_text_contents()
        assert {"node TW", "gateway gw", "operator alice", "operator bob"} <= set(labels), labels
        assert page.locator("svg.timeline line.renewal").count() >= 2 and page.locator("svg.timeline line.now").count() == 1
        shot = page.screenshot(path=str(tmp_path / "operator-page.png"), full_page=True)
    finally:
        client.close()
    if os.environ.get("PKICTL_SCREENSHOT_DIR"):
        shutil.copyfile(tmp_path / "operator-page.png", Path(os.environ["PKICTL_SCREENSHOT_DIR"]) / "operator-page.png")
    colours, drawn = png_colours(shot)
    assert colours >= 16 and drawn > 0.02, (colours, drawn)


def enroll_waiting(site: Site, name: str, directory: Path) -> tuple[subprocess.Popen, LogWatcher, str]:
    """``pki-agent enroll`` without a token: it files a pairing request and waits; returns it and its code."""
    proc = subprocess.Popen([command("pki-agent"), "enroll", "--ca-url", site.serve.url, "--fingerprint", root_fingerprint(site.pki.ca.root),
                             "--name", name, "--dir", str(directory), "--wait", str(int(DEADLINE))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = LogWatcher(proc.stdout)
    return proc, log, log.wait_for(rf"waiting for approval: code {CODE}").group(1)


def test_approving_from_the_page_gets_the_node_its_certificate_and_denying_refuses_one(site, browser, tmp_path):
    """N2 and N3 wait for approval; the page lists both with code and peer address; Approve N2
    gets N2 its certificate (pki-agent enroll exits 0 with its bundle), Deny N3 makes N3's enroll
    fail without a bundle; the audit log records both under alice's name."""
    n2, n2_log, n2_code = enroll_waiting(site, "N2", tmp_path / "N2")
    n3, n3_log, n3_code = enroll_waiting(site, "N3", tmp_path / "N3")
    try:
        page = operator_page(browser, site)
        page.goto(site.admin + "/")
        for code in (n2_code, n3_code):  # present at load, or brought by the script's reload
            expect(page.locator(f'tr[data-request="{code}"]')).to_be_visible(timeout=BOUND * 1000)
        row = page.locator(f'tr[data-request="{n2_code}"]')
        expect(row.locator("td").nth(2)).to_have_text(re.compile(r"^127\.0\.0\.1"))
        row.get_by_role("button", name="Approve N2").click()
        expect(page.locator("#result")).to_contain_text(f"approved N2 ({n2_code})")
        serial = n2_log.wait_for(r"enrolled N2: serial ([0-9a-f]+)").group(1)
        assert n2.wait(DEADLINE) == 0 and (tmp_path / "N2" / "agent.yaml").exists()

        page.goto(site.admin + "/")
        page.locator(f'tr[data-request="{n3_code}"]').get_by_role("button", name="Deny N3").click()
        expect(page.locator("#result")).to_contain_text("denied 1 request(s) of N3")
        assert n3.wait(DEADLINE) != 0 and not (tmp_path / "N3").exists()
    finally:
        for proc in (n2, n3):
            if proc.poll() is None:
                proc.kill()
                proc.wait(DEADLINE)
            close_pipes(proc)
    approved = [(r["name"], r["code"], r.get("operator")) for r in site.audit("approved")]
    assert approved == [("N2", n2_code, "alice")], approved
    assert [(r["name"], r.get("operator")) for r in site.audit("denied")] == [("N3", "alice")]
    assert any(r["name"] == "N2" and r["serial"] == serial for r in site.audit("issued"))


def test_revoking_from_the_page_closes_the_nodes_connection_at_the_gateway(site, browser):
    """TW is connected through the gateway; Revoke (key-compromise) on TW's row re-signs the CRL,
    the gateway closes TW's open connection, the page shows TW revoked, and the audit log has the
    revocation under alice's name."""
    client = TLSClient(site.gateway_port, bundle_context(site.pki.node))
    try:
        assert client.echo(b"before") == b"before"
        page = operator_page(browser, site)
        page.goto(site.admin + "/")
        row = page.locator('tr[data-node="tw"]')
        row.locator('select[name="reason"]').select_option("key-compromise")
        row.get_by_role("button", name="Revoke").click()
        expect(page.locator("#result")).to_contain_text("revoked node TW serial")
        site.gateway.log.wait_for(r"closing peer=\S+ node=tw serial=[0-9a-f]+ reason='revoked'")
        try:
            closed = client.sock.recv(1) == b""
        except (ConnectionError, OSError):
            closed = True
        assert closed, "TW's connection is still open after its revocation"
    finally:
        client.close()
    page.goto(site.admin + "/")
    expect(page.locator('tr[data-node="tw"] td[data-field="certificate_state"]')).to_have_text("revoked")
    revoked = [(r["names"], r["reason"], r.get("operator")) for r in site.audit("revoked")]
    assert (["TW"], "key-compromise", "alice") in revoked, revoked


def test_no_certificate_gets_the_how_to_page_and_a_nodes_certificate_403(site, browser):
    """Without a client certificate the page is refused (403) with how to get one (pkictl
    enroll-operator NAME) and import it, and /fleet.json too; with TW's certificate it is 403
    'not an operator certificate' naming TW's node identity; neither shows the fleet."""
    anonymous = browser.new_context(ignore_https_errors=True).new_page()
    response = anonymous.goto(site.admin + "/")
    assert response is not None and response.status == 403
    expect(anonymous.locator("body")).to_contain_text("pkictl enroll-operator NAME")
    expect(anonymous.locator("body")).to_contain_text("operator.p12")
    assert anonymous.locator("#nodes").count() == 0
    assert anonymous.goto(site.admin + "/fleet.json").status == 403
    files = {"origin": site.admin, "certPath": str(site.pki.node / "live" / "fullchain.pem"), "keyPath": str(site.pki.node / "live" / "privkey.pem")}
    node = browser.new_context(client_certificates=[files]).new_page()
    response = node.goto(site.admin + "/")
    assert response is not None and response.status == 403
    expect(node.locator("h1")).to_have_text("Not an operator certificate")
    expect(node.locator(".detail")).to_contain_text("spiffe://pkictl.internal/node/tw")
    assert node.locator("#nodes").count() == 0


def test_a_post_without_the_token_from_another_site_or_with_anothers_token_is_refused(site, browser):
    """From alice's page: a POST without the CSRF token, one with bob's token, and one from another
    origin carrying alice's own token are each refused with 403 and audited under alice's name;
    TW stays unrevoked. Her page's own form (the control) revokes."""
    page = operator_page(browser, site)
    page.goto(site.admin + "/")
    form = page.locator('tr[data-node="tw"] form')
    serial, token = form.locator('input[name="serial"]').get_attribute("value"), form.locator('input[name="csrf"]').get_attribute("value")
    bob = operator_page(browser, site, "bob")  # from operator.p12, as imported into a browser
    bob.goto(site.admin + "/")
    expect(bob.locator("#operator")).to_have_text("bob")
    bobs = bob.locator('tr[data-node="tw"] input[name="csrf"]').get_attribute("value")
    assert token and bobs and token != bobs

    def post(fields: dict) -> tuple[int, str]:
        return tuple(page.evaluate("""async (fields) => {
            const answer = await fetch("/revoke", {method: "POST", body: new URLSearchParams(fields)});
            return [answer.status, await answer.text()];
        }""", fields))

    status, text = post({"serial": serial, "reason": "key-compromise"})
    assert status == 403 and "CSRF token is missing" in text
    status, text = post({"serial": serial, "reason": "key-compromise", "csrf": bobs})
    assert status == 403 and "not this operator" in text

    # Another origin (another port of this host) with a form posting to the page: the browser sends
    # alice's certificate and its own Origin; with her real token it is still refused.
    other = f"http://127.0.0.1:{free_port()}"  # served by the route below, as a site of its own would
    page.route(other + "/", lambda route: route.fulfill(status=200, content_type="text/html", body=(
        f'<form id="f" method="post" action="{site.admin}/revoke"><input name="csrf" value="{token}">'
        f'<input name="serial" value="{serial}"><input name="reason" value="key-compromise"></form>')))
    page.goto(other + "/")
    with page.expect_navigation():
        page.evaluate("document.getElementById('f').submit()")
    expect(page.locator(".detail")).to_contain_text(f"want Origin: {site.admin}")
    record = site.pki.ca.inventory.get(int(serial, 16))
    assert record is not None and record.status == "issued"
    refused = [(r["operation"], r["operator"]) for r in site.audit("refused") if r.get("operation") == "admin revoke"]
    assert refused == [("admin revoke", "alice")] * 3, refused

    page.goto(site.admin + "/")
    page.locator('tr[data-node="tw"]').get_by_role("button", name="Revoke").click()
    expect(page.locator("#result")).to_contain_text("revoked node TW")
