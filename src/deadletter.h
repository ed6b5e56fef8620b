/* deadletter.h - the dead-letter file: JSON lines written off the loop and fsynced per batch. */
#ifndef EVD_DEADLETTER_H
#define EVD_DEADLETTER_H

#include <uv.h>
#include "util.h"

typedef struct evd_dl evd_dl_t;

/* Opens (creating, appending) path; its directory must exist, and is fsynced when the file is
 * created. max_bytes <= 0 means no limit. Returns 0 or a negative errno. Loop thread only, like
 * everything below. */
int evd_dl_open(uv_loop_t *loop, const char *path, int64_t max_bytes, evd_dl_t **out) EVD_MUST_CHECK;

/* Writes lines (one JSON object per line, each ending in '\n') on the thread pool, fsyncs, then
 * calls done(status, arg) on the loop with 0 or a negative errno. Batches are written one at a
 * time in call order and their callbacks run in that order, never from inside this call.
 * `bad_input` lines are dropped (counted, done(0)) once the file is past max_bytes. by_reason:
 * NULL, or EVD_DL_REASONS counts of the lines by reason (evd_metrics_reasons[] order).
 * Returns 0 with the buffer taken over (*lines is left empty), or -ENOMEM with nothing queued,
 * *lines untouched and done never called. May be called from done. */
int evd_dl_write(evd_dl_t *dl, evd_buf_t *lines, const uint64_t *by_reason, bool bad_input,
                 void (*done)(int status, void *arg), void *arg);

/* Reopens the file by path (SIGHUP), possibly at a new path. The new file is opened now, so
 * an error (negative errno) leaves the old file in use; batches queued before this call still
 * go to the old file, later ones to the new one. */
int evd_dl_reopen(evd_dl_t *dl, const char *path, int64_t max_bytes) EVD_MUST_CHECK;

/* Lines written and fsynced / bad-input lines dropped past max_bytes, since open. Only lines
 * written are dead letters: evd_dl_lines_by_reason counts them by reason (an index in
 * evd_metrics_reasons[]), from the counts each evd_dl_write was given. */
uint64_t evd_dl_lines(const evd_dl_t *dl);
uint64_t evd_dl_lines_by_reason(const evd_dl_t *dl, int reason);
uint64_t evd_dl_dropped(const evd_dl_t *dl);

/* Closes after pending writes complete (their callbacks still run); frees dl, at once when
 * nothing is pending. dl must not be used after this call. NULL is allowed. */
void evd_dl_close(evd_dl_t *dl);

#endif
