"""``pkictl serve``: the command that runs the EST service (:mod:`pkictl.est.serve`) with its options."""

from __future__ import annotations


import click

from .common import Home

__all__ = ["serve"]



@click.command("serve")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT of the EST service (HTTPS).")
@click.option("--dns", "dns_names", multiple=True, help="DNS name nodes use to reach the service (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="IP address nodes use to reach the service (repeatable).")
@click.option("--retry-after", type=click.IntRange(1, 3600), default=10, show_default=True, help="Seconds a pending enrollment is told to wait.")
@click.option("--check-interval", type=click.FloatRange(0.1), default=60.0, show_default=True, help="Seconds between checks of the service certificate, the CRL and a new issuing CA.")
@click.option("--rate", type=click.FloatRange(0.1), default=5.0, show_default=True, help="Requests per second per client address or identity.")
@click.option("--burst", type=click.IntRange(1), default=20, show_default=True, help="Requests a client may send at once.")
@click.option("--workers", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Processes that issue beside the TLS/HTTP event loop (0 = issue in the serving process).")
@click.option("--loop", "loop_name", default="auto", show_default=True, type=click.Choice(["auto", "uvloop", "asyncio"]),
              help="Event loop: uvloop when installed (pip install 'pkictl[fast]'), else asyncio's own.")
@click.option("--handshake-timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds a client has to finish its TLS handshake.")
@click.option("--header-timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds a connection has to send a complete request header (after its handshake or the previous answer).")
@click.option("--body-timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True,
              help="Seconds a request has to send its body once its header is in (then HTTP 408).")
@click.option("--max-connections", type=click.IntRange(2, 65536), default=1024, show_default=True,
              help="Connections open at once; a quarter is kept for clients presenting a certificate of this CA.")
@click.option("--max-connections-per-peer", type=click.IntRange(1, 65536), default=None,
              help="Connections open at once from one address.  [default: a quarter of --max-connections]")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve GET /healthz and Prometheus GET /metrics over plain HTTP here (keep it on loopback: no authentication).")
@click.option("--admin-listen", default=None, metavar="[HOST:]PORT",
              help="Serve the operator's web page (HTTPS, operator certificates only: pkictl enroll-operator) here; "
                   "a bare PORT binds 127.0.0.1. Off unless given.")
@click.option("--group-commit/--no-group-commit", default=True, show_default=True,
              help="Signing workers commit the issuances queued to them together: one database commit and one audit-log write for all.")
@click.option("--max-pending", type=click.IntRange(1), default=None,
              help="Enrollments in hand at once; beyond, 503 with Retry-After.  [default: issuances/s measured x --max-queue-delay]")
@click.option("--max-queue-delay", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="Seconds the enrollment admitted last may wait for its answer (derives --max-pending).")
@click.option("--replica", default=None, metavar="NAME",
              help="This replica's name, for its own service certificate, when several pkictl serve share one "
                   "PostgreSQL database (init-ca --db): each needs its own.  [default: est on SQLite; required on PostgreSQL]")
@click.option("--follow-interval", type=click.FloatRange(0.1, 300), default=2.0, show_default=True,
              help="Seconds between reads of the CRLs other replicas signed, from the shared database.")
@click.pass_obj
def serve(obj: Home, listen, dns_names, ip_addresses, retry_after, check_interval, rate, burst, workers, loop_name,
          handshake_timeout, header_timeout, body_timeout, max_connections, max_connections_per_peer, metrics_listen,
          admin_listen, group_commit, max_pending, max_queue_delay, replica, follow_interval) -> None:
    """Serve EST (RFC 7030) so that nodes enroll and renew over the network; also the CRL.

    Runs in the foreground until SIGTERM (systemd/pkictl-serve.service). It issues and renews its
    own server certificate, re-signs the CRL in time, and follows pkictl rotate-issuing without a
    restart. SIGHUP reloads its certificate and the issuing CA from disk. Every refused client
    (TLS handshake or EST request) is logged with its address and reason.

    \b
    Endpoints (under /.well-known/est):
      GET  cacerts         the CA certificates (PKCS#7, base64)
      GET  csrattrs        what a CSR must carry (RFC 7030 4.5)
      POST simpleenroll    a first certificate: HTTP Basic user = the node name, password = the
                           one-time token of 'pkictl enroll-node NAME --token' (401 if wrong,
                           expired or spent); without credentials, 202 until 'pkictl approve'
      POST simplereenroll  a renewal, authenticated by the current certificate (TLS client cert)
    and GET /crl (DER), /crl.pem. Every 4xx answer says what was wrong and what was expected.
    With --admin-listen, the operator's web page (the fleet, pairing requests to approve or deny,
    revocation, an expiry timeline) on its own port, for operator certificates only.
    """
    import asyncio
    import logging

    from ..bundle_config import check_loopback, parse_address
    from ..loops import event_loop_factory

    from ..admission import AdmissionLimits
    from ..authority import CertificateAuthority
    from ..est.wire import root_fingerprint
    from ..est.front import FrontLimits
    from ..est.serve import ESTService
    from ..est.shedding import SheddingPolicy
    from ..est.signers import SignerPool
    from ..sockets import ensure_file_limit

    per_peer = max_connections_per_peer or max(1, max_connections // 4)
    if per_peer > max_connections:
        raise click.BadParameter(f"got {per_peer}, want at most --max-connections ({max_connections})",
                                 param_hint="--max-connections-per-peer")
    limits = FrontLimits(header_timeout=header_timeout, body_timeout=body_timeout,
                         admission=AdmissionLimits(total=max_connections, per_peer=per_peer, reserved=max_connections // 4))

    try:
        host, port = parse_address(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    status_address = None
    if metrics_listen is not None:
        try:
            status_address = parse_address(metrics_listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-listen") from None
    admin_address = None
    if admin_listen is not None:
        try:
            admin_address = parse_address(f"127.0.0.1:{admin_listen}" if admin_listen.strip().isdigit() else admin_listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--admin-listen") from None
    try:
        check_loopback((host, port))
        loopback = True
    except ValueError:
        loopback = False
    if not loopback and not dns_names and not ip_addresses:
        raise click.UsageError(f"--listen {listen} reaches beyond this host: give the --dns names or --ip addresses nodes dial, so that they can verify the service")
    from ..errors import PKIError
    from ..names import validate_name
    from ..storage.location import database_url

    shared = database_url(obj.home) is not None if obj.home.is_dir() else False
    if replica is None and shared:
        raise click.UsageError("this CA keeps its records in PostgreSQL, where several pkictl serve may share them: "
                               "give this one a name of its own with --replica NAME (a DNS label, e.g. the host's name)")
    if replica is not None:
        replica = f"est-{replica}"
        try:
            validate_name(replica)
        except PKIError as exc:
            raise click.BadParameter(str(exc), param_hint="--replica") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    passphrase = obj.passphrase()
    ca = CertificateAuthority.load(obj.home, passphrase=passphrase)
    signers = SignerPool(obj.home, passphrase=passphrase, workers=workers, group_commit=group_commit) if workers else None
    # Until a rate is measured, 100 issuances/s per worker (one did 147/s in bench/est_reenroll.py, on a shared
    # machine): too high queues more than --max-queue-delay at first, too low idles the service while the herd
    # sleeps (docs/design.md, "Group commit and load shedding").
    shedding = SheddingPolicy(max_pending=max_pending, max_delay=max_queue_delay, prior_rate=100.0 * max(workers, 1))
    service = ESTService(ca, listen=(host, port), dns_names=list(dns_names), ip_addresses=list(ip_addresses) or None,
                         retry_after=retry_after, check_interval=check_interval, rate=rate, burst=burst, signers=signers,
                         handshake_timeout=handshake_timeout, limits=limits, metrics_listen=status_address,
                         admin_listen=admin_address, shedding=shedding, replica=replica or "est", follow_interval=follow_interval)

    def ready(bound: int) -> None:
        from ..files import atomic_write

        dialed = (list(dns_names) or list(ip_addresses) or [host])[0]
        url = f"https://{f'[{dialed}]' if ':' in dialed else dialed}:{bound}"
        # What 'pkictl enroll-node --token' prints for the node to dial (nothing secret).
        atomic_write(obj.home / "service" / "url", (url + "\n").encode())
        logging.getLogger("pkictl.serve").info("ready: EST on %s%s (root %s)", url, "/.well-known/est", root_fingerprint(ca.root))
        if service.admin is not None:
            logging.getLogger("pkictl.serve").info("admin page on %s (operator certificates: pkictl enroll-operator NAME)", ", ".join(
                f"https://{f'[{h}]' if ':' in h else h}:{p}/" for h, p in service.admin.addresses))
        if service.status_server is not None:
            logging.getLogger("pkictl.serve").info("metrics and health on %s", ", ".join(
                f"http://{f'[{h}]' if ':' in h else h}:{p}/metrics" for h, p in service.status_server.addresses))

    short = ensure_file_limit(max_connections + 64)  # listening sockets, the CA's files, workers' pipes
    if short:
        logging.getLogger("pkictl.serve").warning("%s", short)
    factory, loop_label = event_loop_factory(loop_name)
    logging.getLogger("pkictl.serve").info("event loop: %s, %s", loop_label,
                                           f"{workers} signing worker(s)" if workers else "issuing in this process")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(service.run(ready=ready))
