/*
 * The C load generator of wsguard's benchmarks (driven by benchmarks/cloadgen.py).
 *
 * One thread, epoll, non-blocking sockets, RFC 6455 spoken directly (client frames masked
 * with one random key per connection, 8 bytes at a time): the same wire traffic as the
 * "raw" client of benchmarks/loadgen.py, at a fraction of its CPU, so that the server is
 * the limit of a benchmark and not its client.
 *
 * Phases (--phase):
 *   pingpong   --conns connections, --depth pings in flight each; every reply sends the
 *              next until t1; round-trip latency of each ping recorded;
 *   oneway     --conns (normally 1) connections streaming pre-built "data" messages until
 *              t1, then a ping whose pong proves every message was processed; the count is
 *              over t1 - t0 plus the time until that pong;
 *   handshake  --conns workers, each opening a connection (Origin, Bearer token), waiting
 *              for the 101 and the welcome frame, closing with 1000 and waiting for the
 *              server's close, then again; latency of each recorded.
 *
 * Protocol (stdout/stdin lines, the one of benchmarks/loadgen.py):
 *   -> {"event": "ready", "opened": N, "open_errors": {...}}
 *   <- {"cmd": "go", "t0": T0, "t1": T1}     (CLOCK_MONOTONIC seconds, Python's monotonic)
 *   -> {"event": "result", "count": N, "hist": {"<us>": n, ...}, "errors": {...},
 *       "cpu_s": S, "wall_s": W}
 * Only events completed inside [t0, t1) are counted; cpu_s is getrusage over [t0, t1).
 *
 * Build: cc -std=c11 -O2 -Wall -Wextra -Werror -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define ID_LENGTH 64
#define OPEN_CONCURRENCY 64
#define MAX_HEADER 65536
#define MAX_FRAME (16u << 20)
#define HIST_US (1u << 20)  /* exact microseconds below ~1.05 s */
#define HIST_MS 600000u     /* then whole milliseconds up to 600 s */
#define ONEWAY_BATCH 1024   /* frames per pre-built blob */
#define MAX_FAILURES 1000   /* per handshake worker */
#define PONG_HEAD "{\"type\":\"pong\",\"id\":\""
#define PING_HEAD "{\"type\":\"ping\",\"id\":\""
#define HEAD_LEN 21

enum phase { PH_PINGPONG, PH_ONEWAY, PH_HANDSHAKE };
enum state { S_IDLE, S_CONNECTING, S_UPGRADING, S_WELCOME, S_OPEN, S_CLOSING };
enum stage { ST_OPENING, ST_RUN, ST_CLOSING };

typedef struct {
    uint8_t *p;
    size_t off, len, cap; /* unconsumed bytes: p[off..len) */
} buf_t;

typedef struct {
    char kind[128];
    long n;
} errkind_t;

typedef struct {
    errkind_t *v;
    int len, cap;
} errors_t;

typedef struct {
    int fd;
    uint32_t gen;
    int state;
    int idx;
    double started, deadline;
    uint8_t key[8]; /* the mask key, twice */
    uint64_t key64;
    buf_t rb, wb;
    int close_code; /* -1: no close frame received */
    int close_sent, out_on, lost, dead;
    /* pingpong */
    uint8_t *tmpl;
    size_t tmpl_len;
    int prefix_len;
    uint64_t seq;
    int inflight, finished;
    uint64_t *slot_seq;
    double *slot_t;
    /* oneway */
    int streaming, stream_over, confirmed, ping_queued;
    uint64_t written, frames0;
    size_t blob_off;
    /* handshake worker */
    int failures;
    long next_token;
} conn_t;

static struct {
    int phase;
    char host[256];
    char port[16];
    char origin[512];
    char **tokens;
    long ntokens;
    int conns, msg_bytes, depth, index, spread;
    size_t read_size; /* bytes per read (small values test frames split across reads) */
    double timeout, max_seconds;
    /* run state */
    int ep;
    int stage;
    conn_t *c;
    int opening, opened, next_open;
    int live; /* open file descriptors */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    double t0, t1, cpu0, cpu_s;
    int t0_marked, t1_marked;
    long count;
    uint32_t *hist_us, *hist_ms;
    errors_t errors, open_errors;
    /* oneway */
    uint8_t *blob;
    size_t blob_len, frame_len;
    double confirmed_last;
} G;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cloadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* -- small utilities ------------------------------------------------------------------- */

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory");
    return q;
}

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->off == b->len) b->off = b->len = 0;
    if (b->cap - b->len >= extra) return;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= extra) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void err_vadd(errors_t *e, const char *fmt, va_list ap) {
    char kind[128];
    vsnprintf(kind, 121, fmt, ap); /* loadgen.py cuts kinds at 120 characters */
    for (int i = 0; i < e->len; i++)
        if (strcmp(e->v[i].kind, kind) == 0) {
            e->v[i].n++;
            return;
        }
    if (e->len == e->cap) {
        e->cap = e->cap ? 2 * e->cap : 8;
        e->v = xrealloc(e->v, (size_t)e->cap * sizeof *e->v);
    }
    memcpy(e->v[e->len].kind, kind, sizeof kind);
    e->v[e->len++].n = 1;
}

static void err_add(errors_t *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    err_vadd(e, fmt, ap);
    va_end(ap);
}

static void err_set(errors_t *e, const char *kind, long n) {
    err_add(e, "%s", kind);
    for (int i = 0; i < e->len; i++)
        if (strcmp(e->v[i].kind, kind) == 0) e->v[i].n = n;
}

static uint64_t rng_state;

static uint64_t rng(void) { /* xorshift64*, seeded from /dev/urandom */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static void rng_seed(void) {
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, &rng_state, sizeof rng_state) != (ssize_t)sizeof rng_state)
        rng_state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (fd >= 0) close(fd);
    if (!rng_state) rng_state = 0x9e3779b97f4a7c15ULL;
}

static uint32_t crc32_of(const char *s) { /* zlib.crc32 */
    uint32_t crc = 0xFFFFFFFFu;
    for (; *s; s++) {
        crc ^= (uint8_t)*s;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = tbl[(v >> 18) & 63];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tbl[v & 63] : '=';
    }
    out[o] = 0;
}

/* -- statistics ----------------------------------------------------------------------- */

static void mark_times(double now);

static void record(double now, double seconds) {
    if (!(G.t0 <= now && now < G.t1)) return;
    G.count++;
    double us = seconds * 1e6;
    if (us < 0) us = 0;
    if (us < HIST_US) {
        G.hist_us[(uint32_t)us]++;
    } else {
        double ms = us / 1000;
        G.hist_ms[ms < HIST_MS ? (uint32_t)ms : HIST_MS - 1]++;
    }
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void json_errors(FILE *f, const errors_t *e) {
    fputc('{', f);
    for (int i = 0; i < e->len; i++) {
        if (i) fputs(", ", f);
        json_string(f, e->v[i].kind);
        fprintf(f, ": %ld", e->v[i].n);
    }
    fputc('}', f);
}

static void emit_ready(void) {
    fprintf(stdout, "{\"event\": \"ready\", \"opened\": %d, \"open_errors\": ", G.opened);
    json_errors(stdout, &G.open_errors);
    fputs("}\n", stdout);
    fflush(stdout);
}

static void emit_result(double wall) {
    FILE *f = stdout;
    fprintf(f, "{\"event\": \"result\", \"count\": %ld, \"hist\": {", G.count);
    int first = 1;
    for (uint32_t i = 0; i < HIST_US; i++)
        if (G.hist_us[i]) {
            fprintf(f, "%s\"%u\": %u", first ? "" : ", ", i, G.hist_us[i]);
            first = 0;
        }
    for (uint32_t i = 0; i < HIST_MS; i++)
        if (G.hist_ms[i]) {
            fprintf(f, "%s\"%llu\": %u", first ? "" : ", ", (unsigned long long)i * 1000,
                    G.hist_ms[i]);
            first = 0;
        }
    fputs("}, \"errors\": ", f);
    json_errors(f, &G.errors);
    fprintf(f, ", \"cpu_s\": %.6f, \"wall_s\": %.6f}\n", G.cpu_s, wall);
    fflush(f);
}

/* -- framing -------------------------------------------------------------------------- */

static void mask_bytes(uint8_t *p, size_t n, const conn_t *c) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        w ^= c->key64;
        memcpy(p + i, &w, 8);
    }
    for (; i < n; i++) p[i] ^= c->key[i & 3];
}

/* Appends a frame header (FIN, *opcode*, masked, *n* bytes) and the mask key to *b*. */
static void put_header(buf_t *b, const conn_t *c, int opcode, size_t n) {
    uint8_t h[14];
    size_t k = 0;
    h[k++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        h[k++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        h[k++] = 0x80 | 126;
        h[k++] = (uint8_t)(n >> 8);
        h[k++] = (uint8_t)n;
    } else {
        h[k++] = 0x80 | 127;
        for (int s = 56; s >= 0; s -= 8) h[k++] = (uint8_t)((uint64_t)n >> s);
    }
    memcpy(h + k, c->key, 4);
    buf_put(b, h, k + 4);
}

/* A masked frame appended to the connection's output. */
static void send_frame(conn_t *c, int opcode, const void *payload, size_t n) {
    put_header(&c->wb, c, opcode, n);
    buf_reserve(&c->wb, n);
    uint8_t *dst = c->wb.p + c->wb.len;
    memcpy(dst, payload, n);
    mask_bytes(dst, n, c);
    c->wb.len += n;
}

static void send_close(conn_t *c, int code) {
    if (c->close_sent) return;
    c->close_sent = 1;
    uint8_t p[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    send_frame(c, 8, p, 2);
}

/* -- connections ---------------------------------------------------------------------- */

static void set_out(conn_t *c, int on) {
    if (c->out_on == on || c->fd < 0) return;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u),
                             .data.u64 = ((uint64_t)c->gen << 32) | (uint32_t)c->idx};
    epoll_ctl(G.ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out_on = on;
}

static void close_fd(conn_t *c) {
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
        G.live--;
    }
    c->gen++;
    c->state = S_IDLE;
    buf_free(&c->rb);
    buf_free(&c->wb);
    c->out_on = 0;
}

static void upgrade_request(conn_t *c, const char *token) {
    uint8_t raw[16];
    uint64_t a = rng(), b = rng();
    memcpy(raw, &a, 8);
    memcpy(raw + 8, &b, 8);
    char key[32];
    base64(raw, 16, key);
    char head[1024];
    int n = snprintf(head, sizeof head,
                     "GET / HTTP/1.1\r\n"
                     "Host: %s:%s\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "Origin: %s\r\n"
                     "Authorization: Bearer ",
                     G.host, G.port, key, G.origin);
    buf_put(&c->wb, head, (size_t)n);
    buf_put(&c->wb, token, strlen(token));
    static const char tail[] = "\r\nUser-Agent: wsguard-bench\r\n\r\n";
    buf_put(&c->wb, tail, sizeof tail - 1);
}

static void hook_failed(conn_t *c, const char *kind, double now);

static void conn_fail(conn_t *c, double now, const char *fmt, ...) {
    char kind[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(kind, sizeof kind, fmt, ap);
    va_end(ap);
    close_fd(c);
    hook_failed(c, kind, now);
}

/* Opens a connection from *source* (NULL: any) and queues the upgrade request.
   Returns 0, or -1 after conn_fail. */
static int conn_start(conn_t *c, const char *token, const char *source, double now) {
    uint64_t k = rng();
    memcpy(c->key, &k, 4);
    memcpy(c->key + 4, &k, 4);
    memcpy(&c->key64, c->key, 8);
    c->close_code = -1;
    c->close_sent = c->lost = c->finished = 0;
    c->started = now;
    c->deadline = now + G.timeout;
    int fd = socket(G.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        conn_fail(c, now, "OSError: socket: %s", strerror(errno));
        return -1;
    }
    c->fd = fd;
    G.live++;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (source != NULL) {
        struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = 0};
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
        if (inet_pton(AF_INET, source, &local.sin_addr) != 1 ||
            bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
            conn_fail(c, now, "OSError: bind %s: %s", source, strerror(errno));
            return -1;
        }
    }
    if (connect(fd, (struct sockaddr *)&G.addr, G.addrlen) != 0 && errno != EINPROGRESS) {
        conn_fail(c, now, "ConnectionError: connect: %s", strerror(errno));
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                             .data.u64 = ((uint64_t)c->gen << 32) | (uint32_t)c->idx};
    if (epoll_ctl(G.ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl: %s", strerror(errno));
    c->out_on = 1;
    c->state = S_CONNECTING;
    upgrade_request(c, token);
    return 0;
}

static void hook_welcome(conn_t *c, double now);
static void hook_text(conn_t *c, const uint8_t *p, size_t n, double now);
static void hook_lost(conn_t *c, double now);
static void hook_closed(conn_t *c, double now);

/* End of the stream (EOF, reset, error), by state. */
static void conn_broken(conn_t *c, int err, double now) {
    switch (c->state) {
    case S_CONNECTING:
        conn_fail(c, now, "ConnectionError: connect: %s", strerror(err ? err : ECONNRESET));
        break;
    case S_UPGRADING:
    case S_WELCOME:
        if (err)
            conn_fail(c, now, "ConnectionError: connection lost before the welcome: %s",
                      strerror(err));
        else
            conn_fail(c, now, "ConnectionError: connection lost before the welcome");
        break;
    case S_OPEN:
        close_fd(c);
        hook_lost(c, now);
        break;
    case S_CLOSING:
        close_fd(c);
        hook_closed(c, now);
        break;
    default:
        close_fd(c);
    }
}

static void stream_write(conn_t *c, double now);

/* Writes what is queued; 0 when the connection ended. */
static int conn_flush(conn_t *c, double now) {
    if (c->fd < 0) return 0;
    if (c->state == S_CONNECTING) return 1;
    if (c->streaming) {
        stream_write(c, now);
        return c->fd >= 0;
    }
    while (c->wb.len > c->wb.off) {
        ssize_t n = send(c->fd, c->wb.p + c->wb.off, c->wb.len - c->wb.off, MSG_NOSIGNAL);
        if (n > 0) {
            c->wb.off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(c, 1);
            return 1;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            conn_broken(c, n < 0 ? errno : 0, now);
            return 0;
        }
    }
    c->wb.off = c->wb.len = 0;
    set_out(c, 0);
    return 1;
}

/* One frame from the server. */
static void on_frame(conn_t *c, int opcode, const uint8_t *p, size_t n, double now) {
    if (opcode <= 2) {
        if (c->state == S_WELCOME) {
            hook_welcome(c, now);
        } else if (c->state == S_OPEN) {
            hook_text(c, p, n, now);
        }
    } else if (opcode == 9) {
        if (!c->close_sent) send_frame(c, 10, p, n);
    } else if (opcode == 8) {
        c->close_code = n >= 2 ? (p[0] << 8 | p[1]) : 1005;
        int was = c->state;
        if (was == S_WELCOME) {
            conn_fail(c, now, "HandshakeError: closed %d", c->close_code);
            return;
        }
        send_close(c, 1000);
        if (was == S_OPEN) {
            c->state = S_CLOSING;
            c->deadline = now + G.timeout;
            hook_lost(c, now);
        }
    }
}

/* Parses the response head, then every whole frame buffered; 0 when the connection ended. */
static int conn_input(conn_t *c, double now) {
    buf_t *b = &c->rb;
    if (c->state == S_UPGRADING) {
        uint8_t *start = b->p + b->off;
        size_t avail = b->len - b->off;
        uint8_t *end = memmem(start, avail, "\r\n\r\n", 4);
        if (end == NULL) {
            if (avail > MAX_HEADER) {
                conn_fail(c, now, "HandshakeError: response headers too large");
                return 0;
            }
            return 1;
        }
        if (avail < 12 || memcmp(start, "HTTP/1.1 101", 12) != 0) {
            uint8_t *eol = memmem(start, avail, "\r\n", 2);
            conn_fail(c, now, "HandshakeError: %.*s", (int)(eol - start), (const char *)start);
            return 0;
        }
        c->state = S_WELCOME;
        b->off += (size_t)(end - start) + 4;
    }
    while (c->fd >= 0 && b->len - b->off >= 2) {
        const uint8_t *p = b->p + b->off;
        size_t avail = b->len - b->off;
        int opcode = p[0] & 0x0F;
        uint64_t n = p[1] & 0x7F;
        size_t pos = 2;
        if (p[1] & 0x80) {
            conn_fail(c, now, "ProtocolError: masked frame from the server");
            return 0;
        }
        if (n == 126) {
            if (avail < 4) break;
            n = (uint64_t)p[2] << 8 | p[3];
            pos = 4;
        } else if (n == 127) {
            if (avail < 10) break;
            n = 0;
            for (int i = 2; i < 10; i++) n = n << 8 | p[i];
            pos = 10;
        }
        if (n > MAX_FRAME) {
            conn_fail(c, now, "ProtocolError: frame of %llu bytes", (unsigned long long)n);
            return 0;
        }
        if (avail < pos + n) {
            buf_reserve(b, pos + n - avail);
            break;
        }
        b->off += pos + (size_t)n;
        if (!(p[0] & 0x80) || opcode == 0) err_add(&G.errors, "fragmented message");
        on_frame(c, opcode, p + pos, (size_t)n, now);
    }
    return c->fd >= 0;
}

/* One read (two when the peer hung up: the data, then the end); 0 when it ended. */
static int conn_read(conn_t *c, int hangup, double now) {
    for (int k = 0; k < (hangup ? 2 : 1); k++) {
        buf_reserve(&c->rb, G.read_size);
        ssize_t n = read(c->fd, c->rb.p + c->rb.len, G.read_size);
        if (n > 0) {
            c->rb.len += (size_t)n;
            if (!conn_input(c, now)) return 0;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 1;
        conn_broken(c, n < 0 ? errno : 0, now);
        return 0;
    }
    return 1;
}

static void on_event(conn_t *c, uint32_t events, double now) {
    if (c->state == S_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err) {
            conn_fail(c, now, "ConnectionError: connect: %s", strerror(err));
            return;
        }
        c->state = S_UPGRADING;
        if (!conn_flush(c, now)) return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
        if (!conn_read(c, (events & (EPOLLRDHUP | EPOLLHUP)) != 0, now)) return;
    conn_flush(c, now);
}

/* -- phases --------------------------------------------------------------------------- */

/* Minimal JSON field: the value of "key" in a flat object, a string's raw characters or
   a scalar's text; "None" when absent (what loadgen.py's f-strings print). */
static void json_field(const uint8_t *p, size_t n, const char *key, char *out, size_t cap) {
    char pat[64];
    int k = snprintf(pat, sizeof pat, "\"%s\"", key);
    const uint8_t *end = p + n, *at = memmem(p, n, pat, (size_t)k);
    snprintf(out, cap, "None");
    if (at == NULL) return;
    at += k;
    while (at < end && (*at == ' ' || *at == ':')) at++;
    size_t o = 0;
    if (at < end && *at == '"') {
        for (at++; at < end && *at != '"' && o + 1 < cap; at++) {
            if (*at == '\\' && at + 1 < end) at++;
            out[o++] = (char)*at;
        }
    } else {
        for (; at < end && *at != ',' && *at != '}' && *at != ' ' && o + 1 < cap; at++)
            out[o++] = (char)*at;
    }
    out[o] = 0;
}

/* The sequence number of a ping id of this connection (0: not one). */
static uint64_t id_seq(const conn_t *c, const uint8_t *id, size_t n) {
    if (n != ID_LENGTH || memcmp(id, c->tmpl + HEAD_LEN, (size_t)c->prefix_len) != 0) return 0;
    size_t i = (size_t)c->prefix_len;
    while (i < ID_LENGTH && id[i] == 'x') i++;
    uint64_t seq = 0;
    for (; i < ID_LENGTH; i++) {
        int d = id[i] >= '0' && id[i] <= '9'   ? id[i] - '0'
                : id[i] >= 'a' && id[i] <= 'f' ? id[i] - 'a' + 10
                                               : -1;
        if (d < 0) return 0;
        seq = seq << 4 | (uint64_t)d;
    }
    return seq;
}

/* Removes *seq* from the in-flight slots; its send time, or -1 when it was not there. */
static double take_inflight(conn_t *c, uint64_t seq) {
    if (seq == 0) return -1;
    int d = G.depth, s = (int)(seq % (uint64_t)d);
    for (int i = 0; i < d; i++, s = s + 1 == d ? 0 : s + 1)
        if (c->slot_seq[s] == seq) {
            c->slot_seq[s] = 0;
            c->inflight--;
            return c->slot_t[s];
        }
    return -1;
}

static void send_ping(conn_t *c, double now) {
    uint64_t seq = ++c->seq;
    int d = G.depth, s = (int)(seq % (uint64_t)d);
    while (c->slot_seq[s]) s = s + 1 == d ? 0 : s + 1; /* a free slot exists (< depth) */
    c->slot_seq[s] = seq;
    c->slot_t[s] = now;
    c->inflight++;
    size_t n = c->tmpl_len;
    put_header(&c->wb, c, 1, n);
    buf_reserve(&c->wb, n);
    uint8_t *dst = c->wb.p + c->wb.len;
    memcpy(dst, c->tmpl, n);
    uint8_t *digit = dst + HEAD_LEN + ID_LENGTH;
    for (uint64_t v = seq; v; v >>= 4) *--digit = "0123456789abcdef"[v & 15];
    mask_bytes(dst, n, c);
    c->wb.len += n;
}

/* The ping payload of loadgen.py: {"type":"ping","id":"<64>"} padded to msg_bytes. */
static uint8_t *ping_template(const char *prefix, int msg_bytes, size_t *len) {
    size_t plen = strlen(prefix);
    if (plen > ID_LENGTH) die("id prefix too long");
    int pad = msg_bytes - HEAD_LEN - ID_LENGTH - 2;
    if (pad < 0) pad = 0;
    size_t n = HEAD_LEN + ID_LENGTH + 2 + (size_t)pad;
    uint8_t *t = xrealloc(NULL, n);
    memcpy(t, PING_HEAD, HEAD_LEN);
    memcpy(t + HEAD_LEN, prefix, plen);
    memset(t + HEAD_LEN + plen, 'x', ID_LENGTH - plen);
    t[HEAD_LEN + ID_LENGTH] = '"';
    memset(t + HEAD_LEN + ID_LENGTH + 1, ' ', (size_t)pad);
    t[n - 1] = '}';
    *len = n;
    return t;
}

static void pingpong_text(conn_t *c, const uint8_t *p, size_t n, double now) {
    if (n >= HEAD_LEN + ID_LENGTH && memcmp(p, PONG_HEAD, HEAD_LEN) == 0) {
        double sent = take_inflight(c, id_seq(c, p + HEAD_LEN, ID_LENGTH));
        if (sent < 0) {
            err_add(&G.errors, "pong with an unknown id");
            return;
        }
        record(now, now - sent);
    } else {
        char kind[64], code[64], ref[128];
        json_field(p, n, "type", kind, sizeof kind);
        json_field(p, n, "code", code, sizeof code);
        err_add(&G.errors, "reply:%s:%s", kind, code);
        json_field(p, n, "ref", ref, sizeof ref);
        if (strcmp(kind, "error") != 0 || strcmp(ref, "None") == 0) return;
        if (take_inflight(c, id_seq(c, (const uint8_t *)ref, strlen(ref))) < 0) return;
    }
    if (now < G.t1)
        send_ping(c, now);
    else if (c->inflight == 0)
        c->finished = 1;
}

/* The one-way message of loadgen.py, framed and masked for *c*. */
static void oneway_blob(const conn_t *c) {
    const char *body = "{\"type\":\"data\",\"channel\":\"bench\",\"payload\":{\"seq\":1,\"v\":\"";
    size_t blen = strlen(body);
    long pad = (long)G.msg_bytes - (long)blen - 3;
    pad = pad < 1 ? 1 : pad > 256 ? 256 : pad;
    size_t n = blen + (size_t)pad + 3;
    uint8_t *payload = xrealloc(NULL, n);
    memcpy(payload, body, blen);
    memset(payload + blen, 'x', (size_t)pad);
    memcpy(payload + blen + (size_t)pad, "\"}}", 3);
    buf_t one = {0};
    put_header(&one, c, 1, n);
    buf_put(&one, payload, n);
    mask_bytes(one.p + one.len - n, n, c);
    G.frame_len = one.len;
    G.blob_len = one.len * ONEWAY_BATCH;
    G.blob = xrealloc(G.blob, G.blob_len);
    for (size_t i = 0; i < ONEWAY_BATCH; i++) memcpy(G.blob + i * one.len, one.p, one.len);
    buf_free(&one);
    free(payload);
}

/* Streams the blob while the socket takes it; at t1 completes the frame under way and
   queues the final ping. Control frames (pongs to server pings) go between frames. */
static void stream_write(conn_t *c, double now) {
    for (int rounds = 0; rounds < 64 && c->fd >= 0; rounds++) {
        size_t into = c->blob_off % G.frame_len;
        if (into == 0 && (c->wb.len > c->wb.off || c->stream_over)) {
            if (c->stream_over) {
                G.count += (long)(c->written / G.frame_len - c->frames0);
                c->streaming = 0;
                char ident[ID_LENGTH + 1];
                snprintf(ident, sizeof ident, "end-%0*d", ID_LENGTH - 4, 1);
                memset(ident + 4, 'x', ID_LENGTH - 5);
                size_t len;
                uint8_t *ping = ping_template(ident, 100, &len);
                send_frame(c, 1, ping, len);
                free(ping);
                c->ping_queued = 1;
                conn_flush(c, now);
                return;
            }
            ssize_t n = send(c->fd, c->wb.p + c->wb.off, c->wb.len - c->wb.off, MSG_NOSIGNAL);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
            if (n <= 0) {
                conn_broken(c, n < 0 ? errno : 0, now);
                return;
            }
            c->wb.off += (size_t)n;
            continue;
        }
        size_t end = G.blob_len;
        if (c->wb.len > c->wb.off || c->stream_over) end = c->blob_off - into + G.frame_len;
        ssize_t n = send(c->fd, G.blob + c->blob_off, end - c->blob_off, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) {
            conn_broken(c, n < 0 ? errno : 0, now);
            return;
        }
        c->written += (uint64_t)n;
        c->blob_off = (c->blob_off + (size_t)n) % G.blob_len;
        now = mono();
        mark_times(now);
    }
}

static void oneway_text(conn_t *c, const uint8_t *p, size_t n, double now) {
    char kind[64], code[64], id[128];
    json_field(p, n, "type", kind, sizeof kind);
    json_field(p, n, "id", id, sizeof id);
    if (strcmp(kind, "pong") == 0 && strncmp(id, "end-", 4) == 0) {
        if (!c->confirmed) {
            c->confirmed = 1;
            if (now > G.confirmed_last) G.confirmed_last = now;
        }
        return;
    }
    json_field(p, n, "code", code, sizeof code);
    err_add(&G.errors, "reply:%s:%s", kind, code);
}

/* -- hooks: what each phase makes of a connection's events --------------------------- */

static void hook_failed(conn_t *c, const char *kind, double now) {
    if (G.phase == PH_HANDSHAKE) {
        c->failures++;
        err_add(&G.errors, "%s", kind);
    } else if (G.stage == ST_OPENING) {
        err_add(&G.open_errors, "%s", kind);
        G.opening--;
        c->dead = 1;
    } else if (G.stage == ST_RUN) {
        err_add(&G.errors, "%s", kind);
        hook_lost(c, now);
    }
}

static void hook_welcome(conn_t *c, double now) {
    if (G.phase == PH_HANDSHAKE) {
        c->state = S_CLOSING;
        c->deadline = now + G.timeout;
        send_close(c, 1000);
        return;
    }
    c->state = S_OPEN;
    if (G.stage == ST_OPENING) {
        G.opening--;
        G.opened++;
    }
}

static void hook_text(conn_t *c, const uint8_t *p, size_t n, double now) {
    if (G.stage != ST_RUN) return;
    if (G.phase == PH_PINGPONG)
        pingpong_text(c, p, n, now);
    else if (G.phase == PH_ONEWAY)
        oneway_text(c, p, n, now);
}

static void hook_lost(conn_t *c, double now) {
    (void)now;
    if (c->lost) return;
    c->lost = 1;
    c->finished = 1;
    c->streaming = 0;
}

static void hook_closed(conn_t *c, double now) {
    if (G.phase == PH_HANDSHAKE) {
        if (c->close_code != 1000) {
            c->failures++;
            if (c->close_code < 0)
                err_add(&G.errors, "HandshakeError: close code None");
            else
                err_add(&G.errors, "HandshakeError: close code %d", c->close_code);
            return;
        }
        record(now, now - c->started);
    } else {
        hook_lost(c, now);
    }
}

/* Deadlines of the connections (connect to welcome, and the close). */
static void sweep(double now) {
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &G.c[i];
        if (c->fd < 0 || now < c->deadline) continue;
        if (c->state == S_OPEN) continue;
        if (c->state == S_CLOSING) {
            if (G.phase == PH_HANDSHAKE) {
                close_fd(c);
                c->failures++;
                err_add(&G.errors, "TimeoutError: waiting for the close");
            } else {
                close_fd(c);
            }
        } else {
            conn_fail(c, now, "TimeoutError: waiting for the welcome");
        }
    }
}

static void mark_times(double now) {
    if (!G.t0_marked && now >= G.t0) {
        G.t0_marked = 1;
        G.cpu0 = cpu_seconds();
        if (G.phase == PH_ONEWAY)
            for (int i = 0; i < G.conns; i++) G.c[i].frames0 = G.c[i].written / G.frame_len;
    }
    if (G.t0_marked && !G.t1_marked && now >= G.t1) {
        G.t1_marked = 1;
        G.cpu_s = cpu_seconds() - G.cpu0;
        if (G.phase == PH_ONEWAY)
            for (int i = 0; i < G.conns; i++) G.c[i].stream_over = 1;
    }
}

static const char *source_of_conn(int i, char *out, size_t cap) {
    if (!G.spread) return NULL;
    snprintf(out, cap, "127.0.2.%d", i % 250 + 1);
    return out;
}

static const char *source_of_token(const char *token, char *out, size_t cap) {
    if (!G.spread) return NULL;
    snprintf(out, cap, "127.0.3.%u", crc32_of(token) % 250 + 1);
    return out;
}

/* One turn of the loop: wait (at most until the next mark), handle events, sweep. */
static void turn(double until) {
    static struct epoll_event evs[1024];
    static double last_sweep;
    double now = mono();
    double wake = until;
    if (!G.t0_marked && G.t0 < wake) wake = G.t0;
    if (!G.t1_marked && G.t1 < wake) wake = G.t1;
    double wait_s = wake - now;
    if (wait_s > 0.05) wait_s = 0.05;
    int ms = wait_s <= 0 ? 0 : (int)(wait_s * 1000) + 1;
    int n = epoll_wait(G.ep, evs, 1024, ms);
    if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    now = mono();
    mark_times(now);
    for (int i = 0; i < n; i++) {
        uint32_t idx = (uint32_t)evs[i].data.u64, gen = (uint32_t)(evs[i].data.u64 >> 32);
        conn_t *c = &G.c[idx];
        if (c->fd < 0 || c->gen != gen) continue; /* closed earlier in this batch */
        on_event(c, evs[i].events, now);
    }
    if (now - last_sweep > 0.05) {
        last_sweep = now;
        sweep(now);
    }
}

static void open_all(void) {
    G.stage = ST_OPENING;
    char src[32];
    for (;;) {
        double now = mono();
        while (G.opening < OPEN_CONCURRENCY && G.next_open < G.conns) {
            int i = G.next_open++;
            conn_t *c = &G.c[i];
            G.opening++;
            if (conn_start(c, G.tokens[i % G.ntokens], source_of_conn(i, src, sizeof src),
                           now) == 0)
                conn_flush(c, now);
        }
        if (G.opening == 0 && G.next_open == G.conns) break;
        turn(now + 0.05);
    }
}

/* Reads bench.py's command; 1 for go (t0, t1 set). */
static int read_go(void) {
    static char line[4096];
    if (fgets(line, sizeof line, stdin) == NULL || strstr(line, "\"go\"") == NULL) return 0;
    const char *a = strstr(line, "\"t0\""), *b = strstr(line, "\"t1\"");
    if (a == NULL || b == NULL) die("go without t0/t1: %s", line);
    G.t0 = strtod(strchr(a + 4, ':') + 1, NULL);
    G.t1 = strtod(strchr(b + 4, ':') + 1, NULL);
    return 1;
}

static void close_all(double wait_s) {
    G.stage = ST_CLOSING;
    double now = mono(), deadline = now + wait_s;
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &G.c[i];
        if (c->fd < 0) continue;
        if (c->state == S_OPEN) {
            c->state = S_CLOSING;
            c->deadline = deadline;
            c->streaming = 0;
        }
        send_close(c, 1000);
        conn_flush(c, now);
    }
    while (G.live > 0 && mono() < deadline) turn(deadline);
    for (int i = 0; i < G.conns; i++) close_fd(&G.c[i]);
}

static void emit_aborted(void) {
    fputs("{\"event\": \"result\", \"aborted\": true}\n", stdout);
    fflush(stdout);
}

/* Ready, then wait for the driver's go: 0 (and an aborted result) if it never comes. */
static int start_run(void) {
    emit_ready();
    if (!read_go()) {
        emit_aborted();
        return 0;
    }
    G.stage = ST_RUN;
    return 1;
}

static void phase_pingpong(void) {
    open_all();
    if (!start_run()) return;
    double now = mono();
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &G.c[i];
        if (c->fd < 0 || c->state != S_OPEN) {
            c->finished = 1;
            continue;
        }
        char prefix[32];
        snprintf(prefix, sizeof prefix, "p%dc%d-", G.index, i);
        c->tmpl = ping_template(prefix, G.msg_bytes, &c->tmpl_len);
        c->prefix_len = (int)strlen(prefix);
        c->slot_seq = calloc((size_t)G.depth, sizeof *c->slot_seq);
        c->slot_t = calloc((size_t)G.depth, sizeof *c->slot_t);
        if (!c->slot_seq || !c->slot_t) die("out of memory");
        for (int k = 0; k < G.depth; k++) send_ping(c, now);
        conn_flush(c, now);
    }
    double hard = G.t1 + G.timeout;
    for (;;) {
        now = mono();
        int pending = 0;
        for (int i = 0; i < G.conns; i++) pending += !G.c[i].finished;
        if ((G.t1_marked && pending == 0) || now >= hard) break;
        turn(G.t1_marked ? hard : G.t1);
    }
    int lost = 0;
    long unanswered = 0;
    for (int i = 0; i < G.conns; i++) {
        lost += G.c[i].lost;
        if (!G.c[i].lost) unanswered += G.c[i].inflight;
    }
    if (lost) err_set(&G.errors, "connections closed by the server", lost);
    if (unanswered) err_set(&G.errors, "pings without a reply", unanswered);
    close_all(G.timeout);
    emit_result(G.t1 - G.t0);
}

static void phase_oneway(void) {
    open_all();
    if (!start_run()) return;
    double now = mono();
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &G.c[i];
        if (c->fd < 0 || c->state != S_OPEN) continue;
        if (G.blob == NULL) oneway_blob(c);
        else { /* the same masked bytes on every connection: give them the same key */
            memcpy(c->key, G.c[0].key, 8);
            c->key64 = G.c[0].key64;
        }
        c->streaming = 1;
        set_out(c, 1);
    }
    double hard = 0;
    for (;;) {
        now = mono();
        if (G.t1_marked && hard == 0) hard = now + G.timeout + 30;
        int pending = 0;
        for (int i = 0; i < G.conns; i++) {
            conn_t *c = &G.c[i];
            pending += c->fd >= 0 && c->state == S_OPEN && !c->confirmed;
        }
        if (G.t1_marked && (pending == 0 || now >= hard)) break;
        turn(G.t1_marked ? hard : G.t1);
    }
    for (int i = 0; i < G.conns; i++) {
        conn_t *c = &G.c[i];
        if (c->dead || c->confirmed) continue;
        if (c->lost) {
            if (c->close_code < 0)
                err_add(&G.errors, "closed None");
            else
                err_add(&G.errors, "closed %d", c->close_code);
        } else {
            err_add(&G.errors, "no pong after the stream");
        }
    }
    double wall = G.t1 - G.t0;
    if (G.confirmed_last > G.t1) wall += G.confirmed_last - G.t1;
    close_all(G.timeout);
    emit_result(wall);
}

static void phase_handshake(void) {
    G.opened = 0;
    if (!start_run()) return;
    for (int w = 0; w < G.conns; w++) G.c[w].next_token = w;
    double hard = G.t1 + 3 * G.timeout;
    char src[32];
    for (;;) {
        double now = mono();
        int busy = 0;
        for (int w = 0; w < G.conns; w++) {
            conn_t *c = &G.c[w];
            while (c->fd < 0 && now < G.t1 && c->failures < MAX_FAILURES) {
                const char *token = G.tokens[c->next_token % G.ntokens];
                c->next_token += G.conns;
                if (conn_start(c, token, source_of_token(token, src, sizeof src), now) == 0)
                    conn_flush(c, now);
            }
            busy += c->fd >= 0;
        }
        if ((G.t1_marked && busy == 0) || now >= hard) break;
        turn(G.t1_marked ? hard : G.t1);
    }
    for (int w = 0; w < G.conns; w++) close_fd(&G.c[w]);
    emit_result(G.t1 - G.t0);
}

/* -- main ----------------------------------------------------------------------------- */

static void load_tokens(const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL) die("cannot read tokens from %s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long have = 0;
    while ((n = getline(&line, &cap, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0) continue;
        if (G.ntokens == have) {
            have = have ? 2 * have : 64;
            G.tokens = xrealloc(G.tokens, (size_t)have * sizeof *G.tokens);
        }
        G.tokens[G.ntokens++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (G.ntokens == 0) die("no tokens in %s", path);
}

static void resolve(void) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(G.host, G.port, &hints, &res);
    if (rc != 0) die("cannot resolve %s:%s: %s", G.host, G.port, gai_strerror(rc));
    memcpy(&G.addr, res->ai_addr, res->ai_addrlen);
    G.addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    if (G.spread && G.addr.ss_family != AF_INET) die("--spread needs an IPv4 host");
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "cloadgen: --max-seconds reached, exiting\n";
    ssize_t w = write(2, msg, sizeof msg - 1);
    (void)w;
    _exit(3);
}

static void usage(void) {
    fputs("usage: loadgen --phase pingpong|oneway|handshake --port N --tokens FILE\n"
          "               [--host H] [--origin O] [--conns N] [--msg-bytes N] [--depth N]\n"
          "               [--timeout S] [--index N] [--spread 0|1] [--max-seconds S]\n"
          "               [--read-size BYTES]\n"
          "then reads {\"cmd\": \"go\", \"t0\": T0, \"t1\": T1} on stdin (see the source)\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv) {
    const char *tokens = NULL;
    G.phase = -1;
    snprintf(G.host, sizeof G.host, "127.0.0.1");
    snprintf(G.origin, sizeof G.origin, "https://bench.example.com");
    G.conns = 1;
    G.msg_bytes = 100;
    G.depth = 1;
    G.timeout = 10;
    G.max_seconds = 600;
    G.read_size = 65536;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--phase")) {
            G.phase = !strcmp(v, "pingpong")    ? PH_PINGPONG
                      : !strcmp(v, "oneway")    ? PH_ONEWAY
                      : !strcmp(v, "handshake") ? PH_HANDSHAKE
                                                : -1;
            if (G.phase < 0) die("unknown phase %s", v);
        } else if (!strcmp(a, "--host")) {
            snprintf(G.host, sizeof G.host, "%s", v);
        } else if (!strcmp(a, "--port")) {
            snprintf(G.port, sizeof G.port, "%s", v);
        } else if (!strcmp(a, "--origin")) {
            snprintf(G.origin, sizeof G.origin, "%s", v);
        } else if (!strcmp(a, "--tokens")) {
            tokens = v;
        } else if (!strcmp(a, "--conns")) {
            G.conns = atoi(v);
        } else if (!strcmp(a, "--msg-bytes")) {
            G.msg_bytes = atoi(v);
        } else if (!strcmp(a, "--depth")) {
            G.depth = atoi(v);
        } else if (!strcmp(a, "--timeout")) {
            G.timeout = strtod(v, NULL);
        } else if (!strcmp(a, "--index")) {
            G.index = atoi(v);
        } else if (!strcmp(a, "--spread")) {
            G.spread = atoi(v) != 0;
        } else if (!strcmp(a, "--read-size")) {
            G.read_size = (size_t)atol(v);
        } else if (!strcmp(a, "--max-seconds")) {
            G.max_seconds = strtod(v, NULL);
        } else {
            usage();
        }
    }
    if (G.phase < 0 || !G.port[0] || tokens == NULL || G.conns < 0 || G.depth < 1 ||
        G.timeout <= 0 || G.max_seconds <= 0 || G.read_size < 1)
        usage();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(G.max_seconds + 1));
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    rng_seed();
    load_tokens(tokens);
    resolve();
    G.ep = epoll_create1(EPOLL_CLOEXEC);
    if (G.ep < 0) die("epoll_create1: %s", strerror(errno));
    G.c = calloc((size_t)(G.conns ? G.conns : 1), sizeof *G.c);
    G.hist_us = calloc(HIST_US, sizeof *G.hist_us);
    G.hist_ms = calloc(HIST_MS, sizeof *G.hist_ms);
    if (!G.c || !G.hist_us || !G.hist_ms) die("out of memory");
    for (int i = 0; i < G.conns; i++) {
        G.c[i].fd = -1;
        G.c[i].idx = i;
        G.c[i].close_code = -1;
    }
    G.t0 = G.t1 = 1e300;
    if (G.phase == PH_PINGPONG)
        phase_pingpong();
    else if (G.phase == PH_ONEWAY)
        phase_oneway();
    else
        phase_handshake();
    return 0;
}
