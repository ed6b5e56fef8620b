/* test_util.c - small helpers of util.c not covered elsewhere. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "util.h"

/* Nearest rank: with two samples the median is the lower one and p99 the higher; the p99 of
 * 100 samples is the 99th, of 1,000 the 990th. */
static void test_quantile_nearest_rank(void **state)
{
    (void)state;
    const double one[] = {7};
    assert_true(evd_quantile(one, 1, 0.5) == 7);
    assert_true(evd_quantile(one, 1, 0.99) == 7);
    const double two[] = {4, 996};
    assert_true(evd_quantile(two, 2, 0.5) == 4);
    assert_true(evd_quantile(two, 2, 0.99) == 996);
    double v[1000];
    for (size_t i = 0; i < 1000; i++)
        v[i] = (double)(i + 1);
    assert_true(evd_quantile(v, 100, 0.5) == 50);
    assert_true(evd_quantile(v, 100, 0.99) == 99);
    assert_true(evd_quantile(v, 101, 0.5) == 51);
    assert_true(evd_quantile(v, 1000, 0.99) == 990);
    assert_true(evd_quantile(v, 1000, 1.0) == 1000);
    assert_true(evd_quantile(v, 3, 0.99) == 3);
}

/* libpq's parse errors quote the raw value, which may be a password. */
static void test_mask_quoted(void **state)
{
    (void)state;
    char a[] = "invalid percent-encoded token: \"50%off\"\n";
    evd_mask_quoted(a);
    assert_string_equal(a, "invalid percent-encoded token: \"******\"\n");
    char b[] = "missing \"=\" after \"secret\" in connection info string";
    evd_mask_quoted(b);
    assert_string_equal(b, "missing \"*\" after \"******\" in connection info string");
    char c[] = "unbalanced \"quote";
    evd_mask_quoted(c);
    assert_string_equal(c, "unbalanced \"quote");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quantile_nearest_rank),
        cmocka_unit_test(test_mask_quoted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
