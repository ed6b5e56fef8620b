/* config.h - the JSON config: settings table, environment expansion, validation, rules. Pure. */
#ifndef EVD_CONFIG_H
#define EVD_CONFIG_H

#include <stdint.h>
#include <stdio.h>
#include "rules.h"

typedef struct evd_target_cfg {
    char *name;
    char *url;      /* as written (after ${} expansion) */
    char *username; /* NULL: none */
    char *password; /* NULL: none */
    int timeout_ms;
    /* parsed from url */
    char *host; /* NULL for unix */
    int port;
    char *unix_path; /* NULL for tcp */
    int db;
} evd_target_cfg_t;

typedef struct evd_config {
    char *path;
    char *pg_url;
    char **channels;
    size_t nchannels;
    int64_t poll_interval_ms;
    evd_target_cfg_t *targets;
    size_t ntargets;
    int64_t batch_max_keys;
    int64_t batch_max_delay_ms;
    int64_t batch_max_pending;
    int64_t redelete_after_ms;
    int64_t retry_max_attempts;
    int64_t retry_initial_backoff_ms;
    int64_t retry_max_backoff_ms;
    char *dl_path;
    int64_t dl_max_bytes;
    char *log_format; /* "text" | "json" */
    char *log_level;  /* "debug" | "info" | "warn" | "error" */
    int64_t stats_interval_s;
    char *http_listen; /* NULL: off */
    int64_t shutdown_timeout_ms;
    evd_rules_t rules;
} evd_config_t;

/* Environment lookup, replaceable for tests. Returns NULL when unset. */
typedef char *(*evd_getenv_fn)(const char *name);

/* Loads and validates path. On error returns NULL and writes a one-line message
 * "file[:line:col]: json.path: why" into err. */
evd_config_t *evd_config_load(const char *path, evd_getenv_fn env, char *err, size_t errlen);
/* Same, from a string (path is used in messages only). */
evd_config_t *evd_config_parse(const char *path, const char *text, evd_getenv_fn env, char *err, size_t errlen);
void evd_config_free(evd_config_t *cfg);

/* Parses a redis URL into t->host/port/unix_path/db/username/password (URL parts only fill
 * fields not already set). Returns 0 or -EINVAL with err. */
int evd_redis_url_parse(evd_target_cfg_t *t, const char *url, char *err, size_t errlen);

/* Writes the human-readable description used by `evictd check`. */
void evd_config_describe(const evd_config_t *cfg, FILE *out);

/* The settings table, for docs and tests. */
typedef enum { EVD_SET_INT, EVD_SET_STR, EVD_SET_ENUM } evd_setting_type_t;
typedef struct evd_setting {
    const char *name; /* "batch.max_keys" */
    evd_setting_type_t type;
    size_t offset;       /* into evd_config_t */
    int64_t def;         /* for ints */
    const char *def_str; /* for strings (NULL = required or absent) */
    int64_t min, max;
    const char *choices; /* "text|json" for enums */
    const char *doc;
} evd_setting_t;

extern const evd_setting_t evd_settings[];
extern const size_t evd_nsettings;

/* SQL for `evictd sql`: evictd.watch(...) calls for the tables and columns the rules use. */
int evd_sqlgen(const evd_config_t *cfg, evd_buf_t *out) EVD_MUST_CHECK;

/* Columns the rules need from table schema.table (template refs and lookup args), as a sorted,
 * deduplicated vector. Returns 0 or -ENOMEM. */
int evd_config_needed_columns(const evd_config_t *cfg, const char *schema, const char *table,
                              evd_strv_t *out) EVD_MUST_CHECK;

#endif
