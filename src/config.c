/* config.c - loads the JSON config: settings table, ${ENV} expansion, strict validation, rules. */
#include "config.h"

#include <jansson.h>

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define OFF(f) offsetof(evd_config_t, f)
#define MIB (1024LL * 1024)

/* The one declarative table of scalar settings: parsing, defaults, ranges and the README. */
const evd_setting_t evd_settings[] = {
    {"postgres.url", EVD_SET_STR, OFF(pg_url), 0, NULL, 0, 0, NULL,
     "libpq connection string or URI; PG* variables work (required)"},
    {"postgres.poll_interval_ms", EVD_SET_INT, OFF(poll_interval_ms), 250, NULL, 10, 60000, NULL,
     "safety poll of the outbox while idle"},
    {"batch.max_keys", EVD_SET_INT, OFF(batch_max_keys), 512, NULL, 1, 100000, NULL, "keys per pipelined UNLINK batch"},
    {"batch.max_delay_ms", EVD_SET_INT, OFF(batch_max_delay_ms), 1, NULL, 0, 1000, NULL,
     "while a batch is in flight, the longest the next one waits to fill"},
    {"batch.max_pending", EVD_SET_INT, OFF(batch_max_pending), 10000, NULL, 1, 10000000, NULL,
     "changes held in memory; past it evictd stops reading"},
    {"batch.redelete_after_ms", EVD_SET_INT, OFF(redelete_after_ms), 0, NULL, 0, 60000, NULL,
     "delete the same keys again after this delay (0: off)"},
    {"retry.max_attempts", EVD_SET_INT, OFF(retry_max_attempts), 10, NULL, 1, 1000000, NULL,
     "attempts per batch and target, across reconnects"},
    {"retry.initial_backoff_ms", EVD_SET_INT, OFF(retry_initial_backoff_ms), 50, NULL, 1, 3600000, NULL,
     "full-jitter backoff lower bound"},
    {"retry.max_backoff_ms", EVD_SET_INT, OFF(retry_max_backoff_ms), 5000, NULL, 1, 3600000, NULL,
     "full-jitter backoff upper bound"},
    {"dead_letter.path", EVD_SET_STR, OFF(dl_path), 0, "/var/lib/evictd/dead-letter.jsonl", 0, 0, NULL,
     "JSON lines file"},
    {"dead_letter.max_bytes", EVD_SET_INT, OFF(dl_max_bytes), 1024 * MIB, NULL, MIB, 1024 * 1024 * MIB, NULL,
     "past it, bad-input lines are only counted"},
    {"log.format", EVD_SET_ENUM, OFF(log_format), 0, "text", 0, 0, "text|json", "also set by --log-format"},
    {"log.level", EVD_SET_ENUM, OFF(log_level), 0, "info", 0, 0, "debug|info|warn|error", "also set by --log-level"},
    {"log.stats_interval_s", EVD_SET_INT, OFF(stats_interval_s), 60, NULL, 0, 86400, NULL,
     "stats line period (0: off)"},
    {"http.listen", EVD_SET_STR, OFF(http_listen), 0, NULL, 0, 0, NULL,
     "host:port for /healthz, /readyz, /metrics (absent: off)"},
    {"shutdown_timeout_ms", EVD_SET_INT, OFF(shutdown_timeout_ms), 5000, NULL, 0, 600000, NULL,
     "longest wait for in-flight work on SIGTERM"},
};
const size_t evd_nsettings = EVD_ARRAY_LEN(evd_settings);

typedef struct ctx {
    const char *path;
    const char *text;
    evd_getenv_fn env;
    char *err;
    size_t errlen;
} ctx_t;

/* ---- locating a JSON path in the source text, for line:column in messages ---- */

typedef struct scan {
    const char *s;
    size_t i, n;
    const char *target;
    size_t found; /* offset + 1 of the target's value */
} scan_t;

static void scan_ws(scan_t *sc)
{
    while (sc->i < sc->n && isspace((unsigned char)sc->s[sc->i]))
        sc->i++;
}

static void scan_string(scan_t *sc)
{
    sc->i++;
    while (sc->i < sc->n && sc->s[sc->i] != '"') {
        if (sc->s[sc->i] == '\\')
            sc->i++;
        sc->i++;
    }
    sc->i++;
}

static void scan_value(scan_t *sc, char *path, size_t plen, int depth)
{
    scan_ws(sc);
    if (sc->i >= sc->n || sc->found)
        return;
    if (strcmp(path, sc->target) == 0) {
        sc->found = sc->i + 1;
        return;
    }
    char c = sc->s[sc->i];
    if ((c == '{' || c == '[') && depth > 64) {
        /* Too deep to track: skip the container whole, so the scan goes on after it (returning
         * without consuming it would make the caller's loop spin forever). */
        size_t open = 0;
        while (sc->i < sc->n) {
            c = sc->s[sc->i];
            if (c == '"') {
                scan_string(sc);
                continue;
            }
            sc->i++;
            if (c == '{' || c == '[')
                open++;
            else if ((c == '}' || c == ']') && --open == 0)
                return;
        }
        return;
    }
    if (c == '{') {
        sc->i++;
        for (;;) {
            scan_ws(sc);
            if (sc->i >= sc->n || sc->s[sc->i] == '}') {
                sc->i++;
                return;
            }
            if (sc->s[sc->i] != '"')
                return;
            size_t ks = sc->i + 1;
            scan_string(sc);
            size_t ke = sc->i - 1;
            scan_ws(sc);
            if (sc->i < sc->n && sc->s[sc->i] == ':')
                sc->i++;
            size_t add = ke - ks + 1;
            if (plen + add + 2 < 512) {
                size_t p = plen;
                if (plen)
                    path[p++] = '.';
                memcpy(path + p, sc->s + ks, ke - ks);
                path[p + ke - ks] = '\0';
                scan_value(sc, path, p + ke - ks, depth + 1);
                path[plen] = '\0';
            } else {
                scan_value(sc, path, plen, depth + 1);
            }
            if (sc->found)
                return;
            scan_ws(sc);
            if (sc->i < sc->n && sc->s[sc->i] == ',')
                sc->i++;
        }
    } else if (c == '[') {
        sc->i++;
        for (size_t idx = 0;; idx++) {
            scan_ws(sc);
            if (sc->i >= sc->n || sc->s[sc->i] == ']') {
                sc->i++;
                return;
            }
            char ix[32];
            int w = snprintf(ix, sizeof(ix), "[%zu]", idx);
            if (plen + (size_t)w < 512) {
                memcpy(path + plen, ix, (size_t)w + 1);
                scan_value(sc, path, plen + (size_t)w, depth + 1);
            } else {
                scan_value(sc, path, plen, depth + 1);
            }
            path[plen] = '\0';
            if (sc->found)
                return;
            scan_ws(sc);
            if (sc->i < sc->n && sc->s[sc->i] == ',')
                sc->i++;
        }
    } else if (c == '"') {
        scan_string(sc);
    } else {
        while (sc->i < sc->n && !strchr(",]} \t\r\n", sc->s[sc->i]))
            sc->i++;
    }
}

/* Finds "line:col" of the value at jpath (e.g. rules[1].keys[0]); returns false if not found. */
static bool find_pos(const char *text, const char *jpath, int *line, int *col)
{
    if (!text)
        return false;
    char path[512] = "";
    scan_t sc = {.s = text, .n = strlen(text), .target = jpath};
    scan_value(&sc, path, 0, 0);
    if (!sc.found)
        return false;
    *line = 1;
    *col = 1;
    for (size_t i = 0; i + 1 < sc.found; i++) {
        if (text[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
    return true;
}

/* Formats "file[:line:col]: jpath: why". Always returns NULL-ish false for chaining. */
EVD_PRINTF(3, 4) static bool fail(ctx_t *c, const char *jpath, const char *fmt, ...)
{
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    int line, col;
    if (jpath && find_pos(c->text, jpath, &line, &col))
        snprintf(c->err, c->errlen, "%s:%d:%d: %s: %s", c->path, line, col, jpath, why);
    else if (jpath)
        snprintf(c->err, c->errlen, "%s: %s: %s", c->path, jpath, why);
    else
        snprintf(c->err, c->errlen, "%s: %s", c->path, why);
    return false;
}

/* A short rendering of a JSON value for messages. */
static const char *show(const json_t *v, char *buf, size_t len)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!s) {
        snprintf(buf, len, "(unprintable)");
        return buf;
    }
    if (strlen(s) > 80)
        snprintf(buf, len, "%.77s...", s);
    else
        snprintf(buf, len, "%s", s);
    free(s);
    return buf;
}

static const char *typename(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* A string as config messages may show it: never a password (SPEC: passwords appear in no
 * line). Password fields show as ***, URLs keep everything but the password. */
static const char *redacted(const char *jpath, const char *s, char *buf, size_t len)
{
    size_t pl = jpath ? strlen(jpath) : 0;
    if (pl >= 8 && strcmp(jpath + pl - 8, "password") == 0)
        return "***";
    const char *scheme = strstr(s, "://");
    const char *at = scheme ? strrchr(scheme, '@') : NULL;
    const char *colon = scheme ? strchr(scheme + 3, ':') : NULL;
    const char *pw = strstr(s, "password=");
    if (at && colon && colon < at) {
        snprintf(buf, len, "%.*s***%s", (int)(colon + 1 - s), s, at);
    } else if (pw) {
        const char *end = pw + 9;
        while (*end && *end != ' ')
            end++;
        snprintf(buf, len, "%.*s***%s", (int)(pw + 9 - s), s, end);
    } else {
        snprintf(buf, len, "%s", s);
    }
    return buf;
}

/* ---- ${NAME} / ${NAME:-default} expansion ---- */

/* Expands s, a part of the setting's whole value (shown, redacted, in errors); depth counts the
 * defaults it is nested in. */
static char *expand_in(ctx_t *c, const char *jpath, const char *s, const char *whole, int depth)
{
    evd_buf_t b = {0};
    char shown[512];
    const char *p = s;
    if (evd_buf_reserve(&b, strlen(s)) < 0)
        goto oom;
    while (*p) {
        if (p[0] == '$' && p[1] == '$' && p[2] == '{') {
            if (evd_buf_append(&b, "${", 2) < 0)
                goto oom;
            p += 3;
            continue;
        }
        if (p[0] == '$' && p[1] == '{') {
            /* The name runs to "}" or ":-"; a default runs to the "}" that matches its "${",
             * counting the "${" (and "$${") inside it, and is expanded in turn. */
            const char *q = p + 2;
            while (isalnum((unsigned char)*q) || *q == '_')
                q++;
            const char *end = q, *dflt = NULL;
            if (q[0] == ':' && q[1] == '-') {
                dflt = q + 2;
                int open = 0;
                for (end = dflt; *end && (*end != '}' || open > 0); end++) {
                    if (*end == '}')
                        open--;
                    else if (end[0] == '$' && end[1] == '{')
                        open++;
                }
            } else if (*q != '}') {
                end = strchr(q, '}');
            }
            if (!end || !*end) {
                fail(c, jpath, "unterminated '${' in \"%s\"", redacted(jpath, whole, shown, sizeof(shown)));
                goto err;
            }
            char name[256];
            size_t nlen = (size_t)((dflt ? dflt - 2 : end) - (p + 2));
            if (nlen == 0 || nlen >= sizeof(name)) {
                fail(c, jpath, "bad variable name in \"%s\"", redacted(jpath, whole, shown, sizeof(shown)));
                goto err;
            }
            memcpy(name, p + 2, nlen);
            name[nlen] = '\0';
            if (!dflt && q != end) {
                fail(c, jpath, "bad variable name \"%s\" in \"%s\"", name,
                     redacted(jpath, whole, shown, sizeof(shown)));
                goto err;
            }
            const char *val = c->env ? c->env(name) : NULL;
            /* As in the shell, ":-" also replaces a variable set to the empty string. */
            if (val && (val[0] || !dflt)) {
                if (evd_buf_puts(&b, val) < 0)
                    goto oom;
            } else if (dflt) {
                char *raw = strndup(dflt, (size_t)(end - dflt));
                if (!raw)
                    goto oom;
                char *val2 = NULL;
                if (depth >= 16)
                    fail(c, jpath, "defaults nested more than 16 deep in \"%s\"",
                         redacted(jpath, whole, shown, sizeof(shown)));
                else
                    val2 = expand_in(c, jpath, raw, whole, depth + 1);
                free(raw);
                if (!val2)
                    goto err;
                int rc = evd_buf_puts(&b, val2);
                free(val2);
                if (rc < 0)
                    goto oom;
            } else {
                fail(c, jpath, "environment variable %s is not set (write ${%s:-default} for a default)", name, name);
                goto err;
            }
            p = end + 1;
            continue;
        }
        if (evd_buf_putc(&b, *p++) < 0)
            goto oom;
    }
    if (!b.data && evd_buf_reserve(&b, 0) < 0)
        goto oom;
    b.data[b.len] = '\0';
    return b.data;
oom:
    fail(c, jpath, "out of memory");
err:
    evd_buf_free(&b);
    return NULL;
}

static char *expand_env(ctx_t *c, const char *jpath, const char *s)
{
    return expand_in(c, jpath, s, s, 0);
}

/* ---- typed getters ---- */

static bool get_string(ctx_t *c, const json_t *v, const char *jpath, char **out)
{
    char tmp[100], tmp2[128];
    if (!json_is_string(v))
        return fail(c, jpath, "expected a string, got %s %s", typename(v),
                    redacted(jpath, show(v, tmp, sizeof(tmp)), tmp2, sizeof(tmp2)));
    if (strlen(json_string_value(v)) != json_string_length(v))
        return fail(c, jpath, "string holds a NUL character");
    char *s = expand_env(c, jpath, json_string_value(v));
    if (!s)
        return false;
    free(*out);
    *out = s;
    return true;
}

static bool get_int(ctx_t *c, const json_t *v, const char *jpath, int64_t min, int64_t max, int64_t *out)
{
    char tmp[100];
    if (!json_is_integer(v))
        return fail(c, jpath, "expected an integer in %" PRId64 "..%" PRId64 ", got %s %s", min, max, typename(v),
                    show(v, tmp, sizeof(tmp)));
    int64_t x = json_integer_value(v);
    if (x < min || x > max)
        return fail(c, jpath, "%" PRId64 " is out of range %" PRId64 "..%" PRId64, x, min, max);
    *out = x;
    return true;
}

static bool check_keys(ctx_t *c, const json_t *obj, const char *jpath, const char *const *allowed)
{
    const char *key;
    json_t *val;
    char tmp[100];
    if (!json_is_object(obj))
        return fail(c, jpath[0] ? jpath : NULL, "expected an object, got %s %s", typename(obj),
                    show(obj, tmp, sizeof(tmp)));
    json_object_foreach ((json_t *)obj, key, val) {
        bool ok = false;
        for (size_t i = 0; allowed[i]; i++)
            if (strcmp(allowed[i], key) == 0)
                ok = true;
        if (!ok) {
            char p[256];
            snprintf(p, sizeof(p), "%s%s%s", jpath, jpath[0] ? "." : "", key);
            evd_buf_t list = {0};
            for (size_t i = 0; allowed[i]; i++)
                if (evd_buf_printf(&list, "%s%s", i ? ", " : "", allowed[i]) < 0)
                    break;
            fail(c, p, "unknown key \"%s\" (known: %s)", key, list.data ? list.data : "");
            evd_buf_free(&list);
            return false;
        }
    }
    return true;
}

/* Applies the settings table: defaults, then values found in the document. */
static bool apply_settings(ctx_t *c, const json_t *root, evd_config_t *cfg)
{
    for (size_t i = 0; i < evd_nsettings; i++) {
        const evd_setting_t *s = &evd_settings[i];
        char *field = (char *)cfg + s->offset;
        /* Find the value by its dotted name. */
        const json_t *v = root;
        char name[128];
        snprintf(name, sizeof(name), "%s", s->name);
        for (char *tok = name, *dot; v && tok; tok = dot ? dot + 1 : NULL) {
            dot = strchr(tok, '.');
            if (dot)
                *dot = '\0';
            v = json_is_object(v) ? json_object_get(v, tok) : NULL;
        }
        if (s->type == EVD_SET_INT) {
            *(int64_t *)field = s->def;
            if (v && !get_int(c, v, s->name, s->min, s->max, (int64_t *)field))
                return false;
            continue;
        }
        char **str = (char **)field;
        if (v) {
            if (!get_string(c, v, s->name, str))
                return false;
        } else if (s->def_str) {
            if (!(*str = strdup(s->def_str)))
                return fail(c, s->name, "out of memory");
        } else if (s->offset == OFF(pg_url)) {
            return fail(c, "postgres", "missing required key \"url\"");
        }
        if (s->type == EVD_SET_ENUM) {
            char choices[64];
            snprintf(choices, sizeof(choices), "%s", s->choices);
            bool ok = false;
            for (char *tok = strtok(choices, "|"); tok; tok = strtok(NULL, "|"))
                if (strcmp(tok, *str) == 0)
                    ok = true;
            if (!ok)
                return fail(c, s->name, "\"%s\" is not one of %s", *str, s->choices);
        }
    }
    return true;
}

/* ---- redis targets ---- */

/* Decodes %XX in place. %00 is refused (-EINVAL): a NUL would silently cut the value short. */
static int pct_decode(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r == '%' && isxdigit((unsigned char)r[1]) && isxdigit((unsigned char)r[2])) {
            char hex[3] = {r[1], r[2], 0};
            if ((*w++ = (char)strtol(hex, NULL, 16)) == '\0')
                return -EINVAL;
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
    return 0;
}

static char *dupn(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

int evd_redis_url_parse(evd_target_cfg_t *t, const char *url, char *err, size_t errlen)
{
    const char *p;
    if (strncmp(url, "unix://", 7) == 0) {
        p = url + 7;
        if (*p != '/') {
            snprintf(err, errlen, "unix URL needs an absolute path");
            return -EINVAL;
        }
        const char *q = strchr(p, '?');
        free(t->unix_path);
        t->unix_path = dupn(p, q ? (size_t)(q - p) : strlen(p));
        t->db = 0;
        if (q) {
            if (strncmp(q, "?db=", 4) != 0 || !q[4]) {
                snprintf(err, errlen, "unix URL accepts only ?db=N");
                return -EINVAL;
            }
            char *end;
            long db = strtol(q + 4, &end, 10);
            if (*end || db < 0 || db > 1000000) {
                snprintf(err, errlen, "bad db number");
                return -EINVAL;
            }
            t->db = (int)db;
        }
        return t->unix_path ? 0 : -ENOMEM;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        snprintf(err, errlen, "expected redis://[user[:password]@]host[:port][/db] or unix:///path[?db=N]");
        return -EINVAL;
    }
    p = url + 8;
    const char *slash = strchr(p, '/');
    const char *hostend = slash ? slash : p + strlen(p);
    const char *at = NULL;
    for (const char *q = p; q < hostend; q++)
        if (*q == '@')
            at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        char *user = dupn(p, colon ? (size_t)(colon - p) : (size_t)(at - p));
        char *pass = colon ? dupn(colon + 1, (size_t)(at - colon - 1)) : NULL;
        if (!user || (colon && !pass)) {
            free(user);
            free(pass);
            return -ENOMEM;
        }
        if (pct_decode(user) < 0 || (pass && pct_decode(pass) < 0)) {
            free(user);
            free(pass);
            snprintf(err, errlen, "%%00 (a NUL byte) in the user name or password");
            return -EINVAL;
        }
        if (!t->username && user[0])
            t->username = user;
        else
            free(user);
        if (!t->password && pass && pass[0])
            t->password = pass;
        else
            free(pass);
        p = at + 1;
    }
    const char *portp = NULL;
    const char *hs = p, *he;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(hostend - p));
        if (!rb) {
            snprintf(err, errlen, "unbalanced '[' in host");
            return -EINVAL;
        }
        hs = p + 1;
        he = rb;
        if (rb + 1 < hostend && rb[1] == ':') {
            portp = rb + 2;
        } else if (rb + 1 < hostend) {
            snprintf(err, errlen, "unexpected text after ']' in host");
            return -EINVAL;
        }
    } else {
        const char *colon = memchr(p, ':', (size_t)(hostend - p));
        he = colon ? colon : hostend;
        if (colon)
            portp = colon + 1;
    }
    if (he == hs) {
        snprintf(err, errlen, "missing host");
        return -EINVAL;
    }
    free(t->host);
    t->host = dupn(hs, (size_t)(he - hs));
    if (!t->host)
        return -ENOMEM;
    t->port = 6379;
    if (portp) {
        char *end;
        long port = strtol(portp, &end, 10);
        if (end != hostend || port < 1 || port > 65535) {
            snprintf(err, errlen, "bad port");
            return -EINVAL;
        }
        t->port = (int)port;
    }
    t->db = 0;
    if (slash && slash[1]) {
        char *end;
        long db = strtol(slash + 1, &end, 10);
        if (*end || db < 0 || db > 1000000) {
            snprintf(err, errlen, "bad db number");
            return -EINVAL;
        }
        t->db = (int)db;
    }
    return 0;
}

static bool parse_redis(ctx_t *c, const json_t *redis, evd_config_t *cfg)
{
    static const char *const allowed[] = {"url", "username", "password", "timeout_ms", NULL};
    char tmp[100];
    if (!redis)
        return fail(c, NULL, "missing required key \"redis\"");
    if (!json_is_object(redis) || json_object_size(redis) == 0)
        return fail(c, "redis", "expected an object of named targets, got %s", show(redis, tmp, sizeof(tmp)));
    cfg->targets = calloc(json_object_size(redis), sizeof(*cfg->targets));
    if (!cfg->targets)
        return fail(c, "redis", "out of memory");
    const char *name;
    json_t *tv;
    json_object_foreach ((json_t *)redis, name, tv) {
        char jp[256];
        snprintf(jp, sizeof(jp), "redis.%s", name);
        if (!check_keys(c, tv, jp, allowed))
            return false;
        evd_target_cfg_t *t = &cfg->targets[cfg->ntargets++];
        t->timeout_ms = 2000;
        if (!(t->name = strdup(name)))
            return fail(c, jp, "out of memory");
        char sub[300];
        json_t *v;
        snprintf(sub, sizeof(sub), "%s.username", jp);
        if ((v = json_object_get(tv, "username")) && !get_string(c, v, sub, &t->username))
            return false;
        snprintf(sub, sizeof(sub), "%s.password", jp);
        if ((v = json_object_get(tv, "password")) && !get_string(c, v, sub, &t->password))
            return false;
        /* An empty password (e.g. "${REDIS_PASSWORD:-}") means none. */
        if (t->password && !t->password[0]) {
            free(t->password);
            t->password = NULL;
        }
        if (t->username && !t->username[0]) {
            free(t->username);
            t->username = NULL;
        }
        snprintf(sub, sizeof(sub), "%s.timeout_ms", jp);
        int64_t to = 2000;
        if ((v = json_object_get(tv, "timeout_ms")) && !get_int(c, v, sub, 1, 600000, &to))
            return false;
        t->timeout_ms = (int)to;
        snprintf(sub, sizeof(sub), "%s.url", jp);
        if (!(v = json_object_get(tv, "url")))
            return fail(c, jp, "missing required key \"url\"");
        if (!get_string(c, v, sub, &t->url))
            return false;
        char why[256] = "out of memory";
        if (evd_redis_url_parse(t, t->url, why, sizeof(why)) < 0) {
            /* The parser's reason never quotes the URL: only this copy, without credentials. */
            char red[256];
            const char *at = strrchr(t->url, '@');
            snprintf(red, sizeof(red), "%s%s", at ? "redis://***" : t->url, at ? at : "");
            return fail(c, sub, "%s (got \"%s\")", why, red);
        }
    }
    return true;
}

/* ---- rules ---- */

static bool ident_ok(const char *s)
{
    if (!*s || isdigit((unsigned char)*s))
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '$')
            return false;
    return true;
}

static int target_index(const evd_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->ntargets; i++)
        if (strcmp(cfg->targets[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* Where the dollar quote opening at p ($$ or $tag$) closes, past its closing tag; NULL when p
 * opens none (then it may be a $n parameter) or it never closes. */
static const char *dollar_quote_end(const char *p, bool *opened)
{
    const char *t = p + 1;
    *opened = false;
    if (isdigit((unsigned char)*t))
        return NULL;
    while (isalnum((unsigned char)*t) || *t == '_' || (unsigned char)*t >= 0x80)
        t++;
    if (*t != '$')
        return NULL;
    *opened = true;
    size_t taglen = (size_t)(t - p) + 1;
    for (const char *q = t + 1; (q = strchr(q, '$')); q++)
        if (strncmp(q, p, taglen) == 0)
            return q + taglen;
    return NULL;
}

/* Highest $n in sql outside what PostgreSQL reads as text: quoted literals and identifiers,
 * E'' and dollar-quoted strings, -- and (nested) block comments, and names such as a$1. -1 for a $n
 * beyond 99. */
static int max_param(const char *sql)
{
    int max = 0;
    for (const char *p = sql; *p; p++) {
        if (*p == '\'' || *p == '"') {
            const char *q = strchr(p + 1, *p); /* a doubled quote closes and reopens: same result */
            if (!q)
                break;
            p = q;
        } else if (p[0] == '-' && p[1] == '-') {
            p += strcspn(p, "\n");
            if (!*p)
                break;
        } else if (p[0] == '/' && p[1] == '*') {
            int depth = 1;
            for (p += 2; *p && depth > 0; p++) {
                if (p[0] == '/' && p[1] == '*')
                    depth++, p++;
                else if (p[0] == '*' && p[1] == '/')
                    depth--, p++;
            }
            if (!*p)
                break;
            p--;
        } else if ((*p == 'E' || *p == 'e') && p[1] == '\'') {
            /* E'...': a backslash escapes the next character, and '' is a quote in it. */
            for (p += 2; *p && (*p != '\'' || p[1] == '\''); p++)
                if ((*p == '\\' || *p == '\'') && p[1])
                    p++;
            if (!*p)
                break;
        } else if (isalnum((unsigned char)*p) || *p == '_' || (unsigned char)*p >= 0x80) {
            while (isalnum((unsigned char)p[1]) || p[1] == '_' || p[1] == '$' || (unsigned char)p[1] >= 0x80)
                p++;
        } else if (*p == '$') {
            bool opened;
            const char *q = dollar_quote_end(p, &opened);
            if (opened) {
                if (!q)
                    break;
                p = q - 1;
            } else if (isdigit((unsigned char)p[1])) {
                long n = strtol(p + 1, NULL, 10);
                if (n > 99)
                    return -1;
                if (n > max)
                    max = (int)n;
            }
        }
    }
    return max;
}

static bool parse_strlist(ctx_t *c, const json_t *v, const char *jpath, evd_strv_t *out, bool nonempty)
{
    char tmp[100];
    if (!json_is_array(v))
        return fail(c, jpath, "expected an array of strings, got %s %s", typename(v), show(v, tmp, sizeof(tmp)));
    if (nonempty && json_array_size(v) == 0)
        return fail(c, jpath, "must not be empty");
    for (size_t i = 0; i < json_array_size(v); i++) {
        char jp[256];
        snprintf(jp, sizeof(jp), "%s[%zu]", jpath, i);
        char *s = NULL;
        if (!get_string(c, json_array_get(v, i), jp, &s))
            return false;
        int rc = evd_strv_push(out, s, strlen(s));
        free(s);
        if (rc < 0)
            return fail(c, jp, "out of memory");
    }
    return true;
}

static bool parse_templates(ctx_t *c, const json_t *arr, const char *jpath, evd_rule_t *r, bool pattern)
{
    evd_strv_t sv = {0};
    if (!parse_strlist(c, arr, jpath, &sv, false)) {
        evd_strv_free(&sv);
        return false;
    }
    evd_template_t *ts = calloc(sv.n ? sv.n : 1, sizeof(*ts));
    if (!ts) {
        evd_strv_free(&sv);
        return fail(c, jpath, "out of memory");
    }
    if (pattern) {
        r->patterns = ts;
    } else {
        r->keys = ts;
    }
    for (size_t i = 0; i < sv.n; i++) {
        char jp[256], why[400];
        snprintf(jp, sizeof(jp), "%s[%zu]", jpath, i);
        if (evd_template_compile(&ts[i], sv.v[i], pattern, r->lookups, r->nlookups, why, sizeof(why)) < 0) {
            evd_strv_free(&sv);
            return fail(c, jp, "%s", why);
        }
        if (pattern)
            r->npatterns++;
        else
            r->nkeys++;
    }
    evd_strv_free(&sv);
    return true;
}

static bool parse_lookups(ctx_t *c, const json_t *arr, const char *jpath, evd_rule_t *r)
{
    static const char *const allowed[] = {"as", "sql", "args", NULL};
    char tmp[100];
    if (!json_is_array(arr))
        return fail(c, jpath, "expected an array, got %s %s", typename(arr), show(arr, tmp, sizeof(tmp)));
    r->lookups = calloc(json_array_size(arr) + 1, sizeof(*r->lookups));
    if (!r->lookups)
        return fail(c, jpath, "out of memory");
    for (size_t i = 0; i < json_array_size(arr); i++) {
        char jp[256], sub[300];
        snprintf(jp, sizeof(jp), "%s[%zu]", jpath, i);
        const json_t *lv = json_array_get(arr, i);
        if (!check_keys(c, lv, jp, allowed))
            return false;
        evd_lookup_t *lk = &r->lookups[r->nlookups++];
        json_t *v;
        snprintf(sub, sizeof(sub), "%s.as", jp);
        if (!(v = json_object_get(lv, "as")))
            return fail(c, jp, "missing required key \"as\"");
        if (!get_string(c, v, sub, &lk->as))
            return false;
        if (!ident_ok(lk->as))
            return fail(c, sub, "\"%s\" is not a valid name (letters, digits, _)", lk->as);
        for (size_t k = 0; k + 1 < r->nlookups; k++)
            if (strcmp(r->lookups[k].as, lk->as) == 0)
                return fail(c, sub, "duplicate lookup name \"%s\"", lk->as);
        snprintf(sub, sizeof(sub), "%s.sql", jp);
        if (!(v = json_object_get(lv, "sql")))
            return fail(c, jp, "missing required key \"sql\"");
        if (!get_string(c, v, sub, &lk->sql))
            return false;
        snprintf(sub, sizeof(sub), "%s.args", jp);
        evd_strv_t args = {0};
        if (!(v = json_object_get(lv, "args")))
            return fail(c, jp, "missing required key \"args\"");
        if (!parse_strlist(c, v, sub, &args, true)) {
            evd_strv_free(&args);
            return false;
        }
        lk->args = args.v;
        lk->nargs = args.n;
        if (lk->nargs > 16)
            return fail(c, sub, "at most 16 args, got %zu", lk->nargs);
        for (size_t k = 0; k < lk->nargs; k++)
            if (!ident_ok(lk->args[k])) {
                snprintf(sub, sizeof(sub), "%s.args[%zu]", jp, k);
                return fail(c, sub, "\"%s\" is not a column name", lk->args[k]);
            }
        int mp = max_param(lk->sql);
        snprintf(sub, sizeof(sub), "%s.sql", jp);
        if (mp != (int)lk->nargs)
            return fail(c, sub, "uses $1..$%d but \"args\" names %zu column%s in \"%s\"", mp < 0 ? 100 : mp, lk->nargs,
                        lk->nargs == 1 ? "" : "s", lk->sql);
    }
    return true;
}

/* host:port: a host name or IPv4 address, or [IPv6]; the port digits only, 1..65535. */
static bool listen_ok(const char *s)
{
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || !colon[1] || strlen(colon + 1) > 5)
        return false;
    for (const char *p = colon + 1; *p; p++)
        if (!isdigit((unsigned char)*p))
            return false;
    long port = strtol(colon + 1, NULL, 10);
    if (port < 1 || port > 65535)
        return false;
    size_t n = (size_t)(colon - s);
    if (s[0] == '[')
        return n > 2 && s[n - 1] == ']' && !memchr(s + 1, ']', n - 2);
    return !memchr(s, '[', n) && !memchr(s, ']', n) && !memchr(s, ':', n);
}

static bool parse_rule(ctx_t *c, const json_t *rv, size_t idx, evd_config_t *cfg, evd_rule_t *r)
{
    static const char *const allowed[] = {"table", "on", "targets", "lookups", "keys", "patterns", "durable", NULL};
    char jp[64], sub[128];
    snprintf(jp, sizeof(jp), "rules[%zu]", idx);
    if (!check_keys(c, rv, jp, allowed))
        return false;
    r->durable = -1;
    json_t *v;
    char *table = NULL;
    snprintf(sub, sizeof(sub), "%s.table", jp);
    if (!(v = json_object_get(rv, "table")))
        return fail(c, jp, "missing required key \"table\"");
    if (!get_string(c, v, sub, &table))
        return false;
    char *dot = strchr(table, '.');
    r->schema = dot ? dupn(table, (size_t)(dot - table)) : strdup("public");
    r->table = strdup(dot ? dot + 1 : table);
    if (!r->schema || !r->table) {
        free(table);
        return fail(c, sub, "out of memory");
    }
    bool ok = ident_ok(r->schema) && ident_ok(r->table) && strlen(r->schema) < 64 && strlen(r->table) < 64;
    if (!ok) {
        fail(c, sub, "\"%s\" is not schema.table or table", table);
        free(table);
        return false;
    }
    free(table);

    snprintf(sub, sizeof(sub), "%s.on", jp);
    if ((v = json_object_get(rv, "on"))) {
        evd_strv_t ops = {0};
        if (!parse_strlist(c, v, sub, &ops, true)) {
            evd_strv_free(&ops);
            return false;
        }
        for (size_t i = 0; i < ops.n; i++) {
            evd_op_t op = evd_op_parse(ops.v[i]);
            if (!op) {
                snprintf(sub, sizeof(sub), "%s.on[%zu]", jp, i);
                fail(c, sub, "\"%s\" is not INSERT, UPDATE, DELETE or TRUNCATE", ops.v[i]);
                evd_strv_free(&ops);
                return false;
            }
            r->ops |= op;
        }
        evd_strv_free(&ops);
    } else {
        r->ops = EVD_OP_ALL;
    }

    snprintf(sub, sizeof(sub), "%s.targets", jp);
    evd_strv_t tg = {0};
    if ((v = json_object_get(rv, "targets"))) {
        if (!parse_strlist(c, v, sub, &tg, true)) {
            evd_strv_free(&tg);
            return false;
        }
    } else if (evd_strv_push(&tg, "default", 7) < 0) {
        evd_strv_free(&tg);
        return fail(c, sub, "out of memory");
    }
    r->targets = calloc(tg.n, sizeof(int));
    if (!r->targets) {
        evd_strv_free(&tg);
        return fail(c, sub, "out of memory");
    }
    for (size_t i = 0; i < tg.n; i++) {
        int ti = target_index(cfg, tg.v[i]);
        if (ti < 0) {
            char p2[160];
            snprintf(p2, sizeof(p2), "%s.targets[%zu]", jp, i);
            bool given = json_object_get(rv, "targets") != NULL;
            fail(c, given ? p2 : jp, "unknown target \"%s\"%s", tg.v[i],
                 given ? " (not defined under \"redis\")"
                       : " (no \"targets\" given and no redis target named \"default\")");
            evd_strv_free(&tg);
            return false;
        }
        bool dup = false;
        for (size_t k = 0; k < r->ntargets; k++)
            dup |= r->targets[k] == ti;
        if (!dup)
            r->targets[r->ntargets++] = ti;
    }
    evd_strv_free(&tg);

    snprintf(sub, sizeof(sub), "%s.lookups", jp);
    if ((v = json_object_get(rv, "lookups")) && !parse_lookups(c, v, sub, r))
        return false;
    snprintf(sub, sizeof(sub), "%s.keys", jp);
    if ((v = json_object_get(rv, "keys")) && !parse_templates(c, v, sub, r, false))
        return false;
    snprintf(sub, sizeof(sub), "%s.patterns", jp);
    if ((v = json_object_get(rv, "patterns")) && !parse_templates(c, v, sub, r, true))
        return false;
    if (r->nkeys + r->npatterns == 0)
        return fail(c, jp, "a rule needs at least one entry in \"keys\" or \"patterns\"");
    /* A lookup no template uses is most likely a typo. */
    for (size_t l = 0; l < r->nlookups; l++) {
        bool used = false;
        for (size_t k = 0; k < r->nkeys + r->npatterns; k++) {
            const evd_template_t *t = k < r->nkeys ? &r->keys[k] : &r->patterns[k - r->nkeys];
            for (size_t p = 0; p < t->nparts; p++)
                used |= t->parts[p].is_ref && t->parts[p].lookup == (int)l;
        }
        if (!used) {
            snprintf(sub, sizeof(sub), "%s.lookups[%zu].as", jp, l);
            return fail(c, sub, "lookup \"%s\" is used by no key or pattern", r->lookups[l].as);
        }
    }
    snprintf(sub, sizeof(sub), "%s.durable", jp);
    if ((v = json_object_get(rv, "durable"))) {
        char tmp[100];
        if (!json_is_boolean(v))
            return fail(c, sub, "expected true or false, got %s %s", typename(v), show(v, tmp, sizeof(tmp)));
        r->durable = json_is_true(v);
    }
    return true;
}

static bool parse_root(ctx_t *c, const json_t *root, evd_config_t *cfg)
{
    static const char *const top[] = {
        "postgres", "redis", "rules", "batch", "retry", "dead_letter", "log", "http", "shutdown_timeout_ms", NULL};
    static const char *const pg[] = {"url", "channels", "poll_interval_ms", NULL};
    static const char *const batch[] = {"max_keys", "max_delay_ms", "max_pending", "redelete_after_ms", NULL};
    static const char *const retry[] = {"max_attempts", "initial_backoff_ms", "max_backoff_ms", NULL};
    static const char *const dl[] = {"path", "max_bytes", NULL};
    static const char *const log[] = {"format", "level", "stats_interval_s", NULL};
    static const char *const http[] = {"listen", NULL};
    struct {
        const char *name;
        const char *const *keys;
    } sections[] = {{"postgres", pg},    {"batch", batch}, {"retry", retry},
                    {"dead_letter", dl}, {"log", log},     {"http", http}};
    if (!check_keys(c, root, "", top))
        return false;
    const json_t *pgv = json_object_get(root, "postgres");
    if (!pgv)
        return fail(c, NULL, "missing required key \"postgres\"");
    for (size_t i = 0; i < EVD_ARRAY_LEN(sections); i++) {
        const json_t *s = json_object_get(root, sections[i].name);
        if (s && !check_keys(c, s, sections[i].name, sections[i].keys))
            return false;
    }
    if (!apply_settings(c, root, cfg))
        return false;
    if (cfg->retry_initial_backoff_ms > cfg->retry_max_backoff_ms)
        return fail(c, "retry.initial_backoff_ms", "%" PRId64 " exceeds retry.max_backoff_ms (%" PRId64 ")",
                    cfg->retry_initial_backoff_ms, cfg->retry_max_backoff_ms);
    if (cfg->http_listen && !listen_ok(cfg->http_listen))
        return fail(c, "http.listen", "expected host:port (a port 1..65535; an IPv6 address in brackets), got \"%s\"",
                    cfg->http_listen);

    evd_strv_t ch = {0};
    const json_t *chv = json_object_get(pgv, "channels");
    if (chv) {
        if (!parse_strlist(c, chv, "postgres.channels", &ch, true)) {
            evd_strv_free(&ch);
            return false;
        }
    } else if (evd_strv_push(&ch, "evictd", 6) < 0) {
        evd_strv_free(&ch);
        return fail(c, "postgres.channels", "out of memory");
    }
    cfg->channels = ch.v;
    cfg->nchannels = ch.n;
    if (ch.n > 16)
        return fail(c, "postgres.channels", "at most 16 channels, got %zu", ch.n);
    for (size_t i = 0; i < ch.n; i++) {
        if (!ch.v[i][0] || strlen(ch.v[i]) > 63) {
            char jp[64];
            snprintf(jp, sizeof(jp), "postgres.channels[%zu]", i);
            return fail(c, jp, "\"%s\" is not a channel name (1..63 bytes)", ch.v[i]);
        }
    }

    if (!parse_redis(c, json_object_get(root, "redis"), cfg))
        return false;

    const json_t *rules = json_object_get(root, "rules");
    char tmp[100];
    if (!rules)
        return fail(c, NULL, "missing required key \"rules\"");
    if (!json_is_array(rules) || json_array_size(rules) == 0)
        return fail(c, "rules", "expected a non-empty array of rules, got %s", show(rules, tmp, sizeof(tmp)));
    cfg->rules.v = calloc(json_array_size(rules), sizeof(evd_rule_t));
    if (!cfg->rules.v)
        return fail(c, "rules", "out of memory");
    cfg->rules.max_keys = (size_t)cfg->batch_max_keys;
    for (size_t i = 0; i < json_array_size(rules); i++) {
        evd_rule_t *r = &cfg->rules.v[cfg->rules.n++];
        if (!parse_rule(c, json_array_get(rules, i), i, cfg, r))
            return false;
    }
    return true;
}

evd_config_t *evd_config_parse(const char *path, const char *text, evd_getenv_fn env, char *err, size_t errlen)
{
    ctx_t c = {.path = path, .text = text, .env = env, .err = err, .errlen = errlen};
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "%s:%d:%d: syntax error: %s", path, jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    evd_config_t *cfg = calloc(1, sizeof(*cfg));
    if (!cfg || !(cfg->path = strdup(path))) {
        fail(&c, NULL, "out of memory");
        goto fail;
    }
    if (!parse_root(&c, root, cfg))
        goto fail;
    json_decref(root);
    return cfg;
fail:
    json_decref(root);
    evd_config_free(cfg);
    return NULL;
}

evd_config_t *evd_config_load(const char *path, evd_getenv_fn env, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    evd_buf_t b = {0};
    char chunk[8192];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (b.len + n > 16 * MIB || evd_buf_append(&b, chunk, n) < 0) {
            fclose(f);
            evd_buf_free(&b);
            snprintf(err, errlen, "%s: file too large or out of memory", path);
            return NULL;
        }
    }
    bool rerr = ferror(f);
    fclose(f);
    if (rerr) {
        evd_buf_free(&b);
        snprintf(err, errlen, "%s: read error", path);
        return NULL;
    }
    if (strlen(b.data ? b.data : "") != b.len) {
        evd_buf_free(&b);
        snprintf(err, errlen, "%s: file holds a NUL byte", path);
        return NULL;
    }
    evd_config_t *cfg = evd_config_parse(path, b.data ? b.data : "", env, err, errlen);
    evd_buf_free(&b);
    return cfg;
}

void evd_config_free(evd_config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < evd_nsettings; i++)
        if (evd_settings[i].type != EVD_SET_INT)
            free(*(char **)((char *)cfg + evd_settings[i].offset));
    for (size_t i = 0; i < cfg->nchannels; i++)
        free(cfg->channels[i]);
    free(cfg->channels);
    for (size_t i = 0; i < cfg->ntargets; i++) {
        evd_target_cfg_t *t = &cfg->targets[i];
        free(t->name);
        free(t->url);
        free(t->username);
        free(t->password);
        free(t->host);
        free(t->unix_path);
    }
    free(cfg->targets);
    evd_rules_free(&cfg->rules);
    free(cfg->path);
    free(cfg);
}

static int strcmp_p(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int evd_config_needed_columns(const evd_config_t *cfg, const char *schema, const char *table, evd_strv_t *out)
{
    evd_set_t seen = {0};
    int rc = 0;
    for (size_t i = 0; i < cfg->rules.n && rc >= 0; i++) {
        const evd_rule_t *r = &cfg->rules.v[i];
        if (strcmp(r->schema, schema) || strcmp(r->table, table))
            continue;
        for (size_t k = 0; k < r->nkeys + r->npatterns && rc >= 0; k++) {
            const evd_template_t *t = k < r->nkeys ? &r->keys[k] : &r->patterns[k - r->nkeys];
            for (size_t p = 0; p < t->nparts && rc >= 0; p++) {
                const evd_tpl_part_t *pt = &t->parts[p];
                if (!pt->is_ref || pt->lookup >= 0)
                    continue;
                if ((rc = evd_set_add(&seen, pt->text, pt->len)) == 1)
                    rc = evd_strv_push(out, pt->text, pt->len);
            }
        }
        for (size_t l = 0; l < r->nlookups && rc >= 0; l++)
            for (size_t a = 0; a < r->lookups[l].nargs && rc >= 0; a++) {
                const char *s = r->lookups[l].args[a];
                if ((rc = evd_set_add(&seen, s, strlen(s))) == 1)
                    rc = evd_strv_push(out, s, strlen(s));
            }
    }
    evd_set_free(&seen);
    if (rc < 0)
        return rc;
    if (out->n)
        qsort(out->v, out->n, sizeof(char *), strcmp_p);
    return 0;
}

void evd_config_describe(const evd_config_t *cfg, FILE *out)
{
    fprintf(out, "config %s is valid\n", cfg->path);
    fprintf(out, "postgres: listening on");
    for (size_t i = 0; i < cfg->nchannels; i++)
        fprintf(out, " %s", cfg->channels[i]);
    fprintf(out, "\nredis targets:\n");
    for (size_t i = 0; i < cfg->ntargets; i++) {
        const evd_target_cfg_t *t = &cfg->targets[i];
        if (t->unix_path)
            fprintf(out, "  %s: unix %s db %d", t->name, t->unix_path, t->db);
        else
            fprintf(out, "  %s: %s:%d db %d", t->name, t->host, t->port, t->db);
        fprintf(out, "%s%s%s timeout %dms\n", t->username ? " user " : "", t->username ? t->username : "",
                t->password ? " (password set)" : "", t->timeout_ms);
    }
    for (size_t i = 0; i < cfg->rules.n; i++) {
        const evd_rule_t *r = &cfg->rules.v[i];
        fprintf(out, "rule %zu: %s.%s on", i, r->schema, r->table);
        for (int b = 0; b < 4; b++)
            if (r->ops & (1u << b))
                fprintf(out, " %s", evd_op_name((evd_op_t)(1u << b)));
        fprintf(out, " -> targets");
        for (size_t k = 0; k < r->ntargets; k++)
            fprintf(out, " %s", cfg->targets[r->targets[k]].name);
        fprintf(out, "%s\n", r->durable == 0 ? " (notify-only)" : "");
        for (size_t l = 0; l < r->nlookups; l++) {
            fprintf(out, "  lookup %s = %s with", r->lookups[l].as, r->lookups[l].sql);
            for (size_t a = 0; a < r->lookups[l].nargs; a++)
                fprintf(out, " $%zu=%s", a + 1, r->lookups[l].args[a]);
            fprintf(out, "\n");
        }
        for (size_t k = 0; k < r->nkeys; k++)
            fprintf(out, "  deletes key     %s%s\n", r->keys[k].src,
                    r->keys[k].has_any ? "   (once per old/new row image)" : "");
        for (size_t k = 0; k < r->npatterns; k++)
            fprintf(out, "  deletes pattern %s   (SCAN + UNLINK)\n", r->patterns[k].src);
    }
}
