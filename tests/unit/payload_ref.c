/* payload_ref.c - the reference payload parser built on jansson: the cross-check tests demand that
 * src/payload.c accepts exactly what this accepts and extracts the same values. Test code only. */
#include "payload_ref.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool bad(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return false;
}

/* An image is an object of scalars (or null); containers are allowed as column values since
 * json/jsonb columns may be captured. */
static bool check_image(json_t *img, const char *what, char *err, size_t errlen)
{
    if (!json_is_object(img))
        return bad(err, errlen, "\"%s\" is not an object", what);
    return true;
}

/* Checks the images a row carries against the op: INSERT new, DELETE old, UPDATE both (a
 * statement chunk may carry UPDATE images unpaired). */
static bool check_row(evd_op_t op, ref_row_t *row, bool chunk, char *err, size_t errlen)
{
    if (row->old_img && !check_image(row->old_img, "old", err, errlen))
        return false;
    if (row->new_img && !check_image(row->new_img, "new", err, errlen))
        return false;
    switch (op) {
    case EVD_OP_INSERT:
        if (row->old_img || !row->new_img)
            return bad(err, errlen, "%s carries \"new\" only", "INSERT");
        break;
    case EVD_OP_DELETE:
        if (row->new_img || !row->old_img)
            return bad(err, errlen, "%s carries \"old\" only", "DELETE");
        break;
    case EVD_OP_UPDATE:
        if (chunk ? (!row->old_img && !row->new_img) : (!row->old_img || !row->new_img))
            return bad(err, errlen, "%s lacks \"old\" or \"new\"", "UPDATE");
        break;
    default: break;
    }
    return true;
}

static bool copy_name(char *dst, size_t cap, json_t *v, const char *field, char *err, size_t errlen)
{
    if (!json_is_string(v))
        return bad(err, errlen, "\"%s\" missing or not a string", field);
    size_t n = json_string_length(v);
    const char *s = json_string_value(v);
    if (n == 0 || n >= cap || memchr(s, '\0', n))
        return bad(err, errlen, "\"%s\" is empty, too long or holds NUL", field);
    memcpy(dst, s, n + 1);
    return true;
}

evd_payload_status_t ref_payload_parse(const char *buf, size_t len, ref_change_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->id = -1;
    out->tx = -1;
    if (len == 0)
        return EVD_PAYLOAD_DOORBELL;

    /* jansson's stream layer skips NUL bytes; a payload never holds one (PostgreSQL text
     * cannot), so the form refuses it outright, as the one-pass parser does. */
    if (memchr(buf, '\0', len)) {
        snprintf(err, errlen, "not JSON: NUL byte");
        return EVD_PAYLOAD_BAD;
    }
    json_error_t jerr;
    json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "not JSON: %s at column %d", jerr.text, jerr.column);
        return EVD_PAYLOAD_BAD;
    }
    out->root = root;
    if (!json_is_object(root)) {
        bad(err, errlen, "%s", "not a JSON object");
        goto fail;
    }
    json_t *v = json_object_get(root, "v");
    if (!json_is_integer(v) || json_integer_value(v) != 1) {
        bad(err, errlen, "%s", "unknown or missing \"v\" (expected 1)");
        goto fail;
    }
    const char *key;
    json_t *val;
    static const char *const known[] = {"v", "id", "tx", "ts", "schema", "table", "op", "old", "new", "rows", "ref"};
    json_object_foreach (root, key, val) {
        size_t i;
        for (i = 0; i < EVD_ARRAY_LEN(known); i++)
            if (strcmp(key, known[i]) == 0)
                break;
        if (i == EVD_ARRAY_LEN(known)) {
            bad(err, errlen, "unknown field \"%s\"", key);
            goto fail;
        }
    }
    v = json_object_get(root, "id");
    if (json_is_integer(v) && json_integer_value(v) > 0) {
        out->id = json_integer_value(v);
    } else if (v && !json_is_null(v)) {
        bad(err, errlen, "%s", "\"id\" is not a positive integer or null");
        goto fail;
    }
    v = json_object_get(root, "tx");
    if (json_is_integer(v)) {
        out->tx = json_integer_value(v);
    } else if (v && !json_is_null(v)) {
        bad(err, errlen, "%s", "\"tx\" is not an integer");
        goto fail;
    }
    v = json_object_get(root, "ts");
    if (json_is_number(v)) {
        out->ts = json_number_value(v);
    } else if (v && !json_is_null(v)) {
        bad(err, errlen, "%s", "\"ts\" is not a number");
        goto fail;
    }
    if (!copy_name(out->schema, sizeof(out->schema), json_object_get(root, "schema"), "schema", err, errlen) ||
        !copy_name(out->table, sizeof(out->table), json_object_get(root, "table"), "table", err, errlen))
        goto fail;
    v = json_object_get(root, "op");
    out->op = json_is_string(v) ? evd_op_parse(json_string_value(v)) : 0;
    if (!out->op) {
        bad(err, errlen, "%s", "\"op\" missing or not INSERT, UPDATE, DELETE or TRUNCATE");
        goto fail;
    }
    json_t *ref = json_object_get(root, "ref");
    json_t *rows = json_object_get(root, "rows");
    json_t *old_img = json_object_get(root, "old");
    json_t *new_img = json_object_get(root, "new");
    if (ref) {
        if (!json_is_true(ref) || rows || old_img || new_img) {
            bad(err, errlen, "%s", "\"ref\" must be true and come without images");
            goto fail;
        }
        out->ref = true;
        return EVD_PAYLOAD_OK;
    }
    if (out->op == EVD_OP_TRUNCATE) {
        if (rows || old_img || new_img) {
            bad(err, errlen, "%s", "TRUNCATE carries no images");
            goto fail;
        }
        return EVD_PAYLOAD_OK;
    }
    if (rows) {
        if (old_img || new_img || !json_is_array(rows) || json_array_size(rows) == 0 || json_array_size(rows) > 500) {
            bad(err, errlen, "%s", "\"rows\" must be an array of 1..500 images, without old/new");
            goto fail;
        }
        size_t n = json_array_size(rows);
        out->rows = calloc(n, sizeof(*out->rows));
        if (!out->rows) {
            bad(err, errlen, "%s", "out of memory");
            goto fail;
        }
        out->nrows = n;
        for (size_t i = 0; i < n; i++) {
            json_t *r = json_array_get(rows, i);
            if (!json_is_object(r) || json_object_size(r) == 0) {
                bad(err, errlen, "%s", "\"rows\" entry is not an object with old/new");
                goto fail;
            }
            json_object_foreach (r, key, val) {
                if (strcmp(key, "old") && strcmp(key, "new")) {
                    bad(err, errlen, "unknown field \"%s\" in a row", key);
                    goto fail;
                }
            }
            out->rows[i].old_img = json_object_get(r, "old");
            out->rows[i].new_img = json_object_get(r, "new");
            if (!check_row(out->op, &out->rows[i], true, err, errlen))
                goto fail;
        }
        return EVD_PAYLOAD_OK;
    }
    out->one_row.old_img = old_img;
    out->one_row.new_img = new_img;
    out->rows = &out->one_row;
    out->nrows = 1;
    if (!check_row(out->op, &out->one_row, false, err, errlen))
        goto fail;
    return EVD_PAYLOAD_OK;
fail:
    ref_change_clear(out);
    return EVD_PAYLOAD_BAD;
}

void ref_change_clear(ref_change_t *c)
{
    if (c->rows && c->rows != &c->one_row)
        free(c->rows);
    json_decref(c->root);
    memset(c, 0, sizeof(*c));
    c->id = -1;
    c->tx = -1;
}
