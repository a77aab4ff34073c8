/* The load client and the upstream of bench/gateway_peers.py, in C so that neither is the
 * bottleneck of a forwarder under test (compiled at run time: cc -O2 tls_load.c -lssl -lcrypto -lm).
 *
 * Every client connection is a full TLS 1.3 handshake with a client certificate (no session is
 * ever offered for resumption), verifies the server against the trust anchor and the IP address
 * dialed, and speaks a tiny protocol to the upstream through the forwarder:
 *   'e' then bytes  -> the upstream echoes them
 *   'u' + u64 (BE)  -> the client sends that many bytes, the upstream answers 'k' at the end
 *   'd' + u64 (BE)  -> the upstream sends that many bytes
 *
 * Usage:
 *   tls_load upstream                     listen on 127.0.0.1:0, print "port=N", serve forever
 *   tls_load hs   COMMON --procs N --seconds S   handshake flood: connect, handshake, echo 1 byte, close
 *   tls_load rtt  COMMON --count N --size B      round trips of B bytes over one connection
 *   tls_load up   COMMON --bytes N               upload N bytes over one connection
 *   tls_load down COMMON --bytes N               download N bytes over one connection
 *   tls_load once COMMON                         one connection with a 1-byte echo: ok or why not
 * COMMON: --port P --ca ca.pem [--cert fullchain.pem --key privkey.pem] [--ip 127.0.0.1]
 * Results are printed as one line of key=value pairs (hs: one line per process, with lat=I:N,...:
 * N successful connections took [1.05^I, 1.05^(I+1)) microseconds, connect to close).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define MAX_SERIALS 64

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "tls_load: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* -- upstream: thread per connection ------------------------------------------------------ */

static int read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, (char *)buf + got, n - got, 0);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t w = send(fd, (const char *)buf + sent, n - sent, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        sent += (size_t)w;
    }
    return 0;
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static void *serve_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(CHUNK);
    unsigned char cmd, len[8];
    if (!buf || read_full(fd, &cmd, 1) < 0) goto out;
    if (cmd == 'e') {
        ssize_t r;
        while ((r = recv(fd, buf, CHUNK, 0)) > 0)
            if (write_full(fd, buf, (size_t)r) < 0) break;
    } else if (cmd == 'u' || cmd == 'd') {
        if (read_full(fd, len, 8) < 0) goto out;
        uint64_t n = be64(len);
        if (cmd == 'u') {
            while (n > 0) {
                ssize_t r = recv(fd, buf, n < CHUNK ? n : CHUNK, 0);
                if (r <= 0) goto out;
                n -= (uint64_t)r;
            }
            write_full(fd, "k", 1);
        } else {
            memset(buf, 'x', CHUNK);
            while (n > 0) {
                size_t k = n < CHUNK ? n : CHUNK;
                if (write_full(fd, buf, k) < 0) goto out;
                n -= k;
            }
        }
        while (recv(fd, buf, CHUNK, 0) > 0) {}  /* until the forwarder closes */
    }
out:
    free(buf);
    close(fd);
    return NULL;
}

_Noreturn static void run_upstream(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (s < 0) die("socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4096) < 0) die("bind/listen");
    getsockname(s, (struct sockaddr *)&a, &alen);
    printf("port=%d\n", ntohs(a.sin_port));
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            die("accept");
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t t;
        if (pthread_create(&t, &attr, serve_conn, (void *)(intptr_t)c) != 0) close(c);
    }
}

/* -- client -------------------------------------------------------------------------------- */

struct opts {
    int port, procs, count, size;
    double seconds;
    uint64_t bytes;
    const char *ca, *cert, *key, *ip;
};

static int tickets;  /* NewSessionTicket messages received (a peer with tickets off sends none) */

static int on_new_session(SSL *ssl, SSL_SESSION *sess) {
    (void)ssl; (void)sess;
    tickets++;
    return 0;  /* not kept: no session is ever offered for resumption */
}

static SSL_CTX *client_ctx(const struct opts *o) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    /* One suite and one group, so that every peer negotiates the same thing. */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");
    SSL_CTX_set1_groups_list(ctx, "X25519");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1) { ERR_print_errors_fp(stderr); exit(2); }
    X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx), o->ip);
    if (o->cert) {
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1) {
            ERR_print_errors_fp(stderr);
            exit(2);
        }
    }
    return ctx;
}

/* Why the last attempt failed, for the report (first failure of each process). */
static char why[256];

static void note(const char *stage) {
    if (why[0]) return;
    unsigned long e = ERR_peek_last_error();
    char buf[200] = "";
    if (e) ERR_error_string_n(e, buf, sizeof buf);
    else if (errno) snprintf(buf, sizeof buf, "%s", strerror(errno));
    else snprintf(buf, sizeof buf, "EOF");
    snprintf(why, sizeof why, "%s: %s", stage, buf);
    for (char *p = why; *p; p++) if (*p == ' ') *p = '_';
}

enum result { OK, FAIL_CONNECT, FAIL_HANDSHAKE, FAIL_READ };

static SSL *dial(SSL_CTX *ctx, const struct opts *o, enum result *res) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(o->port)};
    inet_pton(AF_INET, o->ip, &a.sin_addr);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    errno = 0;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        note("connect");
        close(fd);
        *res = FAIL_CONNECT;
        return NULL;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    ERR_clear_error();
    errno = 0;
    if (SSL_connect(ssl) != 1) {
        note("handshake");
        SSL_free(ssl);
        close(fd);
        *res = FAIL_HANDSHAKE;
        return NULL;
    }
    *res = OK;
    return ssl;
}

static void hang_up(SSL *ssl) {
    int fd = SSL_get_fd(ssl);
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
}

static int ssl_write_all(SSL *ssl, const void *buf, size_t n) {
    size_t done = 0;
    while (done < n) {
        int w = SSL_write(ssl, (const char *)buf + done, (int)(n - done > CHUNK ? CHUNK : n - done));
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    return 0;
}

static int ssl_read_full(SSL *ssl, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        int r = SSL_read(ssl, (char *)buf + got, (int)(n - got > CHUNK ? CHUNK : n - got));
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* One connection as a node makes it: handshake, a 1-byte echo through the upstream (in TLS 1.3
 * a refused client certificate shows only here, as an alert or EOF), close. */
static enum result one_connection(SSL_CTX *ctx, const struct opts *o, char *serial, size_t serial_len) {
    enum result res;
    SSL *ssl = dial(ctx, o, &res);
    if (!ssl) return res;
    if (serial) {
        X509 *peer = SSL_get0_peer_certificate(ssl);
        BIGNUM *bn = peer ? ASN1_INTEGER_to_BN(X509_get0_serialNumber(peer), NULL) : NULL;
        char *hex = bn ? BN_bn2hex(bn) : NULL;
        snprintf(serial, serial_len, "%s", hex ? hex : "?");
        OPENSSL_free(hex);
        BN_free(bn);
    }
    char c = 0;
    ERR_clear_error();
    errno = 0;
    if (ssl_write_all(ssl, "ex", 2) < 0 || ssl_read_full(ssl, &c, 1) < 0 || c != 'x') {
        note("first read");
        res = FAIL_READ;
    }
    hang_up(ssl);
    return res;
}

/* Connection latency (connect to the echo's answer and close) of successful connections, in
 * buckets 5% wide: bucket i holds latencies in [1.05^i, 1.05^(i+1)) microseconds. */
#define LAT_BUCKETS 400
#define LAT_GROWTH 1.05

static int lat_bucket(double seconds) {
    double us = seconds * 1e6;
    int i = us < 1 ? 0 : (int)(log(us) / log(LAT_GROWTH));
    return i < LAT_BUCKETS ? i : LAT_BUCKETS - 1;
}

static void run_hs_process(const struct opts *o) {
    SSL_CTX *ctx = client_ctx(o);
    long counts[4] = {0};
    static long lat[LAT_BUCKETS];
    char serials[MAX_SERIALS][80];
    int nserials = 0;
    double end = now_s() + o->seconds;
    while (now_s() < end) {
        char serial[80] = "";
        double started = now_s();
        enum result r = one_connection(ctx, o, serial, sizeof serial);
        counts[r]++;
        if (r == OK) lat[lat_bucket(now_s() - started)]++;
        if (r == OK || r == FAIL_READ) {
            int seen = 0;
            for (int i = 0; i < nserials && !seen; i++) seen = !strcmp(serials[i], serial);
            if (!seen && nserials < MAX_SERIALS) strcpy(serials[nserials++], serial);
        }
    }
    char line[4096];
    int n = snprintf(line, sizeof line, "ok=%ld fail_connect=%ld fail_handshake=%ld fail_read=%ld tickets=%d serials=",
                     counts[OK], counts[FAIL_CONNECT], counts[FAIL_HANDSHAKE], counts[FAIL_READ], tickets);
    for (int i = 0; i < nserials && n < (int)sizeof line - 100; i++)
        n += snprintf(line + n, sizeof line - n, "%s%s", i ? "," : "", serials[i]);
    n += snprintf(line + n, sizeof line - n, " lat=");
    int first = 1;
    for (int i = 0; i < LAT_BUCKETS && n < (int)sizeof line - 100; i++)
        if (lat[i]) { n += snprintf(line + n, sizeof line - n, "%s%d:%ld", first ? "" : ",", i, lat[i]); first = 0; }
    n += snprintf(line + n, sizeof line - n, " why=%s\n", why[0] ? why : "-");
    if (write(1, line, (size_t)n) < 0) exit(2);  /* one write per line (< PIPE_BUF): lines of processes do not mix */
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int run_client(const char *mode, const struct opts *o) {
    if (!strcmp(mode, "hs")) {
        for (int i = 0; i < o->procs; i++) {
            pid_t pid = fork();
            if (pid < 0) die("fork");
            if (pid == 0) { run_hs_process(o); _exit(0); }
        }
        int status, failed = 0;
        while (wait(&status) > 0) failed |= !WIFEXITED(status) || WEXITSTATUS(status);
        return failed ? 2 : 0;
    }
    SSL_CTX *ctx = client_ctx(o);
    if (!strcmp(mode, "once")) {
        enum result r = one_connection(ctx, o, NULL, 0);
        printf("result=%s tickets=%d why=%s\n", r == OK ? "ok" : "refused", tickets, why[0] ? why : "-");
        return 0;
    }
    enum result res;
    SSL *ssl = dial(ctx, o, &res);
    if (!ssl) { printf("result=refused why=%s\n", why); return 1; }
    const char *cipher = SSL_get_cipher_name(ssl);
    char *buf = malloc(CHUNK);
    memset(buf, 'x', CHUNK);
    if (!strcmp(mode, "rtt")) {
        double *t = malloc(sizeof(double) * (size_t)o->count);
        if (ssl_write_all(ssl, "e", 1) < 0) return 1;
        for (int i = -200; i < o->count; i++) {  /* 200 round trips of warm-up */
            double t0 = now_s();
            if (ssl_write_all(ssl, buf, (size_t)o->size) < 0 || ssl_read_full(ssl, buf, (size_t)o->size) < 0) {
                note("round trip");
                printf("result=refused why=%s\n", why);
                return 1;
            }
            if (i >= 0) t[i] = now_s() - t0;
        }
        qsort(t, (size_t)o->count, sizeof(double), cmp_double);
        printf("result=ok cipher=%s p50_us=%.1f p99_us=%.1f max_us=%.1f\n", cipher, t[o->count / 2] * 1e6,
               t[(int)(o->count * 0.99)] * 1e6, t[o->count - 1] * 1e6);
    } else if (!strcmp(mode, "up") || !strcmp(mode, "down")) {
        unsigned char head[9] = {(unsigned char)mode[0]};
        for (int i = 0; i < 8; i++) head[1 + i] = (unsigned char)(o->bytes >> (56 - 8 * i));
        double t0 = now_s();
        if (ssl_write_all(ssl, head, sizeof head) < 0) return 1;
        uint64_t left = o->bytes;
        if (mode[0] == 'u') {
            while (left > 0) {
                size_t k = left < CHUNK ? left : CHUNK;
                if (ssl_write_all(ssl, buf, k) < 0) { note("upload"); printf("result=failed why=%s\n", why); return 1; }
                left -= k;
            }
            if (ssl_read_full(ssl, buf, 1) < 0 || buf[0] != 'k') { note("upload end"); printf("result=failed why=%s\n", why); return 1; }
        } else {
            while (left > 0) {
                int r = SSL_read(ssl, buf, CHUNK);
                if (r <= 0) { note("download"); printf("result=failed why=%s\n", why); return 1; }
                left -= (uint64_t)r;
            }
        }
        double dt = now_s() - t0;
        printf("result=ok cipher=%s seconds=%.4f mb_per_s=%.1f\n", cipher, dt, o->bytes / dt / 1e6);
    } else {
        fprintf(stderr, "tls_load: unknown mode %s\n", mode);
        return 2;
    }
    hang_up(ssl);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: see the comment at the top of tls_load.c\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "upstream")) run_upstream();
    struct opts o = {.procs = 4, .seconds = 5, .count = 5000, .size = 64, .bytes = 100000000, .ip = "127.0.0.1"};
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) o.port = atoi(v);
        else if (!strcmp(k, "--procs")) o.procs = atoi(v);
        else if (!strcmp(k, "--seconds")) o.seconds = atof(v);
        else if (!strcmp(k, "--count")) o.count = atoi(v);
        else if (!strcmp(k, "--size")) o.size = atoi(v);
        else if (!strcmp(k, "--bytes")) o.bytes = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--ca")) o.ca = v;
        else if (!strcmp(k, "--cert")) o.cert = v;
        else if (!strcmp(k, "--key")) o.key = v;
        else if (!strcmp(k, "--ip")) o.ip = v;
        else { fprintf(stderr, "tls_load: unknown option %s\n", k); return 2; }
    }
    if (!o.port || !o.ca || o.size <= 0 || o.size > CHUNK || o.count <= 0) {
        fprintf(stderr, "tls_load: need --port and --ca (and 0 < --size <= %d, --count > 0)\n", CHUNK);
        return 2;
    }
    return run_client(argv[1], &o);
}
