/* payload_ref.h - the jansson-based reference payload parser (tests only). */
#ifndef EVD_PAYLOAD_REF_H
#define EVD_PAYLOAD_REF_H

#include <jansson.h>
#include "payload.h"

typedef struct ref_row {
    json_t *old_img;
    json_t *new_img;
} ref_row_t;

typedef struct ref_change {
    json_t *root;
    int64_t id;
    int64_t tx;
    double ts;
    char schema[64];
    char table[64];
    evd_op_t op;
    bool ref;
    size_t nrows;
    ref_row_t *rows;
    ref_row_t one_row;
} ref_change_t;

evd_payload_status_t ref_payload_parse(const char *buf, size_t len, ref_change_t *out, char *err, size_t errlen);
void ref_change_clear(ref_change_t *c);

#endif
