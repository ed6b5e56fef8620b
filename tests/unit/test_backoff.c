/* test_backoff.c - evd_backoff_delay: full-jitter bounds, the cap, huge k without overflow. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "redis.h"

/* u just below 1: the top of the range. */
#define U_MAX 0.9999999999999999

static void test_zero_draw_is_zero(void **state)
{
    (void)state;
    assert_int_equal(evd_backoff_delay(50, 5000, 1, 0.0), 0);
    assert_int_equal(evd_backoff_delay(50, 5000, 30, 0.0), 0);
    assert_int_equal(evd_backoff_delay(1, 1, 1, 0.0), 0);
}

static void test_bounds_grow_with_k(void **state)
{
    (void)state;
    /* retry k waits uniform [0, min(max, initial * 2^k)] */
    assert_int_equal(evd_backoff_delay(50, 5000, 1, U_MAX), 100);
    assert_int_equal(evd_backoff_delay(50, 5000, 2, U_MAX), 200);
    assert_int_equal(evd_backoff_delay(50, 5000, 6, U_MAX), 3200);
    assert_int_equal(evd_backoff_delay(50, 5000, 1, 0.5), 50);
    for (int k = 1; k <= 10; k++) {
        int64_t cap = 50LL << k;
        if (cap > 5000)
            cap = 5000;
        for (int i = 0; i <= 100; i++) {
            double u = i / 100.0 * U_MAX;
            int64_t d = evd_backoff_delay(50, 5000, k, u);
            assert_true(d >= 0);
            assert_true(d <= cap);
        }
    }
}

static void test_cap(void **state)
{
    (void)state;
    assert_int_equal(evd_backoff_delay(50, 5000, 7, U_MAX), 5000);
    assert_int_equal(evd_backoff_delay(50, 5000, 20, U_MAX), 5000);
    assert_int_equal(evd_backoff_delay(3600000, 3600000, 1, U_MAX), 3600000);
    /* initial above max: max still wins */
    assert_int_equal(evd_backoff_delay(9000, 5000, 1, U_MAX), 5000);
}

static void test_large_k_does_not_overflow(void **state)
{
    (void)state;
    int ks[] = {31, 32, 62, 63, 64, 100, 1000, 1000000, INT32_MAX};
    for (size_t i = 0; i < sizeof(ks) / sizeof(ks[0]); i++) {
        assert_int_equal(evd_backoff_delay(50, 5000, ks[i], U_MAX), 5000);
        assert_int_equal(evd_backoff_delay(3600000, 3600000, ks[i], U_MAX), 3600000);
        int64_t d = evd_backoff_delay(1, INT64_MAX, ks[i], U_MAX);
        assert_true(d >= 0);
        d = evd_backoff_delay(INT64_MAX / 2, INT64_MAX, ks[i], 0.5);
        assert_true(d >= 0);
    }
    /* 2^40 ms fits; the uniform draw stays within it */
    assert_int_equal(evd_backoff_delay(1, INT64_MAX, 40, U_MAX), 1LL << 40);
}

static void test_degenerate_inputs(void **state)
{
    (void)state;
    assert_int_equal(evd_backoff_delay(0, 5000, 3, U_MAX), 0);
    assert_int_equal(evd_backoff_delay(50, 0, 3, U_MAX), 0);
    assert_int_equal(evd_backoff_delay(-5, -1, 3, U_MAX), 0);
    /* k below 1 is treated as no growth */
    assert_int_equal(evd_backoff_delay(50, 5000, 0, U_MAX), 50);
    assert_int_equal(evd_backoff_delay(50, 5000, -7, U_MAX), 50);
    /* draws outside [0,1) are clamped */
    assert_int_equal(evd_backoff_delay(50, 5000, 1, 1.0), 100);
    assert_int_equal(evd_backoff_delay(50, 5000, 1, -0.5), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zero_draw_is_zero),
        cmocka_unit_test(test_bounds_grow_with_k),
        cmocka_unit_test(test_cap),
        cmocka_unit_test(test_large_k_does_not_overflow),
        cmocka_unit_test(test_degenerate_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
