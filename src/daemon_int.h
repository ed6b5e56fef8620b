/* daemon_int.h - what the parts of `evictd run` share: the daemon, its units of work and
 * records, and the calls between pipeline.c (change -> keys -> Redis jobs -> completion),
 * outbox.c (claims, acks, the idle flag) and daemon.c (connections, signals, reload, stats).
 * Internal to the daemon. */
#ifndef EVD_DAEMON_INT_H
#define EVD_DAEMON_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "daemon.h"
#include "deadletter.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "payload.h"
#include "pg.h"
#include "redis.h"
#include "rules.h"

#define LAG_SAMPLES 8192 /* lag samples kept per stats interval */
#define ID_NOTIFY (-1)   /* rec id of a notify-only change */
/* Recent hints are kept (HINTS_KEPT, each up to HINT_BYTES): their claims record no lag, and their
 * rows are acknowledged without being applied again once Redis confirmed the hint, when the
 * row's payload is the same bytes. */
#define HINTS_KEPT 64
#define HINT_BYTES 512
#define CLAIMED_KEPT 64 /* recent claimed ids: a hint heard after its row was claimed is dropped */

/* The watched tables and their capture (outbox.c at connect, daemon.c on reload). */
static const char SQL_WATCHES[] = "SELECT n.nspname, c.relname, array_to_string(w.columns, ','), w.durable "
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
    unit_t *open; /* the unit whose transaction is open on pg */
    bool setup;   /* SQL_CLAIM_SETUP succeeded (or is queued) on this connection */
    /* A ROLLBACK could not be queued (out of memory) while a transaction was open: the next
     * claim on pg sends one first, and no released ack goes on pg until then */
    bool needs_rollback;
    /* A ROLLBACK of an unacknowledged claim is queued: once it is done the next claims start at
     * this id (rows_back; 0: none), if the database is still the one of db_gen back_gen */
    int64_t back_low;
    uint64_t back_gen;
} claimer_t;

#define NCLAIMERS 2

/* One change in memory. Most changes are expanded as soon as they are parsed (from a scratch
 * parse) and held as one allocation: this struct, then its jobs, their key and pattern
 * pointers, and the strings (table, keys, patterns, payload). A change whose rules need lookups
 * keeps its parse (ch) until the unit's lookups are back, and is then replaced by its expanded
 * form. */
typedef struct rec {
    unit_t *unit;
    evd_change_t *ch; /* the parse, only while waiting for lookups */
    const char *raw;  /* the payload text (dead letters re-parse it), or NULL */
    size_t rawlen;
    const char *table; /* "schema.table", or NULL before it is known */
    int64_t id;        /* outbox id or ID_NOTIFY */
    double ts;         /* the change's ts (epoch ms) or 0 */
    evd_op_t op;       /* 0 for bad input */
    bool finished;     /* bad input or unmatched: done before expansion */
    bool hint;         /* a durable change its doorbell carried (accept_payload): its row is
                        * claimed too, so it is never dead-lettered */
    unit_t *waiter;    /* a hint's: the claim whose rec waiter_i is its row, waiting for Redis
                        * to answer the hint (hint_answered) */
    size_t waiter_i;
    int outstanding; /* jobs not called back */
    bool failed;     /* a job failed */
    size_t njobs;
    evd_job_t *jobs; /* njobs entries */
    int *job_target; /* target index per job */
} rec_t;

/* Changes read together: one outbox claim, or the notifications of one loop iteration. */
struct unit {
    daemon_t *d;
    cfgref_t *cfg;
    bool claim;      /* outbox rows: ack when done */
    claimer_t *cl;   /* the connection that claimed them */
    bool in_tx;      /* the claim's transaction is still open */
    bool released;   /* the claim was released (retry backoff): ack with SKIP LOCKED */
    size_t claimed;  /* outbox rows its claim took ... */
    bool deleted;    /* ... by deleting them in its open transaction (else by locking them) */
    int64_t low;     /* the lowest of their ids */
    uint64_t db_gen; /* the daemon's db_gen when claimed */
    rec_t **recs;
    size_t nrecs, cap;
    size_t weight;       /* row images held: what batch.max_pending counts */
    int outstanding;     /* recs not finished, +1 until the unit is expanded */
    int lookups_pending; /* lookups in flight, +1 until the unit is complete (unit_start) */
    evd_buf_t dl;        /* retries_exhausted / shutdown lines */
    evd_buf_t dl_bad;    /* bad-input lines */
    uint64_t dl_n[EVD_DL_REASONS], dl_bad_n[EVD_DL_REASONS]; /* lines in dl, dl_bad by reason (evd_metrics_reasons[]) */
    int dl_writes;                                           /* dead-letter writes in flight */
    /* Not to be acknowledged (its rows roll back and are claimed again): a change was neither
     * confirmed by Redis nor dead-lettered (cancelled at shutdown, or its dead-letter line
     * could not be written). Says why. */
    const char *keep;
    /* lookup results of this unit */
    struct lres *lres;
    unit_t *answered_next; /* in the daemon's list of units whose waits are over (hint_answered) */
    unit_t *next;          /* in the daemon's list of live units */
    unit_t *prev;
};

typedef struct lres {
    struct lres *next;
    const evd_rule_t *rule;
    size_t lookup;
    char *argkey; /* args joined by \x1f */
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
    evd_pg_t *listen_old;    /* the listener a reload replaced: it delivers until the new one listens */
    claimer_t cl[NCLAIMERS]; /* cl[0] also reads evictd.watches and the backlog */
    claimer_t *claim_cl;     /* the claimer of the claim in flight, NULL when none */
    size_t claim_turn;       /* the claimer to try first next time */
    int64_t claim_from;      /* the cursor the claim in flight was sent with */
    int64_t restart;         /* where a pass starts: just below the lowest id found lately */
    bool floor_due;          /* the poll interval passed since the last floor check was sent */
    evd_pg_t *floor_pg;      /* the connection the floor check in flight runs on, NULL when none */
    uint64_t cursor_gen;     /* bumped when the cursor is moved back (floor check, lower_to, outbox_forget) ... */
    uint64_t claim_gen;      /* ... and the claim in flight was sent before: it moves no cursor */
    int64_t max_claimed;     /* the highest id claimed since connecting */
    int64_t floor_from;      /* the floor check scans ids above this (floor_raise) */
    int64_t floor_pend_m;    /* ids up to this are final once xmin reaches floor_pend_xmax; -1 none */
    int64_t floor_pend_xmax; /* the xid of the check that set floor_pend_m */
    int64_t floor_sent_cursor, floor_sent_max; /* of the floor check in flight */
    uint64_t conn_gen;                         /* bumped when the claim connection (re)connects */
    uint64_t db_gen;    /* bumped when a reload changes postgres.url: claims of before are not acked */
    uint64_t floor_gen; /* conn_gen when the floor check in flight was sent */
    evd_pg_t *lookupc;
    target_t *targets; /* per current config target */
    size_t ntargets;
    evd_redis_t **retiring; /* old targets draining after a reload */
    size_t nretiring;
    evd_dl_t *dl;
    evd_expansion_t x;        /* scratch: the keys of the change being expanded */
    evd_change_t scratch;     /* scratch: the change being accepted */
    evd_arena_block_t *spare; /* its arena block, kept between changes */

    unit_t *units;    /* live units */
    unit_t *incoming; /* notifications of this iteration */
    size_t pending;   /* changes in memory */
    bool paused;
    /* claim_done is accepting its rows and starting their unit: a claim sent now (a release
     * from a synchronous Redis failure calls maybe_drain) would not yet skip the rows still to
     * be accepted, nor wait for the pace this claim sets */
    bool accepting;
    bool drain_deferred; /* maybe_drain was called meanwhile */

    /* outbox claiming */
    int64_t cursor;
    size_t claim_limit;    /* rows the claim in flight asked for */
    double imgs_per_row;   /* row images per outbox row, moving average */
    uint64_t last_trim;    /* loop time of the last malloc_trim */
    bool lingered;         /* an empty claim was retried once before setting the idle flag */
    uint64_t claim_sent;   /* uv_hrtime() when the claim in flight was sent */
    uint64_t last_rows_at; /* uv_hrtime() of the last claim that found rows */
    double rows_per_ms;    /* outbox rows found per ms lately (moving average) */
    uint64_t rate_start;   /* loop time the current window of arrival_rate began */
    uint64_t rate_rows;    /* rows claimed in it */
    double rate;           /* rows claimed per ms in the last full window */
    double rate_prev;      /* ... and in the one before */
    uint64_t pace_until;   /* loop time before which no claim goes (0: none): PACE_MS after a claim that
                            * reached the end, or a hint's linger (outbox_rung; other doorbells clear it) */
    struct hint_slot {
        int64_t id;     /* outbox id */
        uint64_t at;    /* loop time it was heard */
        bool confirmed; /* Redis confirmed every deletion of the hint */
        rec_t *flight;  /* its rec while Redis has not answered all its deletions */
        uint16_t len;   /* payload bytes (0: longer than HINT_BYTES, never skipped) */
        char payload[HINT_BYTES];
    } hints[HINTS_KEPT];               /* recent hints (a ring) */
    size_t nhinted;                    /* hints heard */
    int64_t max_hint_id;               /* the highest outbox id a hint carried */
    int64_t claimed_ids[CLAIMED_KEPT]; /* the last ids claimed (a ring) */
    size_t nclaimed_ids;
    uint64_t changes_at_trim;
    uint64_t images_done;         /* row images through the pipeline, for trim_heap */
    bool armed;                   /* we set the idle flag, and no doorbell rang since */
    bool idle;                    /* armed and every row there was is in hand: no claim until a doorbell
                                   * rings or a timer (safety poll, horizon) says to look */
    int64_t horizon;              /* xmax of the arming claim's snapshot while transactions it saw in
                                   * flight may not have ended (0: none) */
    uint64_t horizon_delay;       /* ms until the next look while waiting for the horizon */
    bool want_idle;               /* the next claim sets the idle flag first (a lease under light load, else 1) */
    bool want_clear;              /* the next claim sets it to 0 (it may be a lease and the load is not light) */
    bool want_check;              /* idle, the safety poll: the next claim reads the flag, and evictd sets it
                                   * again only if it is not as evictd left it (a setval is a WAL record) */
    bool claim_checks;            /* the claim in flight reads it */
    bool claim_sets_idle;         /* the claim in flight set it ... */
    int claim_flag;               /* ... to this: 0, 1, 2 for a lease (-1: it does not set it) */
    int flag;                     /* what evictd last set it to, as claim_flag (-1: unknown) */
    uint64_t flag_set_at;         /* loop time of the last setval sent */
    uint64_t lease_ban_until;     /* loop time before which evictd sets no lease */
    uint64_t lease_since;         /* loop time the flag became a lease */
    uint64_t win_rows, win_hints; /* under a lease: rows claimed, hints heard, in arrival_rate's window */
    int64_t covered;              /* every outbox id up to this one was hinted or claimed, or a claim passed it */
    bool clearing_flag;           /* stopping: a setval to 0 is in flight */
    bool last_claim;              /* stopping: one more claim takes the rows of hints applied but not claimed */
    const char *lease_off_why;    /* the reason light_load last logged under this lease, NULL none */
    bool rung_in_claim;           /* a doorbell was heard since the claim in flight was sent */
    bool claim_snap;              /* the claim in flight returns its snapshot (evictd_claim_snap) */
    bool claim_locks;             /* the claim in flight locks its rows (evictd_claim_lock) */
    bool claimed_full;            /* the last claim came back full: more rows wait */
    bool want_drain;              /* a doorbell arrived while a claim was running */
    bool watched_loaded;
    bool watches_failed; /* the last read of evictd.watches failed (install.sql not applied yet?) */
    uint64_t watches_tried_at;
    uint64_t withheld_until; /* no claim before this (an ack was withheld: unit_send_ack) */
    evd_set_t watched;       /* "schema.table" of evictd.watches */
    evd_set_t durable;       /* the durably watched ones among them */

    uv_timer_t poll_timer;
    uv_timer_t floor_timer;
    uv_timer_t stats_timer;
    uv_timer_t shutdown_timer;
    uv_timer_t answer_timer; /* expands units whose last hint was answered (hint_answered) ... */
    unit_t *answered;        /* ... listed here */
    uv_check_t check;
    uv_signal_t sigterm, sigint, sighup;
    bool stopping;
    int exit_code;

    /* stats for the current interval and in total */
    uint64_t n_changes, n_keys, n_patterns, n_unmatched, n_bad;
    uint64_t t_changes;
    uint64_t t_doorbells, t_idle_sets; /* doorbells heard, idle flags set (writers that rang) */
    uint64_t t_hints;                  /* hints applied */
    uint64_t t_claims, t_claimed;      /* claims that found rows, and the rows they found */
    uint64_t t_unrung;                 /* rows claimed under a lease that rang none (hint_state) */
    double lags[LAG_SAMPLES];
    size_t nlags;
    uint64_t retries_seen;    /* retries_total at the last stats line */
    uint64_t dl_lines_seen;   /* evd_dl_lines ... */
    uint64_t dl_dropped_seen; /* ... and evd_dl_dropped at the last stats line */
    uint64_t retries_closed;  /* retries of targets closed since start */

    /* /metrics and /readyz */
    evd_metrics_t m;
    evd_http_t *http;
    int64_t backlog;    /* outbox rows between the lowest and highest id, -1 unknown */
    bool backlog_query; /* a backlog query is in flight */
};

/* pipeline.c */
unit_t *unit_new(daemon_t *d, bool claim);
void accept_payload(unit_t *u, const char *payload, size_t len, int64_t id);
void cfg_put(cfgref_t *c);
void job_done(evd_job_t *job, int status, const char *error, void *ud);
void hints_answered(uv_timer_t *t);
void unit_free(unit_t *u);
void unit_start(unit_t *u);
void update_pause(daemon_t *d);

/* outbox.c */
void claim_connected(evd_pg_t *pg, void *ud);
void claim_disconnected(evd_pg_t *pg, const char *why, void *ud);
void claimer_lost(claimer_t *cl);
void outbox_forget(daemon_t *d, bool other_db);
void floor_check(uv_timer_t *t);
void maybe_drain(daemon_t *d);
evd_pg_t *quiet_conn(daemon_t *d, bool idle_only);
/* What a doorbell brought: nothing, or the change of its one-row write (a hint), applied from it
 * or not (its rules need lookups, which read the claimed row; no rule names its table; a dry
 * run): then its claim does all, and goes at once. */
typedef enum { RING_EMPTY, RING_HINT_APPLIED, RING_HINT_UNAPPLIED } ring_t;
void outbox_rung(daemon_t *d, ring_t ring);
bool hinted(const daemon_t *d, int64_t id);
int hint_state(const daemon_t *d, int64_t id);
void claimed_keep(daemon_t *d, int64_t id);
void hints_forget(daemon_t *d);
void outbox_stop(daemon_t *d);
void release_claim(unit_t *u);
void unit_send_ack(unit_t *u);

/* daemon.c */
void watches_loaded(const PGresult *res, const char *err, void *arg);

#endif
