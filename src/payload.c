/* payload.c - a one-pass parser for the change payload (SPEC "Change payload"). Pure.
 *
 * Why not jansson: the payload is the hot path (one per change) and jansson builds a hash
 * table per object; this parser writes columns straight into one arena per change. It follows
 * jansson's rules exactly (RFC 8259 grammar, UTF-8 validated, \u0000 refused, duplicate keys
 * refused, integers that overflow int64 refused, reals that overflow refused, nesting limited
 * to 2048), so the cross-check tests can demand identical answers. */
#include "payload.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 2048 /* jansson's JSON_PARSER_MAX_DEPTH */
#define MAX_ROWS 500

static const char *const op_names[] = {"INSERT", "UPDATE", "DELETE", "TRUNCATE"};

const char *evd_op_name(evd_op_t op)
{
    switch (op) {
    case EVD_OP_INSERT: return op_names[0];
    case EVD_OP_UPDATE: return op_names[1];
    case EVD_OP_DELETE: return op_names[2];
    case EVD_OP_TRUNCATE: return op_names[3];
    default: return "?";
    }
}

evd_op_t evd_op_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, op_names[i]) == 0)
            return (evd_op_t)(1 << i);
    return 0;
}

/* ---- arena: chained blocks, so pointers stay valid; freed at once ---- */

#define SPARE_MAX 65536 /* the largest first block a caller keeps between parses */

struct evd_arena_block {
    evd_arena_block_t *next;
    size_t used, cap;
    max_align_t data[];
};

/* A change holds up to batch.max_pending of these at once, so the first block is sized from
 * the payload (its strings never decode longer than the text) rather than a fixed 4 KiB. */
static evd_arena_block_t *arena_block(evd_arena_block_t *next, size_t cap)
{
    evd_arena_block_t *nb = malloc(sizeof(*nb) + cap);
    if (nb) {
        nb->next = next;
        nb->used = 0;
        nb->cap = cap;
    }
    return nb;
}

static void *arena_alloc(evd_arena_block_t **a, size_t n)
{
    n = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
    evd_arena_block_t *b = *a;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 1024 ? n : 1024;
        if (b && b->cap * 2 > cap && b->cap < (1u << 20))
            cap = b->cap * 2 > n ? b->cap * 2 : n;
        evd_arena_block_t *nb = arena_block(b, cap);
        if (!nb)
            return NULL;
        *a = b = nb;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

static void arena_free(evd_arena_block_t *a)
{
    while (a) {
        evd_arena_block_t *next = a->next;
        free(a);
        a = next;
    }
}

/* ---- the scanner ---- */

typedef struct parser {
    const char *base, *p, *end;
    evd_arena_block_t **arena;
    char *err;
    size_t errlen;
    bool failed;
} parser_t;

EVD_PRINTF(2, 3) static bool bad(parser_t *ps, const char *fmt, ...)
{
    if (!ps->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ps->err, ps->errlen, fmt, ap);
        va_end(ap);
        ps->failed = true;
    }
    return false;
}

static void ws(parser_t *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static bool expect(parser_t *ps, char c)
{
    ws(ps);
    if (ps->p < ps->end && *ps->p == c) {
        ps->p++;
        return true;
    }
    return bad(ps, "not JSON: '%c' expected at offset %td", c, ps->p - ps->base);
}

static int hex4(const char *s)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    return v;
}

/* Length of the valid UTF-8 sequence at s (first byte >= 0x80), or 0. */
static size_t utf8_seq(const unsigned char *s, const unsigned char *end)
{
    unsigned char c = s[0];
    size_t n;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)(end - s) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static void put_utf8(char *o, size_t *k, uint32_t cp)
{
    if (cp < 0x80) {
        o[(*k)++] = (char)cp;
    } else if (cp < 0x800) {
        o[(*k)++] = (char)(0xC0 | (cp >> 6));
        o[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        o[(*k)++] = (char)(0xE0 | (cp >> 12));
        o[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        o[(*k)++] = (char)(0xF0 | (cp >> 18));
        o[(*k)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        o[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[(*k)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* Parses a string at ps->p (the opening quote); *out points to its decoded, NUL-terminated
 * copy in the arena (out may be NULL to only validate). */
static bool string(parser_t *ps, const char **out, uint32_t *outlen)
{
    const char *s = ++ps->p;
    /* First pass: validate and find the end; the decoded text is never longer. */
    bool escapes = false;
    while (ps->p < ps->end && *ps->p != '"') {
        unsigned char c = (unsigned char)*ps->p;
        if (c < 0x20)
            return bad(ps, "not JSON: control character in a string");
        if (c == '\\') {
            escapes = true;
            if (ps->end - ps->p < 2)
                return bad(ps, "not JSON: unterminated string");
            char e = ps->p[1];
            if (e == 'u') {
                if (ps->end - ps->p < 6)
                    return bad(ps, "not JSON: short \\u escape");
                int v = hex4(ps->p + 2);
                if (v < 0)
                    return bad(ps, "not JSON: bad \\u escape");
                if (v == 0)
                    return bad(ps, "not JSON: \\u0000 is not allowed");
                ps->p += 6;
                if (v >= 0xDC00 && v <= 0xDFFF)
                    return bad(ps, "not JSON: lone low surrogate");
                if (v >= 0xD800 && v <= 0xDBFF) {
                    if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u')
                        return bad(ps, "not JSON: lone high surrogate");
                    int lo = hex4(ps->p + 2);
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        return bad(ps, "not JSON: bad surrogate pair");
                    ps->p += 6;
                }
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0')
                return bad(ps, "not JSON: bad escape");
            ps->p += 2;
            continue;
        }
        if (c >= 0x80) {
            size_t n = utf8_seq((const unsigned char *)ps->p, (const unsigned char *)ps->end);
            if (!n)
                return bad(ps, "not JSON: invalid UTF-8");
            ps->p += n;
            continue;
        }
        ps->p++;
    }
    if (ps->p >= ps->end)
        return bad(ps, "not JSON: unterminated string");
    const char *e = ps->p++;
    if (!out)
        return true;
    size_t n = (size_t)(e - s);
    char *o = arena_alloc(ps->arena, n + 1);
    if (!o)
        return bad(ps, "out of memory");
    size_t k = 0;
    if (!escapes) {
        memcpy(o, s, n);
        k = n;
    } else {
        for (const char *q = s; q < e;) {
            if (*q != '\\') {
                o[k++] = *q++;
                continue;
            }
            char c = q[1];
            if (c == 'u') {
                uint32_t cp = (uint32_t)hex4(q + 2);
                q += 6;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo = (uint32_t)hex4(q + 2);
                    q += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                put_utf8(o, &k, cp);
                continue;
            }
            q += 2;
            switch (c) {
            case 'b': o[k++] = '\b'; break;
            case 'f': o[k++] = '\f'; break;
            case 'n': o[k++] = '\n'; break;
            case 'r': o[k++] = '\r'; break;
            case 't': o[k++] = '\t'; break;
            default: o[k++] = c; break;
            }
        }
    }
    o[k] = '\0';
    *out = o;
    *outlen = (uint32_t)k;
    return true;
}

static bool literal(parser_t *ps, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return bad(ps, "not JSON: invalid token");
    ps->p += n;
    return true;
}

/* A number per the JSON grammar; integers must fit int64 and reals must not overflow. The scan
 * keeps the digits as an integer m (leading zeros skipped, up to 19 significant digits) and
 * counts those after the point. */
static bool number(parser_t *ps, evd_value_t *v)
{
    const char *s = ps->p;
    const char *p = s;
    bool neg = p < ps->end && *p == '-';
    p += neg;
    if (p >= ps->end || *p < '0' || *p > '9')
        return bad(ps, "not JSON: invalid token");
    uint64_t m = 0;
    int digits = 0, frac = 0;
    if (*p == '0') {
        p++;
        if (p < ps->end && *p >= '0' && *p <= '9')
            return bad(ps, "not JSON: leading zero");
    } else {
        for (; p < ps->end && *p >= '0' && *p <= '9'; p++)
            if (++digits <= 19)
                m = m * 10 + (uint64_t)(*p - '0');
    }
    bool real = false, exponent = false;
    if (p < ps->end && *p == '.') {
        real = true;
        p++;
        if (p >= ps->end || *p < '0' || *p > '9')
            return bad(ps, "not JSON: digit expected after '.'");
        for (; p < ps->end && *p >= '0' && *p <= '9'; p++, frac++)
            if ((m || *p != '0') && ++digits <= 19)
                m = m * 10 + (uint64_t)(*p - '0');
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        real = exponent = true;
        p++;
        if (p < ps->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= ps->end || *p < '0' || *p > '9')
            return bad(ps, "not JSON: digit expected in exponent");
        while (p < ps->end && *p >= '0' && *p <= '9')
            p++;
    }
    size_t n = (size_t)(p - s);
    if (!real && digits <= 18) {
        /* Cannot overflow int64: no copy, no strtoll. */
        v->type = EVD_V_INT;
        v->i = neg ? -(int64_t)m : (int64_t)m;
        v->d = (double)v->i;
        v->s = NULL;
        v->len = 0;
        ps->p = p;
        return true;
    }
    char tmp[64];
    char *text = n < sizeof(tmp) ? tmp : arena_alloc(ps->arena, n + 1);
    if (!text)
        return bad(ps, "out of memory");
    memcpy(text, s, n);
    text[n] = '\0';
    errno = 0;
    if (real) {
        /* Digits that fit 2^53, at most 22 after the point, no exponent: m / 10^k is one correctly
         * rounded division of two exact doubles, what strtod gives (Clinger's fast path). The
         * change's "ts" always qualifies: strtod was 5-6 % of evictd's time in a burst (perf). */
        static const double p10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                     1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
        double d;
        if (!exponent && digits <= 16 && m <= (UINT64_C(1) << 53) && frac <= 22) {
            d = (double)m / p10[frac];
            d = neg ? -d : d;
        } else {
            d = strtod(text, NULL);
            if (errno == ERANGE && (d == HUGE_VAL || d == -HUGE_VAL))
                return bad(ps, "not JSON: real number overflow");
        }
        v->type = EVD_V_REAL;
        v->d = d;
    } else {
        long long i = strtoll(text, NULL, 10);
        if (errno == ERANGE)
            return bad(ps, "not JSON: integer out of range");
        v->type = EVD_V_INT;
        v->i = i;
        v->d = (double)i;
        v->s = NULL;
        v->len = 0;
        ps->p = p;
        return true;
    }
    ps->p = p;
    if (text == tmp) {
        char *keep = arena_alloc(ps->arena, n + 1);
        if (!keep)
            return bad(ps, "out of memory");
        memcpy(keep, tmp, n + 1);
        text = keep;
    }
    v->s = text;
    v->len = (uint32_t)n;
    return true;
}

/* Validates any JSON value without keeping it (containers of json/jsonb column values). */
static bool skip_value(parser_t *ps, int depth)
{
    ws(ps);
    if (ps->p >= ps->end)
        return bad(ps, "not JSON: unexpected end");
    char c = *ps->p;
    if (c == '{' || c == '[') {
        if (depth > MAX_DEPTH)
            return bad(ps, "not JSON: nesting too deep");
        char close = c == '{' ? '}' : ']';
        ps->p++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            return true;
        }
        for (;;) {
            if (c == '{') {
                ws(ps);
                if (ps->p >= ps->end || *ps->p != '"')
                    return bad(ps, "not JSON: string or '}' expected");
                if (!string(ps, NULL, NULL) || !expect(ps, ':'))
                    return false;
            }
            if (!skip_value(ps, depth + 1))
                return false;
            ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                continue;
            }
            return expect(ps, close);
        }
    }
    if (c == '"')
        return string(ps, NULL, NULL);
    if (c == 't')
        return literal(ps, "true");
    if (c == 'f')
        return literal(ps, "false");
    if (c == 'n')
        return literal(ps, "null");
    evd_value_t v;
    return number(ps, &v);
}

/* Any value, kept: containers are validated, then handed to jansson for duplicate keys and
 * the compact form (json/jsonb columns only: rare and never on the common path). */
static bool value(parser_t *ps, evd_value_t *v, int depth)
{
    memset(v, 0, sizeof(*v));
    ws(ps);
    if (ps->p >= ps->end)
        return bad(ps, "not JSON: unexpected end");
    char c = *ps->p;
    switch (c) {
    case '"': v->type = EVD_V_STR; return string(ps, &v->s, &v->len);
    case 't': v->type = EVD_V_TRUE; return literal(ps, "true");
    case 'f': v->type = EVD_V_FALSE; return literal(ps, "false");
    case 'n': v->type = EVD_V_NULL; return literal(ps, "null");
    case '{':
    case '[': {
        const char *s = ps->p;
        if (!skip_value(ps, depth))
            return false;
        json_error_t jerr = {0};
        json_t *j = json_loadb(s, (size_t)(ps->p - s), JSON_REJECT_DUPLICATES, &jerr);
        if (!j) {
            switch (json_error_code(&jerr)) {
            case json_error_duplicate_key:
            case json_error_numeric_overflow:
            case json_error_null_character:
            case json_error_null_byte_in_key:
            case json_error_stack_overflow: return bad(ps, "not JSON: %s", jerr.text);
            default:
                /* skip_value checked the syntax: jansson ran out of memory (which its lexer
                 * reports as a syntax error, and its set-up as no error at all). */
                return bad(ps, "out of memory");
            }
        }
        char *dump = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
        json_decref(j);
        if (!dump)
            return bad(ps, "out of memory");
        size_t n = strlen(dump);
        char *o = arena_alloc(ps->arena, n + 1);
        if (o)
            memcpy(o, dump, n + 1);
        free(dump);
        if (!o)
            return bad(ps, "out of memory");
        v->type = EVD_V_JSON;
        v->s = o;
        v->len = (uint32_t)n;
        return true;
    }
    default: return number(ps, v);
    }
}

const evd_value_t *evd_image_get(const evd_image_t *img, const char *name, size_t len)
{
    for (uint32_t i = 0; i < img->ncols; i++)
        if (img->cols[i].nlen == len && memcmp(img->cols[i].name, name, len) == 0)
            return &img->cols[i].v;
    return NULL;
}

/* An image: an object of column -> value. Columns are collected in a growing arena array. */
static bool image(parser_t *ps, const evd_image_t **out, int depth, const char *what)
{
    ws(ps);
    if (ps->p >= ps->end || *ps->p != '{') {
        /* Any other value is still parsed so a syntax error wins, as in a tree parser. */
        if (!skip_value(ps, depth))
            return false;
        return bad(ps, "\"%s\" is not an object", what);
    }
    if (depth > MAX_DEPTH)
        return bad(ps, "not JSON: nesting too deep");
    ps->p++;
    evd_image_t *img = arena_alloc(ps->arena, sizeof(*img));
    if (!img)
        return bad(ps, "out of memory");
    uint32_t cap = 2; /* most images hold one or two columns; the array doubles in the arena */
    img->cols = arena_alloc(ps->arena, cap * sizeof(evd_col_t));
    img->ncols = 0;
    if (!img->cols)
        return bad(ps, "out of memory");
    ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        *out = img;
        return true;
    }
    for (;;) {
        ws(ps);
        if (ps->p >= ps->end || *ps->p != '"')
            return bad(ps, "not JSON: string or '}' expected");
        if (img->ncols == cap) {
            evd_col_t *n = arena_alloc(ps->arena, 2 * cap * sizeof(evd_col_t));
            if (!n)
                return bad(ps, "out of memory");
            memcpy(n, img->cols, cap * sizeof(evd_col_t));
            img->cols = n;
            cap *= 2;
        }
        evd_col_t *col = &img->cols[img->ncols];
        if (!string(ps, &col->name, &col->nlen) || !expect(ps, ':') || !value(ps, &col->v, depth + 1))
            return false;
        if (evd_image_get(img, col->name, col->nlen))
            return bad(ps, "not JSON: duplicate key \"%s\"", col->name);
        img->ncols++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (!expect(ps, '}'))
            return false;
        *out = img;
        return true;
    }
}

enum { K_V, K_ID, K_TX, K_TS, K_SCHEMA, K_TABLE, K_OP, K_OLD, K_NEW, K_ROWS, K_REF, K_COUNT };
static const char *const top_keys[K_COUNT] = {"v",  "id",  "tx",  "ts",   "schema", "table",
                                              "op", "old", "new", "rows", "ref"};
static const uint32_t top_len[K_COUNT] = {1, 2, 2, 2, 6, 5, 2, 3, 3, 4, 3};

typedef struct top {
    unsigned seen;
    unsigned bad_key; /* an unknown key was found (reported after a syntax check) */
    char unknown[64];
    evd_value_t v, id, tx, ts, schema, table, op, ref;
    const evd_image_t *old_img, *new_img;
    bool rows_given;
    bool rows_not_array;
    bool row_bad;
    char row_why[96];
    size_t nrows;
    evd_row_t *rows;
} top_t;

/* "rows": an array of {"old":..,"new":..} objects. Semantic problems are noted, syntax errors
 * stop the parse, so the answer matches "parse as JSON, then check the form". */
static bool rows(parser_t *ps, top_t *t)
{
    ws(ps);
    if (ps->p >= ps->end || *ps->p != '[') {
        t->rows_not_array = true;
        return skip_value(ps, 2);
    }
    ps->p++;
    size_t cap = 16;
    t->rows = arena_alloc(ps->arena, cap * sizeof(evd_row_t));
    if (!t->rows)
        return bad(ps, "out of memory");
    ws(ps);
    if (ps->p < ps->end && *ps->p == ']') {
        ps->p++;
        return true;
    }
    for (;;) {
        ws(ps);
        if (t->nrows == cap) {
            evd_row_t *n = arena_alloc(ps->arena, 2 * cap * sizeof(evd_row_t));
            if (!n)
                return bad(ps, "out of memory");
            memcpy(n, t->rows, cap * sizeof(evd_row_t));
            t->rows = n;
            cap *= 2;
        }
        evd_row_t *row = &t->rows[t->nrows++];
        memset(row, 0, sizeof(*row));
        if (ps->p >= ps->end || *ps->p != '{') {
            if (!skip_value(ps, 3))
                return false;
            if (!t->row_bad)
                snprintf(t->row_why, sizeof(t->row_why), "\"rows\" entry is not an object with old/new");
            t->row_bad = true;
        } else {
            ps->p++;
            ws(ps);
            unsigned seen = 0;
            if (ps->p < ps->end && *ps->p == '}') {
                ps->p++;
                if (!t->row_bad)
                    snprintf(t->row_why, sizeof(t->row_why), "\"rows\" entry is not an object with old/new");
                t->row_bad = true;
            } else {
                for (;;) {
                    const char *key;
                    uint32_t klen;
                    ws(ps);
                    if (ps->p >= ps->end || *ps->p != '"')
                        return bad(ps, "not JSON: string or '}' expected");
                    if (!string(ps, &key, &klen) || !expect(ps, ':'))
                        return false;
                    int which = strcmp(key, "old") == 0 ? 1 : strcmp(key, "new") == 0 ? 2 : 0;
                    if (which && (seen & (unsigned)which))
                        return bad(ps, "not JSON: duplicate key \"%s\"", key);
                    if (!which) {
                        /* A duplicate unknown key is a syntax error in a tree parser; an
                         * unknown key is a form error. Track names to tell them apart. */
                        if (!skip_value(ps, 4))
                            return false;
                        if (!t->row_bad)
                            snprintf(t->row_why, sizeof(t->row_why), "unknown field \"%.40s\" in a row", key);
                        t->row_bad = true;
                    } else {
                        seen |= (unsigned)which;
                        if (!image(ps, which == 1 ? &row->old_img : &row->new_img, 4, which == 1 ? "old" : "new")) {
                            if (ps->failed && strncmp(ps->err, "not JSON", 8) != 0 &&
                                strcmp(ps->err, "out of memory") != 0) {
                                /* A form error ("not an object"): keep scanning for syntax. */
                                if (!t->row_bad)
                                    snprintf(t->row_why, sizeof(t->row_why), "%s", ps->err);
                                t->row_bad = true;
                                ps->failed = false;
                            } else {
                                return false;
                            }
                        }
                    }
                    ws(ps);
                    if (ps->p < ps->end && *ps->p == ',') {
                        ps->p++;
                        continue;
                    }
                    if (!expect(ps, '}'))
                        return false;
                    break;
                }
            }
        }
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        return expect(ps, ']');
    }
}

static bool top_object(parser_t *ps, top_t *t)
{
    ws(ps);
    if (ps->p >= ps->end)
        return bad(ps, "not JSON: unexpected end");
    if (*ps->p != '{') {
        if (*ps->p == '[') {
            if (!skip_value(ps, 1))
                return false;
            ws(ps);
            if (ps->p != ps->end)
                return bad(ps, "not JSON: end of input expected");
            return bad(ps, "not a JSON object");
        }
        return bad(ps, "not JSON: '[' or '{' expected");
    }
    ps->p++;
    ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        return true;
    }
    /* Unknown keys seen so far, to refuse duplicates among them as jansson would. */
    const char *unknown[32];
    uint32_t unknown_len[32];
    size_t nunknown = 0;
    for (;;) {
        const char *key;
        uint32_t klen;
        ws(ps);
        if (ps->p >= ps->end || *ps->p != '"')
            return bad(ps, "not JSON: string or '}' expected");
        if (!string(ps, &key, &klen) || !expect(ps, ':'))
            return false;
        int k;
        for (k = 0; k < K_COUNT; k++)
            if (top_len[k] == klen && memcmp(key, top_keys[k], klen) == 0)
                break;
        if (k < K_COUNT) {
            if (t->seen & (1u << k))
                return bad(ps, "not JSON: duplicate key \"%s\"", key);
            t->seen |= 1u << k;
        }
        bool ok;
        switch (k) {
        case K_V: ok = value(ps, &t->v, 2); break;
        case K_ID: ok = value(ps, &t->id, 2); break;
        case K_TX: ok = value(ps, &t->tx, 2); break;
        case K_TS: ok = value(ps, &t->ts, 2); break;
        case K_SCHEMA: ok = value(ps, &t->schema, 2); break;
        case K_TABLE: ok = value(ps, &t->table, 2); break;
        case K_OP: ok = value(ps, &t->op, 2); break;
        case K_REF: ok = value(ps, &t->ref, 2); break;
        case K_ROWS:
            t->rows_given = true;
            ok = rows(ps, t);
            break;
        case K_OLD:
        case K_NEW:
            ok = image(ps, k == K_OLD ? &t->old_img : &t->new_img, 2, k == K_OLD ? "old" : "new");
            if (!ok && strncmp(ps->err, "not JSON", 8) != 0 && strcmp(ps->err, "out of memory") != 0) {
                /* not an object: a form error; keep checking the syntax */
                if (!t->row_bad)
                    snprintf(t->row_why, sizeof(t->row_why), "%s", ps->err);
                t->row_bad = true;
                ps->failed = false;
                ok = true;
            }
            break;
        default:
            for (size_t i = 0; i < nunknown; i++)
                if (unknown_len[i] == klen && memcmp(unknown[i], key, klen) == 0)
                    return bad(ps, "not JSON: duplicate key \"%s\"", key);
            if (nunknown < EVD_ARRAY_LEN(unknown)) {
                unknown[nunknown] = key;
                unknown_len[nunknown++] = klen;
            }
            if (!t->bad_key) {
                snprintf(t->unknown, sizeof(t->unknown), "%.50s", key);
                t->bad_key = 1;
            }
            ok = skip_value(ps, 2);
            break;
        }
        if (!ok)
            return false;
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        return expect(ps, '}');
    }
}

/* Checks the images a row carries against the op: INSERT new, DELETE old, UPDATE both (a
 * statement chunk may carry UPDATE images unpaired). */
static const char *check_row(evd_op_t op, const evd_row_t *row, bool chunk)
{
    switch (op) {
    case EVD_OP_INSERT:
        if (row->old_img || !row->new_img)
            return "INSERT carries \"new\" only";
        break;
    case EVD_OP_DELETE:
        if (row->new_img || !row->old_img)
            return "DELETE carries \"old\" only";
        break;
    case EVD_OP_UPDATE:
        if (chunk ? (!row->old_img && !row->new_img) : (!row->old_img || !row->new_img))
            return "UPDATE lacks \"old\" or \"new\"";
        break;
    default: break;
    }
    return NULL;
}

static bool copy_name(char *dst, size_t cap, const evd_value_t *v, bool given, const char *field, char *err,
                      size_t errlen)
{
    if (!given || v->type != EVD_V_STR) {
        snprintf(err, errlen, "\"%s\" missing or not a string", field);
        return false;
    }
    if (v->len == 0 || v->len >= cap) {
        snprintf(err, errlen, "\"%s\" is empty or too long", field);
        return false;
    }
    memcpy(dst, v->s, v->len + 1);
    return true;
}

/* The form checks, in the order a tree-based parser would make them. */
static bool check_form(top_t *t, evd_change_t *out, char *err, size_t errlen)
{
#define GIVEN(k) ((t->seen >> (k)) & 1u)
    if (!GIVEN(K_V) || t->v.type != EVD_V_INT || t->v.i != 1) {
        snprintf(err, errlen, "unknown or missing \"v\" (expected 1)");
        return false;
    }
    if (t->bad_key) {
        snprintf(err, errlen, "unknown field \"%s\"", t->unknown);
        return false;
    }
    if (GIVEN(K_ID)) {
        if (t->id.type == EVD_V_INT && t->id.i > 0) {
            out->id = t->id.i;
        } else if (t->id.type != EVD_V_NULL) {
            snprintf(err, errlen, "\"id\" is not a positive integer or null");
            return false;
        }
    }
    if (GIVEN(K_TX)) {
        if (t->tx.type == EVD_V_INT) {
            out->tx = t->tx.i;
        } else if (t->tx.type != EVD_V_NULL) {
            snprintf(err, errlen, "\"tx\" is not an integer");
            return false;
        }
    }
    if (GIVEN(K_TS)) {
        if (t->ts.type == EVD_V_INT || t->ts.type == EVD_V_REAL) {
            out->ts = t->ts.d;
            out->has_ts = true;
        } else if (t->ts.type != EVD_V_NULL) {
            snprintf(err, errlen, "\"ts\" is not a number");
            return false;
        }
    }
    if (!copy_name(out->schema, sizeof(out->schema), &t->schema, GIVEN(K_SCHEMA), "schema", err, errlen) ||
        !copy_name(out->table, sizeof(out->table), &t->table, GIVEN(K_TABLE), "table", err, errlen))
        return false;
    out->op = GIVEN(K_OP) && t->op.type == EVD_V_STR ? evd_op_parse(t->op.s) : 0;
    if (!out->op) {
        snprintf(err, errlen, "\"op\" missing or not INSERT, UPDATE, DELETE or TRUNCATE");
        return false;
    }
    bool images = GIVEN(K_OLD) || GIVEN(K_NEW);
    if (GIVEN(K_REF)) {
        if (t->ref.type != EVD_V_TRUE || GIVEN(K_ROWS) || images) {
            snprintf(err, errlen, "\"ref\" must be true and come without images");
            return false;
        }
        out->ref = true;
        return true;
    }
    if (out->op == EVD_OP_TRUNCATE) {
        if (GIVEN(K_ROWS) || images) {
            snprintf(err, errlen, "TRUNCATE carries no images");
            return false;
        }
        return true;
    }
    if (GIVEN(K_ROWS)) {
        if (images || t->rows_not_array || t->nrows == 0 || t->nrows > MAX_ROWS) {
            snprintf(err, errlen, "\"rows\" must be an array of 1..500 images, without old/new");
            return false;
        }
        if (t->row_bad) {
            snprintf(err, errlen, "%s", t->row_why);
            return false;
        }
        for (size_t i = 0; i < t->nrows; i++) {
            const char *why = check_row(out->op, &t->rows[i], true);
            if (why) {
                snprintf(err, errlen, "%s", why);
                return false;
            }
        }
        out->rows = t->rows;
        out->nrows = t->nrows;
        return true;
    }
    if (t->row_bad) {
        snprintf(err, errlen, "%s", t->row_why);
        return false;
    }
    evd_row_t row = {t->old_img, t->new_img};
    const char *why = check_row(out->op, &row, false);
    if (why) {
        snprintf(err, errlen, "%s", why);
        return false;
    }
    return true;
#undef GIVEN
}

evd_payload_status_t evd_payload_parse(const char *buf, size_t len, evd_change_t *out, char *err, size_t errlen)
{
    return evd_payload_parse_spare(buf, len, out, NULL, err, errlen);
}

evd_payload_status_t evd_payload_parse_spare(const char *buf, size_t len, evd_change_t *out, evd_arena_block_t **spare,
                                             char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->id = -1;
    out->tx = -1;
    if (len == 0)
        return EVD_PAYLOAD_DOORBELL;
    top_t t;
    memset(&t, 0, sizeof(t));
    parser_t ps = {.base = buf, .p = buf, .end = buf + len, .arena = &out->arena, .err = err, .errlen = errlen};
    /* Room for the decoded strings plus a few dozen columns: one malloc for a typical change,
     * none when the caller's spare block is big enough. */
    size_t first = 2 * len + 512;
    if (spare && *spare && (*spare)->cap >= first) {
        out->arena = *spare;
        out->arena->used = 0;
        *spare = NULL;
    } else {
        out->arena = arena_block(NULL, first);
    }
    if (!out->arena) {
        snprintf(err, errlen, "out of memory");
        return EVD_PAYLOAD_BAD;
    }
    if (!top_object(&ps, &t))
        goto fail;
    ws(&ps);
    if (ps.p != ps.end) {
        bad(&ps, "not JSON: end of input expected");
        goto fail;
    }
    if (!check_form(&t, out, err, errlen))
        goto fail;
    if (!out->ref && out->op != EVD_OP_TRUNCATE && !out->rows) {
        evd_row_t *row = arena_alloc(&out->arena, sizeof(*row));
        if (!row) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        row->old_img = t.old_img;
        row->new_img = t.new_img;
        out->rows = row;
        out->nrows = 1;
    }
    return EVD_PAYLOAD_OK;
fail:
    evd_change_clear(out);
    return EVD_PAYLOAD_BAD;
}

void evd_change_clear_spare(evd_change_t *c, evd_arena_block_t **spare)
{
    /* Keep the largest block up to SPARE_MAX (blocks grow along the chain, newest first). */
    evd_arena_block_t **best = NULL;
    for (evd_arena_block_t **b = &c->arena; *b; b = &(*b)->next)
        if ((*b)->cap <= SPARE_MAX && (!best || (*b)->cap > (*best)->cap))
            best = b;
    if (best && (!*spare || (*spare)->cap < (*best)->cap)) {
        evd_arena_block_t *keep = *best;
        *best = keep->next;
        free(*spare);
        *spare = keep;
        keep->next = NULL;
    }
    evd_change_clear(c);
}

void evd_arena_spare_free(evd_arena_block_t **spare)
{
    free(*spare);
    *spare = NULL;
}

void evd_change_clear(evd_change_t *c)
{
    arena_free(c->arena);
    memset(c, 0, sizeof(*c));
    c->id = -1;
    c->tx = -1;
}

static int value_json(const evd_value_t *v, evd_buf_t *out)
{
    switch (v->type) {
    case EVD_V_NULL: return evd_buf_puts(out, "null");
    case EVD_V_TRUE: return evd_buf_puts(out, "true");
    case EVD_V_FALSE: return evd_buf_puts(out, "false");
    case EVD_V_STR: return evd_buf_json_str(out, v->s, v->len);
    case EVD_V_INT: return evd_buf_printf(out, "%lld", (long long)v->i);
    default: return evd_buf_append(out, v->s, v->len);
    }
}

static int image_json(const evd_image_t *img, evd_buf_t *out)
{
    int rc = evd_buf_putc(out, '{');
    for (uint32_t i = 0; i < img->ncols && rc == 0; i++) {
        if (i)
            rc = evd_buf_putc(out, ',');
        if (rc == 0)
            rc = evd_buf_json_str(out, img->cols[i].name, img->cols[i].nlen);
        if (rc == 0)
            rc = evd_buf_putc(out, ':');
        if (rc == 0)
            rc = value_json(&img->cols[i].v, out);
    }
    return rc ? rc : evd_buf_putc(out, '}');
}

int evd_change_to_json(const evd_change_t *c, evd_buf_t *out)
{
    int rc = evd_buf_puts(out, "{\"v\":1,\"id\":");
    if (rc == 0)
        rc = c->id > 0 ? evd_buf_printf(out, "%lld", (long long)c->id) : evd_buf_puts(out, "null");
    if (rc == 0 && c->tx >= 0)
        rc = evd_buf_printf(out, ",\"tx\":%lld", (long long)c->tx);
    if (rc == 0 && c->has_ts)
        rc = evd_buf_printf(out, ",\"ts\":%.17g", c->ts);
    if (rc == 0)
        rc = evd_buf_puts(out, ",\"schema\":");
    if (rc == 0)
        rc = evd_buf_json_str(out, c->schema, strlen(c->schema));
    if (rc == 0)
        rc = evd_buf_puts(out, ",\"table\":");
    if (rc == 0)
        rc = evd_buf_json_str(out, c->table, strlen(c->table));
    if (rc == 0)
        rc = evd_buf_printf(out, ",\"op\":\"%s\"", evd_op_name(c->op));
    if (rc == 0 && c->ref)
        rc = evd_buf_puts(out, ",\"ref\":true");
    bool chunk =
        c->nrows > 1 || (c->nrows == 1 && c->op == EVD_OP_UPDATE && (!c->rows[0].old_img || !c->rows[0].new_img));
    if (rc == 0 && chunk)
        rc = evd_buf_puts(out, ",\"rows\":[");
    for (size_t i = 0; i < c->nrows && rc == 0; i++) {
        const evd_row_t *r = &c->rows[i];
        if (chunk && (rc = evd_buf_puts(out, i ? ",{" : "{")) < 0)
            break;
        if (r->old_img) {
            rc = evd_buf_puts(out, chunk ? "\"old\":" : ",\"old\":");
            if (rc == 0)
                rc = image_json(r->old_img, out);
        }
        if (rc == 0 && r->new_img) {
            rc = evd_buf_puts(out, chunk && !r->old_img ? "\"new\":" : ",\"new\":");
            if (rc == 0)
                rc = image_json(r->new_img, out);
        }
        if (rc == 0 && chunk)
            rc = evd_buf_putc(out, '}');
    }
    if (rc == 0 && chunk)
        rc = evd_buf_putc(out, ']');
    return rc ? rc : evd_buf_putc(out, '}');
}
