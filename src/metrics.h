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
    uint64_t dead_letters[EVD_DL_REASONS]; /* by evd_metrics_reasons[] */
    uint64_t lag_buckets[EVD_LAG_BUCKETS]; /* cumulative counts are computed when rendering */
    uint64_t lag_count;
    double lag_sum_s;
} evd_metrics_t;

extern const char *const evd_metrics_reasons[EVD_DL_REASONS];
extern const double evd_metrics_lag_bounds[EVD_LAG_BUCKETS];

/* op_index: 0..3 for INSERT, UPDATE, DELETE, TRUNCATE. */
void evd_metrics_change(evd_metrics_t *m, const char *table, int op_index);
void evd_metrics_dead_letter(evd_metrics_t *m, const char *reason);
void evd_metrics_lag(evd_metrics_t *m, double lag_ms);
/* Appends the counters above in Prometheus text format. */
int evd_metrics_render(const evd_metrics_t *m, evd_buf_t *out) EVD_MUST_CHECK;
void evd_metrics_free(evd_metrics_t *m);

#endif
