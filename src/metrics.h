/* metrics.h - counters and the lag histogram behind /metrics, rendered in Prometheus text. Pure. */
#ifndef EVD_METRICS_H
#define EVD_METRICS_H

#include <stdint.h>
#include "util.h"

#define EVD_LAG_BUCKETS 14
#define EVD_DL_REASONS 4

typedef struct evd_table_counts {
    char name[130];  /* schema.table */
    uint64_t ops[4]; /* INSERT, UPDATE, DELETE, TRUNCATE */
} evd_table_counts_t;

typedef struct evd_metrics {
    evd_table_counts_t *tables;
    size_t ntables, cap;
    /* Lines written to the dead-letter file, by evd_metrics_reasons[], and bad-input lines dropped
     * past dead_letter.max_bytes: the writer's counts (evd_dl_*), copied in before rendering, as
     * only the writer knows what reached the file. */
    uint64_t dead_letters[EVD_DL_REASONS];
    uint64_t dead_letters_dropped;
    uint64_t lag_buckets[EVD_LAG_BUCKETS]; /* cumulative counts are computed when rendering */
    uint64_t lag_count;
    double lag_sum_s;
} evd_metrics_t;

extern const char *const evd_metrics_reasons[EVD_DL_REASONS];
/* reason's index in evd_metrics_reasons[], or -1. */
int evd_metrics_reason(const char *reason);
extern const double evd_metrics_lag_bounds[EVD_LAG_BUCKETS];

/* op_index: 0..3 for INSERT, UPDATE, DELETE, TRUNCATE. */
void evd_metrics_change(evd_metrics_t *m, const char *table, int op_index);
void evd_metrics_lag(evd_metrics_t *m, double lag_ms);
/* Appends s as a Prometheus label value, without its quotes: backslash, double quote and newline
 * become \\, \" and \n, the text format's escapes (a Redis target may be named with any of
 * them). Returns 0 or -ENOMEM. */
int evd_metrics_label(evd_buf_t *out, const char *s) EVD_MUST_CHECK;
/* Appends the counters above in Prometheus text format. */
int evd_metrics_render(const evd_metrics_t *m, evd_buf_t *out) EVD_MUST_CHECK;
void evd_metrics_free(evd_metrics_t *m);

#endif
