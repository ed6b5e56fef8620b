/* test_alloc_fail.c - out of memory in the pure logic: config loading, SQL generation, payload
 * parsing, key expansion and the dead-letter form of a change, each run again and again with
 * its 1st, 2nd, 3rd ... allocation failing until a run needs no more than it was given.
 *
 * Every run with a failed allocation must come back as an error (NULL, -ENOMEM, or a payload
 * reported bad with "out of memory"), never as a success built on a missing piece; the run after
 * the last failure must succeed and give what an unhindered run gives. Under the ASan build a
 * leak or a bad access on any of these paths fails the test too.
 *
 * The allocator is wrapped at link time (tests/oom/alloc_fail.c), which reaches every call from
 * evictd's own objects; jansson's allocations go through the same counter (json_set_alloc_funcs). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "alloc_fail.h"
#include "config.h"
#include "payload.h"
#include "rules.h"
#include "util.h"

void *__wrap_malloc(size_t n);

/* jansson's allocations count too, except while a config loads: jansson 2.14's lexer ignores a
 * failure to grow its string buffer and drops the character (a failed allocation turned
 * "redis://127.0.0.1:6379/1" into host "127.0.0.16379"), which no caller can see. */
static bool count_jansson = true;

static void *json_alloc(size_t n)
{
    return count_jansson ? __wrap_malloc(n) : __real_malloc(n);
}

/* Far more than any run here allocates: a run that still fails past it is a loop. */
#define MAX_RUNS 20000

static char *test_env(const char *name)
{
    static char database_url[] = "postgres://evictd@127.0.0.1/test", password[] = "from-env";
    return strcmp(name, "DATABASE_URL") == 0 ? database_url : strcmp(name, "REDIS_PASSWORD") == 0 ? password : NULL;
}

static int setup(void **state)
{
    (void)state;
    json_set_alloc_funcs(json_alloc, free);
    return 0;
}

static evd_config_t *sample(const char *name, char *err, size_t errlen)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", EVD_SOURCE_DIR, name);
    return evd_config_load(path, test_env, err, errlen);
}

/* ---- config and the SQL it generates ------------------------------------------------------ */

/* assert_string_equal cuts long texts short: this shows where they part. */
static void same_text(const char *got, const char *want, const char *what)
{
    size_t i = 0;
    while (got[i] && got[i] == want[i])
        i++;
    if (got[i] != want[i])
        fail_msg("%s differs at byte %zu: got \"%.60s\", want \"%.60s\"", what, i, got + i, want + i);
}

/* What `evictd check` prints of a config: every rule, template and setting. */
static char *described(const evd_config_t *cfg)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    evd_config_describe(cfg, f);
    assert_int_equal(fclose(f), 0);
    return text;
}

static void test_config_load(void **state)
{
    (void)state;
    const char *names[] = {"config/routex.json",
                           "config/shop.json",
                           "tests/unit/config/valid/full.json",
                           "tests/unit/config/valid/ipv6.json",
                           "tests/unit/config/valid/bounds_min.json",
                           "tests/unit/config/valid/bounds_max.json"};
    count_jansson = false;
    for (size_t i = 0; i < EVD_ARRAY_LEN(names); i++) {
        char err[1024] = "";
        evd_config_t *cfg = sample(names[i], err, sizeof(err));
        assert_non_null(cfg);
        char *want = described(cfg);
        evd_config_free(cfg);
        long runs = 0;
        for (;; runs++) {
            assert_true(runs < MAX_RUNS);
            err[0] = '\0';
            evd_oom_arm(runs);
            cfg = sample(names[i], err, sizeof(err));
            bool failed = evd_oom_disarm();
            if (!failed) {
                assert_non_null(cfg);
                char *got = described(cfg);
                same_text(got, want, names[i]);
                free(got);
                evd_config_free(cfg);
                break;
            }
            if (cfg)
                fail_msg("%s: allocation %ld failed, yet the config loaded", names[i], runs);
            if (!strstr(err, "out of memory"))
                fail_msg("%s: allocation %ld failed: \"%s\"", names[i], runs, err);
        }
        print_message("%s: %ld allocations, each failed in turn\n", names[i], runs);
        assert_true(runs > 10);
        free(want);
    }
    count_jansson = true;
}

static void test_sqlgen(void **state)
{
    (void)state;
    char err[1024] = "";
    evd_config_t *cfg = sample("config/routex.json", err, sizeof(err));
    assert_non_null(cfg);
    evd_buf_t want = {0};
    assert_int_equal(evd_sqlgen(cfg, &want), 0);
    long runs = 0;
    for (;; runs++) {
        assert_true(runs < MAX_RUNS);
        evd_buf_t out = {0};
        evd_oom_arm(runs);
        int rc = evd_sqlgen(cfg, &out);
        bool failed = evd_oom_disarm();
        if (!failed) {
            assert_int_equal(rc, 0);
            assert_string_equal(out.data, want.data);
            evd_buf_free(&out);
            break;
        }
        assert_int_equal(rc, -ENOMEM);
        evd_buf_free(&out);
    }
    assert_true(runs > 0);
    evd_buf_free(&want);
    evd_config_free(cfg);
}

/* ---- payloads ----------------------------------------------------------------------------- */

static const char *const payloads[] = {
    /* the durable capture's one-row UPDATE */
    "{\"v\":1,\"id\":7,\"tx\":900,\"ts\":1700000000000.5,\"schema\":\"public\",\"table\":\"products\",\"op\":"
    "\"UPDATE\","
    "\"rows\":[{\"old\":{\"id\":5,\"sku\":\"A-1\",\"category_id\":2},\"new\":{\"id\":5,\"sku\":\"A-2\",\"category_id\":"
    "3}}]}",
    /* several rows, json values, escapes, unicode, a null key field (widens) */
    "{\"v\":1,\"id\":8,\"schema\":\"public\",\"table\":\"drivers\",\"op\":\"INSERT\",\"rows\":["
    "{\"new\":{\"id\":1,\"user_id\":\"T\\u00e9\\n\\\"x\",\"meta\":{\"a\":[1,2,{\"b\":null}]}}},"
    "{\"new\":{\"id\":2,\"user_id\":14,\"meta\":[true,false,1.5e3]}},{\"new\":{\"id\":3,\"user_id\":null}}]}",
    /* a notify-only row change */
    "{\"v\":1,\"id\":null,\"tx\":1,\"ts\":1.0,\"schema\":\"public\",\"table\":\"drivers\",\"op\":\"DELETE\","
    "\"old\":{\"id\":9,\"name\":\"Zo\\u00eb\"}}",
    /* a reference (too big for NOTIFY) */
    "{\"v\":1,\"id\":null,\"ref\":true,\"schema\":\"public\",\"table\":\"products\",\"op\":\"UPDATE\"}",
};

static void test_payload_parse(void **state)
{
    (void)state;
    for (size_t i = 0; i < EVD_ARRAY_LEN(payloads); i++) {
        const char *p = payloads[i];
        char err[256] = "";
        evd_change_t want;
        assert_int_equal(evd_payload_parse(p, strlen(p), &want, err, sizeof(err)), EVD_PAYLOAD_OK);
        evd_buf_t want_json = {0};
        assert_int_equal(evd_change_to_json(&want, &want_json), 0);
        long runs = 0;
        for (;; runs++) {
            assert_true(runs < MAX_RUNS);
            evd_change_t c;
            err[0] = '\0';
            evd_oom_arm(runs);
            evd_payload_status_t st = evd_payload_parse(p, strlen(p), &c, err, sizeof(err));
            bool failed = evd_oom_disarm();
            if (!failed) {
                assert_int_equal(st, EVD_PAYLOAD_OK);
                evd_buf_t got = {0};
                assert_int_equal(evd_change_to_json(&c, &got), 0);
                assert_string_equal(got.data, want_json.data);
                evd_buf_free(&got);
                evd_change_clear(&c);
                break;
            }
            /* Reported as it is: a daemon must not take this payload for bad input. */
            if (st != EVD_PAYLOAD_BAD || strcmp(err, "out of memory") != 0)
                fail_msg("payload %zu, allocation %ld failed: status %d, \"%s\"", i, runs, (int)st, err);
        }
        print_message("payload %zu: %ld allocations\n", i, runs);
        /* The dead-letter form of the change. */
        runs = 0;
        for (;; runs++) {
            assert_true(runs < MAX_RUNS);
            evd_buf_t got = {0};
            evd_oom_arm(runs);
            int rc = evd_change_to_json(&want, &got);
            bool failed = evd_oom_disarm();
            if (!failed) {
                assert_int_equal(rc, 0);
                assert_string_equal(got.data, want_json.data);
                evd_buf_free(&got);
                break;
            }
            assert_int_equal(rc, -ENOMEM);
            evd_buf_free(&got);
        }
        evd_buf_free(&want_json);
        evd_change_clear(&want);
    }
}

/* ---- key expansion ------------------------------------------------------------------------ */

/* The keys of target t, one per line, sorted: expansions compare by content, not order. */
static void keys_text(const evd_expansion_t *x, evd_buf_t *out)
{
    for (size_t t = 0; t < x->ntargets; t++) {
        const evd_keyset_t *ks = &x->per_target[t];
        const evd_keyvec_t *vs[2] = {&ks->keys, &ks->patterns};
        for (size_t k = 0; k < 2; k++) {
            char **sorted = __real_malloc((vs[k]->n + 1) * sizeof(*sorted));
            assert_non_null(sorted);
            for (size_t i = 0; i < vs[k]->n; i++)
                sorted[i] = (char *)vs[k]->v[i];
            for (size_t i = 1; i < vs[k]->n; i++) /* insertion sort: a handful of keys */
                for (size_t j = i; j > 0 && strcmp(sorted[j - 1], sorted[j]) > 0; j--) {
                    char *tmp = sorted[j];
                    sorted[j] = sorted[j - 1];
                    sorted[j - 1] = tmp;
                }
            for (size_t i = 0; i < vs[k]->n; i++)
                assert_int_equal(evd_buf_printf(out, "%zu %s %s\n", t, k ? "pattern" : "key", sorted[i]), 0);
            free(sorted);
        }
    }
    assert_int_equal(evd_buf_printf(out, "matched %u widened %u\n", x->matched, x->widened), 0);
}

static void test_expand(void **state)
{
    (void)state;
    char err[1024] = "";
    evd_config_t *cfg = sample("config/routex.json", err, sizeof(err));
    assert_non_null(cfg);
    for (size_t i = 0; i < EVD_ARRAY_LEN(payloads); i++) {
        const char *p = payloads[i];
        evd_change_t c;
        assert_int_equal(evd_payload_parse(p, strlen(p), &c, err, sizeof(err)), EVD_PAYLOAD_OK);
        evd_expansion_t x;
        assert_int_equal(evd_expansion_init(&x, cfg->ntargets), 0);
        assert_int_equal(evd_rules_expand(&cfg->rules, &c, NULL, NULL, &x), 0);
        evd_buf_t want = {0};
        keys_text(&x, &want);
        evd_expansion_free(&x);
        long runs = 0;
        for (;; runs++) {
            assert_true(runs < MAX_RUNS);
            evd_oom_arm(runs);
            int rc = evd_expansion_init(&x, cfg->ntargets);
            bool made = rc == 0;
            if (made)
                rc = evd_rules_expand(&cfg->rules, &c, NULL, NULL, &x);
            bool failed = evd_oom_disarm();
            if (!failed) {
                assert_int_equal(rc, 0);
                evd_buf_t got = {0};
                keys_text(&x, &got);
                assert_string_equal(got.data, want.data);
                evd_buf_free(&got);
                evd_expansion_free(&x);
                break;
            }
            assert_int_equal(rc, -ENOMEM);
            if (made)
                evd_expansion_free(&x);
        }
        print_message("payload %zu: expansion %ld allocations\n", i, runs);
        evd_buf_free(&want);
        evd_change_clear(&c);
    }
    evd_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_load),
        cmocka_unit_test(test_sqlgen),
        cmocka_unit_test(test_payload_parse),
        cmocka_unit_test(test_expand),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
