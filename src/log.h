/* log.h - structured logging on stderr, logfmt ("text") or JSON lines, buffered. */
#ifndef EVD_LOG_H
#define EVD_LOG_H

#include <stdint.h>
#include <stdbool.h>

typedef enum { EVD_LOG_DEBUG = 0, EVD_LOG_INFO, EVD_LOG_WARN, EVD_LOG_ERROR } evd_log_level_t;
typedef enum { EVD_LOG_TEXT = 0, EVD_LOG_JSON } evd_log_format_t;

typedef enum { EVD_F_END = 0, EVD_F_STR, EVD_F_INT, EVD_F_DBL, EVD_F_BOOL, EVD_F_RAW } evd_ftype_t;

/* One key=value field. EVD_F_RAW is a value already formatted as JSON (written as-is in both
 * formats; used for key lists). A NULL string is written as null / empty. */
typedef struct evd_field {
    const char *key;
    evd_ftype_t type;
    union {
        const char *s;
        int64_t i;
        double d;
        bool b;
    } u;
} evd_field_t;

#define F_STR(k, v) ((evd_field_t){.key = (k), .type = EVD_F_STR, .u.s = (v)})
#define F_INT(k, v) ((evd_field_t){.key = (k), .type = EVD_F_INT, .u.i = (int64_t)(v)})
#define F_DBL(k, v) ((evd_field_t){.key = (k), .type = EVD_F_DBL, .u.d = (double)(v)})
#define F_BOOL(k, v) ((evd_field_t){.key = (k), .type = EVD_F_BOOL, .u.b = (v)})
#define F_RAW(k, v) ((evd_field_t){.key = (k), .type = EVD_F_RAW, .u.s = (v)})

extern evd_log_level_t evd_log_min_level;

void evd_log_configure(evd_log_format_t fmt, evd_log_level_t level);
/* Parses "debug|info|warn|error" / "text|json"; return 0 or -EINVAL. */
int evd_log_parse_level(const char *s, evd_log_level_t *out);
int evd_log_parse_format(const char *s, evd_log_format_t *out);

/* Writes one line. fields is terminated by an entry with key == NULL. In the msg and every
 * EVD_F_STR value, the password of a scheme://user:password@ URL and the value of a
 * password=... (libpq keyword form) are replaced by "***" (passwords never reach the log).
 * Loop thread only: the logger is not thread-safe. */
void evd_log_fields(evd_log_level_t level, const char *msg, const evd_field_t *fields);

/* The level check happens before any argument is evaluated. */
#define EVD_LOG(level, msg, ...)                                                                                       \
    do {                                                                                                               \
        if ((level) >= evd_log_min_level)                                                                              \
            evd_log_fields((level), (msg), (const evd_field_t[]){__VA_ARGS__ __VA_OPT__(, ){0}});                      \
    } while (0)

/* Rate-limited warning: at most one line per reason per second; suppressed lines are counted
 * and reported as "suppressed=N" after the fields of the next line for that reason. reason is
 * only the key (put it in fields to show it); 32 reasons are tracked at a time. */
void evd_log_ratelimited(const char *reason, const char *msg, const evd_field_t *fields);

/* Test hook: the millisecond clock (monotonic by default) used by evd_log_ratelimited; NULL
 * restores the default. */
void evd_log_set_clock(double (*now_ms)(void));

/* Output is buffered; flush writes everything out (called once per loop iteration and at exit). */
void evd_log_flush(void);

/* Copies url into out with any password replaced by ***. */
void evd_log_redact(const char *url, char *out, unsigned long outlen);

#endif
