/* main.c - parses the command line and hands over to run, check, sql or replay. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "daemon.h"

static const char usage[] = "usage: evictd run    --config FILE [--dry-run] [--log-format text|json]\n"
                            "                     [--log-level debug|info|warn|error]\n"
                            "       evictd check  --config FILE [--connect]\n"
                            "       evictd sql    --config FILE\n"
                            "       evictd replay --config FILE DEAD_LETTER_FILE\n"
                            "       evictd --help | --version\n"
                            "\n"
                            "evictd deletes the Redis keys that committed PostgreSQL changes make stale.\n"
                            "Exit status: 0 success, 1 runtime failure, 2 usage or config error.\n";

__attribute__((format(printf, 1, 2))) static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "evictd: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n%s", usage);
    return 2;
}

static int cmd_sql(const char *path)
{
    char err[1024];
    evd_config_t *cfg = evd_config_load(path, getenv, err, sizeof(err));
    if (!cfg) {
        fprintf(stderr, "evictd: %s\n", err);
        return 2;
    }
    evd_buf_t out = {0};
    int rc = evd_sqlgen(cfg, &out);
    errno = 0;
    if (rc < 0) {
        fprintf(stderr, "evictd: %s\n", strerror(-rc));
    } else if (fputs(out.data, stdout) == EOF || fflush(stdout) != 0) {
        /* A full disk must not pass for SQL written: the file would hold part of it, or none. */
        rc = errno ? -errno : -EIO;
        fprintf(stderr, "evictd: writing the SQL to stdout: %s\n", strerror(-rc));
    }
    evd_buf_free(&out);
    evd_config_free(cfg);
    return rc == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage_error("%s", "missing command");
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(usage, stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("evictd %s\n", EVD_VERSION);
        return 0;
    }
    evd_run_opts_t ro = {0};
    bool connect = false;
    const char *positional = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--config") == 0 || strcmp(a, "--log-format") == 0 || strcmp(a, "--log-level") == 0) {
            if (!next)
                return usage_error("%s needs a value", a);
            if (a[2] == 'c')
                ro.config_path = next;
            else if (strcmp(a, "--log-format") == 0)
                ro.log_format = next;
            else
                ro.log_level = next;
            i++;
        } else if (strncmp(a, "--config=", 9) == 0) {
            ro.config_path = a + 9;
        } else if (strcmp(a, "--dry-run") == 0 && strcmp(cmd, "run") == 0) {
            ro.dry_run = true;
        } else if (strcmp(a, "--connect") == 0 && strcmp(cmd, "check") == 0) {
            connect = true;
        } else if (a[0] != '-' && strcmp(cmd, "replay") == 0 && !positional) {
            positional = a;
        } else {
            return usage_error("unexpected argument \"%s\"", a);
        }
    }
    bool is_run = strcmp(cmd, "run") == 0;
    if ((ro.log_format || ro.log_level) && !is_run)
        return usage_error("%s", "--log-format and --log-level go with run");
    if (ro.log_format && strcmp(ro.log_format, "text") && strcmp(ro.log_format, "json"))
        return usage_error("--log-format must be text or json, not \"%s\"", ro.log_format);
    if (ro.log_level && strcmp(ro.log_level, "debug") && strcmp(ro.log_level, "info") && strcmp(ro.log_level, "warn") &&
        strcmp(ro.log_level, "error"))
        return usage_error("--log-level must be debug, info, warn or error, not \"%s\"", ro.log_level);
    if (strcmp(cmd, "run") && strcmp(cmd, "check") && strcmp(cmd, "sql") && strcmp(cmd, "replay"))
        return usage_error("unknown command \"%s\"", cmd);
    if (!ro.config_path)
        return usage_error("%s", "--config FILE is required");
    if (is_run)
        return evd_daemon_run(&ro);
    if (strcmp(cmd, "check") == 0)
        return evd_check_run(ro.config_path, connect);
    if (strcmp(cmd, "sql") == 0)
        return cmd_sql(ro.config_path);
    if (!positional)
        return usage_error("%s", "replay needs a DEAD_LETTER_FILE");
    return evd_replay_run(ro.config_path, positional);
}
