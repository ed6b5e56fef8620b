/* outbox.c - the outbox side of `evictd run`: claims on two connections taking turns, acks,
 * releases on retry backoff, the idle flag, passes and the floor check. */
#include "daemon_int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

/* Rows per claim at most (1000: 135k rows/s in the benchmark drain, 2000: 175k, 4000: 154k). */
#define CLAIM_ROWS 2000
#define LINGER_MS 1           /* wait after an empty claim before setting the idle flag ... */
#define LINGER_MIN_ROWS 4.0   /* ... when rows have been arriving at least this fast per LINGER_MS */
#define RESTART_BACK 1000     /* ids below the lowest a pass found where the next pass starts */
#define LIGHT_ROWS_PER_MS 2.5 /* below this arrival rate a hint sets the idle flag again at once, to a lease ... */
#define HEAVY_ROWS_PER_MS 4.0 /* ... and from this one a lease goes back to 0 */
#define RATE_WINDOW_MS 100    /* arrival_rate's window */
#define LIGHT_MAX_PENDING 256 /* no lease while more changes than this are held (evictd is behind) */
#define FLAG_LEASE 2          /* claim_flag / flag: a lease (the flag holds its end, epoch ms) */
/* Under a lease: the claim that acknowledges rows applied from their doorbell waits this long ... */
#define HINT_LINGER_MS 4
#define GAP_MS 1      /* ... or until an id below the newest hint has been missing this long (gap_since) */
#define LEASE_MS 1000 /* light load: writes ring until this long after the last claim that set the flag (then once) */
#define LEASE_BAN_MS 1000 /* no lease for this long after a window in which most claimed rows rang none */
#define FLAG_FRESH_MS 100 /* a claim that would set the lease skips the setval when one did lately */
/* The least time between claims that reach the end, without a lease, and under one while rows
 * arrive PACE_ROWS_PER_MS fast (a burst after a writer's stall at 2,000/s paced at 2.5 and cost
 * the latency benchmark's p99); PACE_HEAVY_MS while they arrive PACE_HEAVY_ROWS_PER_MS fast, when
 * the CPU is what limits the writers (pgbench, fsync off: 0.66x -> 0.73x of the bare trigger
 * against 4 ms, 5 of 5 repetitions). */
#define PACE_MS 4
#define PACE_ROWS_PER_MS 4.0
#define PACE_HEAVY_MS 12
#define PACE_HEAVY_ROWS_PER_MS 8.0

/* SQL the daemon runs. Claims and acks go through their own connection, never the LISTEN one. */
static const char SQL_COMMIT[] = "COMMIT";
static const char SQL_ROLLBACK[] = "ROLLBACK";
/* Set up once per connection of "outbox": claims and acks are then one round trip each
 * (BEGIN + claim, COMMIT), sent as one simple query whose only parameters are ids and counts
 * that evictd prints itself. A claim deletes the rows it takes, in its transaction: the
 * deletion commits (the ack) only once their batch is confirmed or dead-lettered, and a
 * released or failed claim rolls back, which puts them back. Each row is still locked (FOR
 * UPDATE SKIP LOCKED in the ARRAY() init plan) and then deleted, a LOCK and a DELETE WAL record
 * as before (pg_waldump), but in one statement: no ack statement with its own index scan, which
 * the writers feel under steady load. The init plan hands the delete the rows' ctids, a TID
 * scan (enable_seqscan is off): no second index descent per row (5.25 -> 4.15 us of backend CPU a row
 * against deleting by id, 200-row claims). A row locked by this transaction stays where it is until
 * the delete. While a backlog is drained (the last claim came back full) a claim
 * locks its rows instead and the ack deletes them: the delete then runs while the other
 * connection's batch is in flight rather than before this one's, and a million-row drain went
 * at 150k rows/s that way against 116k deleting at the claim. Commits do not wait for their
 * WAL flush: an ack lost in a crash only brings its rows back, and deleting their keys again
 * is harmless. */
#define CLAIM_SELECT(cols)                                                                                             \
    "SELECT " cols " FROM evictd.outbox WHERE id > $1 AND id <> ALL($2) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED"
#define CLAIM_DELETE                                                                                                   \
    "DELETE FROM evictd.outbox WHERE ctid = ANY (ARRAY(" CLAIM_SELECT("ctid") ")) RETURNING id, payload"
/* Claims walk the primary key in id order, whatever the statistics say: an outbox analyzed while
 * empty (its pages full of deleted rows) is estimated at one row, and a claim planned on that
 * took a bitmap scan and sorted every row above the cursor, spilling to disk, because LIMIT does
 * not bound a sort under FOR UPDATE: a million-row backlog then drained at ~20k rows/s instead of
 * ~200k (benchmark, auto_explain). Without sorts the only plan left is the ordered index scan.
 * The sort the claim still needs (its rows in id order) then costs 1e10 in the plan, over
 * jit_above_cost: without jit = off every claim was compiled, 30-100 ms each. Nor sequential
 * scans: a claim prepared while the outbox is a page or two (drained and vacuumed) deleted its
 * rows through one, and its plan stayed while the table grew between vacuums: at 2,000 writes/s
 * most claims read all of its 70-odd pages (pg_stat_user_tables.seq_scan; heapgetpage in perf). */
static const char SQL_CLAIM_SETUP[] =
    "SET synchronous_commit = off; SET enable_sort = off; SET enable_seqscan = off; SET jit = off; "
    "PREPARE evictd_claim(bigint, bigint[], int) AS "
    "WITH c AS (" CLAIM_DELETE ") SELECT id, payload FROM c ORDER BY id; "
    "PREPARE evictd_claim_snap(bigint, bigint[], int, bool) AS "
    "WITH c AS (" CLAIM_DELETE ") "
    "SELECT c.id, c.payload, pg_catalog.txid_snapshot_xmin(s.snap), pg_catalog.txid_snapshot_xmax(s.snap), "
    "CASE WHEN $4 THEN pg_catalog.txid_current() END, "
    "pg_catalog.pg_sequence_last_value('evictd.idle'::pg_catalog.regclass) "
    "FROM (SELECT pg_catalog.txid_current_snapshot() AS snap) AS s LEFT JOIN c ON true ORDER BY c.id; "
    "PREPARE evictd_claim_lock(bigint, bigint[], int) AS " CLAIM_SELECT(
        "id, payload") "; "
                       "PREPARE evictd_ack(bigint[]) AS DELETE FROM evictd.outbox WHERE id = ANY($1)";
static const char SQL_PEEK[] = "SELECT id, payload FROM evictd.outbox WHERE id > $1 ORDER BY id LIMIT $2";
/* A claim that was released (retry backoff) acks only rows no other replica has locked. */
static const char SQL_ACK_RELEASED[] = "DELETE FROM evictd.outbox WHERE id IN (SELECT id FROM evictd.outbox "
                                       "WHERE id = ANY($1::bigint[]) FOR UPDATE SKIP LOCKED)";
/* Sets the idle flag (0 or 1) in the same round trip as the claim that looks once more after it;
 * under light load, to a lease: the server's epoch ms LEASE_MS ahead. */
static const char SQL_IDLE[] = "SELECT pg_catalog.setval('evictd.idle', %d); ";
static const char SQL_LEASE[] =
    "SELECT pg_catalog.setval('evictd.idle', (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) "
    "* 1000)::int8 + %d); ";

/* ---------------------------------------------------------------- acks and unit completion */

static void begin_done(const PGresult *res, const char *err, void *arg);
static double arrival_rate(daemon_t *d, size_t rows);
static bool light_load(daemon_t *d);

/* Ends the transaction open on cl's connection. Returns what evd_pg_query did: when out of
 * memory, the next claim on the connection sends the ROLLBACK first (needs_rollback); when the
 * connection is down, the server rolled it back. */
static int rollback(claimer_t *cl)
{
    int rc = evd_pg_query(cl->pg, SQL_ROLLBACK, 0, NULL, false, begin_done, NULL);
    if (rc == -ENOMEM)
        cl->needs_rollback = true;
    if (rc < 0)
        EVD_LOG(EVD_LOG_DEBUG, "rollback_skipped");
    return rc;
}

/* The next claims start at id low: the cursor, where passes restart and the floor go back below
 * it. Its rows were skipped while held (claims and the floor check leave held ids out) and moved
 * past, and after a long enough retry they would otherwise be claimed again only after a
 * reconnect. A claim in flight was sent while they were held: it does not move the cursor on. */
static void lower_to(daemon_t *d, int64_t low)
{
    int64_t to = low - 1;
    if (to < d->cursor)
        d->cursor = to;
    d->cursor_gen++;
    if (to < d->restart)
        d->restart = to;
    if (to < d->floor_from)
        d->floor_from = to;
    d->floor_pend_m = -1; /* a raise worked out while they were held would pass them again */
    d->want_drain = true;
}

/* cl's transaction is over: the rows its ROLLBACK was to give back are there to claim. */
static void rows_returned(claimer_t *cl)
{
    if (cl->back_low > 0 && cl->back_gen == cl->d->db_gen)
        lower_to(cl->d, cl->back_low);
    cl->back_low = 0;
}

static void rows_back_done(const PGresult *res, const char *err, void *arg)
{
    claimer_t *cl = arg;
    (void)res;
    (void)err;
    rows_returned(cl); /* done or failed (the connection is gone), the transaction is over */
    maybe_drain(cl->d);
}

/* u's rows stay in the outbox, or go back to it, unacknowledged (an ack withheld, failed or not
 * sent): the next claims start at them (lower_to). end_tx: u's transaction is still open; its
 * ROLLBACK goes first, and only once it is done are the rows there to claim (a claim on the
 * other connection meanwhile would skip them, still locked, and move on). Returns what queueing
 * the ROLLBACK did (0 when end_tx is false). */
static int rows_back(unit_t *u, bool end_tx)
{
    daemon_t *d = u->d;
    bool lower = u->claim && u->low > 0 && !d->opts.dry_run && u->db_gen == d->db_gen;
    int rc = 0;
    if (end_tx) {
        /* Next on its connection: after a failed ack a claim or another query may be queued
         * there already, which must not run inside the aborted transaction (nor this ROLLBACK
         * inside that claim's). Out of memory: the next claim there sends it (needs_rollback),
         * and the rows are back only then too. */
        claimer_t *cl = u->cl;
        rc = evd_pg_query_next(cl->pg, SQL_ROLLBACK, rows_back_done, cl);
        if (rc == -ENOMEM)
            cl->needs_rollback = true;
        if ((rc == 0 || rc == -ENOMEM) && lower) {
            if (cl->back_low == 0 || u->low < cl->back_low)
                cl->back_low = u->low;
            cl->back_gen = d->db_gen;
            return rc;
        }
    }
    if (lower)
        lower_to(d, u->low);
    return rc;
}

/* A COMMIT in a transaction that an earlier statement aborted answers ROLLBACK: nothing deleted. */
static bool rolled_back(const PGresult *res)
{
    return strcmp(PQcmdStatus((PGresult *)res), "ROLLBACK") == 0;
}

static void after_ack(const PGresult *res, const char *err, void *arg)
{
    unit_t *u = arg;
    daemon_t *d = u->d;
    if (res && rolled_back(res)) {
        EVD_LOG(EVD_LOG_WARN, "ack_failed", F_STR("error", "transaction rolled back"),
                F_INT("changes", (int64_t)u->nrecs));
        (void)rows_back(u, false);
    } else if (!res) {
        EVD_LOG(EVD_LOG_WARN, "ack_failed", F_STR("error", err), F_INT("changes", (int64_t)u->nrecs));
        /* A failed delete: end the transaction it left open (its rows stay in the outbox and
         * are claimed again). Not after a failed COMMIT, which ended it: a ROLLBACK queued now
         * would land in the next claim's transaction, queued behind the COMMIT, and undo it. */
        (void)rows_back(u, u->in_tx && !u->deleted);
    }
    unit_free(u);
    maybe_drain(d);
}

/* Appends the outbox ids of u's records, comma-separated (first: none written yet). */
static int put_ids(const unit_t *u, evd_buf_t *b, bool *first)
{
    int rc = 0;
    for (size_t i = 0; i < u->nrecs && rc == 0; i++) {
        int64_t id = u->recs[i]->id;
        if (id < 0)
            continue;
        /* By hand: printf of these lists was a tenth of evictd's time in an outbox drain. */
        char tmp[24];
        char *p = tmp + sizeof(tmp);
        uint64_t v = (uint64_t)id;
        do {
            *--p = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        if (!*first)
            *--p = ',';
        rc = evd_buf_append(b, p, (size_t)(tmp + sizeof(tmp) - p));
        *first = false;
    }
    return rc;
}

/* The ids of u as an array literal. */
static void ids_param(unit_t *u, evd_buf_t *b)
{
    bool first = true;
    int rc = evd_buf_putc(b, '{');
    rc = rc == 0 ? put_ids(u, b, &first) : rc;
    if (rc == 0)
        rc = evd_buf_putc(b, '}');
    (void)rc;
}

/* Outbox ids among u's records. */
static size_t rec_ids(const unit_t *u)
{
    size_t n = 0;
    for (size_t i = 0; i < u->nrecs; i++)
        n += u->recs[i]->id >= 0;
    return n;
}

/* Where a released claim's rows are deleted: not inside another claim's transaction (one
 * sent on its connection after the release), which a rollback of that claim would undo,
 * leaving rows no longer held to be claimed and applied again. Its own connection when no
 * other claim went on it since, else one with no claim open or on its way. */
static evd_pg_t *released_ack_conn(const unit_t *u)
{
    const daemon_t *d = u->d;
    const claimer_t *own = u->cl;
    if ((own->open == NULL || own->open == u) && d->claim_cl != own && own->pg && evd_pg_ready(own->pg) &&
        !own->needs_rollback)
        return own->pg;
    for (size_t k = 0; k < NCLAIMERS; k++) {
        const claimer_t *cl = &d->cl[k];
        if (cl->pg && evd_pg_ready(cl->pg) && !cl->open && d->claim_cl != cl && !cl->needs_rollback)
            return cl->pg;
    }
    return d->lookupc && evd_pg_ready(d->lookupc) ? d->lookupc : NULL;
}

/* Acknowledges u's rows: when its claim's transaction is open, COMMIT (the claim deleted them)
 * or DELETE + COMMIT (it locked them); else a DELETE of the rows no other replica has locked. */
void unit_send_ack(unit_t *u)
{
    daemon_t *d = u->d;
    if (u->claim && u->db_gen != d->db_gen && !d->opts.dry_run)
        EVD_LOG(EVD_LOG_INFO, "ack_skipped", F_STR("reason", "postgres.url changed"),
                F_INT("changes", (int64_t)u->nrecs));
    if (!u->claim || d->opts.dry_run || u->db_gen != d->db_gen) {
        if (u->cl && u->cl->open == u)
            u->cl->open = NULL;
        unit_free(u);
        maybe_drain(d);
        return;
    }
    if (u->keep) {
        /* Its rows go back to the outbox (rollback) or stay there (released): claimed again, not
         * before the safety poll's interval (a dead-letter file that cannot be written would
         * otherwise have them claimed and failed again at once). */
        EVD_LOG(EVD_LOG_WARN, "ack_withheld", F_STR("reason", u->keep), F_INT("changes", (int64_t)u->nrecs));
        d->withheld_until = uv_now(d->loop) + (uint64_t)d->cfg->cfg->poll_interval_ms;
        (void)rows_back(u, u->in_tx);
        if (u->cl->open == u)
            u->cl->open = NULL;
        unit_free(u);
        maybe_drain(d);
        return;
    }
    evd_buf_t ids = {0};
    int rc = 0;
    if (u->in_tx && u->deleted && rec_ids(u) != u->claimed) {
        /* A claimed row has no record here (out of memory while accepting it): put every row
         * back and delete those that have one; the others are claimed again. */
        u->in_tx = false;
        rc = rows_back(u, true);
    }
    if (u->in_tx && u->deleted) {
        rc = evd_pg_query(u->cl->pg, SQL_COMMIT, 0, NULL, false, after_ack, u);
    } else if (u->in_tx) {
        rc = evd_buf_puts(&ids, "EXECUTE evictd_ack('");
        ids_param(u, &ids);
        rc = rc == 0 ? evd_buf_puts(&ids, "'); COMMIT") : rc;
        rc = rc == 0 ? evd_pg_query(u->cl->pg, ids.data, 0, NULL, false, after_ack, u) : rc;
    } else if (rc == 0) {
        ids_param(u, &ids);
        const char *params[1] = {ids.data};
        evd_pg_t *pg = released_ack_conn(u);
        rc = pg ? evd_pg_query(pg, SQL_ACK_RELEASED, 1, params, true, after_ack, u) : -1;
    }
    evd_buf_free(&ids);
    if (u->cl->open == u)
        u->cl->open = NULL;
    if (rc == 0) {
        /* The next claim queues behind the ack and goes as soon as it is done. */
        maybe_drain(d);
        return;
    }
    /* Not connected, or out of memory: the rows stay in the outbox and are claimed again
     * (deletes are idempotent, so repeating them is harmless). A transaction still open ends
     * first: the next claim on its connection would run inside it. */
    EVD_LOG(EVD_LOG_WARN, "ack_failed", F_STR("error", rc == -ENOMEM ? "out of memory" : "postgres connection down"),
            F_INT("changes", (int64_t)u->nrecs));
    (void)rows_back(u, u->in_tx);
    unit_free(u);
    maybe_drain(d);
}

/* ---------------------------------------------------------------- outbox claims */

void release_claim(unit_t *u)
{
    daemon_t *d = u->d;
    if (!u->in_tx || u->cl->open != u)
        return;
    /* Rolling back puts back the rows the claim deleted, or unlocks those it locked. When it
     * cannot be sent (out of memory; or the connection is down, which rolls back anyway) the
     * claim stays as it is: marked released with its transaction still open, the next claim on
     * the connection would run inside it, and its COMMIT would commit this claim's deletes. */
    int rc = evd_pg_query(u->cl->pg, SQL_ROLLBACK, 0, NULL, false, begin_done, NULL);
    if (rc == -ENOMEM)
        return;
    u->in_tx = false;
    u->released = true;
    u->cl->open = NULL;
    if (rc == 0)
        maybe_drain(d);
}

/* The ids of every claimed record in memory, as an array literal: claims skip them. */
static void held_ids(daemon_t *d, evd_buf_t *b)
{
    bool first = true;
    int rc = evd_buf_putc(b, '{');
    for (unit_t *u = d->units; u && rc == 0; u = u->next)
        if (u->claim && u->db_gen == d->db_gen) /* (ids in another database say nothing here) */
            rc = put_ids(u, b, &first);
    if (rc == 0)
        rc = evd_buf_putc(b, '}');
    (void)rc;
}

static void claim_done(const PGresult *res, const char *err, void *arg);
static void claim_setup_done(const PGresult *res, const char *err, void *arg);
static void on_poll_timer(uv_timer_t *t);

/* The safety poll, in poll_interval_ms; not once stopping (the timer is then the shutdown poll's). */
static void safety_poll(daemon_t *d)
{
    if (!d->stopping)
        uv_timer_start(&d->poll_timer, on_poll_timer, (uint64_t)d->cfg->cfg->poll_interval_ms, 0);
}

/* An outbox connection where a query lands outside any claim's transaction: up, no claim open or
 * on its way, no ROLLBACK owed (what is queued there, an ack or a ROLLBACK, ends its transaction
 * first: a ROLLBACK after a failed ack goes next, rows_back). One with nothing queued if there is
 * one, else (idle_only false) one with an ack queued. For queries that must not land inside a
 * claim: one that failed there would abort the claim's transaction, and its COMMIT would answer
 * ROLLBACK. */
evd_pg_t *quiet_conn(daemon_t *d, bool idle_only)
{
    evd_pg_t *busy = NULL;
    for (size_t k = 0; k < NCLAIMERS; k++) {
        claimer_t *cl = &d->cl[k];
        if (!cl->pg || !evd_pg_ready(cl->pg) || cl->open || d->claim_cl == cl || cl->needs_rollback)
            continue;
        if (!evd_pg_busy(cl->pg))
            return cl->pg;
        busy = busy ? busy : cl->pg;
    }
    return idle_only ? NULL : busy;
}

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
        /* A ROLLBACK that could not be queued goes first (before the setup: a rollback would
         * undo its SETs); still out of memory: no claim now, the safety poll tries again. */
        if (cl->needs_rollback) {
            if (evd_pg_query(cl->pg, SQL_ROLLBACK, 0, NULL, false, rows_back_done, cl) < 0) {
                safety_poll(d);
                return;
            }
            cl->needs_rollback = false;
        }
        if (!cl->setup)
            cl->setup = evd_pg_query(cl->pg, SQL_CLAIM_SETUP, 0, NULL, false, claim_setup_done, cl) == 0;
        /* What the claim does is worked out first and taken on only once it is sent: one that
         * cannot be (out of memory) leaves every want for the next. */
        bool sets_idle = d->want_idle;
        bool checks = d->want_check && !d->want_idle;
        /* Under light load every write may ring (a lease): applied from its doorbell, one hop. Else
         * only the first one after evictd is idle rings (1), or none (0). */
        int flag = d->want_idle ? (light_load(d) ? FLAG_LEASE : 1) : d->want_clear ? 0 : -1;
        /* A claim that arms the flag, or looks while transactions that may not have rung are
         * in flight, returns its snapshot too (claim_snapshot). */
        bool snap = sets_idle || d->horizon || checks;
        bool locks = !snap && d->claimed_full;
        /* Under light load every claim renews the lease; a setval is a WAL record, so one that set
         * it lately stands for it. */
        uint64_t now = uv_now(d->loop);
        bool fresh = flag == FLAG_LEASE && d->flag == FLAG_LEASE && now - d->flag_set_at < FLAG_FRESH_MS;
        evd_buf_t q = {0};
        rc = flag == FLAG_LEASE && !fresh ? evd_buf_printf(&q, SQL_LEASE, LEASE_MS)
             : flag >= 0 && !fresh        ? evd_buf_printf(&q, SQL_IDLE, flag)
                                          : 0;
        rc = rc == 0 ? evd_buf_printf(&q, "BEGIN; EXECUTE evictd_claim%s(%s, '",
                                      snap    ? "_snap"
                                      : locks ? "_lock"
                                              : "",
                                      cursor)
                     : rc;
        held_ids(d, &q);
        rc = rc == 0 ? evd_buf_printf(&q, "', %s%s)", limit, snap ? (sets_idle ? ", true" : ", false") : "") : rc;
        rc = rc == 0 ? evd_pg_query(cl->pg, q.data, 0, NULL, false, claim_done, cl) : rc;
        evd_buf_free(&q);
        if (rc == 0) {
            d->claim_sets_idle = sets_idle;
            d->claim_checks = checks;
            d->claim_flag = flag;
            d->claim_snap = snap;
            d->claim_locks = locks;
            if (flag >= 0 && !fresh)
                d->flag_set_at = now;
            d->want_idle = d->want_clear = d->want_check = false;
            d->rung_in_claim = false;
        }
    }
    if (rc == 0) {
        d->claim_cl = cl;
        d->claim_from = d->cursor;
        d->claim_gen = d->cursor_gen;
        d->claim_sent = uv_hrtime();
    } else {
        /* Out of memory: nothing went, and no doorbell may ring again; the safety poll claims. */
        EVD_LOG(EVD_LOG_ERROR, "claim_failed", F_STR("error", "out of memory"));
        d->want_drain = true;
        safety_poll(d);
    }
}

/* Claims the next chunk when there is room, nothing else is claiming and a claim connection
 * has no batch in flight. */
static void floor_try(daemon_t *d);

void maybe_drain(daemon_t *d)
{
    if (d->accepting) {
        d->drain_deferred = true;
        return;
    }
    update_pause(d);
    floor_try(d);
    /* Lookups need their connection: draining without it would widen every lookup. */
    if ((d->stopping ? !d->last_claim : d->paused) || d->claim_cl || !d->watched_loaded ||
        (d->lookupc && !evd_pg_ready(d->lookupc)))
        return;
    /* Idle: the flag is set, so the next write rings; until then only the safety poll claims,
     * which is always on its way while evictd is idle. */
    if (d->idle && !d->want_drain) {
        if (!uv_is_active((uv_handle_t *)&d->poll_timer))
            safety_poll(d);
        return;
    }
    /* Paced (claim_done): while rows keep coming, a claim goes every PACE_MS at most; after an
     * ack was withheld (unit_send_ack), not before the poll interval. */
    uint64_t now = uv_now(d->loop);
    uint64_t until = d->pace_until > d->withheld_until ? d->pace_until : d->withheld_until;
    if (until > now && !d->stopping) {
        uv_timer_start(&d->poll_timer, on_poll_timer, until - now, 0);
        return;
    }
    /* Take turns, and prefer a connection with nothing in flight: a claim queued behind an ack
     * waits for its round trip. */
    for (int pass = 0; pass < 2; pass++)
        for (size_t k = 0; k < NCLAIMERS; k++) {
            claimer_t *cl = &d->cl[(d->claim_turn + k) % NCLAIMERS];
            if (cl->pg && evd_pg_ready(cl->pg) && !cl->open && cl->pg != d->floor_pg &&
                (pass || !evd_pg_busy(cl->pg))) {
                d->claim_turn = (size_t)(cl - d->cl) + 1;
                d->want_drain = false;
                d->pace_until = 0;
                send_claim(d, cl);
                if (d->stopping)
                    d->last_claim = false;
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

/* The next claim sets the idle flag first (a lease under light load, else 1). */
static void ask_idle(daemon_t *d)
{
    if (!d->want_idle) {
        d->want_idle = true;
        d->t_idle_sets++;
    }
}

/* Concurrent writers kept most rows from ringing under a lease lately (arrival_rate). */
static bool lease_banned(const daemon_t *d)
{
    return uv_now(d->loop) < d->lease_ban_until;
}

static void on_poll_timer(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, poll_timer);
    trim_heap(d);
    /* Until evictd.watches is read, durable tables' doorbells are taken for notify-only changes
     * and a watched table no rule names for an unknown one: read it again. */
    uint64_t now = uv_now(d->loop);
    evd_pg_t *pg = d->watches_failed && d->watched_loaded ? quiet_conn(d, false) : NULL;
    if (pg && now - d->watches_tried_at >= (uint64_t)d->cfg->cfg->poll_interval_ms) {
        /* (this timer also paces claims: at most once per poll interval, on a connection with
         * nothing on it, whose failure aborts no claim) */
        d->watches_tried_at = now;
        d->watched_loaded = false;
        if (evd_pg_query(pg, SQL_WATCHES, 0, NULL, false, watches_loaded, d) < 0)
            d->watched_loaded = true;
    }
    d->want_drain = true;
    /* Idle: look at the flag too (flag_as_left). */
    if (d->idle && !d->opts.dry_run)
        d->want_check = true;
    maybe_drain(d);
}

/* Outbox rows claimed per ms over the last full window of RATE_WINDOW_MS (rows: found now). */
static double arrival_rate(daemon_t *d, size_t rows)
{
    uint64_t now = uv_now(d->loop);
    d->rate_rows += rows;
    if (now - d->rate_start >= RATE_WINDOW_MS) {
        d->rate_prev = d->rate;
        d->rate = (double)d->rate_rows / (double)(now - d->rate_start);
        bool leased = d->flag == FLAG_LEASE && d->lease_since <= d->rate_start; /* the whole window */
        d->rate_rows = 0;
        d->rate_start = now;
        /* Under a lease, more than half the rows rang none: concurrent writers whose commits
         * overlap, each finding the ring lock taken. The rings then save little and the
         * claims go at once (misses): back to ringing once for a while. (At three in four,
         * writers that rang a quarter to a third of their rows, as 13f's four, sat at the edge
         * and now and then kept the lease for seconds: every claim at once, a row or two each.
         * This counts claimed rows against hints heard in the same window, so it needs claims
         * that keep up: when the linger starved them, one late claim of hundreds of rows banned
         * a single writer. Rows are not checked against the hints kept instead, hint_state:
         * with concurrent writers most rows that rang none lie above the newest hint, unknown.) */
        if (leased && d->win_rows > 2 * d->win_hints + 16)
            d->lease_ban_until = now + LEASE_BAN_MS;
        d->win_rows = d->win_hints = 0;
    }
    return d->rate;
}

/* Light load: every write may ring (a lease). Leaving it takes a rate well above the one that
 * enters it, in two windows running: a writer's short burst, or a stall of the machine (100-200
 * ms in which everything is slow, and then its writes arrive at once), does not switch rings
 * off; while they are off the writes wait for a claim, which made the latency benchmark's p99.
 * And not while most rows would not ring anyway. */
static bool light_load(daemon_t *d)
{
    double rate = arrival_rate(d, 0);
    /* The rate counts claimed rows: when evictd falls behind (every write ringing, each hint a
     * Redis round trip, on a slow build or a busy machine) it understates the writes, and the
     * lease would keep every writer ringing; a backlog in hand says the load is not light. */
    bool behind = d->pending > LIGHT_MAX_PENDING;
    if (d->flag != FLAG_LEASE) {
        d->lease_off_why = NULL;
        return !lease_banned(d) && !behind && rate < LIGHT_ROWS_PER_MS;
    }
    const char *why = lease_banned(d)                                                  ? "banned"
                      : behind                                                         ? "behind"
                      : rate >= HEAVY_ROWS_PER_MS && d->rate_prev >= HEAVY_ROWS_PER_MS ? "rate"
                                                                                       : NULL;
    /* Once per reason while the lease lasts: light_load is asked at every doorbell and claim. */
    if (why && why != d->lease_off_why)
        EVD_LOG(EVD_LOG_DEBUG, "lease_off", F_STR("reason", why), F_DBL("rate", rate),
                F_DBL("rate_before", d->rate_prev), F_INT("held", (int64_t)d->pending));
    d->lease_off_why = why;
    return !why;
}

/* Under a lease: since when (loop ms) an outbox id below the newest hint has had no hint and no
 * claim (since the first hint above it was heard); 0: none is missing. Its row rang none (its
 * writer found another ringing transaction in flight), or it has not committed yet, or it
 * rolled back: a claim goes for it GAP_MS after (one whose rules need lookups rang with its
 * change, which evictd did not apply: its claim went at once, outbox_rung). Most gaps close
 * sooner, commits out of id order whose hints are on the way, and need no claim of their own.
 * A forged hint far ahead only makes claims go at once. */
static uint64_t gap_since(daemon_t *d, uint64_t now)
{
    /* At most HINTS_KEPT steps; claimed ids need no look: claim_done moves covered past each. */
    while (d->covered < d->max_hint_id && hinted(d, d->covered + 1))
        d->covered++;
    if (d->covered >= d->max_hint_id)
        return 0;
    uint64_t since = now;
    for (size_t i = 0; i < HINTS_KEPT && i < d->nhinted; i++)
        if (d->hints[i].id > d->covered && d->hints[i].at < since)
            since = d->hints[i].at;
    return since ? since : 1;
}

/* A doorbell rang (hint: it carried its change, applied already). Under light load the claim
 * that picks the row up sets the idle flag first, so the next write rings with its change too
 * and is applied without waiting for a claim; under heavier load the claims go on until the
 * outbox is drained, without being rung (every ring costs a writer a NOTIFY). */
void outbox_rung(daemon_t *d, ring_t ring)
{
    bool hint = ring != RING_EMPTY;
    d->t_doorbells++;
    d->want_drain = true;
    if (hint && d->flag == FLAG_LEASE)
        d->win_hints++;
    /* Under a lease the claim only acknowledges rows applied from their doorbells already, so it
     * waits a little and takes several (fewer claims for the database and fewer wake-ups next to
     * the writers), but for a row that may have rung none (gap_since). Claims going at once for
     * 100 ms after one that found such a row went at once nearly always with 8 writers at 2,000
     * writes/s (~6 % of rows ring none): 11,000 claims in 10 s for 20,000 rows. A change not
     * applied from its doorbell (its rules need lookups) waits for its claim: that goes at once. */
    uint64_t now = uv_now(d->loop);
    /* The linger starts at the first hint after a claim went, and only then: restarting it
     * whenever it had run out let a hint that came in the millisecond it ran out (before the
     * timer's turn in the loop) start it again, and at 2,000 hints/s claims waited 10-400 ms. */
    if (ring != RING_HINT_APPLIED || d->flag != FLAG_LEASE) {
        d->pace_until = 0;
    } else {
        if (!d->pace_until)
            d->pace_until = now + HINT_LINGER_MS;
        uint64_t gap = gap_since(d, now);
        if (gap && gap + GAP_MS < d->pace_until)
            d->pace_until = gap + GAP_MS;
    }
    EVD_LOG(EVD_LOG_DEBUG, "rung", F_BOOL("hint", hint), F_BOOL("applied", ring == RING_HINT_APPLIED),
            F_BOOL("lease", d->flag == FLAG_LEASE),
            F_INT("claim_in_ms", d->pace_until > now ? (int64_t)(d->pace_until - now) : 0));
    d->idle = false;
    d->armed = false; /* the writer that rang cleared the flag (1), or another ring may be due (a lease) */
    d->rung_in_claim = true;
    uv_timer_stop(&d->poll_timer);
    if (!d->opts.dry_run) {
        bool lease = light_load(d);
        if (hint && lease)
            ask_idle(d);
        else if (!lease && (d->flag == FLAG_LEASE || d->flag < 0))
            d->want_clear = true; /* no longer light: stop the rings */
    }
    maybe_drain(d);
}

static void flag_cleared(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    d->clearing_flag = false;
    if (res)
        d->flag = 0;
    else
        EVD_LOG(EVD_LOG_WARN, "idle_flag_failed", F_STR("error", err));
}

/* Stopping: one last claim when hinted rows were not claimed yet, and the flag to 0 (a lease
 * would have writes ring for nobody until it ends). */
void outbox_stop(daemon_t *d)
{
    static const char sql[] = "SELECT pg_catalog.setval('evictd.idle', 0)";
    if (d->opts.dry_run)
        return;
    /* Rows whose hints were applied (or are in flight) but that no claim took yet: one last
     * claim takes them, so that changes evictd applied are acknowledged before it exits. */
    if (d->max_hint_id > d->max_claimed && !d->claim_cl) {
        d->last_claim = true;
        d->want_drain = true;
        d->want_idle = false;
        d->want_clear = false;
        maybe_drain(d);
    }
    if (d->flag == 0)
        return;
    for (size_t k = 0; k < NCLAIMERS; k++)
        if (d->cl[k].pg && evd_pg_ready(d->cl[k].pg)) {
            d->clearing_flag = evd_pg_query(d->cl[k].pg, sql, 0, NULL, false, flag_cleared, d) == 0;
            return;
        }
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

/* Where the floor check starts scanning. A pass of claims leaves deleted rows behind in the
 * index until VACUUM; a check from id 0 after a million-row drain walked them all every poll
 * interval (seconds each, and claims stalled behind it). Ids are taken by the capture after its
 * transaction has an xid, so when a check that took xid X (txid_current; not its snapshot's xmax,
 * which running transactions may have passed) saw that every id up to M had been claimed or was
 * visible, every transaction that took an id <= M has an xid below X; once a later check's xmin
 * reaches X they have all ended, and rows <= M that are not visible then never will be. The
 * floor then rises to just above M (or to the lowest row found, if lower). */
static void floor_raise(daemon_t *d, const PGresult *res, int64_t low)
{
    if (PQgetisnull(res, 0, 1) || PQgetisnull(res, 0, 2))
        return;
    int64_t xmin = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    int64_t xid = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    if (d->floor_pend_m >= 0 && xmin >= d->floor_pend_xmax) {
        int64_t to = d->floor_pend_m < d->floor_sent_cursor ? d->floor_pend_m : d->floor_sent_cursor;
        if (low >= 0 && low < to)
            to = low;
        if (to > d->floor_from)
            d->floor_from = to;
        d->floor_pend_m = -1;
    }
    if (d->floor_pend_m < 0) {
        d->floor_pend_m = d->floor_sent_max;
        d->floor_pend_xmax = xid;
    }
}

static void floor_done(const PGresult *res, const char *err, void *arg)
{
    daemon_t *d = arg;
    (void)err;
    d->floor_pg = NULL;
    if (res && PQntuples(res) == 1 && PQnfields(res) == 3 && d->floor_gen == d->conn_gen) {
        int64_t low = PQgetisnull(res, 0, 0) ? -1 : strtoll(PQgetvalue(res, 0, 0), NULL, 10) - 1;
        floor_raise(d, res, low);
        if (low >= 0 && low < d->cursor) {
            d->cursor = low;
            d->cursor_gen++;
            if (low < d->restart)
                d->restart = low;
            d->want_drain = true;
        }
    }
    /* Claims kept off its connection meanwhile: one wanted then (the only other connection
     * down, say) goes now. */
    maybe_drain(d);
}

/* Every poll interval: is a row not held in memory waiting below the cursor (committed late,
 * or below where passes start)? Then the next claim starts below it. (A row another replica or
 * the other claim connection holds locked also counts: the claim then skips it.) The scan
 * starts at the floor (floor_raise), not at id 0. It runs on an outbox connection, preferably
 * one with nothing on it, never on the LISTEN connection: a backend busy with a query delivers
 * no notifications, and the first check after a big drain may walk many deleted index entries. */
static void floor_try(daemon_t *d)
{
    if (!d->floor_due || d->floor_pg || d->cursor <= 0 || d->stopping || d->opts.dry_run)
        return;
    /* A connection with nothing on it (claims keep off it until the check is back), else the
     * next maybe_drain tries again: during a drain the check waits rather than take a claim
     * connection from it. */
    evd_pg_t *pg = quiet_conn(d, true);
    if (!pg)
        return;
    evd_buf_t q = {0};
    int rc = evd_buf_printf(
        &q, "SELECT (SELECT min(id) FROM evictd.outbox WHERE id > %" PRId64 " AND id <= %" PRId64 " AND id <> ALL('",
        d->floor_from, d->cursor);
    held_ids(d, &q);
    rc = rc == 0 ? evd_buf_puts(&q, "'::bigint[])), pg_catalog.txid_snapshot_xmin(pg_catalog.txid_current_snapshot()), "
                                    "pg_catalog.txid_current()")
                 : rc;
    if (rc == 0 && evd_pg_query(pg, q.data, 0, NULL, false, floor_done, d) == 0) {
        d->floor_due = false;
        d->floor_pg = pg;
        d->floor_sent_cursor = d->cursor;
        d->floor_sent_max = d->max_claimed;
        d->floor_gen = d->conn_gen;
    }
    evd_buf_free(&q);
}

void floor_check(uv_timer_t *t)
{
    daemon_t *d = evd_container_of(t, daemon_t, floor_timer);
    d->floor_due = true;
    floor_try(d);
}

/* Nothing to claim until a doorbell rings: the idle flag is set (armed). Transactions that were
 * in flight when it was set may have read it unset and commit rows that ring no doorbell; while
 * the snapshot of a later claim does not show them all ended (horizon), look again at once, then
 * after 1, 2, 4 ... ms, up to the poll interval. Else only the safety poll looks. */
static void settle_idle(daemon_t *d)
{
    d->idle = true;
    d->lingered = false;
    trim_heap(d);
    uint64_t poll = (uint64_t)d->cfg->cfg->poll_interval_ms;
    uint64_t delay = poll;
    if (d->horizon) {
        delay = d->horizon_delay < poll ? d->horizon_delay : poll;
        d->horizon_delay = d->horizon_delay ? d->horizon_delay * 2 : 1;
        if (delay == 0)
            d->want_drain = true;
    }
    if (d->want_drain)
        maybe_drain(d);
    else
        uv_timer_start(&d->poll_timer, on_poll_timer, delay, 0);
}

/* The snapshot columns of a claim with them (evictd_claim_snap): moves the horizon. A writer
 * that read the flag before this claim set it got its xid before, so below the xid X this claim
 * takes (txid_current); it has ended once a later snapshot's xmin reaches X. (A snapshot's xmax
 * is not a bound: it is the last completed xid + 1, and transactions that got an xid after that
 * one may be running without showing in the snapshot.) Nothing can be in flight when this
 * snapshot showed no running xid and X is the next one after its xmax. */
static void claim_snapshot(daemon_t *d, const PGresult *res, bool set_idle)
{
    if (PQntuples(res) < 1 || PQnfields(res) < 5 || PQgetisnull(res, 0, 2) || PQgetisnull(res, 0, 3) ||
        (set_idle && PQgetisnull(res, 0, 4)))
        return;
    int64_t xmin = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    int64_t xmax = strtoll(PQgetvalue(res, 0, 3), NULL, 10);
    if (set_idle) {
        /* Armed now: wait for what was in flight, if anything may have been. */
        int64_t x = strtoll(PQgetvalue(res, 0, 4), NULL, 10);
        d->horizon = xmin == xmax && x == xmax ? 0 : x;
        d->horizon_delay = 0;
    } else if (d->horizon && xmin >= d->horizon) {
        d->horizon = 0;
    }
}

/* The safety poll, idle (a claim that also read the flag): is the flag as evictd left it? Not if it
 * is 0 (another replica cleared it when it stopped, a writer that rang rolled back, or a doorbell
 * was lost), nor 1 while the load is light enough for a lease. A lease that ran out acts as 1 and
 * is left so: renewing it, or setting the flag at every poll, wrote a WAL record and took an xid
 * four times a second on an idle system (pg_waldump), and a server with archive_timeout would
 * then archive a WAL segment at every timeout for nothing. */
static bool flag_as_left(daemon_t *d, const PGresult *res)
{
    if (PQntuples(res) < 1 || PQnfields(res) < 6) {
        d->flag = -1;
        return false;
    }
    int64_t flag = PQgetisnull(res, 0, 5) ? 0 : strtoll(PQgetvalue(res, 0, 5), NULL, 10);
    if (flag > 1 && d->flag == FLAG_LEASE && uv_now(d->loop) - d->flag_set_at >= LEASE_MS)
        d->flag = 1; /* as writers take it: the next one rings and clears it */
    if (flag > 1 || (flag == 1 && !light_load(d)))
        return true;
    /* What is there, so that the claim that sets it again does not skip its setval as fresh. */
    d->flag = flag == 1 ? 1 : 0;
    return false;
}

static void claim_done(const PGresult *res, const char *err, void *arg)
{
    claimer_t *cl = arg;
    daemon_t *d = cl->d;
    d->claim_cl = NULL;
    bool set_idle = d->claim_sets_idle;
    bool snap = d->claim_snap;
    bool check = d->claim_checks;
    d->claim_checks = false;
    int flag = d->claim_flag;
    d->claim_sets_idle = false;
    d->claim_snap = false;
    d->claim_flag = -1;
    if (flag == FLAG_LEASE && res && d->flag != FLAG_LEASE)
        d->lease_since = uv_now(d->loop);
    if (flag >= 0)
        d->flag = res ? flag : -1; /* failed: it may be set or not */
    /* Cleared: no writer rings until a claim sets it again, so evictd is not idle either. A
     * claim that clears the flag can go while evictd is idle: a hint rang during the claim that
     * armed it under a lease, when the load was no longer light. Left idle, the claim after it
     * that found the outbox empty stopped there with the flag clear and no poll to come (chaos
     * soak: changes waited for the next PostgreSQL restart, 20 s). */
    if (flag >= 0 && !set_idle)
        d->armed = d->idle = false;
    if (!res) {
        if (set_idle) /* the flag may not be set: the next empty claim sets it */
            d->armed = false;
        d->idle = d->idle && d->armed; /* the poll after this looks for rows, not just the flag */
        /* Closing the connection at shutdown fails the claim in flight: not worth a warning. */
        EVD_LOG(d->stopping ? EVD_LOG_DEBUG : EVD_LOG_WARN, "claim_failed", F_STR("error", err));
        if (!d->opts.dry_run)
            (void)rollback(cl);
        safety_poll(d);
        return;
    }
    int n = PQntuples(res);
    /* Idle, the safety poll: a flag not as evictd left it is set again by the next claim that
     * finds the outbox empty (this one, if it found no row: below). */
    if (check && d->armed && !flag_as_left(d, res))
        d->armed = d->idle = false;
    /* A doorbell heard while this claim was out may have been rung by a writer that saw the flag
     * this claim set: then it is clear again, and only another claim that sets it arms evictd
     * (else evictd would sleep with the flag clear until the safety poll: in a benchmark run
     * right after big drains, half the changes at 2,000/s waited for it). */
    if (set_idle && (!d->rung_in_claim || flag == FLAG_LEASE)) /* a ring leaves a lease set */
        d->armed = true;
    if (snap) {
        claim_snapshot(d, res, set_idle);
        if (n == 1 && PQgetisnull(res, 0, 0)) /* the snapshot row alone: no outbox row */
            n = 0;
    }
    EVD_LOG(EVD_LOG_DEBUG, "claimed", F_INT("rows", n), F_BOOL("set_idle", set_idle), F_BOOL("snapshot", snap),
            F_INT("horizon", d->horizon), F_INT("cursor", d->claim_from), F_BOOL("locks", d->claim_locks),
            F_DBL("ms", (double)(uv_hrtime() - d->claim_sent) / 1e6));
    if (n == 0) {
        d->claimed_full = false;
        int rc = d->opts.dry_run ? 0 : evd_pg_query(cl->pg, SQL_COMMIT, 0, NULL, false, begin_done, NULL);
        if (rc < 0)
            EVD_LOG(EVD_LOG_DEBUG, "commit_skipped");
        if (rc == -ENOMEM) /* its transaction is still open: nothing may run inside it */
            cl->needs_rollback = true;
        if (d->stopping)
            return;
        if (!d->opts.dry_run && d->claim_gen == d->cursor_gen) {
            /* A pass is over: start again from the lowest id (restart_pass). */
            int64_t from = d->claim_from;
            restart_pass(d);
            if (d->cursor < from) {
                d->want_drain = true; /* look from there even when idle */
                maybe_drain(d);
                return;
            }
        }
        if (d->opts.dry_run) {
            if (d->want_drain)
                maybe_drain(d);
            else
                safety_poll(d);
            return;
        }
        if (d->armed) {
            settle_idle(d);
            return;
        }
        if (!d->lingered && (lease_banned(d) || d->rows_per_ms * LINGER_MS >= LINGER_MIN_ROWS)) {
            /* Under heavy load, look once more after a moment before saying we are idle: a row
             * arrives within it, and every doorbell rung costs the writers a NOTIFY
             * (PostgreSQL serialises the commits of notifying transactions); so too while
             * concurrent writers keep leases off. Under light load say so at once: the next
             * write rings, and is seen without waiting for a poll. */
            d->lingered = true;
            uv_timer_start(&d->poll_timer, on_poll_timer, LINGER_MS, 0);
            return;
        }
        /* Say we are idle and look once more (one round trip), so nothing slips between. */
        d->lingered = false;
        ask_idle(d);
        maybe_drain(d);
        return;
    }
    /* Armed, with every row there was in hand: idle once this batch is acknowledged. */
    bool now_idle = d->armed && !d->opts.dry_run && (size_t)n < d->claim_limit;
    d->idle = now_idle;
    (void)arrival_rate(d, (size_t)n);
    if (d->flag == FLAG_LEASE)
        d->win_rows += (uint64_t)n;
    /* Rows per ms since the previous claim that found rows (or since this one was sent). */
    uint64_t now = uv_hrtime();
    uint64_t since = !d->armed && d->last_rows_at ? d->last_rows_at : d->claim_sent;
    double ms = (double)(now - since) / 1e6;
    d->rows_per_ms = 0.5 * d->rows_per_ms + 0.5 * (double)n / (ms > 0.05 ? ms : 0.05);
    d->t_claims++;
    d->t_claimed += (uint64_t)n;
    d->last_rows_at = now;
    if (!now_idle)
        d->armed = false;
    d->lingered = false;
    unit_t *u = unit_new(d, true);
    if (!u) {
        EVD_LOG(EVD_LOG_ERROR, "claim_failed", F_STR("error", "out of memory"));
        if (!d->opts.dry_run)
            (void)rollback(cl);
        safety_poll(d); /* it claims them again */
        return;
    }
    u->in_tx = !d->opts.dry_run;
    u->claimed = (size_t)n;
    u->low = strtoll(PQgetvalue(res, 0, 0), NULL, 10); /* rows come in id order */
    u->db_gen = d->db_gen;
    u->deleted = !d->claim_locks;
    d->claimed_full = (size_t)n >= d->claim_limit;
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
    d->accepting = true;
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (own && id > d->cursor)
            d->cursor = id;
        if (id > d->max_claimed)
            d->max_claimed = id;
        if (d->flag == FLAG_LEASE && hint_state(d, id) == 0)
            d->t_unrung++;
        if (id > d->covered)
            d->covered = id; /* an id below it that this claim did not take has not committed */
        claimed_keep(d, id);
        accept_payload(u, PQgetvalue(res, i, 1), (size_t)PQgetlength(res, i, 1), id);
    }
    /* Fewer rows than asked for: this pass reached the end of the outbox, so the next claim
     * starts again from the lowest id. Ids are taken at insert time but become visible at
     * commit, so a row below the cursor may have committed meanwhile; under steady load a
     * pass that only ever moved onward would leave it behind until the load stopped. */
    if (own && !d->opts.dry_run && (size_t)n < d->claim_limit)
        restart_pass(d);
    d->imgs_per_row = 0.5 * d->imgs_per_row + 0.5 * ((double)u->weight / (double)(n ? n : 1));
    /* Starting the unit may release its claim and ask for another (a synchronous Redis
     * failure): that claim waits for the pace set below. */
    unit_start(u);
    d->accepting = false;
    bool deferred = d->drain_deferred; /* goes at the end, after this claim's bookkeeping */
    d->drain_deferred = false;
    if (now_idle) {
        settle_idle(d);
        if (deferred)
            maybe_drain(d);
        return;
    }
    /* Rows keep coming, this claim took all there were, and their writers do not ring with
     * them (no lease: the load is not light, or concurrent writers keep leases off), or they
     * come fast: the next claim waits PACE_MS, so that it carries tens of rows rather than a
     * few. Each claim and its ack cost the database statements, a transaction and backend
     * wake-ups on top of the per-row work, taken from the writers, and a claim that finds the
     * outbox empty sets the flag, which costs the next writer a ring: under pgbench's 8
     * clients, unpaced, ~500 claims/s of ~7 rows and ~100 rings/s took a quarter of the TPS.
     * Under a lease each write rings with its change and claims only acknowledge. From
     * PACE_HEAVY_ROWS_PER_MS claims of a 4 ms pace carry tens of rows already, yet their fixed
     * costs still took a tenth of the TPS of CPU-bound writers: there a change waits up to
     * PACE_HEAVY_MS for its claim. */
    bool at_end = !d->opts.dry_run && (size_t)n < d->claim_limit;
    bool pace = false;
    if (at_end && d->flag == FLAG_LEASE)
        pace = d->rate >= PACE_ROWS_PER_MS;
    else if (at_end && light_load(d))
        ask_idle(d); /* light again without a lease (a burst is over, or the ban): paced claims
                      * seldom find the outbox empty, where the flag is set again; set it now */
    else
        pace = at_end;
    d->pace_until = !pace ? 0 : uv_now(d->loop) + (d->rate >= PACE_HEAVY_ROWS_PER_MS ? PACE_HEAVY_MS : PACE_MS);
    /* A full claim says more rows wait: the other connection claims them while this batch is
     * in flight. After a claim that reached the end, the next one goes when this batch is
     * acknowledged (or at once on a doorbell), which batches a steady stream of writes. */
    if (d->opts.dry_run || (size_t)n >= d->claim_limit || deferred)
        maybe_drain(d);
    else
        update_pause(d);
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

/* Where claims stand in the outbox, forgotten: the first connection of a claim session (or a
 * reload to another database, whose ids mean other rows: other_db) starts from id 0, reads
 * evictd.watches before any claim, and knows nothing of the idle flag. What hints and claims
 * said of ids is kept unless the database is another (hints applied before a reconnect still
 * have their rows taken by the last claim at shutdown, outbox_stop). */
void outbox_forget(daemon_t *d, bool other_db)
{
    d->cursor = 0;
    d->cursor_gen++;
    d->restart = 0;
    d->max_claimed = 0;
    if (other_db) {
        d->max_hint_id = 0;
        d->covered = 0;
        d->nclaimed_ids = 0;
    }
    d->floor_from = 0;
    d->floor_pend_m = -1;
    d->conn_gen++;
    d->armed = false;
    d->horizon = 0;
    d->idle = false;
    d->flag = -1;
    d->watched_loaded = false;
    /* Assume chunks until claims show otherwise: a backlog of 500-image chunks must not
     * arrive as 1000 rows at once. The average adapts within a few claims. */
    d->imgs_per_row = 100;
}

void claim_connected(evd_pg_t *pg, void *ud)
{
    claimer_t *cl = ud;
    daemon_t *d = cl->d;
    cl->setup = evd_pg_query(pg, SQL_CLAIM_SETUP, 0, NULL, false, claim_setup_done, cl) == 0;
    if (cl != &d->cl[0]) {
        maybe_drain(d);
        return;
    }
    outbox_forget(d, false);
    if (evd_pg_query(d->cl[0].pg, SQL_WATCHES, 0, NULL, false, watches_loaded, d) < 0)
        d->watched_loaded = true;
}

/* The open claim's locks are gone with the connection; its rows stay held in memory. */
void claimer_lost(claimer_t *cl)
{
    daemon_t *d = cl->d;
    if (d->claim_cl == cl)
        d->claim_cl = NULL;
    cl->setup = false;
    cl->needs_rollback = false; /* the server rolled it back */
    rows_returned(cl);
    if (cl->open) {
        cl->open->in_tx = false;
        cl->open->released = true;
        cl->open = NULL;
    }
}

void claim_disconnected(evd_pg_t *pg, const char *why, void *ud)
{
    (void)pg;
    (void)why;
    claimer_lost(ud);
}
