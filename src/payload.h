/* payload.h - the change payload (NOTIFY or outbox row) parsed into a plain struct. Pure. */
#ifndef EVD_PAYLOAD_H
#define EVD_PAYLOAD_H

#include <jansson.h>
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
#include "util.h"

typedef enum {
    EVD_OP_INSERT = 1,
    EVD_OP_UPDATE = 2,
    EVD_OP_DELETE = 4,
    EVD_OP_TRUNCATE = 8,
    EVD_OP_ALL = 15
} evd_op_t;

const char *evd_op_name(evd_op_t op);
/* Returns the op for "INSERT".. or 0. */
evd_op_t evd_op_parse(const char *s);

/* One row: its old and new images (borrowed from the change's root; either may be NULL). */
typedef struct evd_row {
    json_t *old_img;
    json_t *new_img;
} evd_row_t;

typedef enum {
    EVD_PAYLOAD_OK = 0,
    EVD_PAYLOAD_DOORBELL = 1, /* the empty payload: drain the outbox */
    EVD_PAYLOAD_BAD = -1      /* not JSON or not of the payload form */
} evd_payload_status_t;

typedef struct evd_change {
    json_t *root;   /* owned; NULL for a doorbell */
    int64_t id;     /* outbox id, or -1 when null (not durable) */
    int64_t tx;     /* -1 when absent */
    double ts;      /* epoch ms, 0 when absent */
    char schema[64];
    char table[64];
    evd_op_t op;
    bool ref;       /* oversize reference: images unknown */
    size_t nrows;
    evd_row_t *rows; /* points at one_row for a single change, else owned array */
    evd_row_t one_row;
} evd_change_t;

/* Parses buf[0..len). On EVD_PAYLOAD_OK fills *out (release with evd_change_clear). On
 * EVD_PAYLOAD_BAD writes a one-line reason into err. Never aborts on any input. */
evd_payload_status_t evd_payload_parse(const char *buf, size_t len, evd_change_t *out, char *err,
                                       size_t errlen) EVD_MUST_CHECK;
void evd_change_clear(evd_change_t *c);

#endif
