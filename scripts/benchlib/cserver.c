/* Minimal epoll WebSocket broadcast server: the machine's-limit reference.
 *
 * Every complete text (or binary) message received from any client is
 * broadcast to all open clients (the sender included), like the Python peers.
 * Writes are batched: during one epoll round frames are appended to each
 * client's pending buffer, and after the round every dirty client gets one
 * write() of everything pending.  A client whose pending bytes exceed
 * MAX_PENDING (a stuck reader) has further messages dropped, never blocks others.
 *
 * usage: cserver PORT        (binds 127.0.0.1 only; SIGTERM/SIGINT to stop)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "wsutil.h"

#define MAX_PENDING (4u << 20)
#define MAX_FRAME (1u << 20)

typedef struct client {
    int fd, open, dirty, want_out, dead;
    char *in; size_t inlen, incap;
    char *out; size_t outlen, outoff, outcap;
    char *frag; size_t fraglen; int fragop;   /* fragmented message being assembled */
} client;

static client **clients; static int nclients_cap;
static int *dirty; static int ndirty;
static int *openfds; static int nopen;        /* fds of open (handshaken) clients */
static int *openpos;                          /* fd -> index into openfds, -1 */
static int epfd;
static volatile sig_atomic_t stop;
static unsigned long long dropped;

static void on_sig(int s) { (void)s; stop = 1; }

static void set_events(client *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void kill_client(client *c) {
    if (c->dead) return;
    c->dead = 1;
    if (c->open) {
        int p = openpos[c->fd];
        int last = openfds[--nopen];
        openfds[p] = last; openpos[last] = p; openpos[c->fd] = -1;
        c->open = 0;
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
}

static void free_client(client *c) {
    close(c->fd);
    clients[c->fd] = NULL;
    free(c->in); free(c->out); free(c->frag); free(c);
}

static void queue(client *c, const char *data, size_t n) {
    if (c->dead) return;
    if (c->outlen - c->outoff + n > MAX_PENDING) { dropped++; return; }
    if (c->outoff && c->outoff == c->outlen) c->outoff = c->outlen = 0;
    if (c->outoff > (1u << 16) && c->outoff * 2 > c->outlen) {
        memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
        c->outlen -= c->outoff; c->outoff = 0;
    }
    ensure(&c->out, &c->outcap, c->outlen + n);
    memcpy(c->out + c->outlen, data, n);
    c->outlen += n;
    if (!c->dirty) { c->dirty = 1; dirty[ndirty++] = c->fd; }
}

static size_t frame_hdr(char *h, int op, size_t n) {
    h[0] = (char)(0x80 | op);
    if (n < 126) { h[1] = (char)n; return 2; }
    if (n < 65536) { h[1] = 126; h[2] = n >> 8; h[3] = n; return 4; }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (char)((uint64_t)n >> (56 - 8 * i));
    return 10;
}

static char *bcbuf; static size_t bccap;

static void broadcast(int op, const char *p, size_t n) {
    ensure(&bcbuf, &bccap, n + 10);
    size_t h = frame_hdr(bcbuf, op, n);
    memcpy(bcbuf + h, p, n);
    for (int i = 0; i < nopen; i++) queue(clients[openfds[i]], bcbuf, h + n);
}

static int do_handshake(client *c) {
    c->in[c->inlen] = 0;
    char *end = strstr(c->in, "\r\n\r\n");
    if (!end) return c->inlen > 8192 ? -1 : 0;
    char *k = strcasestr(c->in, "\r\nSec-WebSocket-Key:");
    if (!k || k > end) return -1;
    k += 20;
    while (*k == ' ') k++;
    char *ke = k;
    while (*ke && *ke != '\r' && *ke != ' ') ke++;
    char acc[64];
    wsu_accept(k, (size_t)(ke - k), acc);
    char resp[256];
    int rl = snprintf(resp, sizeof resp,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
    queue(c, resp, (size_t)rl);
    size_t used = (size_t)(end + 4 - c->in);
    memmove(c->in, c->in + used, c->inlen - used);
    c->inlen -= used;
    c->open = 1;
    openpos[c->fd] = nopen; openfds[nopen++] = c->fd;
    return 1;
}

static int parse_frames(client *c) {
    size_t off = 0;
    unsigned char *b = (unsigned char *)c->in;
    while (c->inlen - off >= 2) {
        size_t avail = c->inlen - off;
        int fin = b[off] & 0x80, op = b[off] & 0x0f, masked = b[off+1] & 0x80;
        uint64_t len = b[off+1] & 0x7f; size_t h = 2;
        if (len == 126) { if (avail < 4) break; len = (uint64_t)b[off+2] << 8 | b[off+3]; h = 4; }
        else if (len == 127) { if (avail < 10) break; len = 0; for (int i = 0; i < 8; i++) len = len << 8 | b[off+2+i]; h = 10; }
        if (len > MAX_FRAME) return -1;
        if (masked) h += 4;
        if (avail < h + len) break;
        unsigned char *p = b + off + h;
        if (masked) { unsigned char *m = p - 4; for (uint64_t i = 0; i < len; i++) p[i] ^= m[i & 3]; }
        if (op == 1 || op == 2) {
            if (fin) broadcast(op, (char *)p, len);
            else { c->fragop = op; c->fraglen = 0; size_t cap = 0; (void)cap;
                   c->frag = realloc(c->frag, len ? len : 1); memcpy(c->frag, p, len); c->fraglen = len; }
        } else if (op == 0) {
            c->frag = realloc(c->frag, c->fraglen + len + 1);
            memcpy(c->frag + c->fraglen, p, len); c->fraglen += len;
            if (fin) { broadcast(c->fragop, c->frag, c->fraglen); c->fraglen = 0; }
        } else if (op == 9) {
            char hd[10]; size_t hl = frame_hdr(hd, 10, len);
            queue(c, hd, hl); queue(c, (char *)p, len);
        } else if (op == 8) {
            char hd[2] = {(char)0x88, 0}; queue(c, hd, 2);
            return -1;
        }
        off += h + len;
    }
    if (off) { memmove(c->in, c->in + off, c->inlen - off); c->inlen -= off; }
    return 0;
}

static void flush_client(client *c) {
    while (c->outoff < c->outlen) {
        ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
        if (w > 0) { c->outoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) { c->want_out = 1; set_events(c); }
            return;
        }
        kill_client(c); return;
    }
    c->outoff = c->outlen = 0;
    free(c->out); c->out = NULL; c->outcap = 0;    /* idle clients keep no buffer */
    if (c->want_out) { c->want_out = 0; set_events(c); }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s PORT\n", argv[0]); return 2; }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_sig); signal(SIGINT, on_sig);
    nclients_cap = 1 << 16;
    clients = calloc((size_t)nclients_cap, sizeof *clients);
    dirty = calloc((size_t)nclients_cap, sizeof *dirty);
    openfds = calloc((size_t)nclients_cap, sizeof *openfds);
    openpos = malloc((size_t)nclients_cap * sizeof *openpos);
    memset(openpos, 0xff, (size_t)nclients_cap * sizeof *openpos);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4096) < 0) { perror("bind/listen"); return 1; }
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[1024];
    static char rb[1 << 16];
    int deadlist[1024]; int ndead;
    while (!stop) {
        int n = epoll_wait(epfd, evs, 1024, 500);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); break; }
        ndead = 0;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    if (cfd >= nclients_cap) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    client *c = calloc(1, sizeof *c);
                    c->fd = cfd; clients[cfd] = c;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ce);
                }
                continue;
            }
            client *c = clients[fd];
            if (!c || c->dead) continue;
            if (evs[i].events & EPOLLOUT) flush_client(c);
            if (c->dead) { if (ndead < 1024) deadlist[ndead++] = fd; continue; }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(fd, rb, sizeof rb);
                if (r <= 0) {
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                    kill_client(c); if (ndead < 1024) deadlist[ndead++] = fd; continue;
                }
                ensure(&c->in, &c->incap, c->inlen + (size_t)r + 1);
                memcpy(c->in + c->inlen, rb, (size_t)r); c->inlen += (size_t)r;
                int rc = 0;
                if (!c->open) rc = do_handshake(c);
                if (rc >= 0 && c->open) rc = parse_frames(c);
                if (rc >= 0 && c->inlen == 0) { free(c->in); c->in = NULL; c->incap = 0; }
                if (rc < 0) {
                    flush_client(c);
                    kill_client(c); if (ndead < 1024) deadlist[ndead++] = fd;
                }
            }
        }
        for (int i = 0; i < ndirty; i++) {
            client *c = clients[dirty[i]];
            if (!c) continue;
            c->dirty = 0;
            if (!c->dead && !c->want_out) flush_client(c);
            if (c->dead && ndead < 1024) deadlist[ndead++] = c->fd;
        }
        ndirty = 0;
        for (int i = 0; i < ndead; i++) {
            client *c = clients[deadlist[i]];
            if (c && c->dead) free_client(c);
        }
    }
    fprintf(stderr, "cserver: stopping, dropped=%llu\n", dropped);
    return 0;
}
