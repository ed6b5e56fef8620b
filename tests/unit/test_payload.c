/* test_payload.c - the change payload: every valid form, and bad input refused with a reason. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "payload.h"

static void parse_ok(const char *json, evd_change_t *c)
{
    char err[256] = "";
    evd_payload_status_t st = evd_payload_parse(json, strlen(json), c, err, sizeof(err));
    if (st != EVD_PAYLOAD_OK)
        fail_msg("rejected (%d): %s: %s", (int)st, err, json);
    assert_non_null(c->arena);
}

static const evd_value_t *col_of(const evd_image_t *img, const char *col)
{
    assert_non_null(img);
    const evd_value_t *v = evd_image_get(img, col, strlen(col));
    assert_non_null(v);
    return v;
}

static int64_t int_of(const evd_image_t *img, const char *col)
{
    const evd_value_t *v = col_of(img, col);
    assert_int_equal(v->type, EVD_V_INT);
    return v->i;
}

/* The struct a failed or doorbell parse leaves behind: nothing owned. */
static void assert_cleared(const evd_change_t *c)
{
    assert_null(c->arena);
    assert_null(c->rows);
    assert_int_equal(c->nrows, 0);
    assert_int_equal(c->id, -1);
    assert_int_equal(c->tx, -1);
    assert_false(c->ref);
}

/* ---- valid payloads ---------------------------------------------------------------------- */

static void test_insert(void **state)
{
    (void)state;
    evd_change_t c;
    parse_ok("{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\","
             "\"table\":\"shipments\",\"op\":\"INSERT\","
             "\"new\":{\"id\":7,\"product_id\":3,\"price\":\"3.50\",\"ok\":true,\"n\":null}}",
             &c);
    assert_int_equal(c.id, 42);
    assert_int_equal(c.tx, 901);
    assert_true(c.ts == 1763765000123.4);
    assert_string_equal(c.schema, "public");
    assert_string_equal(c.table, "shipments");
    assert_int_equal(c.op, EVD_OP_INSERT);
    assert_false(c.ref);
    assert_int_equal(c.nrows, 1);
    assert_null(c.rows[0].old_img);
    assert_int_equal(int_of(c.rows[0].new_img, "product_id"), 3);
    assert_int_equal(col_of(c.rows[0].new_img, "price")->type, EVD_V_STR);
    assert_string_equal(col_of(c.rows[0].new_img, "price")->s, "3.50");
    assert_int_equal(col_of(c.rows[0].new_img, "ok")->type, EVD_V_TRUE);
    assert_int_equal(col_of(c.rows[0].new_img, "n")->type, EVD_V_NULL);
    assert_null(evd_image_get(c.rows[0].new_img, "missing", 7));
    evd_change_clear(&c);
    assert_cleared(&c);
}

static void test_update(void **state)
{
    (void)state;
    evd_change_t c;
    parse_ok("{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\","
             "\"table\":\"shipments\",\"op\":\"UPDATE\","
             "\"old\":{\"id\":7,\"product_id\":3,\"driver_id\":2},"
             "\"new\":{\"id\":7,\"product_id\":4,\"driver_id\":2}}",
             &c);
    assert_int_equal(c.op, EVD_OP_UPDATE);
    assert_int_equal(c.nrows, 1);
    assert_int_equal(int_of(c.rows[0].old_img, "product_id"), 3);
    assert_int_equal(int_of(c.rows[0].new_img, "product_id"), 4);
    evd_change_clear(&c);
}

static void test_delete_notify_only(void **state)
{
    (void)state;
    evd_change_t c;
    /* Not durable: id null; tx and ts may be absent. */
    parse_ok("{\"v\":1,\"id\":null,\"schema\":\"app\",\"table\":\"drivers\",\"op\":\"DELETE\","
             "\"old\":{\"id\":2,\"user_id\":20,\"meta\":{\"a\":[1,2]}}}",
             &c);
    assert_int_equal(c.id, -1);
    assert_int_equal(c.tx, -1);
    assert_true(c.ts == 0);
    assert_string_equal(c.schema, "app");
    assert_int_equal(c.op, EVD_OP_DELETE);
    assert_int_equal(c.nrows, 1);
    assert_null(c.rows[0].new_img);
    assert_int_equal(int_of(c.rows[0].old_img, "user_id"), 20);
    evd_change_clear(&c);
}

static void test_truncate(void **state)
{
    (void)state;
    evd_change_t c;
    parse_ok("{\"v\":1,\"id\":5,\"tx\":7,\"ts\":1.5,\"schema\":\"public\",\"table\":\"products\","
             "\"op\":\"TRUNCATE\"}",
             &c);
    assert_int_equal(c.op, EVD_OP_TRUNCATE);
    assert_int_equal(c.id, 5);
    assert_int_equal(c.nrows, 0);
    assert_false(c.ref);
    evd_change_clear(&c);
}

/* Reals parse to exactly what strtod gives (the parser takes a shortcut for the common ones). */
static void test_reals_as_strtod(void **state)
{
    (void)state;
    static const char *const fixed[] = {"1763765000123.456",
                                        "1763765000123.4",
                                        "0.5",
                                        "-0.0",
                                        "0.0",
                                        "-1.5",
                                        "0.001",
                                        "1.500",
                                        "9007199254740.992",
                                        "9007199254740.993",
                                        "9007199254740993.0",
                                        "18014398509481985.0",
                                        "0.1",
                                        "0.3",
                                        "123456789012345678.9",
                                        "1.0000000000000000000000001",
                                        "1e3",
                                        "2.5e-3",
                                        "-7.25E+2",
                                        "0.0000000000000000000001",
                                        "0.00000000000000000000001",
                                        "4.9406564584124654e-324",
                                        "1.7976931348623157e308",
                                        "99999999999999999999.5",
                                        "1.23456789012345678901234567890"};
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < 20000 + sizeof(fixed) / sizeof(fixed[0]); i++) {
        char num[64];
        if (i < sizeof(fixed) / sizeof(fixed[0])) {
            snprintf(num, sizeof(num), "%s", fixed[i]);
        } else {
            /* Random decimals: up to 18 digits, a point anywhere, sometimes a sign. */
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            uint64_t m = x % 1000000000000000000ULL >> (x % 40);
            int frac = 1 + (int)((x >> 20) % 24);
            char digits[32];
            int n = snprintf(digits, sizeof(digits), "%llu", (unsigned long long)m);
            char *o = num;
            if (x & 1)
                *o++ = '-';
            if (frac >= n) {
                o += sprintf(o, "0.");
                for (int k = n; k < frac; k++)
                    *o++ = '0';
                o += sprintf(o, "%s", digits);
            } else {
                o += sprintf(o, "%.*s.%s", n - frac, digits, digits + n - frac);
            }
        }
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"v\":1,\"id\":1,\"tx\":1,\"ts\":%s,\"schema\":\"s\",\"table\":\"t\",\"op\":\"TRUNCATE\"}", num);
        evd_change_t c;
        parse_ok(json, &c);
        double want = strtod(num, NULL);
        if (memcmp(&c.ts, &want, sizeof(want)) != 0)
            fail_msg("%s: parsed %.17g, strtod %.17g", num, c.ts, want);
        evd_change_clear(&c);
    }
}

static void test_doorbell(void **state)
{
    (void)state;
    evd_change_t c;
    char err[64] = "untouched";
    assert_int_equal(evd_payload_parse("", 0, &c, err, sizeof(err)), EVD_PAYLOAD_DOORBELL);
    assert_cleared(&c);
    /* Only the empty payload is a doorbell; the length decides, not the buffer. */
    assert_int_equal(evd_payload_parse("{}", 0, &c, err, sizeof(err)), EVD_PAYLOAD_DOORBELL);
    assert_cleared(&c);
    evd_change_clear(&c);
}

static void test_ref(void **state)
{
    (void)state;
    evd_change_t c;
    parse_ok("{\"v\":1,\"id\":42,\"ref\":true,\"schema\":\"public\",\"table\":\"shipments\","
             "\"op\":\"UPDATE\"}",
             &c);
    assert_true(c.ref);
    assert_int_equal(c.id, 42);
    assert_int_equal(c.op, EVD_OP_UPDATE);
    assert_int_equal(c.nrows, 0);
    evd_change_clear(&c);
    assert_cleared(&c);
}

static void test_chunk(void **state)
{
    (void)state;
    evd_change_t c;
    parse_ok("{\"v\":1,\"id\":9,\"tx\":3,\"ts\":2,\"schema\":\"public\",\"table\":\"t\","
             "\"op\":\"UPDATE\",\"rows\":[{\"old\":{\"a\":1},\"new\":{\"a\":2}},"
             "{\"old\":{\"a\":3}},{\"new\":{\"a\":4}}]}",
             &c);
    assert_int_equal(c.op, EVD_OP_UPDATE);
    assert_int_equal(c.nrows, 3);
    assert_int_equal(int_of(c.rows[0].old_img, "a"), 1);
    assert_int_equal(int_of(c.rows[0].new_img, "a"), 2);
    assert_int_equal(int_of(c.rows[1].old_img, "a"), 3);
    assert_null(c.rows[1].new_img);
    assert_null(c.rows[2].old_img);
    assert_int_equal(int_of(c.rows[2].new_img, "a"), 4);
    evd_change_clear(&c);
    assert_cleared(&c);

    parse_ok("{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
             "\"rows\":[{\"new\":{\"a\":1}}]}",
             &c);
    assert_int_equal(c.nrows, 1);
    assert_null(c.rows[0].old_img);
    evd_change_clear(&c);

    parse_ok("{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
             "\"rows\":[{\"old\":{\"a\":1}},{\"old\":{\"a\":2}}]}",
             &c);
    assert_int_equal(c.nrows, 2);
    assert_int_equal(int_of(c.rows[1].old_img, "a"), 2);
    evd_change_clear(&c);
}

/* Builds a chunk payload of n INSERT rows. */
static char *chunk_of(size_t n)
{
    size_t cap = 128 + n * 32;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t len = (size_t)snprintf(s, cap,
                                  "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\","
                                  "\"op\":\"INSERT\",\"rows\":[");
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(s + len, cap - len, "%s{\"new\":{\"a\":%zu}}", i ? "," : "", i);
    snprintf(s + len, cap - len, "]}");
    return s;
}

static void test_chunk_limit(void **state)
{
    (void)state;
    evd_change_t c;
    char *s = chunk_of(500);
    parse_ok(s, &c);
    assert_int_equal(c.nrows, 500);
    assert_int_equal(int_of(c.rows[499].new_img, "a"), 499);
    evd_change_clear(&c);
    free(s);

    s = chunk_of(501);
    char err[256] = "";
    assert_int_equal(evd_payload_parse(s, strlen(s), &c, err, sizeof(err)), EVD_PAYLOAD_BAD);
    assert_non_null(strstr(err, "1..500"));
    assert_cleared(&c);
    free(s);
}

static void test_names(void **state)
{
    (void)state;
    evd_change_t c;
    char name63[64], json[256];
    memset(name63, 'n', 63);
    name63[63] = '\0';
    snprintf(json, sizeof(json), "{\"v\":1,\"id\":1,\"schema\":\"%s\",\"table\":\"%s\",\"op\":\"TRUNCATE\"}", name63,
             name63);
    parse_ok(json, &c);
    assert_string_equal(c.schema, name63);
    assert_string_equal(c.table, name63);
    evd_change_clear(&c);

    assert_int_equal(evd_op_parse("INSERT"), EVD_OP_INSERT);
    assert_int_equal(evd_op_parse("UPDATE"), EVD_OP_UPDATE);
    assert_int_equal(evd_op_parse("DELETE"), EVD_OP_DELETE);
    assert_int_equal(evd_op_parse("TRUNCATE"), EVD_OP_TRUNCATE);
    assert_int_equal(evd_op_parse("insert"), 0);
    assert_int_equal(evd_op_parse(""), 0);
    assert_string_equal(evd_op_name(EVD_OP_INSERT), "INSERT");
    assert_string_equal(evd_op_name(EVD_OP_TRUNCATE), "TRUNCATE");
    assert_string_equal(evd_op_name(EVD_OP_ALL), "?");
}

/* ---- bad payloads ------------------------------------------------------------------------ */

#define HEAD "\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\","

typedef struct bad_case {
    const char *name;
    const char *json;
    size_t len;
    const char *why;
} bad_case_t;

/* A literal and its length, NUL bytes inside included. */
#define LIT(s) s, sizeof(s) - 1

static const bad_case_t bad_cases[] = {
    {"not JSON", LIT("{\"v\":1,"), "not JSON"},
    {"not JSON word", LIT("hello"), "not JSON"},
    {"only whitespace", LIT(" \n"), "not JSON"},
    {"trailing garbage", LIT("{" HEAD "\"op\":\"TRUNCATE\"} x"), "not JSON"},
    {"two documents", LIT("{" HEAD "\"op\":\"TRUNCATE\"}{}"), "not JSON"},
    {"duplicate key", LIT("{" HEAD "\"op\":\"TRUNCATE\",\"op\":\"TRUNCATE\"}"), "duplicate"},
    {"bad utf-8", LIT("{" HEAD "\"op\":\"INSERT\",\"new\":{\"a\":\"\xff\"}}"), "not JSON"},
    {"array", LIT("[1,2]"), "not a JSON object"},
    {"number", LIT("42"), "not JSON"},
    {"missing v", LIT("{\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"), "\"v\""},
    {"v 2", LIT("{\"v\":2,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"), "\"v\""},
    {"v string", LIT("{\"v\":\"1\",\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"), "\"v\""},
    {"v real", LIT("{\"v\":1.0,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"), "\"v\""},
    {"missing table", LIT("{\"v\":1,\"id\":1,\"schema\":\"public\",\"op\":\"TRUNCATE\"}"), "\"table\" missing"},
    {"table not string", LIT("{\"v\":1,\"schema\":\"public\",\"table\":5,\"op\":\"TRUNCATE\"}"),
     "\"table\" missing or not a string"},
    {"table empty", LIT("{\"v\":1,\"schema\":\"public\",\"table\":\"\",\"op\":\"TRUNCATE\"}"), "\"table\" is empty"},
    {"table too long",
     LIT("{\"v\":1,\"schema\":\"public\",\"table\":"
         "\"tttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttttt\","
         "\"op\":\"TRUNCATE\"}"),
     "too long"},
    {"table holds escaped NUL", LIT("{\"v\":1,\"schema\":\"public\",\"table\":\"t\\u0000x\",\"op\":\"TRUNCATE\"}"),
     "not JSON"},
    {"missing schema", LIT("{\"v\":1,\"table\":\"t\",\"op\":\"TRUNCATE\"}"), "\"schema\" missing"},
    {"missing op", LIT("{" HEAD "\"new\":{\"a\":1}}"), "\"op\" missing"},
    {"unknown op", LIT("{" HEAD "\"op\":\"UPSERT\",\"new\":{\"a\":1}}"), "\"op\""},
    {"lowercase op", LIT("{" HEAD "\"op\":\"insert\",\"new\":{\"a\":1}}"), "\"op\""},
    {"op not string", LIT("{" HEAD "\"op\":1,\"new\":{\"a\":1}}"), "\"op\""},
    {"unknown field", LIT("{" HEAD "\"op\":\"INSERT\",\"new\":{\"a\":1},\"extra\":1}"), "unknown field \"extra\""},
    {"INSERT with old", LIT("{" HEAD "\"op\":\"INSERT\",\"old\":{\"a\":1},\"new\":{\"a\":1}}"),
     "INSERT carries \"new\" only"},
    {"INSERT without new", LIT("{" HEAD "\"op\":\"INSERT\"}"), "INSERT carries \"new\" only"},
    {"DELETE with new", LIT("{" HEAD "\"op\":\"DELETE\",\"new\":{\"a\":1}}"), "DELETE carries \"old\" only"},
    {"DELETE with both", LIT("{" HEAD "\"op\":\"DELETE\",\"old\":{\"a\":1},\"new\":{\"a\":1}}"),
     "DELETE carries \"old\" only"},
    {"UPDATE missing new", LIT("{" HEAD "\"op\":\"UPDATE\",\"old\":{\"a\":1}}"), "UPDATE lacks \"old\" or \"new\""},
    {"UPDATE missing old", LIT("{" HEAD "\"op\":\"UPDATE\",\"new\":{\"a\":1}}"), "UPDATE lacks \"old\" or \"new\""},
    {"old null", LIT("{" HEAD "\"op\":\"UPDATE\",\"old\":null,\"new\":{\"a\":1}}"), "\"old\" is not an object"},
    {"new array", LIT("{" HEAD "\"op\":\"INSERT\",\"new\":[1]}"), "\"new\" is not an object"},
    {"rows not array", LIT("{" HEAD "\"op\":\"INSERT\",\"rows\":{\"new\":{\"a\":1}}}"), "\"rows\" must be an array"},
    {"rows empty", LIT("{" HEAD "\"op\":\"INSERT\",\"rows\":[]}"), "\"rows\" must be an array"},
    {"rows with new", LIT("{" HEAD "\"op\":\"INSERT\",\"new\":{\"a\":1},\"rows\":[{\"new\":{}}]}"), "without old/new"},
    {"rows entry not object", LIT("{" HEAD "\"op\":\"INSERT\",\"rows\":[1]}"), "\"rows\" entry is not an object"},
    {"rows entry empty", LIT("{" HEAD "\"op\":\"UPDATE\",\"rows\":[{}]}"), "\"rows\" entry is not an object"},
    {"rows entry unknown field", LIT("{" HEAD "\"op\":\"INSERT\",\"rows\":[{\"new\":{},\"x\":1}]}"),
     "unknown field \"x\" in a row"},
    {"rows INSERT with old", LIT("{" HEAD "\"op\":\"INSERT\",\"rows\":[{\"old\":{\"a\":1}}]}"),
     "INSERT carries \"new\" only"},
    {"rows DELETE with new", LIT("{" HEAD "\"op\":\"DELETE\",\"rows\":[{\"old\":{}},{\"new\":{}}]}"),
     "DELETE carries \"old\" only"},
    {"rows image not object", LIT("{" HEAD "\"op\":\"UPDATE\",\"rows\":[{\"old\":3}]}"), "\"old\" is not an object"},
    {"TRUNCATE with old", LIT("{" HEAD "\"op\":\"TRUNCATE\",\"old\":{\"a\":1}}"), "TRUNCATE carries no images"},
    {"TRUNCATE with rows", LIT("{" HEAD "\"op\":\"TRUNCATE\",\"rows\":[{\"old\":{}}]}"), "TRUNCATE carries no images"},
    {"ref false", LIT("{" HEAD "\"op\":\"UPDATE\",\"ref\":false}"), "\"ref\" must be true"},
    {"ref string", LIT("{" HEAD "\"op\":\"UPDATE\",\"ref\":\"true\"}"), "\"ref\" must be true"},
    {"ref with new", LIT("{" HEAD "\"op\":\"INSERT\",\"ref\":true,\"new\":{\"a\":1}}"), "come without images"},
    {"ref with rows", LIT("{" HEAD "\"op\":\"INSERT\",\"ref\":true,\"rows\":[{\"new\":{}}]}"), "come without images"},
    {"id negative", LIT("{\"v\":1,\"id\":-3,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"),
     "\"id\" is not a positive integer"},
    {"id zero", LIT("{\"v\":1,\"id\":0,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"),
     "\"id\" is not a positive integer"},
    {"id string", LIT("{\"v\":1,\"id\":\"4\",\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"),
     "\"id\" is not a positive integer"},
    {"id real", LIT("{\"v\":1,\"id\":4.5,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}"),
     "\"id\" is not a positive integer"},
    {"tx string", LIT("{" HEAD "\"tx\":\"9\",\"op\":\"TRUNCATE\"}"), "\"tx\" is not an integer"},
    {"ts string", LIT("{" HEAD "\"ts\":\"now\",\"op\":\"TRUNCATE\"}"), "\"ts\" is not a number"},
    {"NUL byte between tokens", LIT("{\"v\":1,\0\"id\":1}"), "not JSON"},
    {"NUL byte in a string", LIT("{" HEAD "\"op\":\"INS\0ERT\",\"new\":{}}"), "not JSON"},
    {"NUL byte after the document", LIT("{" HEAD "\"op\":\"TRUNCATE\"}\0"), "not JSON"},
};

static void check_bad(const char *name, const char *buf, size_t len, const char *why)
{
    evd_change_t c;
    char err[256];
    memset(err, 0, sizeof(err));
    evd_payload_status_t st = evd_payload_parse(buf, len, &c, err, sizeof(err));
    if (st != EVD_PAYLOAD_BAD) {
        if (st == EVD_PAYLOAD_OK)
            evd_change_clear(&c);
        fail_msg("%s: status %d, want EVD_PAYLOAD_BAD", name, (int)st);
    }
    if (!err[0])
        fail_msg("%s: empty reason", name);
    if (strchr(err, '\n'))
        fail_msg("%s: reason spans lines: %s", name, err);
    if (why && !strstr(err, why))
        fail_msg("%s: reason \"%s\" lacks \"%s\"", name, err, why);
    assert_cleared(&c);
}

static void test_bad_cases(void **state)
{
    (void)state;
    for (size_t i = 0; i < EVD_ARRAY_LEN(bad_cases); i++) {
        const bad_case_t *b = &bad_cases[i];
        check_bad(b->name, b->json, b->len, b->why);
    }
}

static void test_huge_nesting(void **state)
{
    (void)state;
    size_t n = 100000;
    char *s = malloc(2 * n + 256);
    assert_non_null(s);
    memset(s, '[', n);
    check_bad("deep arrays", s, n, "not JSON");

    /* Deep nesting inside an image column: still refused, never a crash. */
    size_t len = (size_t)sprintf(s, "{" HEAD "\"op\":\"INSERT\",\"new\":{\"a\":");
    memset(s + len, '[', 5000);
    memset(s + len + 5000, ']', 5000);
    len += 10000;
    len += (size_t)sprintf(s + len, "}}");
    check_bad("deep image", s, len, "not JSON");
    free(s);
}

static void test_garbage(void **state)
{
    (void)state;
    size_t n = 100 * 1024;
    char *s = malloc(n);
    assert_non_null(s);
    uint32_t x = 12345;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        s[i] = (char)(x >> 16);
    }
    check_bad("100 kB random bytes", s, n, "not JSON");
    s[0] = '{';
    check_bad("100 kB random bytes after '{'", s, n, "not JSON");
    memset(s, 'a', n);
    check_bad("100 kB of letters", s, n, "not JSON");
    free(s);
}

/* Every proper prefix of a valid payload is bad input; mutations never crash or leak. */
static void test_prefixes_and_mutations(void **state)
{
    (void)state;
    static const char valid[] =
        "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\","
        "\"table\":\"shipments\",\"op\":\"UPDATE\",\"rows\":[{\"old\":{\"id\":7,\"p\":\"a\\\"b\"},"
        "\"new\":{\"id\":7,\"p\":null}},{\"old\":{\"id\":8}}]}";
    size_t n = strlen(valid);
    for (size_t len = 1; len < n; len++) {
        char name[32];
        snprintf(name, sizeof(name), "prefix %zu", len);
        check_bad(name, valid, len, NULL);
    }
    char *m = malloc(n);
    assert_non_null(m);
    static const char subst[] = {'\0', '"', '{', '}', '[', ']', ',', ':', '1', 'x', '\\', '\xff'};
    size_t ok = 0;
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < sizeof(subst); k++) {
            memcpy(m, valid, n);
            m[i] = subst[k];
            evd_change_t c;
            char err[256] = "";
            evd_payload_status_t st = evd_payload_parse(m, n, &c, err, sizeof(err));
            assert_true(st == EVD_PAYLOAD_OK || st == EVD_PAYLOAD_BAD);
            if (st == EVD_PAYLOAD_OK) {
                ok++;
                evd_change_clear(&c);
            } else {
                assert_true(err[0] != '\0');
                assert_cleared(&c);
            }
        }
    }
    assert_true(ok > 0); /* e.g. a digit of ts or a value replaced by another digit */
    free(m);
}

/* A caller parsing one change at a time reuses one arena block: no allocation per change. */
static void test_spare_block(void **state)
{
    (void)state;
    static const char upd[] = "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1.5,\"schema\":\"public\","
                              "\"table\":\"shipments\",\"op\":\"UPDATE\",\"old\":{\"id\":7,\"product_id\":3},"
                              "\"new\":{\"id\":7,\"product_id\":4}}";
    static const char ins[] = "{\"v\":1,\"id\":null,\"schema\":\"public\",\"table\":\"products\","
                              "\"op\":\"INSERT\",\"new\":{\"id\":9}}";
    evd_arena_block_t *spare = NULL;
    evd_change_t c;
    char err[128];
    assert_int_equal(evd_payload_parse_spare(upd, strlen(upd), &c, &spare, err, sizeof(err)), EVD_PAYLOAD_OK);
    evd_change_clear_spare(&c, &spare);
    assert_non_null(spare);
    assert_null(c.arena);
    evd_arena_block_t *first = spare;

    /* A shorter payload parses into the kept block, with correct values. */
    assert_int_equal(evd_payload_parse_spare(ins, strlen(ins), &c, &spare, err, sizeof(err)), EVD_PAYLOAD_OK);
    assert_ptr_equal(c.arena, first);
    assert_null(spare);
    assert_int_equal(c.op, EVD_OP_INSERT);
    assert_int_equal(int_of(c.rows[0].new_img, "id"), 9);
    evd_change_clear_spare(&c, &spare);
    assert_ptr_equal(spare, first);

    /* A longer one needs a block of its own; the larger block is kept afterwards. */
    size_t n = 3000;
    char *big = malloc(n + 200);
    assert_non_null(big);
    int len = snprintf(big, n + 200,
                       "{\"v\":1,\"id\":null,\"schema\":\"public\",\"table\":\"products\","
                       "\"op\":\"INSERT\",\"new\":{\"id\":5,\"name\":\"%0*d\"}}",
                       (int)n, 0);
    assert_int_equal(evd_payload_parse_spare(big, (size_t)len, &c, &spare, err, sizeof(err)), EVD_PAYLOAD_OK);
    assert_ptr_not_equal(c.arena, first);
    assert_ptr_equal(spare, first);
    assert_int_equal(col_of(c.rows[0].new_img, "name")->len, n);
    evd_change_clear_spare(&c, &spare);
    assert_non_null(spare);
    assert_ptr_not_equal(spare, first);
    evd_arena_block_t *second = spare;
    assert_int_equal(evd_payload_parse_spare(big, (size_t)len, &c, &spare, err, sizeof(err)), EVD_PAYLOAD_OK);
    assert_ptr_equal(c.arena, second);
    evd_change_clear_spare(&c, &spare);

    /* Bad input leaves the change cleared; the parse after it still works. */
    assert_int_equal(evd_payload_parse_spare("{\"v\":2}", 7, &c, &spare, err, sizeof(err)), EVD_PAYLOAD_BAD);
    assert_null(c.arena);
    evd_change_clear_spare(&c, &spare);
    assert_int_equal(evd_payload_parse_spare(upd, strlen(upd), &c, &spare, err, sizeof(err)), EVD_PAYLOAD_OK);
    assert_int_equal(int_of(c.rows[0].new_img, "product_id"), 4);
    evd_change_clear_spare(&c, &spare);
    evd_arena_spare_free(&spare);
    assert_null(spare);
    free(big);
}

/* Dead-letter lines are JSON strings of keys, errors and raw payloads: invalid UTF-8 (a payload
 * from a forged NOTIFY, an error text cut mid-character) becomes U+FFFD, so every line parses. */
static void test_json_str_invalid_utf8(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        const char *out;
    } cases[] = {
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""},
        {"unknown field \"a\xc3", "\"unknown field \\\"a\\ufffd\""},
        {"\xff\xfe", "\"\\ufffd\\ufffd\""},
        {"\xed\xa0\x80x", "\"\\ufffd\\ufffd\\ufffdx\""}, /* a UTF-16 surrogate */
        {"\xc0\xaf\n", "\"\\ufffd\\ufffd\\n\""},         /* overlong */
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(cases); i++) {
        evd_buf_t b = {0};
        assert_int_equal(evd_buf_json_str(&b, cases[i].in, strlen(cases[i].in)), 0);
        assert_string_equal(b.data, cases[i].out);
        json_error_t jerr;
        json_t *j = json_loads(b.data, JSON_DECODE_ANY, &jerr);
        if (!j)
            fail_msg("case %zu: not JSON: %s", i, jerr.text);
        json_decref(j);
        evd_buf_free(&b);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_insert),
        cmocka_unit_test(test_update),
        cmocka_unit_test(test_delete_notify_only),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_reals_as_strtod),
        cmocka_unit_test(test_doorbell),
        cmocka_unit_test(test_ref),
        cmocka_unit_test(test_chunk),
        cmocka_unit_test(test_chunk_limit),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_bad_cases),
        cmocka_unit_test(test_huge_nesting),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_prefixes_and_mutations),
        cmocka_unit_test(test_spare_block),
        cmocka_unit_test(test_json_str_invalid_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
