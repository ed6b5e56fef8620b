/* log.c - one line per event on stderr (logfmt or JSON), buffered, redacted and rate-limited. */
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

/* Not thread-safe: every function here runs on the loop thread (thread-pool work logs nothing). */

evd_log_level_t evd_log_min_level = EVD_LOG_INFO;
static evd_log_format_t log_format = EVD_LOG_TEXT;

static const char *const level_names[] = {"debug", "info", "warn", "error"};
static const char *const format_names[] = {"text", "json"};

/* ---- output buffer --------------------------------------------------------------------- */

#define OUT_CAP (64 * 1024)
static char out_buf[OUT_CAP];
static size_t out_len;
/* Where the line being formatted starts: only whole lines are written while one fits. */
static size_t line_start;

/* stderr may have been made non-blocking by someone else (a terminal shared with a parent);
 * wait a little for it rather than drop the line at the first EAGAIN. A line that still cannot
 * be written is lost: there is nowhere left to report that. */
static void write_all(const char *p, size_t n)
{
    int stalls = 0;
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && stalls++ < 10) {
            struct pollfd pfd = {.fd = STDERR_FILENO, .events = POLLOUT};
            (void)poll(&pfd, 1, 100);
            continue;
        }
        return;
    }
}

static void make_room(void)
{
    if (line_start > 0) {
        write_all(out_buf, line_start);
        memmove(out_buf, out_buf + line_start, out_len - line_start);
        out_len -= line_start;
        line_start = 0;
    } else {
        /* A single line longer than the buffer goes out in pieces. */
        write_all(out_buf, out_len);
        out_len = 0;
    }
}

static void out_put(const char *p, size_t n)
{
    while (n > 0) {
        if (out_len == OUT_CAP)
            make_room();
        size_t k = OUT_CAP - out_len;
        if (k > n)
            k = n;
        memcpy(out_buf + out_len, p, k);
        out_len += k;
        p += k;
        n -= k;
    }
}

static void out_puts(const char *s)
{
    out_put(s, strlen(s));
}

static void out_putc(char c)
{
    out_put(&c, 1);
}

void evd_log_flush(void)
{
    write_all(out_buf, out_len);
    out_len = 0;
    line_start = 0;
}

/* ---- redaction ------------------------------------------------------------------------- */

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static char lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

/* scheme://user:SECRET@host - the secret runs to the last '@' before whitespace, so a password
 * with an unencoded '@' or '/' is still hidden; at worst part of the host is hidden too. */
static bool url_secret(const char *s, size_t n, size_t i, size_t *start, size_t *end)
{
    if (n - i < 3 || memcmp(s + i, "://", 3) != 0)
        return false;
    size_t u = i + 3;
    while (u < n && s[u] != ':' && s[u] != '@' && s[u] != '/' && s[u] != '?' && s[u] != '#' && !is_space(s[u]))
        u++;
    if (u == n || s[u] != ':')
        return false;
    size_t at = 0;
    for (size_t j = u + 1; j < n && !is_space(s[j]); j++)
        if (s[j] == '@')
            at = j;
    if (at <= u + 1)
        return false; /* no '@' (host:port) or an empty password */
    *start = u + 1;
    *end = at;
    return true;
}

/* password=SECRET or password = 'SECRET' (libpq keyword form, also PGPASSWORD= and URL query
 * parameters). Unquoted values run to whitespace, quoted ones to the closing quote. */
static bool keyword_secret(const char *s, size_t n, size_t i, size_t *start, size_t *end)
{
    static const char kw[] = "password";
    size_t kwlen = sizeof(kw) - 1;
    if (n - i < kwlen)
        return false;
    for (size_t j = 0; j < kwlen; j++)
        if (lower(s[i + j]) != kw[j])
            return false;
    size_t k = i + kwlen;
    while (k < n && (s[k] == ' ' || s[k] == '\t'))
        k++;
    if (k == n || s[k] != '=')
        return false;
    k++;
    while (k < n && (s[k] == ' ' || s[k] == '\t'))
        k++;
    size_t e = k;
    if (k < n && s[k] == '\'') {
        k++;
        for (e = k; e < n && s[e] != '\''; e++)
            if (s[e] == '\\' && e + 1 < n)
                e++;
    } else {
        while (e < n && !is_space(s[e]))
            e++;
    }
    if (e == k)
        return false;
    *start = k;
    *end = e;
    return true;
}

/* Finds the first secret at or after from. */
static bool find_secret(const char *s, size_t n, size_t from, size_t *start, size_t *end)
{
    for (size_t i = from; i < n; i++) {
        if (s[i] == ':' && url_secret(s, n, i, start, end))
            return true;
        if ((s[i] == 'p' || s[i] == 'P') && keyword_secret(s, n, i, start, end))
            return true;
    }
    return false;
}

typedef void (*segment_fn)(void *ctx, const char *p, size_t n);

/* Calls fn with s cut into segments, each secret replaced by a "***" segment. Secrets start
 * and end at ASCII bytes, so no UTF-8 sequence is split between segments. */
static void redacted_each(const char *s, size_t n, segment_fn fn, void *ctx)
{
    size_t pos = 0, start, end;
    while (pos < n && find_secret(s, n, pos, &start, &end)) {
        if (start > pos)
            fn(ctx, s + pos, start - pos);
        fn(ctx, "***", 3);
        pos = end;
    }
    if (pos < n)
        fn(ctx, s + pos, n - pos);
}

struct redact_out {
    char *out;
    size_t len, cap; /* cap excludes the NUL */
};

static void redact_copy(void *ctx, const char *p, size_t n)
{
    struct redact_out *r = ctx;
    size_t k = r->cap - r->len;
    if (k > n)
        k = n;
    memcpy(r->out + r->len, p, k);
    r->len += k;
}

void evd_log_redact(const char *url, char *out, unsigned long outlen)
{
    if (outlen == 0)
        return;
    struct redact_out r = {.out = out, .len = 0, .cap = outlen - 1};
    if (url)
        redacted_each(url, strlen(url), redact_copy, &r);
    out[r.len] = '\0';
}

/* ---- value encoders -------------------------------------------------------------------- */

static const char hex[] = "0123456789abcdef";

static void put_u00(unsigned char c)
{
    char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
    out_put(e, sizeof(e));
}

/* Escapes '"', '\\' or a control byte, the same way in logfmt's quoted values and in JSON. */
static void put_escape(unsigned char c)
{
    switch (c) {
    case '"': out_puts("\\\""); break;
    case '\\': out_puts("\\\\"); break;
    case '\n': out_puts("\\n"); break;
    case '\r': out_puts("\\r"); break;
    case '\t': out_puts("\\t"); break;
    default: put_u00(c); break;
    }
}

static bool needs_quote_byte(unsigned char c)
{
    return c <= ' ' || c == '=' || c == '"' || c == 0x7f;
}

static void quote_check(void *ctx, const char *p, size_t n)
{
    bool *q = ctx;
    for (size_t i = 0; i < n && !*q; i++)
        if (needs_quote_byte((unsigned char)p[i]))
            *q = true;
}

static void text_escaped(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c != '"' && c != '\\' && c >= 0x20 && c != 0x7f)
            continue;
        out_put(p + run, i - run);
        put_escape(c);
        run = i + 1;
    }
    out_put(p + run, n - run);
}

static void text_verbatim(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    out_put(p, n);
}

/* A logfmt value: bare unless empty or holding a space, '=', '"' or a control byte. */
static void put_text_value(const char *s, bool redact)
{
    size_t n = s ? strlen(s) : 0;
    bool quote = n == 0;
    if (redact)
        redacted_each(s, n, quote_check, &quote);
    else
        quote_check(&quote, s, n);
    if (!quote) {
        if (redact)
            redacted_each(s, n, text_verbatim, NULL);
        else
            out_put(s, n);
        return;
    }
    out_putc('"');
    if (redact)
        redacted_each(s, n, text_escaped, NULL);
    else if (n > 0)
        text_escaped(NULL, s, n);
    out_putc('"');
}

/* JSON string body; invalid UTF-8 becomes U+FFFD so every line stays valid JSON. */
static void json_escaped(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    const unsigned char *u = (const unsigned char *)p;
    size_t run = 0, i = 0;
    while (i < n) {
        if (u[i] >= 0x20 && u[i] < 0x7f && u[i] != '"' && u[i] != '\\') {
            i++;
            continue;
        }
        if (u[i] >= 0x80) {
            size_t len = evd_utf8_len(u + i, n - i);
            if (len > 0) {
                i += len;
                continue;
            }
        }
        out_put(p + run, i - run);
        if (u[i] >= 0x80)
            out_puts("\\ufffd");
        else
            put_escape(u[i]);
        run = ++i;
    }
    out_put(p + run, n - run);
}

static void put_json_string(const char *s, bool redact)
{
    if (!s) {
        out_puts("null");
        return;
    }
    out_putc('"');
    if (redact)
        redacted_each(s, strlen(s), json_escaped, NULL);
    else
        json_escaped(NULL, s, strlen(s));
    out_putc('"');
}

/* Up to 3 decimals, trailing zeros trimmed: 0.7, 12, -3.25. */
static void format_double(double d, char *buf, size_t len)
{
    if (isnan(d)) {
        snprintf(buf, len, "nan");
        return;
    }
    if (isinf(d)) {
        snprintf(buf, len, d < 0 ? "-inf" : "inf");
        return;
    }
    snprintf(buf, len, "%.3f", d);
    char *dot = strchr(buf, '.');
    if (dot) {
        char *e = buf + strlen(buf);
        while (e > dot + 1 && e[-1] == '0')
            e--;
        if (e == dot + 1)
            e = dot;
        *e = '\0';
    }
    if (strcmp(buf, "-0") == 0)
        snprintf(buf, len, "0");
}

static void put_value(const evd_field_t *f, bool json)
{
    char num[400]; /* %.3f of DBL_MAX is 313 bytes */
    switch (f->type) {
    case EVD_F_STR:
        if (json)
            put_json_string(f->u.s, true);
        else
            put_text_value(f->u.s, true);
        return;
    case EVD_F_RAW:
        if (json)
            out_puts(f->u.s ? f->u.s : "null");
        else
            put_text_value(f->u.s, false);
        return;
    case EVD_F_INT:
        snprintf(num, sizeof(num), "%" PRId64, f->u.i);
        out_puts(num);
        return;
    case EVD_F_DBL:
        if (json && !isfinite(f->u.d)) {
            out_puts("null");
            return;
        }
        format_double(f->u.d, num, sizeof(num));
        out_puts(num);
        return;
    case EVD_F_BOOL: out_puts(f->u.b ? "true" : "false"); return;
    case EVD_F_END:
    default: out_puts(json ? "null" : "\"\""); return;
    }
}

/* ---- lines ----------------------------------------------------------------------------- */

/* 2026-11-22T10:00:00.123Z; the part up to the seconds is cached per second. */
static void put_timestamp(void)
{
    static time_t cached_sec = (time_t)-1;
    static char cached[24];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != cached_sec) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(cached, sizeof(cached), "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = ts.tv_sec;
    }
    char ms[8];
    snprintf(ms, sizeof(ms), ".%03dZ", (int)(ts.tv_nsec / 1000000));
    out_puts(cached);
    out_puts(ms);
}

static const char *level_name(evd_log_level_t level)
{
    return level_names[level > EVD_LOG_ERROR ? EVD_LOG_ERROR : level];
}

static void put_field(const evd_field_t *f, bool json)
{
    if (json) {
        out_putc(',');
        put_json_string(f->key, false);
        out_putc(':');
    } else {
        out_putc(' ');
        out_puts(f->key);
        out_putc('=');
    }
    put_value(f, json);
}

/* extra, if not NULL, is written after the caller's fields. */
static void emit_line(evd_log_level_t level, const char *msg, const evd_field_t *fields, const evd_field_t *extra)
{
    bool json = log_format == EVD_LOG_JSON;
    line_start = out_len;
    if (json) {
        out_puts("{\"ts\":\"");
        put_timestamp();
        out_puts("\",\"level\":\"");
        out_puts(level_name(level));
        out_puts("\",\"msg\":");
        put_json_string(msg ? msg : "", true);
    } else {
        out_puts("ts=");
        put_timestamp();
        out_puts(" level=");
        out_puts(level_name(level));
        out_puts(" msg=");
        put_text_value(msg, true);
    }
    for (const evd_field_t *f = fields; f && f->key; f++)
        put_field(f, json);
    if (extra)
        put_field(extra, json);
    out_puts(json ? "}\n" : "\n");
    line_start = out_len;
}

void evd_log_fields(evd_log_level_t level, const char *msg, const evd_field_t *fields)
{
    if (level < evd_log_min_level)
        return;
    emit_line(level, msg, fields, NULL);
}

/* ---- rate limiting --------------------------------------------------------------------- */

#define RL_SLOTS 32
#define RL_REASON_MAX 64 /* longer reasons are told apart by their first 63 bytes */
#define RL_WINDOW_MS 1000.0

struct rl_slot {
    char reason[RL_REASON_MAX];
    double last_ms; /* when the last line for this reason was written */
    uint64_t suppressed;
    bool used;
};

static struct rl_slot rl_table[RL_SLOTS];

static double monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double (*rl_clock)(void) = monotonic_ms;

void evd_log_set_clock(double (*now_ms)(void))
{
    rl_clock = now_ms ? now_ms : monotonic_ms;
}

/* The slot for reason; with all slots taken the least recently written reason is forgotten,
 * after its pending count is written so that nothing disappears silently. */
static struct rl_slot *rl_slot_for(const char *reason)
{
    struct rl_slot *free_slot = NULL, *oldest = NULL;
    for (size_t i = 0; i < RL_SLOTS; i++) {
        struct rl_slot *s = &rl_table[i];
        if (!s->used) {
            if (!free_slot)
                free_slot = s;
            continue;
        }
        if (strncmp(s->reason, reason, RL_REASON_MAX - 1) == 0)
            return s;
        if (!oldest || s->last_ms < oldest->last_ms)
            oldest = s;
    }
    struct rl_slot *s = free_slot ? free_slot : oldest;
    if (!free_slot && s->suppressed > 0) {
        evd_field_t f[] = {F_STR("reason", s->reason), F_INT("suppressed", s->suppressed), {0}};
        emit_line(EVD_LOG_WARN, "log_suppressed", f, NULL);
    }
    memset(s, 0, sizeof(*s));
    snprintf(s->reason, sizeof(s->reason), "%s", reason);
    return s;
}

void evd_log_ratelimited(const char *reason, const char *msg, const evd_field_t *fields)
{
    if (EVD_LOG_WARN < evd_log_min_level)
        return;
    double now = rl_clock();
    struct rl_slot *s = rl_slot_for(reason ? reason : "");
    if (s->used && now - s->last_ms < RL_WINDOW_MS) {
        s->suppressed++;
        return;
    }
    evd_field_t extra = F_INT("suppressed", s->suppressed);
    emit_line(EVD_LOG_WARN, msg, fields, s->suppressed > 0 ? &extra : NULL);
    s->used = true;
    s->last_ms = now;
    s->suppressed = 0;
}

/* ---- configuration --------------------------------------------------------------------- */

void evd_log_configure(evd_log_format_t fmt, evd_log_level_t level)
{
    log_format = fmt == EVD_LOG_JSON ? EVD_LOG_JSON : EVD_LOG_TEXT;
    evd_log_min_level = level > EVD_LOG_ERROR ? EVD_LOG_ERROR : level;
}

int evd_log_parse_level(const char *s, evd_log_level_t *out)
{
    for (size_t i = 0; s && i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (evd_log_level_t)i;
            return 0;
        }
    }
    return -EINVAL;
}

int evd_log_parse_format(const char *s, evd_log_format_t *out)
{
    for (size_t i = 0; s && i < sizeof(format_names) / sizeof(format_names[0]); i++) {
        if (strcmp(s, format_names[i]) == 0) {
            *out = (evd_log_format_t)i;
            return 0;
        }
    }
    return -EINVAL;
}
