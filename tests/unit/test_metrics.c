/* test_metrics.c - the Prometheus text of metrics.c: label escaping and the dead-letter counters. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "metrics.h"

static void assert_label(const char *value, const char *want)
{
    evd_buf_t b = {0};
    assert_int_equal(evd_buf_puts(&b, "x=\""), 0);
    assert_int_equal(evd_metrics_label(&b, value), 0);
    assert_int_equal(evd_buf_putc(&b, '"'), 0);
    assert_string_equal(b.data, want);
    evd_buf_free(&b);
}

/* The text format escapes backslash, double quote and newline in label values, and only them. */
static void test_label_escapes(void **state)
{
    (void)state;
    assert_label("", "x=\"\"");
    assert_label("default", "x=\"default\"");
    assert_label("we\"ird", "x=\"we\\\"ird\"");
    assert_label("a\\nb", "x=\"a\\\\nb\"");
    assert_label("line\nbreak", "x=\"line\\nbreak\"");
    assert_label("\"\\\n", "x=\"\\\"\\\\\\n\"");
    assert_label("tab\there 'é' {}", "x=\"tab\there 'é' {}\"");
}

static const char *render(const evd_metrics_t *m, evd_buf_t *b)
{
    evd_buf_reset(b);
    assert_int_equal(evd_metrics_render(m, b), 0);
    return b->data;
}

/* A table name comes from the change: rendered escaped, like every label value. */
static void test_render_escapes_table(void **state)
{
    (void)state;
    evd_metrics_t m = {0};
    evd_buf_t b = {0};
    evd_metrics_change(&m, "public.we\"ird\\\n", 1);
    const char *text = render(&m, &b);
    assert_non_null(strstr(text, "evictd_changes_total{table=\"public.we\\\"ird\\\\\\n\",op=\"UPDATE\"} 1\n"));
    assert_null(strstr(text, "we\"ird"));
    evd_buf_free(&b);
    evd_metrics_free(&m);
}

/* Written lines by reason, and dropped lines on their own. */
static void test_render_dead_letters(void **state)
{
    (void)state;
    evd_metrics_t m = {0};
    evd_buf_t b = {0};
    m.dead_letters[0] = 2;
    m.dead_letters_dropped = 3;
    const char *text = render(&m, &b);
    assert_non_null(strstr(text, "\nevictd_dead_letters_total{reason=\"retries_exhausted\"} 2\n"));
    assert_non_null(strstr(text, "\nevictd_dead_letters_total{reason=\"bad_payload\"} 0\n"));
    assert_non_null(strstr(text, "\n# TYPE evictd_dead_letters_dropped_total counter\n"
                                 "evictd_dead_letters_dropped_total 3\n"));
    evd_buf_free(&b);
    evd_metrics_free(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_label_escapes),
        cmocka_unit_test(test_render_escapes_table),
        cmocka_unit_test(test_render_dead_letters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
