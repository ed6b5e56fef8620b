/* payload_cross.c - the cross-check of the one-pass payload parser against the jansson one. */
#include "payload_cross.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "payload.h"
#include "payload_ref.h"

static int differ(char *why, size_t whylen, const char *what)
{
    snprintf(why, whylen, "%s", what);
    return -1;
}

static int same_value(const evd_value_t *v, const json_t *j, char *why, size_t whylen)
{
    switch (json_typeof(j)) {
    case JSON_NULL: return v->type == EVD_V_NULL ? 0 : differ(why, whylen, "null differs");
    case JSON_TRUE: return v->type == EVD_V_TRUE ? 0 : differ(why, whylen, "true differs");
    case JSON_FALSE: return v->type == EVD_V_FALSE ? 0 : differ(why, whylen, "false differs");
    case JSON_INTEGER:
        return v->type == EVD_V_INT && v->i == json_integer_value(j) ? 0 : differ(why, whylen, "integer differs");
    case JSON_REAL:
        return v->type == EVD_V_REAL && memcmp(&v->d, &(double){json_real_value(j)}, sizeof(double)) == 0
                   ? 0
                   : differ(why, whylen, "real differs");
    case JSON_STRING:
        return v->type == EVD_V_STR && v->len == json_string_length(j) &&
                       memcmp(v->s, json_string_value(j), v->len) == 0 && v->s[v->len] == '\0'
                   ? 0
                   : differ(why, whylen, "string differs");
    default: {
        char *dump = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
        int rc = dump && v->type == EVD_V_JSON && strlen(dump) == v->len && memcmp(dump, v->s, v->len) == 0
                     ? 0
                     : differ(why, whylen, "container differs");
        free(dump);
        return rc;
    }
    }
}

static int same_image(const evd_image_t *img, const json_t *j, char *why, size_t whylen)
{
    if (!img || !j)
        return !img && !j ? 0 : differ(why, whylen, "image presence differs");
    if (img->ncols != json_object_size(j))
        return differ(why, whylen, "column count differs");
    const char *key;
    json_t *val;
    json_object_foreach ((json_t *)j, key, val) {
        const evd_value_t *v = evd_image_get(img, key, strlen(key));
        if (!v)
            return differ(why, whylen, "column missing");
        if (same_value(v, val, why, whylen) < 0)
            return -1;
    }
    return 0;
}

int payload_cross_check(const uint8_t *data, size_t size, char *why, size_t whylen)
{
    evd_change_t a;
    ref_change_t b;
    char ea[256], eb[256];
    evd_payload_status_t sa = evd_payload_parse((const char *)data, size, &a, ea, sizeof(ea));
    evd_payload_status_t sb = ref_payload_parse((const char *)data, size, &b, eb, sizeof(eb));
    int rc = 0;
    if (sa != sb) {
        snprintf(why, whylen, "status %d vs reference %d (%s | %s)", (int)sa, (int)sb, sa == EVD_PAYLOAD_BAD ? ea : "",
                 sb == EVD_PAYLOAD_BAD ? eb : "");
        rc = -1;
    } else if (sa == EVD_PAYLOAD_OK) {
        if (a.id != b.id || a.tx != b.tx || a.ts != b.ts || a.op != b.op || a.ref != b.ref ||
            strcmp(a.schema, b.schema) || strcmp(a.table, b.table) || a.nrows != b.nrows)
            rc = differ(why, whylen, "header fields differ");
        for (size_t i = 0; rc == 0 && i < a.nrows; i++) {
            if (same_image(a.rows[i].old_img, b.rows[i].old_img, why, whylen) < 0 ||
                same_image(a.rows[i].new_img, b.rows[i].new_img, why, whylen) < 0)
                rc = -1;
        }
        /* The dead-letter form of the change parses back to the same change. */
        if (rc == 0) {
            evd_buf_t out = {0};
            evd_change_t c;
            char ec[256];
            if (evd_change_to_json(&a, &out) < 0 ||
                evd_payload_parse(out.data, out.len, &c, ec, sizeof(ec)) != EVD_PAYLOAD_OK) {
                rc = differ(why, whylen, "evd_change_to_json does not parse back");
            } else {
                if (c.id != a.id || c.op != a.op || c.nrows != a.nrows || c.ref != a.ref)
                    rc = differ(why, whylen, "evd_change_to_json changes the change");
                evd_change_clear(&c);
            }
            evd_buf_free(&out);
        }
    }
    if (sa == EVD_PAYLOAD_OK)
        evd_change_clear(&a);
    if (sb == EVD_PAYLOAD_OK)
        ref_change_clear(&b);
    return rc;
}
