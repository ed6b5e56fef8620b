/* test_payload_cross.c - the one-pass payload parser agrees with the jansson reference on a
 * corpus and on 400,000 deterministic mutations of it (the fuzz harness does the same, open-ended). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "payload_cross.h"

static const char *const corpus[] = {
    "",
    "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\",\"table\":\"shipments\","
    "\"op\":\"UPDATE\",\"old\":{\"id\":7,\"product_id\":3,\"driver_id\":2},\"new\":{\"id\":7,\"product_id\":4,"
    "\"driver_id\":null}}",
    "{\"v\" : 1, \"id\" : 5, \"tx\" : 77, \"ts\" : 1763765000123, \"schema\" : \"public\", \"table\" : "
    "\"products\", \"op\" : \"UPDATE\", \"rows\" : [{\"old\" : {\"id\" : 1, \"price\" : \"3.50\"}, \"new\" : "
    "{\"id\" : 1, \"price\" : \"3.60\"}}, {\"new\" : {\"id\" : 2}}]}",
    "{\"v\":1,\"id\":null,\"tx\":1,\"ts\":2.5e3,\"schema\":\"s\",\"table\":\"t\",\"op\":\"INSERT\",\"new\":"
    "{\"a\":true,\"b\":false,\"c\":\"x\\u00e9\\ud83d\\ude00\\n\\\"\",\"d\":-0,\"e\":1e-7,\"f\":{\"k\":[1,2,{}]},"
    "\"g\":[],\"\":\"empty name\"}}",
    "{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}",
    "{\"v\":1,\"id\":9,\"ref\":true,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\"}",
    "{\"v\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\",\"old\":{\"id\":\"caf\xc3\xa9\"}}",
    "{\"v\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\",\"new\":{\"id\":9223372036854775807,"
    "\"n\":-9223372036854775808,\"r\":1.7976931348623157e308}}",
    "[1,2,3]",
    "{\"v\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\",\"rows\":[{\"old\":{\"a\":1}},"
    "{\"new\":{\"a\":2}},{\"old\":{\"a\":3},\"new\":{\"a\":4}}]}",
};

static uint64_t rng = 0x9E3779B97F4A7C15ULL;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Bytes that make interesting JSON edits. */
static const char alphabet[] = "{}[]:,\"\\ 0123456789-+.eEtrufalsn\x01\x1f\x00\x7f\x80\xc3\xa9\xed\xa0\xff u";

static void check(const uint8_t *p, size_t n)
{
    char why[512];
    if (payload_cross_check(p, n, why, sizeof(why)) != 0)
        fail_msg("parsers disagree on %.*s: %s", (int)n, (const char *)p, why);
}

static void test_corpus(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(corpus) / sizeof(corpus[0]); i++)
        check((const uint8_t *)corpus[i], strlen(corpus[i]));
}

static void test_mutations(void **state)
{
    (void)state;
    uint8_t buf[1024];
    for (int iter = 0; iter < 400000; iter++) {
        const char *src = corpus[next() % (sizeof(corpus) / sizeof(corpus[0]))];
        size_t n = strlen(src);
        memcpy(buf, src, n);
        int edits = 1 + (int)(next() % 3);
        for (int e = 0; e < edits && n > 0; e++) {
            size_t at = next() % n;
            switch (next() % 4) {
            case 0: /* replace */ buf[at] = (uint8_t)alphabet[next() % (sizeof(alphabet) - 1)]; break;
            case 1: /* delete */
                memmove(buf + at, buf + at + 1, n - at - 1);
                n--;
                break;
            case 2: /* insert */
                if (n < sizeof(buf) - 1) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = (uint8_t)alphabet[next() % (sizeof(alphabet) - 1)];
                    n++;
                }
                break;
            default: /* truncate */ n = at; break;
            }
        }
        check(buf, n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus),
        cmocka_unit_test(test_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
