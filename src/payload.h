/* payload.h - the change payload (NOTIFY or outbox row) parsed into a plain struct. Pure.
 *
 * The parser is specialised for the payload form (SPEC "Change payload"): one pass over the
 * text, one arena per change, no tree of JSON objects. tests/unit/test_payload_cross.c and
 * tests/fuzz/fuzz_payload.c check that it accepts exactly what a jansson-based parser
 * accepts and extracts the same values. */
#ifndef EVD_PAYLOAD_H
#define EVD_PAYLOAD_H

#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
#include "util.h"

typedef enum { EVD_OP_INSERT = 1, EVD_OP_UPDATE = 2, EVD_OP_DELETE = 4, EVD_OP_TRUNCATE = 8, EVD_OP_ALL = 15 } evd_op_t;

const char *evd_op_name(evd_op_t op);
/* Returns the op for "INSERT".. or 0. */
evd_op_t evd_op_parse(const char *s);

typedef enum {
    EVD_V_NULL = 0,
    EVD_V_INT,  /* i holds the value (s is NULL) */
    EVD_V_REAL, /* a JSON number with a fraction or exponent: d holds it, s as written */
    EVD_V_STR,  /* s holds the decoded UTF-8 text (never a NUL inside) */
    EVD_V_TRUE,
    EVD_V_FALSE,
    EVD_V_JSON /* an object or array (json/jsonb columns): s holds it as compact JSON */
} evd_vtype_t;

typedef struct evd_value {
    evd_vtype_t type;
    uint32_t len;  /* bytes at s */
    const char *s; /* NUL-terminated; NULL for null/true/false */
    int64_t i;
    double d;
} evd_value_t;

typedef struct evd_col {
    const char *name; /* NUL-terminated */
    uint32_t nlen;
    evd_value_t v;
} evd_col_t;

/* A row image: the captured columns in payload order. */
typedef struct evd_image {
    evd_col_t *cols;
    uint32_t ncols;
} evd_image_t;

/* The value of column name in img, or NULL when the image does not hold it. */
const evd_value_t *evd_image_get(const evd_image_t *img, const char *name, size_t len);

/* One row: its old and new images (either may be NULL). */
typedef struct evd_row {
    const evd_image_t *old_img;
    const evd_image_t *new_img;
} evd_row_t;

typedef enum {
    EVD_PAYLOAD_OK = 0,
    EVD_PAYLOAD_DOORBELL = 1, /* the empty payload: drain the outbox */
    EVD_PAYLOAD_BAD = -1      /* not JSON or not of the payload form */
} evd_payload_status_t;

typedef struct evd_arena_block evd_arena_block_t;

typedef struct evd_change {
    int64_t id; /* outbox id, or -1 when null (not durable) */
    int64_t tx; /* -1 when absent */
    double ts;  /* epoch ms, 0 when absent */
    char schema[64];
    char table[64];
    evd_op_t op; /* 0 when the change holds nothing (cleared) */
    bool ref;    /* oversize reference: images unknown */
    bool has_ts;
    size_t nrows;
    evd_row_t *rows; /* in the arena */
    evd_arena_block_t *arena;
} evd_change_t;

/* Parses buf[0..len). On EVD_PAYLOAD_OK fills *out (release with evd_change_clear). On
 * EVD_PAYLOAD_BAD writes a one-line reason into err and leaves *out cleared. Never aborts on any
 * input (jansson is used only for json/jsonb column values). */
evd_payload_status_t evd_payload_parse(const char *buf, size_t len, evd_change_t *out, char *err,
                                       size_t errlen) EVD_MUST_CHECK;
void evd_change_clear(evd_change_t *c);

/* For a caller that parses one change at a time: the parse takes its first block from *spare
 * when it is big enough, and evd_change_clear_spare keeps that block (up to 64 KiB) in *spare
 * for the next parse, so a steady stream of changes allocates nothing per change.
 * evd_arena_spare_free releases it. */
evd_payload_status_t evd_payload_parse_spare(const char *buf, size_t len, evd_change_t *out, evd_arena_block_t **spare,
                                             char *err, size_t errlen) EVD_MUST_CHECK;
void evd_change_clear_spare(evd_change_t *c, evd_arena_block_t **spare);
void evd_arena_spare_free(evd_arena_block_t **spare);

/* Appends the change as compact JSON in the payload form (for dead-letter lines). */
int evd_change_to_json(const evd_change_t *c, evd_buf_t *out) EVD_MUST_CHECK;

#endif
