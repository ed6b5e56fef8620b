/* check.c - `evictd check [--connect]`: validate the config, describe it, check the live servers. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#include "config.h"
#include "daemon.h"

/* A blocking query is fine here: check runs no loop. Returns NULL after printing the error. */
static PGresult *q(PGconn *c, const char *sql, int nargs, const char *const *args)
{
    PGresult *r = PQexecParams(c, sql, nargs, NULL, args, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK) {
        fprintf(stderr, "postgres: %s", PQresultErrorMessage(r));
        PQclear(r);
        return NULL;
    }
    return r;
}

/* The first column of every row of a query on one table (its oid, $1): column names. Names
 * come as rows, not a joined list, so that any character in a name is just that. */
static int names(PGconn *c, const char *sql, const char *oid, evd_strv_t *out)
{
    PGresult *r = q(c, sql, 1, &oid);
    int rc = r ? 0 : -1;
    for (int i = 0; rc == 0 && i < PQntuples(r); i++)
        rc = evd_strv_push(out, PQgetvalue(r, i, 0), (size_t)PQgetlength(r, i, 0));
    PQclear(r);
    return rc;
}

static bool has(const evd_strv_t *v, const char *name)
{
    for (size_t i = 0; i < v->n; i++)
        if (!strcmp(v->v[i], name))
            return true;
    return false;
}

/* Checks one table: exists, has the columns, is watched with triggers for every event and a
 * capture holding every needed column. Returns the number of problems. */
static int check_table(PGconn *c, const evd_config_t *cfg, const evd_rule_t *rule)
{
    const char *st[2] = {rule->schema, rule->table};
    PGresult *r = q(c,
                    "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = $1 AND c.relname = $2",
                    2, st);
    if (!r)
        return 1;
    if (PQntuples(r) == 0) {
        PQclear(r);
        printf("FAIL %s.%s: table does not exist\n", rule->schema, rule->table);
        return 1;
    }
    char oid[24];
    snprintf(oid, sizeof(oid), "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    const char *arg = oid;
    int problems = 0;
    evd_strv_t need = {0}, cols = {0}, captured = {0};
    if (evd_config_needed_columns(cfg, rule->schema, rule->table, &need) < 0 ||
        names(c,
              "SELECT attname FROM pg_catalog.pg_attribute "
              "WHERE attrelid = $1::pg_catalog.oid AND attnum > 0 AND NOT attisdropped",
              oid, &cols) < 0 ||
        names(c, "SELECT u.col FROM evictd.watches w, unnest(w.columns) AS u(col) WHERE w.tbl = $1::pg_catalog.oid",
              oid, &captured) < 0) {
        printf("FAIL %s.%s: cannot read its columns or evictd.watches (is sql/install.sql applied?)\n", rule->schema,
               rule->table);
        problems++;
        goto done;
    }
    for (size_t i = 0; i < need.n; i++)
        if (!has(&cols, need.v[i])) {
            printf("FAIL %s.%s: column %s (named by a rule) does not exist\n", rule->schema, rule->table, need.v[i]);
            problems++;
        }
    r = q(c, "SELECT array_to_string(columns, ','), durable FROM evictd.watches WHERE tbl = $1::pg_catalog.oid", 1,
          &arg);
    if (!r) {
        problems++;
    } else if (PQntuples(r) == 0) {
        printf("FAIL %s.%s: not watched: apply the output of `evictd sql`\n", rule->schema, rule->table);
        problems++;
    } else {
        /* A captured column renamed or dropped with no event trigger to follow (install.sql run
         * by no superuser): the capture still names it, and every write to the table fails. */
        for (size_t i = 0; i < captured.n; i++)
            if (!has(&cols, captured.v[i])) {
                printf("FAIL %s.%s: captured column %s no longer exists: writes to the table fail until "
                       "`SELECT evictd.watch(...)` runs again for it (apply the output of `evictd sql`)\n",
                       rule->schema, rule->table, captured.v[i]);
                problems++;
            }
        for (size_t i = 0; i < need.n; i++)
            if (!has(&captured, need.v[i])) {
                printf("FAIL %s.%s: column %s is not captured (templates using it would widen); "
                       "apply the output of `evictd sql`\n",
                       rule->schema, rule->table, need.v[i]);
                problems++;
            }
        printf("%s %s.%s: captured columns [%s], %s\n", problems ? "    " : "ok  ", rule->schema, rule->table,
               PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1)[0] == 't' ? "durable" : "notify-only");
    }
    PQclear(r);
    /* Triggers: row-level or statement-level with transition tables, any shape, as long as
     * INSERT, UPDATE, DELETE and TRUNCATE are all covered by evictd's functions. */
    r = q(c,
          "SELECT coalesce(bit_or(tgtype::int), 0) FROM pg_catalog.pg_trigger t "
          "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
          "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
          "WHERE t.tgrelid = $1::pg_catalog.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D' "
          "AND n.nspname = 'evictd'",
          1, &arg);
    if (r) {
        int bits = atoi(PQgetvalue(r, 0, 0));
        const struct {
            int bit;
            const char *op;
        } ev[] = {{4, "INSERT"}, {16, "UPDATE"}, {8, "DELETE"}, {32, "TRUNCATE"}};
        for (size_t i = 0; i < 4; i++)
            if (!(bits & ev[i].bit)) {
                printf("FAIL %s.%s: no evictd trigger for %s\n", rule->schema, rule->table, ev[i].op);
                problems++;
            }
        PQclear(r);
    } else {
        problems++;
    }
done:
    evd_strv_free(&need);
    evd_strv_free(&cols);
    evd_strv_free(&captured);
    return problems;
}

static int check_postgres(const evd_config_t *cfg)
{
    const char *const keys[] = {"dbname", "client_encoding", NULL};
    const char *const vals[] = {cfg->pg_url, "UTF8", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(c) != CONNECTION_OK) {
        char *msg = strdup(PQerrorMessage(c));
        if (msg)
            evd_mask_quoted(msg);
        printf("FAIL postgres: cannot connect: %s", msg ? msg : "out of memory\n");
        free(msg);
        PQfinish(c);
        return 1;
    }
    printf("ok   postgres: connected to %s:%s database %s\n", PQhost(c), PQport(c), PQdb(c));
    int problems = 0;
    for (size_t i = 0; i < cfg->rules.n; i++) {
        const evd_rule_t *rule = &cfg->rules.v[i];
        bool first = true;
        for (size_t k = 0; k < i; k++)
            if (!strcmp(cfg->rules.v[k].schema, rule->schema) && !strcmp(cfg->rules.v[k].table, rule->table))
                first = false;
        if (first)
            problems += check_table(c, cfg, rule);
        for (size_t l = 0; l < rule->nlookups; l++) {
            PGresult *r = PQprepare(c, "", rule->lookups[l].sql, (int)rule->lookups[l].nargs, NULL);
            if (PQresultStatus(r) != PGRES_COMMAND_OK) {
                printf("FAIL rules[%zu].lookups[%zu] (%s): %s", i, l, rule->lookups[l].as, PQresultErrorMessage(r));
                problems++;
            }
            PQclear(r);
        }
    }
    PGresult *r = q(c,
                    "SELECT n.nspname, c.relname FROM evictd.watches w "
                    "JOIN pg_catalog.pg_class c ON c.oid = w.tbl "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2",
                    0, NULL);
    for (int i = 0; r && i < PQntuples(r); i++) {
        if (!evd_rules_watches(&cfg->rules, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1)))
            printf("warn %s.%s is watched but no rule names it (its changes are acknowledged and counted "
                   "as unmatched; `SELECT evictd.unwatch('%s.%s')` stops the capture)\n",
                   PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 0), PQgetvalue(r, i, 1));
    }
    PQclear(r);
    PQfinish(c);
    return problems ? 1 : 0;
}

static int check_redis(const evd_target_cfg_t *t)
{
    struct timeval tv = {.tv_sec = t->timeout_ms / 1000, .tv_usec = (t->timeout_ms % 1000) * 1000};
    redisContext *c =
        t->unix_path ? redisConnectUnixWithTimeout(t->unix_path, tv) : redisConnectWithTimeout(t->host, t->port, tv);
    if (!c || c->err) {
        printf("FAIL redis %s: cannot connect: %s\n", t->name, c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return 1;
    }
    redisSetTimeout(c, tv);
    redisReply *r = NULL;
    int fail = 0;
    if (t->password || t->username) {
        r = t->username ? redisCommand(c, "AUTH %s %s", t->username, t->password ? t->password : "")
                        : redisCommand(c, "AUTH %s", t->password);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            printf("FAIL redis %s: AUTH failed: %s\n", t->name, r ? r->str : c->errstr);
            fail = 1;
        }
        if (r)
            freeReplyObject(r);
    }
    if (!fail && t->db) {
        r = redisCommand(c, "SELECT %d", t->db);
        if (!r || r->type == REDIS_REPLY_ERROR) {
            printf("FAIL redis %s: SELECT %d failed: %s\n", t->name, t->db, r ? r->str : c->errstr);
            fail = 1;
        }
        if (r)
            freeReplyObject(r);
    }
    if (!fail) {
        r = redisCommand(c, "PING");
        if (!r || r->type == REDIS_REPLY_ERROR) {
            printf("FAIL redis %s: PING failed: %s\n", t->name, r ? r->str : c->errstr);
            fail = 1;
        } else {
            printf("ok   redis %s: answers\n", t->name);
        }
        if (r)
            freeReplyObject(r);
    }
    redisFree(c);
    return fail;
}

/* The dead-letter file can be appended to (or created): `run` exits at once when it cannot. */
static int check_dead_letter(const evd_config_t *cfg)
{
    const char *path = cfg->dl_path;
    if (access(path, F_OK) == 0) {
        if (access(path, W_OK) == 0) {
            printf("ok   dead_letter.path %s: writable\n", path);
            return 0;
        }
        printf("FAIL dead_letter.path %s: not writable: %s\n", path, strerror(errno));
        return 1;
    }
    char dir[4096];
    const char *slash = strrchr(path, '/');
    snprintf(dir, sizeof(dir), "%.*s", slash ? (slash == path ? 1 : (int)(slash - path)) : 1, slash ? path : ".");
    if (access(dir, W_OK | X_OK) != 0) {
        printf("FAIL dead_letter.path %s: cannot be created in %s: %s\n", path, dir, strerror(errno));
        return 1;
    }
    printf("ok   dead_letter.path %s: can be created\n", path);
    return 0;
}

int evd_check_run(const char *config_path, bool connect)
{
    char err[1024];
    evd_config_t *cfg = evd_config_load(config_path, getenv, err, sizeof(err));
    if (!cfg) {
        fprintf(stderr, "evictd: %s\n", err);
        return 2;
    }
    evd_config_describe(cfg, stdout);
    int rc = 0;
    if (connect) {
        rc |= check_postgres(cfg);
        rc |= check_dead_letter(cfg);
        for (size_t i = 0; i < cfg->ntargets; i++)
            rc |= check_redis(&cfg->targets[i]);
        printf("%s\n", rc ? "check failed" : "check passed");
    }
    evd_config_free(cfg);
    /* A report that did not reach its reader (a full disk) must not pass for one that did. */
    errno = 0;
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "evictd: writing the report to stdout: %s\n", strerror(errno ? errno : EIO));
        return 1;
    }
    return rc ? 1 : 0;
}
