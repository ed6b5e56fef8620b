/* test_redis.c - evd_redis against a real redis-server on a free loopback port. */
#define _GNU_SOURCE /* RTLD_NEXT */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <hiredis/hiredis.h>

#include "log.h"
#include "redis.h"

#define WATCHDOG_MS 15000

/* ---- a resolver that hangs ----------------------------------------------------------------- */

#define SLOW_DNS_MS 300
static atomic_int slow_now, slow_max; /* lookups of SLOW_HOST running now, and at most */
#define SLOW_HOST "slow.invalid"

/* libuv's thread pool calls this getaddrinfo (the executable's definition comes first): a lookup
 * of SLOW_HOST hangs for SLOW_DNS_MS and fails, as with a name server that does not answer; every
 * other name goes to the C library. */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    if (node && strcmp(node, SLOW_HOST) == 0) {
        int now = atomic_fetch_add(&slow_now, 1) + 1;
        int max = atomic_load(&slow_max);
        while (now > max && !atomic_compare_exchange_weak(&slow_max, &max, now))
            ;
        struct timespec ts = {0, SLOW_DNS_MS * 1000000L};
        nanosleep(&ts, NULL);
        atomic_fetch_sub(&slow_now, 1);
        return EAI_AGAIN;
    }
    int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    *(void **)&real = dlsym(RTLD_NEXT, "getaddrinfo");
    return real ? real(node, service, hints, res) : EAI_SYSTEM;
}

/* ---- the server ---------------------------------------------------------------------------- */

static pid_t srv_pid = -1;
static int srv_port;
static char srv_dir[64];
static char srv_sock[128];
static char srv_log[128];

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int free_port(void)
{
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(fd >= 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        socklen_t len = sizeof(sa);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
        close(fd);
        int port = ntohs(sa.sin_port);
        if (port != 6379)
            return port;
    }
}

static redisContext *sync_connect_port(int port)
{
    struct timeval tv = {0, 300000};
    return redisConnectWithTimeout("127.0.0.1", port, tv);
}

static bool server_answers(void)
{
    redisContext *c = sync_connect_port(srv_port);
    bool ok = false;
    if (c && !c->err) {
        redisReply *rep = redisCommand(c, "PING");
        ok = rep && rep->type == REDIS_REPLY_STATUS && strcmp(rep->str, "PONG") == 0;
        if (rep)
            freeReplyObject(rep);
    }
    if (c)
        redisFree(c);
    return ok;
}

static void server_start(void)
{
    char port[16];
    snprintf(port, sizeof(port), "%d", srv_port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        if (null >= 0) {
            dup2(null, 1);
            dup2(null, 2);
        }
        execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", srv_dir, "--unixsocket", srv_sock, "--logfile", srv_log, (char *)NULL);
        _exit(127);
    }
    srv_pid = pid;
    for (int i = 0; i < 250; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            srv_pid = -1;
            fail_msg("redis-server exited at start (status %d)", st);
        }
        if (server_answers())
            return;
        sleep_ms(20);
    }
    fail_msg("redis-server did not answer PING within 5 s");
}

static void server_kill(void)
{
    if (srv_pid <= 0)
        return;
    kill(srv_pid, SIGCONT);
    kill(srv_pid, SIGKILL);
    waitpid(srv_pid, NULL, 0);
    srv_pid = -1;
}

static void cleanup_at_exit(void)
{
    server_kill();
    DIR *d = opendir(srv_dir);
    if (d) {
        struct dirent *e;
        char path[512];
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof(path), "%s/%s", srv_dir, e->d_name);
            unlink(path);
        }
        closedir(d);
        rmdir(srv_dir);
    }
}

/* ---- synchronous helpers (setup and verification only) ------------------------------------- */

static redisContext *sync_connect(int db)
{
    redisContext *c = sync_connect_port(srv_port);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    if (db) {
        redisReply *rep = redisCommand(c, "SELECT %d", db);
        assert_non_null(rep);
        assert_int_not_equal(rep->type, REDIS_REPLY_ERROR);
        freeReplyObject(rep);
    }
    return c;
}

static long long sync_int(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(rep);
    if (rep->type != REDIS_REPLY_INTEGER)
        fail_msg("%s: expected an integer, got type %d (%s)", fmt, rep->type, rep->str ? rep->str : "");
    long long v = rep->integer;
    freeReplyObject(rep);
    return v;
}

static void sync_ok(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(rep);
    if (rep->type == REDIS_REPLY_ERROR)
        fail_msg("%s: %s", fmt, rep->str);
    freeReplyObject(rep);
}

/* ---- the loop side ------------------------------------------------------------------------- */

struct tjob {
    evd_job_t job; /* first: the callback gets back to the tjob from it */
    char *keys[16];
    char *pats[4];
    int calls;
    int retrying; /* EVD_REDIS_RETRYING notifications */
    int status;
    int attempts;
    char error[256];
};

typedef struct tjob tjob_t;
typedef struct tctx {
    uv_loop_t loop;
    uv_timer_t watchdog;
    uv_timer_t aux;
    evd_redis_t *r;
    int calls;
    int aux_fired;
    bool closed;
    tjob_t *resubmit; /* submitted from the first job callback */
    bool close_in_cb; /* the first job callback closes the target */
    /* target config with mutable storage */
    char name[32], host[64], user[32], pass[64], path[160];
    evd_target_cfg_t cfg;
    evd_redis_opts_t opts;
} tctx_t;

static void split(char **out, size_t max, size_t *n, const char *list)
{
    *n = 0;
    if (!list)
        return;
    const char *p = list;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *e = p;
        while (*e && *e != ' ')
            e++;
        if (e > p) {
            assert_true(*n < max);
            out[*n] = strndup(p, (size_t)(e - p));
            assert_non_null(out[*n]);
            (*n)++;
        }
        p = e;
    }
}

/* keys / pats: space-separated lists. */
static void tjob_init(tjob_t *j, const char *keys, const char *pats)
{
    memset(j, 0, sizeof(*j));
    split(j->keys, EVD_ARRAY_LEN(j->keys), &j->job.nkeys, keys);
    split(j->pats, EVD_ARRAY_LEN(j->pats), &j->job.npatterns, pats);
    j->job.keys = j->keys;
    j->job.patterns = j->pats;
    j->job.table = "public.products";
    j->job.ts = evd_now_wall_ms();
    j->status = 1;
}

static void tjob_free(tjob_t *j)
{
    for (size_t i = 0; i < j->job.nkeys; i++)
        free(j->keys[i]);
    for (size_t i = 0; i < j->job.npatterns; i++)
        free(j->pats[i]);
}

static void on_closed(void *arg);

static void job_cb(evd_job_t *job, int status, const char *error, void *ud)
{
    tctx_t *t = ud;
    tjob_t *j = (tjob_t *)job;
    if (status == EVD_REDIS_RETRYING) {
        /* Once per job, when its batch first enters backoff; the final callback follows. */
        assert_int_equal(j->retrying++, 0);
        assert_int_equal(j->calls, 0);
        return;
    }
    j->calls++;
    j->status = status;
    j->attempts = job->attempts;
    snprintf(j->error, sizeof(j->error), "%s", error ? error : "");
    if (status != 0)
        assert_non_null(error);
    t->calls++;
    if (t->close_in_cb && t->r) {
        evd_redis_t *r = t->r;
        t->r = NULL;
        t->close_in_cb = false;
        evd_redis_close(r, on_closed, t);
    }
    if (t->resubmit && t->r) {
        tjob_t *next = t->resubmit;
        t->resubmit = NULL;
        evd_redis_submit(t->r, &next->job);
    }
}

static void on_watchdog(uv_timer_t *h)
{
    (void)h;
    fail_msg("watchdog: the test did not finish within %d ms", WATCHDOG_MS);
}

static void on_closed(void *arg)
{
    ((tctx_t *)arg)->closed = true;
}

static void t_init(tctx_t *t)
{
    memset(t, 0, sizeof(*t));
    assert_int_equal(uv_loop_init(&t->loop), 0);
    assert_int_equal(uv_timer_init(&t->loop, &t->watchdog), 0);
    assert_int_equal(uv_timer_start(&t->watchdog, on_watchdog, WATCHDOG_MS, 0), 0);
    assert_int_equal(uv_timer_init(&t->loop, &t->aux), 0);
    t->aux.data = t;
    snprintf(t->name, sizeof(t->name), "default");
    snprintf(t->host, sizeof(t->host), "127.0.0.1");
    t->cfg = (evd_target_cfg_t){.name = t->name, .host = t->host, .port = srv_port, .timeout_ms = 2000, .db = 0};
    t->opts = (evd_redis_opts_t){.max_keys = 512,
                                 .max_delay_ms = 1,
                                 .max_attempts = 10,
                                 .initial_backoff_ms = 20,
                                 .max_backoff_ms = 200,
                                 .redelete_after_ms = 0};
}

#define RUN_UNTIL(t, cond)                                                                                             \
    do {                                                                                                               \
        while (!(cond)) {                                                                                              \
            uv_run(&(t)->loop, UV_RUN_ONCE);                                                                           \
            evd_log_flush();                                                                                           \
        }                                                                                                              \
    } while (0)

static void t_start(tctx_t *t)
{
    assert_int_equal(evd_redis_new(&t->loop, &t->cfg, &t->opts, job_cb, t, &t->r), 0);
}

static void t_connect(tctx_t *t)
{
    t_start(t);
    RUN_UNTIL(t, evd_redis_connected(t->r));
}

static void on_aux(uv_timer_t *h)
{
    ((tctx_t *)h->data)->aux_fired++;
}

/* Runs the loop for ms milliseconds. */
static void t_run_for(tctx_t *t, uint64_t ms, uv_timer_cb cb)
{
    int before = t->aux_fired;
    assert_int_equal(uv_timer_start(&t->aux, cb ? cb : on_aux, ms, 0), 0);
    RUN_UNTIL(t, t->aux_fired > before);
}

/* Closes the target (if any) and every handle; the loop must then close cleanly. */
static void t_finish(tctx_t *t)
{
    if (t->r) {
        size_t pending = evd_redis_pending(t->r);
        int calls = t->calls;
        evd_redis_close(t->r, on_closed, t);
        /* every pending job was called back before close returned */
        assert_int_equal(t->calls, calls + (int)pending);
        RUN_UNTIL(t, t->closed);
        t->r = NULL;
    }
    uv_close((uv_handle_t *)&t->watchdog, NULL);
    uv_close((uv_handle_t *)&t->aux, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    evd_log_flush();
    assert_int_equal(uv_loop_close(&t->loop), 0);
}

/* ---- fixtures ------------------------------------------------------------------------------ */

static int group_setup(void **state)
{
    (void)state;
    snprintf(srv_dir, sizeof(srv_dir), "/tmp/evd-redis-test-XXXXXX");
    if (!mkdtemp(srv_dir))
        return -1;
    snprintf(srv_sock, sizeof(srv_sock), "%s/redis.sock", srv_dir);
    snprintf(srv_log, sizeof(srv_log), "%s/redis.log", srv_dir);
    srv_port = free_port();
    atexit(cleanup_at_exit);
    server_start();
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    cleanup_at_exit();
    return 0;
}

/* Each test gets a running, empty server (an earlier test may have stopped or killed it). */
static int test_setup(void **state)
{
    (void)state;
    if (srv_pid > 0)
        kill(srv_pid, SIGCONT);
    if (srv_pid <= 0 || !server_answers()) {
        server_kill();
        server_start();
    }
    redisContext *c = sync_connect(0);
    sync_ok(c, "FLUSHALL");
    freeReplyObject(redisCommand(c, "ACL DELUSER cache"));
    redisFree(c);
    return 0;
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_keys_deleted(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET k:1 a k:2 b k:3 c keep:1 d");

    tctx_t t;
    t_init(&t);
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "k:1 k:2 k:3", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.calls, 1);
    assert_int_equal(j.status, 0);
    assert_int_equal(j.attempts, 1);
    assert_int_equal(evd_redis_pending(t.r), 0);
    const evd_redis_stats_t *st = evd_redis_stats(t.r);
    assert_int_equal(st->keys, 3);
    assert_int_equal(st->deleted, 3);
    assert_int_equal(st->batches, 1);
    assert_int_equal(st->retries, 0);
    assert_int_equal(sync_int(c, "EXISTS k:1 k:2 k:3"), 0);
    assert_int_equal(sync_int(c, "EXISTS keep:1"), 1);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void test_duplicates_deleted_once(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET d:1 a d:2 b d:3 c d:4 d");

    tctx_t t;
    t_init(&t);
    t.opts.max_delay_ms = 20;
    t_connect(&t);
    tjob_t a, b, d;
    tjob_init(&a, "d:1 d:1 d:2 d:1", NULL);
    tjob_init(&b, "d:3 d:4 d:2", NULL);
    tjob_init(&d, "d:3 d:4", NULL);
    /* a goes at once (nothing in flight); b and d fill the next batch while a is in flight */
    evd_redis_submit(t.r, &a.job);
    evd_redis_submit(t.r, &b.job);
    evd_redis_submit(t.r, &d.job);
    assert_int_equal(evd_redis_pending(t.r), 3);
    RUN_UNTIL(&t, t.calls == 3);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    assert_int_equal(d.status, 0);
    const evd_redis_stats_t *st = evd_redis_stats(t.r);
    assert_int_equal(st->batches, 2);
    /* distinct keys sent: {d:1,d:2} then {d:3,d:4,d:2}; d:2 was already gone the second time */
    assert_int_equal(st->keys, 5);
    assert_int_equal(st->deleted, 4);
    assert_int_equal(sync_int(c, "EXISTS d:1 d:2 d:3 d:4"), 0);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);
    tjob_free(&d);
    redisFree(c);
}

/* A batch goes at once when none is in flight: b, queued while a was in flight, goes as soon as
 * a is back, not when max_delay_ms (3 s here) runs out. */
static void test_queue_goes_when_none_in_flight(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET q:1 a q:2 b");
    tctx_t t;
    t_init(&t);
    t.opts.max_delay_ms = 3000;
    t_connect(&t);
    tjob_t a, b;
    tjob_init(&a, "q:1", NULL);
    tjob_init(&b, "q:2", NULL);
    uint64_t t0 = uv_hrtime();
    evd_redis_submit(t.r, &a.job);
    evd_redis_submit(t.r, &b.job);
    RUN_UNTIL(&t, t.calls == 2);
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    assert_int_equal(a.status, 0);
    assert_int_equal(b.status, 0);
    assert_int_equal(evd_redis_stats(t.r)->batches, 2);
    if (ms >= 1500)
        fail_msg("the second batch waited %.0f ms: it should go when the first is back", ms);
    assert_int_equal(sync_int(c, "EXISTS q:1 q:2"), 0);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);
    redisFree(c);
}

static void test_max_keys_splits_commands(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET m:1 a m:2 b m:3 c m:4 d m:5 e");
    tctx_t t;
    t_init(&t);
    t.opts.max_keys = 2;
    t_connect(&t);
    tjob_t j, k;
    tjob_init(&j, "m:1 m:2 m:3 m:4 m:5", NULL); /* one job larger than max_keys */
    tjob_init(&k, "m:1", NULL);
    evd_redis_submit(t.r, &j.job);
    evd_redis_submit(t.r, &k.job);
    RUN_UNTIL(&t, t.calls == 2);
    assert_int_equal(j.status, 0);
    assert_int_equal(k.status, 0);
    assert_int_equal(evd_redis_stats(t.r)->deleted, 5);
    assert_int_equal(sync_int(c, "EXISTS m:1 m:2 m:3 m:4 m:5"), 0);
    t_finish(&t);
    tjob_free(&j);
    tjob_free(&k);
    redisFree(c);
}

static void test_pattern_scan(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    for (int i = 0; i < 2500; i++)
        assert_int_equal(redisAppendCommand(c, "SET p:%d v", i), REDIS_OK);
    for (int i = 0; i < 2500; i++) {
        redisReply *rep;
        assert_int_equal(redisGetReply(c, (void **)&rep), REDIS_OK);
        freeReplyObject(rep);
    }
    sync_ok(c, "MSET q:1 a px:1 b p c x:1 d");

    tctx_t t;
    t_init(&t);
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "x:1", "p:*");
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(sync_int(c, "DBSIZE"), 3);
    assert_int_equal(sync_int(c, "EXISTS q:1 px:1 p"), 3);
    const evd_redis_stats_t *st = evd_redis_stats(t.r);
    assert_int_equal(st->patterns, 1);
    assert_int_equal(st->deleted, 2501);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void test_literal_star_key(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET lit:* a lit:a b lit:b c");
    tctx_t t;
    t_init(&t);
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "lit:*", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(sync_int(c, "EXISTS lit:*"), 0);
    assert_int_equal(sync_int(c, "EXISTS lit:a lit:b"), 2);
    assert_int_equal(evd_redis_stats(t.r)->patterns, 0);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void test_auth_and_select(void **state)
{
    (void)state;
    redisContext *c0 = sync_connect(0);
    sync_ok(c0, "ACL SETUSER cache on >secret ~* +@all");
    sync_ok(c0, "SET a:1 db0");
    redisContext *c2 = sync_connect(2);
    sync_ok(c2, "SET a:1 db2");

    tctx_t t;
    t_init(&t);
    snprintf(t.user, sizeof(t.user), "cache");
    snprintf(t.pass, sizeof(t.pass), "secret");
    t.cfg.username = t.user;
    t.cfg.password = t.pass;
    t.cfg.db = 2;
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "a:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(sync_int(c2, "EXISTS a:1"), 0);
    assert_int_equal(sync_int(c0, "EXISTS a:1"), 1);
    t_finish(&t);
    tjob_free(&j);

    /* a wrong password: AUTH fails, the job exhausts its attempts, no password in errors */
    sync_ok(c2, "SET a:1 db2");
    t_init(&t);
    snprintf(t.user, sizeof(t.user), "cache");
    snprintf(t.pass, sizeof(t.pass), "Wr0ngPa55");
    t.cfg.username = t.user;
    t.cfg.password = t.pass;
    t.cfg.db = 2;
    t.opts.max_attempts = 2;
    t_start(&t);
    RUN_UNTIL(&t, evd_redis_last_error(t.r));
    assert_non_null(strstr(evd_redis_last_error(t.r), "WRONGPASS"));
    assert_null(strstr(evd_redis_last_error(t.r), "Wr0ngPa55"));
    tjob_init(&j, "a:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, -EIO);
    assert_int_equal(j.attempts, 2);
    assert_null(strstr(j.error, "Wr0ngPa55"));
    assert_int_equal(sync_int(c2, "EXISTS a:1"), 1);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c0);
    redisFree(c2);
}

static void test_unix_socket(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "SET u:1 a");
    tctx_t t;
    t_init(&t);
    snprintf(t.path, sizeof(t.path), "%s", srv_sock);
    t.cfg.host = NULL;
    t.cfg.unix_path = t.path;
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "u:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(sync_int(c, "EXISTS u:1"), 0);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void test_hostname_resolved(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "SET h:1 a");
    tctx_t t;
    t_init(&t);
    /* localhost may resolve to ::1 first, where nothing listens: the target moves on */
    snprintf(t.host, sizeof(t.host), "localhost");
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "h:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(sync_int(c, "EXISTS h:1"), 0);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void on_aux_sigcont(uv_timer_t *h)
{
    kill(srv_pid, SIGCONT);
    on_aux(h);
}

/* A lookup that outlives its attempt's timeout is taken over by the next attempt: one lookup at
 * a time, where every attempt used to start one more and fill libuv's thread pool (which the
 * dead-letter writer shares). */
static void test_hanging_resolver_one_lookup_at_a_time(void **state)
{
    (void)state;
    tctx_t t;
    t_init(&t);
    snprintf(t.host, sizeof(t.host), SLOW_HOST);
    t.cfg.timeout_ms = 40;
    t.opts.initial_backoff_ms = 5;
    t.opts.max_backoff_ms = 10;
    atomic_store(&slow_max, 0);
    t_start(&t);
    t_run_for(&t, 3 * SLOW_DNS_MS, NULL);
    assert_false(evd_redis_connected(t.r));
    assert_int_equal(atomic_load(&slow_max), 1);
    t_finish(&t);
}

static void test_stopped_server_times_out_and_retries(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "SET s:1 a");
    tctx_t t;
    t_init(&t);
    t.cfg.timeout_ms = 200;
    t.opts.max_attempts = 100;
    t.opts.initial_backoff_ms = 10;
    t.opts.max_backoff_ms = 100;
    t_connect(&t);

    assert_int_equal(kill(srv_pid, SIGSTOP), 0);
    uint64_t t0 = uv_now(&t.loop);
    tjob_t j;
    tjob_init(&j, "s:1", NULL);
    evd_redis_submit(t.r, &j.job);
    uv_timer_start(&t.aux, on_aux_sigcont, 900, 0);
    RUN_UNTIL(&t, j.calls);
    uv_update_time(&t.loop);
    assert_int_equal(j.status, 0);
    assert_true(j.attempts >= 2);
    assert_int_equal(j.retrying, 1); /* told once that it waits in backoff */
    assert_true(uv_now(&t.loop) - t0 >= 900);
    assert_true(t.aux_fired == 1);
    const evd_redis_stats_t *st = evd_redis_stats(t.r);
    assert_true(st->retries >= 1);
    assert_true(st->reconnects >= 1);
    assert_int_equal(sync_int(c, "EXISTS s:1"), 0);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

/* A batch too large for the socket's buffers while Redis reads nothing: the write that goes at
 * the end of the loop iteration leaves bytes behind, and the rest must wait for writability
 * (polled), not be retried every iteration, and still all arrive once Redis reads again. */
static void test_large_batch_waits_for_writability(void **state)
{
    (void)state;
    enum { NJOBS = 12, NKEYS = 16, KEYLEN = 60000 };
    redisContext *c = sync_connect(0);
    char *list = malloc((size_t)NKEYS * (KEYLEN + 32));
    assert_non_null(list);
    tjob_t jobs[NJOBS];
    for (int i = 0; i < NJOBS; i++) {
        size_t n = 0;
        for (int k = 0; k < NKEYS; k++) {
            if (k)
                list[n++] = ' ';
            char *name = list + n;
            int len = sprintf(name, "big:%d:%d:", i, k);
            memset(name + len, 'x', KEYLEN);
            name[len + KEYLEN] = '\0';
            sync_ok(c, "SET %b v", name, (size_t)len + KEYLEN);
            n += (size_t)len + KEYLEN;
        }
        tjob_init(&jobs[i], list, NULL);
    }
    free(list);
    assert_int_equal(sync_int(c, "DBSIZE"), NJOBS * NKEYS);

    tctx_t t;
    t_init(&t);
    t.cfg.timeout_ms = 10000;
    t_connect(&t);
    assert_int_equal(kill(srv_pid, SIGSTOP), 0);
    for (int i = 0; i < NJOBS; i++)
        evd_redis_submit(t.r, &jobs[i].job);
    /* ~11 MB of UNLINKs against a stopped reader: a busy retry would turn the loop thousands of
     * times in these 400 ms. */
    int iterations = 0;
    uv_timer_start(&t.aux, on_aux_sigcont, 400, 0);
    while (!t.aux_fired) {
        uv_run(&t.loop, UV_RUN_ONCE);
        iterations++;
    }
    assert_true(iterations < 200);
    RUN_UNTIL(&t, t.calls == NJOBS);
    for (int i = 0; i < NJOBS; i++) {
        assert_int_equal(jobs[i].status, 0);
        assert_int_equal(jobs[i].attempts, 1);
    }
    const evd_redis_stats_t *st = evd_redis_stats(t.r);
    assert_int_equal(st->deleted, NJOBS * NKEYS);
    assert_int_equal(st->retries, 0);
    assert_int_equal(sync_int(c, "DBSIZE"), 0);
    t_finish(&t);
    for (int i = 0; i < NJOBS; i++)
        tjob_free(&jobs[i]);
    redisFree(c);
}

static void test_killed_server_gives_eio(void **state)
{
    (void)state;
    tctx_t t;
    t_init(&t);
    t.opts.max_attempts = 3;
    t.opts.initial_backoff_ms = 10;
    t.opts.max_backoff_ms = 50;
    t_connect(&t);
    server_kill();
    tjob_t j;
    tjob_init(&j, "e:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, -EIO);
    assert_int_equal(j.attempts, 3);
    assert_true(j.error[0] != '\0');
    assert_false(evd_redis_connected(t.r));
    assert_non_null(evd_redis_last_error(t.r));
    assert_int_equal(evd_redis_stats(t.r)->retries, 2);
    t_finish(&t);
    tjob_free(&j);
}

static void test_restarted_server_reconnects(void **state)
{
    (void)state;
    tctx_t t;
    t_init(&t);
    t.opts.initial_backoff_ms = 10;
    t.opts.max_backoff_ms = 100;
    t_connect(&t);
    server_kill();
    RUN_UNTIL(&t, !evd_redis_connected(t.r));
    t_run_for(&t, 100, NULL); /* a few failed reconnects */
    server_start();
    RUN_UNTIL(&t, evd_redis_connected(t.r));
    assert_int_equal(evd_redis_stats(t.r)->reconnects, 1);
    assert_null(evd_redis_last_error(t.r));

    redisContext *c = sync_connect(0);
    sync_ok(c, "SET r:1 a");
    tjob_t j;
    tjob_init(&j, "r:1", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(j.attempts, 1);
    assert_int_equal(sync_int(c, "EXISTS r:1"), 0);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

static void test_redelete_after_delay(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET rd:1 a rd:2 b");
    tctx_t t;
    t_init(&t);
    t.opts.redelete_after_ms = 150;
    t_connect(&t);
    tjob_t j;
    tjob_init(&j, "rd:1 rd:2", NULL);
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, j.calls);
    assert_int_equal(j.status, 0);
    /* a reader that missed the cache writes the stale value back */
    sync_ok(c, "SET rd:1 stale");
    t_run_for(&t, 50, NULL);
    assert_int_equal(sync_int(c, "EXISTS rd:1"), 1);
    t_run_for(&t, 250, NULL);
    assert_int_equal(sync_int(c, "EXISTS rd:1 rd:2"), 0);
    assert_int_equal(evd_redis_stats(t.r)->deleted, 3);
    t_finish(&t);
    tjob_free(&j);
    redisFree(c);
}

typedef struct close_ctx {
    tctx_t *t;
    size_t pending_before;
    int calls_before;
} close_ctx_t;

static close_ctx_t close_ctx;

static void on_aux_close(uv_timer_t *h)
{
    tctx_t *t = h->data;
    close_ctx.pending_before = evd_redis_pending(t->r);
    close_ctx.calls_before = t->calls;
    evd_redis_close(t->r, on_closed, t);
    /* the callbacks ran before close returned */
    assert_int_equal(t->calls, close_ctx.calls_before + (int)close_ctx.pending_before);
    t->r = NULL;
    on_aux(h);
}

static void test_close_cancels_in_flight_and_queued(void **state)
{
    (void)state;
    tctx_t t;
    t_init(&t);
    t.cfg.timeout_ms = 5000;
    t_connect(&t);
    assert_int_equal(kill(srv_pid, SIGSTOP), 0);
    tjob_t a, b;
    tjob_init(&a, "c:1", "c:*");
    tjob_init(&b, "c:2", NULL);
    evd_redis_submit(t.r, &a.job); /* in flight, unanswered */
    evd_redis_submit(t.r, &b.job); /* queued behind it */
    uv_timer_start(&t.aux, on_aux_close, 100, 0);
    RUN_UNTIL(&t, t.closed);
    assert_int_equal(close_ctx.pending_before, 2);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(a.status, -ECANCELED);
    assert_int_equal(b.status, -ECANCELED);
    kill(srv_pid, SIGCONT);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);
}

/* A target where nothing listens, with job j (on key) waiting in retry backoff. */
static void start_job_in_backoff(tctx_t *t, tjob_t *j, const char *key)
{
    t_init(t);
    t->cfg.port = free_port(); /* nothing listens there */
    t->opts.max_attempts = 1000;
    t->opts.initial_backoff_ms = 50;
    t_start(t);
    tjob_init(j, key, NULL);
    evd_redis_submit(t->r, &j->job);
    t_run_for(t, 100, NULL);
    assert_int_equal(j->calls, 0);
    assert_int_equal(j->retrying, 1);
}

static void test_close_cancels_backoff(void **state)
{
    (void)state;
    tctx_t t;
    tjob_t j;
    start_job_in_backoff(&t, &j, "b:1");
    assert_true(evd_redis_stats(t.r)->retries >= 1);
    assert_non_null(evd_redis_last_error(t.r));
    t_finish(&t);
    assert_int_equal(j.calls, 1);
    assert_int_equal(j.status, -ECANCELED);
    assert_true(j.attempts >= 1);
    tjob_free(&j);
}

/* A retired target hands back at once what waits (the queue, batches in backoff), and a batch in
 * flight when it fails, instead of retrying it; what Redis confirms finishes as usual. */
static void test_retire_hands_back_waiting_jobs(void **state)
{
    (void)state;
    tctx_t t;
    tjob_t w;
    start_job_in_backoff(&t, &w, "m:1");
    evd_redis_retire(t.r);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.status, EVD_REDIS_MOVED);
    assert_true(w.attempts >= 1);
    assert_int_equal(evd_redis_pending(t.r), 0);
    t_finish(&t);
    tjob_free(&w);

    t_init(&t);
    t.cfg.timeout_ms = 300;
    t.opts.max_attempts = 1000;
    t_connect(&t);
    assert_int_equal(kill(srv_pid, SIGSTOP), 0);
    tjob_t a, b;
    tjob_init(&a, "m:2", NULL);
    tjob_init(&b, "m:3", NULL);
    evd_redis_submit(t.r, &a.job); /* in flight, unanswered */
    evd_redis_submit(t.r, &b.job); /* queued behind it */
    evd_redis_retire(t.r);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, EVD_REDIS_MOVED);
    assert_int_equal(a.calls, 0);
    RUN_UNTIL(&t, a.calls == 1); /* its timeout */
    assert_int_equal(kill(srv_pid, SIGCONT), 0);
    assert_int_equal(a.status, EVD_REDIS_MOVED);
    assert_int_equal(a.retrying, 0);
    assert_int_equal(evd_redis_stats(t.r)->retries, 0);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);

    /* Confirmed as usual once retired. */
    t_init(&t);
    t_connect(&t);
    tjob_t c;
    tjob_init(&c, "m:4", NULL);
    evd_redis_submit(t.r, &c.job);
    evd_redis_retire(t.r);
    RUN_UNTIL(&t, c.calls == 1);
    assert_int_equal(c.status, 0);
    t_finish(&t);
    tjob_free(&c);
}

static void test_submit_from_callback_and_empty_job(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "SET n:1 a");
    tctx_t t;
    t_init(&t);
    t_connect(&t);
    tjob_t j, k;
    tjob_init(&j, NULL, NULL); /* nothing to delete: confirmed at once */
    tjob_init(&k, "n:1", NULL);
    t.resubmit = &k;
    evd_redis_submit(t.r, &j.job);
    RUN_UNTIL(&t, k.calls);
    assert_int_equal(j.status, 0);
    assert_int_equal(k.status, 0);
    assert_int_equal(sync_int(c, "EXISTS n:1"), 0);
    t_finish(&t);
    tjob_free(&j);
    tjob_free(&k);
    redisFree(c);
}

static void test_close_from_callback(void **state)
{
    (void)state;
    redisContext *c = sync_connect(0);
    sync_ok(c, "MSET cb:1 a cb:2 b");
    /* from a reply callback of the live connection (b waits behind a, not going as a second
     * batch in flight that could come back first) */
    tctx_t t;
    t_init(&t);
    t.opts.max_delay_ms = 2000;
    t_connect(&t);
    tjob_t a, b;
    tjob_init(&a, "cb:1", "cb:*");
    tjob_init(&b, "cb:2", NULL);
    t.close_in_cb = true;
    evd_redis_submit(t.r, &a.job);
    evd_redis_submit(t.r, &b.job);
    RUN_UNTIL(&t, t.closed);
    assert_int_equal(a.status, 0);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, -ECANCELED);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);

    /* from the connection-lost path, with the last attempt failing */
    t_init(&t);
    t.opts.max_attempts = 1;
    t_connect(&t);
    server_kill();
    tjob_init(&a, "cb:1", NULL);
    tjob_init(&b, "cb:2", NULL);
    t.close_in_cb = true;
    evd_redis_submit(t.r, &a.job);
    evd_redis_submit(t.r, &b.job);
    RUN_UNTIL(&t, t.closed);
    assert_int_equal(a.status, -EIO);
    assert_int_equal(a.attempts, 1);
    /* b was attempted (not connected) and failed before a's callback ran: it keeps -EIO */
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.status, -EIO);
    t_finish(&t);
    tjob_free(&a);
    tjob_free(&b);
    redisFree(c);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *lvl = getenv("EVD_TEST_LOG");
    evd_log_level_t level = EVD_LOG_WARN;
    if (lvl)
        (void)evd_log_parse_level(lvl, &level);
    evd_log_configure(EVD_LOG_TEXT, level);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_keys_deleted, test_setup),
        cmocka_unit_test_setup(test_duplicates_deleted_once, test_setup),
        cmocka_unit_test_setup(test_max_keys_splits_commands, test_setup),
        cmocka_unit_test_setup(test_queue_goes_when_none_in_flight, test_setup),
        cmocka_unit_test_setup(test_pattern_scan, test_setup),
        cmocka_unit_test_setup(test_literal_star_key, test_setup),
        cmocka_unit_test_setup(test_auth_and_select, test_setup),
        cmocka_unit_test_setup(test_unix_socket, test_setup),
        cmocka_unit_test_setup(test_hostname_resolved, test_setup),
        cmocka_unit_test_setup(test_hanging_resolver_one_lookup_at_a_time, test_setup),
        cmocka_unit_test_setup(test_stopped_server_times_out_and_retries, test_setup),
        cmocka_unit_test_setup(test_large_batch_waits_for_writability, test_setup),
        cmocka_unit_test_setup(test_killed_server_gives_eio, test_setup),
        cmocka_unit_test_setup(test_restarted_server_reconnects, test_setup),
        cmocka_unit_test_setup(test_redelete_after_delay, test_setup),
        cmocka_unit_test_setup(test_close_cancels_in_flight_and_queued, test_setup),
        cmocka_unit_test_setup(test_close_cancels_backoff, test_setup),
        cmocka_unit_test_setup(test_retire_hands_back_waiting_jobs, test_setup),
        cmocka_unit_test_setup(test_submit_from_callback_and_empty_job, test_setup),
        cmocka_unit_test_setup(test_close_from_callback, test_setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
