/* fuzz_template.c - libFuzzer harness for the key template compiler and the expander.
 *
 * The input is one template (bytes up to the first NUL). It is compiled twice, as a key template
 * and as a pattern (the "patterns" mode), against a fixed set of lookups, and each compiled
 * template is expanded against fixed changes (UPDATE, INSERT, DELETE, TRUNCATE, an oversize
 * reference and an unpaired statement chunk) with a fixed resolver. Invariants checked:
 *   - a failed compile leaves the template zeroed and gives a reason;
 *   - the compiled parts print back to exactly the source ({{ and }} re-doubled);
 *   - expansions hold no duplicates, keep the template's literal prefix, and a widened key
 *     template holds no unescaped glob metacharacter but '*'.
 */
#include "fuzz_common.h"

/* Prints the compiled parts back as template source. */
static void unparse(const evd_template_t *t, evd_buf_t *b)
{
    for (size_t i = 0; i < t->nparts; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        int rc = 0;
        FUZZ_CHECK(p->text != NULL && strlen(p->text) == p->len);
        if (p->is_ref) {
            FUZZ_CHECK(p->len > 0);
            rc |= evd_buf_putc(b, '{');
            if (p->img == EVD_IMG_OLD)
                rc |= evd_buf_puts(b, "old.");
            else if (p->img == EVD_IMG_NEW)
                rc |= evd_buf_puts(b, "new.");
            rc |= evd_buf_append(b, p->text, p->len);
            rc |= evd_buf_putc(b, '}');
        } else {
            FUZZ_CHECK(p->len > 0 && p->lookup == -1);
            for (size_t k = 0; k < p->len; k++) {
                char c = p->text[k];
                rc |= evd_buf_putc(b, c);
                if (c == '{' || c == '}')
                    rc |= evd_buf_putc(b, c);
            }
        }
        FUZZ_CHECK(rc == 0);
    }
}

static void check_compiled(const evd_template_t *t, const char *src, bool is_pattern, const evd_lookup_t *lookups,
                           size_t nlookups)
{
    FUZZ_CHECK(t->src != NULL && strcmp(t->src, src) == 0);
    FUZZ_CHECK(t->is_pattern == is_pattern);
    FUZZ_CHECK(t->nparts >= 1 && t->nparts <= 64);
    bool any = false, old = false, nw = false;
    for (size_t i = 0; i < t->nparts; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        if (!p->is_ref)
            continue;
        any |= p->img == EVD_IMG_ANY;
        old |= p->img == EVD_IMG_OLD;
        nw |= p->img == EVD_IMG_NEW;
        if (p->lookup >= 0) {
            FUZZ_CHECK((size_t)p->lookup < nlookups);
            FUZZ_CHECK(strcmp(lookups[p->lookup].as, p->text) == 0);
        } else {
            for (size_t k = 0; k < nlookups; k++)
                FUZZ_CHECK(strcmp(lookups[k].as, p->text) != 0);
        }
    }
    FUZZ_CHECK(t->has_any == any && t->has_old == old && t->has_new == nw);
    evd_buf_t b = {0};
    unparse(t, &b);
    FUZZ_CHECK(b.len == strlen(src) && memcmp(b.data, src, b.len) == 0);
    evd_buf_free(&b);
}

static void run_mode(const char *src, bool is_pattern, evd_lookup_t *lookups)
{
    evd_template_t t;
    char err[512];
    err[0] = '\0';
    if (evd_template_compile(&t, src, is_pattern, lookups, FL_COUNT, err, sizeof(err)) < 0) {
        static const evd_template_t zero;
        FUZZ_CHECK(memcmp(&t, &zero, sizeof(t)) == 0);
        FUZZ_CHECK(err[0] != '\0' && strlen(err) < sizeof(err));
        return;
    }
    check_compiled(&t, src, is_pattern, lookups, FL_COUNT);

    static char schema[] = "public", table[] = "t";
    int targets[2] = {0, 1};
    evd_rule_t rule = {
        .schema = schema,
        .table = table,
        .ops = EVD_OP_ALL,
        .targets = targets,
        .ntargets = 2,
        .lookups = lookups,
        .nlookups = FL_COUNT,
        .durable = -1,
    };
    if (is_pattern) {
        rule.patterns = &t;
        rule.npatterns = 1;
    } else {
        rule.keys = &t;
        rule.nkeys = 1;
    }
    /* A small cap, so that lookup cross products ({tags}{tags}) reach it. */
    evd_rules_t rs = {.v = &rule, .n = 1, .max_keys = 8};

    const evd_change_t *changes = fuzz_changes();
    evd_expansion_t x;
    FUZZ_CHECK(evd_expansion_init(&x, 2) == 0);
    for (size_t i = 0; i < FUZZ_NCHANGES; i++) {
        evd_expansion_reset(&x);
        FUZZ_CHECK(evd_rules_lookups(&rs, &changes[i], fuzz_need, NULL) == 0);
        FUZZ_CHECK(evd_rules_expand(&rs, &changes[i], fuzz_resolve, NULL, &x) == 0);
        FUZZ_CHECK(x.matched == 1);
        fuzz_check_expansion(&x, &t);
    }
    evd_expansion_free(&x);
    FUZZ_CHECK(evd_rules_watches(&rs, "public", "t"));
    evd_template_free(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    evd_lookup_t lookups[FL_COUNT];
    fuzz_lookups(lookups);
    char *src = malloc(size + 1);
    if (!src)
        return 0;
    memcpy(src, data, size);
    src[size] = '\0';
    run_mode(src, false, lookups);
    run_mode(src, true, lookups);
    free(src);
    return 0;
}
