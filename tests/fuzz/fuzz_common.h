/* fuzz_common.h - shared pieces of the libFuzzer harnesses: a fixed lookup resolver, fixed
 * changes and invariant checks on expansions. Everything is static inline so that a harness that
 * uses only part of it builds warning-free (-Wall -Wextra -Werror under CMake). */
#ifndef EVD_FUZZ_COMMON_H
#define EVD_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "payload.h"
#include "rules.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken invariant: say which and abort, so libFuzzer (and the replay driver) report a crash. */
#define FUZZ_CHECK(cond)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);                               \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

/* ---- a fixed set of lookups and their resolver ---------------------------------------------- */

/* Lookup names a template may reference; each behaves differently when resolved. */
enum {
    FL_DRIVER_USER_ID, /* one row */
    FL_TAGS,           /* three rows, one holding glob metacharacters */
    FL_GONE,           /* no row: widens */
    FL_FAIL,           /* resolver returns NULL: widens */
    FL_ERR,            /* status < 0: widens */
    FL_NULLV,          /* one row holding SQL NULL: no key */
    FL_PAIR,           /* two args, two rows (one NULL) */
    FL_COUNT
};

static char fl_as[FL_COUNT][16] = {"driver_user_id", "tags", "gone", "fail", "err", "nullv", "pair"};
static char fl_sql[] = "SELECT x FROM y WHERE a = $1";
static char fl_sql2[] = "SELECT x FROM y WHERE a = $1 AND b = $2";
static char fl_arg_driver_id[] = "driver_id";
static char fl_arg_id[] = "id";
static char fl_arg_name[] = "name";
static char fl_arg_product_id[] = "product_id";
static char *fl_args_driver[] = {fl_arg_driver_id};
static char *fl_args_id[] = {fl_arg_id};
static char *fl_args_pair[] = {fl_arg_id, fl_arg_name};
static char *fl_args_product[] = {fl_arg_product_id};

static inline void fuzz_lookups(evd_lookup_t lk[FL_COUNT])
{
    for (int i = 0; i < FL_COUNT; i++) {
        lk[i].as = fl_as[i];
        lk[i].sql = fl_sql;
        lk[i].args = fl_args_id;
        lk[i].nargs = 1;
    }
    lk[FL_DRIVER_USER_ID].args = fl_args_driver;
    lk[FL_ERR].args = fl_args_product;
    lk[FL_PAIR].sql = fl_sql2;
    lk[FL_PAIR].args = fl_args_pair;
    lk[FL_PAIR].nargs = 2;
}

static char fv_u42[] = "u42", fv_a[] = "a", fv_bstar[] = "b*?[x]\\", fv_c[] = "c", fv_p[] = "p";
static char *fv_one[] = {fv_u42};
static char *fv_tags[] = {fv_a, fv_bstar, fv_c};
static char *fv_null[] = {NULL};
static char *fv_pair[] = {fv_p, NULL};

/* Resolves by the lookup's name, so it also serves rules coming from a fuzzed config: names it
 * does not know get one row derived from nothing but the name. */
static inline const evd_lookup_vals_t *fuzz_resolve(void *ud, const evd_rule_t *rule, size_t lookup_idx,
                                                    const char *const *args, size_t nargs)
{
    static const evd_lookup_vals_t one = {0, 1, fv_one}, tags = {0, 3, fv_tags}, none = {0, 0, NULL},
                                   err = {-1, 0, NULL}, nullv = {0, 1, fv_null}, pair = {0, 2, fv_pair};
    (void)ud;
    FUZZ_CHECK(rule != NULL && lookup_idx < rule->nlookups);
    FUZZ_CHECK(nargs == rule->lookups[lookup_idx].nargs && nargs >= 1 && nargs <= 16);
    size_t total = 0;
    for (size_t a = 0; a < nargs; a++) {
        FUZZ_CHECK(args[a] != NULL);
        total += strlen(args[a]); /* touches every byte: ASan catches a dangling argument */
    }
    (void)total;
    const char *as = rule->lookups[lookup_idx].as;
    if (strcmp(as, "tags") == 0)
        return &tags;
    if (strcmp(as, "gone") == 0)
        return &none;
    if (strcmp(as, "fail") == 0)
        return NULL;
    if (strcmp(as, "err") == 0)
        return &err;
    if (strcmp(as, "nullv") == 0)
        return &nullv;
    if (strcmp(as, "pair") == 0)
        return &pair;
    return &one;
}

static inline int fuzz_need(void *ud, const evd_rule_t *rule, size_t lookup_idx, const char *const *args, size_t nargs)
{
    (void)ud;
    FUZZ_CHECK(rule != NULL && lookup_idx < rule->nlookups);
    FUZZ_CHECK(nargs == rule->lookups[lookup_idx].nargs);
    for (size_t a = 0; a < nargs; a++)
        FUZZ_CHECK(args[a] != NULL && strlen(args[a]) < ((size_t)1 << 30));
    return 0;
}

/* ---- fixed changes (schema public, table t) -------------------------------------------------- */

#define FUZZ_OLD_IMG                                                                                                   \
    "{\"id\":7,\"product_id\":3,\"driver_id\":2,\"name\":\"a*b?[c]\\\\d\",\"flag\":true,"                              \
    "\"price\":\"3.50\",\"r\":1.5,\"n\":null,\"j\":{\"k\":[1,2]},\"s\":\"x{y}\",\"big\":"                              \
    "9223372036854775807,\"neg\":-1e-300}"
#define FUZZ_NEW_IMG                                                                                                   \
    "{\"id\":7,\"product_id\":4,\"driver_id\":null,\"name\":\"plain\",\"flag\":false,"                                 \
    "\"price\":\"1e-07\",\"r\":-0.0,\"n\":5,\"j\":[],\"s\":\"\",\"big\":-9223372036854775808,"                         \
    "\"neg\":1e300}"

static const char *const fuzz_change_json[] = {
    "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\",\"table\":\"t\","
    "\"op\":\"UPDATE\",\"old\":" FUZZ_OLD_IMG ",\"new\":" FUZZ_NEW_IMG "}",
    "{\"v\":1,\"id\":null,\"schema\":\"public\",\"table\":\"t\",\"op\":\"INSERT\",\"new\":" FUZZ_NEW_IMG "}",
    "{\"v\":1,\"id\":43,\"schema\":\"public\",\"table\":\"t\",\"op\":\"DELETE\",\"old\":" FUZZ_OLD_IMG "}",
    "{\"v\":1,\"id\":44,\"schema\":\"public\",\"table\":\"t\",\"op\":\"TRUNCATE\"}",
    "{\"v\":1,\"id\":45,\"ref\":true,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\"}",
    "{\"v\":1,\"id\":46,\"tx\":1,\"ts\":1,\"schema\":\"public\",\"table\":\"t\",\"op\":\"UPDATE\","
    "\"rows\":[{\"old\":" FUZZ_OLD_IMG "},{\"new\":" FUZZ_NEW_IMG "},{\"old\":{\"id\":1},\"new\":{\"id\":2}}]}",
};
#define FUZZ_NCHANGES (sizeof(fuzz_change_json) / sizeof(fuzz_change_json[0]))

/* Parses the fixed changes once; they stay alive (reachable) for the process' life. */
static inline const evd_change_t *fuzz_changes(void)
{
    static evd_change_t changes[FUZZ_NCHANGES];
    static int ready;
    if (!ready) {
        for (size_t i = 0; i < FUZZ_NCHANGES; i++) {
            char err[256] = "";
            const char *j = fuzz_change_json[i];
            if (evd_payload_parse(j, strlen(j), &changes[i], err, sizeof(err)) != EVD_PAYLOAD_OK) {
                fprintf(stderr, "fixed change %zu rejected: %s\n", i, err);
                abort();
            }
        }
        ready = 1;
    }
    return changes;
}

/* ---- invariants ------------------------------------------------------------------------------ */

/* A widened key template escapes its literal text and row values: the only unescaped glob
 * metacharacter it may hold is the '*' standing for an unknown part. */
static inline void fuzz_check_widened_key_pattern(const char *p)
{
    for (size_t i = 0; p[i]; i++) {
        if (p[i] == '\\') {
            FUZZ_CHECK(p[i + 1] != '\0'); /* no dangling escape */
            i++;
            continue;
        }
        FUZZ_CHECK(p[i] != '?' && p[i] != '[' && p[i] != ']');
    }
}

static inline bool fuzz_starts_with(const char *s, const char *prefix, size_t n)
{
    return strncmp(s, prefix, n) == 0;
}

/* No key twice in one keyset (v, n: the keyset's vector). */
static inline void fuzz_check_unique(char *const *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(v[i] != NULL);
        for (size_t j = i + 1; j < n && n <= 512; j++)
            FUZZ_CHECK(strcmp(v[i], v[j]) != 0);
    }
}

/* Checks an expansion made only from template t (a rule with one template): where its keys and
 * patterns may start, what they may hold. */
static inline void fuzz_check_expansion(const evd_expansion_t *x, const evd_template_t *t)
{
    char prefix[4096];
    size_t plen = 0, eplen = 0;
    char eprefix[8192];
    if (t->nparts && !t->parts[0].is_ref && t->parts[0].len < sizeof(prefix)) {
        plen = t->parts[0].len;
        memcpy(prefix, t->parts[0].text, plen);
        for (size_t i = 0; i < plen; i++) {
            char c = prefix[i];
            if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\')
                eprefix[eplen++] = '\\';
            eprefix[eplen++] = c;
        }
    }
    for (size_t ti = 0; ti < x->ntargets; ti++) {
        const evd_keyset_t *k = &x->per_target[ti];
        fuzz_check_unique(k->keys.v, k->keys.n);
        fuzz_check_unique(k->patterns.v, k->patterns.n);
        if (t->is_pattern) {
            FUZZ_CHECK(k->keys.n == 0);
            for (size_t i = 0; i < k->patterns.n; i++)
                FUZZ_CHECK(fuzz_starts_with(k->patterns.v[i], prefix, plen));
            continue;
        }
        /* Key template: exact keys begin with the literal prefix; a pattern exists only when the
         * template widened, and keeps the literal prefix (escaped). */
        if (!x->widened)
            FUZZ_CHECK(k->patterns.n == 0);
        for (size_t i = 0; i < k->keys.n; i++)
            FUZZ_CHECK(fuzz_starts_with(k->keys.v[i], prefix, plen));
        for (size_t i = 0; i < k->patterns.n; i++) {
            FUZZ_CHECK(fuzz_starts_with(k->patterns.v[i], eprefix, eplen));
            fuzz_check_widened_key_pattern(k->patterns.v[i]);
        }
    }
    /* Every target of the rule gets the same keys. */
    for (size_t ti = 1; ti < x->ntargets; ti++) {
        FUZZ_CHECK(x->per_target[ti].keys.n == x->per_target[0].keys.n);
        FUZZ_CHECK(x->per_target[ti].patterns.n == x->per_target[0].patterns.n);
    }
}

#endif
