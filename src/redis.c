/* redis.c - one Redis target: connection, pipelined UNLINK batches, SCAN deletes, retry. */
#include "redis.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <hiredis/adapters/libuv.h>
#pragma GCC diagnostic pop

#include "log.h"

#define ERR_LEN 256
#define MAX_INFLIGHT 4 /* batches in flight per target at most */
#define SCAN_COUNT "1000"

/* The connection's life. advance() is the only place that enters a state and does what entering
 * it means; every failure goes through reset(), which lands in ST_BACKOFF. */
typedef enum {
    ST_DISCONNECTED, /* nothing under way; entering it starts the next connection attempt */
    ST_RESOLVING,    /* uv_getaddrinfo for cfg.host in flight; the timeout timer runs */
    ST_CONNECTING,   /* redisAsyncConnect issued, waiting for the connect callback */
    ST_AUTH,         /* AUTH sent (only when a password is set), waiting for +OK */
    ST_SELECT,       /* SELECT sent (only when db != 0), waiting for +OK */
    ST_READY,        /* batches, scans and re-deletes may be sent */
    ST_BACKOFF,      /* the attempt failed; conn_timer starts the next one after a jittered delay */
    ST_CLOSED,       /* evd_redis_close ran: handles are closing and nothing restarts */
} state_t;

typedef enum { CMD_AUTH, CMD_SELECT, CMD_UNLINK, CMD_SCAN, CMD_SCAN_UNLINK } cmd_kind_t;

/* The private data of every command. hiredis calls each reply callback exactly once, with the
 * reply or with NULL when the context goes away, so the callback always frees it. gen is the
 * connection generation at send time: a reply for an older generation belongs to a context that
 * reset() already abandoned (and to objects it already freed), and is dropped unread. */
typedef struct cmd {
    evd_redis_t *r;
    uint64_t gen;
    cmd_kind_t kind;
    void *obj; /* batch_t for CMD_UNLINK, scan_t for CMD_SCAN and CMD_SCAN_UNLINK */
} cmd_t;

/* Jobs sent together. The keys are deduplicated into argv, laid out as complete UNLINK commands
 * ("UNLINK" k1 .. k{chunk}, "UNLINK" ...) so that each command is a slice of argv: the pointers
 * borrow the jobs' strings, so a batch costs a few arrays and no allocation per key. */
typedef struct batch {
    struct batch *next; /* in r->backoff (sorted by due), r->done or r->redeletes */
    evd_job_t *jobs;    /* FIFO through job->next */
    evd_job_t *jobs_tail;
    size_t njobs;
    const char **argv;
    size_t *argvlen;
    size_t argc;
    size_t chunk;      /* keys per UNLINK command, fixed when the batch is formed */
    size_t nkeys;      /* distinct keys */
    const char **pats; /* distinct patterns, borrowed */
    size_t *patlen;
    size_t npats;
    char *store;   /* re-deletes only: the key bytes argv points into */
    bool redelete; /* a deferred re-delete: no jobs, no retry, failures logged at debug */
    int attempts;
    int status;   /* once in r->done: 0, -EIO or -ECANCELED */
    uint64_t due; /* in backoff: loop time when the next attempt may go */
    /* the current attempt */
    size_t outstanding;  /* UNLINK commands without a reply yet */
    size_t scans_left;   /* scan passes it waits on */
    bool sending;        /* attempt() is still issuing commands: do not finish it yet */
    char error[ERR_LEN]; /* the attempt's first error, "" while none */
} batch_t;

typedef struct waiters {
    batch_t **v;
    size_t n, cap;
} waiters_t;

/* One pattern being deleted: SCAN pages, each followed by an UNLINK of its keys, pipelined with
 * the next SCAN. At most one pass per pattern runs; batches that ask for the pattern while it
 * runs join `more`, and all of them share the one pass that starts when this one ends: a key
 * written during the running pass may have been missed by it. */
typedef struct scan {
    struct scan *next; /* in r->scans; a scan is listed exactly while a pass runs */
    char *pattern;
    size_t len;
    char cursor[32];    /* Redis cursors are unsigned 64-bit decimals */
    bool cursor_done;   /* SCAN returned cursor 0 */
    size_t outstanding; /* SCAN and UNLINK commands of the pass without a reply */
    waiters_t cur;      /* batches waiting on the running pass */
    waiters_t more;     /* batches waiting on the next pass */
    const char **argv;  /* UNLINK of a page: points into the SCAN reply while it is sent */
    size_t *argvlen;
    size_t argcap;
    char error[ERR_LEN];
} scan_t;

/* Keys confirmed deleted that are due for a re-delete: redel_store holds them NUL-separated in
 * confirmation order; a segment ends where one batch's keys end. */
typedef struct redel_seg {
    size_t end;
    uint64_t due;
} redel_seg_t;

struct evd_redis {
    uv_loop_t *loop;
    evd_target_cfg_t cfg; /* owned copy (url not kept: it may hold the password) */
    evd_redis_opts_t opts;
    evd_redis_job_cb cb;
    void *ud;

    state_t state;
    redisAsyncContext *ac;     /* the live context, NULL when none */
    uint64_t gen;              /* bumped whenever a connection is abandoned */
    char ip[64];               /* the address connected to (resolved or literal) */
    char addr[160];            /* for logs: ip:port or the unix path */
    uv_getaddrinfo_t *resolve; /* the live lookup, NULL when none */
    uv_getaddrinfo_t *stale;   /* an abandoned lookup still running in the thread pool, or NULL */
    int conn_failures;         /* consecutive failed connection attempts */
    bool down_logged;          /* `disconnected` logged since the last `connected` */
    bool ever_ready;
    char last_error[ERR_LEN];
    size_t outstanding; /* commands sent on this connection without a reply */

    /* conn_timer: connect/AUTH/SELECT/reply timeout, or the reconnect delay in ST_BACKOFF.
     * fill_timer: max_delay_ms of the queue, and the deferred kick after connecting.
     * retry_timer: the earliest batch in backoff. redel_timer: the earliest re-delete. */
    uv_timer_t conn_timer, fill_timer, retry_timer, redel_timer;
    /* Commands hiredis queued on a connected context go out in one write before the loop
     * next waits for I/O (write_prepare, for commands queued by timers) or right after its I/O
     * callbacks (write_check) rather than after polling for writability: that poll cost two
     * epoll_ctl calls and a wake-up per batch. Both are active while a write is due.
     * in_write: that write is being made (if it leaves bytes behind, hiredis asks again and
     * the socket is polled as before). */
    uv_prepare_t write_prepare;
    uv_check_t write_check;
    bool in_write;

    evd_job_t *queue, *queue_tail; /* submitted, not yet in a batch */
    size_t queued_items;
    uint64_t fill_deadline; /* loop time when the queue goes even if not full */
    batch_t *inflight;      /* batches in flight (linked by next), MAX_INFLIGHT at most */
    size_t ninflight;
    batch_t *backoff;          /* failed batches waiting for their retry, by due */
    batch_t *done, *done_tail; /* finished batches whose jobs are being called back */
    bool flushing;
    scan_t *scans;
    batch_t *redeletes; /* re-deletes in flight */
    evd_buf_t redel_store;
    redel_seg_t *redel_segs;
    size_t redel_nsegs, redel_segcap;

    size_t npending;
    evd_redis_stats_t stats;
    uint64_t rng;

    bool closing;
    bool retired; /* evd_redis_retire ran: failed batches are handed back, not retried */
    int nhandles; /* timers, write_prepare and write_check not yet closed */
    int nctx;     /* hiredis contexts not yet freed (their callbacks point at us) */
    int nreqs;    /* getaddrinfo requests not yet called back */
    void (*closed_cb)(void *arg);
    void *closed_arg;
};

static const char UNLINK[] = "UNLINK";

static void advance(evd_redis_t *r, state_t next);
static void reset(evd_redis_t *r, const char *fmt, ...) EVD_PRINTF(2, 3);
static void kick(evd_redis_t *r);
static void end(evd_redis_t *r);
static void batch_check(evd_redis_t *r, batch_t *b);
static void scan_pass_start(evd_redis_t *r, scan_t *s);

/* ---- small helpers -------------------------------------------------------------------------- */

static void set_error(char *dst, const char *fmt, ...) EVD_PRINTF(2, 3);
static void set_error(char *dst, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, ERR_LEN, fmt, ap);
    va_end(ap);
}

/* Records the attempt's first error only: later ones are usually consequences of it. */
static void first_error(char *dst, const redisReply *reply, const char *what)
{
    if (dst[0])
        return;
    if (reply->type == REDIS_REPLY_ERROR)
        set_error(dst, "%s: %.*s", what, (int)reply->len, reply->str);
    else
        set_error(dst, "%s: unexpected reply type %d", what, reply->type);
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* xorshift64: jitter needs no quality beyond not being in lockstep with other processes. */
static double rnd_unit(evd_redis_t *r)
{
    uint64_t x = r->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r->rng = x;
    return (double)(x >> 11) * 0x1.0p-53;
}

int64_t evd_backoff_delay(int64_t initial_ms, int64_t max_ms, int k, double u)
{
    if (max_ms <= 0 || initial_ms <= 0)
        return 0;
    if (k < 0)
        k = 0;
    /* min(max, initial * 2^k) without computing a product that may overflow */
    int64_t cap = (k >= 62 || initial_ms > (max_ms >> k)) ? max_ms : initial_ms << k;
    if (!(u > 0.0))
        return 0;
    if (u >= 1.0)
        return cap;
    double d = u * ((double)cap + 1.0);
    if (d >= (double)cap)
        return cap;
    return (int64_t)d;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static bool str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void wipe_free(char *s)
{
    if (!s)
        return;
    volatile char *p = s;
    while (*p)
        *p++ = '\0';
    free(s);
}

static void cfg_free(evd_target_cfg_t *c)
{
    free(c->name);
    free(c->host);
    free(c->unix_path);
    free(c->username);
    wipe_free(c->password);
    memset(c, 0, sizeof(*c));
}

static int cfg_copy(evd_target_cfg_t *dst, const evd_target_cfg_t *src)
{
    *dst = (evd_target_cfg_t){
        .name = dup_or_null(src->name ? src->name : "default"),
        .username = dup_or_null(src->username),
        .password = dup_or_null(src->password),
        .timeout_ms = src->timeout_ms > 0 ? src->timeout_ms : 2000,
        .host = dup_or_null(src->host),
        .port = src->port > 0 ? src->port : 6379,
        .unix_path = dup_or_null(src->unix_path),
        .db = src->db,
    };
    if (!dst->name || (src->username && !dst->username) || (src->password && !dst->password) ||
        (src->host && !dst->host) || (src->unix_path && !dst->unix_path))
        return -ENOMEM;
    if (!dst->host && !dst->unix_path && !(dst->host = strdup("127.0.0.1")))
        return -ENOMEM;
    return 0;
}

static void opts_set(evd_redis_t *r, const evd_redis_opts_t *o)
{
    r->opts = *o;
    if (r->opts.max_keys < 1)
        r->opts.max_keys = 1;
    if (r->opts.max_keys > 1000000)
        r->opts.max_keys = 1000000;
    if (r->opts.max_delay_ms < 0)
        r->opts.max_delay_ms = 0;
    if (r->opts.max_attempts < 1)
        r->opts.max_attempts = 1;
    if (r->opts.initial_backoff_ms < 1)
        r->opts.initial_backoff_ms = 1;
    if (r->opts.max_backoff_ms < r->opts.initial_backoff_ms)
        r->opts.max_backoff_ms = r->opts.initial_backoff_ms;
    if (r->opts.redelete_after_ms < 0)
        r->opts.redelete_after_ms = 0;
}

static int waiters_add(waiters_t *w, batch_t *b)
{
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 4;
        batch_t **v = realloc(w->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        w->v = v;
        w->cap = cap;
    }
    w->v[w->n++] = b;
    return 0;
}

static void waiters_remove(waiters_t *w, const batch_t *b)
{
    for (size_t i = 0; i < w->n; i++) {
        if (w->v[i] == b) {
            w->v[i] = w->v[--w->n];
            return;
        }
    }
}

/* ---- commands and the timeout -------------------------------------------------------------- */

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);
static void on_conn_timer(uv_timer_t *t);
static void on_kick_timer(uv_timer_t *t);

static void timeout_start(evd_redis_t *r)
{
    uv_timer_start(&r->conn_timer, on_conn_timer, (uint64_t)r->cfg.timeout_ms, 0);
}

/* Queues one command on the live context. Returns 0, or -ENOMEM / -EIO (hiredis refused it,
 * which happens only on a context that is already going away). */
static int send_cmd(evd_redis_t *r, cmd_kind_t kind, void *obj, size_t argc, const char **argv, const size_t *argvlen)
{
    cmd_t *c = malloc(sizeof(*c));
    if (!c)
        return -ENOMEM;
    *c = (cmd_t){.r = r, .gen = r->gen, .kind = kind, .obj = obj};
    if (redisAsyncCommandArgv(r->ac, on_reply, c, (int)argc, argv, argvlen) != REDIS_OK) {
        free(c);
        return -EIO;
    }
    r->outstanding++;
    /* A new command does not extend the deadline of older unanswered ones. */
    if (!uv_is_active((uv_handle_t *)&r->conn_timer))
        timeout_start(r);
    return 0;
}

/* After a reply: the deadline moves on while anything is still unanswered. */
static void timeout_replied(evd_redis_t *r)
{
    if (r->state != ST_AUTH && r->state != ST_SELECT && r->state != ST_READY)
        return;
    if (r->outstanding > 0)
        timeout_start(r);
    else
        uv_timer_stop(&r->conn_timer);
}

/* ---- the connection ------------------------------------------------------------------------ */

static void maybe_free(evd_redis_t *r);
static void batch_free(batch_t *b);
static void scan_free(scan_t *s);

/* Abandons the connection: later callbacks from the old context find a stale generation (reply
 * callbacks) or a context that is no longer r->ac (connect/disconnect callbacks) and touch
 * nothing. Scans and re-deletes of the connection are dropped; the in-flight batch is the
 * caller's to fail. Safe inside reply callbacks: redisAsyncFree is then deferred by hiredis until
 * the callback returns. Never reached with r->ac set from a connect/disconnect callback: those
 * detach the context first, since hiredis frees it itself right after them. */
static void teardown(evd_redis_t *r)
{
    r->gen++;
    r->outstanding = 0;
    uv_timer_stop(&r->conn_timer);
    if (r->resolve) {
        /* Its callback still runs and frees it. A lookup already running in the thread pool
         * cannot be cancelled: it is kept as `stale`, and the next attempt takes it over rather
         * than start another (a resolver that hangs would otherwise take one pool thread per
         * attempt, and dead-letter writes use that pool too). */
        if (uv_cancel((uv_req_t *)r->resolve) != 0 && !r->closing)
            r->stale = r->resolve;
        r->resolve = NULL;
    }
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        bool connected = (ac->c.flags & REDIS_CONNECTED) != 0;
        r->ac = NULL;
        redisAsyncFree(ac);
        /* hiredis calls the disconnect callback (which counts the context out) only for a
         * context that got connected; an unconnected one is gone now. */
        if (!connected)
            r->nctx--;
    }
    while (r->scans) {
        scan_t *s = r->scans;
        r->scans = s->next;
        scan_free(s);
    }
    while (r->redeletes) {
        batch_t *b = r->redeletes;
        r->redeletes = b->next;
        EVD_LOG(EVD_LOG_DEBUG, "redelete_failed", F_STR("target", r->cfg.name), F_INT("keys", b->nkeys),
                F_STR("error", "connection dropped"));
        batch_free(b);
    }
}

static void attempt_failed(evd_redis_t *r, batch_t *b);

/* The one way a connection ends: logs, fails the in-flight batch with the reason, and schedules
 * the next connection attempt. */
static void reset(evd_redis_t *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->last_error, sizeof(r->last_error), fmt, ap);
    va_end(ap);

    teardown(r);
    r->conn_failures++;
    if (!r->down_logged) {
        EVD_LOG(EVD_LOG_WARN, "disconnected", F_STR("target", r->cfg.name), F_STR("error", r->last_error));
        r->down_logged = true;
    } else {
        EVD_LOG(EVD_LOG_DEBUG, "disconnected", F_STR("target", r->cfg.name), F_STR("error", r->last_error),
                F_INT("failures", r->conn_failures));
    }
    batch_t *b;
    while ((b = r->inflight)) {
        if (!b->error[0])
            set_error(b->error, "%s", r->last_error);
        b->outstanding = 0;
        b->scans_left = 0; /* teardown freed the scans */
        attempt_failed(r, b);
    }
    advance(r, ST_BACKOFF);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    evd_redis_t *r = ac->data;
    if (status != REDIS_OK) {
        r->nctx--; /* hiredis frees the context when this returns */
        if (ac == r->ac) {
            r->ac = NULL;
            reset(r, "connect failed: %s", ac->errstr);
            end(r);
        }
        maybe_free(r);
        return;
    }
    if (ac != r->ac)
        return;
    uv_timer_stop(&r->conn_timer);
    advance(r, ST_AUTH);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    evd_redis_t *r = ac->data;
    r->nctx--; /* hiredis frees the context when this returns */
    if (ac == r->ac) {
        r->ac = NULL;
        reset(r, "connection lost: %s", ac->err ? ac->errstr : "closed");
        end(r);
    }
    maybe_free(r);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    evd_redis_t *r = req->data;
    r->nreqs--;
    bool live = req == r->resolve;
    if (req == r->stale)
        r->stale = NULL;
    free(req);
    if (!live) {
        uv_freeaddrinfo(res);
        maybe_free(r);
        return;
    }
    r->resolve = NULL;
    if (status != 0) {
        reset(r, "resolve %s failed: %s", r->cfg.host, uv_strerror(status));
        end(r);
        return;
    }
    /* Rotate through the addresses on consecutive failures ("localhost" may give ::1 first). */
    size_t n = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next)
        n++;
    struct addrinfo *a = res;
    for (size_t i = n ? (size_t)r->conn_failures % n : 0; i > 0; i--)
        a = a->ai_next;
    int rc = UV_EAI_NODATA;
    if (a && a->ai_family == AF_INET)
        rc = uv_ip4_name((const struct sockaddr_in *)a->ai_addr, r->ip, sizeof(r->ip));
    else if (a && a->ai_family == AF_INET6)
        rc = uv_ip6_name((const struct sockaddr_in6 *)a->ai_addr, r->ip, sizeof(r->ip));
    uv_freeaddrinfo(res);
    if (rc != 0) {
        reset(r, "resolve %s failed: %s", r->cfg.host, uv_strerror(rc));
        end(r);
        return;
    }
    advance(r, ST_CONNECTING);
    end(r);
}

/* hiredis 0.14's libuv adapter drops poll errors: on POLLERR (a refused connect, a reset
 * connection) libuv stops the watcher and reports status UV_EBADF, and the adapter returns
 * without telling hiredis, which then waits forever (only our timeout would notice). Later
 * hiredis releases hand the error to hiredis as the events it was waiting for, so that its
 * read/write fails and reports the socket error; these hooks replace the adapter's with that. */
static void poll_cb(uv_poll_t *handle, int status, int events)
{
    redisLibuvEvents *p = handle->data;
    int ev = status ? p->events : events;
    if (p->context && (ev & UV_READABLE))
        redisAsyncHandleRead(p->context);
    if (p->context && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->context);
}

/* Polls for p->events | add, less del. Only on a change (or a watcher libuv stopped): each
 * uv_poll_start is an epoll_ctl DEL and ADD, and hiredis asks for reads after every write. */
static void poll_update(redisLibuvEvents *p, int add, int del)
{
    int events = (p->events | add) & ~del;
    bool active = uv_is_active((uv_handle_t *)&p->handle);
    if (events == p->events && (active || !events))
        return;
    p->events = events;
    if (events)
        uv_poll_start(&p->handle, events, poll_cb);
    else
        uv_poll_stop(&p->handle);
}

static void ev_add_read(void *privdata)
{
    poll_update(privdata, UV_READABLE, 0);
}

static void ev_del_read(void *privdata)
{
    poll_update(privdata, 0, UV_READABLE);
}

static void cancel_write(evd_redis_t *r)
{
    uv_prepare_stop(&r->write_prepare);
    uv_check_stop(&r->write_check);
}

static void write_queued(evd_redis_t *r)
{
    cancel_write(r);
    redisAsyncContext *ac = r->ac;
    if (!ac || !(ac->c.flags & REDIS_CONNECTED))
        return;
    /* Callbacks it makes cannot free r: write_check is not closed yet. */
    r->in_write = true;
    redisAsyncHandleWrite(ac);
    r->in_write = false;
}

static void on_write_prepare(uv_prepare_t *h)
{
    write_queued(h->data);
}

static void on_write_check(uv_check_t *h)
{
    write_queued(h->data);
}

static void ev_add_write(void *privdata)
{
    redisLibuvEvents *p = privdata;
    redisAsyncContext *ac = p->context;
    evd_redis_t *r = ac ? ac->data : NULL;
    /* Not while connecting (hiredis learns that the connect is done by writability), nor for
     * a write that left bytes behind. */
    if (r && r->ac == ac && !r->in_write && !r->closing && (ac->c.flags & REDIS_CONNECTED) &&
        !(p->events & UV_WRITABLE)) {
        /* Neither fails on an open handle with a callback. */
        uv_prepare_start(&r->write_prepare, on_write_prepare);
        uv_check_start(&r->write_check, on_write_check);
        return;
    }
    poll_update(p, UV_WRITABLE, 0);
}

static void ev_del_write(void *privdata)
{
    redisLibuvEvents *p = privdata;
    evd_redis_t *r = p->context ? p->context->data : NULL;
    if (r && r->ac == p->context)
        cancel_write(r);
    poll_update(p, 0, UV_WRITABLE);
}

static bool is_ip_literal(const char *host)
{
    unsigned char buf[16];
    return uv_inet_pton(AF_INET, host, buf) == 0 || uv_inet_pton(AF_INET6, host, buf) == 0;
}

static void set_addr(evd_redis_t *r)
{
    if (r->cfg.unix_path)
        snprintf(r->addr, sizeof(r->addr), "%s", r->cfg.unix_path);
    else if (strchr(r->ip, ':'))
        snprintf(r->addr, sizeof(r->addr), "[%s]:%d", r->ip, r->cfg.port);
    else
        snprintf(r->addr, sizeof(r->addr), "%s:%d", r->ip, r->cfg.port);
}

static void start_connect(evd_redis_t *r)
{
    set_addr(r);
    redisAsyncContext *ac =
        r->cfg.unix_path ? redisAsyncConnectUnix(r->cfg.unix_path) : redisAsyncConnect(r->ip, r->cfg.port);
    if (!ac) {
        reset(r, "connect %s failed: out of memory", r->addr);
        return;
    }
    if (ac->err) {
        char msg[ERR_LEN];
        snprintf(msg, sizeof(msg), "%s", ac->errstr);
        redisAsyncFree(ac); /* not attached, never connected: freed at once, no callbacks */
        reset(r, "connect %s failed: %s", r->addr, msg);
        return;
    }
    ac->data = r;
    if (redisLibuvAttach(ac, r->loop) != REDIS_OK) {
        /* On failure the adapter leaves its hooks set with no private data; cleanup would then
         * dereference NULL. */
        ac->ev.addRead = ac->ev.delRead = ac->ev.addWrite = ac->ev.delWrite = NULL;
        ac->ev.cleanup = NULL;
        redisAsyncFree(ac);
        reset(r, "connect %s failed: cannot watch the socket", r->addr);
        return;
    }
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    /* After attaching: setting the connect callback arms the write watcher that detects the
     * end of the non-blocking connect. */
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->ac = ac;
    r->nctx++;
    timeout_start(r);
}

static void start_resolve(evd_redis_t *r)
{
    if (r->stale) { /* still running: its answer is as good as a new one's */
        r->resolve = r->stale;
        r->stale = NULL;
        timeout_start(r);
        return;
    }
    uv_getaddrinfo_t *req = malloc(sizeof(*req));
    if (!req) {
        reset(r, "resolve %s failed: out of memory", r->cfg.host);
        return;
    }
    req->data = r;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(r->loop, req, on_resolved, r->cfg.host, NULL, &hints);
    if (rc != 0) {
        free(req);
        reset(r, "resolve %s failed: %s", r->cfg.host, uv_strerror(rc));
        return;
    }
    r->resolve = req;
    r->nreqs++;
    timeout_start(r);
}

/* Enters `next` and does what entering it means. */
static void advance(evd_redis_t *r, state_t next)
{
    r->state = next;
    switch (next) {
    case ST_DISCONNECTED:
        if (r->cfg.unix_path) {
            advance(r, ST_CONNECTING);
        } else if (is_ip_literal(r->cfg.host)) {
            snprintf(r->ip, sizeof(r->ip), "%s", r->cfg.host);
            advance(r, ST_CONNECTING);
        } else {
            advance(r, ST_RESOLVING);
        }
        break;
    case ST_RESOLVING: start_resolve(r); break;
    case ST_CONNECTING: start_connect(r); break;
    case ST_AUTH: {
        /* A username alone (redis://cache@host, a nopass ACL user) still authenticates, with an
         * empty password: skipping AUTH would run as the default user. */
        if (!r->cfg.password && !r->cfg.username) {
            advance(r, ST_SELECT);
            break;
        }
        const char *argv[3] = {"AUTH"};
        size_t argvlen[3] = {4};
        size_t argc = 1;
        if (r->cfg.username) {
            argv[argc] = r->cfg.username;
            argvlen[argc++] = strlen(r->cfg.username);
        }
        argv[argc] = r->cfg.password ? r->cfg.password : "";
        argvlen[argc] = strlen(argv[argc]);
        argc++;
        /* Not sent (out of memory): the connect timeout resets the connection (not now: this
         * may run in hiredis's connect callback, which must not free the context). */
        if (send_cmd(r, CMD_AUTH, NULL, argc, argv, argvlen) < 0)
            timeout_start(r);
        break;
    }
    case ST_SELECT: {
        if (r->cfg.db == 0) {
            advance(r, ST_READY);
            break;
        }
        char db[16];
        snprintf(db, sizeof(db), "%d", r->cfg.db);
        const char *argv[2] = {"SELECT", db};
        size_t argvlen[2] = {6, strlen(db)};
        if (send_cmd(r, CMD_SELECT, NULL, 2, argv, argvlen) < 0)
            timeout_start(r);
        break;
    }
    case ST_READY:
        uv_timer_stop(&r->conn_timer);
        if (r->ever_ready)
            r->stats.reconnects++;
        r->ever_ready = true;
        r->conn_failures = 0;
        r->down_logged = false;
        r->last_error[0] = '\0';
        EVD_LOG(EVD_LOG_INFO, "connected", F_STR("target", r->cfg.name), F_STR("addr", r->addr),
                F_INT("db", r->cfg.db));
        /* Send what waits from the loop, not from inside hiredis's connect handling, where a
         * job callback closing the target would free the context under hiredis's feet. */
        uv_timer_start(&r->fill_timer, on_kick_timer, 0, 0);
        break;
    case ST_BACKOFF: {
        int64_t d =
            evd_backoff_delay(r->opts.initial_backoff_ms, r->opts.max_backoff_ms, r->conn_failures, rnd_unit(r));
        uv_timer_start(&r->conn_timer, on_conn_timer, (uint64_t)d, 0);
        /* What waited for this connection now fails its attempt (counted: a Redis that stays
         * down exhausts max_attempts), from the loop like the kick on ST_READY. */
        if (r->queue || r->backoff)
            uv_timer_start(&r->fill_timer, on_kick_timer, 0, 0);
        break;
    }
    case ST_CLOSED: break;
    }
}

static void on_conn_timer(uv_timer_t *t)
{
    evd_redis_t *r = evd_container_of(t, evd_redis_t, conn_timer);
    switch (r->state) {
    case ST_BACKOFF: advance(r, ST_DISCONNECTED); break;
    case ST_RESOLVING:
    case ST_CONNECTING:
    case ST_AUTH:
    case ST_SELECT:
    case ST_READY: reset(r, "timeout after %d ms", r->cfg.timeout_ms); break;
    case ST_DISCONNECTED:
    case ST_CLOSED: return;
    }
    end(r);
}

/* ---- batches ------------------------------------------------------------------------------- */

/* Open-addressed index of strings kept elsewhere (v/lens); slots hold position + 1. */
typedef struct dedup {
    uint32_t *tab;
    size_t mask;
} dedup_t;

static int dedup_init(dedup_t *d, size_t n)
{
    if (n >= UINT32_MAX / 4)
        return -ENOMEM;
    size_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    d->tab = calloc(cap, sizeof(*d->tab));
    d->mask = cap - 1;
    return d->tab ? 0 : -ENOMEM;
}

/* True when s is among the strings indexed so far; otherwise indexes it at position `at`, which
 * the caller fills right after. */
static bool dedup_seen(dedup_t *d, const char *const *v, const size_t *lens, const char *s, size_t n, size_t at)
{
    size_t i = (size_t)evd_hash(s, n) & d->mask;
    while (d->tab[i]) {
        size_t j = d->tab[i] - 1;
        if (lens[j] == n && memcmp(v[j], s, n) == 0)
            return true;
        i = (i + 1) & d->mask;
    }
    d->tab[i] = (uint32_t)at + 1;
    return false;
}

static void batch_free(batch_t *b)
{
    if (!b)
        return;
    free(b->argv);
    free(b->argvlen);
    free(b->pats);
    free(b->patlen);
    free(b->store);
    free(b);
}

/* Sizes argv for up to nkeys distinct keys in commands of `chunk` keys, and its dedup index. */
static int batch_alloc_keys(batch_t *b, dedup_t *d, size_t nkeys, size_t chunk)
{
    b->chunk = chunk;
    if (!nkeys)
        return 0;
    size_t n = nkeys + (nkeys + chunk - 1) / chunk;
    b->argv = malloc(n * sizeof(*b->argv));
    b->argvlen = malloc(n * sizeof(*b->argvlen));
    if (!b->argv || !b->argvlen)
        return -ENOMEM;
    return dedup_init(d, nkeys);
}

static void batch_add_key(batch_t *b, dedup_t *d, const char *k, size_t n)
{
    bool head = b->nkeys % b->chunk == 0;
    if (dedup_seen(d, b->argv, b->argvlen, k, n, b->argc + head))
        return;
    if (head) {
        b->argv[b->argc] = UNLINK;
        b->argvlen[b->argc++] = sizeof(UNLINK) - 1;
    }
    b->argv[b->argc] = k;
    b->argvlen[b->argc++] = n;
    b->nkeys++;
}

/* Takes jobs from the head of the queue up to max_keys keys (patterns count as keys here),
 * always at least one job. NULL on allocation failure, with the queue untouched. */
static batch_t *form_batch(evd_redis_t *r)
{
    size_t max = (size_t)r->opts.max_keys, items = 0, nk = 0, np = 0, nj = 0;
    evd_job_t *last = NULL;
    for (evd_job_t *j = r->queue; j; j = j->next) {
        size_t it = j->nkeys + j->npatterns;
        if (nj && items + it > max)
            break;
        items += it;
        nk += j->nkeys;
        np += j->npatterns;
        nj++;
        last = j;
    }
    dedup_t dk = {0}, dp = {0};
    batch_t *b = calloc(1, sizeof(*b));
    if (!b || batch_alloc_keys(b, &dk, nk, max) < 0)
        goto fail;
    if (np) {
        b->pats = malloc(np * sizeof(*b->pats));
        b->patlen = malloc(np * sizeof(*b->patlen));
        if (!b->pats || !b->patlen || dedup_init(&dp, np) < 0)
            goto fail;
    }
    b->jobs = r->queue;
    b->jobs_tail = last;
    b->njobs = nj;
    r->queue = last->next;
    if (!r->queue)
        r->queue_tail = NULL;
    last->next = NULL;
    r->queued_items -= items;
    for (evd_job_t *j = b->jobs; j; j = j->next) {
        for (size_t i = 0; i < j->nkeys; i++)
            batch_add_key(b, &dk, j->keys[i], strlen(j->keys[i]));
        for (size_t i = 0; i < j->npatterns; i++) {
            const char *p = j->patterns[i];
            size_t n = strlen(p);
            if (!dedup_seen(&dp, b->pats, b->patlen, p, n, b->npats)) {
                b->pats[b->npats] = p;
                b->patlen[b->npats++] = n;
            }
        }
    }
    free(dk.tab);
    free(dp.tab);
    return b;
fail:
    free(dk.tab);
    free(dp.tab);
    batch_free(b);
    return NULL;
}

static void done_push(evd_redis_t *r, batch_t *b, int status)
{
    b->status = status;
    b->next = NULL;
    if (r->done_tail)
        r->done_tail->next = b;
    else
        r->done = b;
    r->done_tail = b;
}

static void scan_detach(evd_redis_t *r, const batch_t *b)
{
    for (scan_t *s = r->scans; s; s = s->next) {
        waiters_remove(&s->cur, b);
        waiters_remove(&s->more, b);
    }
}

static void inflight_remove(evd_redis_t *r, batch_t *b)
{
    for (batch_t **p = &r->inflight; *p; p = &(*p)->next)
        if (*p == b) {
            *p = b->next;
            b->next = NULL;
            r->ninflight--;
            return;
        }
}

/* The attempt failed (b->error says why): back off, or give up after max_attempts. The batch
 * keeps its jobs and argv and goes again as a whole. */
static void attempt_failed(evd_redis_t *r, batch_t *b)
{
    inflight_remove(r, b);
    if (b->scans_left) {
        /* Scans it started run on without it; its retry waits for a later pass. */
        scan_detach(r, b);
        b->scans_left = 0;
    }
    if (r->retired) { /* handed back to the owner, for the target that replaced this one */
        done_push(r, b, EVD_REDIS_MOVED);
        return;
    }
    if (b->attempts >= r->opts.max_attempts) {
        done_push(r, b, -EIO);
        return;
    }
    int64_t delay = evd_backoff_delay(r->opts.initial_backoff_ms, r->opts.max_backoff_ms, b->attempts, rnd_unit(r));
    r->stats.retries++;
    /* attempt= is the attempt that failed; delay_ms is the wait before the next one. */
    EVD_LOG(EVD_LOG_WARN, "retry", F_STR("target", r->cfg.name), F_INT("attempt", b->attempts),
            F_INT("delay_ms", delay), F_INT("keys", b->nkeys), F_INT("patterns", b->npats), F_STR("error", b->error));
    b->due = uv_now(r->loop) + (uint64_t)delay;
    /* Tell the owner once that these jobs wait in backoff (it releases its outbox claim). The
     * callback must not submit or close; it only takes note. */
    if (b->attempts == 1)
        for (evd_job_t *j = b->jobs; j; j = j->next)
            r->cb(j, EVD_REDIS_RETRYING, b->error, r->ud);
    batch_t **p = &r->backoff;
    while (*p && (*p)->due <= b->due)
        p = &(*p)->next;
    b->next = *p;
    *p = b;
}

static void log_invalidated(evd_redis_t *r, const batch_t *b)
{
    if (EVD_LOG_INFO < evd_log_min_level)
        return;
    evd_set_t seen = {0};
    evd_buf_t tables = {0};
    double min_ts = 0;
    for (const evd_job_t *j = b->jobs; j; j = j->next) {
        if (j->ts > 0 && (min_ts == 0 || j->ts < min_ts))
            min_ts = j->ts;
        if (!j->table)
            continue;
        size_t n = strlen(j->table);
        int rc = evd_set_add(&seen, j->table, n);
        if (rc < 0 ||
            (rc == 1 && ((tables.len && evd_buf_putc(&tables, ',') < 0) || evd_buf_append(&tables, j->table, n) < 0)))
            break; /* out of memory: log the tables gathered so far */
    }
    char lag[32];
    evd_field_t f[8];
    size_t n = 0;
    f[n++] = F_STR("target", r->cfg.name);
    f[n++] = F_STR("tables", tables.data ? tables.data : "");
    f[n++] = F_INT("changes", b->njobs);
    f[n++] = F_INT("keys", b->nkeys);
    f[n++] = F_INT("patterns", b->npats);
    if (min_ts > 0) {
        snprintf(lag, sizeof(lag), "%.1f", evd_now_wall_ms() - min_ts);
        f[n++] = F_RAW("lag_ms", lag);
    }
    f[n] = (evd_field_t){0};
    evd_log_fields(EVD_LOG_INFO, "invalidated", f);
    evd_set_free(&seen);
    evd_buf_free(&tables);
}

static void redelete_add(evd_redis_t *r, const batch_t *b);

static void confirm(evd_redis_t *r, batch_t *b)
{
    inflight_remove(r, b);
    r->stats.batches++;
    r->stats.keys += b->nkeys;
    log_invalidated(r, b);
    if (r->opts.redelete_after_ms > 0 && b->nkeys)
        redelete_add(r, b);
    done_push(r, b, 0);
}

/* Finishes the attempt once every command it sent has answered: confirmed when nothing failed
 * and every scan it waits on completed; failed as soon as its own replies are in and something
 * failed (it does not wait for scans then). */
static void batch_check(evd_redis_t *r, batch_t *b)
{
    if (b->sending || b->outstanding)
        return;
    if (b->error[0])
        attempt_failed(r, b);
    else if (!b->scans_left)
        confirm(r, b);
}

static int scan_want(evd_redis_t *r, batch_t *b, const char *p, size_t n);

static void attempt(evd_redis_t *r, batch_t *b)
{
    b->attempts++;
    b->error[0] = '\0';
    b->outstanding = 0;
    b->scans_left = 0;
    if (r->state != ST_READY) {
        /* Counts as an attempt, so a Redis that stays down exhausts max_attempts. */
        set_error(b->error, "not connected: %s", r->last_error[0] ? r->last_error : "connection in progress");
        attempt_failed(r, b);
        return;
    }
    b->next = r->inflight;
    r->inflight = b;
    r->ninflight++;
    b->sending = true;
    for (size_t i = 0; i < b->argc;) {
        size_t n = b->argc - i < b->chunk + 1 ? b->argc - i : b->chunk + 1;
        if (send_cmd(r, CMD_UNLINK, b, n, b->argv + i, b->argvlen + i) < 0) {
            set_error(b->error, "UNLINK not sent");
            break;
        }
        b->outstanding++;
        i += n;
    }
    for (size_t i = 0; i < b->npats && !b->error[0]; i++) {
        if (scan_want(r, b, b->pats[i], b->patlen[i]) < 0)
            set_error(b->error, "scan of %s not started: out of memory", b->pats[i]);
    }
    b->sending = false;
    batch_check(r, b);
}

/* ---- pattern scans ------------------------------------------------------------------------- */

static void scan_free(scan_t *s)
{
    if (!s)
        return;
    free(s->pattern);
    free(s->cur.v);
    free(s->more.v);
    free(s->argv);
    free(s->argvlen);
    free(s);
}

static void scan_next(evd_redis_t *r, scan_t *s)
{
    const char *argv[6] = {"SCAN", s->cursor, "MATCH", s->pattern, "COUNT", SCAN_COUNT};
    size_t argvlen[6] = {4, strlen(s->cursor), 5, s->len, 5, sizeof(SCAN_COUNT) - 1};
    if (send_cmd(r, CMD_SCAN, s, 6, argv, argvlen) < 0)
        set_error(s->error, "SCAN not sent");
    else
        s->outstanding++;
}

static void scan_pass_end(evd_redis_t *r, scan_t *s)
{
    waiters_t w = s->cur;
    char err[ERR_LEN];
    memcpy(err, s->error, sizeof(err));
    if (!err[0])
        r->stats.patterns++;
    s->cur = s->more;
    s->more = (waiters_t){0};
    if (s->cur.n) {
        scan_pass_start(r, s); /* one more pass, shared by every batch that asked meanwhile */
    } else {
        scan_t **p = &r->scans;
        while (*p != s)
            p = &(*p)->next;
        *p = s->next;
        scan_free(s);
    }
    for (size_t i = 0; i < w.n; i++) {
        batch_t *b = w.v[i];
        b->scans_left--;
        if (err[0] && !b->error[0])
            set_error(b->error, "%s", err);
        batch_check(r, b);
    }
    free(w.v);
}

static void scan_pass_start(evd_redis_t *r, scan_t *s)
{
    strcpy(s->cursor, "0");
    s->cursor_done = false;
    s->error[0] = '\0';
    s->outstanding = 0;
    scan_next(r, s);
    if (!s->outstanding)
        scan_pass_end(r, s);
}

/* b needs pattern p deleted: joins the running pass's successor, or starts a pass. */
static int scan_want(evd_redis_t *r, batch_t *b, const char *p, size_t n)
{
    scan_t *s = r->scans;
    while (s && !(s->len == n && memcmp(s->pattern, p, n) == 0))
        s = s->next;
    if (s) {
        if (waiters_add(&s->more, b) < 0)
            return -ENOMEM;
        b->scans_left++;
        return 0;
    }
    s = calloc(1, sizeof(*s));
    if (!s || !(s->pattern = malloc(n + 1)) || waiters_add(&s->cur, b) < 0) {
        scan_free(s);
        return -ENOMEM;
    }
    memcpy(s->pattern, p, n);
    s->pattern[n] = '\0';
    s->len = n;
    s->next = r->scans;
    r->scans = s;
    b->scans_left++;
    scan_pass_start(r, s);
    return 0;
}

/* One SCAN page: UNLINK its keys (argv points into the reply, which hiredis copies into its
 * output buffer before we return) and ask for the next page in the same write. */
static void scan_page(evd_redis_t *r, scan_t *s, const redisReply *cursor, const redisReply *page)
{
    size_t n = page->elements;
    if (n) {
        if (n + 1 > s->argcap) {
            const char **argv = realloc(s->argv, (n + 1) * sizeof(*argv));
            if (argv)
                s->argv = argv;
            size_t *argvlen = realloc(s->argvlen, (n + 1) * sizeof(*argvlen));
            if (argvlen)
                s->argvlen = argvlen;
            if (!argv || !argvlen) {
                set_error(s->error, "SCAN %s: out of memory", s->pattern);
                return;
            }
            s->argcap = n + 1;
        }
        size_t argc = 0;
        s->argv[argc] = UNLINK;
        s->argvlen[argc++] = sizeof(UNLINK) - 1;
        for (size_t i = 0; i < n; i++) {
            const redisReply *e = page->element[i];
            if (e->type == REDIS_REPLY_STRING) {
                s->argv[argc] = e->str;
                s->argvlen[argc++] = e->len;
            }
        }
        if (argc > 1) {
            if (send_cmd(r, CMD_SCAN_UNLINK, s, argc, s->argv, s->argvlen) < 0) {
                set_error(s->error, "UNLINK not sent");
                return;
            }
            s->outstanding++;
        }
    }
    if (cursor->len == 1 && cursor->str[0] == '0') {
        s->cursor_done = true;
    } else if (cursor->len == 0 || cursor->len >= sizeof(s->cursor)) {
        set_error(s->error, "SCAN %s: bad cursor", s->pattern);
    } else {
        memcpy(s->cursor, cursor->str, cursor->len);
        s->cursor[cursor->len] = '\0';
        scan_next(r, s);
    }
}

static void scan_reply(evd_redis_t *r, scan_t *s, cmd_kind_t kind, const redisReply *reply)
{
    s->outstanding--;
    if (kind == CMD_SCAN_UNLINK) {
        if (reply->type == REDIS_REPLY_INTEGER)
            r->stats.deleted += (uint64_t)reply->integer;
        else
            first_error(s->error, reply, "UNLINK");
    } else if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
               reply->element[0]->type != REDIS_REPLY_STRING || reply->element[1]->type != REDIS_REPLY_ARRAY) {
        first_error(s->error, reply, "SCAN");
    } else if (!s->error[0]) {
        scan_page(r, s, reply->element[0], reply->element[1]);
    }
    if (!s->outstanding && (s->cursor_done || s->error[0]))
        scan_pass_end(r, s);
}

/* ---- deferred re-deletes ------------------------------------------------------------------- */

static void on_redel_timer(uv_timer_t *t);

/* Remembers b's keys for one more UNLINK after redelete_after_ms: a reader that missed the
 * cache just before the delete may write the stale value back right after it. */
static void redelete_add(evd_redis_t *r, const batch_t *b)
{
    evd_buf_t *st = &r->redel_store;
    size_t start = st->len;
    for (size_t i = 0; i < b->argc; i++) {
        if (i % (b->chunk + 1) == 0)
            continue; /* "UNLINK" */
        if (evd_buf_append(st, b->argv[i], b->argvlen[i]) < 0 || evd_buf_putc(st, '\0') < 0)
            goto fail;
    }
    if (r->redel_nsegs == r->redel_segcap) {
        size_t cap = r->redel_segcap ? r->redel_segcap * 2 : 16;
        redel_seg_t *v = realloc(r->redel_segs, cap * sizeof(*v));
        if (!v)
            goto fail;
        r->redel_segs = v;
        r->redel_segcap = cap;
    }
    uint64_t delay = (uint64_t)r->opts.redelete_after_ms;
    r->redel_segs[r->redel_nsegs++] = (redel_seg_t){.end = st->len, .due = uv_now(r->loop) + delay};
    if (!uv_is_active((uv_handle_t *)&r->redel_timer))
        uv_timer_start(&r->redel_timer, on_redel_timer, delay, 0);
    return;
fail:
    st->len = start;
    EVD_LOG(EVD_LOG_DEBUG, "redelete_failed", F_STR("target", r->cfg.name), F_INT("keys", b->nkeys),
            F_STR("error", "out of memory"));
}

/* Sends one UNLINK set for the first `end` bytes of the store (deduplicated across batches). */
static void redelete_send(evd_redis_t *r, size_t end)
{
    const char *err = "out of memory";
    size_t nkeys = 0;
    for (size_t i = 0; i < end; i++)
        nkeys += r->redel_store.data[i] == '\0';
    dedup_t d = {0};
    batch_t *b = calloc(1, sizeof(*b));
    if (!b || !(b->store = malloc(end)) || batch_alloc_keys(b, &d, nkeys, (size_t)r->opts.max_keys) < 0)
        goto fail;
    b->redelete = true;
    memcpy(b->store, r->redel_store.data, end);
    for (size_t off = 0; off < end;) {
        size_t n = strlen(b->store + off);
        batch_add_key(b, &d, b->store + off, n);
        off += n + 1;
    }
    free(d.tab);
    d.tab = NULL;
    err = "not connected";
    if (r->state != ST_READY)
        goto fail;
    for (size_t i = 0; i < b->argc;) {
        size_t n = b->argc - i < b->chunk + 1 ? b->argc - i : b->chunk + 1;
        if (send_cmd(r, CMD_UNLINK, b, n, b->argv + i, b->argvlen + i) < 0)
            break;
        b->outstanding++;
        i += n;
    }
    err = "UNLINK not sent";
    if (!b->outstanding)
        goto fail;
    b->next = r->redeletes;
    r->redeletes = b;
    return;
fail:
    EVD_LOG(EVD_LOG_DEBUG, "redelete_failed", F_STR("target", r->cfg.name), F_INT("keys", nkeys), F_STR("error", err));
    free(d.tab);
    batch_free(b);
}

static void on_redel_timer(uv_timer_t *t)
{
    evd_redis_t *r = evd_container_of(t, evd_redis_t, redel_timer);
    uint64_t now = uv_now(r->loop);
    size_t m = 0;
    while (m < r->redel_nsegs && r->redel_segs[m].due <= now)
        m++;
    if (m) {
        size_t end = r->redel_segs[m - 1].end;
        redelete_send(r, end);
        evd_buf_t *st = &r->redel_store;
        memmove(st->data, st->data + end, st->len - end);
        st->len -= end;
        r->redel_nsegs -= m;
        memmove(r->redel_segs, r->redel_segs + m, r->redel_nsegs * sizeof(*r->redel_segs));
        for (size_t i = 0; i < r->redel_nsegs; i++)
            r->redel_segs[i].end -= end;
    }
    if (r->redel_nsegs) {
        uint64_t due = r->redel_segs[0].due;
        uv_timer_start(&r->redel_timer, on_redel_timer, due > now ? due - now : 0, 0);
    }
}

static void unlink_reply(evd_redis_t *r, batch_t *b, const redisReply *reply)
{
    b->outstanding--;
    if (reply->type == REDIS_REPLY_INTEGER)
        r->stats.deleted += (uint64_t)reply->integer;
    else
        first_error(b->error, reply, "UNLINK");
    if (!b->redelete) {
        batch_check(r, b);
        return;
    }
    if (b->outstanding)
        return;
    if (b->error[0])
        EVD_LOG(EVD_LOG_DEBUG, "redelete_failed", F_STR("target", r->cfg.name), F_INT("keys", b->nkeys),
                F_STR("error", b->error));
    batch_t **p = &r->redeletes;
    while (*p != b)
        p = &(*p)->next;
    *p = b->next;
    batch_free(b);
}

/* ---- replies, scheduling, completions ------------------------------------------------------ */

/* An error reply that no retry on this connection can mend. */
static bool conn_error(const redisReply *reply)
{
    static const char *const prefixes[] = {"READONLY", "NOAUTH", "MASTERDOWN"};
    if (reply->type != REDIS_REPLY_ERROR)
        return false;
    for (size_t i = 0; i < EVD_ARRAY_LEN(prefixes); i++) {
        size_t n = strlen(prefixes[i]);
        if (reply->len >= n && strncmp(reply->str, prefixes[i], n) == 0)
            return true;
    }
    return false;
}

static void on_reply(redisAsyncContext *ac, void *reply_, void *privdata)
{
    cmd_t cmd = *(cmd_t *)privdata;
    free(privdata);
    evd_redis_t *r = cmd.r;
    if (cmd.gen != r->gen)
        return; /* from an abandoned connection: its objects are gone */
    const redisReply *reply = reply_;
    if (!reply) {
        /* The context is being freed after an error; its disconnect callback comes later. */
        reset(r, "connection lost: %s", ac->err ? ac->errstr : "closed");
        end(r);
        return;
    }
    r->outstanding--;
    switch (cmd.kind) {
    case CMD_AUTH:
    case CMD_SELECT:
        if (reply->type == REDIS_REPLY_ERROR) {
            /* One reset, also for the errors conn_error() knows (a SELECT without AUTH gets
             * NOAUTH): a second would count the failure twice, doubling the reconnect backoff. */
            reset(r, "%s failed: %.*s", cmd.kind == CMD_AUTH ? "AUTH" : "SELECT", (int)reply->len, reply->str);
            end(r);
            return;
        }
        advance(r, cmd.kind == CMD_AUTH ? ST_SELECT : ST_READY);
        break;
    case CMD_UNLINK: unlink_reply(r, cmd.obj, reply); break;
    case CMD_SCAN:
    case CMD_SCAN_UNLINK: scan_reply(r, cmd.obj, cmd.kind, reply); break;
    }
    if (conn_error(reply)) {
        /* The connection, not the batch, is wrong (a replica after a failover, a lost ACL):
         * a new one resolves the name again and authenticates again. */
        reset(r, "%.*s", (int)reply->len, reply->str);
        end(r);
        return;
    }
    timeout_replied(r);
    end(r);
}

/* Starts what may start: due retries first, then the queue. With
 * no batch in flight the queue goes at once; while one is, it fills up to max_keys or until
 * max_delay_ms, then goes as a further batch in flight (MAX_INFLIGHT at most). Pipelining
 * inside a batch is where the throughput comes from; the queue going the moment nothing is in
 * flight is where the latency comes from. */
static void kick(evd_redis_t *r)
{
    /* While a connection is being made, wait for its outcome (ready, or failed: both kick)
     * rather than spend attempts on it. */
    if (r->state == ST_RESOLVING || r->state == ST_CONNECTING || r->state == ST_AUTH || r->state == ST_SELECT)
        return;
    uint64_t now = uv_now(r->loop);
    while (!r->closing && r->ninflight < MAX_INFLIGHT) {
        if (r->backoff && r->backoff->due <= now) {
            batch_t *b = r->backoff;
            r->backoff = b->next;
            b->next = NULL;
            attempt(r, b);
            continue;
        }
        if (!r->queue)
            break;
        if (r->inflight && r->queued_items < (size_t)r->opts.max_keys && now < r->fill_deadline) {
            uv_timer_start(&r->fill_timer, on_kick_timer, r->fill_deadline - now, 0);
            break;
        }
        batch_t *b = form_batch(r);
        if (!b) {
            EVD_LOG(EVD_LOG_ERROR, "retry", F_STR("target", r->cfg.name), F_INT("delay_ms", r->opts.initial_backoff_ms),
                    F_STR("error", "cannot form a batch: out of memory"));
            uv_timer_start(&r->fill_timer, on_kick_timer, (uint64_t)r->opts.initial_backoff_ms, 0);
            break;
        }
        attempt(r, b);
        /* What is left of the queue fills behind the batch now in flight. */
        r->fill_deadline = now + (uint64_t)r->opts.max_delay_ms;
    }
    if (!r->closing && r->backoff && r->backoff->due > now)
        uv_timer_start(&r->retry_timer, on_kick_timer, r->backoff->due - now, 0);
}

/* Calls back the jobs of finished batches. Re-entrant: a callback may submit or close; only
 * evd_redis_close (force) drains from inside a callback, so a submit from a callback does not
 * recurse. The error string is copied because a nested drain may free its batch. */
static void flush(evd_redis_t *r, bool force)
{
    if (r->flushing && !force)
        return;
    bool outer = r->flushing;
    r->flushing = true;
    while (r->done) {
        batch_t *b = r->done;
        evd_job_t *j = b->jobs;
        if (!j) {
            r->done = b->next;
            if (!r->done)
                r->done_tail = NULL;
            batch_free(b);
            continue;
        }
        b->jobs = j->next;
        j->next = NULL;
        j->attempts = b->attempts;
        int status = b->status;
        char err[ERR_LEN];
        if (status)
            memcpy(err, b->error, sizeof(err));
        r->npending--;
        r->cb(j, status, status ? err : NULL, r->ud);
    }
    r->flushing = outer;
}

static void end(evd_redis_t *r)
{
    kick(r);
    flush(r, false);
}

/* fill_timer and retry_timer: something may be ready to go. */
static void on_kick_timer(uv_timer_t *t)
{
    end(t->data);
}

/* ---- public -------------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    evd_redis_t *r = h->data;
    r->nhandles--;
    maybe_free(r);
}

/* Frees r once nothing can call back into it: its timers are closed, no hiredis context it
 * created is alive and no lookup is pending. Normally that is the last timer's close callback. */
static void maybe_free(evd_redis_t *r)
{
    if (!r->closing || r->nhandles || r->nctx || r->nreqs)
        return;
    void (*closed)(void *) = r->closed_cb;
    void *arg = r->closed_arg;
    evd_buf_free(&r->redel_store);
    free(r->redel_segs);
    cfg_free(&r->cfg);
    free(r);
    if (closed)
        closed(arg);
}

int evd_redis_new(uv_loop_t *loop, const evd_target_cfg_t *cfg, const evd_redis_opts_t *opts, evd_redis_job_cb cb,
                  void *ud, evd_redis_t **out)
{
    *out = NULL;
    evd_redis_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->loop = loop;
    r->cb = cb;
    r->ud = ud;
    if (cfg_copy(&r->cfg, cfg) < 0) {
        cfg_free(&r->cfg);
        free(r);
        return -ENOMEM;
    }
    opts_set(r, opts);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r->rng = splitmix64((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) ^
             splitmix64(((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)r);
    if (!r->rng)
        r->rng = 0x2545f4914f6cdd1dULL;

    uv_timer_t *timers[] = {&r->conn_timer, &r->fill_timer, &r->retry_timer, &r->redel_timer};
    for (size_t i = 0; i < EVD_ARRAY_LEN(timers); i++) {
        int rc = uv_timer_init(loop, timers[i]);
        if (rc != 0) {
            /* Never happens with libuv's timers; freed by the closes of those initialized. */
            r->closing = true;
            r->nhandles = (int)i;
            for (size_t k = 0; k < i; k++)
                uv_close((uv_handle_t *)timers[k], on_handle_closed);
            if (i == 0)
                maybe_free(r);
            return rc;
        }
        timers[i]->data = r;
        r->nhandles++;
    }
    uv_prepare_init(loop, &r->write_prepare); /* neither can fail */
    uv_check_init(loop, &r->write_check);
    r->write_prepare.data = r;
    r->write_check.data = r;
    r->nhandles += 2;
    advance(r, ST_DISCONNECTED);
    *out = r;
    return 0;
}

void evd_redis_submit(evd_redis_t *r, evd_job_t *job)
{
    job->next = NULL;
    job->attempts = 0;
    if (r->closing) {
        r->cb(job, -ECANCELED, "target closed", r->ud);
        return;
    }
    if (!r->queue) {
        r->fill_deadline = uv_now(r->loop) + (r->inflight ? (uint64_t)r->opts.max_delay_ms : 0);
        r->queue = job;
    } else {
        r->queue_tail->next = job;
    }
    r->queue_tail = job;
    r->queued_items += job->nkeys + job->npatterns;
    r->npending++;
    end(r);
}

void evd_redis_set_opts(evd_redis_t *r, const evd_redis_opts_t *opts)
{
    opts_set(r, opts);
}

bool evd_redis_connected(const evd_redis_t *r)
{
    return r->state == ST_READY;
}

const char *evd_redis_last_error(const evd_redis_t *r)
{
    return r->last_error[0] ? r->last_error : NULL;
}

size_t evd_redis_pending(const evd_redis_t *r)
{
    return r->npending;
}

bool evd_redis_idle(const evd_redis_t *r)
{
    return r->npending == 0 && r->redel_nsegs == 0 && !r->redeletes;
}

const evd_redis_stats_t *evd_redis_stats(const evd_redis_t *r)
{
    return &r->stats;
}

const char *evd_redis_name(const evd_redis_t *r)
{
    return r->cfg.name;
}

bool evd_redis_cfg_differs(const evd_redis_t *r, const evd_target_cfg_t *cfg)
{
    evd_target_cfg_t c = {0};
    if (cfg_copy(&c, cfg) < 0) {
        cfg_free(&c);
        return true;
    }
    const evd_target_cfg_t *a = &r->cfg;
    bool differs = !str_eq(a->host, c.host) || a->port != c.port || !str_eq(a->unix_path, c.unix_path) ||
                   a->db != c.db || !str_eq(a->username, c.username) || !str_eq(a->password, c.password) ||
                   a->timeout_ms != c.timeout_ms;
    cfg_free(&c);
    return differs;
}

/* Calls back every queued job with status, error (jobs that never formed a batch). */
static void queue_fail(evd_redis_t *r, int status, const char *error)
{
    evd_job_t *j;
    while ((j = r->queue)) {
        r->queue = j->next;
        j->next = NULL;
        j->attempts = 0;
        r->npending--;
        r->cb(j, status, error, r->ud);
    }
    r->queue_tail = NULL;
    r->queued_items = 0;
}

void evd_redis_retire(evd_redis_t *r)
{
    if (r->retired || r->closing)
        return;
    r->retired = true;
    batch_t *b;
    while ((b = r->backoff)) {
        r->backoff = b->next;
        done_push(r, b, EVD_REDIS_MOVED);
    }
    uv_timer_stop(&r->retry_timer);
    flush(r, false);
    queue_fail(r, EVD_REDIS_MOVED, "target replaced by a config reload");
}

static void cancel_batch(evd_redis_t *r, batch_t *b)
{
    set_error(b->error, "target closed");
    done_push(r, b, -ECANCELED);
}

void evd_redis_close(evd_redis_t *r, void (*closed)(void *arg), void *arg)
{
    if (r->closing)
        return;
    r->closing = true;
    r->closed_cb = closed;
    r->closed_arg = arg;
    teardown(r);
    r->state = ST_CLOSED;
    /* Finished jobs keep their outcome; everything else is cancelled, in order. */
    batch_t *b;
    while ((b = r->inflight)) {
        inflight_remove(r, b);
        cancel_batch(r, b);
    }
    while ((b = r->backoff)) {
        r->backoff = b->next;
        cancel_batch(r, b);
    }
    flush(r, true);
    queue_fail(r, -ECANCELED, "target closed");
    r->redel_nsegs = 0;
    uv_close((uv_handle_t *)&r->conn_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->fill_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->retry_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->redel_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->write_prepare, on_handle_closed);
    uv_close((uv_handle_t *)&r->write_check, on_handle_closed);
}
