/* pg.h - one PostgreSQL connection on the loop: non-blocking libpq polled by libuv, LISTEN,
 * a FIFO of parameterised queries (prepared once per connection), reconnect with backoff.
 * Knows nothing of Redis. */
#ifndef EVD_PG_H
#define EVD_PG_H

#include <libpq-fe.h>
#include <uv.h>
#include "util.h"

typedef struct evd_pg evd_pg_t;

/* res is the query's last result (borrowed: cleared after the callback), or NULL when the
 * query failed or the connection was lost (err says why). Called from the loop. */
typedef void (*evd_pg_result_cb)(const PGresult *res, const char *err, void *arg);

typedef struct evd_pg_handlers {
    /* The connection is up (and LISTENing, if channels were given). */
    void (*connected)(evd_pg_t *pg, void *ud);
    /* The connection went away; queued queries have been failed already. */
    void (*disconnected)(evd_pg_t *pg, const char *why, void *ud);
    /* A notification; payload is NUL-terminated, len bytes. */
    void (*notify)(evd_pg_t *pg, const char *channel, const char *payload, size_t len, void *ud);
} evd_pg_handlers_t;

/* Starts connecting at once; never fails because the server is unreachable (it retries with
 * backoff). name appears in log lines. conninfo and channels are copied. */
int evd_pg_new(uv_loop_t *loop, const char *name, const char *conninfo, char *const *channels, size_t nchannels,
               const evd_pg_handlers_t *h, void *ud, evd_pg_t **out) EVD_MUST_CHECK;

/* Queues a query with text parameters (copied). Returns -ENOTCONN when the connection is not
 * up (cb is then not called), else 0; cb runs exactly once. prepare: use a named prepared
 * statement (the sql string is the cache key). */
int evd_pg_query(evd_pg_t *pg, const char *sql, int nparams, const char *const *params, bool prepare,
                 evd_pg_result_cb cb, void *arg) EVD_MUST_CHECK;
/* As evd_pg_query, no parameters, but queued right after the query in flight (from a query's
 * callback: first), ahead of any other waiting: a ROLLBACK that must end a transaction before
 * queries queued behind it begin. */
int evd_pg_query_next(evd_pg_t *pg, const char *sql, evd_pg_result_cb cb, void *arg) EVD_MUST_CHECK;

bool evd_pg_ready(const evd_pg_t *pg);
/* True while a query is queued or in flight. */
bool evd_pg_busy(const evd_pg_t *pg);
const char *evd_pg_last_error(const evd_pg_t *pg);
uint64_t evd_pg_reconnects(const evd_pg_t *pg);
/* Stops (or resumes) reading the socket: backpressure for the LISTEN connection. */
void evd_pg_pause(evd_pg_t *pg, bool paused);
/* Delivers the notifications libpq has read and holds, paused or not: for a listener about to
 * be closed. */
void evd_pg_take_notifies(evd_pg_t *pg);
/* Fails queued queries, closes the connection and handles, frees pg in the last close callback,
 * then calls closed(arg). Safe from a callback. */
void evd_pg_close(evd_pg_t *pg, void (*closed)(void *arg), void *arg);

#endif
