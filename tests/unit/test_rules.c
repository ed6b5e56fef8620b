/* test_rules.c - template compilation and the mapping from a change to keys and patterns. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "payload.h"
#include "rules.h"

#define RX "routex:1:"
#define CACHE_PAGE RX "views.decorators.cache.cache_page.*"
#define CACHE_HEADER RX "views.decorators.cache.cache_header.*"

#define LIST(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NONE ((const char *const[]){NULL})

/* ---- helpers ----------------------------------------------------------------------------- */

static char *test_env(const char *name)
{
    static char database_url[] = "postgres://evictd@127.0.0.1/test";
    return strcmp(name, "DATABASE_URL") == 0 ? database_url : NULL;
}

static evd_config_t *cfg_text(const char *json)
{
    char err[512] = "";
    evd_config_t *cfg = evd_config_parse("test.json", json, test_env, err, sizeof(err));
    if (!cfg)
        fail_msg("config rejected: %s", err);
    return cfg;
}

/* A config with targets "default" and "other", `extra` top-level members (ending in a comma, or
 * "") and the given rules array. */
static evd_config_t *cfg_rules2(const char *extra, const char *rules)
{
    char buf[8192];
    int n = snprintf(buf, sizeof(buf),
                     "{\"postgres\": {\"url\": \"${DATABASE_URL}\"},\n"
                     " \"redis\": {\"default\": {\"url\": \"redis://127.0.0.1:6379/0\"},\n"
                     "           \"other\": {\"url\": \"redis://127.0.0.1:6379/1\"}},\n"
                     " %s\n"
                     " \"rules\": %s}\n",
                     extra, rules);
    assert_true(n > 0 && (size_t)n < sizeof(buf));
    return cfg_text(buf);
}

static evd_config_t *cfg_rules(const char *rules)
{
    return cfg_rules2("", rules);
}

static evd_config_t *cfg_sample(const char *name)
{
    char path[1024], err[512] = "";
    snprintf(path, sizeof(path), "%s/config/%s", EVD_SOURCE_DIR, name);
    evd_config_t *cfg = evd_config_load(path, test_env, err, sizeof(err));
    if (!cfg)
        fail_msg("%s rejected: %s", path, err);
    return cfg;
}

static void change_from(evd_change_t *c, const char *json)
{
    char err[256] = "";
    evd_payload_status_t st = evd_payload_parse(json, strlen(json), c, err, sizeof(err));
    if (st != EVD_PAYLOAD_OK)
        fail_msg("payload rejected (%d): %s: %s", (int)st, err, json);
}

/* Parses payload, expands it into a fresh *x (release with evd_expansion_free). The change is
 * released before returning, so the expansion must not borrow from it. */
static void expand(const evd_config_t *cfg, const char *payload, evd_lookup_resolve_fn fn, void *ud, evd_expansion_t *x)
{
    evd_change_t c;
    change_from(&c, payload);
    assert_int_equal(evd_expansion_init(x, cfg->ntargets), 0);
    assert_int_equal(evd_rules_expand(&cfg->rules, &c, fn, ud, x), 0);
    evd_change_clear(&c);
}

static size_t target(const evd_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->ntargets; i++)
        if (strcmp(cfg->targets[i].name, name) == 0)
            return i;
    fail_msg("no target %s", name);
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void print_list(evd_buf_t *b, const char *const *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_int_equal(evd_buf_printf(b, "%s\"%s\"", i ? ", " : "", v[i]), 0);
}

/* The vector holds exactly the strings of want (a NULL-terminated list), in any order, each
 * once. */
typedef struct strs {
    char *const *v;
    size_t n;
} strs_t;

/* Works for evd_strv_t and evd_keyvec_t alike. */
#define assert_strv_set(sv, want, what) assert_strs_set(&(strs_t){(sv)->v, (sv)->n}, want, what)

static void assert_strs_set(const strs_t *sv, const char *const *want, const char *what)
{
    size_t nw = 0;
    while (want[nw])
        nw++;
    const char **got = calloc(sv->n + 1, sizeof(*got));
    const char **exp = calloc(nw + 1, sizeof(*exp));
    assert_non_null(got);
    assert_non_null(exp);
    for (size_t i = 0; i < sv->n; i++)
        got[i] = sv->v[i];
    for (size_t i = 0; i < nw; i++)
        exp[i] = want[i];
    qsort(got, sv->n, sizeof(*got), cmp_str);
    qsort(exp, nw, sizeof(*exp), cmp_str);
    bool same = sv->n == nw;
    for (size_t i = 0; same && i < nw; i++)
        same = strcmp(got[i], exp[i]) == 0;
    if (!same) {
        evd_buf_t b = {0};
        assert_int_equal(evd_buf_printf(&b, "%s: got [", what), 0);
        print_list(&b, got, sv->n);
        assert_int_equal(evd_buf_puts(&b, "], want ["), 0);
        print_list(&b, exp, nw);
        assert_int_equal(evd_buf_puts(&b, "]"), 0);
        print_message("%s\n", b.data);
        evd_buf_free(&b);
    }
    free(got);
    free(exp);
    assert_true(same);
}

static void expect_target(const evd_expansion_t *x, size_t t, const char *const *keys, const char *const *patterns)
{
    assert_true(t < x->ntargets);
    assert_strv_set(&x->per_target[t].keys, keys, "keys");
    assert_strv_set(&x->per_target[t].patterns, patterns, "patterns");
}

/* For configs with targets default(0) and other(1): other must stay empty. */
static void expect(const evd_expansion_t *x, const char *const *keys, const char *const *patterns)
{
    expect_target(x, 0, keys, patterns);
    for (size_t t = 1; t < x->ntargets; t++)
        expect_target(x, t, NONE, NONE);
}

static void assert_contains(const char *s, const char *sub)
{
    if (!strstr(s, sub))
        fail_msg("\"%s\" does not contain \"%s\"", s, sub);
}

/* ---- a lookup resolver backed by a table ------------------------------------------------ */

/* vals: NULL = unknown (resolver returns NULL), "" = zero rows, "a,b" = two rows, "~" = SQL NULL.
 */
typedef struct lk_entry {
    const char *as;
    const char *args; /* joined by '|' */
    int status;
    const char *vals;
} lk_entry_t;

typedef struct resolver {
    const lk_entry_t *tab;
    size_t ntab;
    evd_strv_t calls; /* "as(arg|arg)" in call order */
    evd_lookup_vals_t *made[256];
    size_t nmade;
} resolver_t;

static void join_call(evd_buf_t *b, const char *as, const char *const *args, size_t nargs)
{
    assert_int_equal(evd_buf_printf(b, "%s(", as), 0);
    for (size_t i = 0; i < nargs; i++)
        assert_int_equal(evd_buf_printf(b, "%s%s", i ? "|" : "", args[i]), 0);
    assert_int_equal(evd_buf_putc(b, ')'), 0);
}

static const evd_lookup_vals_t *resolve(void *ud, const evd_rule_t *rule, size_t li, const char *const *args,
                                        size_t nargs)
{
    resolver_t *r = ud;
    assert_true(li < rule->nlookups);
    assert_int_equal(nargs, rule->lookups[li].nargs);
    evd_buf_t call = {0};
    join_call(&call, rule->lookups[li].as, args, nargs);
    assert_int_equal(evd_strv_push(&r->calls, call.data, call.len), 0);
    const lk_entry_t *e = NULL;
    for (size_t i = 0; i < r->ntab && !e; i++) {
        evd_buf_t want = {0};
        assert_int_equal(evd_buf_printf(&want, "%s(%s)", r->tab[i].as, r->tab[i].args), 0);
        if (strcmp(want.data, call.data) == 0)
            e = &r->tab[i];
        evd_buf_free(&want);
    }
    evd_buf_free(&call);
    if (!e || !e->vals)
        return NULL;
    assert_true(r->nmade < EVD_ARRAY_LEN(r->made));
    evd_lookup_vals_t *lv = calloc(1, sizeof(*lv));
    assert_non_null(lv);
    r->made[r->nmade++] = lv;
    lv->status = e->status;
    lv->v = calloc(16, sizeof(char *));
    assert_non_null(lv->v);
    for (const char *p = e->vals; *p;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        assert_true(lv->n < 16);
        if (n == 1 && *p == '~') {
            lv->v[lv->n++] = NULL;
        } else {
            lv->v[lv->n] = calloc(1, n + 1);
            assert_non_null(lv->v[lv->n]);
            memcpy(lv->v[lv->n++], p, n);
        }
        p = end ? end + 1 : p + n;
    }
    return lv;
}

static void resolver_free(resolver_t *r)
{
    for (size_t i = 0; i < r->nmade; i++) {
        for (size_t k = 0; k < r->made[i]->n; k++)
            free(r->made[i]->v[k]);
        free(r->made[i]->v);
        free(r->made[i]);
    }
    r->nmade = 0;
    evd_strv_free(&r->calls);
}

/* Collects distinct "as(args)" strings from evd_rules_lookups. */
static int need_cb(void *ud, const evd_rule_t *rule, size_t li, const char *const *args, size_t nargs)
{
    evd_strv_t *out = ud;
    assert_true(li < rule->nlookups);
    assert_int_equal(nargs, rule->lookups[li].nargs);
    evd_buf_t call = {0};
    join_call(&call, rule->lookups[li].as, args, nargs);
    bool seen = false;
    for (size_t i = 0; i < out->n; i++)
        seen |= strcmp(out->v[i], call.data) == 0;
    if (!seen)
        assert_int_equal(evd_strv_push(out, call.data, call.len), 0);
    evd_buf_free(&call);
    return 0;
}

static void needed(const evd_config_t *cfg, const char *payload, evd_strv_t *out)
{
    evd_change_t c;
    change_from(&c, payload);
    assert_int_equal(evd_rules_lookups(&cfg->rules, &c, need_cb, out), 0);
    evd_change_clear(&c);
}

/* ---- template compilation --------------------------------------------------------------- */

static void test_compile_errors(void **state)
{
    (void)state;
    static const struct {
        const char *src;
        const char *why;
    } cases[] = {
        {"product_{id", "unbalanced '{' at offset 8 in \"product_{id\""},
        {"{", "unbalanced '{'"},
        {"a{b{c}", "unbalanced '{' at offset 1"},
        {"product_}x", "unbalanced '}' at offset 8"},
        {"x}", "unbalanced '}'"},
        {"{{a}", "unbalanced '}'"},
        {"{}", "empty name in '{}' at offset 0"},
        {"k_{}", "empty name in '{}' at offset 2"},
        {"{old.}", "empty name"},
        {"{new.}", "empty name"},
        {"{a-b}", "bad character '-' in name at offset 2"},
        {"{a b}", "bad character ' '"},
        {"{old.a.b}", "bad character '.'"},
        {"{new.x:y}", "bad character ':'"},
        {"{é}", "bad character"},
        {"", "empty template"},
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(cases); i++) {
        evd_template_t t;
        char err[256] = "";
        int rc = evd_template_compile(&t, cases[i].src, false, NULL, 0, err, sizeof(err));
        if (rc != -EINVAL)
            fail_msg("\"%s\" compiled (rc %d)", cases[i].src, rc);
        assert_contains(err, cases[i].why);
        assert_null(t.parts);
        assert_null(t.src);
        assert_null(t.store);
    }
    /* 65 references overflow the 64 parts a template may have. */
    evd_buf_t big = {0};
    for (int i = 0; i < 65; i++)
        assert_int_equal(evd_buf_puts(&big, "{a}"), 0);
    evd_template_t t;
    char err[256] = "";
    assert_int_equal(evd_template_compile(&t, big.data, false, NULL, 0, err, sizeof(err)), -EINVAL);
    assert_contains(err, "too many parts");
    evd_buf_free(&big);
}

static void assert_part(const evd_tpl_part_t *p, bool is_ref, evd_img_t img, int lookup, const char *text)
{
    assert_int_equal(p->is_ref, is_ref);
    if (is_ref) {
        assert_int_equal(p->img, img);
        assert_int_equal(p->lookup, lookup);
    }
    assert_int_equal(p->len, strlen(text));
    assert_string_equal(p->text, text);
}

static void test_compile_ok(void **state)
{
    (void)state;
    evd_template_t t;
    char err[256] = "";

    assert_int_equal(evd_template_compile(&t, "routex:1:product_{id}", false, NULL, 0, err, sizeof(err)), 0);
    assert_string_equal(t.src, "routex:1:product_{id}");
    assert_false(t.is_pattern);
    assert_int_equal(t.nparts, 2);
    assert_part(&t.parts[0], false, EVD_IMG_ANY, -1, "routex:1:product_");
    assert_part(&t.parts[1], true, EVD_IMG_ANY, -1, "id");
    assert_true(t.has_any);
    assert_false(t.has_old);
    assert_false(t.has_new);
    evd_template_free(&t);

    assert_int_equal(evd_template_compile(&t, "{old.a}-{new.b_2}", true, NULL, 0, err, sizeof(err)), 0);
    assert_true(t.is_pattern);
    assert_int_equal(t.nparts, 3);
    assert_part(&t.parts[0], true, EVD_IMG_OLD, -1, "a");
    assert_part(&t.parts[1], false, EVD_IMG_ANY, -1, "-");
    assert_part(&t.parts[2], true, EVD_IMG_NEW, -1, "b_2");
    assert_false(t.has_any);
    assert_true(t.has_old);
    assert_true(t.has_new);
    evd_template_free(&t);

    assert_int_equal(evd_template_compile(&t, "plain:key", false, NULL, 0, err, sizeof(err)), 0);
    assert_int_equal(t.nparts, 1);
    assert_part(&t.parts[0], false, EVD_IMG_ANY, -1, "plain:key");
    assert_false(t.has_any || t.has_old || t.has_new);
    evd_template_free(&t);

    /* "{old}" is a column named old, not an image. */
    assert_int_equal(evd_template_compile(&t, "{old}", false, NULL, 0, err, sizeof(err)), 0);
    assert_int_equal(t.nparts, 1);
    assert_part(&t.parts[0], true, EVD_IMG_ANY, -1, "old");
    evd_template_free(&t);

    /* Doubled braces are literal text only, however they are split into parts. */
    assert_int_equal(evd_template_compile(&t, "a{{x}}b{{", false, NULL, 0, err, sizeof(err)), 0);
    evd_buf_t lit = {0};
    for (size_t i = 0; i < t.nparts; i++) {
        assert_false(t.parts[i].is_ref);
        assert_int_equal(evd_buf_append(&lit, t.parts[i].text, t.parts[i].len), 0);
    }
    assert_string_equal(lit.data, "a{x}b{");
    assert_false(t.has_any || t.has_old || t.has_new);
    evd_buf_free(&lit);
    evd_template_free(&t);

    /* References resolve to lookups by name; other names stay columns. */
    char as0[] = "driver_user_id", as1[] = "slug2";
    evd_lookup_t lks[2] = {{.as = as0}, {.as = as1}};
    assert_int_equal(
        evd_template_compile(&t, "{new.slug2}:{driver_user_id}:{driver_id}", false, lks, 2, err, sizeof(err)), 0);
    assert_int_equal(t.nparts, 5);
    assert_part(&t.parts[0], true, EVD_IMG_NEW, 1, "slug2");
    assert_part(&t.parts[2], true, EVD_IMG_ANY, 0, "driver_user_id");
    assert_part(&t.parts[4], true, EVD_IMG_ANY, -1, "driver_id");
    evd_template_free(&t);

    /* Exactly 64 parts is allowed. */
    evd_buf_t big = {0};
    for (int i = 0; i < 32; i++)
        assert_int_equal(evd_buf_puts(&big, "k{a}"), 0);
    assert_int_equal(evd_template_compile(&t, big.data, false, NULL, 0, err, sizeof(err)), 0);
    assert_int_equal(t.nparts, 64);
    evd_template_free(&t);
    evd_buf_free(&big);
}

/* ---- expansion ---------------------------------------------------------------------------- */

static void test_literal_keys(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"app:list\", \"app:home\"],"
                                  " \"patterns\": [\"app:page.*\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"id\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("app:list", "app:home"), LIST("app:page.*"));
    assert_int_equal(x.matched, 1);
    assert_int_equal(x.widened, 0);
    assert_string_equal(x.widen_reason, "");
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static const lk_entry_t routex_drivers[] = {
    {"driver_user_id", "2", 0, "20"},
    {"driver_user_id", "5", 0, "50,51"},
};

static void test_col_each_image(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = routex_drivers, .ntab = EVD_ARRAY_LEN(routex_drivers)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\","
           "\"table\":\"shipments\",\"op\":\"UPDATE\","
           "\"old\":{\"id\":7,\"product_id\":3,\"driver_id\":2},"
           "\"new\":{\"id\":7,\"product_id\":4,\"driver_id\":2}}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_3", RX "product_4", RX "drivers_list", RX "driver_status_20"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.matched, 1);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    /* The same value in both images gives the key once. */
    expand(cfg,
           "{\"v\":1,\"id\":43,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
           "\"old\":{\"id\":7,\"product_id\":3,\"driver_id\":2},"
           "\"new\":{\"id\":7,\"product_id\":3,\"driver_id\":5}}",
           resolve, &r, &x);
    expect(&x,
           LIST(RX "products_list", RX "product_3", RX "drivers_list", RX "driver_status_20", RX "driver_status_50",
                RX "driver_status_51"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    evd_expansion_free(&x);

    /* products: {id} on a DELETE uses the old image. */
    expand(cfg,
           "{\"v\":1,\"id\":44,\"schema\":\"public\",\"table\":\"products\",\"op\":\"DELETE\","
           "\"old\":{\"id\":9}}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_9"), LIST(CACHE_PAGE, CACHE_HEADER));
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_old_new(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"o_{old.a}\", \"n_{new.a}\","
                                  " \"m_{old.a}_{new.b}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"a\":1,\"b\":10},\"new\":{\"a\":2,\"b\":20}}",
           NULL, NULL, &x);
    expect(&x, LIST("o_1", "n_2", "m_1_20"), NONE);
    evd_expansion_free(&x);

    /* An op without the named image gives no key for that template, and no widening. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":5,\"b\":6}}",
           NULL, NULL, &x);
    expect(&x, LIST("n_5"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
           "\"old\":{\"a\":6,\"b\":7}}",
           NULL, NULL, &x);
    expect(&x, LIST("o_6"), NONE);
    assert_int_equal(x.widened, 0);
    assert_int_equal(x.matched, 1);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_absent_image(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"o_{old.x}\"]},"
                                  " {\"table\": \"t\", \"keys\": [\"n_{new.x}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"x\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("n_1"), NONE);
    assert_int_equal(x.matched, 2);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
           "\"old\":{\"x\":2}}",
           NULL, NULL, &x);
    expect(&x, LIST("o_2"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    /* o_ needs no column on an INSERT; n_ lacks its column and widens. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"y\":1}}",
           NULL, NULL, &x);
    expect(&x, NONE, LIST("n_*"));
    assert_int_equal(x.widened, 1);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_literal_braces(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"{{lit}}_{a}\", \"x}}{{y\","
                                  " \"{{{a}}}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("{lit}_1", "x}{y", "{1}"), NONE);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_rendering(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"i_{i}\", \"neg_{neg}\", \"big_{big}\", \"s_{s}\","
                                  " \"e_{e}\", \"t_{t}\", \"f_{f}\", \"num_{num}\", \"exp_{exp}\", \"u_{u}\","
                                  " \"z_{z}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"i\":42,\"neg\":-5,\"big\":9007199254740993,\"s\":\"hello world\","
           "\"e\":\"\",\"t\":true,\"f\":false,\"num\":\"3.50\",\"exp\":\"1e-07\","
           "\"u\":\"caf\\u00e9 \\\"q\\\"\",\"z\":0}}",
           NULL, NULL, &x);
    expect(&x,
           LIST("i_42", "neg_-5", "big_9007199254740993", "s_hello world", "e_", "t_True", "f_False", "num_3.50",
                "exp_1e-07", "u_caf\xc3\xa9 \"q\"", "z_0"),
           NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_render_value(void **state)
{
    (void)state;
    static const struct {
        const char *json;
        int rc;
        const char *out;
    } cases[] = {
        {"7", 0, "7"},
        {"-9223372036854775808", 0, "-9223372036854775808"},
        {"\"3.50\"", 0, "3.50"},
        {"\"\"", 0, ""},
        {"true", 0, "True"},
        {"false", 0, "False"},
        {"1.5", 0, "1.5"},
        {"100.0", 0, "100.0"},
        {"0.1", 0, "0.1"},
        {"-0.0", 0, "-0.0"},
        {"0.0001", 0, "0.0001"},
        {"0.00015", 0, "0.00015"},
        {"1e-05", 0, "1e-05"},
        {"1e15", 0, "1000000000000000.0"},
        {"1e16", 0, "1e+16"},
        {"123456789.125", 0, "123456789.125"},
        {"1.7976931348623157e308", 0, "1.7976931348623157e+308"},
        {"5e-324", 0, "5e-324"},
        {"0.30000000000000004", 0, "0.30000000000000004"},
        {"null", 1, ""},
        {"[1, 2]", 0, "[1,2]"},
        {"{}", 0, "{}"},
        {"-0", 0, "0"},
    };
    for (size_t i = 0; i < EVD_ARRAY_LEN(cases); i++) {
        /* The value travels in a payload, as in production. */
        char payload[256], err[128];
        snprintf(payload, sizeof(payload),
                 "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\",\"new\":{\"x\":%s}}",
                 cases[i].json);
        evd_change_t c;
        assert_int_equal(evd_payload_parse(payload, strlen(payload), &c, err, sizeof(err)), EVD_PAYLOAD_OK);
        const evd_value_t *v = evd_image_get(c.rows[0].new_img, "x", 1);
        assert_non_null(v);
        evd_buf_t b = {0};
        assert_int_equal(evd_buf_puts(&b, ""), 0);
        int rc = evd_render_value(v, &b);
        if (rc != cases[i].rc || strcmp(b.data, cases[i].out) != 0)
            fail_msg("%s: rc %d \"%s\", want %d \"%s\"", cases[i].json, rc, b.data, cases[i].rc, cases[i].out);
        evd_buf_free(&b);
        evd_change_clear(&c);
    }
}

static void test_glob_escape_fn(void **state)
{
    (void)state;
    evd_buf_t b = {0};
    assert_int_equal(evd_glob_escape(&b, "a*b?c[d]e\\f", 11), 0);
    assert_string_equal(b.data, "a\\*b\\?c\\[d\\]e\\\\f");
    assert_int_equal(b.len, 16);
    evd_buf_reset(&b);
    assert_int_equal(evd_glob_escape(&b, "plain:key-1", 11), 0);
    assert_string_equal(b.data, "plain:key-1");
    evd_buf_free(&b);
}

static void test_null_value(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"k_{a}\", \"ab_{a}_{b}\","
                                  " \"lit\"]}]");
    evd_expansion_t x;
    /* NULL in the old image: no key for that image only. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"a\":null,\"b\":1},\"new\":{\"a\":7,\"b\":null}}",
           NULL, NULL, &x);
    expect(&x, LIST("k_7", "lit"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":null,\"b\":null}}",
           NULL, NULL, &x);
    expect(&x, LIST("lit"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_missing_column_widens(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"lit\", \"product_{nope}\","
                                  " \"p_{id}_{nope}\", \"ok_{id}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"id\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("lit", "ok_1"), LIST("product_*", "p_1_*"));
    assert_int_equal(x.widened, 2);
    assert_string_equal(x.widen_reason, "column not captured: nope in \"product_{nope}\"");
    evd_expansion_free(&x);

    /* UPDATE: each image widens on its own; the known value differs per image. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"id\":1},\"new\":{\"id\":2}}",
           NULL, NULL, &x);
    expect(&x, LIST("lit", "ok_1", "ok_2"), LIST("product_*", "p_1_*", "p_2_*"));
    assert_int_equal(x.widened, 4);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_truncate_widens(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {0};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":5,\"tx\":1,\"ts\":1.5,\"schema\":\"public\",\"table\":\"shipments\","
           "\"op\":\"TRUNCATE\"}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "drivers_list"),
           LIST(RX "product_*", RX "driver_status_*", CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.matched, 1);
    assert_int_equal(x.widened, 2);
    assert_string_equal(x.widen_reason, "truncate in \"" RX "product_{product_id}\"");
    assert_int_equal(r.calls.n, 0); /* no lookup for a truncate */
    evd_expansion_free(&x);

    /* Literal glob characters of a widened key template are escaped; a pattern's are not. */
    evd_config_t *c2 = cfg_rules("[{\"table\": \"t\", \"keys\": [\"a*b:{id}\", \"k[{x}]?\"],"
                                 " \"patterns\": [\"p*:{id}\", \"lit*\"]}]");
    expand(c2, "{\"v\":1,\"id\":5,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}", NULL, NULL, &x);
    expect(&x, NONE, LIST("a\\*b:*", "k\\[*\\]\\?", "p*:*", "lit*"));
    assert_int_equal(x.widened, 3);
    evd_expansion_free(&x);
    evd_config_free(c2);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_ref_widens(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {0};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":42,\"ref\":true,\"schema\":\"public\",\"table\":\"products\","
           "\"op\":\"UPDATE\"}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list"), LIST(RX "product_*", CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 1);
    assert_string_equal(x.widen_reason, "oversize change in \"" RX "product_{id}\"");
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":42,\"ref\":true,\"schema\":\"public\",\"table\":\"shipments\","
           "\"op\":\"INSERT\"}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "drivers_list"),
           LIST(RX "product_*", RX "driver_status_*", CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 2);
    assert_int_equal(r.calls.n, 0);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);

    /* A reference still carries its op: a template naming an image the op lacks gives no key. */
    cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"o_{old.a}\", \"n_{new.a}\", \"a_{a}\"]}]");
    expand(cfg, "{\"v\":1,\"id\":2,\"ref\":true,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\"}", NULL, NULL,
           &x);
    expect(&x, NONE, LIST("n_*", "a_*"));
    assert_int_equal(x.widened, 2);
    evd_expansion_free(&x);
    expand(cfg, "{\"v\":1,\"id\":2,\"ref\":true,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\"}", NULL, NULL,
           &x);
    expect(&x, NONE, LIST("o_*", "a_*"));
    evd_expansion_free(&x);
    expand(cfg, "{\"v\":1,\"id\":2,\"ref\":true,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\"}", NULL, NULL,
           &x);
    expect(&x, NONE, LIST("o_*", "n_*", "a_*"));
    evd_expansion_free(&x);
    expand(cfg, "{\"v\":1,\"id\":2,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}", NULL, NULL, &x);
    expect(&x, NONE, LIST("o_*", "n_*", "a_*"));
    assert_int_equal(x.widened, 3);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static const char chunk_rules[] = "[{\"table\": \"t\", \"keys\": [\"any_{a}\", \"o_{old.a}\", \"n_{new.a}\","
                                  " \"m_{old.a}_{new.a}\"]}]";

static void test_chunk_rows(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules(chunk_rules);
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":9,\"tx\":3,\"ts\":2,\"schema\":\"public\",\"table\":\"t\","
           "\"op\":\"INSERT\",\"rows\":[{\"new\":{\"a\":1}},{\"new\":{\"a\":2}},"
           "{\"new\":{\"a\":1}}]}",
           NULL, NULL, &x);
    expect(&x, LIST("any_1", "any_2", "n_1", "n_2"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    /* Paired UPDATE rows. */
    expand(cfg,
           "{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"rows\":[{\"old\":{\"a\":1},\"new\":{\"a\":2}},{\"old\":{\"a\":3},"
           "\"new\":{\"a\":3}}]}",
           NULL, NULL, &x);
    expect(&x, LIST("any_1", "any_2", "any_3", "o_1", "o_3", "n_2", "n_3", "m_1_2", "m_3_3"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
           "\"rows\":[{\"old\":{\"a\":1}},{\"old\":{\"a\":2}}]}",
           NULL, NULL, &x);
    expect(&x, LIST("any_1", "any_2", "o_1", "o_2"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_chunk_unpaired(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules(chunk_rules);
    evd_expansion_t x;
    /* Unpaired UPDATE rows (no primary key): a template naming one image expands from the rows
     * carrying it; only a template mixing old. and new. widens, keeping what it knows. */
    expand(cfg,
           "{\"v\":1,\"id\":9,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"rows\":[{\"old\":{\"a\":1}},{\"new\":{\"a\":2}},{\"old\":{\"a\":3}}]}",
           NULL, NULL, &x);
    expect(&x, LIST("any_1", "any_2", "any_3", "o_1", "o_3", "n_2"), LIST("m_1_*", "m_*_2", "m_3_*"));
    assert_int_equal(x.widened, 3);
    assert_contains(x.widen_reason, "m_{old.a}_{new.a}");
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_rules_and_on(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"all_{a}\", \"shared\"]},"
                                  " {\"table\": \"public.t\", \"on\": [\"DELETE\"], \"keys\": [\"del_{a}\"]},"
                                  " {\"table\": \"t\", \"on\": [\"INSERT\", \"UPDATE\"], \"keys\": [\"iu\","
                                  " \"shared\"]},"
                                  " {\"table\": \"t\", \"on\": [\"TRUNCATE\"], \"keys\": [\"tr\"]},"
                                  " {\"table\": \"s2.t\", \"keys\": [\"other_schema\"]},"
                                  " {\"table\": \"u\", \"keys\": [\"other_table\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("all_1", "shared", "iu"), NONE);
    assert_int_equal(x.matched, 2);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
           "\"old\":{\"a\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("all_1", "shared", "del_1"), NONE);
    assert_int_equal(x.matched, 2);
    evd_expansion_free(&x);

    expand(cfg, "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}", NULL, NULL, &x);
    expect(&x, LIST("shared", "tr"), LIST("all_*"));
    assert_int_equal(x.matched, 2);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"s2\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"a\":1},\"new\":{\"a\":1}}",
           NULL, NULL, &x);
    expect(&x, LIST("other_schema"), NONE);
    assert_int_equal(x.matched, 1);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"nobody\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1}}",
           NULL, NULL, &x);
    expect(&x, NONE, NONE);
    assert_int_equal(x.matched, 0);
    evd_expansion_free(&x);

    assert_true(evd_rules_watches(&cfg->rules, "public", "t"));
    assert_true(evd_rules_watches(&cfg->rules, "s2", "t"));
    assert_true(evd_rules_watches(&cfg->rules, "public", "u"));
    assert_false(evd_rules_watches(&cfg->rules, "s2", "u"));
    assert_false(evd_rules_watches(&cfg->rules, "public", "nobody"));
    evd_config_free(cfg);
}

static const lk_entry_t shop_categories[] = {
    {"category_slug", "1", 0, "shoes"},
    {"category_slug", "2", 0, "boots"},
};

static void test_targets(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("shop.json");
    assert_int_equal(cfg->ntargets, 2);
    size_t def = target(cfg, "default"), prod = target(cfg, "products");
    resolver_t r = {.tab = shop_categories, .ntab = EVD_ARRAY_LEN(shop_categories)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":3,\"schema\":\"public\",\"table\":\"catalog_product\","
           "\"op\":\"UPDATE\",\"old\":{\"id\":1,\"slug\":\"red-shoe\",\"category_id\":1},"
           "\"new\":{\"id\":1,\"slug\":\"blue-boot\",\"category_id\":2}}",
           resolve, &r, &x);
    expect_target(&x, prod,
                  LIST("ecommerce:1:product_detail_red-shoe", "ecommerce:1:product_detail_blue-boot",
                       "ecommerce:1:product_list", "ecommerce:1:category_shoes", "ecommerce:1:category_boots"),
                  NONE);
    expect_target(&x, def, LIST("ecommerce:1:homepage"), NONE);
    assert_int_equal(x.matched, 2);
    evd_expansion_free(&x);

    expand(cfg,
           "{\"v\":1,\"id\":4,\"schema\":\"public\",\"table\":\"catalog_category\","
           "\"op\":\"INSERT\",\"new\":{\"id\":3,\"slug\":\"hats\"}}",
           resolve, &r, &x);
    expect_target(&x, prod, LIST("ecommerce:1:category_hats"), NONE);
    expect_target(&x, def, LIST("ecommerce:1:homepage", "ecommerce:1:categories"), NONE);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);

    /* A rule naming several targets; duplicates are per target. */
    cfg = cfg_rules("[{\"table\": \"t\", \"targets\": [\"default\", \"other\"],"
                    " \"keys\": [\"both_{a}\"]},"
                    " {\"table\": \"t\", \"targets\": [\"other\", \"other\"],"
                    " \"keys\": [\"both_{a}\", \"o\"]},"
                    " {\"table\": \"t\", \"keys\": [\"d\"], \"patterns\": [\"dp*\"]}]");
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1}}",
           NULL, NULL, &x);
    expect_target(&x, target(cfg, "default"), LIST("both_1", "d"), LIST("dp*"));
    expect_target(&x, target(cfg, "other"), LIST("both_1", "o"), NONE);
    assert_int_equal(x.matched, 3);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static const lk_entry_t lk_tab[] = {
    {"driver_user_id", "2", 0, "20"},       {"driver_user_id", "5", 0, "50,51"},
    {"driver_user_id", "9", 0, ""},         /* no row */
    {"driver_user_id", "13", -5, "x"},      /* failed */
    {"driver_user_id", "14", 0, NULL},      /* unknown to the resolver */
    {"driver_user_id", "15", 0, "70,~,71"}, /* a NULL among the rows */
    {"driver_user_id", "16", 0, "a*b"},
};

static void test_lookup_values(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
           "\"old\":{\"product_id\":3,\"driver_id\":2},\"new\":{\"product_id\":3,"
           "\"driver_id\":5}}",
           resolve, &r, &x);
    expect(&x,
           LIST(RX "products_list", RX "product_3", RX "drivers_list", RX "driver_status_20", RX "driver_status_50",
                RX "driver_status_51"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 0);
    assert_strv_set(&r.calls, LIST("driver_user_id(2)", "driver_user_id(5)"), "calls");
    evd_expansion_free(&x);

    /* A NULL among the lookup's rows gives no key for that row. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"INSERT\","
           "\"new\":{\"product_id\":3,\"driver_id\":15}}",
           resolve, &r, &x);
    expect(&x,
           LIST(RX "products_list", RX "product_3", RX "drivers_list", RX "driver_status_70", RX "driver_status_71"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_lookup_null_arg(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
           "\"old\":{\"product_id\":3,\"driver_id\":null},\"new\":{\"product_id\":3,"
           "\"driver_id\":2}}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_3", RX "drivers_list", RX "driver_status_20"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 0);
    assert_strv_set(&r.calls, LIST("driver_user_id(2)"), "calls");
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void expect_driver_widened(const char *driver, const char *reason)
{
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    evd_expansion_t x;
    char payload[512];
    snprintf(payload, sizeof(payload),
             "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"INSERT\","
             "\"new\":{\"product_id\":3,\"driver_id\":%s}}",
             driver);
    expand(cfg, payload, resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_3", RX "drivers_list"),
           LIST(RX "driver_status_*", CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 1);
    assert_string_equal(x.widen_reason, reason);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_lookup_failed(void **state)
{
    (void)state;
    expect_driver_widened("13", "lookup failed: driver_user_id in \"" RX "driver_status_{driver_user_id}\"");
    expect_driver_widened("14", "lookup failed: driver_user_id in \"" RX "driver_status_{driver_user_id}\"");
}

static void test_lookup_no_row(void **state)
{
    (void)state;
    expect_driver_widened("9", "lookup found no row: driver_user_id in \"" RX "driver_status_{driver_user_id}\"");
}

static void test_lookup_missing_arg(void **state)
{
    (void)state;
    /* The capture lacks the lookup's argument column: widen, never ask the resolver. */
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"INSERT\","
           "\"new\":{\"product_id\":3}}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_3", RX "drivers_list"),
           LIST(RX "driver_status_*", CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 1);
    assert_contains(x.widen_reason, "driver_id");
    assert_int_equal(r.calls.n, 0);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static const char cross_rules[] = "[{\"table\": \"t\", \"lookups\": ["
                                  "{\"as\": \"l1\", \"sql\": \"SELECT x FROM a WHERE id = $1\", \"args\": [\"a\"]},"
                                  "{\"as\": \"l2\", \"sql\": \"SELECT y FROM b WHERE id = $1 AND f = $2\","
                                  " \"args\": [\"b\", \"f\"]}],"
                                  " \"keys\": [\"x_{l1}_{l2}\", \"k_{a}_{l1}\"], \"patterns\": [\"p*_{l1}\"]}]";

static const lk_entry_t cross_tab[] = {
    {"l1", "1", 0, "a,b*"},
    {"l2", "2|true", 0, "1,2,3"},
    {"l1", "7", -1, NULL},
};

static void test_lookup_cross_product(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules2("\"batch\": {\"max_keys\": 6},", cross_rules);
    assert_int_equal(cfg->rules.max_keys, 6);
    resolver_t r = {.tab = cross_tab, .ntab = EVD_ARRAY_LEN(cross_tab)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1,\"b\":2,\"f\":true}}",
           resolve, &r, &x);
    /* Lookup values are raw in keys and glob-escaped in patterns. */
    expect(&x, LIST("x_a_1", "x_a_2", "x_a_3", "x_b*_1", "x_b*_2", "x_b*_3", "k_1_a", "k_1_b*"),
           LIST("p*_a", "p*_b\\*"));
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    /* A failed lookup keeps the known column value in the widened pattern. */
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":7,\"b\":2,\"f\":true}}",
           resolve, &r, &x);
    expect(&x, NONE, LIST("x_*_*", "k_7_*", "p*_*"));
    assert_int_equal(x.widened, 3);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

/* {l1}:{l1} is one lookup in two places: each value fills both (Django's f-string), not every
 * pair of values; and it counts once against batch.max_keys. */
static void test_lookup_used_twice(void **state)
{
    (void)state;
    static const char rules[] = "[{\"table\": \"t\", \"lookups\": ["
                                "{\"as\": \"l1\", \"sql\": \"SELECT x FROM a WHERE id = $1\", \"args\": [\"a\"]}],"
                                " \"keys\": [\"k_{l1}_{a}_{l1}\"]}]";
    evd_config_t *cfg = cfg_rules2("\"batch\": {\"max_keys\": 2},", rules);
    resolver_t r = {.tab = cross_tab, .ntab = EVD_ARRAY_LEN(cross_tab)};
    evd_expansion_t x;
    expand(cfg, "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\",\"new\":{\"a\":1}}", resolve,
           &r, &x);
    expect(&x, LIST("k_a_1_a", "k_b*_1_b*"), NONE);
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_lookup_over_max_keys(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules2("\"batch\": {\"max_keys\": 5},", cross_rules);
    resolver_t r = {.tab = cross_tab, .ntab = EVD_ARRAY_LEN(cross_tab)};
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"a\":1,\"b\":2,\"f\":true}}",
           resolve, &r, &x);
    expect(&x, LIST("k_1_a", "k_1_b*"), LIST("x_*_*", "p*_a", "p*_b\\*"));
    assert_int_equal(x.widened, 1);
    assert_contains(x.widen_reason, "batch.max_keys");
    assert_contains(x.widen_reason, "x_{l1}_{l2}");
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(cfg);
}

static void test_glob_escaping(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_rules("[{\"table\": \"t\", \"keys\": [\"k*[{x}]_{nope}\", \"w_{x}\"],"
                                  " \"patterns\": [\"p*:{x}:{nope}\", \"q?:{x}\"]}]");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"x\":\"a*b?[c]\\\\\"}}",
           NULL, NULL, &x);
    expect(&x, LIST("w_a*b?[c]\\"),
           LIST("k\\*\\[a\\*b\\?\\[c\\]\\\\\\]_*", "p*:a\\*b\\?\\[c\\]\\\\:*", "q?:a\\*b\\?\\[c\\]\\\\"));
    assert_int_equal(x.widened, 2);
    evd_expansion_free(&x);
    evd_config_free(cfg);
}

static void test_star_value_is_key(void **state)
{
    (void)state;
    /* A row holding '*' is a literal key, never a pattern that would wipe the keyspace. */
    evd_config_t *cfg = cfg_sample("routex.json");
    evd_expansion_t x;
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"products\",\"op\":\"INSERT\","
           "\"new\":{\"id\":\"*\"}}",
           NULL, NULL, &x);
    expect(&x, LIST(RX "products_list", RX "product_*"), LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);

    evd_config_t *c2 = cfg_rules("[{\"table\": \"t\", \"keys\": [\"{a}\"]}]");
    expand(c2,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"a\":\"*\"},\"new\":{\"a\":\"?\"}}",
           NULL, NULL, &x);
    expect(&x, LIST("*", "?"), NONE);
    evd_expansion_free(&x);

    /* A lookup value holding '*' is a literal key as well. */
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    expand(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"INSERT\","
           "\"new\":{\"product_id\":\"*\",\"driver_id\":16}}",
           resolve, &r, &x);
    expect(&x, LIST(RX "products_list", RX "product_*", RX "drivers_list", RX "driver_status_a*b"),
           LIST(CACHE_PAGE, CACHE_HEADER));
    assert_int_equal(x.widened, 0);
    evd_expansion_free(&x);
    resolver_free(&r);
    evd_config_free(c2);
    evd_config_free(cfg);
}

static void test_reset_reuse(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
    evd_expansion_t x;
    evd_change_t c1, c2;
    change_from(&c1, "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\","
                     "\"op\":\"TRUNCATE\"}");
    change_from(&c2, "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"products\","
                     "\"op\":\"DELETE\",\"old\":{\"id\":1}}");
    assert_int_equal(evd_expansion_init(&x, cfg->ntargets), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(evd_rules_expand(&cfg->rules, &c1, resolve, &r, &x), 0);
        assert_int_equal(x.widened, 2);
        evd_expansion_reset(&x);
        assert_int_equal(evd_rules_expand(&cfg->rules, &c2, resolve, &r, &x), 0);
        expect(&x, LIST(RX "products_list", RX "product_1"), LIST(CACHE_PAGE, CACHE_HEADER));
        assert_int_equal(x.widened, 0);
        assert_int_equal(x.matched, 1);
        assert_string_equal(x.widen_reason, "");
        evd_expansion_reset(&x);
    }
    evd_expansion_free(&x);
    evd_change_clear(&c1);
    evd_change_clear(&c2);
    resolver_free(&r);
    evd_config_free(cfg);
}

/* evd_keyvec_reset empties the vector and keeps its storage: strings pushed after it are intact. */
static void test_keyvec_reset(void **state)
{
    (void)state;
    evd_keyvec_t kv = {0};
    char key[300];
    for (int round = 0; round < 3; round++) {
        /* Long keys in later rounds: several chunks, and one past the kept chunk's size. */
        size_t n = round == 0 ? 8 : 200;
        for (size_t i = 0; i < n; i++) {
            int len = snprintf(key, sizeof(key), "k:%d:%zu:%0*d", round, i, (int)(round * 100), 0);
            assert_int_equal(evd_keyvec_push(&kv, key, (size_t)len), 0);
        }
        assert_int_equal(kv.n, n);
        for (size_t i = 0; i < n; i++) {
            snprintf(key, sizeof(key), "k:%d:%zu:%0*d", round, i, (int)(round * 100), 0);
            assert_string_equal(kv.v[i], key);
        }
        char **v = kv.v;
        evd_keyvec_reset(&kv);
        assert_int_equal(kv.n, 0);
        assert_ptr_equal(kv.v, v);
        assert_non_null(kv.chunks);
    }
    evd_keyvec_free(&kv);
    assert_null(kv.v);
    assert_null(kv.chunks);
}

/* ---- evd_rules_lookups ------------------------------------------------------------------ */

static void test_rules_lookups(void **state)
{
    (void)state;
    evd_config_t *cfg = cfg_sample("routex.json");
    evd_strv_t got = {0};
    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
           "\"old\":{\"product_id\":3,\"driver_id\":2},\"new\":{\"product_id\":4,"
           "\"driver_id\":5}}",
           &got);
    assert_strv_set(&got, LIST("driver_user_id(2)", "driver_user_id(5)"), "lookups");
    evd_strv_free(&got);

    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"INSERT\","
           "\"rows\":[{\"new\":{\"product_id\":3,\"driver_id\":7}},"
           "{\"new\":{\"product_id\":3,\"driver_id\":null}},"
           "{\"new\":{\"product_id\":3,\"driver_id\":8}}]}",
           &got);
    assert_strv_set(&got, LIST("driver_user_id(7)", "driver_user_id(8)"), "lookups");
    evd_strv_free(&got);

    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"DELETE\","
           "\"old\":{\"product_id\":3,\"driver_id\":null}}",
           &got);
    assert_int_equal(got.n, 0);
    needed(cfg, "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"TRUNCATE\"}", &got);
    assert_int_equal(got.n, 0);
    needed(cfg,
           "{\"v\":1,\"id\":1,\"ref\":true,\"schema\":\"public\",\"table\":\"shipments\","
           "\"op\":\"UPDATE\"}",
           &got);
    assert_int_equal(got.n, 0);
    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"products\",\"op\":\"INSERT\","
           "\"new\":{\"id\":3}}",
           &got);
    assert_int_equal(got.n, 0);
    evd_config_free(cfg);

    /* Args are rendered as SQL text parameters; lookups follow the image their templates
     * name and the rule's ops. */
    cfg = cfg_rules("[{\"table\": \"t\", \"lookups\": ["
                    "{\"as\": \"l2\", \"sql\": \"SELECT 1 WHERE $1 AND $2 = 0\", \"args\": [\"f\", \"b\"]},"
                    "{\"as\": \"ln\", \"sql\": \"SELECT $1\", \"args\": [\"a\"]},"
                    "{\"as\": \"lo\", \"sql\": \"SELECT $1\", \"args\": [\"a\"]}],"
                    " \"keys\": [\"k_{l2}\", \"n_{new.ln}\", \"o_{old.lo}\"]},"
                    " {\"table\": \"t\", \"on\": [\"DELETE\"], \"lookups\": ["
                    "{\"as\": \"ld\", \"sql\": \"SELECT $1\", \"args\": [\"a\"]}], \"keys\": [\"d_{ld}\"]}]");
    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
           "\"old\":{\"f\":false,\"b\":1,\"a\":\"x y\"},\"new\":{\"f\":true,\"b\":2,"
           "\"a\":\"z\"}}",
           &got);
    assert_strv_set(&got, LIST("l2(false|1)", "l2(true|2)", "ln(z)", "lo(x y)"), "lookups");
    evd_strv_free(&got);
    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\","
           "\"new\":{\"f\":true,\"b\":2,\"a\":\"z\"}}",
           &got);
    assert_strv_set(&got, LIST("l2(true|2)", "ln(z)"), "lookups");
    evd_strv_free(&got);
    needed(cfg,
           "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\","
           "\"old\":{\"f\":true,\"b\":2,\"a\":\"z\"}}",
           &got);
    assert_strv_set(&got, LIST("l2(true|2)", "lo(z)", "ld(z)"), "lookups");
    evd_strv_free(&got);
    evd_config_free(cfg);
}

/* Whatever expansion asks the resolver, evd_rules_lookups announced beforehand. */
static void test_lookups_cover_expand(void **state)
{
    (void)state;
    static const char *const payloads[] = {
        "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
        "\"old\":{\"product_id\":3,\"driver_id\":2},\"new\":{\"product_id\":4,\"driver_id\":5}}",
        "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"UPDATE\","
        "\"rows\":[{\"old\":{\"product_id\":3,\"driver_id\":9}},"
        "{\"new\":{\"product_id\":4,\"driver_id\":15}}]}",
        "{\"v\":1,\"id\":1,\"schema\":\"public\",\"table\":\"shipments\",\"op\":\"DELETE\","
        "\"old\":{\"product_id\":3,\"driver_id\":13}}",
    };
    evd_config_t *cfg = cfg_sample("routex.json");
    for (size_t i = 0; i < EVD_ARRAY_LEN(payloads); i++) {
        evd_strv_t need = {0};
        needed(cfg, payloads[i], &need);
        resolver_t r = {.tab = lk_tab, .ntab = EVD_ARRAY_LEN(lk_tab)};
        evd_expansion_t x;
        expand(cfg, payloads[i], resolve, &r, &x);
        assert_true(r.calls.n > 0);
        for (size_t k = 0; k < r.calls.n; k++) {
            bool found = false;
            for (size_t j = 0; j < need.n; j++)
                found |= strcmp(need.v[j], r.calls.v[k]) == 0;
            if (!found)
                fail_msg("payload %zu: expansion asked %s, not announced", i, r.calls.v[k]);
        }
        evd_expansion_free(&x);
        resolver_free(&r);
        evd_strv_free(&need);
    }
    evd_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compile_errors),
        cmocka_unit_test(test_compile_ok),
        cmocka_unit_test(test_literal_keys),
        cmocka_unit_test(test_col_each_image),
        cmocka_unit_test(test_old_new),
        cmocka_unit_test(test_absent_image),
        cmocka_unit_test(test_literal_braces),
        cmocka_unit_test(test_rendering),
        cmocka_unit_test(test_render_value),
        cmocka_unit_test(test_glob_escape_fn),
        cmocka_unit_test(test_null_value),
        cmocka_unit_test(test_missing_column_widens),
        cmocka_unit_test(test_truncate_widens),
        cmocka_unit_test(test_ref_widens),
        cmocka_unit_test(test_chunk_rows),
        cmocka_unit_test(test_chunk_unpaired),
        cmocka_unit_test(test_rules_and_on),
        cmocka_unit_test(test_targets),
        cmocka_unit_test(test_lookup_values),
        cmocka_unit_test(test_lookup_null_arg),
        cmocka_unit_test(test_lookup_failed),
        cmocka_unit_test(test_lookup_no_row),
        cmocka_unit_test(test_lookup_missing_arg),
        cmocka_unit_test(test_lookup_cross_product),
        cmocka_unit_test(test_lookup_used_twice),
        cmocka_unit_test(test_lookup_over_max_keys),
        cmocka_unit_test(test_glob_escaping),
        cmocka_unit_test(test_star_value_is_key),
        cmocka_unit_test(test_reset_reuse),
        cmocka_unit_test(test_keyvec_reset),
        cmocka_unit_test(test_rules_lookups),
        cmocka_unit_test(test_lookups_cover_expand),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
