"""The credential directory: numbered versions under archive/ behind an atomically replaced
relative ``live`` symlink, stable links for other software, 0600 keys, pruning, and the failures
(mismatched key, directory copied with links followed, half-written version after a crash).

Credentials come from trustme (root -> intermediate -> leaf) so these tests do not depend on the
CA code they would otherwise share a bug with."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pkictl.errors import StoreError
from pkictl.pem import private_key_from_pem, public_key_bytes
from pkictl.store import CREDENTIAL_FILES, Credential, CredentialStore


@pytest.fixture(scope="module")
def root() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def issuing(root) -> trustme.CA:
    return root.create_child_ca()


@pytest.fixture(scope="module")
def anchors(root) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(root.cert_pem.bytes())]


def _credential(issuing: trustme.CA, name: str = "tw.example.lan") -> Credential:
    leaf = issuing.issue_cert(name)
    certificates = [x509.load_pem_x509_certificate(p.bytes()) for p in leaf.cert_chain_pems]
    key = private_key_from_pem(leaf.private_key_pem.bytes(), source=name)
    return Credential(key, certificates[0], tuple(certificates[1:]))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_create_writes_version_1_behind_relative_links(tmp_path, issuing, anchors):
    """create writes ca.pem, archive/1/{cert,chain,fullchain,privkey,combined}.pem, live -> archive/1 and cert.pem -> live/cert.pem etc., all relative."""
    credential = _credential(issuing)
    directory = tmp_path / "bundle"
    CredentialStore.create(directory, credential, anchors)

    assert x509.load_pem_x509_certificates((directory / "ca.pem").read_bytes()) == anchors
    assert not (directory / "ca.pem").is_symlink()
    assert sorted(p.name for p in (directory / "archive").iterdir()) == ["1"]
    assert sorted(p.name for p in (directory / "archive" / "1").iterdir()) == sorted([*CREDENTIAL_FILES, "combined.pem"])
    assert (directory / "live").is_symlink()
    assert os.readlink(directory / "live") == "archive/1"
    for name in (*CREDENTIAL_FILES, "combined.pem"):
        assert (directory / name).is_symlink()
        assert os.readlink(directory / name) == f"live/{name}"
    version = directory / "archive" / "1"
    assert x509.load_pem_x509_certificates((version / "cert.pem").read_bytes()) == [credential.certificate]
    assert x509.load_pem_x509_certificates((version / "chain.pem").read_bytes()) == list(credential.chain)
    assert x509.load_pem_x509_certificates((version / "fullchain.pem").read_bytes()) == [credential.certificate, *credential.chain]
    assert len(credential.chain) == 1  # the fixture really has an intermediate
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files left


def test_private_key_is_0600_and_directories_0700(tmp_path, issuing, anchors):
    """privkey.pem and combined.pem are born 0600, the certificates are world-readable but not writable, and the directories are 0700."""
    directory = tmp_path / "bundle"
    CredentialStore.create(directory, _credential(issuing), anchors)
    version = directory / "archive" / "1"
    assert _mode(version / "privkey.pem") == 0o600
    assert _mode(version / "combined.pem") == 0o600
    for name in ("cert.pem", "chain.pem", "fullchain.pem"):
        assert _mode(version / name) & 0o022 == 0
    assert _mode(directory) == 0o700
    assert _mode(directory / "archive") == 0o700
    assert _mode(version) == 0o700


def test_load_returns_the_credential(tmp_path, issuing, anchors):
    """load returns the key, certificate and chain that create wrote; load_trust_anchors returns ca.pem."""
    credential = _credential(issuing)
    store = CredentialStore.create(tmp_path / "bundle", credential, anchors)
    loaded = store.load()
    assert loaded.certificate == credential.certificate
    assert loaded.chain == credential.chain
    assert public_key_bytes(loaded.private_key.public_key()) == public_key_bytes(credential.private_key.public_key())
    assert store.load_trust_anchors() == anchors


def test_create_refuses_a_non_empty_directory(tmp_path, issuing, anchors):
    """create into a non-empty directory raises StoreError and writes nothing; an empty one is accepted."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        CredentialStore.create(busy, _credential(issuing), anchors)
    assert sorted(p.name for p in busy.iterdir()) == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    CredentialStore.create(empty, _credential(issuing), anchors).load()


def test_install_adds_version_2_and_moves_live(tmp_path, issuing, anchors):
    """install of a new credential writes archive/2, points live (and so cert.pem) at it, keeps archive/1, and load returns it."""
    first, second = _credential(issuing), _credential(issuing)
    store = CredentialStore.create(tmp_path / "bundle", first, anchors)
    version = store.install(second)

    assert version == store.archive / "2"
    assert os.readlink(store.live) == "archive/2"
    assert store.versions() == [1, 2]
    assert store.load().certificate == second.certificate
    assert _serial(store.directory / "cert.pem") == second.certificate.serial_number
    assert _serial(store.archive / "1" / "cert.pem") == first.certificate.serial_number
    assert _serial(store.directory / "cert.pem") != first.certificate.serial_number
    assert private_key_from_pem((store.directory / "privkey.pem").read_bytes(), source="t").public_key() == second.certificate.public_key()
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".live")]  # the temp link was renamed, not left


def test_load_reads_all_files_from_one_version(tmp_path, issuing, anchors):
    """load(version) reads the version it is given, so a reader that resolved live once never mixes two versions."""
    first = _credential(issuing)
    store = CredentialStore.create(tmp_path / "bundle", first, anchors)
    resolved = store.current_version_dir()
    store.install(_credential(issuing))
    assert store.load(resolved).certificate == first.certificate
    assert store.load().certificate != first.certificate


@pytest.mark.parametrize(("keep", "kept"), [(3, [4, 5, 6]), (1, [5, 6]), (10, [1, 2, 3, 4, 5, 6])])
def test_install_prunes_to_keep_versions(tmp_path, issuing, anchors, keep, kept):
    """After six versions, install keeps the newest ``keep`` (at least 2, the live one included)."""
    CredentialStore.create(tmp_path / "bundle", _credential(issuing), anchors)
    store = CredentialStore(tmp_path / "bundle", keep=keep)
    credentials = [_credential(issuing) for _ in range(5)]
    for credential in credentials:
        store.install(credential)
    assert store.versions() == kept
    assert os.readlink(store.live) == "archive/6"
    assert store.load().certificate == credentials[-1].certificate


def test_credential_with_a_mismatched_key_is_refused(issuing):
    """Credential(key, certificate) raises StoreError when the key is not the certificate's; the matching key is accepted."""
    good = _credential(issuing)
    with pytest.raises(StoreError, match="does not match"):
        Credential(ec.generate_private_key(ec.SECP256R1()), good.certificate, good.chain)
    other = _credential(issuing, "other.example.lan")
    with pytest.raises(StoreError):
        Credential(other.private_key, good.certificate, good.chain)
    Credential(good.private_key, good.certificate, good.chain)


def test_load_refuses_a_version_whose_key_was_swapped(tmp_path, issuing, anchors):
    """load raises StoreError when a version's privkey.pem does not belong to its cert.pem."""
    store = CredentialStore.create(tmp_path / "bundle", _credential(issuing), anchors)
    other = CredentialStore.create(tmp_path / "other", _credential(issuing), anchors)
    key = store.archive / "1" / "privkey.pem"
    key.unlink()
    shutil.copy2(other.archive / "1" / "privkey.pem", key)
    assert _mode(key) == 0o600
    with pytest.raises(StoreError, match="does not match"):
        store.load()


def test_a_key_that_cannot_sign_is_refused_with_its_file_named():
    """private_key_from_pem refuses an X25519 key (it could sign no CSR) with a StoreError naming the file; a P-256 key loads."""
    pem = x25519.X25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(StoreError, match="privkey.pem: holds a key of type X25519PrivateKey"):
        private_key_from_pem(pem, source="privkey.pem")
    p256 = ec.generate_private_key(ec.SECP256R1())
    loaded = private_key_from_pem(p256.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), source="privkey.pem")
    assert public_key_bytes(loaded.public_key()) == public_key_bytes(p256.public_key())


def test_load_refuses_a_copy_made_by_following_links(tmp_path, issuing, anchors):
    """A bundle copied with cp -rL (live becomes a real directory) fails to load with a StoreError pointing at tar/rsync."""
    store = CredentialStore.create(tmp_path / "bundle", _credential(issuing), anchors)
    copy = tmp_path / "copy-L"
    shutil.copytree(store.directory, copy, symlinks=False)  # cp -rL: links replaced by what they point to
    assert (copy / "live").is_dir() and not (copy / "live").is_symlink()
    with pytest.raises(StoreError) as excinfo:
        CredentialStore(copy).load()
    assert "tar" in str(excinfo.value) and "rsync" in str(excinfo.value)
    # control: a copy that keeps the links (cp -a, tar, rsync -a) loads, because the links are relative
    kept = tmp_path / "copy-a"
    shutil.copytree(store.directory, kept, symlinks=True)
    assert CredentialStore(kept).load().certificate == store.load().certificate


def test_load_of_an_empty_directory(tmp_path):
    """load of a directory without a live link raises StoreError saying to enroll first."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="enroll"):
        CredentialStore(tmp_path / "empty").load()


def test_load_refuses_a_live_link_outside_archive(tmp_path, issuing, anchors):
    """load raises StoreError when live points anywhere but archive/<number> (absolute or escaping paths)."""
    store = CredentialStore.create(tmp_path / "bundle", _credential(issuing), anchors)
    for target in (str(store.archive / "1"), "../elsewhere", "archive/../archive/1"):
        store.live.unlink()
        os.symlink(target, store.live)
        with pytest.raises(StoreError, match="archive/<number>"):
            store.load()


@pytest.mark.parametrize("partial", [(), ("cert.pem",), ("cert.pem", "chain.pem", "fullchain.pem")])
def test_half_written_version_breaks_neither_install_nor_load(tmp_path, issuing, anchors, partial):
    """A version directory left half-written by a crash is skipped: load still returns the live version and install writes the next number."""
    first = _credential(issuing)
    store = CredentialStore.create(tmp_path / "bundle", first, anchors)
    crashed = store.archive / "2"
    crashed.mkdir(mode=0o700)
    for name in partial:
        shutil.copy2(store.archive / "1" / name, crashed / name)

    assert store.load().certificate == first.certificate
    second = _credential(issuing)
    version = store.install(second)
    assert version == store.archive / "3"
    assert os.readlink(store.live) == "archive/3"
    assert store.load().certificate == second.certificate
    assert sorted(p.name for p in version.iterdir()) == sorted([*CREDENTIAL_FILES, "combined.pem"])
    third = _credential(issuing)
    assert store.install(third) == store.archive / "4"
    assert store.load().certificate == third.certificate


def test_half_written_version_as_only_version_is_reported(tmp_path, issuing, anchors):
    """If live points at a version missing privkey.pem, load raises StoreError naming the missing file."""
    store = CredentialStore.create(tmp_path / "bundle", _credential(issuing), anchors)
    (store.archive / "1" / "privkey.pem").unlink()
    with pytest.raises(StoreError, match="privkey.pem"):
        store.load()
