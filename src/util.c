/* util.c - growable buffers, string vectors, a byte-string set and clocks. */
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int evd_buf_reserve(evd_buf_t *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int evd_buf_append(evd_buf_t *b, const char *s, size_t n)
{
    if (evd_buf_reserve(b, n) < 0)
        return -ENOMEM;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int evd_buf_puts(evd_buf_t *b, const char *s)
{
    return evd_buf_append(b, s, strlen(s));
}

int evd_buf_putc(evd_buf_t *b, char c)
{
    return evd_buf_append(b, &c, 1);
}

int evd_buf_printf(evd_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -EINVAL;
    if (evd_buf_reserve(b, (size_t)n) < 0)
        return -ENOMEM;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

/* Length of the valid UTF-8 sequence at p, or 0. */
size_t evd_utf8_len(const unsigned char *p, size_t n)
{
    unsigned char c = p[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f; /* no UTF-16 surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else
        return 0;
    if (n < len || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (p[i] < 0x80 || p[i] > 0xbf)
            return 0;
    return len;
}

int evd_buf_json_str(evd_buf_t *b, const char *s, size_t n)
{
    if (evd_buf_reserve(b, n + 2) < 0 || evd_buf_putc(b, '"') < 0)
        return -ENOMEM;
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\')
            continue;
        size_t len = c >= 0x80 ? evd_utf8_len((const unsigned char *)s + i, n - i) : 0;
        if (len > 0) {
            i += len - 1;
            continue;
        }
        if (evd_buf_append(b, s + start, i - start) < 0)
            return -ENOMEM;
        int rc;
        switch (c) {
        case '"': rc = evd_buf_puts(b, "\\\""); break;
        case '\\': rc = evd_buf_puts(b, "\\\\"); break;
        case '\n': rc = evd_buf_puts(b, "\\n"); break;
        case '\r': rc = evd_buf_puts(b, "\\r"); break;
        case '\t': rc = evd_buf_puts(b, "\\t"); break;
        default: rc = c >= 0x80 ? evd_buf_puts(b, "\\ufffd") : evd_buf_printf(b, "\\u%04x", c); break;
        }
        if (rc < 0)
            return -ENOMEM;
        start = i + 1;
    }
    if (evd_buf_append(b, s + start, n - start) < 0 || evd_buf_putc(b, '"') < 0)
        return -ENOMEM;
    return 0;
}

void evd_buf_reset(evd_buf_t *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void evd_buf_free(evd_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int evd_strv_push(evd_strv_t *sv, const char *s, size_t n)
{
    if (sv->n == sv->cap) {
        size_t cap = sv->cap ? sv->cap * 2 : 8;
        char **v = realloc(sv->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        sv->v = v;
        sv->cap = cap;
    }
    char *copy = malloc(n + 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, s, n);
    copy[n] = '\0';
    sv->v[sv->n++] = copy;
    return 0;
}

void evd_strv_free(evd_strv_t *sv)
{
    for (size_t i = 0; i < sv->n; i++)
        free(sv->v[i]);
    free(sv->v);
    sv->v = NULL;
    sv->n = sv->cap = 0;
}

struct evd_chunk {
    evd_chunk_t *next;
    size_t used, cap;
    char data[];
};

int evd_keyvec_push(evd_keyvec_t *kv, const char *s, size_t n)
{
    if (kv->n == kv->cap) {
        size_t cap = kv->cap ? kv->cap * 2 : 8;
        char **v = realloc(kv->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        kv->v = v;
        kv->cap = cap;
    }
    evd_chunk_t *c = kv->chunks;
    if (!c || c->cap - c->used < n + 1) {
        size_t cap = c ? c->cap * 2 : 128;
        if (cap < n + 1)
            cap = n + 1;
        if (cap > 65536 && n + 1 <= 65536)
            cap = 65536;
        evd_chunk_t *nc = malloc(sizeof(*nc) + cap);
        if (!nc)
            return -ENOMEM;
        nc->next = c;
        nc->used = 0;
        nc->cap = cap;
        kv->chunks = c = nc;
    }
    char *p = c->data + c->used;
    memcpy(p, s, n);
    p[n] = '\0';
    c->used += n + 1;
    kv->v[kv->n++] = p;
    return 0;
}

static void chunks_free(evd_chunk_t *c)
{
    while (c) {
        evd_chunk_t *next = c->next;
        free(c);
        c = next;
    }
}

void evd_keyvec_reset(evd_keyvec_t *kv)
{
    /* The newest chunk is the largest: keep it (when modest) and the pointer array. */
    evd_chunk_t *keep = kv->chunks;
    if (keep && keep->cap > 65536)
        keep = NULL;
    chunks_free(keep ? keep->next : kv->chunks);
    if (keep) {
        keep->next = NULL;
        keep->used = 0;
    }
    kv->chunks = keep;
    if (kv->cap > 4096) {
        free(kv->v);
        kv->v = NULL;
        kv->cap = 0;
    }
    kv->n = 0;
}

void evd_keyvec_free(evd_keyvec_t *kv)
{
    chunks_free(kv->chunks);
    free(kv->v);
    kv->v = NULL;
    kv->chunks = NULL;
    kv->n = kv->cap = 0;
}

double evd_now_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

void evd_mask_quoted(char *s)
{
    for (char *p = strchr(s, '"'); p; p = strchr(p + 1, '"')) {
        char *close = strchr(p + 1, '"');
        if (!close)
            break;
        memset(p + 1, '*', (size_t)(close - p - 1));
        p = close;
    }
}

double evd_quantile(const double *sorted, size_t n, double q)
{
    double rank = ceil(q * (double)n);
    size_t i = rank < 1 ? 0 : (size_t)rank - 1;
    return sorted[i < n ? i : n - 1];
}

uint64_t evd_hash(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Linear probing; the table is kept at most half full. Slots hold owned copies. */
static size_t set_find(const evd_set_t *s, const char *k, size_t n)
{
    size_t mask = s->cap - 1;
    size_t i = (size_t)evd_hash(k, n) & mask;
    while (s->slots[i]) {
        if (s->lens[i] == n && memcmp(s->slots[i], k, n) == 0)
            return i;
        i = (i + 1) & mask;
    }
    return i;
}

static int set_grow(evd_set_t *s)
{
    size_t cap = s->cap ? s->cap * 2 : 16;
    evd_set_t ns = {.cap = cap, .n = s->n};
    ns.slots = calloc(cap, sizeof(*ns.slots));
    ns.lens = calloc(cap, sizeof(*ns.lens));
    if (!ns.slots || !ns.lens) {
        free(ns.slots);
        free(ns.lens);
        return -ENOMEM;
    }
    for (size_t i = 0; i < s->cap; i++) {
        if (!s->slots[i])
            continue;
        size_t j = set_find(&ns, s->slots[i], s->lens[i]);
        ns.slots[j] = s->slots[i];
        ns.lens[j] = s->lens[i];
    }
    free(s->slots);
    free(s->lens);
    *s = ns;
    return 0;
}

int evd_set_add(evd_set_t *s, const char *k, size_t n)
{
    if ((s->n + 1) * 2 > s->cap && set_grow(s) < 0)
        return -ENOMEM;
    size_t i = set_find(s, k, n);
    if (s->slots[i])
        return 0;
    char *copy = malloc(n + 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, k, n);
    copy[n] = '\0';
    s->slots[i] = copy;
    s->lens[i] = n;
    s->n++;
    return 1;
}

bool evd_set_has(const evd_set_t *s, const char *k, size_t n)
{
    if (!s->cap)
        return false;
    return s->slots[set_find(s, k, n)] != NULL;
}

void evd_set_clear(evd_set_t *s)
{
    if (!s->n)
        return;
    for (size_t i = 0; i < s->cap; i++) {
        free(s->slots[i]);
        s->slots[i] = NULL;
    }
    s->n = 0;
}

void evd_set_free(evd_set_t *s)
{
    evd_set_clear(s);
    free(s->slots);
    free(s->lens);
    s->slots = NULL;
    s->lens = NULL;
    s->cap = 0;
}
