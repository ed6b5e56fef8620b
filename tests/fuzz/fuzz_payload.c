/* fuzz_payload.c - libFuzzer harness for the change payload parser (SPEC "Change payload").
 *
 * The input is a raw NOTIFY payload / outbox row. evd_payload_parse must never crash, leak or
 * abort on it, and its result must keep the SPEC's promises:
 *   - the empty payload is a doorbell, nothing else is;
 *   - a rejected payload leaves the change cleared and gives a reason;
 *   - an accepted one has a known op, names of 1..63 bytes, and images that fit the op;
 *   - it agrees with the jansson reference parser (tests/unit/payload_cross.c: same verdict,
 *     same values; the SPEC admits a specialised parser only with such a cross-check);
 *   - the verdict does not depend on the size of the caller's error buffer;
 *   - values are NUL-terminated with no NUL inside, column names are unique;
 *   - an accepted change, written back by evd_change_to_json (the dead-letter form), parses
 *     again to the very same change.
 * An accepted change is then expanded through a fixed rule for its table (column, old./new.,
 * lookup and pattern templates), which feeds fuzzed row images to the expander.
 */
#include "fuzz_common.h"
#include "payload_cross.h"

static const char *const key_srcs[] = {
    "k:{id}",
    "k:{old.product_id}_{new.product_id}",
    "k:{driver_user_id}:{tags}",
    "k:list",
    "k:{name}:{flag}:{r}:{j}",
    "k:{pair}{{x}}{nullv}",
};
static const char *const pattern_srcs[] = {"p:{name}*", "p:{new.s}:{old.s}?", "p:{gone}"};
#define NKEYS (sizeof(key_srcs) / sizeof(key_srcs[0]))
#define NPATTERNS (sizeof(pattern_srcs) / sizeof(pattern_srcs[0]))

static evd_lookup_t lookups[FL_COUNT];
static evd_template_t keys[NKEYS], patterns[NPATTERNS];

static void init_rules(void)
{
    static int ready;
    if (ready)
        return;
    fuzz_lookups(lookups);
    char err[256];
    for (size_t i = 0; i < NKEYS; i++)
        FUZZ_CHECK(evd_template_compile(&keys[i], key_srcs[i], false, lookups, FL_COUNT, err, sizeof(err)) == 0);
    for (size_t i = 0; i < NPATTERNS; i++)
        FUZZ_CHECK(evd_template_compile(&patterns[i], pattern_srcs[i], true, lookups, FL_COUNT, err, sizeof(err)) == 0);
    ready = 1;
}

static void check_cleared(const evd_change_t *c)
{
    FUZZ_CHECK(c->arena == NULL && c->rows == NULL && c->nrows == 0);
    FUZZ_CHECK(c->id == -1 && c->tx == -1 && !c->ref && c->op == 0);
}

static void check_value(const evd_value_t *v)
{
    switch (v->type) {
    case EVD_V_NULL:
    case EVD_V_TRUE:
    case EVD_V_FALSE:
    case EVD_V_INT: FUZZ_CHECK(v->s == NULL); break;
    case EVD_V_REAL:
    case EVD_V_STR:
    case EVD_V_JSON:
        /* NUL-terminated, no NUL inside (SPEC: \u0000 is refused). */
        FUZZ_CHECK(v->s != NULL && strlen(v->s) == v->len);
        FUZZ_CHECK(v->type != EVD_V_JSON || v->s[0] == '{' || v->s[0] == '[');
        break;
    default: FUZZ_CHECK(!"unknown value type");
    }
}

static void check_image(const evd_image_t *img)
{
    FUZZ_CHECK(img->ncols == 0 || img->cols != NULL);
    for (uint32_t i = 0; i < img->ncols; i++) {
        const evd_col_t *col = &img->cols[i];
        FUZZ_CHECK(col->name != NULL && strlen(col->name) == col->nlen);
        check_value(&col->v);
        /* Column names are unique: the lookup finds this very column. */
        FUZZ_CHECK(evd_image_get(img, col->name, col->nlen) == &col->v);
    }
}

static void check_change(const evd_change_t *c)
{
    FUZZ_CHECK(c->arena != NULL);
    FUZZ_CHECK(c->op == EVD_OP_INSERT || c->op == EVD_OP_UPDATE || c->op == EVD_OP_DELETE || c->op == EVD_OP_TRUNCATE);
    size_t sl = strnlen(c->schema, sizeof(c->schema)), tl = strnlen(c->table, sizeof(c->table));
    FUZZ_CHECK(sl >= 1 && sl < sizeof(c->schema) && tl >= 1 && tl < sizeof(c->table));
    FUZZ_CHECK(c->id == -1 || c->id > 0);
    if (c->ref || c->op == EVD_OP_TRUNCATE) {
        FUZZ_CHECK(c->nrows == 0 && c->rows == NULL);
        return;
    }
    FUZZ_CHECK(c->nrows >= 1 && c->nrows <= 500 && c->rows != NULL);
    for (size_t i = 0; i < c->nrows; i++) {
        const evd_row_t *r = &c->rows[i];
        if (r->old_img)
            check_image(r->old_img);
        if (r->new_img)
            check_image(r->new_img);
        switch (c->op) {
        case EVD_OP_INSERT: FUZZ_CHECK(!r->old_img && r->new_img); break;
        case EVD_OP_DELETE: FUZZ_CHECK(r->old_img && !r->new_img); break;
        default:
            /* UPDATE: both images, except unpaired rows of a statement chunk. */
            FUZZ_CHECK(r->old_img || r->new_img);
            break;
        }
    }
}

static bool same_value(const evd_value_t *a, const evd_value_t *b)
{
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case EVD_V_INT: return a->i == b->i;
    case EVD_V_REAL:
    case EVD_V_STR:
    case EVD_V_JSON: return a->len == b->len && memcmp(a->s, b->s, a->len) == 0;
    default: return true;
    }
}

static bool same_image(const evd_image_t *a, const evd_image_t *b)
{
    if (!a || !b)
        return !a && !b;
    if (a->ncols != b->ncols)
        return false;
    for (uint32_t i = 0; i < a->ncols; i++) {
        if (a->cols[i].nlen != b->cols[i].nlen || memcmp(a->cols[i].name, b->cols[i].name, a->cols[i].nlen) ||
            !same_value(&a->cols[i].v, &b->cols[i].v))
            return false;
    }
    return true;
}

/* The dead-letter form (evd_change_to_json) parses back to the very same change, every value
 * included (payload_cross_check compares only the header). */
static void check_roundtrip(const evd_change_t *c)
{
    evd_buf_t out = {0};
    FUZZ_CHECK(evd_change_to_json(c, &out) == 0 && out.data != NULL);
    evd_change_t c2;
    char err[256];
    evd_payload_status_t st = evd_payload_parse(out.data, out.len, &c2, err, sizeof(err));
    if (st != EVD_PAYLOAD_OK)
        fprintf(stderr, "re-parse rejected: %s\n%s\n", err, out.data);
    FUZZ_CHECK(st == EVD_PAYLOAD_OK);
    FUZZ_CHECK(c2.id == c->id && c2.op == c->op && c2.ref == c->ref && c2.has_ts == c->has_ts);
    FUZZ_CHECK(c->tx < 0 || c2.tx == c->tx);
    FUZZ_CHECK(!c->has_ts || c2.ts == c->ts);
    FUZZ_CHECK(strcmp(c2.schema, c->schema) == 0 && strcmp(c2.table, c->table) == 0);
    FUZZ_CHECK(c2.nrows == c->nrows);
    for (size_t i = 0; i < c->nrows; i++) {
        FUZZ_CHECK(same_image(c2.rows[i].old_img, c->rows[i].old_img));
        FUZZ_CHECK(same_image(c2.rows[i].new_img, c->rows[i].new_img));
    }
    evd_change_clear(&c2);
    check_cleared(&c2);
    evd_buf_free(&out);
}

static void expand(const evd_change_t *c)
{
    init_rules();
    int targets[2] = {0, 1};
    evd_rule_t rule = {
        .schema = (char *)c->schema,
        .table = (char *)c->table,
        .ops = EVD_OP_ALL,
        .targets = targets,
        .ntargets = 2,
        .lookups = lookups,
        .nlookups = FL_COUNT,
        .keys = keys,
        .nkeys = NKEYS,
        .patterns = patterns,
        .npatterns = NPATTERNS,
        .durable = -1,
    };
    evd_rules_t rs = {.v = &rule, .n = 1, .max_keys = 16};
    FUZZ_CHECK(evd_rules_watches(&rs, c->schema, c->table));
    FUZZ_CHECK(evd_rules_lookups(&rs, c, fuzz_need, NULL) == 0);
    evd_expansion_t x;
    FUZZ_CHECK(evd_expansion_init(&x, 2) == 0);
    FUZZ_CHECK(evd_rules_expand(&rs, c, fuzz_resolve, NULL, &x) == 0);
    FUZZ_CHECK(x.matched == 1);
    for (size_t t = 0; t < 2; t++) {
        fuzz_check_unique(x.per_target[t].keys.v, x.per_target[t].keys.n);
        fuzz_check_unique(x.per_target[t].patterns.v, x.per_target[t].patterns.n);
    }
    /* Row values never escape the literal prefix of a key or pattern. */
    for (size_t i = 0; i < x.per_target[0].keys.n; i++)
        FUZZ_CHECK(strncmp(x.per_target[0].keys.v[i], "k:", 2) == 0);
    for (size_t i = 0; i < x.per_target[0].patterns.n; i++)
        FUZZ_CHECK(strncmp(x.per_target[0].patterns.v[i], "k:", 2) == 0 ||
                   strncmp(x.per_target[0].patterns.v[i], "p:", 2) == 0);
    evd_expansion_free(&x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The one-pass parser against the jansson reference (tests/unit/payload_cross.c): same
     * verdict, same values. */
    char why[512];
    if (payload_cross_check(data, size, why, sizeof(why)) != 0) {
        fprintf(stderr, "payload parser and jansson reference disagree: %s\n", why);
        abort();
    }

    evd_change_t c;
    char err[256];
    err[0] = '\0';
    evd_payload_status_t st = evd_payload_parse((const char *)data, size, &c, err, sizeof(err));
    switch (st) {
    case EVD_PAYLOAD_DOORBELL:
        FUZZ_CHECK(size == 0);
        check_cleared(&c);
        break;
    case EVD_PAYLOAD_BAD: {
        FUZZ_CHECK(size > 0);
        FUZZ_CHECK(err[0] != '\0' && strlen(err) < sizeof(err));
        check_cleared(&c);
        /* The verdict does not depend on how much of the reason fits in err. */
        char tiny[1];
        FUZZ_CHECK(evd_payload_parse((const char *)data, size, &c, tiny, sizeof(tiny)) == EVD_PAYLOAD_BAD);
        check_cleared(&c);
        break;
    }
    case EVD_PAYLOAD_OK:
        FUZZ_CHECK(size > 0);
        check_change(&c);
        check_roundtrip(&c);
        expand(&c);
        break;
    default: FUZZ_CHECK(!"unknown status");
    }
    evd_change_clear(&c);
    check_cleared(&c);
    return 0;
}
