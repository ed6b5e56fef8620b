/* replay.c - `evictd replay`: re-drives a dead-letter file against Redis; what still fails is
 * written to FILE.failed-<UTC timestamp>. No PostgreSQL needed (lookups widen). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
#include "redis.h"

typedef struct item {
    char *line; /* the original line */
    evd_keyvec_t keys, patterns;
    evd_job_t job;
    int target;
    bool failed;
    bool done;
} item_t;

typedef struct replay {
    uv_loop_t *loop;
    evd_config_t *cfg;
    evd_redis_t **targets;
    item_t *items;
    size_t nitems;
    size_t outstanding;
    size_t failed;
} replay_t;

static void job_cb(evd_job_t *job, int status, const char *error, void *ud)
{
    replay_t *rp = ud;
    item_t *it = job->ud;
    if (status == EVD_REDIS_RETRYING)
        return;
    if (status != 0) {
        it->failed = true;
        EVD_LOG(EVD_LOG_WARN, "dead_letter", F_STR("reason", "replay_failed"), F_STR("error", error));
    }
    it->done = true;
    if (--rp->outstanding == 0)
        for (size_t i = 0; i < rp->cfg->ntargets; i++)
            evd_redis_close(rp->targets[i], NULL, NULL);
}

static int target_by_name(const evd_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->ntargets; i++)
        if (!strcmp(cfg->targets[i].name, name))
            return (int)i;
    return -1;
}

static int push_strings(evd_keyvec_t *sv, json_t *arr)
{
    size_t i;
    json_t *v;
    if (!json_is_array(arr))
        return -EINVAL;
    json_array_foreach (arr, i, v) {
        if (!json_is_string(v))
            return -EINVAL;
        if (evd_keyvec_push(sv, json_string_value(v), json_string_length(v)) < 0)
            return -ENOMEM;
    }
    return 0;
}

/* Turns one dead-letter line into items (one per target). Returns false when it cannot be
 * replayed now (kept for the failed file). */
static bool plan_line(replay_t *rp, const char *line, evd_expansion_t *x)
{
    json_error_t jerr;
    json_t *o = json_loads(line, 0, &jerr);
    if (!json_is_object(o)) {
        json_decref(o);
        return false;
    }
    json_t *target = json_object_get(o, "target");
    bool ok = false;
    if (json_is_string(target)) {
        int ti = target_by_name(rp->cfg, json_string_value(target));
        item_t *it = &rp->items[rp->nitems];
        memset(it, 0, sizeof(*it));
        /* A line with nothing to delete is not one evictd wrote: kept, not counted applied. */
        if (ti >= 0 && push_strings(&it->keys, json_object_get(o, "keys")) == 0 &&
            push_strings(&it->patterns, json_object_get(o, "patterns")) == 0 && (it->keys.n || it->patterns.n)) {
            it->target = ti;
            rp->nitems++;
            ok = true;
        } else {
            evd_keyvec_free(&it->keys);
            evd_keyvec_free(&it->patterns);
        }
        json_decref(o);
        return ok;
    }
    /* Bad input: expand it again with the current rules when it now parses. */
    json_t *ch = json_object_get(o, "change");
    char *text = json_is_string(ch) ? strdup(json_string_value(ch)) : json_dumps(ch, JSON_COMPACT);
    json_decref(o);
    if (!text)
        return false;
    evd_change_t c;
    char err[256];
    if (evd_payload_parse(text, strlen(text), &c, err, sizeof(err)) != EVD_PAYLOAD_OK) {
        free(text);
        return false;
    }
    free(text);
    if (!evd_rules_watches(&rp->cfg->rules, c.schema, c.table)) {
        evd_change_clear(&c);
        return false;
    }
    evd_expansion_reset(x);
    if (evd_rules_expand(&rp->cfg->rules, &c, NULL, NULL, x) < 0) {
        evd_change_clear(&c);
        return false;
    }
    for (size_t t = 0; t < x->ntargets; t++) {
        evd_keyset_t *k = &x->per_target[t];
        if (!k->keys.n && !k->patterns.n)
            continue;
        item_t *it = &rp->items[rp->nitems++];
        memset(it, 0, sizeof(*it));
        it->target = (int)t;
        it->keys = k->keys;
        it->patterns = k->patterns;
        memset(&k->keys, 0, sizeof(k->keys));
        memset(&k->patterns, 0, sizeof(k->patterns));
    }
    evd_change_clear(&c);
    return true;
}

int evd_replay_run(const char *config_path, const char *dl_file)
{
    char err[1024];
    evd_config_t *cfg = evd_config_load(config_path, getenv, err, sizeof(err));
    if (!cfg) {
        fprintf(stderr, "evictd: %s\n", err);
        return 2;
    }
    evd_log_configure(EVD_LOG_TEXT, EVD_LOG_INFO);
    FILE *f = fopen(dl_file, "r");
    if (!f) {
        fprintf(stderr, "evictd: %s: %s\n", dl_file, strerror(errno));
        evd_config_free(cfg);
        return 1;
    }
    replay_t rp = {.loop = uv_default_loop(), .cfg = cfg};
    evd_strv_t lines = {0};
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (n && evd_strv_push(&lines, line, (size_t)n) < 0) {
            fprintf(stderr, "evictd: %s: out of memory reading it (nothing replayed)\n", dl_file);
            free(line);
            fclose(f);
            evd_strv_free(&lines);
            evd_config_free(cfg);
            return 1;
        }
    }
    /* getline returns -1 at the end of the file and on a read error alike (EISDIR, EIO): an error
     * must not pass for the end, which would replay part of the file and report success. */
    int read_err = ferror(f) ? (errno ? errno : EIO) : 0;
    free(line);
    fclose(f);
    if (read_err) {
        fprintf(stderr, "evictd: %s: %s (nothing replayed)\n", dl_file, strerror(read_err));
        evd_strv_free(&lines);
        evd_config_free(cfg);
        return 1;
    }
    /* Each line yields at most one item per target. */
    rp.items = calloc(lines.n * (cfg->ntargets + 1) + 1, sizeof(item_t));
    rp.targets = calloc(cfg->ntargets, sizeof(evd_redis_t *));
    size_t *first_item = calloc(lines.n + 1, sizeof(size_t));
    bool *kept = calloc(lines.n + 1, sizeof(bool));
    evd_expansion_t x;
    if (!rp.items || !rp.targets || !first_item || !kept || evd_expansion_init(&x, cfg->ntargets) < 0) {
        fprintf(stderr, "evictd: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < lines.n; i++) {
        first_item[i] = rp.nitems;
        kept[i] = !plan_line(&rp, lines.v[i], &x);
    }
    first_item[lines.n] = rp.nitems;
    evd_expansion_free(&x);

    evd_redis_opts_t o = {cfg->batch_max_keys,           cfg->batch_max_delay_ms,   cfg->retry_max_attempts,
                          cfg->retry_initial_backoff_ms, cfg->retry_max_backoff_ms, 0};
    for (size_t i = 0; i < cfg->ntargets; i++)
        if (evd_redis_new(rp.loop, &cfg->targets[i], &o, job_cb, &rp, &rp.targets[i]) < 0) {
            fprintf(stderr, "evictd: cannot create redis target %s\n", cfg->targets[i].name);
            return 1;
        }
    rp.outstanding = rp.nitems;
    for (size_t i = 0; i < rp.nitems; i++) {
        item_t *it = &rp.items[i];
        it->job.keys = it->keys.v;
        it->job.nkeys = it->keys.n;
        it->job.patterns = it->patterns.v;
        it->job.npatterns = it->patterns.n;
        it->job.table = "replay";
        it->job.ud = it;
        evd_redis_submit(rp.targets[it->target], &it->job);
    }
    if (!rp.nitems)
        for (size_t i = 0; i < cfg->ntargets; i++)
            evd_redis_close(rp.targets[i], NULL, NULL);
    uv_run(rp.loop, UV_RUN_DEFAULT);

    /* Lines that could not be expanded, or whose deletes failed, go to the failed file. */
    size_t nfailed = 0, nok = 0;
    FILE *out = NULL;
    char outpath[4096];
    char stamp[32];
    time_t now = time(NULL);
    strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", gmtime(&now));
    snprintf(outpath, sizeof(outpath), "%s.failed-%s", dl_file, stamp);
    bool lost = false;
    for (size_t i = 0; i < lines.n; i++) {
        bool failed = kept[i];
        for (size_t k = first_item[i]; k < first_item[i + 1]; k++)
            failed |= rp.items[k].failed || !rp.items[k].done;
        if (!failed) {
            nok++;
            continue;
        }
        nfailed++;
        /* Never over an earlier replay's failed file (two replays within a second): -2, -3 ... */
        for (int k = 2; !out && !lost && k < 100; k++) {
            out = fopen(outpath, "wx");
            if (!out && errno == EEXIST)
                snprintf(outpath, sizeof(outpath), "%s.failed-%s-%d", dl_file, stamp, k);
            else if (!out)
                lost = true;
        }
        if (!out) {
            fprintf(stderr, "evictd: %s: %s (the failed lines are still in %s)\n", outpath, strerror(errno), dl_file);
            lost = true;
            break;
        }
        fprintf(out, "%s\n", lines.v[i]);
    }
    if (out && (fflush(out) != 0 || fsync(fileno(out)) != 0)) {
        fprintf(stderr, "evictd: %s: %s (the failed lines are still in %s)\n", outpath, strerror(errno), dl_file);
        lost = true;
    }
    if (out)
        fclose(out);
    EVD_LOG(EVD_LOG_INFO, "replayed", F_STR("file", dl_file), F_INT("lines", (int64_t)lines.n),
            F_INT("applied", (int64_t)nok), F_INT("failed", (int64_t)nfailed),
            F_STR("failed_file", nfailed && !lost ? outpath : NULL));
    evd_log_flush();
    for (size_t i = 0; i < rp.nitems; i++) {
        evd_keyvec_free(&rp.items[i].keys);
        evd_keyvec_free(&rp.items[i].patterns);
    }
    free(rp.items);
    free(rp.targets);
    free(first_item);
    free(kept);
    evd_strv_free(&lines);
    evd_config_free(cfg);
    uv_loop_close(rp.loop);
    return nfailed ? 1 : 0;
}
