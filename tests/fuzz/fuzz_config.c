/* fuzz_config.c - libFuzzer harness for the config loader (SPEC "Config").
 *
 * The input is a config file's text (bytes up to the first NUL, as evd_config_load refuses files
 * holding NUL). It is parsed with a fixed environment. A rejected config must come with a
 * one-line message; an accepted one must hold values inside the SPEC's ranges, and then goes
 * through everything `evictd check` and `evictd sql` do with it: evd_sqlgen,
 * evd_config_describe (into /dev/null), evd_config_needed_columns, and the expansion of a fixed
 * change of each rule's table with a fixed lookup resolver. evd_config_free releases it all.
 */
#include "fuzz_common.h"

static char *fuzz_env(const char *name)
{
    static char long_value[301];
    if (!long_value[0])
        memset(long_value, 'x', sizeof(long_value) - 1);
    static const char *const tab[] = {
        "DATABASE_URL",
        "postgres://evictd@127.0.0.1/app",
        "REDIS_URL",
        "redis://127.0.0.1:6379/1",
        "REDIS_PASSWORD",
        "s3cret-from-env",
        "REDIS_USER",
        "cache",
        "EMPTY",
        "",
        "BRACES",
        "${NOT_EXPANDED_AGAIN}",
        "PORT",
        "6380",
        NULL,
    };
    FUZZ_CHECK(name != NULL && name[0] != '\0');
    if (strcmp(name, "LONG") == 0)
        return long_value;
    for (size_t i = 0; tab[i]; i += 2)
        if (strcmp(tab[i], name) == 0)
            return (char *)tab[i + 1];
    return NULL;
}

static FILE *devnull(void)
{
    static FILE *f;
    if (!f) {
        f = fopen("/dev/null", "w");
        FUZZ_CHECK(f != NULL);
    }
    return f;
}

static void check_config(const evd_config_t *cfg)
{
    FUZZ_CHECK(cfg->pg_url != NULL && cfg->dl_path != NULL);
    FUZZ_CHECK(cfg->log_format && (!strcmp(cfg->log_format, "text") || !strcmp(cfg->log_format, "json")));
    FUZZ_CHECK(cfg->log_level != NULL);
    for (size_t i = 0; i < evd_nsettings; i++) {
        const evd_setting_t *s = &evd_settings[i];
        if (s->type != EVD_SET_INT)
            continue;
        int64_t v = *(const int64_t *)(const void *)((const char *)cfg + s->offset);
        FUZZ_CHECK(v >= s->min && v <= s->max);
    }
    FUZZ_CHECK(cfg->retry_initial_backoff_ms <= cfg->retry_max_backoff_ms);
    FUZZ_CHECK(cfg->nchannels >= 1 && cfg->nchannels <= 16);
    for (size_t i = 0; i < cfg->nchannels; i++)
        FUZZ_CHECK(cfg->channels[i][0] && strlen(cfg->channels[i]) <= 63);
    FUZZ_CHECK(cfg->ntargets >= 1);
    for (size_t i = 0; i < cfg->ntargets; i++) {
        const evd_target_cfg_t *t = &cfg->targets[i];
        FUZZ_CHECK(t->name && t->url);
        FUZZ_CHECK((t->host != NULL) != (t->unix_path != NULL));
        FUZZ_CHECK(t->unix_path || (t->port >= 1 && t->port <= 65535));
        FUZZ_CHECK(t->db >= 0 && t->timeout_ms >= 1);
    }
    FUZZ_CHECK(cfg->rules.n >= 1 && cfg->rules.max_keys == (size_t)cfg->batch_max_keys);
    for (size_t i = 0; i < cfg->rules.n; i++) {
        const evd_rule_t *r = &cfg->rules.v[i];
        FUZZ_CHECK(r->schema && r->table && strlen(r->schema) < 64 && strlen(r->table) < 64);
        FUZZ_CHECK(r->ops && !(r->ops & ~(unsigned)EVD_OP_ALL));
        FUZZ_CHECK(r->ntargets >= 1);
        for (size_t k = 0; k < r->ntargets; k++)
            FUZZ_CHECK(r->targets[k] >= 0 && (size_t)r->targets[k] < cfg->ntargets);
        FUZZ_CHECK(r->nkeys + r->npatterns >= 1);
        for (size_t l = 0; l < r->nlookups; l++)
            FUZZ_CHECK(r->lookups[l].nargs >= 1 && r->lookups[l].nargs <= 16);
        FUZZ_CHECK(r->durable >= -1 && r->durable <= 1);
    }
}

/* Appends an image holding every column in cols (values of alternating kinds: strings with glob
 * characters, integers, NULL). */
static int image_text(evd_buf_t *b, const evd_strv_t *cols, bool old)
{
    int rc = evd_buf_putc(b, '{');
    for (size_t k = 0; k < cols->n && rc == 0; k++) {
        if (k)
            rc = evd_buf_putc(b, ',');
        if (rc == 0)
            rc = evd_buf_json_str(b, cols->v[k], strlen(cols->v[k]));
        if (rc == 0)
            rc = evd_buf_putc(b, ':');
        if (rc == 0) {
            if (old)
                rc = k % 3 == 0   ? evd_buf_puts(b, "\"o*[?]\"")
                     : k % 3 == 1 ? evd_buf_printf(b, "%zu", k)
                                  : evd_buf_puts(b, "null");
            else
                rc = k % 2 == 0 ? evd_buf_printf(b, "-%zu", k) : evd_buf_puts(b, "\"n\\\\\"");
        }
    }
    return rc ? rc : evd_buf_putc(b, '}');
}

/* Expands a row change of rule i's table (UPDATE, else INSERT or DELETE, whichever the rule
 * applies to), with images holding every column the rules need for it, then a TRUNCATE. */
static void expand_rule_table(const evd_config_t *cfg, size_t i)
{
    const evd_rule_t *r = &cfg->rules.v[i];
    evd_strv_t cols = {0};
    FUZZ_CHECK(evd_config_needed_columns(cfg, r->schema, r->table, &cols) == 0);
    for (size_t k = 1; k < cols.n; k++)
        FUZZ_CHECK(strcmp(cols.v[k - 1], cols.v[k]) < 0); /* sorted, deduplicated */

    /* The first row op the rule applies to (TRUNCATE alone: none). */
    evd_op_t op = (r->ops & EVD_OP_UPDATE)   ? EVD_OP_UPDATE
                  : (r->ops & EVD_OP_INSERT) ? EVD_OP_INSERT
                  : (r->ops & EVD_OP_DELETE) ? EVD_OP_DELETE
                                             : EVD_OP_TRUNCATE;
    evd_buf_t text = {0};
    int rc = evd_buf_printf(&text, "{\"v\":1,\"id\":1,\"tx\":2,\"schema\":\"%s\",\"table\":\"%s\",\"op\":\"%s\"",
                            r->schema, r->table, evd_op_name(op));
    if (rc == 0 && op != EVD_OP_INSERT && op != EVD_OP_TRUNCATE)
        rc = evd_buf_puts(&text, ",\"old\":") || image_text(&text, &cols, true);
    if (rc == 0 && op != EVD_OP_DELETE && op != EVD_OP_TRUNCATE)
        rc = evd_buf_puts(&text, ",\"new\":") || image_text(&text, &cols, false);
    if (rc == 0)
        rc = evd_buf_putc(&text, '}');
    FUZZ_CHECK(rc == 0);
    evd_strv_free(&cols);

    evd_change_t c;
    char err[256];
    if (evd_payload_parse(text.data, text.len, &c, err, sizeof(err)) != EVD_PAYLOAD_OK) {
        fprintf(stderr, "payload for rule %zu rejected: %s\n%s\n", i, err, text.data);
        abort();
    }
    evd_buf_free(&text);

    evd_expansion_t x;
    FUZZ_CHECK(evd_expansion_init(&x, cfg->ntargets) == 0);
    FUZZ_CHECK(evd_rules_lookups(&cfg->rules, &c, fuzz_need, NULL) == 0);
    FUZZ_CHECK(evd_rules_expand(&cfg->rules, &c, fuzz_resolve, NULL, &x) == 0);
    FUZZ_CHECK(x.matched >= 1);
    for (size_t t = 0; t < x.ntargets; t++) {
        fuzz_check_unique(x.per_target[t].keys.v, x.per_target[t].keys.n);
        fuzz_check_unique(x.per_target[t].patterns.v, x.per_target[t].patterns.n);
    }
    /* TRUNCATE: every template with a reference widens. */
    evd_expansion_reset(&x);
    c.op = EVD_OP_TRUNCATE;
    c.rows = NULL;
    c.nrows = 0;
    FUZZ_CHECK(evd_rules_expand(&cfg->rules, &c, fuzz_resolve, NULL, &x) == 0);
    evd_expansion_free(&x);
    evd_change_clear(&c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';

    char err[1024];
    err[0] = '\0';
    evd_config_t *cfg = evd_config_parse("fuzz.json", text, fuzz_env, err, sizeof(err));
    if (!cfg) {
        size_t n = strlen(err);
        FUZZ_CHECK(n > 0 && n < sizeof(err));
        FUZZ_CHECK(strncmp(err, "fuzz.json", 9) == 0);
        free(text);
        return 0;
    }
    check_config(cfg);
    FUZZ_CHECK(strcmp(cfg->path, "fuzz.json") == 0);

    evd_buf_t sql = {0};
    FUZZ_CHECK(evd_sqlgen(cfg, &sql) == 0);
    FUZZ_CHECK(sql.data != NULL && strlen(sql.data) == sql.len);
    FUZZ_CHECK(strstr(sql.data, "BEGIN;\n") && strstr(sql.data, "COMMIT;\n"));
    evd_buf_free(&sql);

    FILE *out = devnull();
    evd_config_describe(cfg, out);
    fflush(out);

    /* Once per distinct table (first rule naming it), so big configs stay fast. */
    for (size_t i = 0; i < cfg->rules.n && i < 64; i++) {
        bool first = true;
        for (size_t k = 0; k < i && first; k++)
            first = strcmp(cfg->rules.v[k].schema, cfg->rules.v[i].schema) ||
                    strcmp(cfg->rules.v[k].table, cfg->rules.v[i].table);
        if (first)
            expand_rule_table(cfg, i);
    }

    evd_config_free(cfg);
    free(text);
    return 0;
}
