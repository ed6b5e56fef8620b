/* bench_expand.c - times evd_rules_expand (and payload parsing) for a routex shipments UPDATE. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "payload.h"
#include "rules.h"

#ifndef EVD_SOURCE_DIR
#define EVD_SOURCE_DIR "."
#endif

static const char payload[] = "{\"v\":1,\"id\":42,\"tx\":901,\"ts\":1763765000123.4,\"schema\":\"public\","
                              "\"table\":\"shipments\",\"op\":\"UPDATE\","
                              "\"old\":{\"id\":7,\"product_id\":3,\"driver_id\":2},"
                              "\"new\":{\"id\":7,\"product_id\":4,\"driver_id\":2}}";

static char *bench_env(const char *name)
{
    static char database_url[] = "postgres://evictd@127.0.0.1/bench";
    return strcmp(name, "DATABASE_URL") == 0 ? database_url : NULL;
}

/* Every lookup resolves to one user id, as a prefetched cache would answer. */
static const evd_lookup_vals_t *bench_resolve(void *ud, const evd_rule_t *rule, size_t lookup_idx,
                                              const char *const *args, size_t nargs)
{
    static char user[] = "20";
    static char *vals[] = {user};
    static const evd_lookup_vals_t lv = {.status = 0, .n = 1, .v = vals};
    (void)ud;
    (void)rule;
    (void)lookup_idx;
    (void)args;
    (void)nargs;
    return &lv;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    const char *path = argc > 2 ? argv[2] : EVD_SOURCE_DIR "/config/routex.json";
    if (n <= 0) {
        fprintf(stderr, "usage: bench_expand [N] [CONFIG]\n");
        return 2;
    }
    char err[1024];
    evd_config_t *cfg = evd_config_load(path, bench_env, err, sizeof(err));
    if (!cfg) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    evd_change_t c;
    if (evd_payload_parse(payload, sizeof(payload) - 1, &c, err, sizeof(err)) != EVD_PAYLOAD_OK) {
        fprintf(stderr, "payload: %s\n", err);
        return 1;
    }
    evd_expansion_t x;
    if (evd_expansion_init(&x, cfg->ntargets) < 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    /* Sanity: the change maps to 5 keys and 2 patterns, or the figure means nothing. */
    if (evd_rules_expand(&cfg->rules, &c, bench_resolve, NULL, &x) < 0 || x.per_target[0].keys.n != 5 ||
        x.per_target[0].patterns.n != 2 || x.widened) {
        fprintf(stderr, "unexpected expansion: %zu keys, %zu patterns, %u widened\n", x.per_target[0].keys.n,
                x.per_target[0].patterns.n, x.widened);
        return 1;
    }
    evd_expansion_reset(&x);

    size_t keys = 0;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (evd_rules_expand(&cfg->rules, &c, bench_resolve, NULL, &x) < 0) {
            fprintf(stderr, "expand failed\n");
            return 1;
        }
        keys += x.per_target[0].keys.n;
        evd_expansion_reset(&x);
    }
    double t1 = now_ns();

    size_t rows = 0;
    for (long i = 0; i < n; i++) {
        evd_change_t p;
        if (evd_payload_parse(payload, sizeof(payload) - 1, &p, err, sizeof(err)) != EVD_PAYLOAD_OK) {
            fprintf(stderr, "payload: %s\n", err);
            return 1;
        }
        rows += p.nrows;
        evd_change_clear(&p);
    }
    double t2 = now_ns();

    printf("config %s, %ld changes (shipments UPDATE, %zu keys + 2 patterns each)\n", path, n, keys / (size_t)n);
    printf("expand:        %8.1f ns/change  (%.2f M changes/s)\n", (t1 - t0) / (double)n, (double)n / (t1 - t0) * 1e3);
    printf("payload parse: %8.1f ns/change  (%.2f M changes/s, %zu rows)\n", (t2 - t1) / (double)n,
           (double)n / (t2 - t1) * 1e3, rows);

    evd_expansion_free(&x);
    evd_change_clear(&c);
    evd_config_free(cfg);
    return 0;
}
