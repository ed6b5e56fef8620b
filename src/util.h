/* util.h - small shared helpers: container_of, growable buffers, string vectors. */
#ifndef EVD_UTIL_H
#define EVD_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define EVD_MUST_CHECK __attribute__((warn_unused_result))
#define EVD_PRINTF(a, b) __attribute__((format(printf, a, b)))

#define evd_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#define EVD_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* A growable byte buffer, always NUL-terminated when len > 0 or after evd_buf_cstr(). */
typedef struct evd_buf {
    char *data;
    size_t len;
    size_t cap;
} evd_buf_t;

int evd_buf_reserve(evd_buf_t *b, size_t extra) EVD_MUST_CHECK;
int evd_buf_append(evd_buf_t *b, const char *s, size_t n) EVD_MUST_CHECK;
int evd_buf_puts(evd_buf_t *b, const char *s) EVD_MUST_CHECK;
int evd_buf_putc(evd_buf_t *b, char c) EVD_MUST_CHECK;
int evd_buf_printf(evd_buf_t *b, const char *fmt, ...) EVD_PRINTF(2, 3) EVD_MUST_CHECK;
/* Length of the valid UTF-8 sequence at p (n bytes left), or 0. */
size_t evd_utf8_len(const unsigned char *p, size_t n);
/* Appends s as a JSON string literal (with quotes); invalid UTF-8 becomes U+FFFD, so the result
 * is always valid JSON (a dead-letter line that replay can read). */
int evd_buf_json_str(evd_buf_t *b, const char *s, size_t n) EVD_MUST_CHECK;
void evd_buf_reset(evd_buf_t *b);
void evd_buf_free(evd_buf_t *b);

/* A vector of owned C strings. */
typedef struct evd_strv {
    char **v;
    size_t n;
    size_t cap;
} evd_strv_t;

int evd_strv_push(evd_strv_t *sv, const char *s, size_t n) EVD_MUST_CHECK;
void evd_strv_free(evd_strv_t *sv);

/* Strings stored in chained chunks: one allocation per chunk of bytes, none per string, so the
 * keys of a change cost two allocations however many there are. v[i] stay valid until free. */
typedef struct evd_chunk evd_chunk_t;
typedef struct evd_keyvec {
    char **v;
    size_t n;
    size_t cap;
    evd_chunk_t *chunks;
} evd_keyvec_t;

int evd_keyvec_push(evd_keyvec_t *kv, const char *s, size_t n) EVD_MUST_CHECK;
/* Empties kv, keeping its pointer array and newest chunk (when modest) for reuse. */
void evd_keyvec_reset(evd_keyvec_t *kv);
void evd_keyvec_free(evd_keyvec_t *kv);

/* Monotonic clock in milliseconds and wall clock in epoch milliseconds. */
double evd_now_wall_ms(void);

/* The q-quantile (0 < q <= 1) of n > 0 ascending values, by nearest rank: the smallest value
 * with at least q*n values at or below it. */
double evd_quantile(const double *sorted, size_t n, double q);

/* Replaces each character inside every pair of double quotes in s with '*', in place: libpq quotes the
 * raw value it cannot parse, which may be a URL's password ("invalid percent-encoded token"). */
void evd_mask_quoted(char *s);

/* FNV-1a hash of n bytes. */
uint64_t evd_hash(const void *p, size_t n);

/* Set of byte strings (open addressing, owns copies). Used to deduplicate keys. */
typedef struct evd_set {
    char **slots;
    size_t *lens;
    size_t cap; /* power of two or 0 */
    size_t n;
} evd_set_t;

/* Returns 1 if added, 0 if already present, -ENOMEM. */
int evd_set_add(evd_set_t *s, const char *k, size_t n) EVD_MUST_CHECK;
bool evd_set_has(const evd_set_t *s, const char *k, size_t n);
void evd_set_clear(evd_set_t *s);
void evd_set_free(evd_set_t *s);

#endif
