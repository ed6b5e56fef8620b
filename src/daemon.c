/* daemon.c - `evictd run`: the loop, its connections and timers, signals, reload, stats and
 * /metrics; the pipeline is in pipeline.c and the outbox claims in outbox.c. */
#include "daemon_int.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void process_incoming(daemon_t *d);

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
        outbox_rung(d, RING_EMPTY);
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

static void reap_retired(daemon_t *d);

static void on_check(uv_check_t *h)
{
    daemon_t *d = evd_container_of(h, daemon_t, check);
    process_incoming(d);
    /* A target a reload replaced is closed once its last batch is answered: here, after the
     * callbacks of each loop turn (not from inside its own), rather than at the next stats line,
     * which may be a minute off or never come (stats_interval_s 0), while it kept reconnecting
     * to a server taken out of the config. */
    if (d->nretiring)
        reap_retired(d);
    evd_log_flush();
}

void watches_loaded(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    evd_set_clear(&d->watched);
    evd_set_clear(&d->durable);
    d->watches_failed = !res; /* asked again at each safety poll until it is read */
    if (res)
        EVD_LOG(EVD_LOG_DEBUG, "watches_read", F_INT("tables", PQntuples(res)));
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

/* Closes the listener a reload replaced, after handing on what it holds (hand_on; not when the
 * database changes or evictd stops, as for the main listener). Its SELECT 1, if still pending,
 * is failed by the close and calls back here: by then there is nothing to close. */
static void listen_old_close(daemon_t *d, bool hand_on)
{
    evd_pg_t *old = d->listen_old;
    if (!old)
        return;
    d->listen_old = NULL;
    if (hand_on)
        evd_pg_take_notifies(old);
    evd_pg_close(old, NULL, NULL);
}

/* The round trip on the old listener is back (or failed: it is not listening either). */
static void listen_old_synced(const PGresult *res, const char *err, void *arg)
{
    (void)res;
    (void)err;
    listen_old_close(arg, true);
}

static void listen_connected(evd_pg_t *pg, void *ud)
{
    daemon_t *d = ud;
    /* The new listener of a reload listens: one round trip on the old one, and it goes. The
     * server sends a connection the notifications due to it before it says it is ready for
     * the next query, so every change committed before the new LISTEN has reached evictd
     * through one of them (some through both: deletes are idempotent). */
    if (pg == d->listen && d->listen_old &&
        (!evd_pg_ready(d->listen_old) ||
         evd_pg_query(d->listen_old, "SELECT 1", 0, NULL, false, listen_old_synced, d) < 0))
        listen_old_close(d, true);
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

static int listen_start(daemon_t *d)
{
    const evd_config_t *cfg = d->cfg->cfg;
    int rc = evd_pg_new(d->loop, "listen", cfg->pg_url, cfg->channels, cfg->nchannels, &listen_handlers, d, &d->listen);
    if (rc == 0 && d->paused)
        evd_pg_pause(d->listen, true);
    return rc;
}

static int lookups_start(daemon_t *d)
{
    const evd_config_t *cfg = d->cfg->cfg;
    return has_lookups(cfg) ? evd_pg_new(d->loop, "lookups", cfg->pg_url, NULL, 0, &lookup_handlers, d, &d->lookupc)
                            : 0;
}

static int pg_start(daemon_t *d)
{
    const evd_config_t *cfg = d->cfg->cfg;
    int rc = listen_start(d);
    static const char *const names[NCLAIMERS] = {"outbox", "outbox2"};
    for (size_t i = 0; i < NCLAIMERS && rc == 0; i++) {
        d->cl[i].d = d;
        rc = evd_pg_new(d->loop, names[i], cfg->pg_url, NULL, 0, &claim_handlers, &d->cl[i], &d->cl[i].pg);
    }
    if (rc == 0)
        rc = lookups_start(d);
    return rc;
}

static void pg_stop(daemon_t *d)
{
    listen_old_close(d, false);
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

/* Undoes a targets_build that failed: targets taken from old go back (by name: target names
 * are unique), new ones are closed. */
static void targets_unbuild(const evd_config_t *cfg, target_t *t, target_t *old, size_t nold)
{
    for (size_t i = 0; i < cfg->ntargets; i++) {
        if (t[i].r) {
            size_t k = 0;
            while (k < nold && (old[k].r || strcmp(old[k].name, cfg->targets[i].name) != 0))
                k++;
            if (k < nold)
                old[k].r = t[i].r;
            else
                evd_redis_close(t[i].r, NULL, NULL);
        }
        free(t[i].name);
    }
    free(t);
}

/* Builds the target array for cfg, reusing matching targets from old (moved out of it; moved
 * back when it fails, so that old stays whole). */
static int targets_build(daemon_t *d, const evd_config_t *cfg, target_t *old, size_t nold, target_t **out)
{
    evd_redis_opts_t o;
    redis_opts(cfg, &o);
    target_t *t = calloc(cfg->ntargets ? cfg->ntargets : 1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    for (size_t i = 0; i < cfg->ntargets; i++) {
        const evd_target_cfg_t *tc = &cfg->targets[i];
        if (!(t[i].name = strdup(tc->name))) {
            targets_unbuild(cfg, t, old, nold);
            return -ENOMEM;
        }
        for (size_t k = 0; k < nold; k++) {
            if (old[k].r && !strcmp(old[k].name, tc->name) && !evd_redis_cfg_differs(old[k].r, tc)) {
                t[i].r = old[k].r;
                old[k].r = NULL;
            }
        }
        if (!t[i].r && !d->opts.dry_run) {
            int rc = evd_redis_new(d->loop, tc, &o, job_done, d, &t[i].r);
            if (rc < 0) {
                targets_unbuild(cfg, t, old, nold);
                return rc;
            }
        }
    }
    /* Only now: a build that fails leaves the old targets with the old options. */
    for (size_t i = 0; i < cfg->ntargets; i++)
        if (t[i].r)
            evd_redis_set_opts(t[i].r, &o);
    *out = t;
    return 0;
}

/* Closes a target, keeping its retries in the running total (retries_total). */
static void close_target(daemon_t *d, evd_redis_t *r)
{
    d->retries_closed += evd_redis_stats(r)->retries;
    evd_redis_close(r, NULL, NULL);
}

static void retire_target(daemon_t *d, evd_redis_t *r)
{
    evd_redis_retire(r);
    evd_redis_t **v = realloc(d->retiring, (d->nretiring + 1) * sizeof(*v));
    if (!v) {
        close_target(d, r);
        return;
    }
    d->retiring = v;
    d->retiring[d->nretiring++] = r;
}

/* Retries so far on every target, current, retired by a reload, or closed: it only grows. */
static uint64_t retries_total(const daemon_t *d)
{
    uint64_t n = d->retries_closed;
    for (size_t i = 0; i < d->ntargets; i++)
        if (d->targets[i].r)
            n += evd_redis_stats(d->targets[i].r)->retries;
    for (size_t i = 0; i < d->nretiring; i++)
        n += evd_redis_stats(d->retiring[i])->retries;
    return n;
}

static void reap_retired(daemon_t *d)
{
    for (size_t i = 0; i < d->nretiring;) {
        if (evd_redis_idle(d->retiring[i])) {
            close_target(d, d->retiring[i]);
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
    uint64_t retries = retries_total(d);
    uint64_t dl_lines = evd_dl_lines(d->dl), dl_dropped = evd_dl_dropped(d->dl);
    double p50 = 0, p99 = 0;
    if (d->nlags) {
        qsort(d->lags, d->nlags, sizeof(double), cmp_double);
        p50 = evd_quantile(d->lags, d->nlags, 0.5);
        p99 = evd_quantile(d->lags, d->nlags, 0.99);
    }
    EVD_LOG(EVD_LOG_INFO, "stats", F_INT("changes", d->n_changes), F_INT("keys", d->n_keys),
            F_INT("patterns", d->n_patterns), F_INT("retries", retries - d->retries_seen),
            F_INT("dead_letters", (int64_t)(dl_lines - d->dl_lines_seen)),
            F_INT("dead_letters_dropped", (int64_t)(dl_dropped - d->dl_dropped_seen)),
            F_INT("unmatched", d->n_unmatched), F_INT("bad_input", d->n_bad), F_DBL("lag_p50_ms", p50),
            F_DBL("lag_p99_ms", p99), F_INT("pending", (int64_t)d->pending));
    d->retries_seen = retries;
    d->dl_lines_seen = dl_lines;
    d->dl_dropped_seen = dl_dropped;
    d->n_changes = d->n_keys = d->n_patterns = d->n_unmatched = d->n_bad = 0;
    d->nlags = 0;
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

static int http_handler(const char *path, evd_buf_t *body, void *ud);

static int port_of(const struct sockaddr_storage *a)
{
    return a->ss_family == AF_INET    ? ntohs(((const struct sockaddr_in *)a)->sin_port)
           : a->ss_family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)a)->sin6_port)
                                      : -1;
}

/* The old listener listens again at old (a reload that had it give up its port failed). */
static void http_restore(daemon_t *d, const struct sockaddr_storage *old)
{
    if (evd_http_start(d->loop, (const struct sockaddr *)old, http_handler, d, &d->http) < 0) {
        d->http = NULL;
        EVD_LOG(EVD_LOG_ERROR, "http", F_STR("error", "the old listener cannot listen again: none until a reload"));
    }
}

/* Listens on a reload's address na. When the old listener holds that port (the same address
 * spelled otherwise, or [::ffff:127.0.0.1] for 127.0.0.1) it closes first (its socket at once):
 * *moved, with its address in *old; if na still cannot be bound it listens again there. */
static int http_rebind(daemon_t *d, const struct sockaddr_storage *na, evd_http_t **out, struct sockaddr_storage *old,
                       bool *moved)
{
    *moved = false;
    int rc = evd_http_start(d->loop, (const struct sockaddr *)na, http_handler, d, out);
    if (rc != UV_EADDRINUSE || !d->http || evd_http_bound(d->http, old) < 0 || port_of(old) != port_of(na))
        return rc;
    evd_http_close(d->http);
    d->http = NULL;
    rc = evd_http_start(d->loop, (const struct sockaddr *)na, http_handler, d, out);
    if (rc < 0)
        http_restore(d, old);
    *moved = rc == 0;
    return rc;
}

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
    /* A new http.listen is bound before anything else changes: one that cannot be refuses the
     * reload, and the old listener stays. */
    const char *ol = d->cfg->cfg->http_listen, *nl = cfg->http_listen;
    bool http_changed = (ol == NULL) != (nl == NULL) || (ol && strcmp(ol, nl) != 0);
    bool http_retry = !http_changed && nl && !d->http; /* a listener lost by a reload (http_restore) */
    evd_http_t *nh = NULL;
    struct sockaddr_storage na, was;
    bool moved = false;
    if ((http_changed || http_retry) && nl) {
        int rc = evd_http_addr(d->loop, nl, false, &na);
        rc = rc == 0 ? http_rebind(d, &na, &nh, &was, &moved) : rc;
        static const char name_msg[] = "a host name is resolved only at start: give an address, or restart evictd";
        const char *why = rc == UV_ENOTSUP ? name_msg : rc < 0 ? uv_strerror(rc) : NULL;
        if (why && http_retry) {
            EVD_LOG(EVD_LOG_ERROR, "http", F_STR("listen", nl), F_STR("error", why));
        } else if (why) {
            EVD_LOG(EVD_LOG_ERROR, "config_rejected", F_STR("path", d->opts.config_path),
                    F_STR("setting", "http.listen"), F_STR("listen", nl), F_STR("error", why));
            evd_config_free(cfg);
            return;
        }
        http_changed = nh != NULL; /* (a retry that failed changes nothing) */
    }
    cfgref_t *ref = calloc(1, sizeof(*ref));
    target_t *nt = NULL;
    if (!ref || targets_build(d, cfg, d->targets, d->ntargets, &nt) < 0) {
        EVD_LOG(EVD_LOG_ERROR, "config_rejected", F_STR("error", "out of memory"));
        if (nh)
            evd_http_close(nh);
        if (moved)
            http_restore(d, &was);
        free(ref);
        evd_config_free(cfg);
        return;
    }
    if (http_changed) {
        if (d->http)
            evd_http_close(d->http);
        d->http = nh;
        EVD_LOG(EVD_LOG_INFO, "http", F_STR("listen", nl ? nl : "off"));
    }
    target_t *ot = d->targets;
    size_t nold = d->ntargets;
    d->targets = nt;
    d->ntargets = cfg->ntargets;
    /* Only now: a retired target hands its waiting jobs to the new one of the same name. */
    for (size_t i = 0; i < nold; i++) {
        if (ot[i].r)
            retire_target(d, ot[i].r);
        free(ot[i].name);
    }
    free(ot);
    const evd_config_t *old = d->cfg->cfg;
    bool url_changed = strcmp(old->pg_url, cfg->pg_url) != 0;
    bool chan_changed = old->nchannels != cfg->nchannels;
    for (size_t i = 0; !chan_changed && i < cfg->nchannels; i++)
        chan_changed = strcmp(old->channels[i], cfg->channels[i]) != 0;
    bool lookups_changed = has_lookups(old) != has_lookups(cfg);
    ref->cfg = cfg;
    ref->refs = 1;
    cfg_put(d->cfg);
    d->cfg = ref;
    hints_forget(d);
    apply_log(d, cfg);
    if (evd_dl_reopen(d->dl, cfg->dl_path, cfg->dl_max_bytes) < 0)
        EVD_LOG(EVD_LOG_ERROR, "dead_letter", F_STR("error", "cannot reopen"), F_STR("path", cfg->dl_path));
    stats_arm(d);
    if (url_changed) {
        /* Another database, perhaps: rows claimed from the old one are not acknowledged in it
         * (the same ids there are other changes); if it is the same one, they are claimed again. */
        d->db_gen++;
        outbox_forget(d, true);
        pg_stop(d);
        if (pg_start(d) < 0)
            EVD_LOG(EVD_LOG_ERROR, "config_reloaded", F_STR("error", "cannot start postgres connections"));
    } else {
        /* The same database: only what changed is replaced. A new channel list gets a new
         * listener, and the old one delivers until it listens (listen_connected): closing it
         * first lost the notify-only changes committed in between. The outbox connections
         * stay, and so do their claims. */
        int rc = 0;
        if (chan_changed) {
            /* Again before the last one's new listener listens: that one goes, the one that
             * listens stays until the newest listens. */
            if (d->listen_old && (!d->listen || !evd_pg_ready(d->listen))) {
                if (d->listen)
                    evd_pg_close(d->listen, NULL, NULL);
            } else {
                listen_old_close(d, true);
                d->listen_old = d->listen;
            }
            d->listen = NULL;
            rc = listen_start(d);
        }
        if (lookups_changed && d->lookupc) {
            evd_pg_close(d->lookupc, NULL, NULL);
            d->lookupc = NULL;
        } else if (lookups_changed && rc == 0) {
            rc = lookups_start(d);
        }
        if (rc < 0)
            EVD_LOG(EVD_LOG_ERROR, "config_reloaded", F_STR("error", "cannot start postgres connections"));
    }
    if (!url_changed && d->cl[0].pg && evd_pg_ready(d->cl[0].pg)) {
        /* Re-check the capture against the new rules, on a connection with no claim open (else
         * at the next safety poll that finds one). */
        evd_pg_t *pg = quiet_conn(d, false);
        if (!pg || evd_pg_query(pg, SQL_WATCHES, 0, NULL, false, watches_loaded, d) < 0) {
            d->watches_failed = true;
            d->watches_tried_at = 0;
        }
    }
    EVD_LOG(EVD_LOG_INFO, "config_reloaded", F_STR("path", cfg->path), F_INT("rules", (int64_t)cfg->rules.n),
            F_INT("targets", (int64_t)cfg->ntargets), F_BOOL("postgres_reconnect", url_changed || chan_changed));
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
    if (!d->units && !d->clearing_flag && !d->claim_cl)
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
    outbox_stop(d);
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
 * costs two index probes, not a count; min from the floor check's floor, so that it does not
 * walk the index entries of rows deleted but not yet vacuumed). */
static void backlog_refresh(daemon_t *d)
{
    static const char sql[] = "SELECT coalesce(max(id) - min(id) + 1, 0) FROM evictd.outbox WHERE id > $1";
    /* Not inside a claim's transaction: the figure of the last scrape stays meanwhile. */
    evd_pg_t *pg = d->backlog_query || d->opts.dry_run ? NULL : quiet_conn(d, false);
    if (!pg)
        return;
    char from[32];
    snprintf(from, sizeof(from), "%" PRId64, d->floor_from);
    const char *params[1] = {from};
    if (evd_pg_query(pg, sql, 1, params, true, backlog_done, d) == 0)
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
    for (int i = 0; i < EVD_DL_REASONS; i++)
        d->m.dead_letters[i] = evd_dl_lines_by_reason(d->dl, i);
    d->m.dead_letters_dropped = evd_dl_dropped(d->dl);
    int rc = evd_metrics_render(&d->m, body);
    /* Per-target counters, from each target's stats. */
    static const struct {
        const char *name, *help;
        size_t off;
    } per_target[] = {
        {"evictd_keys_deleted_total", "Keys in confirmed UNLINKs, by target.", offsetof(evd_redis_stats_t, keys)},
        {"evictd_patterns_deleted_total", "Pattern scans completed, by target.", offsetof(evd_redis_stats_t, patterns)},
        {"evictd_retries_total", "Batch retries, by target.", offsetof(evd_redis_stats_t, retries)},
    };
    for (size_t m = 0; m < EVD_ARRAY_LEN(per_target); m++) {
        rc |= evd_buf_printf(body, "# HELP %s %s\n# TYPE %s counter\n", per_target[m].name, per_target[m].help,
                             per_target[m].name);
        for (size_t i = 0; i < d->ntargets; i++) {
            if (!d->targets[i].r)
                continue;
            const char *st = (const char *)evd_redis_stats(d->targets[i].r);
            rc |= evd_buf_printf(body, "%s{target=\"", per_target[m].name);
            rc |= evd_metrics_label(body, d->targets[i].name);
            rc |= evd_buf_printf(body, "\"} %llu\n", (unsigned long long)*(const uint64_t *)(st + per_target[m].off));
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
    for (size_t i = 0; i < d->ntargets; i++) {
        if (!d->targets[i].r)
            continue;
        rc |= evd_buf_puts(body, "evictd_reconnects_total{conn=\"redis:");
        rc |= evd_metrics_label(body, d->targets[i].name);
        rc |= evd_buf_printf(body, "\"} %llu\n", (unsigned long long)evd_redis_stats(d->targets[i].r)->reconnects);
    }
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
    uv_close((uv_handle_t *)&d->answer_timer, handle_close_noop);
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
    d->claim_flag = -1;
    d->flag = -1;
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
    uv_timer_init(d->loop, &d->answer_timer);
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
        struct sockaddr_storage addr;
        rc = evd_http_addr(d->loop, cfg->http_listen, true, &addr);
        rc = rc == 0 ? evd_http_start(d->loop, (const struct sockaddr *)&addr, http_handler, d, &d->http) : rc;
        if (rc < 0) {
            EVD_LOG(EVD_LOG_ERROR, "http", F_STR("config", opts->config_path), F_STR("setting", "http.listen"),
                    F_STR("listen", cfg->http_listen), F_STR("error", uv_strerror(rc)));
            evd_log_flush();
            return 1;
        }
        EVD_LOG(EVD_LOG_INFO, "http", F_STR("listen", cfg->http_listen));
    }
    if (pg_start(d) < 0)
        return 1;
    uv_run(d->loop, UV_RUN_DEFAULT);
    /* The loop ran until no dead-letter write was left: these are the final counts. */
    uint64_t dl_lines = evd_dl_lines(d->dl), dl_dropped = evd_dl_dropped(d->dl);
    /* Dead-letter writes queued by cancelled jobs complete here. */
    evd_dl_close(d->dl);
    uv_run(d->loop, UV_RUN_DEFAULT);
    EVD_LOG(EVD_LOG_INFO, "stopped", F_INT("changes", (int64_t)d->t_changes), F_INT("dead_letters", (int64_t)dl_lines),
            F_INT("dead_letters_dropped", (int64_t)dl_dropped), F_INT("unacknowledged", (int64_t)d->pending),
            F_INT("doorbells", (int64_t)d->t_doorbells), F_INT("hints", (int64_t)d->t_hints),
            F_INT("idle_flags_set", (int64_t)d->t_idle_sets), F_INT("claims", (int64_t)d->t_claims),
            F_INT("rows_claimed", (int64_t)d->t_claimed), F_INT("unrung", (int64_t)d->t_unrung));
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
