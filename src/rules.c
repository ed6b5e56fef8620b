/* rules.c - compiles key templates once and expands a change into keys and patterns. Pure. */
#include "rules.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PARTS 64

static bool name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '$';
}

int evd_template_compile(evd_template_t *t, const char *src, bool is_pattern, const evd_lookup_t *lookups,
                         size_t nlookups, char *err, size_t errlen)
{
    memset(t, 0, sizeof(*t));
    size_t n = strlen(src);
    evd_tpl_part_t parts[MAX_PARTS];
    size_t np = 0;
    /* Every part's text fits in the source length plus one NUL per part. */
    char *store = malloc(n + MAX_PARTS + 1);
    char *copy = strdup(src);
    if (!store || !copy) {
        free(store);
        free(copy);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    size_t sp = 0;
    size_t i = 0;
    bool in_literal = false;
    while (i < n) {
        char c = src[i];
        if (c == '{' && i + 1 < n && src[i + 1] == '{') {
            c = '{';
            i += 2;
        } else if (c == '}' && i + 1 < n && src[i + 1] == '}') {
            c = '}';
            i += 2;
        } else if (c == '}') {
            snprintf(err, errlen, "unbalanced '}' at offset %zu in \"%s\" (write '}}' for a literal brace)", i, src);
            goto fail;
        } else if (c == '{') {
            size_t j = i + 1;
            while (j < n && src[j] != '}' && src[j] != '{')
                j++;
            if (j >= n || src[j] != '}') {
                snprintf(err, errlen, "unbalanced '{' at offset %zu in \"%s\"", i, src);
                goto fail;
            }
            const char *name = src + i + 1;
            size_t len = j - i - 1;
            evd_img_t img = EVD_IMG_ANY;
            if (len >= 4 && memcmp(name, "old.", 4) == 0) {
                img = EVD_IMG_OLD;
                name += 4;
                len -= 4;
            } else if (len >= 4 && memcmp(name, "new.", 4) == 0) {
                img = EVD_IMG_NEW;
                name += 4;
                len -= 4;
            }
            if (len == 0) {
                snprintf(err, errlen, "empty name in '{}' at offset %zu in \"%s\"", i, src);
                goto fail;
            }
            for (size_t k = 0; k < len; k++) {
                if (!name_char(name[k])) {
                    /* the whole character, when it is a multi-byte one */
                    size_t cl = evd_utf8_len((const unsigned char *)name + k, len - k);
                    snprintf(err, errlen, "bad character '%.*s' in name at offset %zu in \"%s\"", cl ? (int)cl : 1,
                             name + k, (size_t)(name + k - src), src);
                    goto fail;
                }
            }
            if (np == MAX_PARTS) {
                snprintf(err, errlen, "too many parts (max %d) in \"%s\"", MAX_PARTS, src);
                goto fail;
            }
            evd_tpl_part_t *p = &parts[np++];
            p->is_ref = true;
            p->img = img;
            p->lookup = -1;
            p->text = store + sp;
            p->len = len;
            memcpy(store + sp, name, len);
            store[sp + len] = '\0';
            sp += len + 1;
            for (size_t k = 0; k < nlookups; k++) {
                if (strlen(lookups[k].as) == len && memcmp(lookups[k].as, name, len) == 0)
                    p->lookup = (int)k;
            }
            if (img == EVD_IMG_ANY)
                t->has_any = true;
            else if (img == EVD_IMG_OLD)
                t->has_old = true;
            else
                t->has_new = true;
            in_literal = false;
            i = j + 1;
            continue;
        } else {
            i++;
        }
        /* A literal character (c). */
        if (!in_literal) {
            if (np == MAX_PARTS) {
                snprintf(err, errlen, "too many parts (max %d) in \"%s\"", MAX_PARTS, src);
                goto fail;
            }
            evd_tpl_part_t *p = &parts[np++];
            p->is_ref = false;
            p->lookup = -1;
            p->img = EVD_IMG_ANY;
            p->text = store + sp;
            p->len = 0;
            in_literal = true;
        }
        store[sp++] = c;
        parts[np - 1].len++;
        store[sp] = '\0';
        if (i >= n || src[i] == '{' || src[i] == '}') {
            /* Terminate the literal; a following literal brace pair re-opens it. */
            sp++;
            in_literal = false;
        }
    }
    if (n == 0) {
        snprintf(err, errlen, "empty template");
        goto fail;
    }
    t->parts = malloc((np ? np : 1) * sizeof(*t->parts));
    if (!t->parts) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    memcpy(t->parts, parts, np * sizeof(*parts));
    t->nparts = np;
    t->src = copy;
    t->store = store;
    t->is_pattern = is_pattern;
    return 0;
fail:
    free(store);
    free(copy);
    memset(t, 0, sizeof(*t));
    return -EINVAL;
}

void evd_template_free(evd_template_t *t)
{
    free(t->src);
    free(t->parts);
    free(t->store);
    memset(t, 0, sizeof(*t));
}

void evd_rule_free(evd_rule_t *r)
{
    free(r->schema);
    free(r->table);
    free(r->targets);
    for (size_t i = 0; i < r->nlookups; i++) {
        free(r->lookups[i].as);
        free(r->lookups[i].sql);
        for (size_t j = 0; j < r->lookups[i].nargs; j++)
            free(r->lookups[i].args[j]);
        free(r->lookups[i].args);
    }
    free(r->lookups);
    for (size_t i = 0; i < r->nkeys; i++)
        evd_template_free(&r->keys[i]);
    free(r->keys);
    for (size_t i = 0; i < r->npatterns; i++)
        evd_template_free(&r->patterns[i]);
    free(r->patterns);
    memset(r, 0, sizeof(*r));
}

void evd_rules_free(evd_rules_t *rs)
{
    for (size_t i = 0; i < rs->n; i++)
        evd_rule_free(&rs->v[i]);
    free(rs->v);
    rs->v = NULL;
    rs->n = 0;
}

static bool rule_names(const evd_rule_t *r, const char *schema, const char *table)
{
    return strcmp(r->table, table) == 0 && strcmp(r->schema, schema) == 0;
}

bool evd_rules_watches(const evd_rules_t *rs, const char *schema, const char *table)
{
    for (size_t i = 0; i < rs->n; i++)
        if (rule_names(&rs->v[i], schema, table))
            return true;
    return false;
}

/* Formats a double the way Python's repr() does: the shortest digits that read back the same,
 * positional for decimal exponents -4..15 (always with a fraction, "100.0"), else "1e+16". */
static int render_real(double d, evd_buf_t *b)
{
    char tmp[400];
    if (isnan(d))
        return evd_buf_puts(b, "nan");
    if (isinf(d))
        return evd_buf_puts(b, d > 0 ? "inf" : "-inf");
    int prec;
    for (prec = 1; prec < 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, d);
        if (strtod(tmp, NULL) == d)
            break;
    }
    snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, d);
    int exp = atoi(strchr(tmp, 'e') + 1);
    if (exp >= -4 && exp < 16) {
        int frac = prec - 1 - exp;
        snprintf(tmp, sizeof(tmp), "%.*f", frac > 0 ? frac : 1, d);
    }
    return evd_buf_puts(b, tmp);
}

int evd_render_value(const evd_value_t *v, evd_buf_t *b)
{
    switch (v->type) {
    case EVD_V_NULL: return 1;
    case EVD_V_INT: {
        /* Decimal, as Python's str(int). */
        char tmp[24];
        char *e = tmp + sizeof(tmp), *q = e;
        uint64_t u = v->i < 0 ? (uint64_t)0 - (uint64_t)v->i : (uint64_t)v->i;
        do
            *--q = (char)('0' + u % 10);
        while ((u /= 10) != 0);
        if (v->i < 0)
            *--q = '-';
        return evd_buf_append(b, q, (size_t)(e - q));
    }
    case EVD_V_STR:
    case EVD_V_JSON: /* json/jsonb values as compact JSON */ return evd_buf_append(b, v->s, v->len);
    case EVD_V_REAL: return render_real(v->d, b);
    case EVD_V_TRUE: return evd_buf_puts(b, "True");
    case EVD_V_FALSE: return evd_buf_puts(b, "False");
    default: return -EINVAL;
    }
}

/* Renders a value as a SQL text parameter (booleans as true/false). */
static int render_param(const evd_value_t *v, evd_buf_t *b)
{
    if (v->type == EVD_V_TRUE)
        return evd_buf_puts(b, "true");
    if (v->type == EVD_V_FALSE)
        return evd_buf_puts(b, "false");
    return evd_render_value(v, b);
}

int evd_glob_escape(evd_buf_t *b, const char *s, size_t n)
{
    if (evd_buf_reserve(b, n * 2) < 0)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\')
            b->data[b->len++] = '\\';
        b->data[b->len++] = c;
    }
    b->data[b->len] = '\0';
    return 0;
}

int evd_expansion_init(evd_expansion_t *x, size_t ntargets)
{
    memset(x, 0, sizeof(*x));
    x->per_target = calloc(ntargets ? ntargets : 1, sizeof(*x->per_target));
    if (!x->per_target)
        return -ENOMEM;
    x->ntargets = ntargets;
    return 0;
}

static void keyset_reset(evd_keyset_t *k)
{
    evd_keyvec_reset(&k->keys);
    evd_keyvec_reset(&k->patterns);
    evd_set_clear(&k->seen_keys);
    evd_set_clear(&k->seen_patterns);
}

void evd_expansion_reset(evd_expansion_t *x)
{
    for (size_t i = 0; i < x->ntargets; i++)
        keyset_reset(&x->per_target[i]);
    x->matched = 0;
    x->widened = 0;
    x->widen_reason[0] = '\0';
}

void evd_expansion_free(evd_expansion_t *x)
{
    for (size_t i = 0; i < x->ntargets; i++) {
        evd_keyset_t *k = &x->per_target[i];
        evd_keyvec_free(&k->keys);
        evd_keyvec_free(&k->patterns);
        evd_set_free(&k->seen_keys);
        evd_set_free(&k->seen_patterns);
    }
    free(x->per_target);
    memset(x, 0, sizeof(*x));
}

/* Expansion context for one rule. */
typedef struct ectx {
    const evd_rules_t *rs;
    const evd_rule_t *rule;
    const evd_change_t *c;
    evd_lookup_resolve_fn resolve;
    void *ud;
    evd_expansion_t *x;
    evd_buf_t buf;
    evd_buf_t scratch;
} ectx_t;

/* A change yields a handful of keys: a linear scan deduplicates them faster than hashing; the
 * hash set takes over past LINEAR_DEDUP entries (multi-row chunks, lookup cross products). */
#define LINEAR_DEDUP 32

static int add_unique(evd_keyvec_t *sv, evd_set_t *seen, const char *s, size_t n)
{
    if (sv->n < LINEAR_DEDUP) {
        for (size_t i = 0; i < sv->n; i++)
            if (strncmp(sv->v[i], s, n) == 0 && sv->v[i][n] == '\0')
                return 0;
    } else {
        if (seen->n == 0)
            for (size_t i = 0; i < sv->n; i++)
                if (evd_set_add(seen, sv->v[i], strlen(sv->v[i])) < 0)
                    return -ENOMEM;
        int rc = evd_set_add(seen, s, n);
        if (rc <= 0)
            return rc;
    }
    return evd_keyvec_push(sv, s, n) < 0 ? -ENOMEM : 1;
}

static int emit(ectx_t *e, const char *s, size_t n, bool pattern)
{
    for (size_t i = 0; i < e->rule->ntargets; i++) {
        evd_keyset_t *k = &e->x->per_target[e->rule->targets[i]];
        int rc =
            pattern ? add_unique(&k->patterns, &k->seen_patterns, s, n) : add_unique(&k->keys, &k->seen_keys, s, n);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void note_widen(ectx_t *e, const evd_template_t *t, const char *why, const char *name)
{
    e->x->widened++;
    if (!e->x->widen_reason[0])
        snprintf(e->x->widen_reason, sizeof(e->x->widen_reason), "%s%s%s in \"%s\"", why, name ? " " : "",
                 name ? name : "", t->src);
}

/* Emits t as a pattern with every unknown part as '*'. vals[i] holds the rendered known value of
 * column part i, or NULL. Literal text of key templates and all row values are glob-escaped. */
static int emit_widened(ectx_t *e, const evd_template_t *t, const char *const *vals, const size_t *lens)
{
    evd_buf_t *b = &e->buf;
    evd_buf_reset(b);
    bool last_star = false;
    for (size_t i = 0; i < t->nparts; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        int rc;
        if (!p->is_ref) {
            rc = t->is_pattern ? evd_buf_append(b, p->text, p->len) : evd_glob_escape(b, p->text, p->len);
            last_star = false;
        } else if (vals && vals[i]) {
            rc = evd_glob_escape(b, vals[i], lens[i]);
            last_star = false;
        } else {
            rc = last_star ? 0 : evd_buf_putc(b, '*');
            last_star = true;
        }
        if (rc < 0)
            return rc;
    }
    return emit(e, b->data ? b->data : "", b->len, true);
}

static const evd_image_t *image_for(const evd_tpl_part_t *p, const evd_image_t *any, const evd_row_t *row)
{
    switch (p->img) {
    case EVD_IMG_OLD: return row->old_img;
    case EVD_IMG_NEW: return row->new_img;
    default: return any;
    }
}

/* One expansion of template t for a row, with `any` the image for unqualified refs. */
static int expand_one(ectx_t *e, const evd_template_t *t, const evd_row_t *row, const evd_image_t *any)
{
    const char *vals[MAX_PARTS];
    size_t lens[MAX_PARTS];
    const evd_lookup_vals_t *lv[MAX_PARTS];
    size_t offs[MAX_PARTS];
    bool unknown = false;
    const char *why = NULL, *name = NULL;
    evd_buf_t *sc = &e->scratch;
    evd_buf_reset(sc);

    /* Columns first: a NULL value means no key; a missing column widens. */
    for (size_t i = 0; i < t->nparts; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        vals[i] = NULL;
        lv[i] = NULL;
        if (!p->is_ref || p->lookup >= 0)
            continue;
        const evd_image_t *img = image_for(p, any, row);
        const evd_value_t *v = img ? evd_image_get(img, p->text, p->len) : NULL;
        if (!v) {
            unknown = true;
            why = img ? "column not captured:" : "image missing for";
            name = p->text;
            continue;
        }
        if (v->type == EVD_V_NULL)
            return 0;
        offs[i] = sc->len;
        int rc = evd_render_value(v, sc);
        if (rc < 0)
            return rc == -EINVAL ? 0 : rc;
        lens[i] = sc->len - offs[i];
        if (evd_buf_putc(sc, '\0') < 0)
            return -ENOMEM;
    }
    /* Lookups: NULL args mean no key; failures and empty results widen. */
    for (size_t i = 0; i < t->nparts && !unknown; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        if (!p->is_ref || p->lookup < 0)
            continue;
        const evd_image_t *img = image_for(p, any, row);
        const evd_lookup_t *lk = &e->rule->lookups[p->lookup];
        const char *args[16];
        evd_buf_t ab = {0};
        size_t aoff[16];
        bool missing = false;
        for (size_t a = 0; a < lk->nargs && a < 16; a++) {
            const evd_value_t *v = img ? evd_image_get(img, lk->args[a], strlen(lk->args[a])) : NULL;
            if (!v) {
                missing = true;
                name = lk->args[a];
                break;
            }
            if (v->type == EVD_V_NULL) {
                evd_buf_free(&ab);
                return 0;
            }
            aoff[a] = ab.len;
            if (render_param(v, &ab) < 0 || evd_buf_putc(&ab, '\0') < 0) {
                evd_buf_free(&ab);
                return -ENOMEM;
            }
        }
        if (missing) {
            evd_buf_free(&ab);
            unknown = true;
            why = img ? "lookup argument not captured:" : "image missing for";
            break;
        }
        for (size_t a = 0; a < lk->nargs && a < 16; a++)
            args[a] = ab.data + aoff[a];
        const evd_lookup_vals_t *res =
            e->resolve ? e->resolve(e->ud, e->rule, (size_t)p->lookup, args, lk->nargs) : NULL;
        evd_buf_free(&ab);
        if (!res || res->status < 0 || res->n == 0) {
            unknown = true;
            why = !res || res->status < 0 ? "lookup failed:" : "lookup found no row:";
            name = lk->as;
            break;
        }
        lv[i] = res;
    }
    /* Column pointers are taken only now: the scratch buffer may have moved while growing. */
    for (size_t i = 0; i < t->nparts; i++) {
        const evd_tpl_part_t *p = &t->parts[i];
        if (p->is_ref && p->lookup < 0) {
            const evd_image_t *img = image_for(p, any, row);
            if (img && evd_image_get(img, p->text, p->len))
                vals[i] = sc->data + offs[i];
        }
    }
    if (unknown) {
        note_widen(e, t, why, name);
        return emit_widened(e, t, vals, lens);
    }

    /* Cross product over multi-valued lookups, capped at max_keys per image. A lookup used twice
     * with the same arguments ({u}:{u}) is one factor: each of its values fills both places, as
     * in the f-string Django's code would format. */
    size_t same[MAX_PARTS]; /* the first part of the same lookup on the same image (same args) */
    for (size_t i = 0; i < t->nparts; i++) {
        same[i] = i;
        for (size_t j = 0; lv[i] && j < i; j++)
            if (lv[j] && t->parts[j].lookup == t->parts[i].lookup &&
                image_for(&t->parts[j], any, row) == image_for(&t->parts[i], any, row)) {
                same[i] = j;
                break;
            }
    }
    size_t total = 1;
    for (size_t i = 0; i < t->nparts; i++) {
        if (!lv[i] || same[i] != i)
            continue;
        total *= lv[i]->n;
        if (total > e->rs->max_keys) {
            note_widen(e, t, "lookup results exceed batch.max_keys:", e->rule->lookups[t->parts[i].lookup].as);
            for (size_t j = 0; j < t->nparts; j++)
                if (lv[j])
                    vals[j] = NULL;
            return emit_widened(e, t, vals, lens);
        }
    }
    size_t pick[MAX_PARTS];
    for (size_t combo = 0; combo < total; combo++) {
        evd_buf_t *b = &e->buf;
        evd_buf_reset(b);
        size_t rem = combo;
        bool skip = false;
        for (size_t i = 0; i < t->nparts; i++) {
            const evd_tpl_part_t *p = &t->parts[i];
            int rc;
            if (!p->is_ref) {
                rc = evd_buf_append(b, p->text, p->len);
            } else if (lv[i]) {
                if (same[i] == i) {
                    pick[i] = rem % lv[i]->n;
                    rem /= lv[i]->n;
                }
                const char *v = lv[i]->v[pick[same[i]]];
                if (!v) {
                    skip = true;
                    break;
                }
                rc = t->is_pattern ? evd_glob_escape(b, v, strlen(v)) : evd_buf_puts(b, v);
            } else {
                rc = t->is_pattern ? evd_glob_escape(b, vals[i], lens[i]) : evd_buf_append(b, vals[i], lens[i]);
            }
            if (rc < 0)
                return rc;
        }
        if (skip)
            continue;
        int rc = emit(e, b->data ? b->data : "", b->len, t->is_pattern);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int expand_template(ectx_t *e, const evd_template_t *t)
{
    const evd_change_t *c = e->c;
    bool has_refs = t->has_any || t->has_old || t->has_new;
    if (!has_refs) {
        /* A literal: a key (or pattern) that every change of this table and op invalidates. */
        evd_buf_reset(&e->buf);
        for (size_t i = 0; i < t->nparts; i++)
            if (evd_buf_append(&e->buf, t->parts[i].text, t->parts[i].len) < 0)
                return -ENOMEM;
        return emit(e, e->buf.data ? e->buf.data : "", e->buf.len, t->is_pattern);
    }
    /* A template naming an image the op never carries yields no key, also for an oversize
     * reference (whose images are unknown, not absent). */
    if ((t->has_old && c->op == EVD_OP_INSERT) || (t->has_new && c->op == EVD_OP_DELETE))
        return 0;
    if (c->op == EVD_OP_TRUNCATE || c->ref) {
        note_widen(e, t, c->ref ? "oversize change" : "truncate", NULL);
        return emit_widened(e, t, NULL, NULL);
    }
    /* Unpaired UPDATE rows of a chunk carry one image each. A template naming only that image
     * (or none, {col}) expands from the rows that carry it and the others add nothing; only a
     * template mixing images lacks a value and widens (in expand_one). */
    bool one_img = !t->has_any && t->has_old != t->has_new;
    for (size_t r = 0; r < c->nrows; r++) {
        const evd_row_t *row = &c->rows[r];
        int rc;
        if (one_img && !(t->has_old ? row->old_img : row->new_img))
            continue;
        if (t->has_any) {
            if (row->old_img && (rc = expand_one(e, t, row, row->old_img)) < 0)
                return rc;
            if (row->new_img && (rc = expand_one(e, t, row, row->new_img)) < 0)
                return rc;
        } else if ((rc = expand_one(e, t, row, NULL)) < 0) {
            return rc;
        }
    }
    return 0;
}

int evd_rules_expand(const evd_rules_t *rs, const evd_change_t *c, evd_lookup_resolve_fn resolve, void *ud,
                     evd_expansion_t *x)
{
    ectx_t e = {.rs = rs, .c = c, .resolve = resolve, .ud = ud, .x = x};
    int rc = 0;
    for (size_t i = 0; i < rs->n && rc == 0; i++) {
        const evd_rule_t *r = &rs->v[i];
        if (!(r->ops & c->op) || !rule_names(r, c->schema, c->table))
            continue;
        x->matched++;
        e.rule = r;
        for (size_t k = 0; k < r->nkeys && rc == 0; k++)
            rc = expand_template(&e, &r->keys[k]);
        for (size_t k = 0; k < r->npatterns && rc == 0; k++)
            rc = expand_template(&e, &r->patterns[k]);
    }
    evd_buf_free(&e.buf);
    evd_buf_free(&e.scratch);
    return rc;
}

/* The images lookup l of rule r is used with: bit 0 old, bit 1 new. */
static unsigned lookup_images(const evd_rule_t *r, size_t l)
{
    unsigned m = 0;
    for (size_t k = 0; k < r->nkeys + r->npatterns; k++) {
        const evd_template_t *t = k < r->nkeys ? &r->keys[k] : &r->patterns[k - r->nkeys];
        for (size_t p = 0; p < t->nparts; p++) {
            const evd_tpl_part_t *pt = &t->parts[p];
            if (pt->is_ref && pt->lookup == (int)l)
                m |= pt->img == EVD_IMG_OLD ? 1u : pt->img == EVD_IMG_NEW ? 2u : 3u;
        }
    }
    return m;
}

int evd_rules_lookups(const evd_rules_t *rs, const evd_change_t *c, evd_lookup_need_fn fn, void *ud)
{
    if (c->op == EVD_OP_TRUNCATE || c->ref)
        return 0;
    evd_buf_t ab = {0};
    int rc = 0;
    for (size_t i = 0; i < rs->n && rc == 0; i++) {
        const evd_rule_t *r = &rs->v[i];
        if (!r->nlookups || !(r->ops & c->op) || !rule_names(r, c->schema, c->table))
            continue;
        for (size_t row = 0; row < c->nrows && rc == 0; row++) {
            const evd_image_t *imgs[2] = {c->rows[row].old_img, c->rows[row].new_img};
            for (int im = 0; im < 2 && rc == 0; im++) {
                if (!imgs[im])
                    continue;
                for (size_t l = 0; l < r->nlookups && rc == 0; l++) {
                    const evd_lookup_t *lk = &r->lookups[l];
                    if (!(lookup_images(r, l) & (1u << im)))
                        continue;
                    const char *args[16];
                    size_t aoff[16];
                    bool ok = true;
                    evd_buf_reset(&ab);
                    for (size_t a = 0; a < lk->nargs && a < 16; a++) {
                        const evd_value_t *v = evd_image_get(imgs[im], lk->args[a], strlen(lk->args[a]));
                        if (!v || v->type == EVD_V_NULL) {
                            ok = false;
                            break;
                        }
                        aoff[a] = ab.len;
                        if (render_param(v, &ab) < 0 || evd_buf_putc(&ab, '\0') < 0) {
                            rc = -ENOMEM;
                            ok = false;
                            break;
                        }
                    }
                    if (!ok)
                        continue;
                    for (size_t a = 0; a < lk->nargs && a < 16; a++)
                        args[a] = ab.data + aoff[a];
                    rc = fn(ud, r, l, args, lk->nargs);
                }
            }
        }
    }
    evd_buf_free(&ab);
    return rc;
}
