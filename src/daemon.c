/* daemon.c - `evictd run`: notification -> change -> keys -> Redis batches -> ack, on one loop. */
#include "daemon.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "config.h"
#include "deadletter.h"
#include "http.h"
#include "metrics.h"
#include "log.h"
#include "payload.h"
#include "pg.h"
#include "redis.h"
#include "rules.h"

#define CLAIM_ROWS 1000
#define LINGER_MS 1 /* wait after an empty claim before setting the idle flag ... */
#define LINGER_MIN_ROWS 4.0 /* ... when rows have been arriving at least this fast per LINGER_MS */
#define LAG_SAMPLES 8192
#define RESTART_BACK 1000 /* ids below the lowest a pass found where the next pass starts */

/* SQL the daemon runs. Claims and acks go through their own connection, never the LISTEN one. */
static const char SQL_COMMIT[] = "COMMIT";
/* Set up once per connection of "outbox": claims and acks are then one round trip each
 * (BEGIN + claim, delete + COMMIT), sent as one simple query whose only parameters are ids
 * and counts that evictd prints itself. The acks do not wait for their WAL flush: an ack lost
 * in a crash only brings its rows back, and deleting their keys again is harmless. */
static const char SQL_CLAIM_SETUP[] =
    "SET synchronous_commit = off; "
    "PREPARE evictd_claim(bigint, bigint[], int) AS "
    "SELECT id, payload FROM evictd.outbox WHERE id > $1 AND id <> ALL($2) "
    "ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED; "
    "PREPARE evictd_ack(bigint[]) AS DELETE FROM evictd.outbox WHERE id = ANY($1)";
static const char SQL_PEEK[] =
    "SELECT id, payload FROM evictd.outbox WHERE id > $1 ORDER BY id LIMIT $2";
/* A claim that was released (retry backoff) acks only rows no other replica has locked. */
static const char SQL_ACK_RELEASED[] =
    "DELETE FROM evictd.outbox WHERE id IN (SELECT id FROM evictd.outbox "
    "WHERE id = ANY($1::bigint[]) FOR UPDATE SKIP LOCKED)";
/* Sets the idle flag in the same round trip as the claim that looks once more after it. */
static const char SQL_IDLE[] = "SELECT pg_catalog.setval('evictd.idle', 1); ";
static const char SQL_WATCHES[] =
    "SELECT n.nspname, c.relname, array_to_string(w.columns, ','), w.durable "
    "FROM evictd.watches w JOIN pg_catalog.pg_class c ON c.oid = w.tbl "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

/* A config shared by the work that started under it (reload swaps the current one). */
typedef struct cfgref {
    evd_config_t *cfg;
    int refs;
} cfgref_t;

typedef struct daemon daemon_t;
typedef struct unit unit_t;

/* A connection that claims and acknowledges outbox rows. There are two: while one's batch is
 * in flight (its transaction open), the other can claim the next rows. One claim query runs at
 * a time. */
typedef struct claimer {
    daemon_t *d;
    evd_pg_t *pg;
    unit_t *open;          /* the unit whose transaction is open on pg */
    bool setup;            /* SQL_CLAIM_SETUP succeeded (or is queued) on this connection */
} claimer_t;

#define NCLAIMERS 2

/* One change in memory. Most changes are expanded as soon as they are parsed (from a scratch
 * parse) and held as one allocation: this struct, then its jobs, their key and pattern
 * pointers, and the strings (table, keys, patterns, payload). A change whose rules need lookups
 * keeps its parse (ch) until the unit's lookups are back, and is then replaced by its expanded
 * form. */
typedef struct rec {
    unit_t *unit;
    evd_change_t *ch;      /* the parse, only while waiting for lookups */
    const char *raw;       /* the payload text (dead letters re-parse it), or NULL */
    size_t rawlen;
    const char *table;     /* "schema.table", or NULL before it is known */
    int64_t id;            /* outbox id or -1 */
    double ts;             /* the change's ts (epoch ms) or 0 */
    evd_op_t op;           /* 0 for bad input */
    bool finished;         /* bad input or unmatched: done before expansion */
    bool expanded;         /* jobs (if any) are built */
    int outstanding;       /* jobs not called back */
    size_t njobs;
    evd_job_t *jobs;       /* njobs entries */
    int *job_target;       /* target index per job */
} rec_t;

/* Changes read together: one outbox claim, or the notifications of one loop iteration. */
struct unit {
    daemon_t *d;
    cfgref_t *cfg;
    bool claim;            /* outbox rows: ack when done */
    claimer_t *cl;         /* the connection that claimed them */
    bool in_tx;            /* the claim's transaction is still open */
    bool released;         /* the claim was released (retry backoff): ack with SKIP LOCKED */
    rec_t **recs;
    size_t nrecs, cap;
    size_t weight;         /* row images held: what batch.max_pending counts */
    int outstanding;       /* recs not finished, +1 until the unit is expanded */
    int lookups_pending;   /* lookups in flight, +1 until the unit is complete (unit_start) */
    evd_buf_t dl;          /* retries_exhausted / shutdown lines */
    evd_buf_t dl_bad;      /* bad-input lines */
    int dl_writes;         /* dead-letter writes in flight */
    /* lookup results of this unit */
    struct lres *lres;
    unit_t *next;          /* in the daemon's list of live units */
    unit_t *prev;
};

typedef struct lres {
    struct lres *next;
    const evd_rule_t *rule;
    size_t lookup;
    char *argkey;          /* args joined by \x1f */
    evd_lookup_vals_t vals;
    bool done;
} lres_t;

typedef struct target {
    evd_redis_t *r;
    char *name;
} target_t;

struct daemon {
    uv_loop_t *loop;
    evd_run_opts_t opts;
    cfgref_t *cfg;
    evd_pg_t *listen;
    claimer_t cl[NCLAIMERS]; /* cl[0] also reads evictd.watches and the backlog */
    claimer_t *claim_cl;   /* the claimer of the claim in flight, NULL when none */
    size_t claim_turn;     /* the claimer to try first next time */
    int64_t claim_from;    /* the cursor the claim in flight was sent with */
    int64_t restart;       /* where a pass starts: just below the lowest id found lately */
    bool floor_query;      /* a floor check is in flight (floor_check) */
    uint64_t cursor_gen;   /* bumped when the floor check moves the cursor back ... */
    uint64_t claim_gen;    /* ... and the claim in flight was sent before: it moves no cursor */
    evd_pg_t *lookupc;
    target_t *targets;     /* per current config target */
    size_t ntargets;
    evd_redis_t **retiring; /* old targets draining after a reload */
    size_t nretiring;
    evd_dl_t *dl;
    evd_expansion_t x;     /* scratch: the keys of the change being expanded */
    evd_change_t scratch;  /* scratch: the change being accepted */
    evd_arena_block_t *spare; /* its arena block, kept between changes */

    unit_t *units;         /* live units */
    unit_t *incoming;      /* notifications of this iteration */
    size_t pending;        /* changes in memory */
    bool paused;

    /* outbox claiming */
    int64_t cursor;
    size_t claim_limit;    /* rows the claim in flight asked for */
    double imgs_per_row;   /* row images per outbox row, moving average */
    uint64_t last_trim;    /* loop time of the last malloc_trim */
    bool lingered;         /* an empty claim was retried once before setting the idle flag */
    uint64_t claim_sent;   /* uv_hrtime() when the claim in flight was sent */
    uint64_t last_rows_at; /* uv_hrtime() of the last claim that found rows */
    double rows_per_ms;    /* outbox rows found per ms lately (moving average) */
    uint64_t changes_at_trim;
    uint64_t images_done;  /* row images through the pipeline, for trim_heap */
    bool busy_since_idle;  /* rows found since the idle flag was last set */
    bool idle;             /* the flag is set and the last claim found nothing */
    bool want_idle;        /* the next claim sets the idle flag first */
    bool claim_sets_idle;  /* the claim in flight set it */
    bool want_drain;       /* a doorbell arrived while a claim was running */
    bool watched_loaded;
    evd_set_t watched;     /* "schema.table" of evictd.watches */
    evd_set_t durable;     /* the durably watched ones among them */

    uv_timer_t poll_timer;
    uv_timer_t floor_timer;
    uv_timer_t stats_timer;
    uv_timer_t shutdown_timer;
    uv_check_t check;
    uv_signal_t sigterm, sigint, sighup;
    bool stopping;
    int exit_code;

    /* stats for the current interval and in total */
    uint64_t n_changes, n_keys, n_patterns, n_dead, n_unmatched, n_bad;
    uint64_t t_changes, t_dead;
    uint64_t t_doorbells, t_idle_sets; /* doorbells heard, idle flags set (writers that rang) */
    uint64_t t_claims, t_claimed;      /* claims that found rows, and the rows they found */
    double lags[LAG_SAMPLES];
    size_t nlags;
    uint64_t retries_seen;

    /* /metrics and /readyz */
    evd_metrics_t m;
    evd_http_t *http;
    int64_t backlog;       /* outbox rows between the lowest and highest id, -1 unknown */
    bool backlog_query;    /* a backlog query is in flight */
};

static void maybe_drain(daemon_t *d);
static void unit_finish_rec(unit_t *u);
static void process_incoming(daemon_t *d);

/* ---------------------------------------------------------------- config refs */

static cfgref_t *cfg_get(cfgref_t *c)
{
    c->refs++;
    return c;
}

static void cfg_put(cfgref_t *c)
{
    if (c && --c->refs == 0) {
        evd_config_free(c->cfg);
        free(c);
    }
}

/* ---------------------------------------------------------------- units and records */

static unit_t *unit_new(daemon_t *d, bool claim)
{
    unit_t *u = calloc(1, sizeof(*u));
    if (!u)
        return NULL;
    u->d = d;
    u->claim = claim;
    /* Guards: recs that finish while the unit is still filling must not complete it. */
    u->outstanding = 1;
    u->lookups_pending = 1;
    u->cfg = cfg_get(d->cfg);
    u->next = d->units;
    if (d->units)
        d->units->prev = u;
    d->units = u;
    return u;
}

static void rec_free(rec_t *r)
{
    if (!r)
        return;
    if (r->ch) {
        evd_change_clear(r->ch);
        free(r->ch);
    }
    free(r); /* also holds the jobs and every string */
}

static void lres_free_all(unit_t *u)
{
    lres_t *l = u->lres;
    while (l) {
        lres_t *next = l->next;
        for (size_t i = 0; i < l->vals.n; i++)
            free(l->vals.v[i]);
        free(l->vals.v);
        free(l->argkey);
        free(l);
        l = next;
    }
    u->lres = NULL;
}

static void unit_free(unit_t *u)
{
    daemon_t *d = u->d;
    if (u->prev)
        u->prev->next = u->next;
    else
        d->units = u->next;
    if (u->next)
        u->next->prev = u->prev;
    for (size_t i = 0; i < u->nrecs; i++)
        rec_free(u->recs[i]);
    d->pending -= u->weight;
    d->images_done += u->weight;
    free(u->recs);
    evd_buf_free(&u->dl);
    evd_buf_free(&u->dl_bad);
    lres_free_all(u);
    cfg_put(u->cfg);
    free(u);
}

#define ALIGN8(n) (((n) + 7) & ~(size_t)7)

/* Sizes of one rec's block: the struct, njobs jobs with their target indices, nptrs key and
 * pattern pointers, then nbytes of strings. */
static size_t rec_size(size_t njobs, size_t nptrs, size_t nbytes)
{
    return ALIGN8(sizeof(rec_t)) + njobs * sizeof(evd_job_t) + ALIGN8(njobs * sizeof(int)) +
           nptrs * sizeof(char *) + nbytes;
}

/* A rec in one allocation, with room for njobs jobs, nptrs pointers and nbytes of strings (at
 * *strings); table and the payload (raw, or NULL) are copied in. */
static rec_t *rec_alloc(unit_t *u, int64_t id, const char *table, const char *raw, size_t rawlen,
                        size_t njobs, size_t nptrs, size_t nbytes, char ***ptrs, char **strings)
{
    size_t tlen = table ? strlen(table) + 1 : 0;
    size_t rlen = raw ? rawlen + 1 : 0;
    char *m = malloc(rec_size(njobs, nptrs, nbytes + tlen + rlen));
    if (!m)
        return NULL;
    rec_t *r = (rec_t *)m;
    memset(r, 0, sizeof(*r));
    r->unit = u;
    r->id = id;
    m += ALIGN8(sizeof(rec_t));
    r->jobs = njobs ? (evd_job_t *)m : NULL;
    m += njobs * sizeof(evd_job_t);
    r->job_target = njobs ? (int *)m : NULL;
    m += ALIGN8(njobs * sizeof(int));
    if (ptrs)
        *ptrs = (char **)m;
    m += nptrs * sizeof(char *);
    if (strings)
        *strings = m;
    m += nbytes;
    if (table) {
        memcpy(m, table, tlen);
        r->table = m;
        m += tlen;
    }
    if (raw) {
        memcpy(m, raw, rawlen);
        m[rawlen] = '\0';
        r->raw = m;
        r->rawlen = rawlen;
    }
    return r;
}

/* Adds r to u: it counts as pending until the unit is freed. */
static int unit_push(unit_t *u, rec_t *r)
{
    if (u->nrecs == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 16;
        rec_t **v = realloc(u->recs, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        u->recs = v;
        u->cap = cap;
    }
    u->recs[u->nrecs++] = r;
    u->outstanding++;
    u->d->pending++;
    u->weight++;
    return 0;
}

/* ---------------------------------------------------------------- dead letters */

/* Appends one dead-letter line for rec r (target < 0: bad input). */
static void dl_line(unit_t *u, rec_t *r, const char *reason, int target, const char *error, int attempts)
{
    daemon_t *d = u->d;
    evd_buf_t *b = target < 0 ? &u->dl_bad : &u->dl;
    char ts[40];
    snprintf(ts, sizeof(ts), "%.3f", evd_now_wall_ms());
    int rc = evd_buf_printf(b, "{\"ts\":%s,\"reason\":\"%s\",\"target\":", ts, reason);
    if (target >= 0) {
        const char *tname = u->cfg->cfg->targets[r->job_target[target]].name;
        rc |= evd_buf_json_str(b, tname, strlen(tname));
    } else {
        rc |= evd_buf_puts(b, "null");
    }
    rc |= evd_buf_puts(b, ",\"keys\":[");
    const evd_job_t *job = target >= 0 ? &r->jobs[target] : NULL;
    for (size_t i = 0; job && i < job->nkeys; i++) {
        rc |= evd_buf_puts(b, i ? "," : "");
        rc |= evd_buf_json_str(b, job->keys[i], strlen(job->keys[i]));
    }
    rc |= evd_buf_puts(b, "],\"patterns\":[");
    for (size_t i = 0; job && i < job->npatterns; i++) {
        rc |= evd_buf_puts(b, i ? "," : "");
        rc |= evd_buf_json_str(b, job->patterns[i], strlen(job->patterns[i]));
    }
    rc |= evd_buf_puts(b, "],\"change\":");
    /* The parsed change when it parsed (parsed again from its payload: expanded recs keep only
     * the text), else the raw payload as a string. */
    evd_change_t c;
    char err[64];
    if (r->ch) {
        rc |= evd_change_to_json(r->ch, b);
    } else if (r->op && evd_payload_parse(r->raw, r->rawlen, &c, err, sizeof(err)) == EVD_PAYLOAD_OK) {
        if (c.id < 0)
            c.id = r->id;
        rc |= evd_change_to_json(&c, b);
        evd_change_clear(&c);
    } else {
        rc |= evd_buf_json_str(b, r->raw ? r->raw : "", r->raw ? r->rawlen : 0);
    }
    rc |= evd_buf_puts(b, ",\"error\":");
    rc |= evd_buf_json_str(b, error ? error : "", error ? strlen(error) : 0);
    rc |= evd_buf_printf(b, ",\"attempts\":%d}\n", attempts);
    d->n_dead++;
    evd_metrics_dead_letter(&d->m, reason);
    d->t_dead++;
    if (rc)
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "out of memory building the line"));
    EVD_LOG(EVD_LOG_WARN, "dead_letter", F_STR("reason", reason),
            F_STR("target", target >= 0 ? u->cfg->cfg->targets[r->job_target[target]].name : NULL),
            F_STR("table", r->table), F_INT("id", r->id), F_STR("error", error),
            F_INT("attempts", attempts));
}

/* ---------------------------------------------------------------- acks and unit completion */

static void begin_done(const PGresult *res, const char *err, void *arg);

static void after_ack(const PGresult *res, const char *err, void *arg)
{
    unit_t *u = arg;
    daemon_t *d = u->d;
    if (!res) {
        EVD_LOG(EVD_LOG_WARN, "ack_failed", F_STR("error", err), F_INT("changes", (int64_t)u->nrecs));
        /* A failed delete skips the COMMIT after it: end the aborted transaction (its rows
         * stay in the outbox and are claimed again). */
        if (u->in_tx && evd_pg_query(u->cl->pg, "ROLLBACK", 0, NULL, false, begin_done, NULL) < 0)
            EVD_LOG(EVD_LOG_DEBUG, "rollback_skipped");
    }
    unit_free(u);
    maybe_drain(d);
}

static void ids_param(unit_t *u, evd_buf_t *b)
{
    int rc = evd_buf_putc(b, '{');
    bool first = true;
    for (size_t i = 0; i < u->nrecs && rc == 0; i++) {
        if (u->recs[i]->id < 0)
            continue;
        rc = evd_buf_printf(b, "%s%" PRId64, first ? "" : ",", u->recs[i]->id);
        first = false;
    }
    if (rc == 0)
        rc = evd_buf_putc(b, '}');
    (void)rc;
}

/* Sends DELETE (+ COMMIT when the claim's transaction is open). */
static void unit_send_ack(unit_t *u)
{
    daemon_t *d = u->d;
    if (!u->claim || d->opts.dry_run) {
        if (u->cl && u->cl->open == u)
            u->cl->open = NULL;
        unit_free(u);
        maybe_drain(d);
        return;
    }
    evd_buf_t ids = {0};
    int rc;
    if (u->in_tx) {
        rc = evd_buf_puts(&ids, "EXECUTE evictd_ack('");
        ids_param(u, &ids);
        rc = rc == 0 ? evd_buf_puts(&ids, "'); COMMIT") : rc;
        rc = rc == 0 ? evd_pg_query(u->cl->pg, ids.data, 0, NULL, false, after_ack, u) : rc;
    } else {
        ids_param(u, &ids);
        const char *params[1] = {ids.data};
        rc = evd_pg_query(u->cl->pg, SQL_ACK_RELEASED, 1, params, true, after_ack, u);
    }
    evd_buf_free(&ids);
    if (u->cl->open == u)
        u->cl->open = NULL;
    if (rc == 0) {
        /* The next claim queues behind the ack and goes as soon as it is done. */
        maybe_drain(d);
        return;
    }
    /* Not connected: the rows stay in the outbox and are claimed again (deletes are
     * idempotent, so repeating them is harmless). */
    EVD_LOG(EVD_LOG_WARN, "ack_failed", F_STR("error", "postgres connection down"),
            F_INT("changes", (int64_t)u->nrecs));
    unit_free(u);
    maybe_drain(d);
}

static void dl_written(int status, void *arg)
{
    unit_t *u = arg;
    if (status < 0)
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "write failed"), F_STR("detail", strerror(-status)));
    if (--u->dl_writes == 0)
        unit_send_ack(u);
}

/* Called when a rec finished: when the unit is complete, dead letters first, then the ack. */
static void unit_finish_rec(unit_t *u)
{
    if (--u->outstanding > 0)
        return;
    daemon_t *d = u->d;
    u->dl_writes++;
    if (u->dl.len) {
        u->dl_writes++;
        if (evd_dl_write(d->dl, &u->dl, false, dl_written, u) < 0)
            u->dl_writes--;
    }
    if (u->dl_bad.len) {
        u->dl_writes++;
        if (evd_dl_write(d->dl, &u->dl_bad, true, dl_written, u) < 0)
            u->dl_writes--;
    }
    dl_written(0, u);
}

/* ---------------------------------------------------------------- Redis jobs */

static void record_lag(daemon_t *d, double ts)
{
    if (ts <= 0)
        return;
    double lag = evd_now_wall_ms() - ts;
    if (lag < 0)
        lag = 0;
    evd_metrics_lag(&d->m, lag);
    if (d->nlags < LAG_SAMPLES)
        d->lags[d->nlags++] = lag;
    else
        d->lags[(size_t)rand() % LAG_SAMPLES] = lag;
}

static void release_claim(unit_t *u);

static void job_done(evd_job_t *job, int status, const char *error, void *ud)
{
    daemon_t *d = ud;
    rec_t *r = job->ud;
    unit_t *u = r->unit;
    size_t ji = (size_t)(job - r->jobs);
    if (status == EVD_REDIS_RETRYING) {
        /* The batch entered retry backoff: let other replicas have the rows meanwhile. */
        release_claim(u);
        return;
    }
    if (status == -EIO) {
        dl_line(u, r, "retries_exhausted", (int)ji, error, job->attempts);
    } else if (status == -ECANCELED) {
        /* Shutting down: notify-only changes cannot wait in the outbox. */
        if (r->id < 0)
            dl_line(u, r, "shutdown", (int)ji, error ? error : "shutdown before Redis confirmed",
                    job->attempts);
    } else {
        d->n_keys += job->nkeys;
        d->n_patterns += job->npatterns;
    }
    if (--r->outstanding == 0) {
        if (status == 0)
            record_lag(d, r->ts);
        unit_finish_rec(u);
    }
}

/* ---------------------------------------------------------------- lookups */

static char *args_key(const char *const *args, size_t nargs)
{
    evd_buf_t b = {0};
    for (size_t i = 0; i < nargs; i++)
        if (evd_buf_puts(&b, args[i]) < 0 || evd_buf_putc(&b, '\x1f') < 0) {
            evd_buf_free(&b);
            return NULL;
        }
    if (!b.data && evd_buf_reserve(&b, 0) < 0)
        return NULL;
    if (b.data)
        b.data[b.len] = '\0';
    return b.data;
}

static lres_t *lres_find(unit_t *u, const evd_rule_t *rule, size_t lookup, const char *key)
{
    for (lres_t *l = u->lres; l; l = l->next)
        if (l->rule == rule && l->lookup == lookup && strcmp(l->argkey, key) == 0)
            return l;
    return NULL;
}

static const evd_lookup_vals_t *resolve(void *ud, const evd_rule_t *rule, size_t lookup,
                                        const char *const *args, size_t nargs)
{
    unit_t *u = ud;
    char *key = args_key(args, nargs);
    if (!key)
        return NULL;
    lres_t *l = lres_find(u, rule, lookup, key);
    free(key);
    return l && l->done ? &l->vals : NULL;
}

static void expand_unit(unit_t *u);

static void lookup_done(const PGresult *res, const char *err, void *arg)
{
    lres_t *l = arg;
    l->done = true;
    if (!res) {
        l->vals.status = -1;
        EVD_LOG(EVD_LOG_WARN, "lookup_failed", F_STR("as", l->rule->lookups[l->lookup].as), F_STR("error", err));
    } else {
        int n = PQntuples(res);
        bool is_bool = PQnfields(res) > 0 && PQftype(res, 0) == 16; /* BOOLOID */
        l->vals.v = calloc((size_t)(n ? n : 1), sizeof(char *));
        if (!l->vals.v) {
            l->vals.status = -1;
        } else {
            for (int i = 0; i < n && PQnfields(res) > 0; i++) {
                if (PQgetisnull(res, i, 0)) {
                    l->vals.v[l->vals.n++] = NULL;
                    continue;
                }
                const char *v = PQgetvalue(res, i, 0);
                if (is_bool)
                    v = v[0] == 't' ? "True" : "False";
                l->vals.v[l->vals.n++] = strdup(v);
            }
        }
    }
}

typedef struct lookup_ctx {
    unit_t *u;
    size_t calls; /* lookups the change needs */
} lookup_ctx_t;

typedef struct lookup_req {
    lres_t *l;
    unit_t *u;
} lookup_req_t;

static void lookup_req_done(const PGresult *res, const char *err, void *arg)
{
    lookup_req_t *q = arg;
    unit_t *u = q->u;
    lookup_done(res, err, q->l);
    free(q);
    if (--u->lookups_pending == 0)
        expand_unit(u);
}

static int need_lookup(void *ud, const evd_rule_t *rule, size_t lookup, const char *const *args, size_t nargs)
{
    lookup_ctx_t *lc = ud;
    unit_t *u = lc->u;
    lc->calls++;
    daemon_t *d = u->d;
    char *key = args_key(args, nargs);
    if (!key)
        return -ENOMEM;
    if (lres_find(u, rule, lookup, key)) {
        free(key);
        return 0;
    }
    lres_t *l = calloc(1, sizeof(*l));
    lookup_req_t *q = calloc(1, sizeof(*q));
    if (!l || !q) {
        free(l);
        free(q);
        free(key);
        return -ENOMEM;
    }
    l->rule = rule;
    l->lookup = lookup;
    l->argkey = key;
    l->next = u->lres;
    u->lres = l;
    q->l = l;
    q->u = u;
    int rc = d->lookupc ? evd_pg_query(d->lookupc, rule->lookups[lookup].sql, (int)nargs, args, true,
                                       lookup_req_done, q)
                        : -ENOTCONN;
    if (rc < 0) {
        /* Unknown: the template widens. */
        l->done = true;
        l->vals.status = -1;
        free(q);
        return 0;
    }
    u->lookups_pending++;
    return 0;
}

/* ---------------------------------------------------------------- expanding and submitting */

/* Appends the keys (or patterns) of every job of r as a JSON array. */
static int keys_json(const rec_t *r, bool patterns, evd_buf_t *b)
{
    int rc = evd_buf_putc(b, '[');
    bool first = true;
    for (size_t j = 0; j < r->njobs && rc == 0; j++) {
        const evd_job_t *job = &r->jobs[j];
        char **v = patterns ? job->patterns : job->keys;
        size_t n = patterns ? job->npatterns : job->nkeys;
        for (size_t i = 0; i < n && rc == 0; i++, first = false) {
            rc |= evd_buf_puts(b, first ? "" : ",");
            rc |= evd_buf_json_str(b, v[i], strlen(v[i]));
        }
    }
    return rc | evd_buf_putc(b, ']');
}

static void log_change_keys(rec_t *r)
{
    bool dry = r->unit->d->opts.dry_run;
    if ((dry ? EVD_LOG_INFO : EVD_LOG_DEBUG) < evd_log_min_level)
        return; /* building the key lists costs more than the rest of the change */
    evd_buf_t b = {0};
    evd_buf_t p = {0};
    if ((keys_json(r, false, &b) | keys_json(r, true, &p)) == 0)
        EVD_LOG(dry ? EVD_LOG_INFO : EVD_LOG_DEBUG, dry ? "would_invalidate" : "change", F_STR("table", r->table),
                F_STR("op", evd_op_name(r->op)), F_INT("id", r->id), F_RAW("keys", b.data),
                F_RAW("patterns", p.data));
    evd_buf_free(&b);
    evd_buf_free(&p);
}

/* Expands change c into the scratch expansion d->x (the caller resets it after use). */
static int expand_change(unit_t *u, const evd_change_t *c, const char *table, int64_t id)
{
    daemon_t *d = u->d;
    const evd_config_t *cfg = u->cfg->cfg;
    if (d->x.ntargets != cfg->ntargets) {
        evd_expansion_free(&d->x);
        if (evd_expansion_init(&d->x, cfg->ntargets) < 0)
            return -ENOMEM;
    }
    evd_expansion_reset(&d->x);
    int rc = evd_rules_expand(&cfg->rules, c, resolve, u, &d->x);
    if (rc == 0 && d->x.widened)
        evd_log_ratelimited("widened", "widened",
                            (const evd_field_t[]){F_STR("table", table), F_STR("op", evd_op_name(c->op)),
                                                  F_INT("id", id), F_INT("templates", d->x.widened),
                                                  F_STR("reason", d->x.widen_reason), {0}});
    return rc;
}

/* The expanded change as one allocation: a job per target with keys or patterns, copies of
 * them, of table and of the payload. */
static rec_t *rec_from_expansion(unit_t *u, int64_t id, const char *table, const char *raw, size_t rawlen,
                                 const evd_change_t *c)
{
    const evd_expansion_t *x = &u->d->x;
    size_t njobs = 0, nptrs = 0, nbytes = 0;
    for (size_t t = 0; t < x->ntargets; t++) {
        const evd_keyset_t *k = &x->per_target[t];
        if (!k->keys.n && !k->patterns.n)
            continue;
        njobs++;
        nptrs += k->keys.n + k->patterns.n;
        for (size_t i = 0; i < k->keys.n; i++)
            nbytes += strlen(k->keys.v[i]) + 1;
        for (size_t i = 0; i < k->patterns.n; i++)
            nbytes += strlen(k->patterns.v[i]) + 1;
    }
    char **ptrs = NULL;
    char *str = NULL;
    rec_t *r = rec_alloc(u, id, table, raw, rawlen, njobs, nptrs, nbytes, &ptrs, &str);
    if (!r)
        return NULL;
    r->op = c->op;
    r->ts = c->ts;
    r->expanded = true;
    for (size_t t = 0; t < x->ntargets; t++) {
        const evd_keyset_t *k = &x->per_target[t];
        if (!k->keys.n && !k->patterns.n)
            continue;
        size_t j = r->njobs++;
        r->job_target[j] = (int)t;
        evd_job_t *job = &r->jobs[j];
        memset(job, 0, sizeof(*job));
        job->table = r->table;
        job->ts = r->ts;
        job->ud = r;
        for (int pat = 0; pat < 2; pat++) {
            const evd_keyvec_t *kv = pat ? &k->patterns : &k->keys;
            if (pat) {
                job->patterns = ptrs;
                job->npatterns = kv->n;
            } else {
                job->keys = ptrs;
                job->nkeys = kv->n;
            }
            for (size_t i = 0; i < kv->n; i++) {
                size_t n = strlen(kv->v[i]) + 1;
                memcpy(str, kv->v[i], n);
                *ptrs++ = str;
                str += n;
            }
        }
    }
    return r;
}

/* Counts the change and hands its jobs to the targets (r is in its unit already). */
static void submit_rec(unit_t *u, rec_t *r)
{
    daemon_t *d = u->d;
    const evd_config_t *cfg = u->cfg->cfg;
    d->n_changes++;
    for (int b = 0; b < 4; b++)
        if (r->op == (evd_op_t)(1 << b))
            evd_metrics_change(&d->m, r->table, b);
    d->t_changes++;
    log_change_keys(r);
    if (!r->njobs || d->opts.dry_run || d->ntargets != cfg->ntargets || cfg != d->cfg->cfg) {
        /* Nothing to delete, a dry run, or the config changed under us (resubmit below). */
        if (r->njobs && !d->opts.dry_run) {
            /* Targets are looked up by name in the current config. */
            r->outstanding = (int)r->njobs;
            for (size_t j = 0; j < r->njobs; j++) {
                const char *tname = cfg->targets[r->job_target[j]].name;
                evd_redis_t *t = NULL;
                for (size_t k = 0; k < d->ntargets; k++)
                    if (strcmp(d->targets[k].name, tname) == 0)
                        t = d->targets[k].r;
                if (t) {
                    evd_redis_submit(t, &r->jobs[j]);
                } else {
                    r->jobs[j].attempts = 0;
                    job_done(&r->jobs[j], -EIO, "target removed by a config reload", d);
                }
            }
            return;
        }
        unit_finish_rec(u);
        return;
    }
    r->outstanding = (int)r->njobs;
    for (size_t j = 0; j < r->njobs; j++)
        evd_redis_submit(d->targets[r->job_target[j]].r, &r->jobs[j]);
}

/* Expands c (parsed from raw) into a new rec of u and submits it; on failure dead-letters it.
 * When w is set, the new rec replaces w (a rec that waited for lookups) at index i. */
static void expand_and_submit(unit_t *u, const evd_change_t *c, const char *table, int64_t id, const char *raw,
                              size_t rawlen, rec_t *w, size_t i)
{
    daemon_t *d = u->d;
    int rc = expand_change(u, c, table, id);
    rec_t *r = rc == 0 ? rec_from_expansion(u, id, table, raw, rawlen, c) : NULL;
    evd_expansion_reset(&d->x);
    if (r && !w && unit_push(u, r) < 0) {
        free(r);
        r = NULL;
    }
    if (!r) {
        if (!w && (!(w = rec_alloc(u, id, table, raw, rawlen, 0, 0, 0, NULL, NULL)) || unit_push(u, w) < 0)) {
            free(w);
            EVD_LOG(EVD_LOG_ERROR, "bad_input", F_STR("error", "out of memory"), F_INT("id", id));
            return;
        }
        w->op = c->op;
        dl_line(u, w, "bad_payload", -1, "out of memory expanding the change", 0);
        w->finished = true;
        unit_finish_rec(u);
        return;
    }
    if (w) {
        u->recs[i] = r;
        rec_free(w);
    }
    submit_rec(u, r);
}

static void expand_unit(unit_t *u)
{
    /* The guard taken in unit_new keeps u alive while its recs are expanded and submitted. */
    for (size_t i = 0; i < u->nrecs; i++) {
        rec_t *w = u->recs[i];
        if (!w->finished && !w->expanded)
            expand_and_submit(u, w->ch, w->table, w->id, w->raw, w->rawlen, w, i);
    }
    lres_free_all(u);
    unit_finish_rec(u);
}

/* Adds a rec that is done before expansion (bad input, unmatched): dead-lettered when reason
 * is set. The payload is kept for the line only when it parsed (op set): else it is quoted. */
static void accept_finished(unit_t *u, int64_t id, const char *table, evd_op_t op, const char *payload,
                            size_t len, const char *reason, const char *err)
{
    rec_t *r = rec_alloc(u, id, table, reason ? payload : NULL, len, 0, 0, 0, NULL, NULL);
    if (!r || unit_push(u, r) < 0) {
        free(r);
        EVD_LOG(EVD_LOG_ERROR, "bad_input", F_STR("error", "out of memory"), F_INT("id", id));
        return;
    }
    r->op = op;
    r->finished = true;
    if (reason)
        dl_line(u, r, reason, -1, err, 0);
    unit_finish_rec(u);
}

/* Parses a payload into a new rec of u: expanded and submitted at once unless its rules need
 * lookups (then at unit_start); bad input and unmatched tables finish at once. */
static void accept_payload(unit_t *u, const char *payload, size_t len, int64_t id)
{
    daemon_t *d = u->d;
    evd_change_t *c = &d->scratch;
    char err[256];
    evd_payload_status_t st = evd_payload_parse_spare(payload, len, c, &d->spare, err, sizeof(err));
    if (st != EVD_PAYLOAD_OK) {
        if (st == EVD_PAYLOAD_DOORBELL)
            snprintf(err, sizeof(err), "empty payload");
        d->n_bad++;
        evd_log_ratelimited("bad_payload", "bad_input",
                            (const evd_field_t[]){F_STR("reason", "bad_payload"), F_STR("error", err),
                                                  F_INT("id", id), {0}});
        accept_finished(u, id, NULL, 0, payload, len, "bad_payload", err);
        evd_change_clear_spare(c, &d->spare);
        return;
    }
    if (c->id < 0)
        c->id = id;
    char table[sizeof(c->schema) + sizeof(c->table) + 1];
    snprintf(table, sizeof(table), "%s.%s", c->schema, c->table);
    /* A statement chunk holds up to 500 row images: pending counts images, not rows. */
    size_t extra = c->nrows > 1 ? c->nrows - 1 : 0;
    size_t before = u->nrecs;
    const evd_config_t *cfg = u->cfg->cfg;
    if (!u->claim && evd_set_has(&d->durable, table, strlen(table))) {
        /* The capture of a durable table only ever rings an empty doorbell; a full change for
         * it by NOTIFY came from elsewhere (any role may NOTIFY): refuse it. */
        d->n_bad++;
        snprintf(err, sizeof(err), "change for durably watched table %s arrived by NOTIFY", table);
        evd_log_ratelimited("notify_for_durable", "bad_input",
                            (const evd_field_t[]){F_STR("reason", "bad_payload"), F_STR("table", table),
                                                  F_STR("error", err), {0}});
        accept_finished(u, id, table, c->op, payload, len, "bad_payload", err);
    } else if (!evd_rules_watches(&cfg->rules, c->schema, c->table)) {
        if (evd_set_has(&d->watched, table, strlen(table))) {
            d->n_unmatched++;
            accept_finished(u, id, table, c->op, payload, len, NULL, NULL);
        } else {
            d->n_bad++;
            snprintf(err, sizeof(err), "table %s is not watched by evictd", table);
            evd_log_ratelimited("unknown_table", "bad_input",
                                (const evd_field_t[]){F_STR("reason", "unknown_table"), F_STR("table", table),
                                                      F_INT("id", id), {0}});
            accept_finished(u, id, table, c->op, payload, len, "unknown_table", err);
        }
    } else {
        lookup_ctx_t lc = {.u = u};
        if (evd_rules_lookups(&cfg->rules, c, need_lookup, &lc) < 0)
            EVD_LOG(EVD_LOG_WARN, "lookup_failed", F_STR("error", "out of memory"));
        if (lc.calls == 0) {
            expand_and_submit(u, c, table, id, payload, len, NULL, 0);
        } else {
            /* Its parse waits for the unit's lookups (expand_unit). */
            rec_t *w = rec_alloc(u, id, table, payload, len, 0, 0, 0, NULL, NULL);
            evd_change_t *keep = w ? malloc(sizeof(*keep)) : NULL;
            if (!keep || unit_push(u, w) < 0) {
                free(keep);
                free(w);
                EVD_LOG(EVD_LOG_ERROR, "bad_input", F_STR("error", "out of memory"), F_INT("id", id));
            } else {
                *keep = *c;
                memset(c, 0, sizeof(*c)); /* the arena is the rec's now */
                w->ch = keep;
                w->op = keep->op;
                w->ts = keep->ts;
            }
        }
    }
    if (u->nrecs > before && extra) {
        u->weight += extra;
        d->pending += extra;
    }
    evd_change_clear_spare(c, &d->spare);
}

/* All payloads of u are in: expand now or when the lookups return. */
static void unit_start(unit_t *u)
{
    if (--u->lookups_pending == 0)
        expand_unit(u);
}

/* ---------------------------------------------------------------- backpressure */

static void update_pause(daemon_t *d)
{
    size_t max = (size_t)d->cfg->cfg->batch_max_pending;
    bool pause = d->pending >= max || d->stopping;
    if (pause != d->paused) {
        d->paused = pause;
        if (d->listen)
            evd_pg_pause(d->listen, pause);
        EVD_LOG(EVD_LOG_DEBUG, pause ? "paused" : "resumed", F_INT("pending", (int64_t)d->pending));
    }
}

/* ---------------------------------------------------------------- outbox claims */

static void release_claim(unit_t *u)
{
    daemon_t *d = u->d;
    if (!u->in_tx || u->cl->open != u)
        return;
    u->in_tx = false;
    u->released = true;
    u->cl->open = NULL;
    if (evd_pg_query(u->cl->pg, SQL_COMMIT, 0, NULL, false, begin_done, NULL) < 0)
        return;
    maybe_drain(d);
}

static void held_ids(daemon_t *d, evd_buf_t *b)
{
    int rc = evd_buf_putc(b, '{');
    bool first = true;
    for (unit_t *u = d->units; u && rc == 0; u = u->next) {
        if (!u->claim)
            continue;
        for (size_t i = 0; i < u->nrecs && rc == 0; i++) {
            if (u->recs[i]->id < 0)
                continue;
            rc = evd_buf_printf(b, "%s%" PRId64, first ? "" : ",", u->recs[i]->id);
            first = false;
        }
    }
    if (rc == 0)
        rc = evd_buf_putc(b, '}');
    (void)rc;
}

static void claim_done(const PGresult *res, const char *err, void *arg);
static void claim_setup_done(const PGresult *res, const char *err, void *arg);

static void begin_done(const PGresult *res, const char *err, void *arg)
{
    (void)res;
    (void)err;
    (void)arg;
}

static void send_claim(daemon_t *d, claimer_t *cl)
{
    char cursor[32], limit[32];
    size_t max = (size_t)d->cfg->cfg->batch_max_pending;
    size_t room = d->pending < max ? max - d->pending : 1;
    snprintf(cursor, sizeof(cursor), "%" PRId64, d->cursor);
    /* Outbox rows may be chunks of many images: ask for as many rows as the room holds at
     * the images per row seen lately. */
    size_t per_row = d->imgs_per_row > 1 ? (size_t)d->imgs_per_row : 1;
    d->claim_limit = room / per_row;
    if (d->claim_limit < 1)
        d->claim_limit = 1;
    if (d->claim_limit > CLAIM_ROWS)
        d->claim_limit = CLAIM_ROWS;
    snprintf(limit, sizeof(limit), "%zu", d->claim_limit);
    int rc;
    if (d->opts.dry_run) {
        const char *params[2] = {cursor, limit};
        rc = evd_pg_query(cl->pg, SQL_PEEK, 2, params, true, claim_done, cl);
    } else {
        if (!cl->setup)
            cl->setup = evd_pg_query(cl->pg, SQL_CLAIM_SETUP, 0, NULL, false, claim_setup_done, cl) == 0;
        evd_buf_t q = {0};
        d->claim_sets_idle = d->want_idle;
        d->want_idle = false;
        rc = evd_buf_printf(&q, "%sBEGIN; EXECUTE evictd_claim(%s, '", d->claim_sets_idle ? SQL_IDLE : "", cursor);
        held_ids(d, &q);
        rc = rc == 0 ? evd_buf_printf(&q, "', %s)", limit) : rc;
        rc = rc == 0 ? evd_pg_query(cl->pg, q.data, 0, NULL, false, claim_done, cl) : rc;
        evd_buf_free(&q);
    }
    if (rc == 0) {
        d->claim_cl = cl;
        d->claim_from = d->cursor;
        d->claim_gen = d->cursor_gen;
        d->claim_sent = uv_hrtime();
    }
}

/* Claims the next chunk when there is room, nothing else is claiming and a claim connection
 * has no batch in flight. */
static void maybe_drain(daemon_t *d)
{
    update_pause(d);
    /* Lookups need their connection: draining without it would widen every lookup. */
    if (d->stopping || d->claim_cl || d->paused || !d->watched_loaded || (d->lookupc && !evd_pg_ready(d->lookupc)))
        return;
    /* Take turns, and prefer a connection with nothing in flight: a claim queued behind an ack
     * waits for its round trip. */
    for (int pass = 0; pass < 2; pass++)
        for (size_t k = 0; k < NCLAIMERS; k++) {
            claimer_t *cl = &d->cl[(d->claim_turn + k) % NCLAIMERS];
            if (cl->pg && evd_pg_ready(cl->pg) && !cl->open && (pass || !evd_pg_busy(cl->pg))) {
                d->claim_turn = (size_t)(cl - d->cl) + 1;
                d->want_drain = false;
                send_claim(d, cl);
                return;
            }
        }
}

/* After a burst, glibc keeps the freed heap (tens of MB after a million changes); give it back
 * once evictd is idle again, at most once a second. */
static void trim_heap(daemon_t *d)
{
#ifdef __GLIBC__
    uint64_t now = uv_now(d->loop);
    if (d->pending == 0 && d->images_done - d->changes_at_trim > 1000 && now - d->last_trim >= 1000) {
        d->last_trim = now;
        d->changes_at_trim = d->images_done;
        malloc_trim(0);
    }
#else
    (void)d;
#endif
}

static void on_poll_timer(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, poll_timer);
    trim_heap(d);
    maybe_drain(d);
}

/* Where the next pass starts: RESTART_BACK ids below the lowest id a pass found lately (rows of
 * transactions still open then, which took lower ids, are found by the next pass). A pass from id 0
 * would walk the index entries of every row deleted but not yet vacuumed (a million after a big
 * drain: milliseconds per claim, in the way of every change). Rows below it that commit later
 * (ids are taken at insert, rows become visible at commit) are found by floor_check. */
static void restart_pass(daemon_t *d)
{
    d->cursor = d->restart;
}

static void floor_done(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    (void)err;
    d->floor_query = false;
    if (!res || PQntuples(res) != 1 || PQgetisnull(res, 0, 0))
        return;
    int64_t low = strtoll(PQgetvalue(res, 0, 0), NULL, 10) - 1;
    if (low < d->cursor) {
        d->cursor = low;
        d->cursor_gen++;
        if (low < d->restart)
            d->restart = low;
        d->want_drain = true;
        maybe_drain(d);
    }
}

/* Every poll interval, off the claim path (on the LISTEN connection, which only reads here):
 * is a row not held in memory waiting below the cursor (committed late, or below where passes
 * start)? Then the next claim starts below it. (A row another replica or the other claim
 * connection holds locked also counts: the claim then skips it.) */
static void floor_check(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, floor_timer);
    if (d->floor_query || d->cursor <= 0 || d->stopping || d->opts.dry_run || !d->listen ||
        !evd_pg_ready(d->listen))
        return;
    evd_buf_t q = {0};
    int rc = evd_buf_printf(&q, "SELECT min(id) FROM evictd.outbox WHERE id <= %" PRId64 " AND id <> ALL('",
                            d->cursor);
    held_ids(d, &q);
    rc = rc == 0 ? evd_buf_puts(&q, "'::bigint[])") : rc;
    if (rc == 0 && evd_pg_query(d->listen, q.data, 0, NULL, false, floor_done, d) == 0)
        d->floor_query = true;
    evd_buf_free(&q);
}

static void claim_done(const PGresult *res, const char *err, void *arg)
{
    claimer_t *cl = arg;
    daemon_t *d = cl->d;
    d->claim_cl = NULL;
    bool set_idle = d->claim_sets_idle;
    d->claim_sets_idle = false;
    if (!res) {
        if (set_idle) /* the flag may not be set: the next empty claim sets it */
            d->busy_since_idle = true;
        /* Closing the connection at shutdown fails the claim in flight: not worth a warning. */
        EVD_LOG(d->stopping ? EVD_LOG_DEBUG : EVD_LOG_WARN, "claim_failed", F_STR("error", err));
        if (!d->opts.dry_run)
            if (evd_pg_query(cl->pg, "ROLLBACK", 0, NULL, false, begin_done, NULL) < 0)
                EVD_LOG(EVD_LOG_DEBUG, "rollback_skipped");
        if (!d->stopping)
            uv_timer_start(&d->poll_timer, on_poll_timer, (uint64_t)d->cfg->cfg->poll_interval_ms, 0);
        return;
    }
    int n = PQntuples(res);
    if (n == 0) {
        if (!d->opts.dry_run)
            if (evd_pg_query(cl->pg, SQL_COMMIT, 0, NULL, false, begin_done, NULL) < 0)
                EVD_LOG(EVD_LOG_DEBUG, "commit_skipped");
        if (d->stopping)
            return;
        if (!d->opts.dry_run && d->claim_gen == d->cursor_gen) {
            /* A pass is over: start again from the lowest id (restart_pass). */
            int64_t from = d->claim_from;
            restart_pass(d);
            if (d->cursor < from) {
                maybe_drain(d);
                return;
            }
        }
        if (set_idle)
            d->idle = true;
        if (d->opts.dry_run || d->idle)
            goto idle;
        if (d->busy_since_idle && !d->lingered && d->rows_per_ms * LINGER_MS >= LINGER_MIN_ROWS) {
            /* Under heavy load, look once more after a moment before saying we are idle: a row
             * arrives within it, and every doorbell rung costs the writers a NOTIFY
             * (PostgreSQL serialises the commits of notifying transactions). Under light load
             * say so at once: the next write rings, and is seen without waiting for a poll. */
            d->lingered = true;
            uv_timer_start(&d->poll_timer, on_poll_timer, LINGER_MS, 0);
            return;
        }
        if (d->busy_since_idle) {
            /* Say we are idle and look once more (one round trip), so nothing slips between. */
            d->busy_since_idle = false;
            d->lingered = false;
            d->want_idle = true;
            d->t_idle_sets++;
            maybe_drain(d);
            return;
        }
        d->idle = true;
        trim_heap(d);
    idle:
        if (d->want_drain) {
            maybe_drain(d);
            return;
        }
        uv_timer_start(&d->poll_timer, on_poll_timer, (uint64_t)d->cfg->cfg->poll_interval_ms, 0);
        return;
    }
    d->idle = false;
    /* Rows per ms since the previous claim that found rows (or since this one was sent). */
    uint64_t now = uv_hrtime();
    uint64_t since = d->busy_since_idle && d->last_rows_at ? d->last_rows_at : d->claim_sent;
    double ms = (double)(now - since) / 1e6;
    d->rows_per_ms = 0.5 * d->rows_per_ms + 0.5 * (double)n / (ms > 0.05 ? ms : 0.05);
    d->t_claims++;
    d->t_claimed += (uint64_t)n;
    d->last_rows_at = now;
    d->busy_since_idle = true;
    d->lingered = false;
    unit_t *u = unit_new(d, true);
    if (!u) {
        EVD_LOG(EVD_LOG_ERROR, "claim_failed", F_STR("error", "out of memory"));
        if (!d->opts.dry_run)
            if (evd_pg_query(cl->pg, "ROLLBACK", 0, NULL, false, begin_done, NULL) < 0)
                EVD_LOG(EVD_LOG_DEBUG, "rollback_skipped");
        return;
    }
    u->in_tx = !d->opts.dry_run;
    u->cl = cl;
    if (u->in_tx)
        cl->open = u;
    /* A claim at the start of a pass found the lowest id in the outbox (but rows held here). */
    bool own = d->claim_gen == d->cursor_gen;
    if (own && (d->claim_from == 0 || d->claim_from <= d->restart)) {
        /* Some way below it: concurrent writers commit out of id order all the time. */
        d->restart = strtoll(PQgetvalue(res, 0, 0), NULL, 10) - 1 - RESTART_BACK;
        if (d->restart < 0)
            d->restart = 0;
    }
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (own && id > d->cursor)
            d->cursor = id;
        accept_payload(u, PQgetvalue(res, i, 1), (size_t)PQgetlength(res, i, 1), id);
    }
    /* Fewer rows than asked for: this pass reached the end of the outbox, so the next claim
     * starts again from the lowest id. Ids are taken at insert time but become visible at
     * commit, so a row below the cursor may have committed meanwhile; under steady load a
     * pass that only ever moved onward would leave it behind until the load stopped. */
    if (own && !d->opts.dry_run && (size_t)n < d->claim_limit)
        restart_pass(d);
    d->imgs_per_row = 0.5 * d->imgs_per_row + 0.5 * ((double)u->weight / (double)(n ? n : 1));
    unit_start(u);
    if (d->opts.dry_run)
        maybe_drain(d);
    else
        update_pause(d);
}

/* ---------------------------------------------------------------- PostgreSQL events */

static void on_notify(evd_pg_t *pg, const char *channel, const char *payload, size_t len, void *ud)
{
    daemon_t *d = ud;
    (void)pg;
    (void)channel;
    if (d->stopping)
        return;
    if (len == 0) {
        /* A doorbell: the outbox has rows. */
        d->t_doorbells++;
        d->want_drain = true;
        d->idle = false;
        uv_timer_stop(&d->poll_timer);
        maybe_drain(d);
        return;
    }
    if (!d->incoming && !(d->incoming = unit_new(d, false)))
        return;
    /* An oversize durable change is a reference: the outbox row has it. */
    if (len < 512 && strstr(payload, "\"ref\"") && !strstr(payload, "\"id\":null")) {
        evd_change_t c;
        char err[64];
        if (evd_payload_parse(payload, len, &c, err, sizeof(err)) == EVD_PAYLOAD_OK && c.ref && c.id > 0) {
            evd_change_clear(&c);
            d->want_drain = true;
            maybe_drain(d);
            return;
        }
        evd_change_clear(&c);
    }
    accept_payload(d->incoming, payload, len, -1);
    if (d->pending >= (size_t)d->cfg->cfg->batch_max_pending)
        process_incoming(d);
    update_pause(d);
}

static void process_incoming(daemon_t *d)
{
    unit_t *u = d->incoming;
    if (!u)
        return;
    d->incoming = NULL;
    unit_start(u);
}

static void on_check(uv_check_t *h)
{
    daemon_t *d = evd_container_of(h, daemon_t, check);
    process_incoming(d);
    evd_log_flush();
}

static void watches_loaded(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    evd_set_clear(&d->watched);
    evd_set_clear(&d->durable);
    if (!res) {
        EVD_LOG(EVD_LOG_WARN, "capture_mismatch", F_STR("error", err),
                F_STR("hint", "apply sql/install.sql and the output of `evictd sql`"));
    } else {
        const evd_config_t *cfg = d->cfg->cfg;
        for (int i = 0; i < PQntuples(res); i++) {
            char name[130];
            snprintf(name, sizeof(name), "%s.%s", PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
            if (evd_set_add(&d->watched, name, strlen(name)) < 0)
                break;
            if (PQgetvalue(res, i, 3)[0] == 't' && evd_set_add(&d->durable, name, strlen(name)) < 0)
                break;
        }
        /* Every column a rule needs must be captured, else its templates widen. */
        for (size_t r = 0; r < cfg->rules.n; r++) {
            const evd_rule_t *rule = &cfg->rules.v[r];
            bool first = true;
            for (size_t k = 0; k < r; k++)
                if (!strcmp(cfg->rules.v[k].schema, rule->schema) && !strcmp(cfg->rules.v[k].table, rule->table))
                    first = false;
            if (!first)
                continue;
            int row = -1;
            for (int i = 0; i < PQntuples(res); i++)
                if (!strcmp(PQgetvalue(res, i, 0), rule->schema) && !strcmp(PQgetvalue(res, i, 1), rule->table))
                    row = i;
            char tname[130];
            snprintf(tname, sizeof(tname), "%s.%s", rule->schema, rule->table);
            if (row < 0) {
                EVD_LOG(EVD_LOG_WARN, "capture_mismatch", F_STR("table", tname),
                        F_STR("error", "table is not watched: run `evictd sql` and apply its output"));
                continue;
            }
            evd_strv_t need = {0};
            if (evd_config_needed_columns(cfg, rule->schema, rule->table, &need) < 0)
                break;
            char cols[1024];
            snprintf(cols, sizeof(cols), ",%s,", PQgetvalue(res, row, 2));
            for (size_t c = 0; c < need.n; c++) {
                char pat[200];
                snprintf(pat, sizeof(pat), ",%s,", need.v[c]);
                if (!strstr(cols, pat))
                    EVD_LOG(EVD_LOG_WARN, "capture_mismatch", F_STR("table", tname), F_STR("column", need.v[c]),
                            F_STR("error", "column not captured: templates using it widen"));
            }
            evd_strv_free(&need);
        }
    }
    d->watched_loaded = true;
    maybe_drain(d);
}

static void claim_setup_done(const PGresult *res, const char *err, void *arg)
{
    claimer_t *cl = arg;
    if (!res) {
        /* E.g. evictd.outbox is not installed yet: set up again before the next claim. */
        EVD_LOG(EVD_LOG_WARN, "claim_failed", F_STR("error", err));
        cl->setup = false;
    }
}

static void claim_connected(evd_pg_t *pg, void *ud)
{
    claimer_t *cl = ud;
    daemon_t *d = cl->d;
    cl->setup = evd_pg_query(pg, SQL_CLAIM_SETUP, 0, NULL, false, claim_setup_done, cl) == 0;
    if (cl != &d->cl[0]) {
        maybe_drain(d);
        return;
    }
    d->cursor = 0;
    d->restart = 0;
    d->busy_since_idle = true;
    d->idle = false;
    d->watched_loaded = false;
    /* Assume chunks until claims show otherwise: a backlog of 500-image chunks must not
     * arrive as 1000 rows at once. The average adapts within a few claims. */
    d->imgs_per_row = 100;
    if (evd_pg_query(d->cl[0].pg, SQL_WATCHES, 0, NULL, false, watches_loaded, d) < 0)
        d->watched_loaded = true;
}

/* The open claim's locks are gone with the connection; its rows stay held in memory. */
static void claimer_lost(claimer_t *cl)
{
    daemon_t *d = cl->d;
    if (d->claim_cl == cl)
        d->claim_cl = NULL;
    cl->setup = false;
    if (cl->open) {
        cl->open->in_tx = false;
        cl->open->released = true;
        cl->open = NULL;
    }
}

static void claim_disconnected(evd_pg_t *pg, const char *why, void *ud)
{
    (void)pg;
    (void)why;
    claimer_lost(ud);
}

static void listen_connected(evd_pg_t *pg, void *ud)
{
    daemon_t *d = ud;
    (void)pg;
    /* Notifications sent while we were away are lost: the outbox has them. */
    d->want_drain = true;
    maybe_drain(d);
}

static void noop_disconnected(evd_pg_t *pg, const char *why, void *ud)
{
    (void)pg;
    (void)why;
    (void)ud;
}

static const evd_pg_handlers_t listen_handlers = {listen_connected, noop_disconnected, on_notify};
static const evd_pg_handlers_t claim_handlers = {claim_connected, claim_disconnected, NULL};
static void lookup_connected(evd_pg_t *pg, void *ud)
{
    (void)pg;
    maybe_drain(ud);
}

static const evd_pg_handlers_t lookup_handlers = {lookup_connected, noop_disconnected, NULL};

static bool has_lookups(const evd_config_t *cfg)
{
    for (size_t i = 0; i < cfg->rules.n; i++)
        if (cfg->rules.v[i].nlookups)
            return true;
    return false;
}

static int pg_start(daemon_t *d)
{
    const evd_config_t *cfg = d->cfg->cfg;
    int rc = evd_pg_new(d->loop, "listen", cfg->pg_url, cfg->channels, cfg->nchannels, &listen_handlers, d,
                        &d->listen);
    static const char *const names[NCLAIMERS] = {"outbox", "outbox2"};
    for (size_t i = 0; i < NCLAIMERS && rc == 0; i++) {
        d->cl[i].d = d;
        rc = evd_pg_new(d->loop, names[i], cfg->pg_url, NULL, 0, &claim_handlers, &d->cl[i], &d->cl[i].pg);
    }
    if (rc == 0 && has_lookups(cfg))
        rc = evd_pg_new(d->loop, "lookups", cfg->pg_url, NULL, 0, &lookup_handlers, d, &d->lookupc);
    if (rc == 0 && d->paused)
        evd_pg_pause(d->listen, true);
    return rc;
}

static void pg_stop(daemon_t *d)
{
    if (d->listen)
        evd_pg_close(d->listen, NULL, NULL);
    for (size_t i = 0; i < NCLAIMERS; i++) {
        if (d->cl[i].pg)
            evd_pg_close(d->cl[i].pg, NULL, NULL);
        claimer_lost(&d->cl[i]);
        d->cl[i].pg = NULL;
    }
    if (d->lookupc)
        evd_pg_close(d->lookupc, NULL, NULL);
    d->listen = d->lookupc = NULL;
}

/* ---------------------------------------------------------------- Redis targets */

static void redis_opts(const evd_config_t *cfg, evd_redis_opts_t *o)
{
    o->max_keys = cfg->batch_max_keys;
    o->max_delay_ms = cfg->batch_max_delay_ms;
    o->max_attempts = cfg->retry_max_attempts;
    o->initial_backoff_ms = cfg->retry_initial_backoff_ms;
    o->max_backoff_ms = cfg->retry_max_backoff_ms;
    o->redelete_after_ms = cfg->redelete_after_ms;
}

/* Builds the target array for cfg, reusing matching targets from old (moved out of it). */
static int targets_build(daemon_t *d, const evd_config_t *cfg, target_t *old, size_t nold, target_t **out)
{
    evd_redis_opts_t o;
    redis_opts(cfg, &o);
    target_t *t = calloc(cfg->ntargets ? cfg->ntargets : 1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    for (size_t i = 0; i < cfg->ntargets; i++) {
        const evd_target_cfg_t *tc = &cfg->targets[i];
        t[i].name = strdup(tc->name);
        for (size_t k = 0; k < nold; k++) {
            if (old[k].r && !strcmp(old[k].name, tc->name) && !evd_redis_cfg_differs(old[k].r, tc)) {
                t[i].r = old[k].r;
                old[k].r = NULL;
                evd_redis_set_opts(t[i].r, &o);
            }
        }
        if (!t[i].r && !d->opts.dry_run) {
            int rc = evd_redis_new(d->loop, tc, &o, job_done, d, &t[i].r);
            if (rc < 0)
                return rc;
        }
    }
    *out = t;
    return 0;
}

static void retire_target(daemon_t *d, evd_redis_t *r)
{
    evd_redis_t **v = realloc(d->retiring, (d->nretiring + 1) * sizeof(*v));
    if (!v) {
        evd_redis_close(r, NULL, NULL);
        return;
    }
    d->retiring = v;
    d->retiring[d->nretiring++] = r;
}

static void reap_retired(daemon_t *d)
{
    for (size_t i = 0; i < d->nretiring;) {
        if (evd_redis_pending(d->retiring[i]) == 0) {
            evd_redis_close(d->retiring[i], NULL, NULL);
            d->retiring[i] = d->retiring[--d->nretiring];
        } else {
            i++;
        }
    }
}

/* ---------------------------------------------------------------- stats */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void on_stats(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, stats_timer);
    uint64_t retries = 0;
    for (size_t i = 0; i < d->ntargets; i++)
        if (d->targets[i].r)
            retries += evd_redis_stats(d->targets[i].r)->retries;
    double p50 = 0, p99 = 0;
    if (d->nlags) {
        qsort(d->lags, d->nlags, sizeof(double), cmp_double);
        p50 = d->lags[d->nlags / 2];
        p99 = d->lags[(size_t)((double)(d->nlags - 1) * 0.99)];
    }
    EVD_LOG(EVD_LOG_INFO, "stats", F_INT("changes", d->n_changes), F_INT("keys", d->n_keys),
            F_INT("patterns", d->n_patterns), F_INT("retries", retries - d->retries_seen),
            F_INT("dead_letters", d->n_dead), F_INT("unmatched", d->n_unmatched), F_INT("bad_input", d->n_bad),
            F_DBL("lag_p50_ms", p50), F_DBL("lag_p99_ms", p99), F_INT("pending", (int64_t)d->pending));
    d->retries_seen = retries;
    d->n_changes = d->n_keys = d->n_patterns = d->n_dead = d->n_unmatched = d->n_bad = 0;
    d->nlags = 0;
    reap_retired(d);
}

static void stats_arm(daemon_t *d)
{
    uint64_t ms = (uint64_t)d->cfg->cfg->stats_interval_s * 1000;
    uv_timer_stop(&d->stats_timer);
    if (ms)
        uv_timer_start(&d->stats_timer, on_stats, ms, ms);
}

/* ---------------------------------------------------------------- logging setup */

static int apply_log(daemon_t *d, const evd_config_t *cfg)
{
    evd_log_format_t f;
    evd_log_level_t l;
    if (evd_log_parse_format(d->opts.log_format ? d->opts.log_format : cfg->log_format, &f) < 0 ||
        evd_log_parse_level(d->opts.log_level ? d->opts.log_level : cfg->log_level, &l) < 0)
        return -EINVAL;
    evd_log_configure(f, l);
    return 0;
}

/* ---------------------------------------------------------------- reload and shutdown */

static void on_sighup(uv_signal_t *h, int sig)
{
    daemon_t *d = evd_container_of(h, daemon_t, sighup);
    (void)sig;
    char err[1024];
    evd_config_t *cfg = evd_config_load(d->opts.config_path, getenv, err, sizeof(err));
    if (!cfg) {
        EVD_LOG(EVD_LOG_ERROR, "config_rejected", F_STR("path", d->opts.config_path), F_STR("error", err));
        return;
    }
    cfgref_t *ref = calloc(1, sizeof(*ref));
    target_t *nt = NULL;
    if (!ref || targets_build(d, cfg, d->targets, d->ntargets, &nt) < 0) {
        EVD_LOG(EVD_LOG_ERROR, "config_rejected", F_STR("error", "out of memory"));
        free(ref);
        evd_config_free(cfg);
        return;
    }
    for (size_t i = 0; i < d->ntargets; i++) {
        if (d->targets[i].r)
            retire_target(d, d->targets[i].r);
        free(d->targets[i].name);
    }
    free(d->targets);
    d->targets = nt;
    d->ntargets = cfg->ntargets;
    const evd_config_t *old = d->cfg->cfg;
    bool pg_changed = strcmp(old->pg_url, cfg->pg_url) != 0 || old->nchannels != cfg->nchannels ||
                      has_lookups(old) != has_lookups(cfg);
    for (size_t i = 0; !pg_changed && i < cfg->nchannels; i++)
        pg_changed = strcmp(old->channels[i], cfg->channels[i]) != 0;
    ref->cfg = cfg;
    ref->refs = 1;
    cfg_put(d->cfg);
    d->cfg = ref;
    apply_log(d, cfg);
    if (evd_dl_reopen(d->dl, cfg->dl_path, cfg->dl_max_bytes) < 0)
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "cannot reopen"), F_STR("path", cfg->dl_path));
    stats_arm(d);
    reap_retired(d);
    if (pg_changed) {
        pg_stop(d);
        if (pg_start(d) < 0)
            EVD_LOG(EVD_LOG_ERROR, "config_reloaded", F_STR("error", "cannot start postgres connections"));
    } else if (d->cl[0].pg && evd_pg_ready(d->cl[0].pg)) {
        /* Re-check the capture against the new rules. */
        if (evd_pg_query(d->cl[0].pg, SQL_WATCHES, 0, NULL, false, watches_loaded, d) < 0)
            d->watched_loaded = true;
    }
    EVD_LOG(EVD_LOG_INFO, "config_reloaded", F_STR("path", cfg->path), F_INT("rules", (int64_t)cfg->rules.n),
            F_INT("targets", (int64_t)cfg->ntargets), F_BOOL("postgres_reconnect", pg_changed));
    update_pause(d);
    maybe_drain(d);
}

static void close_all(daemon_t *d);

static void on_shutdown_timer(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, shutdown_timer);
    /* shutdown_timeout_ms passed: cancel what is left (notify-only changes are dead-lettered,
     * durable ones stay in the outbox for the next start). */
    close_all(d);
}

static void shutdown_poll(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, poll_timer);
    if (!d->units)
        close_all(d);
}

static void on_sigterm(uv_signal_t *h, int sig)
{
    daemon_t *d = h->data;
    if (d->stopping)
        return;
    d->stopping = true;
    EVD_LOG(EVD_LOG_INFO, "shutdown", F_STR("signal", sig == SIGINT ? "SIGINT" : "SIGTERM"),
            F_INT("pending", (int64_t)d->pending));
    process_incoming(d);
    update_pause(d);
    uv_timer_start(&d->shutdown_timer, on_shutdown_timer, (uint64_t)d->cfg->cfg->shutdown_timeout_ms, 0);
    uv_timer_stop(&d->poll_timer);
    uv_timer_start(&d->poll_timer, shutdown_poll, 0, 10);
}

static void handle_close_noop(uv_handle_t *h)
{
    (void)h;
}

/* ---------------------------------------------------------------- health and metrics */

static void backlog_done(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    (void)err;
    d->backlog_query = false;
    d->backlog = res && PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
}

/* The outbox backlog, refreshed at most once per scrape (max - min + 1: an upper bound that
 * costs two index probes, not a count). */
static void backlog_refresh(daemon_t *d)
{
    static const char sql[] = "SELECT coalesce(max(id) - min(id) + 1, 0) FROM evictd.outbox";
    if (d->backlog_query || !d->cl[0].pg || !evd_pg_ready(d->cl[0].pg) || d->opts.dry_run)
        return;
    if (evd_pg_query(d->cl[0].pg, sql, 0, NULL, true, backlog_done, d) == 0)
        d->backlog_query = true;
}

static int http_handler(const char *path, evd_buf_t *body, void *ud)
{
    daemon_t *d = ud;
    if (strcmp(path, "/healthz") == 0)
        return evd_buf_puts(body, "ok\n") == 0 ? 200 : 503;
    if (strcmp(path, "/readyz") == 0) {
        int rc = 0;
        bool ready = true;
        if (!d->listen || !evd_pg_ready(d->listen)) {
            ready = false;
            const char *e = d->listen ? evd_pg_last_error(d->listen) : NULL;
            rc |= evd_buf_printf(body, "postgres: not listening%s%s\n", e ? ": " : "", e ? e : "");
        }
        for (size_t i = 0; i < d->ntargets; i++) {
            if (d->targets[i].r && !evd_redis_connected(d->targets[i].r)) {
                ready = false;
                const char *e = evd_redis_last_error(d->targets[i].r);
                rc |= evd_buf_printf(body, "redis %s: not connected%s%s\n", d->targets[i].name, e ? ": " : "",
                                     e ? e : "");
            }
        }
        if (d->stopping) {
            ready = false;
            rc |= evd_buf_puts(body, "shutting down\n");
        }
        if (ready)
            rc |= evd_buf_puts(body, "ready\n");
        return rc == 0 && ready ? 200 : 503;
    }
    if (strcmp(path, "/metrics") != 0) {
        if (evd_buf_puts(body, "not found\n") < 0)
            evd_buf_reset(body);
        return 404;
    }
    backlog_refresh(d);
    int rc = evd_metrics_render(&d->m, body);
    /* Per-target counters, from each target's stats. */
    static const struct {
        const char *name, *help;
        size_t off;
    } per_target[] = {
        {"evictd_keys_deleted_total", "Keys in confirmed UNLINKs, by target.", offsetof(evd_redis_stats_t, keys)},
        {"evictd_patterns_deleted_total", "Pattern scans completed, by target.",
         offsetof(evd_redis_stats_t, patterns)},
        {"evictd_retries_total", "Batch retries, by target.", offsetof(evd_redis_stats_t, retries)},
    };
    for (size_t m = 0; m < EVD_ARRAY_LEN(per_target); m++) {
        rc |= evd_buf_printf(body, "# HELP %s %s\n# TYPE %s counter\n", per_target[m].name, per_target[m].help,
                             per_target[m].name);
        for (size_t i = 0; i < d->ntargets; i++) {
            if (!d->targets[i].r)
                continue;
            const char *st = (const char *)evd_redis_stats(d->targets[i].r);
            rc |= evd_buf_printf(body, "%s{target=\"%s\"} %llu\n", per_target[m].name, d->targets[i].name,
                                 (unsigned long long)*(const uint64_t *)(st + per_target[m].off));
        }
    }
    rc |= evd_buf_puts(body, "# HELP evictd_reconnects_total Connections established, by connection.\n"
                             "# TYPE evictd_reconnects_total counter\n");
    struct {
        const char *name;
        evd_pg_t *pg;
    } conns[] = {{"listen", d->listen}, {"outbox", d->cl[0].pg}, {"lookups", d->lookupc}};
    for (size_t i = 0; i < 3; i++)
        if (conns[i].pg)
            rc |= evd_buf_printf(body, "evictd_reconnects_total{conn=\"%s\"} %llu\n", conns[i].name,
                                 (unsigned long long)evd_pg_reconnects(conns[i].pg));
    for (size_t i = 0; i < d->ntargets; i++)
        if (d->targets[i].r)
            rc |= evd_buf_printf(body, "evictd_reconnects_total{conn=\"redis:%s\"} %llu\n", d->targets[i].name,
                                 (unsigned long long)evd_redis_stats(d->targets[i].r)->reconnects);
    rc |= evd_buf_printf(body,
                         "# HELP evictd_pending Changes held in memory.\n# TYPE evictd_pending gauge\n"
                         "evictd_pending %zu\n"
                         "# HELP evictd_outbox_backlog Outbox rows waiting (upper bound; -1 unknown).\n"
                         "# TYPE evictd_outbox_backlog gauge\nevictd_outbox_backlog %lld\n",
                         d->pending, (long long)d->backlog);
    return rc == 0 ? 200 : 503;
}

static bool closed_all;

static void close_all(daemon_t *d)
{
    if (closed_all)
        return;
    closed_all = true;
    uv_timer_stop(&d->poll_timer);
    uv_timer_stop(&d->floor_timer);
    /* Cancels pending jobs: notify-only ones are dead-lettered with reason shutdown. */
    for (size_t i = 0; i < d->ntargets; i++) {
        if (d->targets[i].r)
            evd_redis_close(d->targets[i].r, NULL, NULL);
        d->targets[i].r = NULL;
    }
    for (size_t i = 0; i < d->nretiring; i++)
        evd_redis_close(d->retiring[i], NULL, NULL);
    d->nretiring = 0;
    pg_stop(d);
    evd_http_close(d->http);
    d->http = NULL;
    uv_close((uv_handle_t *)&d->poll_timer, handle_close_noop);
    uv_close((uv_handle_t *)&d->floor_timer, handle_close_noop);
    uv_close((uv_handle_t *)&d->stats_timer, handle_close_noop);
    uv_close((uv_handle_t *)&d->shutdown_timer, handle_close_noop);
    uv_close((uv_handle_t *)&d->check, handle_close_noop);
    uv_close((uv_handle_t *)&d->sigterm, handle_close_noop);
    uv_close((uv_handle_t *)&d->sigint, handle_close_noop);
    uv_close((uv_handle_t *)&d->sighup, handle_close_noop);
}

/* ---------------------------------------------------------------- entry point */

int evd_daemon_run(const evd_run_opts_t *opts)
{
    char err[1024];
    evd_config_t *cfg = evd_config_load(opts->config_path, getenv, err, sizeof(err));
    if (!cfg) {
        fprintf(stderr, "evictd: %s\n", err);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    static daemon_t dd;
    daemon_t *d = &dd;
    memset(d, 0, sizeof(*d));
    d->opts = *opts;
    d->loop = uv_default_loop();
    d->cfg = calloc(1, sizeof(*d->cfg));
    if (!d->cfg) {
        evd_config_free(cfg);
        return 1;
    }
    d->cfg->cfg = cfg;
    d->cfg->refs = 1;
    if (apply_log(d, cfg) < 0) {
        fprintf(stderr, "evictd: bad log settings\n");
        return 2;
    }
    srand((unsigned)uv_hrtime() ^ (unsigned)getpid());
    if (evd_expansion_init(&d->x, cfg->ntargets) < 0)
        return 1;
    int rc = evd_dl_open(d->loop, cfg->dl_path, cfg->dl_max_bytes, &d->dl);
    if (rc < 0) {
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("path", cfg->dl_path), F_STR("error", strerror(-rc)),
                F_STR("hint", "set dead_letter.path to a writable file"));
        evd_log_flush();
        return 1;
    }
    EVD_LOG(EVD_LOG_INFO, "starting", F_STR("version", EVD_VERSION), F_STR("config", cfg->path),
            F_INT("rules", (int64_t)cfg->rules.n), F_INT("targets", (int64_t)cfg->ntargets),
            F_BOOL("dry_run", opts->dry_run), F_STR("postgres", cfg->pg_url));
    if (targets_build(d, cfg, NULL, 0, &d->targets) < 0)
        return 1;
    d->ntargets = cfg->ntargets;
    uv_timer_init(d->loop, &d->poll_timer);
    uv_timer_init(d->loop, &d->floor_timer);
    uv_timer_start(&d->floor_timer, floor_check, (uint64_t)cfg->poll_interval_ms, (uint64_t)cfg->poll_interval_ms);
    uv_timer_init(d->loop, &d->stats_timer);
    uv_timer_init(d->loop, &d->shutdown_timer);
    uv_check_init(d->loop, &d->check);
    uv_check_start(&d->check, on_check);
    uv_signal_init(d->loop, &d->sigterm);
    uv_signal_init(d->loop, &d->sigint);
    uv_signal_init(d->loop, &d->sighup);
    d->sigterm.data = d->sigint.data = d;
    uv_signal_start(&d->sigterm, on_sigterm, SIGTERM);
    uv_signal_start(&d->sigint, on_sigterm, SIGINT);
    uv_signal_start(&d->sighup, on_sighup, SIGHUP);
    stats_arm(d);
    d->backlog = -1;
    if (cfg->http_listen) {
        rc = evd_http_start(d->loop, cfg->http_listen, http_handler, d, &d->http);
        if (rc < 0) {
            EVD_LOG(EVD_LOG_ERROR, "http", F_STR("listen", cfg->http_listen), F_STR("error", uv_strerror(rc)));
            evd_log_flush();
            return 1;
        }
        EVD_LOG(EVD_LOG_INFO, "http", F_STR("listen", cfg->http_listen));
    }
    if (pg_start(d) < 0)
        return 1;
    uv_run(d->loop, UV_RUN_DEFAULT);
    /* Dead-letter writes queued by cancelled jobs complete here. */
    evd_dl_close(d->dl);
    uv_run(d->loop, UV_RUN_DEFAULT);
    EVD_LOG(EVD_LOG_INFO, "stopped", F_INT("changes", (int64_t)d->t_changes), F_INT("dead_letters", (int64_t)d->t_dead),
            F_INT("unacknowledged", (int64_t)d->pending), F_INT("doorbells", (int64_t)d->t_doorbells),
            F_INT("idle_flags_set", (int64_t)d->t_idle_sets), F_INT("claims", (int64_t)d->t_claims),
            F_INT("rows_claimed", (int64_t)d->t_claimed));
    evd_log_flush();
    while (d->units)
        unit_free(d->units);
    for (size_t i = 0; i < d->ntargets; i++)
        free(d->targets[i].name);
    free(d->targets);
    free(d->retiring);
    evd_expansion_free(&d->x);
    evd_arena_spare_free(&d->spare);
    evd_set_free(&d->watched);
    evd_set_free(&d->durable);
    evd_metrics_free(&d->m);
    cfg_put(d->cfg);
    int lc = uv_loop_close(d->loop);
    (void)lc;
    return d->exit_code;
}
