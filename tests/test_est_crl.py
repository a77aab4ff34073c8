"""Cheap frequent CRL polling: /crl.pem and /crl carry a strong ETag and answer If-None-Match
with 304 Not Modified (RFC 9110 8.8.3, 13.1.2), with curl as the client."""

from __future__ import annotations

from pathlib import Path

import pytest

from est_support import RunningService, curl, pkictl


@pytest.fixture
def served(pki):
    service = RunningService(pki.home).start()
    yield service
    service.stop()


def fetch(service: RunningService, home: Path, path: str, *headers: str, etag_file: Path | None = None):
    args = [arg for header in headers for arg in ("-H", header)]
    if etag_file is not None:
        args += ["--etag-compare", str(etag_file), "--etag-save", str(etag_file)]
    return curl(service.url + path, *args, cacert=home / "ca.pem")


@pytest.mark.parametrize("path", ["/crl.pem", "/crl"])
def test_crl_has_a_strong_etag_and_an_unchanged_one_costs_a_304(pki, served, path, tmp_path):
    """GET answers 200 with a strong ETag and Cache-Control: no-cache; If-None-Match with that tag
    (also weak, or '*', or curl's --etag-compare) gets 304 with no body; another tag gets the 200;
    after 'pkictl revoke' the old tag gets the new CRL and a new tag."""
    first = fetch(served, pki.home, path)
    assert first.status == 200 and first.body, first
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10, etag  # strong: no W/ (RFC 9110 8.8.3)
    assert first.headers["cache-control"] == "no-cache"
    assert fetch(served, pki.home, path).headers["etag"] == etag  # the same bytes, the same tag

    for header in (f"If-None-Match: {etag}", f"If-None-Match: W/{etag}", f'If-None-Match: "other", {etag}', "If-None-Match: *"):
        same = fetch(served, pki.home, path, header)
        assert (same.status, same.body) == (304, b""), (header, same)
        assert same.headers["etag"] == etag and same.headers["cache-control"] == "no-cache", same
    other = fetch(served, pki.home, path, 'If-None-Match: "0123456789abcdef"')
    assert other.status == 200 and other.body == first.body, other

    saved = tmp_path / "etag"  # what a polling client does: keep the tag, send it back
    assert fetch(served, pki.home, path, etag_file=saved).status == 200
    assert fetch(served, pki.home, path, etag_file=saved).status == 304

    pkictl(pki.home, "revoke", "TW")
    changed = fetch(served, pki.home, path, f"If-None-Match: {etag}")
    assert changed.status == 200 and changed.body != first.body, changed
    assert changed.headers["etag"] != etag
    assert fetch(served, pki.home, path, f"If-None-Match: {changed.headers['etag']}").status == 304
    assert fetch(served, pki.home, path, etag_file=saved).status == 200  # the saved tag is stale now


def test_the_pem_and_the_der_crl_have_different_tags(pki, served):
    """/crl.pem and /crl are different bytes, so a tag of one never matches the other."""
    pem, der = fetch(served, pki.home, "/crl.pem"), fetch(served, pki.home, "/crl")
    assert pem.headers["etag"] != der.headers["etag"]
    assert fetch(served, pki.home, "/crl", f"If-None-Match: {pem.headers['etag']}").status == 200
