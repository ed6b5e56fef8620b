/* test_config.c - config loading: fixture files for every error, defaults, redis URLs, sqlgen. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

#define FIXTURES EVD_SOURCE_DIR "/tests/unit/config"
#define MIB (1024LL * 1024)

/* ---- an injectable environment ------------------------------------------------------------ */

/* NULL-terminated name, value pairs. */
static const char *const *env_tab;
static const char *const default_env[] = {"DATABASE_URL", "postgres://evictd@127.0.0.1/app", "REDIS_PASSWORD",
                                          "from-env", NULL};
static char env_asked[1024];

static char *test_env(const char *name)
{
    size_t n = strlen(env_asked);
    snprintf(env_asked + n, sizeof(env_asked) - n, "%s%s", n ? "," : "", name);
    for (const char *const *p = env_tab; p && *p; p += 2)
        if (strcmp(p[0], name) == 0)
            return (char *)p[1];
    return NULL;
}

static int setup_env(void **state)
{
    (void)state;
    env_tab = default_env;
    env_asked[0] = '\0';
    return 0;
}

static evd_config_t *load_ok(const char *path)
{
    char err[1024] = "";
    evd_config_t *cfg = evd_config_load(path, test_env, err, sizeof(err));
    if (!cfg)
        fail_msg("%s rejected: %s", path, err);
    assert_string_equal(cfg->path, path);
    return cfg;
}

static evd_config_t *parse_ok(const char *text)
{
    char err[1024] = "";
    evd_config_t *cfg = evd_config_parse("inline.json", text, test_env, err, sizeof(err));
    if (!cfg)
        fail_msg("rejected: %s\n%s", err, text);
    return cfg;
}

static void parse_bad(const char *text, const char *why)
{
    char err[1024] = "";
    evd_config_t *cfg = evd_config_parse("inline.json", text, test_env, err, sizeof(err));
    if (cfg) {
        evd_config_free(cfg);
        fail_msg("accepted: %s", text);
    }
    if (!strstr(err, why))
        fail_msg("\"%s\" lacks \"%s\"", err, why);
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    evd_buf_t b = {0};
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        assert_int_equal(evd_buf_append(&b, chunk, n), 0);
    fclose(f);
    if (!b.data)
        assert_int_equal(evd_buf_puts(&b, ""), 0);
    return b.data;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorted entries of dir (without dot files) whose name ends in suffix ("" for all). */
static void list_dir(const char *dir, const char *suffix, evd_strv_t *out)
{
    DIR *d = opendir(dir);
    if (!d)
        fail_msg("cannot open %s: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name), sn = strlen(suffix);
        if (e->d_name[0] == '.' || n < sn || strcmp(e->d_name + n - sn, suffix) != 0)
            continue;
        assert_int_equal(evd_strv_push(out, e->d_name, n), 0);
    }
    closedir(d);
    qsort(out->v, out->n, sizeof(char *), cmp_str);
}

/* ---- fixtures ------------------------------------------------------------------------------ */

/* Each invalid/<case>/ holds input.json and error: every line of error must occur in the
 * message; a line starting with '!' must not (secrets). The message starts with the file name. */
static void test_invalid_fixtures(void **state)
{
    (void)state;
    evd_strv_t cases = {0};
    list_dir(FIXTURES "/invalid", "", &cases);
    assert_true(cases.n >= 60);
    evd_buf_t failures = {0};
    size_t nfail = 0;
    for (size_t i = 0; i < cases.n; i++) {
        char input[1024], errpath[1024];
        snprintf(input, sizeof(input), "%s/invalid/%s/input.json", FIXTURES, cases.v[i]);
        snprintf(errpath, sizeof(errpath), "%s/invalid/%s/error", FIXTURES, cases.v[i]);
        char *want = read_file(errpath);
        if (!want)
            fail_msg("%s: no error file", cases.v[i]);
        env_asked[0] = '\0';
        char err[1024] = "";
        evd_config_t *cfg = evd_config_load(input, test_env, err, sizeof(err));
        const char *why = NULL;
        char line[512];
        if (cfg) {
            why = "accepted";
            evd_config_free(cfg);
        } else if (strncmp(err, input, strlen(input)) != 0) {
            why = "message does not start with the file name";
        } else if (strchr(err, '\n')) {
            why = "message spans lines";
        }
        for (char *p = want, *nl; !why && *p; p = nl ? nl + 1 : p + strlen(p)) {
            nl = strchr(p, '\n');
            size_t n = nl ? (size_t)(nl - p) : strlen(p);
            if (n == 0)
                continue;
            snprintf(line, sizeof(line), "%.*s", (int)n, p);
            if (line[0] == '!' ? strstr(err, line + 1) != NULL : strstr(err, line) == NULL) {
                why = line[0] == '!' ? "message holds a forbidden string:" : "message lacks:";
                break;
            }
        }
        if (why) {
            nfail++;
            assert_int_equal(evd_buf_printf(&failures, "  %s: %s%s%s\n    got: %s\n", cases.v[i], why,
                                            strchr(why, ':') ? " " : "", strchr(why, ':') ? line : "", err),
                             0);
        }
        free(want);
    }
    if (nfail)
        print_message("%zu of %zu invalid configs failed:\n%s", nfail, cases.n, failures.data);
    evd_buf_free(&failures);
    evd_strv_free(&cases);
    assert_int_equal(nfail, 0);
}

static void test_valid_fixtures(void **state)
{
    (void)state;
    evd_strv_t files = {0};
    list_dir(FIXTURES "/valid", ".json", &files);
    assert_true(files.n >= 6);
    for (size_t i = 0; i < files.n; i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/valid/%s", FIXTURES, files.v[i]);
        evd_config_free(load_ok(path));
    }
    evd_strv_free(&files);
}

static void test_samples(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(EVD_SOURCE_DIR "/config/routex.json");
    assert_string_equal(cfg->pg_url, "postgres://evictd@127.0.0.1/app");
    assert_int_equal(cfg->nchannels, 1);
    assert_string_equal(cfg->channels[0], "evictd");
    assert_int_equal(cfg->ntargets, 1);
    assert_string_equal(cfg->targets[0].name, "default");
    assert_string_equal(cfg->targets[0].url, "redis://127.0.0.1:6379/1");
    assert_string_equal(cfg->targets[0].host, "127.0.0.1");
    assert_int_equal(cfg->targets[0].port, 6379);
    assert_int_equal(cfg->targets[0].db, 1);
    assert_string_equal(cfg->targets[0].password, "from-env");
    assert_null(cfg->targets[0].username);
    assert_string_equal(cfg->dl_path, "/var/lib/evictd/dead-letter.jsonl");
    assert_int_equal(cfg->rules.n, 3);
    assert_string_equal(cfg->rules.v[1].schema, "public");
    assert_string_equal(cfg->rules.v[1].table, "shipments");
    assert_int_equal(cfg->rules.v[1].ops, EVD_OP_ALL);
    assert_int_equal(cfg->rules.v[1].nlookups, 1);
    assert_string_equal(cfg->rules.v[1].lookups[0].as, "driver_user_id");
    assert_int_equal(cfg->rules.v[1].lookups[0].nargs, 1);
    assert_string_equal(cfg->rules.v[1].lookups[0].args[0], "driver_id");
    assert_int_equal(cfg->rules.v[1].nkeys, 4);
    assert_int_equal(cfg->rules.v[1].npatterns, 2);
    assert_int_equal(cfg->rules.v[1].durable, -1);
    assert_int_equal(cfg->rules.max_keys, 512);
    evd_config_free(cfg);
    /* Every variable the file names was asked for, DATABASE_URL included. */
    assert_non_null(strstr(env_asked, "DATABASE_URL"));
    assert_non_null(strstr(env_asked, "REDIS_URL"));

    cfg = load_ok(EVD_SOURCE_DIR "/config/shop.json");
    assert_int_equal(cfg->ntargets, 2);
    assert_int_equal(cfg->rules.n, 4);
    assert_int_equal(cfg->rules.v[0].nlookups, 1);
    assert_int_equal(cfg->rules.v[0].ntargets, 1);
    assert_string_equal(cfg->targets[cfg->rules.v[0].targets[0]].name, "products");
    assert_string_equal(cfg->targets[cfg->rules.v[1].targets[0]].name, "default");
    evd_config_free(cfg);

    /* Without DATABASE_URL the samples are refused, naming the variable. */
    static const char *const no_db[] = {NULL};
    env_tab = no_db;
    char err[1024] = "";
    assert_null(evd_config_load(EVD_SOURCE_DIR "/config/routex.json", test_env, err, sizeof(err)));
    assert_non_null(strstr(err, "postgres.url: environment variable DATABASE_URL is not set"));
}

static void test_defaults(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(FIXTURES "/valid/minimal.json");
    assert_int_equal(cfg->nchannels, 1);
    assert_string_equal(cfg->channels[0], "evictd");
    assert_int_equal(cfg->poll_interval_ms, 250);
    assert_int_equal(cfg->batch_max_keys, 512);
    assert_int_equal(cfg->batch_max_delay_ms, 1);
    assert_int_equal(cfg->batch_max_pending, 10000);
    assert_int_equal(cfg->redelete_after_ms, 0);
    assert_int_equal(cfg->retry_max_attempts, 10);
    assert_int_equal(cfg->retry_initial_backoff_ms, 50);
    assert_int_equal(cfg->retry_max_backoff_ms, 5000);
    assert_string_equal(cfg->dl_path, "/var/lib/evictd/dead-letter.jsonl");
    assert_int_equal(cfg->dl_max_bytes, 1024 * MIB);
    assert_string_equal(cfg->log_format, "text");
    assert_string_equal(cfg->log_level, "info");
    assert_int_equal(cfg->stats_interval_s, 60);
    assert_null(cfg->http_listen);
    assert_int_equal(cfg->shutdown_timeout_ms, 5000);
    assert_int_equal(cfg->ntargets, 1);
    const evd_target_cfg_t *t = &cfg->targets[0];
    assert_int_equal(t->timeout_ms, 2000);
    assert_string_equal(t->host, "127.0.0.1");
    assert_int_equal(t->port, 6379);
    assert_int_equal(t->db, 0);
    assert_null(t->unix_path);
    assert_null(t->username);
    assert_null(t->password);
    const evd_rule_t *r = &cfg->rules.v[0];
    assert_string_equal(r->schema, "public");
    assert_string_equal(r->table, "products");
    assert_int_equal(r->ops, EVD_OP_ALL);
    assert_int_equal(r->ntargets, 1);
    assert_int_equal(r->targets[0], 0);
    assert_int_equal(r->durable, -1);
    assert_int_equal(cfg->rules.max_keys, 512);
    evd_config_free(cfg);
}

/* The settings table (which also feeds the README) matches SPEC's table. */
static void test_settings_table(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        int64_t def, min, max;
        const char *def_str;
    } spec[] = {
        {"postgres.poll_interval_ms", 250, 10, 60000, NULL},
        {"batch.max_keys", 512, 1, 100000, NULL},
        {"batch.max_delay_ms", 1, 0, 1000, NULL},
        {"batch.max_pending", 10000, 1, 10000000, NULL},
        {"batch.redelete_after_ms", 0, 0, 60000, NULL},
        {"retry.max_attempts", 10, 1, 1000000, NULL},
        {"retry.initial_backoff_ms", 50, 1, 3600000, NULL},
        {"retry.max_backoff_ms", 5000, 1, 3600000, NULL},
        {"dead_letter.max_bytes", 1024 * MIB, MIB, 1024 * 1024 * MIB, NULL},
        {"log.stats_interval_s", 60, 0, 86400, NULL},
        {"shutdown_timeout_ms", 5000, 0, 600000, NULL},
        {"dead_letter.path", 0, 0, 0, "/var/lib/evictd/dead-letter.jsonl"},
        {"log.format", 0, 0, 0, "text"},
        {"log.level", 0, 0, 0, "info"},
        {"postgres.url", 0, 0, 0, NULL},
        {"http.listen", 0, 0, 0, NULL},
    };
    assert_int_equal(evd_nsettings, EVD_ARRAY_LEN(spec));
    for (size_t i = 0; i < EVD_ARRAY_LEN(spec); i++) {
        const evd_setting_t *s = NULL;
        for (size_t k = 0; k < evd_nsettings; k++)
            if (strcmp(evd_settings[k].name, spec[i].name) == 0)
                s = &evd_settings[k];
        if (!s)
            fail_msg("setting %s missing", spec[i].name);
        assert_non_null(s->doc);
        if (s->type == EVD_SET_INT) {
            assert_int_equal(s->def, spec[i].def);
            assert_int_equal(s->min, spec[i].min);
            assert_int_equal(s->max, spec[i].max);
        } else if (spec[i].def_str) {
            assert_string_equal(s->def_str, spec[i].def_str);
        } else {
            assert_null(s->def_str);
        }
    }
}

static void test_full(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(FIXTURES "/valid/full.json");
    assert_string_equal(cfg->pg_url, "host=db dbname=app");
    assert_int_equal(cfg->nchannels, 2);
    assert_string_equal(cfg->channels[1], "evictd_b");
    assert_int_equal(cfg->poll_interval_ms, 1000);
    assert_int_equal(cfg->batch_max_keys, 1000);
    assert_int_equal(cfg->rules.max_keys, 1000);
    assert_int_equal(cfg->batch_max_delay_ms, 5);
    assert_int_equal(cfg->batch_max_pending, 20000);
    assert_int_equal(cfg->redelete_after_ms, 1500);
    assert_int_equal(cfg->retry_max_attempts, 20);
    assert_int_equal(cfg->retry_initial_backoff_ms, 100);
    assert_int_equal(cfg->retry_max_backoff_ms, 10000);
    assert_string_equal(cfg->dl_path, "/tmp/evictd/dl.jsonl");
    assert_int_equal(cfg->dl_max_bytes, 2 * MIB);
    assert_string_equal(cfg->log_format, "json");
    assert_string_equal(cfg->log_level, "debug");
    assert_int_equal(cfg->stats_interval_s, 0);
    assert_string_equal(cfg->http_listen, "127.0.0.1:9187");
    assert_int_equal(cfg->shutdown_timeout_ms, 0);

    assert_int_equal(cfg->ntargets, 2);
    const evd_target_cfg_t *d = &cfg->targets[0], *p = &cfg->targets[1];
    assert_string_equal(d->name, "default");
    assert_string_equal(d->host, "cache.internal");
    assert_int_equal(d->port, 6380);
    assert_int_equal(d->db, 3);
    assert_string_equal(d->username, "cache");
    assert_string_equal(d->password, "hunter2");
    assert_int_equal(d->timeout_ms, 500);
    assert_string_equal(p->name, "products");
    assert_null(p->host);
    assert_string_equal(p->unix_path, "/run/redis/redis.sock");
    assert_int_equal(p->db, 5);
    assert_string_equal(p->username, "svc");
    assert_string_equal(p->password, "from-env");
    assert_int_equal(p->timeout_ms, 2000);

    assert_int_equal(cfg->rules.n, 2);
    const evd_rule_t *r0 = &cfg->rules.v[0], *r1 = &cfg->rules.v[1];
    assert_int_equal(r0->ops, EVD_OP_INSERT | EVD_OP_UPDATE);
    assert_int_equal(r0->ntargets, 2);
    assert_int_equal(r0->durable, 1);
    assert_int_equal(r0->nkeys, 2);
    assert_int_equal(r0->npatterns, 1);
    assert_true(r0->patterns[0].is_pattern);
    assert_false(r0->keys[0].is_pattern);
    assert_string_equal(r1->schema, "sales");
    assert_string_equal(r1->table, "orders");
    assert_int_equal(r1->ops, EVD_OP_DELETE | EVD_OP_TRUNCATE);
    assert_int_equal(r1->ntargets, 1);
    assert_int_equal(r1->targets[0], 0);
    assert_int_equal(r1->durable, 0);
    assert_string_equal(r1->lookups[0].sql, "SELECT user_id FROM accounts WHERE id = $1 AND '$9' <> ''");
    assert_true(r1->keys[0].has_old);
    assert_false(r1->keys[0].has_any);
    evd_config_free(cfg);
}

static void test_bounds(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(FIXTURES "/valid/bounds_min.json");
    assert_int_equal(cfg->poll_interval_ms, 10);
    assert_int_equal(cfg->batch_max_keys, 1);
    assert_int_equal(cfg->batch_max_delay_ms, 0);
    assert_int_equal(cfg->batch_max_pending, 1);
    assert_int_equal(cfg->retry_max_attempts, 1);
    assert_int_equal(cfg->retry_initial_backoff_ms, 1);
    assert_int_equal(cfg->retry_max_backoff_ms, 1);
    assert_int_equal(cfg->dl_max_bytes, MIB);
    assert_int_equal(cfg->targets[0].timeout_ms, 1);
    assert_int_equal(cfg->targets[0].port, 1);
    evd_config_free(cfg);

    cfg = load_ok(FIXTURES "/valid/bounds_max.json");
    assert_int_equal(cfg->nchannels, 16);
    assert_int_equal(strlen(cfg->channels[15]), 63);
    assert_int_equal(cfg->poll_interval_ms, 60000);
    assert_int_equal(cfg->batch_max_keys, 100000);
    assert_int_equal(cfg->batch_max_delay_ms, 1000);
    assert_int_equal(cfg->batch_max_pending, 10000000);
    assert_int_equal(cfg->redelete_after_ms, 60000);
    assert_int_equal(cfg->retry_max_attempts, 1000000);
    assert_int_equal(cfg->retry_max_backoff_ms, 3600000);
    assert_int_equal(cfg->dl_max_bytes, 1024 * 1024 * MIB);
    assert_int_equal(cfg->stats_interval_s, 86400);
    assert_int_equal(cfg->shutdown_timeout_ms, 600000);
    assert_int_equal(cfg->targets[0].timeout_ms, 600000);
    assert_int_equal(cfg->targets[0].port, 65535);
    assert_int_equal(cfg->targets[0].db, 1000000);
    evd_config_free(cfg);
}

/* ---- environment ---------------------------------------------------------------------------- */

static void test_env_expansion(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(FIXTURES "/valid/env.json");
    assert_string_equal(cfg->pg_url, "postgres://evictd@127.0.0.1/app");
    assert_string_equal(cfg->targets[0].url, "redis://127.0.0.1:6379/1");
    assert_int_equal(cfg->targets[0].db, 1);
    assert_string_equal(cfg->targets[0].password, "from-env");
    assert_string_equal(cfg->dl_path, "/var/tmp/evictd/${literal}/dl-x.jsonl");
    /* Only "$${" is special: "$$5" and "$b" stay. */
    assert_string_equal(cfg->rules.v[0].keys[0].src, "cost$$5:{id}");
    assert_string_equal(cfg->rules.v[0].keys[1].src, "a$b");
    evd_config_free(cfg);
    static const char *const asked[] = {"DATABASE_URL", "REDIS_URL", "REDIS_PASSWORD", "EVD_TEST_DIR",
                                        "EVD_TEST_SUFFIX"};
    size_t commas = 0;
    for (const char *p = env_asked; *p; p++)
        commas += *p == ',';
    assert_int_equal(commas, EVD_ARRAY_LEN(asked) - 1);
    for (size_t i = 0; i < EVD_ARRAY_LEN(asked); i++)
        assert_non_null(strstr(env_asked, asked[i]));

    /* Set values win over defaults; an empty value counts as unset where a default is given
     * (as in the shell), and an empty password means none. */
    static const char *const set[] = {
        "DATABASE_URL",    "db", "REDIS_URL", "", "REDIS_PASSWORD", "", "EVD_TEST_DIR", "/srv",
        "EVD_TEST_SUFFIX", "7",  NULL};
    env_tab = set;
    cfg = load_ok(FIXTURES "/valid/env.json");
    assert_string_equal(cfg->pg_url, "db");
    assert_string_equal(cfg->targets[0].url, "redis://127.0.0.1:6379/1");
    assert_null(cfg->targets[0].password);
    assert_string_equal(cfg->dl_path, "/srv/${literal}/dl-7.jsonl");
    evd_config_free(cfg);

    env_tab = default_env;
    cfg = parse_ok("{\"postgres\": {\"url\": \"${DATABASE_URL}${EVD_NOPE:-?a=b:-c}$${x}$\"},"
                   " \"redis\": {\"default\": {\"url\": \"${EVD_NOPE:-redis://h:7/2}\"}},"
                   " \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}");
    assert_string_equal(cfg->pg_url, "postgres://evictd@127.0.0.1/app?a=b:-c${x}$");
    assert_int_equal(cfg->targets[0].port, 7);
    assert_int_equal(cfg->targets[0].db, 2);
    evd_config_free(cfg);

    parse_bad("{\"postgres\": {\"url\": \"${UNSET}\"}, \"redis\": {\"default\": {\"url\": "
              "\"redis://h\"}}, \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}",
              "inline.json:1:22: postgres.url: environment variable UNSET is not set");
    /* A default may itself hold ${...}, to any depth, and "$${" inside it stays literal. */
    cfg = parse_ok("{\"postgres\": {\"url\": \"${EVD_NOPE:-${EVD_NOPE2:-x${DATABASE_URL}}y}z\"},"
                   " \"redis\": {\"default\": {\"url\": \"redis://h\"}},"
                   " \"dead_letter\": {\"path\": \"/d/${EVD_NOPE:-$${lit}/${EVD_NOPE:-}}/f\"},"
                   " \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}");
    assert_string_equal(cfg->pg_url, "xpostgres://evictd@127.0.0.1/appyz");
    assert_string_equal(cfg->dl_path, "/d/${lit}//f");
    evd_config_free(cfg);
    parse_bad("{\"postgres\": {\"url\": \"${EVD_NOPE:-${UNSET}}\"}, \"redis\": {\"default\": {\"url\": "
              "\"redis://h\"}}, \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}",
              "postgres.url: environment variable UNSET is not set");
    parse_bad("{\"postgres\": {\"url\": \"${EVD_NOPE:-${UNSET}\"}, \"redis\": {\"default\": {\"url\": "
              "\"redis://h\"}}, \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}",
              "postgres.url: unterminated '${'");
    /* An error inside a default shows the whole value, redacted: never the password in it. */
    char err[1024] = "";
    evd_config_t *bad = evd_config_parse("inline.json",
                                         "{\"postgres\": {\"url\": \"x\"}, \"redis\": {\"default\": {\"url\": "
                                         "\"redis://:${EVD_NOPE:-hunter2${}}@h\"}}, \"rules\": [{\"table\": \"t\","
                                         " \"keys\": [\"k\"]}]}",
                                         test_env, err, sizeof(err));
    assert_null(bad);
    assert_non_null(strstr(err, "bad variable name"));
    assert_null(strstr(err, "hunter2"));
    char deep[400] = "{\"postgres\": {\"url\": \"";
    for (int i = 0; i < 20; i++)
        strcat(deep, "${EVD_NOPE:-");
    strcat(deep, "x");
    for (int i = 0; i < 20; i++)
        strcat(deep, "}");
    strcat(deep, "\"}, \"redis\": {\"default\": {\"url\": \"redis://h\"}}, \"rules\": [{\"table\": \"t\", "
                 "\"keys\": [\"k\"]}]}");
    parse_bad(deep, "nested more than 16 deep");
    /* A variable with an empty value and no default is used as it is. */
    static const char *const empty[] = {"DATABASE_URL", "", NULL};
    env_tab = empty;
    cfg = parse_ok("{\"postgres\": {\"url\": \"${DATABASE_URL}\"}, \"redis\": {\"default\": "
                   "{\"url\": \"redis://h\"}}, \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}");
    assert_string_equal(cfg->pg_url, "");
    evd_config_free(cfg);
}

/* ---- redis URLs ------------------------------------------------------------------------------ */

static void target_clear(evd_target_cfg_t *t)
{
    free(t->username);
    free(t->password);
    free(t->host);
    free(t->unix_path);
    memset(t, 0, sizeof(*t));
}

static void test_redis_url(void **state)
{
    (void)state;
    static const struct {
        const char *url;
        const char *user, *pass, *host, *unix_path;
        int port, db;
    } ok[] = {
        {"redis://user:password@host:6380/2", "user", "password", "host", NULL, 6380, 2},
        {"redis://cache@127.0.0.1:6379/2", "cache", NULL, "127.0.0.1", NULL, 6379, 2},
        {"redis://:secret@h", NULL, "secret", "h", NULL, 6379, 0},
        {"redis://h", NULL, NULL, "h", NULL, 6379, 0},
        {"redis://h:6379/", NULL, NULL, "h", NULL, 6379, 0},
        {"redis://[::1]:6390/4", NULL, NULL, "::1", NULL, 6390, 4},
        {"redis://[::1]", NULL, NULL, "::1", NULL, 6379, 0},
        {"redis://us%40er:p%3Ass%2F%25@h/1", "us@er", "p:ss/%", "h", NULL, 6379, 1},
        {"redis://u:p@ss@h:1/0", "u", "p@ss", "h", NULL, 1, 0},
        {"unix:///var/run/redis.sock?db=3", NULL, NULL, NULL, "/var/run/redis.sock", 0, 3},
        {"unix:///tmp/r.sock", NULL, NULL, NULL, "/tmp/r.sock", 0, 0},
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(ok); i++) {
        evd_target_cfg_t t = {0};
        char err[256] = "";
        if (evd_redis_url_parse(&t, ok[i].url, err, sizeof(err)) != 0)
            fail_msg("%s: %s", ok[i].url, err);
        if (ok[i].user)
            assert_string_equal(t.username, ok[i].user);
        else
            assert_null(t.username);
        if (ok[i].pass)
            assert_string_equal(t.password, ok[i].pass);
        else
            assert_null(t.password);
        if (ok[i].host) {
            assert_string_equal(t.host, ok[i].host);
            assert_int_equal(t.port, ok[i].port);
        } else {
            assert_null(t.host);
        }
        if (ok[i].unix_path)
            assert_string_equal(t.unix_path, ok[i].unix_path);
        else
            assert_null(t.unix_path);
        assert_int_equal(t.db, ok[i].db);
        target_clear(&t);
    }

    static const struct {
        const char *url, *why;
    } bad[] = {
        {"http://h", "expected redis://"},
        {"rediss://h", "expected redis://"},
        {"redis://", "missing host"},
        {"redis://:6379", "missing host"},
        {"redis://u:p@", "missing host"},
        {"redis://h:0", "bad port"},
        {"redis://h:65536", "bad port"},
        {"redis://h:", "bad port"},
        {"redis://h:12x/0", "bad port"},
        {"redis://h/x", "bad db number"},
        {"redis://h/-1", "bad db number"},
        {"redis://h/1/2", "bad db number"},
        {"redis://[::1", "unbalanced '['"},
        {"redis://[::1]x:6379", "after ']'"},
        {"unix://relative.sock", "absolute path"},
        {"unix:///p?database=1", "only ?db=N"},
        {"unix:///p?db=", "only ?db=N"},
        {"unix:///p?db=x", "bad db number"},
        {"redis://u:pa%00ss@h", "%00"},
        {"redis://u%00x:p@h", "%00"},
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(bad); i++) {
        evd_target_cfg_t t = {0};
        char err[256] = "";
        int rc = evd_redis_url_parse(&t, bad[i].url, err, sizeof(err));
        target_clear(&t);
        if (rc != -EINVAL)
            fail_msg("%s: rc %d", bad[i].url, rc);
        if (!strstr(err, bad[i].why))
            fail_msg("%s: \"%s\" lacks \"%s\"", bad[i].url, err, bad[i].why);
    }

    /* Fields already set (from username/password settings) win over the URL's. */
    evd_target_cfg_t t = {0};
    char err[256];
    t.username = strdup("admin");
    t.password = strdup("override");
    assert_int_equal(evd_redis_url_parse(&t, "redis://u:p@h:1/2", err, sizeof(err)), 0);
    assert_string_equal(t.username, "admin");
    assert_string_equal(t.password, "override");
    target_clear(&t);
}

static void test_redis_credentials(void **state)
{
    (void)state;
    static const char *const env[] = {"DATABASE_URL", "x", "PW", "s3cret", NULL};
    env_tab = env;
    evd_config_t *cfg = parse_ok("{\"postgres\": {\"url\": \"${DATABASE_URL}\"}, \"redis\": {"
                                 "\"default\": {\"url\": \"redis://u:p@h/1\", \"username\": \"admin\", "
                                 "\"password\": \"${PW}\"},"
                                 "\"b\": {\"url\": \"redis://u:p@h/2\", \"password\": \"${PW_UNSET:-}\"},"
                                 "\"c\": {\"url\": \"redis://h/3\", \"username\": \"\", \"password\": \"only\"}},"
                                 " \"rules\": [{\"table\": \"t\", \"keys\": [\"k\"]}]}");
    assert_int_equal(cfg->ntargets, 3);
    assert_string_equal(cfg->targets[0].username, "admin");
    assert_string_equal(cfg->targets[0].password, "s3cret");
    /* An empty password setting means "none": the URL's applies. */
    assert_string_equal(cfg->targets[1].username, "u");
    assert_string_equal(cfg->targets[1].password, "p");
    assert_null(cfg->targets[2].username);
    assert_string_equal(cfg->targets[2].password, "only");
    assert_int_equal(cfg->targets[2].db, 3);
    evd_config_free(cfg);
}

/* ---- sqlgen ---------------------------------------------------------------------------------- */

static char *sqlgen_of(const evd_config_t *cfg)
{
    evd_buf_t out = {0};
    assert_int_equal(evd_sqlgen(cfg, &out), 0);
    return out.data;
}

/* The lines of sql starting with "SELECT", joined by newlines. */
static void select_lines(const char *sql, evd_buf_t *out)
{
    for (const char *p = sql; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) + 1 : strlen(p);
        if (strncmp(p, "SELECT", 6) == 0)
            assert_int_equal(evd_buf_append(out, p, n), 0);
        p += n;
    }
}

static void test_sqlgen_routex(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(EVD_SOURCE_DIR "/config/routex.json");
    char *sql = sqlgen_of(cfg);
    evd_buf_t sel = {0};
    select_lines(sql, &sel);
    assert_string_equal(sel.data,
                        "SELECT evictd.watch('\"public\".\"products\"', ARRAY['id']::text[], 'evictd', true);\n"
                        "SELECT evictd.watch('\"public\".\"shipments\"', ARRAY['driver_id', 'product_id']::text[], "
                        "'evictd', true);\n"
                        "SELECT evictd.watch('\"public\".\"drivers\"', ARRAY['user_id']::text[], 'evictd', "
                        "true);\n");
    assert_non_null(strstr(sql, "\nBEGIN;\n"));
    assert_int_equal(strcmp(sql + strlen(sql) - 8, "COMMIT;\n"), 0);
    assert_null(strstr(sql, "evictd.unwatch("));
    /* Deterministic: the same output again, and from a fresh load. */
    char *again = sqlgen_of(cfg);
    assert_string_equal(sql, again);
    evd_config_t *cfg2 = load_ok(EVD_SOURCE_DIR "/config/routex.json");
    char *fresh = sqlgen_of(cfg2);
    assert_string_equal(sql, fresh);
    free(fresh);
    free(again);
    evd_buf_free(&sel);
    free(sql);
    evd_config_free(cfg2);
    evd_config_free(cfg);
}

/* A lookup's $n are counted where PostgreSQL reads them as parameters only. */
static void test_lookup_param_count(void **state)
{
    (void)state;
    static const struct {
        const char *sql;
        int nargs; /* what "args" must name */
    } cases[] = {
        {"SELECT a FROM t WHERE b = $1", 1},
        {"SELECT a FROM t WHERE b = $1 -- or $2\\n AND c = $2", 2},
        {"SELECT a FROM t WHERE b = $1 -- only $2", 1},
        {"SELECT a /* $3 /* nested $4 */ $5 */ FROM t WHERE b = $1", 1},
        {"SELECT $$ $2 $$, $x$ $3 $$ $x$ FROM t WHERE b = $1", 1},
        {"SELECT a$2 FROM t WHERE b = $1", 1},
        {"SELECT E'it\\\\'s $2', 'x''$3' FROM t WHERE b = $1", 1},
        {"SELECT \\\"c$2\\\" FROM t WHERE b=$1 AND c=$2", 2},
        {"SELECT E'a''\\\\'' WHERE b = $1", 1},
        {"SELECT E'it''s \\\\' $2' WHERE b = $1", 1},
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(cases); i++) {
        for (int n = 1; n <= 2; n++) {
            char text[1024];
            snprintf(text, sizeof(text),
                     "{\"postgres\": {\"url\": \"x\"}, \"redis\": {\"default\": {\"url\": \"redis://h\"}},"
                     " \"rules\": [{\"table\": \"d\", \"lookups\": [{\"as\": \"w\", \"sql\": \"%s\","
                     " \"args\": [%s]}], \"keys\": [\"d_{w}\"]}]}",
                     cases[i].sql, n == 1 ? "\"a\"" : "\"a\", \"b\"");
            char err[1024] = "";
            evd_config_t *cfg = evd_config_parse("inline.json", text, test_env, err, sizeof(err));
            if ((cfg != NULL) != (n == cases[i].nargs))
                fail_msg("%s with %d args: %s", cases[i].sql, n, cfg ? "accepted" : err);
            evd_config_free(cfg);
        }
    }
}

static void test_sqlgen_durable(void **state)
{
    (void)state;
    evd_config_t *cfg =
        parse_ok("{\"postgres\": {\"url\": \"x\", \"channels\": [\"inval\", \"second\"]},"
                 " \"redis\": {\"default\": {\"url\": \"redis://h\"}},"
                 " \"rules\": ["
                 "{\"table\": \"a\", \"keys\": [\"a_{x}\"], \"durable\": false},"
                 "{\"table\": \"b\", \"keys\": [\"b_{new.y}\"], \"durable\": false},"
                 "{\"table\": \"public.a\", \"keys\": [\"a2_{old.z}_{x}\"], \"durable\": false},"
                 "{\"table\": \"b\", \"keys\": [\"b2\"]},"
                 "{\"table\": \"App$.C_1\", \"keys\": [\"c\"], \"durable\": true},"
                 "{\"table\": \"d\", \"lookups\": [{\"as\": \"w\", \"sql\": \"SELECT w FROM x WHERE p = $1 "
                 "AND q = $2\", \"args\": [\"q_id\", \"p_id\"]}], \"keys\": [\"d_{w}_{w}_{old.w}\"]}]}");
    char *sql = sqlgen_of(cfg);
    evd_buf_t sel = {0};
    select_lines(sql, &sel);
    assert_string_equal(sel.data,
                        "SELECT evictd.watch('\"public\".\"a\"', ARRAY['x', 'z']::text[], 'inval', false);\n"
                        "SELECT evictd.watch('\"public\".\"b\"', ARRAY['y']::text[], 'inval', true);\n"
                        "SELECT evictd.watch('\"App$\".\"C_1\"', ARRAY[]::text[], 'inval', true);\n"
                        "SELECT evictd.watch('\"public\".\"d\"', ARRAY['p_id', 'q_id']::text[], 'inval', true);\n");
    evd_buf_free(&sel);
    free(sql);

    evd_strv_t cols = {0};
    assert_int_equal(evd_config_needed_columns(cfg, "public", "d", &cols), 0);
    assert_int_equal(cols.n, 2);
    assert_string_equal(cols.v[0], "p_id");
    assert_string_equal(cols.v[1], "q_id");
    evd_strv_free(&cols);
    assert_int_equal(evd_config_needed_columns(cfg, "public", "nothing", &cols), 0);
    assert_int_equal(cols.n, 0);
    evd_strv_free(&cols);
    evd_config_free(cfg);
}

static void test_needed_columns(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(EVD_SOURCE_DIR "/config/routex.json");
    static const struct {
        const char *table;
        const char *cols;
    } want[] = {{"products", "id"}, {"shipments", "driver_id,product_id"}, {"drivers", "user_id"}};
    for (size_t i = 0; i < EVD_ARRAY_LEN(want); i++) {
        evd_strv_t cols = {0};
        assert_int_equal(evd_config_needed_columns(cfg, "public", want[i].table, &cols), 0);
        evd_buf_t b = {0};
        for (size_t k = 0; k < cols.n; k++)
            assert_int_equal(evd_buf_printf(&b, "%s%s", k ? "," : "", cols.v[k]), 0);
        assert_string_equal(b.data ? b.data : "", want[i].cols);
        evd_buf_free(&b);
        evd_strv_free(&cols);
    }
    evd_config_free(cfg);
}

static void test_describe(void **state)
{
    (void)state;
    evd_config_t *cfg = load_ok(FIXTURES "/valid/full.json");
    FILE *f = tmpfile();
    assert_non_null(f);
    evd_config_describe(cfg, f);
    rewind(f);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    assert_non_null(strstr(buf, "postgres: listening on evictd evictd_b\n"));
    assert_non_null(strstr(buf, "  default: cache.internal:6380 db 3 user cache (password set) "
                                "timeout 500ms\n"));
    assert_non_null(strstr(buf, "  products: unix /run/redis/redis.sock db 5 user svc (password set)"
                                " timeout 2000ms\n"));
    assert_non_null(strstr(buf, "rule 0: public.products on INSERT UPDATE -> targets default products\n"));
    assert_non_null(strstr(buf, "rule 1: sales.orders on DELETE TRUNCATE -> targets default (notify-only)\n"));
    assert_null(strstr(buf, "hunter2"));
    assert_null(strstr(buf, "from-env"));
    evd_config_free(cfg);
}

static void test_load_errors(void **state)
{
    (void)state;
    char err[1024] = "";
    assert_null(evd_config_load("/nonexistent/evictd.json", test_env, err, sizeof(err)));
    assert_string_equal(err, "/nonexistent/evictd.json: cannot open: No such file or directory");

    char path[] = "/tmp/evictd-test-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "wb");
    assert_non_null(f);
    static const char text[] = "{\"postgres\": {\"url\": \"x\"}}\0{}";
    assert_int_equal(fwrite(text, 1, sizeof(text) - 1, f), sizeof(text) - 1);
    fclose(f);
    assert_null(evd_config_load(path, test_env, err, sizeof(err)));
    assert_non_null(strstr(err, "holds a NUL byte"));
    remove(path);
}

/* Every scalar setting of the table in config.c is documented in the README's settings table,
 * with its default. */
static void test_readme_documents_settings(void **state)
{
    (void)state;
    FILE *f = fopen(EVD_SOURCE_DIR "/README.md", "rb");
    assert_non_null(f);
    static char text[256 * 1024];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    for (size_t i = 0; i < evd_nsettings; i++) {
        const evd_setting_t *s = &evd_settings[i];
        char needle[160];
        snprintf(needle, sizeof(needle), "| `%s` |", s->name);
        const char *row = strstr(text, needle);
        if (!row) {
            print_error("README.md lacks a settings row for %s\n", s->name);
            fail();
        }
        const char *eol = strchr(row, '\n');
        char line[512];
        snprintf(line, sizeof(line), "%.*s", (int)(eol ? eol - row : 200), row);
        if (s->type == EVD_SET_INT && s->def < 1024 * 1024) {
            char def[40];
            snprintf(def, sizeof(def), "| %lld", (long long)s->def);
            if (!strstr(line, def)) {
                print_error("README row for %s does not show default %lld: %s\n", s->name, (long long)s->def, line);
                fail();
            }
        } else if (s->def_str && !strstr(line, s->def_str)) {
            print_error("README row for %s does not show default %s: %s\n", s->name, s->def_str, line);
            fail();
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_invalid_fixtures, setup_env),
        cmocka_unit_test_setup(test_valid_fixtures, setup_env),
        cmocka_unit_test_setup(test_samples, setup_env),
        cmocka_unit_test_setup(test_defaults, setup_env),
        cmocka_unit_test_setup(test_settings_table, setup_env),
        cmocka_unit_test_setup(test_full, setup_env),
        cmocka_unit_test_setup(test_bounds, setup_env),
        cmocka_unit_test_setup(test_env_expansion, setup_env),
        cmocka_unit_test_setup(test_redis_url, setup_env),
        cmocka_unit_test_setup(test_redis_credentials, setup_env),
        cmocka_unit_test_setup(test_sqlgen_routex, setup_env),
        cmocka_unit_test_setup(test_lookup_param_count, setup_env),
        cmocka_unit_test_setup(test_sqlgen_durable, setup_env),
        cmocka_unit_test_setup(test_needed_columns, setup_env),
        cmocka_unit_test_setup(test_describe, setup_env),
        cmocka_unit_test_setup(test_load_errors, setup_env),
        cmocka_unit_test(test_readme_documents_settings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
