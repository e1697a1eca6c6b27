/* WebSocket broadcast load generator (one process, epoll, 127.0.0.1 only).
 *
 * Opens N subscriber connections (+ optional K stuck readers that are never
 * read after the handshake) and, except in idle mode, one publisher.
 * The publisher sends masked 100-byte text frames carrying a JSON object
 * {"t":<CLOCK_MONOTONIC ns>,"p":"xxx..."} (--json: {"t":..,"items":[...]}, records
 * of ids, names, e-mails, numbers and flags, compressible like typical JSON);
 * subscribers parse frames, count deliveries and record latency (now - t) into a
 * histogram.  The publisher's own deliveries are read and discarded (not counted).
 *
 * --tls: every connection speaks TLS first (OpenSSL, non-blocking, no certificate
 * verification: the loopback bench uses a throw-away self-signed certificate);
 * frames and the stuck reader's receive buffer are as without TLS, and
 * "wire_bytes" counts decrypted bytes.  Built without OpenSSL (-DNO_TLS) the
 * flag is refused.
 *
 * --deflate: every connection offers permessage-deflate (RFC 7692); compressed
 * messages are inflated by a per-connection inflater (context takeover, as the
 * server answered) or, when the server answered server_no_context_takeover, only
 * the 1 in 16 sampled for latency (each message stands alone).  "wire_bytes" is
 * what the subscribers read during the measured window, frame headers included.
 *
 * modes:
 *   tput  send as fast as the server absorbs: at most WINDOW messages in
 *         flight, where in-flight = sent - deliveries/live_subscribers, and
 *         only when the publisher's previous frames were fully written.
 *   rate  send RATE messages per second.
 *   idle  open the connections, print {"ready":...} and hold them until
 *         stdin has a line / EOF, or --hold seconds pass.  A line starting with
 *         "c" closes every connection at once (a network blip) and prints
 *         {"closed":N,"close_s":S}; holding goes on until the next line.
 *   resume  v1 subscribers (no publisher): each sends
 *         {"type":"subscribe","topic":TOPIC,"since":SINCE} once open; done when
 *         it has read --expect frames (the ack and the replay); prints
 *         "resume_s", the time from the first connect until the last is done.
 * Every phase is bounded in time; the program always exits by itself.
 * Prints one JSON object on stdout at the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>
#ifndef NO_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif
#include "wsutil.h"

enum { K_SUB, K_PUB, K_STUCK };
enum { S_CONNECTING, S_TLS, S_HANDSHAKE, S_OPEN, S_CLOSED };  /* S_TLS: the TLS handshake (--tls) */

typedef struct conn {
    int fd, kind, state, want_out, retries;
    char *in; size_t inlen, incap;
    char *out; size_t outlen, outoff, outcap;
    uint64_t received;
    int deflate, no_takeover;  /* permessage-deflate negotiated; server_no_context_takeover */
    z_stream *zs;
    void *ssl;  /* the SSL object with --tls (void: builds without OpenSSL too) */
} conn;

/* options */
static int port = 0, nsubs = 10, nstuck = 0, msgsize = 100, max_pending = 64;
static double duration = 5, warmup = 1, rate = 200, connect_timeout = 60, hold = 120, drain = 0.5;
static long window_deliveries = 100000;
static long long prefill_bytes = 0, max_msgs = 50000000, prefill_sent = 0;
static int prefill_size = 8192;
static double window_max_msgs = 1000;
static double prefill_max = 15;
static const char *mode = "tput", *path = "/";
static int stuck_rcvbuf = 4096;
static int want_deflate = 0, json_payload = 0, use_tls = 0;
static int resume_mode = 0, resume_expect = 1;
static const char *resume_topic = "resume";
static long resume_since = 0;
static uint64_t deflate_conns, wire_bytes, inflated;
static unsigned char zbuf[1 << 20];

static conn *conns; static int nconns;
static int epfd;
static uint64_t errors, closed_unexpected, connect_failed, deliveries, deliveries_total, pub_received, bytes_in;
static uint64_t sent, stalls, parse_errors;
static int measuring, live_subs;
static double forgiven;

/* latency histogram in ns: 1us steps to 1ms, 100us to 100ms, 10ms to 10s */
#define HB 3001
static uint64_t hist[HB]; static uint64_t hcount; static uint64_t hmax;
static void hrec(int64_t ns) {
    if (ns < 0) ns = 0;
    uint64_t us = (uint64_t)ns / 1000; int b;
    if (us < 1000) b = (int)us;
    else if (us < 100000) b = 1000 + (int)((us - 1000) / 100);
    else if (us < 10000000) b = 1990 + (int)((us - 100000) / 10000);
    else b = HB - 1;
    if (b >= HB) b = HB - 1;
    hist[b]++; hcount++; if (us > hmax) hmax = us;
}
static double hbucket_us(int b) {   /* upper bound of bucket */
    if (b < 1000) return b + 1;
    if (b < 1990) return 1000 + (b - 1000 + 1) * 100.0;
    return 100000 + (b - 1990 + 1) * 10000.0;
}
static double hpct(double p) {
    if (!hcount) return -1;
    uint64_t want = (uint64_t)(p * hcount); if (want >= hcount) want = hcount - 1;
    uint64_t acc = 0;
    for (int b = 0; b < HB; b++) { acc += hist[b]; if (acc > want) return hbucket_us(b); }
    return (double)hmax;
}

static inline int64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void set_events(conn *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
}

/* ---- TLS (--tls): every socket read and write of a connection goes through io_recv/io_send ---- */
#ifndef NO_TLS
static SSL_CTX *tls_ctx;
static uint64_t tls_errors_printed;

static void tls_init(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) { ERR_print_errors_fp(stderr); exit(1); }
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);  /* loopback bench, self-signed certificate */
    /* a partial SSL_write reports what it sent, like send(); a retry may pass a moved (grown) buffer */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* read ahead: one read() takes several records (without it, two per record: header, body) */
    SSL_CTX_set_read_ahead(tls_ctx, 1);
    SSL_CTX_set_default_read_buffer_len(tls_ctx, 1 << 17);
}

static int tls_start(conn *c) {
    SSL *s = SSL_new(tls_ctx);
    if (!s || !SSL_set_fd(s, c->fd)) { if (s) SSL_free(s); return -1; }
    SSL_set_connect_state(s);
    c->ssl = s;
    return 0;
}

static void tls_free(conn *c) {
    if (c->ssl) { SSL_free((SSL *)c->ssl); c->ssl = NULL; }
}

static void tls_report(const char *what, int err) {
    if (tls_errors_printed++ < 3) {
        fprintf(stderr, "loadgen: TLS %s failed (SSL error %d, errno %d)\n", what, err, errno);
        ERR_print_errors_fp(stderr);
    }
    ERR_clear_error();
}

/* Advance the TLS handshake: 1 done, 0 waiting (events set), -1 failed. */
static int tls_step(conn *c) {
    SSL *s = (SSL *)c->ssl;
    int r = SSL_do_handshake(s);
    if (r == 1) return 1;
    int e = SSL_get_error(s, r);
    if (e == SSL_ERROR_WANT_READ) { set_events(c, EPOLLIN); return 0; }
    if (e == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLOUT); return 0; }
    tls_report("handshake", e);
    return -1;
}

/* SSL_read/SSL_write results in recv()/send() terms: -1 with errno EAGAIN when it must wait */
static ssize_t tls_result(conn *c, int r, const char *what) {
    if (r > 0) return r;
    int e = SSL_get_error((SSL *)c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) { errno = EAGAIN; return -1; }
    if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0)) { ERR_clear_error(); return 0; }
    if (e != SSL_ERROR_SYSCALL) tls_report(what, e);
    ERR_clear_error();
    if (!errno || errno == EAGAIN) errno = EIO;
    return -1;
}

/* up to n decrypted bytes: the records already read ahead (SSL_read gives one at a time), stopping
   before a read that would only find the socket empty (epoll reports what arrives later) */
static ssize_t io_recv(conn *c, unsigned char *buf, size_t n) {
    if (!c->ssl) return recv(c->fd, buf, n, 0);
    SSL *s = (SSL *)c->ssl;
    size_t got = 0;
    while (got < n) {
        errno = 0;
        int want = n - got > (1 << 30) ? 1 << 30 : (int)(n - got);
        ssize_t r = tls_result(c, SSL_read(s, buf + got, want), "read");
        if (r > 0) { got += (size_t)r; if (!SSL_has_pending(s)) break; continue; }
        if (got) break;  /* report what arrived; the error (or EOF) shows on the next call */
        return r;
    }
    return (ssize_t)got;
}

static ssize_t io_send(conn *c, const char *buf, size_t n) {
    if (!c->ssl) return send(c->fd, buf, n, MSG_NOSIGNAL);
    errno = 0;
    return tls_result(c, SSL_write((SSL *)c->ssl, buf, n > (1 << 30) ? 1 << 30 : (int)n), "write");
}

/* bytes read ahead into the TLS layer (decrypted or not), which epoll cannot see */
static int io_pending(conn *c) { return c->ssl && SSL_has_pending((SSL *)c->ssl); }
#else
static void tls_init(void) {}
static int tls_start(conn *c) { (void)c; return -1; }
static void tls_free(conn *c) { (void)c; }
static int tls_step(conn *c) { (void)c; return -1; }
static ssize_t io_recv(conn *c, unsigned char *buf, size_t n) { return recv(c->fd, buf, n, 0); }
static ssize_t io_send(conn *c, const char *buf, size_t n) { return send(c->fd, buf, n, MSG_NOSIGNAL); }
static int io_pending(conn *c) { (void)c; return 0; }
#endif

static void conn_close(conn *c, int unexpected) {
    if (c->state == S_CLOSED) return;
    if (c->state == S_OPEN && c->kind == K_SUB) live_subs--;
    if (unexpected) closed_unexpected++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    tls_free(c);
    close(c->fd);
    c->fd = -1;
    c->state = S_CLOSED;
}

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static inline uint64_t xr(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static int start_connect(conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); errors++; return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c->kind == K_STUCK) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &stuck_rcvbuf, sizeof stuck_rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) { close(fd); connect_failed++; return -1; }
    c->fd = fd; c->state = S_CONNECTING; c->inlen = 0; c->outlen = c->outoff = 0;
    struct epoll_event e = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e);
    return 0;
}

static void queue_out(conn *c, const char *d, size_t n) {
    if (c->outoff && c->outoff == c->outlen) c->outoff = c->outlen = 0;
    ensure(&c->out, &c->outcap, c->outlen + n);
    memcpy(c->out + c->outlen, d, n); c->outlen += n;
}

/* returns 0 ok (maybe partial), -1 error */
static int flush_out(conn *c) {
    while (c->outoff < c->outlen) {
        ssize_t w = io_send(c, c->out + c->outoff, c->outlen - c->outoff);
        if (w > 0) { c->outoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return -1;
    }
    if (c->outoff == c->outlen) c->outoff = c->outlen = 0;
    int want = c->outlen > 0;
    if (c->state == S_OPEN && want != c->want_out) {
        c->want_out = want;
        if (c->kind != K_STUCK || want) set_events(c, EPOLLIN | (want ? EPOLLOUT : 0));
    }
    return 0;
}

static void send_handshake(conn *c) {
    uint8_t k[16]; for (int i = 0; i < 16; i++) k[i] = (uint8_t)xr();
    char key[32]; wsu_b64(k, 16, key);
    char req[512];
    int n = snprintf(req, sizeof req,
        "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s%s\r\n", path, port, key,
        want_deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "",
        resume_mode ? "Sec-WebSocket-Protocol: wsbroadcast.v1\r\n" : "");
    queue_out(c, req, (size_t)n);
}

static void masked_frame(conn *c, int op, const char *p, size_t n) {
    char h[14]; size_t hl;
    h[0] = (char)(0x80 | op);
    if (n < 126) { h[1] = (char)(0x80 | n); hl = 2; }
    else if (n < 65536) { h[1] = (char)(0x80 | 126); h[2] = (char)(n >> 8); h[3] = (char)n; hl = 4; }
    else { h[1] = (char)(0x80 | 127); for (int i = 0; i < 8; i++) h[2+i] = (char)((uint64_t)n >> (56 - 8*i)); hl = 10; }
    uint32_t m = (uint32_t)xr(); unsigned char mk[4]; memcpy(mk, &m, 4); memcpy(h + hl, mk, 4); hl += 4;
    size_t at = c->outlen;
    queue_out(c, h, hl);
    queue_out(c, p, n);
    unsigned char *q = (unsigned char *)c->out + at + hl;
    for (size_t i = 0; i < n; i++) q[i] ^= mk[i & 3];
}

/* resume mode: the subscribe with since, sent once the connection is open */
static int send_resume(conn *c) {
    char sub[384];
    int n = snprintf(sub, sizeof sub, "{\"type\":\"subscribe\",\"topic\":\"%s\",\"since\":%ld}",
                     resume_topic, resume_since);
    masked_frame(c, 1, sub, (size_t)n);
    return flush_out(c);
}

/* subscribers that have read all they expect (resume mode) */
static int resumed_count(void) {
    int n = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].kind == K_SUB && conns[i].received >= (uint64_t)resume_expect) n++;
    return n;
}

/* idle mode's "c" command: close every connection at once; prints how long the closes took */
static void close_all(void) {
    int64_t t = now_ns(); int n = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].state != S_CLOSED) { conn_close(&conns[i], 0); n++; }
    printf("{\"closed\":%d,\"close_s\":%.3f}\n", n, (now_ns() - t) / 1e9);
    fflush(stdout);
}

/* idle mode: a line on stdin; returns 1 to quit, 0 to hold on */
static int stdin_command(void) {
    char line[64]; ssize_t r = read(0, line, sizeof line);
    if (r > 0 && line[0] == 'c') { close_all(); return 0; }
    return 1;
}

static char *payload;
static const char *NAMES[] = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"};
static const char *CITIES[] = {"Berlin", "Lisbon", "Oslo", "Paris", "Rome", "Vienna", "Warsaw", "Zurich"};
static void make_payload(int64_t t, int size) {
    int n = snprintf(payload, (size_t)size + 1, "{\"t\":%lld,\"p\":\"", (long long)t);
    if (json_payload && size >= 200) {
        /* records until about 200 bytes are left, then a padding string to the exact size */
        n = snprintf(payload, (size_t)size + 1, "{\"t\":%lld,\"items\":[", (long long)t);
        int first = 1;
        while (n < size - 200) {
            uint64_t r = xr();
            n += snprintf(payload + n, (size_t)(size + 1 - n),
                "%s{\"id\":%llu,\"user\":\"%s%u\",\"email\":\"%s%u@example.com\",\"city\":\"%s\","
                "\"score\":%u.%02u,\"active\":%s}", first ? "" : ",", (unsigned long long)(r % 1000000),
                NAMES[r % 8], (unsigned)(r >> 20) % 1000, NAMES[r % 8], (unsigned)(r >> 20) % 1000,
                CITIES[(r >> 8) % 8], (unsigned)(r >> 32) % 100, (unsigned)(r >> 40) % 100,
                (r >> 50) & 1 ? "true" : "false");
            first = 0;
        }
        n += snprintf(payload + n, (size_t)(size + 1 - n), "],\"note\":\"");
    }
    for (int i = n; i < size - 2; i++) payload[i] = json_payload ? "status ok "[(i - n) % 10] : 'x';
    payload[size - 2] = '"'; payload[size - 1] = '}'; payload[size] = 0;
}

/* the message of a compressed frame, inflated into zbuf (NULL: not inflated, or broken) */
static const unsigned char *inflate_msg(conn *c, const unsigned char *p, size_t n, size_t *outn) {
    if (!c->zs) {
        c->zs = calloc(1, sizeof *c->zs);
        if (inflateInit2(c->zs, -15) != Z_OK) { free(c->zs); c->zs = NULL; return NULL; }
    } else if (c->no_takeover) inflateReset(c->zs);
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    z_stream *z = c->zs;
    z->next_out = zbuf; z->avail_out = sizeof zbuf;
    z->next_in = (unsigned char *)p; z->avail_in = (uInt)n;
    int r = inflate(z, Z_SYNC_FLUSH);
    if (r != Z_OK && r != Z_BUF_ERROR) return NULL;
    z->next_in = (unsigned char *)tail; z->avail_in = 4;
    r = inflate(z, Z_SYNC_FLUSH);
    if (r != Z_OK && r != Z_BUF_ERROR) return NULL;
    inflated++;
    *outn = sizeof zbuf - z->avail_out;
    return zbuf;
}

static void on_message(conn *c, const unsigned char *p, size_t n, int64_t now, int compressed) {
    if (c->kind == K_PUB) { pub_received++; return; }
    c->received++;
    deliveries_total++;
    if (compressed) {
        /* with context takeover every message must go through the connection's inflater */
        if (!c->no_takeover || (measuring && (deliveries & 15) == 0)) {
            p = inflate_msg(c, p, n, &n);
            if (!p) { parse_errors++; return; }
        } else {
            if (measuring) deliveries++;
            return;
        }
    }
    if (!measuring) return;
    deliveries++;
    /* find "t": */
    const unsigned char *e = p + n;
    for (const unsigned char *q = p; q + 4 < e; q++) {
        if (q[0] == '"' && q[1] == 't' && q[2] == '"') {
            q += 3; while (q < e && (*q == ' ' || *q == ':')) q++;
            int64_t v = 0; int any = 0;
            while (q < e && *q >= '0' && *q <= '9') { v = v * 10 + (*q - '0'); q++; any = 1; }
            if (any) hrec(now - v); else parse_errors++;
            return;
        }
    }
    parse_errors++;
}

/* parse frames from buf; returns bytes consumed, or -1 on close/error */
static long parse_frames(conn *c, unsigned char *b, size_t len, int64_t now) {
    size_t off = 0;
    while (len - off >= 2) {
        size_t avail = len - off;
        int fin = b[off] & 0x80, op = b[off] & 0x0f, masked = b[off+1] & 0x80;
        uint64_t pl = b[off+1] & 0x7f; size_t h = 2;
        if (pl == 126) { if (avail < 4) break; pl = (uint64_t)b[off+2] << 8 | b[off+3]; h = 4; }
        else if (pl == 127) { if (avail < 10) break; pl = 0; for (int i = 0; i < 8; i++) pl = pl << 8 | b[off+2+i]; h = 10; }
        if (pl > (64u << 20)) { errors++; return -1; }
        if (masked) h += 4;
        if (avail < h + pl) break;
        unsigned char *p = b + off + h;
        if (masked) { unsigned char *m = p - 4; for (uint64_t i = 0; i < pl; i++) p[i] ^= m[i & 3]; }
        if (op == 1 || op == 2 || op == 0) { if (fin) on_message(c, p, pl, now, (b[off] & 0x40) != 0); }
        else if (op == 9) { /* ping -> pong */
            char tmp[128]; size_t n = pl < 125 ? pl : 125; memcpy(tmp, p, n);
            masked_frame(c, 10, tmp, n);
            if (flush_out(c) < 0) return -1;
        } else if (op == 8) { return -1; }
        off += h + pl;
    }
    return (long)off;
}

static unsigned char rbuf[1 << 18];

static void on_readable_once(conn *c, int64_t now) {
    ssize_t r = io_recv(c, rbuf, sizeof rbuf);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { conn_close(c, 1); return; }
    if (r < 0) return;
    bytes_in += (uint64_t)r;
    if (measuring && c->kind == K_SUB && c->state == S_OPEN) wire_bytes += (uint64_t)r;
    unsigned char *data; size_t len;
    if (c->state == S_HANDSHAKE) {
        ensure(&c->in, &c->incap, c->inlen + (size_t)r + 1);
        memcpy(c->in + c->inlen, rbuf, (size_t)r); c->inlen += (size_t)r; c->in[c->inlen] = 0;
        char *end = strstr(c->in, "\r\n\r\n");
        if (!end) { if (c->inlen > 16384) { errors++; conn_close(c, 1); } return; }
        if (strncmp(c->in, "HTTP/1.1 101", 12) != 0) {
            if (errors < 3) fprintf(stderr, "loadgen: handshake refused: %.*s\n", (int)(strchr(c->in, '\r') - c->in), c->in);
            errors++; conn_close(c, 0); return;
        }
        if (want_deflate) {
            *end = 0;  /* the head only */
            for (char *q = c->in; *q; q++) *q = (char)(*q >= 'A' && *q <= 'Z' ? *q + 32 : *q);
            c->deflate = strstr(c->in, "sec-websocket-extensions: permessage-deflate") != NULL;
            c->no_takeover = c->deflate && strstr(c->in, "server_no_context_takeover") != NULL;
            if (c->deflate && c->kind == K_SUB) deflate_conns++;
        }
        size_t used = (size_t)(end + 4 - c->in);
        memmove(c->in, c->in + used, c->inlen - used); c->inlen -= used;
        c->state = S_OPEN;
        if (c->kind == K_SUB) live_subs++;
        if (c->kind == K_STUCK) { set_events(c, 0); return; }  /* never read again */
        set_events(c, EPOLLIN);
        if (resume_mode && send_resume(c) < 0) { errors++; conn_close(c, 1); return; }
        if (!c->inlen) return;
        data = (unsigned char *)c->in; len = c->inlen;
    } else if (c->inlen) {
        ensure(&c->in, &c->incap, c->inlen + (size_t)r);
        memcpy(c->in + c->inlen, rbuf, (size_t)r); c->inlen += (size_t)r;
        data = (unsigned char *)c->in; len = c->inlen;
    } else { data = rbuf; len = (size_t)r; }
    long used = parse_frames(c, data, len, now);
    if (used < 0) { conn_close(c, 1); return; }
    size_t rest = len - (size_t)used;
    if (data == rbuf) {
        if (rest) { ensure(&c->in, &c->incap, rest); memcpy(c->in, rbuf + used, rest); }
        c->inlen = rest;
    } else {
        if (used) memmove(c->in, c->in + used, rest);
        c->inlen = rest;
    }
}

static void on_readable(conn *c, int64_t now) {
    on_readable_once(c, now);
    /* what TLS decrypted beyond rbuf waits inside OpenSSL, where epoll cannot see it */
    while (c->state != S_CLOSED && !(c->kind == K_STUCK && c->state == S_OPEN) && io_pending(c))
        on_readable_once(c, now);
}

/* the TCP connection (or the TLS handshake) is up: send the WebSocket upgrade */
static void begin_upgrade(conn *c) {
    c->state = S_HANDSHAKE;
    send_handshake(c);
    if (flush_out(c) < 0) { errors++; conn_close(c, 1); return; }
    set_events(c, EPOLLIN | (c->outlen ? EPOLLOUT : 0));
}

static void on_event(conn *c, uint32_t ev, int64_t now) {
    if (c->state == S_CLOSED) return;
    if (c->state == S_CONNECTING) {
        int err = 0; socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (ev & (EPOLLERR | EPOLLHUP))) { connect_failed++; conn_close(c, 0); return; }
        if (!use_tls) { begin_upgrade(c); return; }
        c->state = S_TLS;
        if (tls_start(c) < 0) { errors++; conn_close(c, 1); return; }
    }
    if (c->state == S_TLS) {  /* whichever event came: the next handshake step */
        int r = tls_step(c);
        if (r < 0) { errors++; conn_close(c, 1); }
        else if (r > 0) begin_upgrade(c);
        return;
    }
    if (ev & EPOLLOUT) { if (flush_out(c) < 0) { conn_close(c, 1); return; }
                         if (c->state == S_HANDSHAKE && !c->outlen) set_events(c, EPOLLIN); }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c, now);
}

/* resume mode after the connect phase: wait until every subscriber has read what it expects */
static void resume_wait(int64_t t0, int64_t deadline, struct epoll_event *evs) {
    int est = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].state == S_OPEN) est++;
    while (resumed_count() < est && now_ns() < deadline) {
        int n = epoll_wait(epfd, evs, 1024, 50);
        int64_t now = now_ns();
        for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events, now);
    }
    printf("{\"mode\":\"resume\",\"subs\":%d,\"established\":%d,\"resumed\":%d,\"resume_s\":%.3f,"
           "\"errors\":%llu,\"connect_failed\":%llu,\"closed_unexpected\":%llu}\n",
           nsubs, est, resumed_count(), (now_ns() - t0) / 1e9, (unsigned long long)errors,
           (unsigned long long)connect_failed, (unsigned long long)closed_unexpected);
    fflush(stdout);
}

static double arg_d(const char *s) { return atof(s); }

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i]; const char *v = i + 1 < argc ? argv[i+1] : "0";
        if (!strcmp(a, "--port")) { port = atoi(v); i++; }
        else if (!strcmp(a, "--mode")) { mode = v; i++; }
        else if (!strcmp(a, "--subs")) { nsubs = atoi(v); i++; }
        else if (!strcmp(a, "--stuck")) { nstuck = atoi(v); i++; }
        else if (!strcmp(a, "--size")) { msgsize = atoi(v); i++; }
        else if (!strcmp(a, "--duration")) { duration = arg_d(v); i++; }
        else if (!strcmp(a, "--warmup")) { warmup = arg_d(v); i++; }
        else if (!strcmp(a, "--rate")) { rate = arg_d(v); i++; }
        else if (!strcmp(a, "--window")) { window_deliveries = atol(v); i++; }
        else if (!strcmp(a, "--connect-timeout")) { connect_timeout = arg_d(v); i++; }
        else if (!strcmp(a, "--hold")) { hold = arg_d(v); i++; }
        else if (!strcmp(a, "--max-pending")) { max_pending = atoi(v); i++; }
        else if (!strcmp(a, "--path")) { path = v; i++; }
        else if (!strcmp(a, "--window-max-msgs")) { window_max_msgs = arg_d(v); i++; }
        else if (!strcmp(a, "--prefill-bytes")) { prefill_bytes = atoll(v); i++; }
        else if (!strcmp(a, "--prefill-size")) { prefill_size = atoi(v); i++; }
        else if (!strcmp(a, "--prefill-max")) { prefill_max = arg_d(v); i++; }
        else if (!strcmp(a, "--max-msgs")) { max_msgs = atoll(v); i++; }
        else if (!strcmp(a, "--deflate")) { want_deflate = 1; }
        else if (!strcmp(a, "--json")) { json_payload = 1; }
        else if (!strcmp(a, "--tls")) { use_tls = 1; }
        else if (!strcmp(a, "--topic")) { resume_topic = v; i++; }
        else if (!strcmp(a, "--since")) { resume_since = atol(v); i++; }
        else if (!strcmp(a, "--expect")) { resume_expect = atoi(v); i++; }
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
    }
    if (!port || msgsize < 40 || nsubs < 0) { fprintf(stderr, "usage: loadgen --port P [--mode tput|rate|idle] [--subs N] ...\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
#ifdef NO_TLS
    if (use_tls) { fprintf(stderr, "loadgen: built without OpenSSL; install libssl-dev for --tls\n"); return 2; }
#endif
    if (use_tls) tls_init();
    resume_mode = !strcmp(mode, "resume");
    int idle = !strcmp(mode, "idle") || resume_mode, tput = !strcmp(mode, "tput");
    int npub = idle ? 0 : 1;
    nconns = nsubs + nstuck + npub;
    conns = calloc((size_t)nconns + 1, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1; conns[i].state = S_CLOSED;
        conns[i].kind = i < nstuck ? K_STUCK : (i < nstuck + nsubs ? K_SUB : K_PUB);
    }
    if (prefill_size < 64) prefill_size = 64;
    payload = malloc((size_t)(msgsize > prefill_size ? msgsize : prefill_size) + 16);
    epfd = epoll_create1(0);
    struct epoll_event evs[1024];
    int64_t t0 = now_ns();

    /* ---- connect phase: at most max_pending handshakes in flight ---- */
    int next = 0, done = 0;
    int64_t deadline = t0 + (int64_t)(connect_timeout * 1e9);
    while (done < nconns && now_ns() < deadline) {
        int pending = 0;
        for (int i = 0; i < next; i++) if (conns[i].state == S_CONNECTING || conns[i].state == S_TLS || conns[i].state == S_HANDSHAKE) pending++;
        while (next < nconns && pending < max_pending) {
            conn *c = &conns[next++];
            if (start_connect(c) == 0) pending++;
        }
        int n = epoll_wait(epfd, evs, 1024, 50);
        int64_t now = now_ns();
        for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events, now);
        done = 0;
        for (int i = 0; i < next; i++) if (conns[i].state == S_OPEN || conns[i].state == S_CLOSED) done++;
        if (next < nconns) done = done < next ? done : done;  /* keep looping until all started */
        if (next >= nconns && pending == 0) break;
    }
    int established = 0, est_subs = 0, est_stuck = 0, pub_ok = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].state == S_OPEN) {
        established++;
        if (conns[i].kind == K_SUB) est_subs++; else if (conns[i].kind == K_STUCK) est_stuck++; else pub_ok = 1;
    }
    double connect_s = (now_ns() - t0) / 1e9;
    if (resume_mode) { resume_wait(t0, deadline, evs); return 0; }
    conn *pub = npub ? &conns[nconns - 1] : NULL;

    int64_t ts = now_ns(), tm = 0, tend = 0;
    if (idle) {
        printf("{\"ready\":true,\"established\":%d,\"connect_s\":%.3f}\n", established, connect_s);
        fflush(stdout);
        int fl = fcntl(0, F_GETFL); fcntl(0, F_SETFL, fl | O_NONBLOCK);
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)nconns};
        int stdin_ok = epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &e) == 0;
        int64_t until = ts + (int64_t)(hold * 1e9);
        int quit = 0;
        while (!quit && now_ns() < until) {
            int n = epoll_wait(epfd, evs, 1024, 100);
            int64_t now = now_ns();
            for (int i = 0; i < n; i++) {
                if (evs[i].data.u32 == (uint32_t)nconns) { quit = stdin_command(); continue; }
                on_event(&conns[evs[i].data.u32], evs[i].events, now);
            }
            (void)stdin_ok;
        }
        tend = now_ns(); tm = ts;
    } else if (pub_ok && est_subs > 0) {
        /* measuring starts after the warmup and, with --prefill-bytes, once that many
           bytes were published as --prefill-size messages (or --prefill-max seconds
           passed): the big messages fill a stuck reader's kernel socket buffers
           (several MB on loopback) quickly, before the measured window. */
        int64_t tstart_meas = ts + (int64_t)(warmup * 1e9);
        int64_t tprefill_end = ts + (int64_t)(prefill_max * 1e9);
        int64_t tstop = INT64_MAX;
        double win_msgs = (double)window_deliveries / (est_subs > 0 ? est_subs : 1);
        if (win_msgs > window_max_msgs) win_msgs = window_max_msgs;  /* bounds per-subscriber backlog (~100 KB) */
        if (win_msgs < 2) win_msgs = 2;
        int64_t last_progress = ts; uint64_t last_total = 0;
        double interval = rate > 0 ? 1e9 / rate : 1e9;
        double next_send = (double)ts;
        uint64_t meas_sent0 = 0;
        for (;;) {
            int64_t now = now_ns();
            int prefilling = prefill_sent < prefill_bytes && now < tprefill_end;
            if (!measuring && now >= tstart_meas && !prefilling) {
                measuring = 1; tm = now; meas_sent0 = sent; tstop = now + (int64_t)(duration * 1e9);
            }
            if (now >= tstop) break;
            /* publisher */
            if (pub->state == S_OPEN && pub->outlen == 0 && (long long)sent < max_msgs) {
                int burst = 0;
                if (tput) {
                    if (deliveries_total != last_total) { last_total = deliveries_total; last_progress = now; }
                    double inflight = (double)sent - forgiven - (live_subs > 0 ? (double)deliveries_total / live_subs : 0);
                    if (inflight >= win_msgs && now - last_progress > 200000000LL) {
                        forgiven += inflight; stalls++; last_progress = now; inflight = 0;
                    }
                    double w = prefilling ? (win_msgs < 8 ? win_msgs : 8) : win_msgs;
                    while (inflight < w && burst < 64) {
                        int sz = prefilling ? prefill_size : msgsize;
                        make_payload(prefilling ? 0 : now_ns(), sz);
                        masked_frame(pub, 1, payload, (size_t)sz);
                        sent++; burst++; inflight += 1;
                        if (prefilling) { prefill_sent += sz; if (prefill_sent >= prefill_bytes) break; }
                    }
                } else {
                    while ((double)now >= next_send && burst < 64) {
                        make_payload(now_ns(), msgsize);
                        masked_frame(pub, 1, payload, (size_t)msgsize);
                        sent++; burst++; next_send += interval;
                    }
                    if ((double)now > next_send + 1e9) next_send = (double)now; /* do not build unbounded debt */
                }
                if (burst && flush_out(pub) < 0) { conn_close(pub, 1); }
            }
            int timeout_ms = 1;
            int n = epoll_wait(epfd, evs, 1024, timeout_ms);
            now = now_ns();
            for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events, now);
            if (live_subs == 0 && measuring) break;
        }
        tend = now_ns();
        sent -= meas_sent0; /* report messages sent during the measured window */
        if (!tm) tm = tend;
    } else {
        tend = tm = now_ns();
    }
    double secs = (tend - tm) / 1e9; if (secs <= 0) secs = 1e-9;
    uint64_t smin = UINT64_MAX, smax = 0; int closed_subs = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].kind == K_SUB) {
        if (conns[i].state != S_OPEN) { closed_subs++; continue; }
        if (conns[i].received < smin) smin = conns[i].received;
        if (conns[i].received > smax) smax = conns[i].received;
    }
    if (smin == UINT64_MAX) smin = 0;
    int stuck_open = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].kind == K_STUCK && conns[i].state == S_OPEN) stuck_open++;
    struct rusage ru; getrusage(RUSAGE_SELF, &ru);
    printf("{\"mode\":\"%s\",\"tls\":%s,\"subs\":%d,\"stuck\":%d,\"established\":%d,\"est_subs\":%d,\"est_stuck\":%d,"
           "\"publisher\":%s,\"connect_s\":%.3f,\"prefill_s\":%.3f,\"seconds\":%.3f,\"sent\":%llu,\"msgs_per_s\":%.1f,"
           "\"deliveries\":%llu,\"deliveries_per_s\":%.1f,\"lat_count\":%llu,\"lat_p50_us\":%.0f,"
           "\"lat_p99_us\":%.0f,\"lat_p999_us\":%.0f,\"lat_max_us\":%llu,\"sub_min\":%llu,\"sub_max\":%llu,\"closed_subs\":%d,"
           "\"stuck_open_at_end\":%d,\"stalls\":%llu,\"errors\":%llu,\"connect_failed\":%llu,"
           "\"closed_unexpected\":%llu,\"parse_errors\":%llu,\"deflate_subs\":%llu,\"inflated\":%llu,"
           "\"wire_bytes\":%llu,\"cpu_s\":%.3f}\n",
           mode, use_tls ? "true" : "false", nsubs, nstuck, established, est_subs, est_stuck, pub_ok ? "true" : "false", connect_s, (tm - ts) / 1e9, secs,
           (unsigned long long)sent, sent / secs, (unsigned long long)deliveries, deliveries / secs,
           (unsigned long long)hcount, hpct(0.50), hpct(0.99), hpct(0.999), (unsigned long long)hmax,
           (unsigned long long)smin, (unsigned long long)smax, closed_subs, stuck_open,
           (unsigned long long)stalls, (unsigned long long)errors, (unsigned long long)connect_failed,
           (unsigned long long)closed_unexpected, (unsigned long long)parse_errors,
           (unsigned long long)deflate_conns, (unsigned long long)inflated, (unsigned long long)wire_bytes,
           ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    fflush(stdout);
    (void)drain; (void)done;
    return 0;
}
