/* pg.c - a PostgreSQL connection as an explicit state machine on the libuv loop. */
#include "pg.h"
#include "log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PREPARED 64

typedef enum {
    PG_BACKOFF,    /* waiting on the backoff timer before the next attempt */
    PG_RESOLVING,  /* uv_getaddrinfo for the host name in flight */
    PG_CONNECTING, /* PQconnectPoll handshake in progress */
    PG_LISTENING,  /* LISTEN commands sent, waiting for their result */
    PG_READY,      /* idle or running the query queue */
    PG_CLOSED      /* evd_pg_close called; handles closing */
} pg_state_t;

typedef struct query {
    struct query *next;
    char *sql; /* borrowed from the caller when prepare (cache key), else owned copy */
    int nparams;
    char **params;
    bool prepare;
    int stmt;       /* the slot this query prepared, -1 if none (execute by it, whatever the cache) */
    bool preparing; /* the PREPARE step is in flight */
    evd_pg_result_cb cb;
    void *arg;
} query_t;

/* The poll handle lives on the heap: libpq may change sockets while connecting. */
typedef struct pg_poll {
    uv_poll_t h;
    evd_pg_t *pg;
    int fd;
} pg_poll_t;

struct evd_pg {
    uv_loop_t *loop;
    char *name;
    char *conninfo;
    char **channels;
    size_t nchannels;
    evd_pg_handlers_t h;
    void *ud;

    pg_state_t state;
    PGconn *conn;
    pg_poll_t *poll;
    int poll_events;
    bool paused;
    bool handing_on; /* evd_pg_take_notifies is delivering: a pause then only takes note */
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    bool gai_active;
    char hostaddr[INET6_ADDRSTRLEN];

    query_t *head, *tail;
    PGresult *result;             /* the current query's last result */
    bool busy;                    /* a command was sent and its results are not complete */
    char *prepared[MAX_PREPARED]; /* copies of the prepared statements' SQL (NULL: out of memory) */
    size_t nprepared;

    int backoff_ms;
    bool was_up;      /* logged `connected` since the last `disconnected` */
    bool down_logged; /* this outage's first failure was logged as a warning */
    char last_error[256];
    uint64_t reconnects;
    int closing; /* handles still to close */
    void (*closed)(void *);
    void *closed_arg;
};

static void step(evd_pg_t *pg);
static void start_connect(evd_pg_t *pg);
static void on_backoff_timer(uv_timer_t *t);

static void free_query(query_t *q)
{
    if (!q->prepare)
        free(q->sql);
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
    free(q->params);
    free(q);
}

static void fail_queries(evd_pg_t *pg, const char *why)
{
    query_t *q = pg->head;
    pg->head = pg->tail = NULL;
    while (q) {
        query_t *next = q->next;
        q->cb(NULL, why, q->arg);
        free_query(q);
        q = next;
    }
}

static void poll_closed(uv_handle_t *h)
{
    free(evd_container_of((uv_poll_t *)h, pg_poll_t, h));
}

static void drop_poll(evd_pg_t *pg)
{
    if (pg->poll) {
        uv_close((uv_handle_t *)&pg->poll->h, poll_closed);
        pg->poll = NULL;
    }
}

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == ' '))
        s[--n] = '\0';
    for (char *p = s; *p; p++)
        if (*p == '\n')
            *p = ' ';
}

static void teardown(evd_pg_t *pg);

/* All teardown goes through here: drop the connection, fail queued work, back off. */
EVD_PRINTF(2, 3) static void pg_reset(evd_pg_t *pg, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pg->last_error, sizeof(pg->last_error), fmt, ap);
    va_end(ap);
    trim(pg->last_error);
    teardown(pg);
}

/* pg_reset's work, the reason already in last_error. */
static void teardown(evd_pg_t *pg)
{
    drop_poll(pg);
    if (pg->result) {
        PQclear(pg->result);
        pg->result = NULL;
    }
    pg->busy = false;
    if (pg->conn) {
        PQfinish(pg->conn);
        pg->conn = NULL;
    }
    for (size_t i = 0; i < pg->nprepared; i++) {
        free(pg->prepared[i]);
        pg->prepared[i] = NULL;
    }
    pg->nprepared = 0;
    if (pg->state == PG_CLOSED)
        return;
    /* Once an outage at the default level, saying why (a server down at start, a wrong password,
     * a bad URL), as Redis targets do; each further attempt at debug. */
    if (pg->was_up) {
        EVD_LOG(EVD_LOG_WARN, "disconnected", F_STR("conn", pg->name), F_STR("error", pg->last_error));
        pg->was_up = false;
    } else {
        EVD_LOG(pg->down_logged ? EVD_LOG_DEBUG : EVD_LOG_WARN, "connect_failed", F_STR("conn", pg->name),
                F_STR("error", pg->last_error), F_INT("retry_in_ms", pg->backoff_ms));
    }
    pg->down_logged = true;
    pg->state = PG_BACKOFF;
    fail_queries(pg, pg->last_error);
    if (pg->h.disconnected)
        pg->h.disconnected(pg, pg->last_error, pg->ud);
    if (pg->state != PG_BACKOFF)
        return; /* closed from the callback */
    /* Full jitter between half and the whole of the current step. */
    int delay = pg->backoff_ms / 2 + (int)((unsigned)rand() % (unsigned)(pg->backoff_ms / 2 + 1));
    pg->backoff_ms = pg->backoff_ms * 2 > 5000 ? 5000 : pg->backoff_ms * 2;
    uv_timer_start(&pg->timer, on_backoff_timer, (uint64_t)delay, 0);
}

static void on_backoff_timer(uv_timer_t *t)
{
    start_connect(evd_container_of(t, evd_pg_t, timer));
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    evd_pg_t *pg = evd_container_of(h, pg_poll_t, h)->pg;
    /* While connecting, an error on the socket (a refused connect) is libpq's to read: it says
     * why ("Connection refused", not "bad file descriptor") and goes on to the next host or
     * address of a list, where a reset would start the whole list again. */
    if (status < 0 && pg->state != PG_CONNECTING) {
        pg_reset(pg, "poll error: %s", uv_strerror(status));
        return;
    }
    (void)events;
    step(pg);
}

static int want_poll(evd_pg_t *pg, int events)
{
    int fd = PQsocket(pg->conn);
    if (fd < 0)
        return -EBADF;
    if (pg->poll && pg->poll->fd != fd)
        drop_poll(pg);
    if (!pg->poll) {
        pg_poll_t *p = calloc(1, sizeof(*p));
        if (!p)
            return -ENOMEM;
        int rc = uv_poll_init(pg->loop, &p->h, fd);
        if (rc < 0) {
            free(p);
            return rc;
        }
        p->pg = pg;
        p->fd = fd;
        pg->poll = p;
        pg->poll_events = 0;
    }
    /* Paused: read no notifications, but still the results of a query in flight. */
    if (pg->paused && pg->state == PG_READY && !pg->busy && !pg->head)
        events &= ~UV_READABLE;
    if (events != pg->poll_events || !uv_is_active((uv_handle_t *)&pg->poll->h)) {
        pg->poll_events = events;
        if (events)
            return uv_poll_start(&pg->poll->h, events, on_poll);
        return uv_poll_stop(&pg->poll->h);
    }
    return 0;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    evd_pg_t *pg = evd_container_of(req, evd_pg_t, gai);
    pg->gai_active = false;
    if (pg->state == PG_CLOSED) {
        uv_freeaddrinfo(res);
        if (--pg->closing == 0) {
            void (*closed)(void *) = pg->closed;
            void *arg = pg->closed_arg;
            free(pg);
            if (closed)
                closed(arg);
        }
        return;
    }
    if (status < 0 || !res) {
        uv_freeaddrinfo(res);
        pg_reset(pg, "cannot resolve host: %s", uv_strerror(status));
        return;
    }
    if (res->ai_family == AF_INET6)
        uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, pg->hostaddr, sizeof(pg->hostaddr));
    else
        uv_ip4_name((struct sockaddr_in *)res->ai_addr, pg->hostaddr, sizeof(pg->hostaddr));
    uv_freeaddrinfo(res);
    pg->state = PG_CONNECTING;
    start_connect(pg);
}

/* Server notices (and errors that arrive between queries, such as "terminating connection due
 * to administrator command") go to evictd's log instead of libpq's raw stderr lines. */
static void on_notice(void *arg, const char *message)
{
    evd_pg_t *pg = arg;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s", message);
    trim(msg);
    EVD_LOG(EVD_LOG_WARN, "postgres_notice", F_STR("conn", pg->name), F_STR("message", msg));
}

/* Begins a connection attempt: resolve the host name off the loop first if there is one. */
static void start_connect(evd_pg_t *pg)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(pg->conninfo, &err);
    if (!opts) {
        pg->state = PG_RESOLVING;
        if (err)
            evd_mask_quoted(err);
        pg_reset(pg, "bad connection string: %s", err ? err : "out of memory");
        PQfreemem(err);
        return;
    }
    const char *host = NULL, *hostaddr = NULL, *service = getenv("PGSERVICE");
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, "host") == 0)
            host = o->val;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = o->val;
        else if (strcmp(o->keyword, "service") == 0 && o->val && *o->val)
            service = o->val;
    }
    /* PG* variables: libpq reads them at connect time, not PQconninfoParse; a host name from
     * PGHOST is resolved here too, off the loop (a list of names is left to libpq). Not with a
     * service file, whose host and hostaddr come before the variables (left to libpq). */
    bool no_service = !service || !*service;
    if ((!host || !*host) && no_service)
        host = getenv("PGHOST");
    if ((!hostaddr || !*hostaddr) && no_service)
        hostaddr = getenv("PGHOSTADDR");
    unsigned char tmp[sizeof(struct in6_addr)];
    /* (a host that starts with '/' or '@' is a Unix socket, '@' an abstract one) */
    bool needs_dns = host && *host && host[0] != '/' && host[0] != '@' && !strchr(host, ',') &&
                     !(hostaddr && *hostaddr) && inet_pton(AF_INET, host, tmp) != 1 &&
                     inet_pton(AF_INET6, host, tmp) != 1;
    if (needs_dns && pg->state != PG_CONNECTING) {
        pg->state = PG_RESOLVING;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        int rc = uv_getaddrinfo(pg->loop, &pg->gai, on_resolved, host, NULL, &hints);
        PQconninfoFree(opts);
        if (rc < 0) {
            pg_reset(pg, "cannot resolve host: %s", uv_strerror(rc));
            return;
        }
        pg->gai_active = true;
        return;
    }
    /* Rebuild the parameters, adding the resolved hostaddr so libpq does no blocking lookup. */
    const char *keys[64], *vals[64];
    int n = 0;
    for (PQconninfoOption *o = opts; o->keyword && n < 60; o++) {
        if (!o->val || strcmp(o->keyword, "hostaddr") == 0 || strcmp(o->keyword, "client_encoding") == 0)
            continue;
        keys[n] = o->keyword;
        vals[n++] = o->val;
    }
    /* Payloads, lookup results and keys are UTF-8 whatever the database's encoding (a LATIN1
     * database's text would otherwise arrive as bytes that are not UTF-8: bad input). */
    keys[n] = "client_encoding";
    vals[n++] = "UTF8";
    if (needs_dns) {
        keys[n] = "hostaddr";
        vals[n++] = pg->hostaddr;
    } else if (hostaddr && *hostaddr) {
        keys[n] = "hostaddr";
        vals[n++] = hostaddr;
    }
    keys[n] = NULL;
    vals[n] = NULL;
    pg->state = PG_CONNECTING;
    pg->conn = PQconnectStartParams(keys, vals, 0);
    PQconninfoFree(opts);
    if (!pg->conn) {
        pg_reset(pg, "out of memory");
        return;
    }
    if (PQstatus(pg->conn) == CONNECTION_BAD) {
        pg_reset(pg, "%s", PQerrorMessage(pg->conn));
        return;
    }
    PQsetnonblocking(pg->conn, 1);
    PQsetNoticeProcessor(pg->conn, on_notice, pg);
    int rc = want_poll(pg, UV_WRITABLE);
    if (rc < 0)
        pg_reset(pg, "cannot watch socket: %s", uv_strerror(rc));
}

static bool send_next(evd_pg_t *pg, bool defer);

static void became_ready(evd_pg_t *pg)
{
    pg->state = PG_READY;
    pg->backoff_ms = 100;
    pg->down_logged = false;
    if (!pg->was_up) {
        pg->was_up = true;
        pg->reconnects++;
        EVD_LOG(EVD_LOG_INFO, "connected", F_STR("conn", pg->name), F_STR("server", PQhost(pg->conn)),
                F_STR("port", PQport(pg->conn)));
    }
    if (pg->h.connected)
        pg->h.connected(pg, pg->ud);
}

static void send_listen(evd_pg_t *pg)
{
    if (!pg->nchannels) {
        became_ready(pg);
        return;
    }
    evd_buf_t b = {0};
    for (size_t i = 0; i < pg->nchannels; i++) {
        char *id = PQescapeIdentifier(pg->conn, pg->channels[i], strlen(pg->channels[i]));
        int rc = id ? evd_buf_printf(&b, "LISTEN %s;", id) : -ENOMEM;
        PQfreemem(id);
        if (rc < 0) {
            evd_buf_free(&b);
            pg_reset(pg, "out of memory");
            return;
        }
    }
    pg->state = PG_LISTENING;
    int ok = PQsendQuery(pg->conn, b.data);
    pg->busy = ok;
    evd_buf_free(&b);
    if (!ok)
        pg_reset(pg, "LISTEN failed: %s", PQerrorMessage(pg->conn));
}

/* The statement prepared for sql, by its text: a caller's string may be freed (a config
 * reload) and its address reused by another statement. */
static int prepared_slot(evd_pg_t *pg, const char *sql)
{
    for (size_t i = 0; i < pg->nprepared; i++)
        if (pg->prepared[i] && strcmp(pg->prepared[i], sql) == 0)
            return (int)i;
    return -1;
}

static void on_deferred_reset(uv_timer_t *t)
{
    evd_pg_t *pg = evd_container_of(t, evd_pg_t, timer);
    if (pg->state == PG_READY)
        teardown(pg);
}

/* A failure found inside evd_pg_query: reset from the loop, not inside the caller, whose
 * callback must not run before the call returns (it returned 0: the callback runs later). */
static void defer_reset(evd_pg_t *pg, const char *what, const char *detail)
{
    snprintf(pg->last_error, sizeof(pg->last_error), "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    trim(pg->last_error);
    uv_timer_start(&pg->timer, on_deferred_reset, 0, 0);
}

/* Sends the head query (or its PREPARE step). Returns false after a reset (defer: once one is
 * scheduled). */
static bool send_next(evd_pg_t *pg, bool defer)
{
    query_t *q = pg->head;
    if (!q || pg->state != PG_READY || pg->busy)
        return true;
    int ok;
    if (q->prepare) {
        int slot = q->stmt >= 0 ? q->stmt : prepared_slot(pg, q->sql);
        if (slot < 0 && pg->nprepared < MAX_PREPARED && !q->preparing) {
            char name[16];
            snprintf(name, sizeof(name), "evd%zu", pg->nprepared);
            q->preparing = true;
            ok = PQsendPrepare(pg->conn, name, q->sql, q->nparams, NULL);
            goto sent;
        }
        if (slot >= 0) {
            char name[16];
            snprintf(name, sizeof(name), "evd%d", slot);
            ok = PQsendQueryPrepared(pg->conn, name, q->nparams, (const char *const *)q->params, NULL, NULL, 0);
            goto sent;
        }
    }
    if (q->nparams == 0) /* the simple protocol: may hold several statements */
        ok = PQsendQuery(pg->conn, q->sql);
    else
        ok = PQsendQueryParams(pg->conn, q->sql, q->nparams, NULL, (const char *const *)q->params, NULL, NULL, 0);
sent:
    pg->busy = ok;
    if (!ok) {
        if (defer)
            defer_reset(pg, "send failed", PQerrorMessage(pg->conn));
        else
            pg_reset(pg, "send failed: %s", PQerrorMessage(pg->conn));
        return false;
    }
    return true;
}

/* One query's results are complete: deliver and start the next. */
static void query_done(evd_pg_t *pg)
{
    query_t *q = pg->head;
    PGresult *res = pg->result;
    pg->result = NULL;
    if (!q) {
        PQclear(res);
        return;
    }
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (q->preparing) {
        q->preparing = false;
        if (ok) {
            /* Out of memory: the slot's name stays taken, unused after this query. */
            q->stmt = (int)pg->nprepared;
            pg->prepared[pg->nprepared++] = strdup(q->sql);
            PQclear(res);
            return; /* the execute step goes next, same query */
        }
    }
    pg->head = q->next;
    if (!pg->head)
        pg->tail = NULL;
    char err[256] = "";
    if (!ok) {
        snprintf(err, sizeof(err), "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(pg->conn));
        trim(err);
    }
    q->cb(ok ? res : NULL, ok ? NULL : err, q->arg);
    PQclear(res);
    free_query(q);
}

/* Drives the state machine after socket readiness or a new query. */
static void step(evd_pg_t *pg)
{
    switch (pg->state) {
    case PG_CONNECTING: {
        PostgresPollingStatusType st = PQconnectPoll(pg->conn);
        int rc = 0;
        if (st == PGRES_POLLING_READING)
            rc = want_poll(pg, UV_READABLE);
        else if (st == PGRES_POLLING_WRITING)
            rc = want_poll(pg, UV_WRITABLE);
        else if (st == PGRES_POLLING_FAILED)
            pg_reset(pg, "%s", PQerrorMessage(pg->conn));
        else if (st == PGRES_POLLING_OK)
            send_listen(pg);
        if (rc < 0)
            pg_reset(pg, "cannot watch socket: %s", uv_strerror(rc));
        if (pg->state == PG_CONNECTING || pg->state == PG_BACKOFF)
            return;
        break; /* fall through to flushing the LISTEN */
    }
    case PG_LISTENING:
    case PG_READY: break;
    default: return;
    }

    /* Flush pending output, read input, collect results and notifications. */
    int fl = PQflush(pg->conn);
    if (fl < 0) {
        pg_reset(pg, "write failed: %s", PQerrorMessage(pg->conn));
        return;
    }
    if (!PQconsumeInput(pg->conn)) {
        /* What libpq read before the connection broke still goes out: notifications held while
         * the listener was paused (backpressure) would be lost with it, and a notify-only
         * change has nowhere else to come from. */
        evd_pg_take_notifies(pg);
        if (pg->state == PG_READY || pg->state == PG_LISTENING)
            pg_reset(pg, "%s", PQerrorMessage(pg->conn));
        return;
    }
    for (int guard = 0; guard < 1000000; guard++) {
        if (PQisBusy(pg->conn))
            break;
        PGresult *res = PQgetResult(pg->conn);
        if (!res) {
            /* End of a command's results (or nothing in flight). */
            if (!pg->busy)
                break;
            pg->busy = false;
            if (pg->state == PG_LISTENING) {
                if (pg->result && PQresultStatus(pg->result) != PGRES_COMMAND_OK) {
                    char why[256];
                    snprintf(why, sizeof(why), "LISTEN failed: %s", PQresultErrorMessage(pg->result));
                    pg_reset(pg, "%s", why);
                    return;
                }
                PQclear(pg->result);
                pg->result = NULL;
                became_ready(pg);
                if (pg->state != PG_READY)
                    return;
            } else {
                query_done(pg);
                if (pg->state != PG_READY)
                    return;
            }
            if (!send_next(pg, false))
                return;
            if (!pg->busy)
                break;
            continue;
        }
        /* Keep the last result; an error result wins over later ones. */
        if (pg->result && PQresultStatus(pg->result) == PGRES_FATAL_ERROR) {
            PQclear(res);
        } else {
            PQclear(pg->result);
            pg->result = res;
        }
    }
    PGnotify *n;
    /* Paused (backpressure): leave the rest in libpq until evd_pg_pause(pg, false). */
    while (pg->state == PG_READY && !pg->paused && (n = PQnotifies(pg->conn)) != NULL) {
        if (pg->h.notify)
            pg->h.notify(pg, n->relname, n->extra, strlen(n->extra), pg->ud);
        PQfreemem(n);
    }
    if (pg->state != PG_READY && pg->state != PG_LISTENING)
        return;
    fl = PQflush(pg->conn);
    if (fl < 0) {
        pg_reset(pg, "write failed: %s", PQerrorMessage(pg->conn));
        return;
    }
    int rc = want_poll(pg, UV_READABLE | (fl == 1 ? UV_WRITABLE : 0));
    if (rc < 0)
        pg_reset(pg, "cannot watch socket: %s", uv_strerror(rc));
}

int evd_pg_new(uv_loop_t *loop, const char *name, const char *conninfo, char *const *channels, size_t nchannels,
               const evd_pg_handlers_t *h, void *ud, evd_pg_t **out)
{
    evd_pg_t *pg = calloc(1, sizeof(*pg));
    if (!pg)
        return -ENOMEM;
    pg->loop = loop;
    pg->h = *h;
    pg->ud = ud;
    pg->backoff_ms = 100;
    pg->name = strdup(name);
    pg->conninfo = strdup(conninfo);
    if (nchannels)
        pg->channels = calloc(nchannels, sizeof(char *));
    if (!pg->name || !pg->conninfo || (nchannels && !pg->channels))
        goto fail;
    for (size_t i = 0; i < nchannels; i++) {
        if (!(pg->channels[i] = strdup(channels[i])))
            goto fail;
        pg->nchannels++;
    }
    uv_timer_init(loop, &pg->timer);
    pg->state = PG_BACKOFF;
    uv_timer_start(&pg->timer, on_backoff_timer, 0, 0);
    *out = pg;
    return 0;
fail:
    for (size_t i = 0; i < pg->nchannels; i++)
        free(pg->channels[i]);
    free(pg->channels);
    free(pg->name);
    free(pg->conninfo);
    free(pg);
    return -ENOMEM;
}

/* Queues a query: last, or (next) right after the one in flight, before any other waiting. */
static int queue_query(evd_pg_t *pg, const char *sql, int nparams, const char *const *params, bool prepare,
                       evd_pg_result_cb cb, void *arg, bool next)
{
    if (pg->state != PG_READY)
        return -ENOTCONN;
    query_t *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->prepare = prepare;
    q->stmt = -1;
    q->sql = prepare ? (char *)sql : strdup(sql);
    q->params = nparams ? calloc((size_t)nparams, sizeof(char *)) : NULL;
    q->cb = cb;
    q->arg = arg;
    if (!q->sql || (nparams && !q->params)) {
        free_query(q);
        return -ENOMEM;
    }
    for (int i = 0; i < nparams; i++) {
        if (params[i] && !(q->params[i] = strdup(params[i]))) {
            q->nparams = i;
            free_query(q);
            return -ENOMEM;
        }
    }
    q->nparams = nparams;
    bool idle = pg->head == NULL;
    if (next && pg->head) {
        /* The head is in flight while busy; between two queries (a callback) it is the next. */
        query_t **at = pg->busy ? &pg->head->next : &pg->head;
        q->next = *at;
        *at = q;
        if (!q->next)
            pg->tail = q;
    } else if (pg->tail) {
        pg->tail->next = q;
        pg->tail = q;
    } else {
        pg->head = pg->tail = q;
    }
    if (idle && send_next(pg, true)) {
        int fl = PQflush(pg->conn);
        if (fl < 0)
            defer_reset(pg, "write failed", PQerrorMessage(pg->conn));
        else if (want_poll(pg, UV_READABLE | (fl == 1 ? UV_WRITABLE : 0)) < 0)
            defer_reset(pg, "cannot watch socket", NULL);
    }
    return 0;
}

int evd_pg_query(evd_pg_t *pg, const char *sql, int nparams, const char *const *params, bool prepare,
                 evd_pg_result_cb cb, void *arg)
{
    return queue_query(pg, sql, nparams, params, prepare, cb, arg, false);
}

int evd_pg_query_next(evd_pg_t *pg, const char *sql, evd_pg_result_cb cb, void *arg)
{
    return queue_query(pg, sql, 0, NULL, false, cb, arg, true);
}

bool evd_pg_ready(const evd_pg_t *pg)
{
    return pg->state == PG_READY;
}

bool evd_pg_busy(const evd_pg_t *pg)
{
    return pg->head != NULL;
}

const char *evd_pg_last_error(const evd_pg_t *pg)
{
    return pg->last_error[0] ? pg->last_error : NULL;
}

uint64_t evd_pg_reconnects(const evd_pg_t *pg)
{
    return pg->reconnects;
}

void evd_pg_pause(evd_pg_t *pg, bool paused)
{
    if (pg->paused == paused)
        return;
    pg->paused = paused;
    if (pg->state == PG_READY && !pg->handing_on) {
        if (!paused) {
            step(pg); /* deliver what arrived while paused */
            return;
        }
        if (want_poll(pg, UV_READABLE) < 0)
            pg_reset(pg, "cannot watch socket");
    }
}

void evd_pg_take_notifies(evd_pg_t *pg)
{
    PGnotify *n;
    pg->handing_on = true; /* the callback may pause: all of them still go (the socket may be gone) */
    while (pg->state == PG_READY && (n = PQnotifies(pg->conn)) != NULL) {
        if (pg->h.notify)
            pg->h.notify(pg, n->relname, n->extra, strlen(n->extra), pg->ud);
        PQfreemem(n);
    }
    pg->handing_on = false;
}

static void handle_closed(uv_handle_t *h)
{
    evd_pg_t *pg = h->data;
    if (--pg->closing > 0)
        return;
    void (*closed)(void *) = pg->closed;
    void *arg = pg->closed_arg;
    free(pg);
    if (closed)
        closed(arg);
}

void evd_pg_close(evd_pg_t *pg, void (*closed)(void *arg), void *arg)
{
    if (pg->state == PG_CLOSED)
        return;
    pg->state = PG_CLOSED;
    pg->closed = closed;
    pg->closed_arg = arg;
    pg_reset(pg, "closed");
    fail_queries(pg, "connection closed");
    for (size_t i = 0; i < pg->nchannels; i++)
        free(pg->channels[i]);
    free(pg->channels);
    free(pg->name);
    free(pg->conninfo);
    pg->closing = 1 + (pg->gai_active ? 1 : 0);
    if (pg->gai_active)
        uv_cancel((uv_req_t *)&pg->gai);
    pg->timer.data = pg;
    uv_close((uv_handle_t *)&pg->timer, handle_closed);
}
