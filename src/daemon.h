/* daemon.h - `evictd run`: wires PostgreSQL, rules, Redis targets and the dead-letter file. */
#ifndef EVD_DAEMON_H
#define EVD_DAEMON_H

#include <stdbool.h>

typedef struct evd_run_opts {
    const char *config_path;
    bool dry_run;
    const char *log_format; /* NULL: from the config */
    const char *log_level;  /* NULL: from the config */
} evd_run_opts_t;

/* Runs until SIGTERM/SIGINT. Returns the process exit status (0, 1 runtime, 2 config). */
int evd_daemon_run(const evd_run_opts_t *opts);

/* `evictd check [--connect]`: exit 0 valid, 1 unreachable or capture mismatch, 2 config error. */
int evd_check_run(const char *config_path, bool connect);

/* `evictd replay`: exit 0 when every line was applied, 1 when some were written to FILE.failed-*. */
int evd_replay_run(const char *config_path, const char *dl_file);

#endif
