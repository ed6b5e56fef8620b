/* test_log.c - log line formatting, escaping, level filtering, redaction and rate limiting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"

/* ---- capturing fd 2 -------------------------------------------------------------------- */

#define CAP_MAX (1024 * 1024)
static char captured[CAP_MAX + 1];
static FILE *cap_file;
static int saved_stderr = -1;

/* Only log calls run between begin and end, so cmocka's own messages still reach stderr. */
static void capture_begin(void)
{
    fflush(stderr);
    cap_file = tmpfile();
    assert_non_null(cap_file);
    saved_stderr = dup(STDERR_FILENO);
    assert_true(saved_stderr >= 0);
    assert_true(dup2(fileno(cap_file), STDERR_FILENO) >= 0);
}

static const char *capture_end(void)
{
    evd_log_flush();
    assert_true(dup2(saved_stderr, STDERR_FILENO) >= 0);
    close(saved_stderr);
    saved_stderr = -1;
    rewind(cap_file);
    size_t n = fread(captured, 1, CAP_MAX, cap_file);
    captured[n] = '\0';
    fclose(cap_file);
    cap_file = NULL;
    return captured;
}

/* Checks "ts=2026-11-22T10:00:00.123Z" (or the JSON form's value) and returns what follows. */
static const char *skip_ts(const char *p)
{
    static const char pattern[] = "dddd-dd-ddTdd:dd:dd.dddZ";
    for (size_t i = 0; pattern[i]; i++) {
        if (pattern[i] == 'd')
            assert_true(isdigit((unsigned char)p[i]));
        else
            assert_int_equal(p[i], pattern[i]);
    }
    return p + sizeof(pattern) - 1;
}

/* One text line without its timestamp. */
static const char *text_body(const char *line)
{
    assert_memory_equal(line, "ts=", 3);
    return skip_ts(line + 3);
}

static const char *json_body(const char *line)
{
    assert_memory_equal(line, "{\"ts\":\"", 7);
    return skip_ts(line + 7);
}

static void assert_prefix(const char *s, const char *prefix)
{
    if (strncmp(s, prefix, strlen(prefix)) != 0)
        fail_msg("\"%.*s\" does not start with \"%s\"", (int)strlen(prefix), s, prefix);
}

static int setup_text(void **state)
{
    (void)state;
    evd_log_configure(EVD_LOG_TEXT, EVD_LOG_INFO);
    evd_log_set_clock(NULL);
    return 0;
}

static int setup_json(void **state)
{
    (void)state;
    evd_log_configure(EVD_LOG_JSON, EVD_LOG_INFO);
    return 0;
}

/* ---- text ------------------------------------------------------------------------------ */

static void test_text_basic(void **state)
{
    (void)state;
    capture_begin();
    EVD_LOG(EVD_LOG_INFO, "invalidated", F_STR("target", "default"), F_INT("keys", 3), F_DBL("lag_ms", 0.7));
    EVD_LOG(EVD_LOG_WARN, "shutdown");
    const char *out = capture_end();
    const char *nl = strchr(out, '\n');
    assert_non_null(nl);
    assert_prefix(text_body(out), " level=info msg=invalidated target=default keys=3 lag_ms=0.7\n");
    assert_string_equal(text_body(nl + 1), " level=warn msg=shutdown\n");
}

static void test_text_quoting(void **state)
{
    (void)state;
    capture_begin();
    evd_log_fields(EVD_LOG_ERROR, "redis retry",
                   (const evd_field_t[]){F_STR("plain", "abc"),
                                         F_STR("space", "connection refused"),
                                         F_STR("eq", "a=b"),
                                         F_STR("quote", "say \"hi\""),
                                         F_STR("empty", ""),
                                         F_STR("null", NULL),
                                         F_STR("nl", "a\nb\tc"),
                                         F_STR("bs", "a\\b"),
                                         F_STR("bsq", "a \\b"),
                                         F_STR("ctl", "a\x01z"),
                                         F_RAW("keys", "[\"a\",\"b\"]"),
                                         F_RAW("ids", "[1,2]"),
                                         {0}});
    const char *out = capture_end();
    assert_string_equal(text_body(out), " level=error msg=\"redis retry\" plain=abc space=\"connection refused\""
                                        " eq=\"a=b\" quote=\"say \\\"hi\\\"\" empty=\"\" null=\"\" nl=\"a\\nb\\tc\""
                                        " bs=a\\b bsq=\"a \\\\b\" ctl=\"a\\u0001z\" keys=\"[\\\"a\\\",\\\"b\\\"]\""
                                        " ids=[1,2]\n");
}

static void test_text_numbers(void **state)
{
    (void)state;
    capture_begin();
    EVD_LOG(EVD_LOG_INFO, "stats", F_DBL("a", 12.0), F_DBL("b", 0.0004), F_DBL("c", 3.14159), F_DBL("d", -2.5),
            F_DBL("e", 1e6), F_DBL("f", -0.0001), F_DBL("g", 0.1 + 0.2), F_INT("h", -42), F_INT("i", INT64_MAX),
            F_BOOL("j", true), F_BOOL("k", false));
    const char *out = capture_end();
    assert_string_equal(text_body(out), " level=info msg=stats a=12 b=0 c=3.142 d=-2.5 e=1000000 f=0 g=0.3 h=-42"
                                        " i=9223372036854775807 j=true k=false\n");
}

/* ---- JSON ------------------------------------------------------------------------------ */

static void test_json_fields(void **state)
{
    (void)state;
    capture_begin();
    EVD_LOG(EVD_LOG_INFO, "invalidated", F_STR("target", "default"), F_INT("keys", 3), F_DBL("lag_ms", 0.7),
            F_BOOL("dry", false), F_RAW("list", "[\"a\",\"b\"]"), F_STR("none", NULL), F_RAW("raw_none", NULL),
            F_DBL("nan", 0.0 / 0.0));
    const char *out = capture_end();
    assert_string_equal(json_body(out), "\",\"level\":\"info\",\"msg\":\"invalidated\",\"target\":\"default\","
                                        "\"keys\":3,\"lag_ms\":0.7,\"dry\":false,\"list\":[\"a\",\"b\"],"
                                        "\"none\":null,\"raw_none\":null,\"nan\":null}\n");
    json_error_t err;
    json_t *j = json_loads(out, JSON_DECODE_ANY, &err);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "msg")), "invalidated");
    json_decref(j);
}

static void test_json_escaping(void **state)
{
    (void)state;
    capture_begin();
    EVD_LOG(EVD_LOG_WARN, "bad_input", F_STR("s", "q\"b\\n\nt\tc\x01\x1f\x7f"),
            F_STR("utf8", "caf\xc3\xa9 \xe2\x82\xac"),
            F_STR("bad", "a\xff"
                         "b\xc3"),
            F_STR("sur", "\xed\xa0\x80"));
    const char *out = capture_end();
    assert_string_equal(json_body(out), "\",\"level\":\"warn\",\"msg\":\"bad_input\","
                                        "\"s\":\"q\\\"b\\\\n\\nt\\tc\\u0001\\u001f\\u007f\","
                                        "\"utf8\":\"caf\xc3\xa9 \xe2\x82\xac\",\"bad\":\"a\\ufffdb\\ufffd\","
                                        "\"sur\":\"\\ufffd\\ufffd\\ufffd\"}\n");
    json_error_t err;
    json_t *j = json_loads(out, 0, &err);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "s")), "q\"b\\n\nt\tc\x01\x1f\x7f");
    json_decref(j);
}

/* ---- filtering ------------------------------------------------------------------------- */

static int evaluated;

static int64_t count_eval(void)
{
    return ++evaluated;
}

static void test_level_filter(void **state)
{
    (void)state;
    evaluated = 0;
    capture_begin();
    EVD_LOG(EVD_LOG_DEBUG, "change", F_INT("n", count_eval()));
    evd_log_fields(EVD_LOG_DEBUG, "change", (const evd_field_t[]){{0}});
    assert_string_equal(capture_end(), "");
    assert_int_equal(evaluated, 0);

    evd_log_configure(EVD_LOG_TEXT, EVD_LOG_DEBUG);
    capture_begin();
    EVD_LOG(EVD_LOG_DEBUG, "change", F_INT("n", count_eval()));
    assert_string_equal(text_body(capture_end()), " level=debug msg=change n=1\n");
    assert_int_equal(evaluated, 1);

    evd_log_configure(EVD_LOG_TEXT, EVD_LOG_ERROR);
    capture_begin();
    EVD_LOG(EVD_LOG_WARN, "retry");
    evd_log_ratelimited("filtered", "bad_input", (const evd_field_t[]){{0}});
    EVD_LOG(EVD_LOG_ERROR, "fatal");
    assert_string_equal(text_body(capture_end()), " level=error msg=fatal\n");
}

static void test_parse(void **state)
{
    (void)state;
    evd_log_level_t l;
    evd_log_format_t f;
    assert_int_equal(evd_log_parse_level("warn", &l), 0);
    assert_int_equal(l, EVD_LOG_WARN);
    assert_int_equal(evd_log_parse_level("debug", &l), 0);
    assert_int_equal(l, EVD_LOG_DEBUG);
    assert_true(evd_log_parse_level("warning", &l) < 0);
    assert_true(evd_log_parse_level(NULL, &l) < 0);
    assert_int_equal(evd_log_parse_format("json", &f), 0);
    assert_int_equal(f, EVD_LOG_JSON);
    assert_int_equal(evd_log_parse_format("text", &f), 0);
    assert_int_equal(f, EVD_LOG_TEXT);
    assert_true(evd_log_parse_format("logfmt", &f) < 0);
}

/* ---- redaction ------------------------------------------------------------------------- */

static void check_redact(const char *in, const char *want)
{
    char out[256];
    evd_log_redact(in, out, sizeof(out));
    assert_string_equal(out, want);
}

static void test_redact(void **state)
{
    (void)state;
    check_redact("postgres://evictd:s3cret@db:5432/app", "postgres://evictd:***@db:5432/app");
    check_redact("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0");
    check_redact("postgresql://u:p@ss/w@h/db", "postgresql://u:***@h/db");
    check_redact("connect to redis://u:pw@h failed: x", "connect to redis://u:***@h failed: x");
    check_redact("host=db password=s3cret dbname=app", "host=db password=*** dbname=app");
    check_redact("password = 's3 \\' cret' host=x", "password = '***' host=x");
    check_redact("PGPASSWORD=s3cret", "PGPASSWORD=***");
    check_redact("postgres://h/db?password=s3cret", "postgres://h/db?password=***");
    /* Nothing to hide. */
    check_redact("http://host:8080/path", "http://host:8080/path");
    check_redact("postgres://evictd@db/app", "postgres://evictd@db/app");
    check_redact("user@example.com password:", "user@example.com password:");
    check_redact("password=", "password=");
    check_redact("", "");

    char small[12];
    evd_log_redact("redis://:pw@localhost", small, sizeof(small));
    assert_string_equal(small, "redis://:**");
    evd_log_redact(NULL, small, sizeof(small));
    assert_string_equal(small, "");
}

static void test_redact_in_lines(void **state)
{
    (void)state;
    capture_begin();
    EVD_LOG(EVD_LOG_INFO, "connected", F_STR("url", "postgres://evictd:s3cret@db/app"),
            F_STR("conninfo", "host=db password=s3cret"));
    const char *out = capture_end();
    assert_null(strstr(out, "s3cret"));
    assert_string_equal(text_body(out), " level=info msg=connected url=postgres://evictd:***@db/app"
                                        " conninfo=\"host=db password=***\"\n");

    evd_log_configure(EVD_LOG_JSON, EVD_LOG_INFO);
    capture_begin();
    EVD_LOG(EVD_LOG_ERROR, "disconnected", F_STR("error", "auth failed for redis://:s3cret@r"));
    out = capture_end();
    assert_null(strstr(out, "s3cret"));
    assert_string_equal(json_body(out), "\",\"level\":\"error\",\"msg\":\"disconnected\","
                                        "\"error\":\"auth failed for redis://:***@r\"}\n");
}

/* ---- rate limiting --------------------------------------------------------------------- */

static double fake_now;

static double fake_clock(void)
{
    return fake_now;
}

static void test_ratelimit(void **state)
{
    (void)state;
    evd_log_set_clock(fake_clock);
    const evd_field_t fields[] = {F_STR("reason", "bad_payload"), {0}};

    fake_now = 1000;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    evd_log_ratelimited("unknown_table", "bad_input", (const evd_field_t[]){{0}});
    const char *out = capture_end();
    const char *nl = strchr(out, '\n');
    assert_non_null(nl);
    assert_prefix(text_body(out), " level=warn msg=bad_input reason=bad_payload\n");
    assert_string_equal(text_body(nl + 1), " level=warn msg=bad_input\n");

    fake_now = 1999;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    assert_string_equal(capture_end(), "");

    fake_now = 2000;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    assert_string_equal(text_body(capture_end()), " level=warn msg=bad_input reason=bad_payload suppressed=2\n");

    fake_now = 3500;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    assert_string_equal(text_body(capture_end()), " level=warn msg=bad_input reason=bad_payload\n");

    /* JSON carries the count as a number. */
    evd_log_configure(EVD_LOG_JSON, EVD_LOG_INFO);
    fake_now = 3600;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    assert_string_equal(capture_end(), "");
    fake_now = 4600;
    capture_begin();
    evd_log_ratelimited("bad_payload", "bad_input", fields);
    assert_string_equal(json_body(capture_end()),
                        "\",\"level\":\"warn\",\"msg\":\"bad_input\",\"reason\":\"bad_payload\","
                        "\"suppressed\":1}\n");
    evd_log_set_clock(NULL);
}

/* With every slot taken, the least recently written reason is forgotten; its pending count is
 * written out first. */
static void test_ratelimit_eviction(void **state)
{
    (void)state;
    evd_log_set_clock(fake_clock);
    const evd_field_t none[] = {{0}};
    fake_now = 1e9;
    capture_begin();
    evd_log_ratelimited("r0", "bad_input", none);
    fake_now += 1;
    evd_log_ratelimited("r0", "bad_input", none);
    char reason[16];
    for (int i = 1; i <= 40; i++) {
        fake_now += 1;
        snprintf(reason, sizeof(reason), "r%d", i);
        evd_log_ratelimited(reason, "bad_input", none);
    }
    const char *out = capture_end();
    assert_non_null(strstr(out, " level=warn msg=log_suppressed reason=r0 suppressed=1\n"));
    assert_non_null(strstr(out, " msg=bad_input\n"));
    evd_log_set_clock(NULL);
}

/* ---- buffering ------------------------------------------------------------------------- */

static void test_long_and_many_lines(void **state)
{
    (void)state;
    size_t big = 200 * 1024;
    char *s = malloc(big + 1);
    assert_non_null(s);
    memset(s, 'x', big);
    s[big] = '\0';
    capture_begin();
    for (int i = 0; i < 3000; i++)
        EVD_LOG(EVD_LOG_INFO, "stats", F_INT("i", i), F_STR("pad", "0123456789012345678901234567890123456789"));
    EVD_LOG(EVD_LOG_INFO, "big", F_STR("s", s));
    EVD_LOG(EVD_LOG_INFO, "after");
    const char *out = capture_end();
    const char *p = out;
    char want[128];
    for (int i = 0; i < 3000; i++) {
        snprintf(want, sizeof(want), " level=info msg=stats i=%d pad=0123456789012345678901234567890123456789\n", i);
        const char *nl = strchr(p, '\n');
        assert_non_null(nl);
        assert_prefix(text_body(p), want);
        p = nl + 1;
    }
    const char *body = text_body(p);
    assert_prefix(body, " level=info msg=big s=");
    assert_int_equal(strspn(body + 22, "x"), big);
    p = body + 22 + big;
    assert_int_equal(*p, '\n');
    assert_string_equal(text_body(p + 1), " level=info msg=after\n");
    free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_text_basic, setup_text),
        cmocka_unit_test_setup(test_text_quoting, setup_text),
        cmocka_unit_test_setup(test_text_numbers, setup_text),
        cmocka_unit_test_setup(test_json_fields, setup_json),
        cmocka_unit_test_setup(test_json_escaping, setup_json),
        cmocka_unit_test_setup(test_level_filter, setup_text),
        cmocka_unit_test_setup(test_parse, setup_text),
        cmocka_unit_test_setup(test_redact, setup_text),
        cmocka_unit_test_setup(test_redact_in_lines, setup_text),
        cmocka_unit_test_setup(test_ratelimit, setup_text),
        cmocka_unit_test_setup(test_ratelimit_eviction, setup_text),
        cmocka_unit_test_setup(test_long_and_many_lines, setup_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
