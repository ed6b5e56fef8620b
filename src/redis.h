/* redis.h - one Redis target: connection state machine, pipelined UNLINK batches, SCAN+UNLINK
 * pattern deletes, timeouts and retry with full-jitter backoff. Knows nothing of PostgreSQL. */
#ifndef EVD_REDIS_H
#define EVD_REDIS_H

#include <uv.h>
#include "config.h"
#include "util.h"

/* One change's work on one target. Owned by the caller; the target holds it (through `next`)
 * from evd_redis_submit until the job callback has run, and never frees it. */
typedef struct evd_job {
    char **keys; /* borrowed until the callback */
    size_t nkeys;
    char **patterns; /* borrowed until the callback */
    size_t npatterns;
    const char *table; /* for the `invalidated` log line ("schema.table") */
    double ts;         /* the change's ts (epoch ms) or 0 */
    void *ud;          /* the caller's */
    /* set by the target */
    int attempts; /* attempts made when the callback runs */
    struct evd_job *next;
} evd_job_t;

typedef struct evd_redis evd_redis_t;

/* status: 0 when Redis confirmed every key and pattern of the job; -EIO when retry.max_attempts
 * ran out (error holds the last error); -ECANCELED when the target was closed with the job
 * still pending. Called from the loop; the callback may submit new jobs. */
typedef void (*evd_redis_job_cb)(evd_job_t *job, int status, const char *error, void *ud);

/* Status passed once per job when its batch first enters retry backoff; the job stays pending
 * and gets its final callback later. The callback must not submit jobs or close the target. */
#define EVD_REDIS_RETRYING 1
/* Final status of a job on a target retired by evd_redis_retire that Redis did not confirm: the
 * job is the owner's again, to submit to the target that replaced this one. */
#define EVD_REDIS_MOVED 2

typedef struct evd_redis_opts {
    int64_t max_keys;
    int64_t max_delay_ms;
    int64_t max_attempts;
    int64_t initial_backoff_ms;
    int64_t max_backoff_ms;
    int64_t redelete_after_ms;
} evd_redis_opts_t;

typedef struct evd_redis_stats {
    uint64_t keys;     /* keys sent in confirmed UNLINKs */
    uint64_t deleted;  /* keys Redis reported removed */
    uint64_t patterns; /* pattern scans completed */
    uint64_t retries;
    uint64_t batches;
    uint64_t reconnects;
} evd_redis_stats_t;

/* Creates the target and starts connecting (never fails because the server is unreachable:
 * it retries with backoff and logs `connected` / `disconnected`). cfg is copied. */
int evd_redis_new(uv_loop_t *loop, const evd_target_cfg_t *cfg, const evd_redis_opts_t *opts, evd_redis_job_cb cb,
                  void *ud, evd_redis_t **out) EVD_MUST_CHECK;

/* Queues a job. A batch goes at once when none is in flight; else it fills up to max_keys or
 * max_delay_ms. The first attempt is immediate; retry k waits uniform [0, min(max, init*2^k)]. */
void evd_redis_submit(evd_redis_t *r, evd_job_t *job);

/* Applies new batch/retry options (SIGHUP). */
void evd_redis_set_opts(evd_redis_t *r, const evd_redis_opts_t *opts);

bool evd_redis_connected(const evd_redis_t *r);
/* The last connection error, or NULL. */
const char *evd_redis_last_error(const evd_redis_t *r);
/* Jobs submitted and not yet called back. */
size_t evd_redis_pending(const evd_redis_t *r);
/* No job pending and no re-delete (batch.redelete_after_ms) waiting or in flight. */
bool evd_redis_idle(const evd_redis_t *r);
const evd_redis_stats_t *evd_redis_stats(const evd_redis_t *r);
const char *evd_redis_name(const evd_redis_t *r);
/* True when cfg would need a new connection (url, credentials, db or timeout differ). */
bool evd_redis_cfg_differs(const evd_redis_t *r, const evd_target_cfg_t *cfg);

/* A reload replaced the target: its queued jobs and those waiting in retry backoff are called
 * back at once with EVD_REDIS_MOVED, and so is every batch in flight that fails from now on
 * (instead of being retried here); batches Redis confirms finish as usual. Close it once
 * evd_redis_idle (its confirmed batches' re-deletes have gone too). */
void evd_redis_retire(evd_redis_t *r);
/* Fails every pending job with -ECANCELED (callbacks run before this returns), disconnects,
 * closes the handles and frees r in the last close callback; then calls closed(arg) if set. */
void evd_redis_close(evd_redis_t *r, void (*closed)(void *arg), void *arg);

/* Pure helpers, unit-tested: the delay before retry k (k >= 1) given a uniform draw u in [0,1). */
int64_t evd_backoff_delay(int64_t initial_ms, int64_t max_ms, int k, double u);

#endif
