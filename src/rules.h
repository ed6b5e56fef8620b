/* rules.h - key templates compiled once, and the mapping from a change to keys and patterns. Pure. */
#ifndef EVD_RULES_H
#define EVD_RULES_H

#include "payload.h"
#include "util.h"

typedef enum { EVD_IMG_ANY = 0, EVD_IMG_OLD, EVD_IMG_NEW } evd_img_t;

typedef struct evd_tpl_part {
    bool is_ref;      /* false: literal text */
    evd_img_t img;    /* for refs */
    int lookup;       /* for refs: index into rule's lookups, or -1 for a column */
    const char *text; /* literal text, or column / lookup name (NUL-terminated, owned by tpl) */
    size_t len;
} evd_tpl_part_t;

typedef struct evd_template {
    char *src;       /* the template as written */
    bool is_pattern; /* from "patterns": literal text is a glob already */
    evd_tpl_part_t *parts;
    size_t nparts;
    bool has_any; /* has an unqualified {col}: expands once per image */
    bool has_old, has_new;
    char *store; /* backing storage for part texts */
} evd_template_t;

typedef struct evd_lookup {
    char *as;
    char *sql;
    char **args;
    size_t nargs;
} evd_lookup_t;

typedef struct evd_rule {
    char *schema;
    char *table;
    unsigned ops; /* evd_op_t bits */
    int *targets; /* indices into the config's targets */
    size_t ntargets;
    evd_lookup_t *lookups;
    size_t nlookups;
    evd_template_t *keys;
    size_t nkeys;
    evd_template_t *patterns;
    size_t npatterns;
    int durable; /* -1 unset, 0 false, 1 true */
} evd_rule_t;

typedef struct evd_rules {
    evd_rule_t *v;
    size_t n;
    size_t max_keys; /* batch.max_keys: cap on lookup cross products per image */
} evd_rules_t;

/* Compiles a template; on error returns -EINVAL and writes the reason into err. */
int evd_template_compile(evd_template_t *t, const char *src, bool is_pattern, const evd_lookup_t *lookups,
                         size_t nlookups, char *err, size_t errlen) EVD_MUST_CHECK;
void evd_template_free(evd_template_t *t);
void evd_rule_free(evd_rule_t *r);
void evd_rules_free(evd_rules_t *rs);

/* True when some rule names schema.table. */
bool evd_rules_watches(const evd_rules_t *rs, const char *schema, const char *table);

/* Lookup values for one (lookup, args) pair, supplied by the caller. */
typedef struct evd_lookup_vals {
    int status; /* 0 ok, <0 failed (widen) */
    size_t n;   /* rows; 0 for a non-NULL arg means widen */
    char **v;   /* rendered values; NULL entry = SQL NULL (no key) */
} evd_lookup_vals_t;

/* Resolves lookup `lk` of `rule` with rendered args (none NULL). Returns NULL when unknown
 * (treated as failed: widen). */
typedef const evd_lookup_vals_t *(*evd_lookup_resolve_fn)(void *ud, const evd_rule_t *rule, size_t lookup_idx,
                                                          const char *const *args, size_t nargs);

/* Calls fn for every lookup the change needs (args rendered as SQL text parameters). */
typedef int (*evd_lookup_need_fn)(void *ud, const evd_rule_t *rule, size_t lookup_idx, const char *const *args,
                                  size_t nargs);
int evd_rules_lookups(const evd_rules_t *rs, const evd_change_t *c, evd_lookup_need_fn fn, void *ud) EVD_MUST_CHECK;

/* Keys and patterns for one target, deduplicated within the expansion. */
typedef struct evd_keyset {
    evd_keyvec_t keys;
    evd_keyvec_t patterns;
    evd_set_t seen_keys;
    evd_set_t seen_patterns;
} evd_keyset_t;

typedef struct evd_expansion {
    evd_keyset_t *per_target; /* ntargets entries */
    size_t ntargets;
    unsigned matched;       /* number of rules that applied */
    unsigned widened;       /* number of templates that widened */
    char widen_reason[160]; /* the first widening's reason */
} evd_expansion_t;

int evd_expansion_init(evd_expansion_t *x, size_t ntargets) EVD_MUST_CHECK;
void evd_expansion_reset(evd_expansion_t *x);
void evd_expansion_free(evd_expansion_t *x);

/* Expands change c through every rule for its table and op into x (which must be reset by the
 * caller). resolve may be NULL when no rule has lookups. Returns 0 or -ENOMEM. */
int evd_rules_expand(const evd_rules_t *rs, const evd_change_t *c, evd_lookup_resolve_fn resolve, void *ud,
                     evd_expansion_t *x) EVD_MUST_CHECK;

/* Renders a JSON scalar as Django would put it in a key (ints decimal, strings raw, True/False).
 * Returns 0, 1 for null, or -EINVAL for non-scalars. Appends to b. */
int evd_render_value(const evd_value_t *v, evd_buf_t *b) EVD_MUST_CHECK;
/* Appends s with glob metacharacters (*?[]\) escaped by a backslash. */
int evd_glob_escape(evd_buf_t *b, const char *s, size_t n) EVD_MUST_CHECK;

#endif
