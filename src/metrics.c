/* metrics.c - counters and the commit-to-delete lag histogram in Prometheus text format. */
#include "metrics.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

const char *const evd_metrics_reasons[EVD_DL_REASONS] = {"retries_exhausted", "bad_payload", "unknown_table",
                                                         "shutdown"};

int evd_metrics_reason(const char *reason)
{
    for (int i = 0; i < EVD_DL_REASONS; i++)
        if (strcmp(reason, evd_metrics_reasons[i]) == 0)
            return i;
    return -1;
}

const double evd_metrics_lag_bounds[EVD_LAG_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                        0.1,    0.25,  0.5,    1,     2.5,  5,     10};
static const char *const op_names[4] = {"INSERT", "UPDATE", "DELETE", "TRUNCATE"};

void evd_metrics_change(evd_metrics_t *m, const char *table, int op_index)
{
    if (op_index < 0 || op_index > 3)
        return;
    for (size_t i = 0; i < m->ntables; i++) {
        if (strcmp(m->tables[i].name, table) == 0) {
            m->tables[i].ops[op_index]++;
            return;
        }
    }
    /* Tables come from the rules, so the list stays short; cap it anyway. */
    if (m->ntables >= 1024)
        return;
    if (m->ntables == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 8;
        evd_table_counts_t *t = realloc(m->tables, cap * sizeof(*t));
        if (!t)
            return;
        m->tables = t;
        m->cap = cap;
    }
    evd_table_counts_t *t = &m->tables[m->ntables++];
    memset(t, 0, sizeof(*t));
    size_t n = strlen(table);
    if (n >= sizeof(t->name))
        n = sizeof(t->name) - 1;
    memcpy(t->name, table, n);
    t->ops[op_index] = 1;
}

void evd_metrics_lag(evd_metrics_t *m, double lag_ms)
{
    double s = lag_ms / 1000.0;
    for (int i = 0; i < EVD_LAG_BUCKETS; i++) {
        if (s <= evd_metrics_lag_bounds[i]) {
            m->lag_buckets[i]++;
            break;
        }
    }
    m->lag_count++;
    m->lag_sum_s += s;
}

int evd_metrics_label(evd_buf_t *out, const char *s)
{
    for (;;) {
        size_t n = strcspn(s, "\\\"\n");
        if (evd_buf_append(out, s, n) < 0)
            return -ENOMEM;
        s += n;
        if (!*s)
            return 0;
        if (evd_buf_putc(out, '\\') < 0 || evd_buf_putc(out, *s == '\n' ? 'n' : *s) < 0)
            return -ENOMEM;
        s++;
    }
}

int evd_metrics_render(const evd_metrics_t *m, evd_buf_t *out)
{
    int rc = evd_buf_puts(out, "# HELP evictd_changes_total Changes read, by table and operation.\n"
                               "# TYPE evictd_changes_total counter\n");
    for (size_t i = 0; i < m->ntables && rc == 0; i++) {
        for (int op = 0; op < 4 && rc == 0; op++) {
            rc = evd_buf_puts(out, "evictd_changes_total{table=\"");
            if (rc == 0)
                rc = evd_metrics_label(out, m->tables[i].name);
            unsigned long long n = m->tables[i].ops[op];
            if (rc == 0)
                rc = evd_buf_printf(out, "\",op=\"%s\"} %llu\n", op_names[op], n);
        }
    }
    if (rc == 0)
        rc = evd_buf_puts(out, "# HELP evictd_dead_letters_total Dead-letter lines written, by reason.\n"
                               "# TYPE evictd_dead_letters_total counter\n");
    for (int i = 0; i < EVD_DL_REASONS && rc == 0; i++)
        rc = evd_buf_printf(out, "evictd_dead_letters_total{reason=\"%s\"} %llu\n", evd_metrics_reasons[i],
                            (unsigned long long)m->dead_letters[i]);
    if (rc == 0)
        rc = evd_buf_printf(out,
                            "# HELP evictd_dead_letters_dropped_total Bad-input lines not written: the "
                            "dead-letter file was past dead_letter.max_bytes.\n"
                            "# TYPE evictd_dead_letters_dropped_total counter\n"
                            "evictd_dead_letters_dropped_total %llu\n",
                            (unsigned long long)m->dead_letters_dropped);
    if (rc == 0)
        rc = evd_buf_puts(out, "# HELP evictd_lag_seconds Commit (trigger) to delete-confirmed time.\n"
                               "# TYPE evictd_lag_seconds histogram\n");
    uint64_t cum = 0;
    for (int i = 0; i < EVD_LAG_BUCKETS && rc == 0; i++) {
        cum += m->lag_buckets[i];
        rc = evd_buf_printf(out, "evictd_lag_seconds_bucket{le=\"%g\"} %llu\n", evd_metrics_lag_bounds[i],
                            (unsigned long long)cum);
    }
    if (rc == 0)
        rc = evd_buf_printf(out,
                            "evictd_lag_seconds_bucket{le=\"+Inf\"} %llu\nevictd_lag_seconds_sum %.6f\n"
                            "evictd_lag_seconds_count %llu\n",
                            (unsigned long long)m->lag_count, m->lag_sum_s, (unsigned long long)m->lag_count);
    return rc;
}

void evd_metrics_free(evd_metrics_t *m)
{
    free(m->tables);
    memset(m, 0, sizeof(*m));
}
