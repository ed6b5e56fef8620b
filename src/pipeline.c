/* pipeline.c - the change pipeline of `evictd run`: payloads parsed into records, expanded
 * into keys per target, handed to the Redis targets as jobs, dead-lettered when they fail,
 * and completed per unit (then outbox.c acknowledges a claim). */
#include "daemon_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void unit_finish_rec(unit_t *u);
static void count_change(daemon_t *d, const char *table, evd_op_t op);

/* ---------------------------------------------------------------- config refs */

static cfgref_t *cfg_get(cfgref_t *c)
{
    c->refs++;
    return c;
}

void cfg_put(cfgref_t *c)
{
    if (c && --c->refs == 0) {
        evd_config_free(c->cfg);
        free(c);
    }
}

/* ---------------------------------------------------------------- units and records */

unit_t *unit_new(daemon_t *d, bool claim)
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

void unit_free(unit_t *u)
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
    return ALIGN8(sizeof(rec_t)) + njobs * sizeof(evd_job_t) + ALIGN8(njobs * sizeof(int)) + nptrs * sizeof(char *) +
           nbytes;
}

/* A rec in one allocation, with room for njobs jobs, nptrs pointers and nbytes of strings (at
 * *strings); table and the payload (raw, or NULL) are copied in. */
static rec_t *rec_alloc(unit_t *u, int64_t id, const char *table, const char *raw, size_t rawlen, size_t njobs,
                        size_t nptrs, size_t nbytes, char ***ptrs, char **strings)
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
    evd_buf_t *b = target < 0 ? &u->dl_bad : &u->dl;
    char ts[40];
    snprintf(ts, sizeof(ts), "%.3f", evd_now_wall_ms());
    size_t start = b->len;
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
    if (rc) {
        /* Out of memory: no part of the line is written (a broken line would corrupt the file
         * for replay), and the unit's rows are kept for a later claim (a notify-only change is
         * lost: logged below). */
        if (b->data) {
            b->len = start;
            b->data[start] = '\0';
        }
        u->keep = "dead-letter line not built (out of memory)";
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "out of memory building the line"),
                F_STR("reason", reason), F_STR("table", r->table), F_INT("id", r->id));
        return;
    }
    int ri = evd_metrics_reason(reason);
    if (ri >= 0)
        (target < 0 ? u->dl_bad_n : u->dl_n)[ri]++;
    EVD_LOG(EVD_LOG_WARN, "dead_letter", F_STR("reason", reason),
            F_STR("target", target >= 0 ? u->cfg->cfg->targets[r->job_target[target]].name : NULL),
            F_STR("table", r->table), F_INT("id", r->id), F_STR("error", error), F_INT("attempts", attempts));
}

static void dl_written(int status, void *arg)
{
    unit_t *u = arg;
    if (status < 0) {
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "write failed"), F_STR("detail", strerror(-status)));
        u->keep = "dead-letter write failed";
    }
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
        if (evd_dl_write(d->dl, &u->dl, u->dl_n, false, dl_written, u) < 0) {
            u->dl_writes--;
            u->keep = "dead-letter write failed";
        }
    }
    if (u->dl_bad.len) {
        u->dl_writes++;
        if (evd_dl_write(d->dl, &u->dl_bad, u->dl_bad_n, true, dl_written, u) < 0) {
            u->dl_writes--;
            u->keep = "dead-letter write failed";
        }
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

/* Was the outbox row id applied from its doorbell lately? (Its lag was recorded then.) */
bool hinted(const daemon_t *d, int64_t id)
{
    for (size_t i = 0; id >= 0 && i < HINTS_KEPT && i < d->nhinted; i++)
        if (d->hints[i].id == id)
            return true;
    return false;
}

/* Did outbox row id ring? 1: its hint is among the recent ones; 0: it rang none; -1: unknown.
 * Known only up to the newest hint (a row above may have its hint on the way) and down to the
 * oldest one kept (a claim that lags more than HINTS_KEPT hints behind finds rows whose hints
 * left the ring). */
int hint_state(const daemon_t *d, int64_t id)
{
    if (hinted(d, id))
        return 1;
    if (id >= d->max_hint_id)
        return -1;
    if (d->nhinted < HINTS_KEPT)
        return 0;
    int64_t oldest = INT64_MAX;
    for (size_t i = 0; i < HINTS_KEPT; i++)
        if (d->hints[i].id < oldest)
            oldest = d->hints[i].id;
    return id > oldest ? 0 : -1;
}

static void hint_keep(daemon_t *d, int64_t id, const char *payload, size_t len)
{
    struct hint_slot *h = &d->hints[d->nhinted++ % HINTS_KEPT];
    h->id = id;
    h->at = uv_now(d->loop);
    h->confirmed = false;
    h->flight = NULL; /* a rec still in flight keeps its waiter (hint_answered) */
    h->len = len <= HINT_BYTES ? (uint16_t)len : 0;
    memcpy(h->payload, payload, h->len);
    if (id > d->max_hint_id)
        d->max_hint_id = id;
}

/* The recent hint of outbox row id that carried the same bytes as payload, else NULL (a forged
 * hint never matches a row it could hide; one with the id of a real hint does not mask it). */
static struct hint_slot *hint_same(daemon_t *d, int64_t id, const char *payload, size_t len)
{
    for (size_t i = 0; i < HINTS_KEPT && i < d->nhinted; i++) {
        struct hint_slot *h = &d->hints[i];
        if (h->id == id && h->len && h->len == len && memcmp(h->payload, payload, len) == 0)
            return h;
    }
    return NULL;
}

void claimed_keep(daemon_t *d, int64_t id)
{
    d->claimed_ids[d->nclaimed_ids++ % CLAIMED_KEPT] = id;
}

/* Was outbox row id claimed lately? Its doorbell, heard after, need not apply it again. */
static bool claimed_lately(const daemon_t *d, int64_t id)
{
    for (size_t i = 0; i < CLAIMED_KEPT && i < d->nclaimed_ids; i++)
        if (d->claimed_ids[i] == id)
            return true;
    return false;
}

/* Forgets what hints were applied with: a reload may change the rules (claims are accepted
 * with the current config; a hint confirmed after a reload is not marked, job_done). */
void hints_forget(daemon_t *d)
{
    for (size_t i = 0; i < HINTS_KEPT; i++)
        d->hints[i].confirmed = false;
}

/* Redis answered hint r, or it entered retry backoff (not applied): the claimed row that waited
 * for it is done when the hint was applied with the same config, else it is applied now. */
static void hint_answered(daemon_t *d, rec_t *r, bool applied)
{
    unit_t *w = r->waiter;
    if (!w)
        return;
    r->waiter = NULL;
    rec_t *row = w->recs[r->waiter_i];
    if (applied && r->unit->cfg == w->cfg) {
        count_change(d, row->table, row->op);
        row->finished = true;
        unit_finish_rec(w);
    }
    /* Its guard taken in accept_payload. The last one expands the unit, which submits to Redis:
     * not from inside Redis's callback (a connection being reset), but from answer_timer. */
    if (w->lookups_pending > 1) {
        w->lookups_pending--;
        return;
    }
    w->answered_next = d->answered;
    d->answered = w;
    uv_timer_start(&d->answer_timer, hints_answered, 0, 0);
}

void hints_answered(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, answer_timer);
    while (d->answered) {
        unit_t *w = d->answered;
        d->answered = w->answered_next;
        unit_start(w);
    }
}

/* The kept hint whose Redis jobs are r's (a hint rec on its way), or NULL. */
static struct hint_slot *hint_in_flight(daemon_t *d, const rec_t *r)
{
    for (size_t i = 0; r->hint && i < HINTS_KEPT && i < d->nhinted; i++)
        if (d->hints[i].flight == r)
            return &d->hints[i];
    return NULL;
}

/* The current target of that name, NULL when none (removed by a reload, or closed). */
static evd_redis_t *target_named(const daemon_t *d, const char *name)
{
    for (size_t k = 0; k < d->ntargets; k++)
        if (strcmp(d->targets[k].name, name) == 0)
            return d->targets[k].r;
    return NULL;
}

void job_done(evd_job_t *job, int status, const char *error, void *ud)
{
    daemon_t *d = ud;
    rec_t *r = job->ud;
    unit_t *u = r->unit;
    size_t ji = (size_t)(job - r->jobs);
    if (status == EVD_REDIS_RETRYING) {
        /* The batch entered retry backoff: let other replicas have the rows meanwhile. A hint's
         * row claimed from now on is applied by its claim, not held open waiting for the hint
         * (which may retry for the whole outage). */
        struct hint_slot *h = hint_in_flight(d, r);
        if (h)
            h->flight = NULL;
        hint_answered(d, r, false);
        release_claim(u);
        return;
    }
    if (status == EVD_REDIS_MOVED) {
        /* Its target was replaced by a reload: the job goes to the one now of that name. */
        evd_redis_t *t = target_named(d, u->cfg->cfg->targets[r->job_target[ji]].name);
        if (t) { /* at shutdown too: the grace period holds for it as for any other job */
            evd_redis_submit(t, job);
            return;
        }
        status = d->stopping ? -ECANCELED : -EIO;
        error = d->stopping ? "shutdown before Redis confirmed" : "target removed by a config reload";
    }
    if (status == -EIO) {
        /* A hint's change is in the outbox: its claim applies it again. */
        if (!r->hint)
            dl_line(u, r, "retries_exhausted", (int)ji, error, job->attempts);
    } else if (status == -ECANCELED) {
        /* Shutting down: notify-only changes cannot wait in the outbox; outbox rows stay. */
        if (r->id == ID_NOTIFY)
            dl_line(u, r, "shutdown", (int)ji, error ? error : "shutdown before Redis confirmed", job->attempts);
        else if (u->claim)
            u->keep = "shutdown before Redis confirmed";
    } else {
        d->n_keys += job->nkeys;
        d->n_patterns += job->npatterns;
    }
    if (status != 0)
        r->failed = true;
    if (--r->outstanding == 0) {
        if (!r->failed && (r->hint || !hinted(d, r->id)))
            record_lag(d, r->ts);
        struct hint_slot *h = hint_in_flight(d, r);
        if (h) {
            h->flight = NULL;
            h->confirmed = !r->failed && u->cfg == d->cfg;
        }
        hint_answered(d, r, !r->failed);
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

static const evd_lookup_vals_t *resolve(void *ud, const evd_rule_t *rule, size_t lookup, const char *const *args,
                                        size_t nargs)
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
                char *copy = strdup(v);
                if (!copy) { /* not "no row" (NULL): failed, so its templates widen */
                    l->vals.status = -1;
                    break;
                }
                l->vals.v[l->vals.n++] = copy;
            }
        }
    }
}

typedef struct lookup_ctx {
    unit_t *u;
    size_t calls;    /* lookups the change needs */
    bool count_only; /* only count them, send none */
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
    if (lc->count_only)
        return 0;
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
    int rc = d->lookupc
                 ? evd_pg_query(d->lookupc, rule->lookups[lookup].sql, (int)nargs, args, true, lookup_req_done, q)
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
                F_STR("op", evd_op_name(r->op)), F_INT("id", r->id), F_BOOL("hint", r->hint), F_RAW("keys", b.data),
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
                            (const evd_field_t[]){F_STR("table", table),
                                                  F_STR("op", evd_op_name(c->op)),
                                                  F_INT("id", id),
                                                  F_INT("templates", d->x.widened),
                                                  F_STR("reason", d->x.widen_reason),
                                                  {0}});
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
                *ptrs++ = str;
                str = stpcpy(str, kv->v[i]) + 1;
            }
        }
    }
    return r;
}

static void count_change(daemon_t *d, const char *table, evd_op_t op)
{
    d->n_changes++;
    for (int b = 0; b < 4; b++)
        if (op == (evd_op_t)(1 << b))
            evd_metrics_change(&d->m, table, b);
    d->t_changes++;
}

/* Counts the change and hands its jobs to the targets (r is in its unit already). */
static void submit_rec(unit_t *u, rec_t *r)
{
    daemon_t *d = u->d;
    const evd_config_t *cfg = u->cfg->cfg;
    if (r->hint)
        d->t_hints++; /* counted as a change when its row is claimed */
    else
        count_change(d, r->table, r->op);
    log_change_keys(r);
    if (!r->njobs || d->opts.dry_run || d->ntargets != cfg->ntargets || cfg != d->cfg->cfg) {
        /* Nothing to delete, a dry run, or the config changed under us (resubmit below). */
        if (r->njobs && !d->opts.dry_run) {
            /* Targets are looked up by name in the current config. */
            r->outstanding = (int)r->njobs;
            for (size_t j = 0; j < r->njobs; j++) {
                evd_redis_t *t = target_named(d, cfg->targets[r->job_target[j]].name);
                if (t) {
                    evd_redis_submit(t, &r->jobs[j]);
                } else {
                    r->jobs[j].attempts = 0;
                    if (d->stopping) /* closed at shutdown: the row stays, as any cancelled one */
                        job_done(&r->jobs[j], -ECANCELED, "shutdown before Redis confirmed", d);
                    else
                        job_done(&r->jobs[j], -EIO, "target removed by a config reload", d);
                }
            }
            return;
        }
        unit_finish_rec(u);
        return;
    }
    r->outstanding = (int)r->njobs;
    struct hint_slot *h = d->nhinted ? &d->hints[(d->nhinted - 1) % HINTS_KEPT] : NULL;
    if (r->hint && h && h->id == r->id)
        h->flight = r; /* kept just now (accept_payload); until its last job is answered (job_done) */
    for (size_t j = 0; j < r->njobs; j++) {
        evd_redis_t *t = d->targets[r->job_target[j]].r;
        if (t)
            evd_redis_submit(t, &r->jobs[j]);
        else /* closed at shutdown (a lookup answered after the targets were closed) */
            job_done(&r->jobs[j], -ECANCELED, "shutdown before Redis confirmed", d);
    }
}

/* A rec without jobs added to u (done before expansion, or waiting for lookups); NULL, logged,
 * when out of memory. */
static rec_t *rec_add_bare(unit_t *u, int64_t id, const char *table, const char *raw, size_t rawlen)
{
    rec_t *r = rec_alloc(u, id, table, raw, rawlen, 0, 0, 0, NULL, NULL);
    if (!r || unit_push(u, r) < 0) {
        free(r);
        EVD_LOG(EVD_LOG_ERROR, "bad_input", F_STR("error", "out of memory"), F_INT("id", id));
        return NULL;
    }
    return r;
}

/* Finishes r before expansion: dead-lettered when reason is set. */
static void rec_finish(unit_t *u, rec_t *r, const char *reason, const char *err)
{
    r->finished = true;
    if (reason && !r->hint)
        dl_line(u, r, reason, -1, err, 0);
    unit_finish_rec(u);
}

/* Adds a rec that is done before expansion (bad input, unmatched): dead-lettered when reason
 * is set. The payload is kept for the line only when it parsed (op set): else it is quoted. */
static void accept_finished(unit_t *u, int64_t id, const char *table, evd_op_t op, const char *payload, size_t len,
                            const char *reason, const char *err)
{
    rec_t *r = rec_add_bare(u, id, table, reason ? payload : NULL, len);
    if (!r)
        return;
    r->op = op;
    rec_finish(u, r, reason, err);
}

/* Expands c (parsed from raw) into a new rec of u and submits it; on failure dead-letters it
 * (a hint is dropped: its row is claimed). When w is set, the new rec replaces w (a rec that
 * waited for lookups) at index i. */
static void expand_and_submit(unit_t *u, const evd_change_t *c, const char *table, int64_t id, const char *raw,
                              size_t rawlen, rec_t *w, size_t i, bool hint)
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
        static const char why[] = "out of memory expanding the change";
        if (hint)
            EVD_LOG(EVD_LOG_WARN, "bad_input", F_STR("error", why), F_INT("id", id));
        else if (w)
            rec_finish(u, w, "bad_payload", why);
        else
            accept_finished(u, id, table, c->op, raw, rawlen, "bad_payload", why);
        return;
    }
    if (w) {
        u->recs[i] = r;
        rec_free(w);
    }
    r->hint = hint;
    submit_rec(u, r);
}

static void expand_unit(unit_t *u)
{
    /* The guard taken in unit_new keeps u alive while its recs are expanded and submitted. */
    for (size_t i = 0; i < u->nrecs; i++) {
        rec_t *w = u->recs[i];
        if (w->ch && !w->finished) /* waiting for lookups (the others are finished or submitted) */
            expand_and_submit(u, w->ch, w->table, w->id, w->raw, w->rawlen, w, i, false);
    }
    lres_free_all(u);
    unit_finish_rec(u);
}

/* A rec that keeps its parse c (taken from the caller) until expand_unit; NULL, logged, when out
 * of memory. */
static rec_t *rec_add_parsed(unit_t *u, int64_t id, const char *table, const char *payload, size_t len, evd_change_t *c)
{
    evd_change_t *keep = malloc(sizeof(*keep));
    rec_t *w = keep ? rec_add_bare(u, id, table, payload, len) : NULL;
    if (!w) {
        if (!keep)
            EVD_LOG(EVD_LOG_ERROR, "bad_input", F_STR("error", "out of memory"), F_INT("id", id));
        free(keep);
        return NULL;
    }
    *keep = *c;
    memset(c, 0, sizeof(*c)); /* the arena is the rec's now */
    w->ch = keep;
    w->op = keep->op;
    w->ts = keep->ts;
    return w;
}

/* Parses a payload into a new rec of u: expanded and submitted at once unless its rules need
 * lookups (then at unit_start); bad input and unmatched tables finish at once. */
void accept_payload(unit_t *u, const char *payload, size_t len, int64_t id)
{
    daemon_t *d = u->d;
    evd_change_t *c = &d->scratch;
    char err[256];
    evd_payload_status_t st = evd_payload_parse_spare(payload, len, c, &d->spare, err, sizeof(err));
    if (st != EVD_PAYLOAD_OK) {
        if (st == EVD_PAYLOAD_DOORBELL)
            snprintf(err, sizeof(err), "empty payload");
        d->n_bad++;
        evd_log_ratelimited(
            "bad_payload", "bad_input",
            (const evd_field_t[]){F_STR("reason", "bad_payload"), F_STR("error", err), F_INT("id", id), {0}});
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
    bool durable_by_notify = !u->claim && evd_set_has(&d->durable, table, strlen(table));
    struct hint_slot *h;
    if (durable_by_notify && c->id > 0 && !c->ref) {
        /* A hint: the capture's doorbell carries the change of a one-row statement. Applied
         * at once, and again when its outbox row is claimed (the row is the source of truth:
         * a hint that fails, or that a role able to NOTIFY forged, loses nothing and hides
         * nothing). One whose rules need lookups is only a doorbell: its claim goes at once. */
        lookup_ctx_t lc = {.u = u, .count_only = true};
        ring_t ring = RING_HINT_UNAPPLIED;
        if (!d->opts.dry_run && evd_rules_watches(&cfg->rules, c->schema, c->table) &&
            evd_rules_lookups(&cfg->rules, c, need_lookup, &lc) == 0 && lc.calls == 0) {
            /* A row claimed before its doorbell was heard is applied by its claim. */
            bool claimed = claimed_lately(d, c->id);
            hint_keep(d, c->id, payload, len);
            if (!claimed)
                expand_and_submit(u, c, table, c->id, NULL, 0, NULL, 0, true);
            ring = RING_HINT_APPLIED;
        }
        outbox_rung(d, ring);
    } else if (durable_by_notify) {
        /* The capture of a durable table rings a doorbell, empty or with the change and its
         * outbox id; a full change without one came from elsewhere (any role may NOTIFY):
         * refuse it. */
        d->n_bad++;
        snprintf(err, sizeof(err), "change for durably watched table %s arrived by NOTIFY", table);
        evd_log_ratelimited(
            "notify_for_durable", "bad_input",
            (const evd_field_t[]){F_STR("reason", "bad_payload"), F_STR("table", table), F_STR("error", err), {0}});
        accept_finished(u, id, table, c->op, payload, len, "bad_payload", err);
    } else if (u->claim && (h = hint_same(d, id, payload, len)) &&
               (h->confirmed || (h->flight && !h->flight->waiter))) {
        if (h->confirmed) { /* the doorbell rang after its commit and Redis confirmed the hint */
            count_change(d, table, c->op);
            accept_finished(u, id, table, c->op, payload, len, NULL, NULL);
        } else {
            /* The hint's deletions are on their way to Redis: the row is done when Redis confirms
             * them, else applied then (hint_answered). */
            rec_t *w = rec_add_parsed(u, id, table, payload, len, c);
            if (w) {
                h->flight->waiter = u;
                h->flight->waiter_i = u->nrecs - 1;
                u->lookups_pending++;
            }
        }
    } else if (!evd_rules_watches(&cfg->rules, c->schema, c->table)) {
        if (evd_set_has(&d->watched, table, strlen(table))) {
            d->n_unmatched++;
            accept_finished(u, id, table, c->op, payload, len, NULL, NULL);
        } else {
            d->n_bad++;
            snprintf(err, sizeof(err), "table %s is not watched by evictd", table);
            evd_log_ratelimited(
                "unknown_table", "bad_input",
                (const evd_field_t[]){F_STR("reason", "unknown_table"), F_STR("table", table), F_INT("id", id), {0}});
            accept_finished(u, id, table, c->op, payload, len, "unknown_table", err);
        }
    } else {
        lookup_ctx_t lc = {.u = u};
        if (evd_rules_lookups(&cfg->rules, c, need_lookup, &lc) < 0)
            EVD_LOG(EVD_LOG_WARN, "lookup_failed", F_STR("error", "out of memory"));
        if (lc.calls == 0) {
            expand_and_submit(u, c, table, id, payload, len, NULL, 0, false);
        } else {
            (void)rec_add_parsed(u, id, table, payload, len, c); /* expanded in expand_unit */
        }
    }
    if (u->nrecs > before && extra) {
        u->weight += extra;
        d->pending += extra;
    }
    evd_change_clear_spare(c, &d->spare);
}

/* All payloads of u are in: expand now or when the lookups return. */
void unit_start(unit_t *u)
{
    if (--u->lookups_pending == 0)
        expand_unit(u);
}

/* ---------------------------------------------------------------- backpressure */

void update_pause(daemon_t *d)
{
    size_t max = (size_t)d->cfg->cfg->batch_max_pending;
    bool pause = d->pending >= max || d->stopping;
    if (pause != d->paused) {
        d->paused = pause;
        if (d->listen)
            evd_pg_pause(d->listen, pause);
        if (d->listen_old)
            evd_pg_pause(d->listen_old, pause);
        EVD_LOG(EVD_LOG_DEBUG, pause ? "paused" : "resumed", F_INT("pending", (int64_t)d->pending));
    }
}
