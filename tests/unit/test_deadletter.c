/* test_deadletter.c - the dead-letter writer on a real libuv loop and thread pool. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "deadletter.h"
#include "metrics.h"
#include "util.h"

#define MAX_CALLS 16

typedef struct fixture {
    uv_loop_t loop;
    uv_timer_t watchdog;
    bool timed_out;
    char dir[64];
    char path[128];
    /* Completed callbacks, in order. */
    int ids[MAX_CALLS];
    int statuses[MAX_CALLS];
    int ncalls;
    /* Chained-call test: what the callback does next. */
    evd_dl_t *dl;
    bool close_in_callback;
} fixture_t;

static fixture_t *fx; /* the callbacks' arg carries only an id */

static void on_watchdog(uv_timer_t *t)
{
    fixture_t *f = evd_container_of(t, fixture_t, watchdog);
    f->timed_out = true;
    uv_stop(t->loop);
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    assert_int_equal(uv_timer_init(&f->loop, &f->watchdog), 0);
    assert_int_equal(uv_timer_start(&f->watchdog, on_watchdog, 5000, 0), 0);
    /* The loop ends when the writes do; the watchdog only fires if they never end. */
    uv_unref((uv_handle_t *)&f->watchdog);
    snprintf(f->dir, sizeof(f->dir), "/tmp/evd_dl_XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof(f->path), "%s/dl.jsonl", f->dir);
    fx = f;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    uv_close((uv_handle_t *)&f->watchdog, NULL); /* inside f, freed below after the loop */
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
    assert_int_equal(system(cmd), 0);
    free(f);
    fx = NULL;
    return 0;
}

static void run(fixture_t *f)
{
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_false(f->timed_out);
}

static void on_done(int status, void *arg)
{
    assert_true(fx->ncalls < MAX_CALLS);
    fx->ids[fx->ncalls] = (int)(intptr_t)arg;
    fx->statuses[fx->ncalls] = status;
    fx->ncalls++;
    if (fx->close_in_callback) {
        fx->close_in_callback = false;
        evd_dl_close(fx->dl);
        fx->dl = NULL;
    }
}

static void write_counted(evd_dl_t *dl, const char *s, const uint64_t *by_reason, bool bad_input, int id)
{
    evd_buf_t b = {0};
    assert_int_equal(evd_buf_puts(&b, s), 0);
    assert_int_equal(evd_dl_write(dl, &b, by_reason, bad_input, on_done, (void *)(intptr_t)id), 0);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
}

static void write_str(evd_dl_t *dl, const char *s, bool bad_input, int id)
{
    write_counted(dl, s, NULL, bad_input, id);
}

static char *slurp(const char *path)
{
    static char buf[8192];
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    size_t n = fread(buf, 1, sizeof(buf) - 1, fp);
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

static void put_file(const char *path, const char *s)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fputs(s, fp) >= 0, 1);
    assert_int_equal(fclose(fp), 0);
}

static void assert_calls(fixture_t *f, int n)
{
    assert_int_equal(f->ncalls, n);
    for (int i = 0; i < n; i++) {
        assert_int_equal(f->ids[i], i + 1);
        assert_int_equal(f->statuses[i], 0);
    }
}

static void test_two_batches_in_order(void **state)
{
    fixture_t *f = *state;
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    write_str(dl, "{\"a\":1}\n{\"a\":2}\n", false, 1);
    write_str(dl, "{\"b\":1}\n", false, 2);
    assert_int_equal(f->ncalls, 0); /* never from inside evd_dl_write */
    run(f);
    assert_calls(f, 2);
    assert_int_equal(evd_dl_lines(dl), 3);
    assert_int_equal(evd_dl_dropped(dl), 0);
    assert_string_equal(slurp(f->path), "{\"a\":1}\n{\"a\":2}\n{\"b\":1}\n");
    evd_dl_close(dl);
    run(f);
}

static void test_appends_to_existing(void **state)
{
    fixture_t *f = *state;
    put_file(f->path, "{\"old\":1}\n");
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    write_str(dl, "{\"new\":1}\n", false, 1);
    run(f);
    assert_calls(f, 1);
    assert_string_equal(slurp(f->path), "{\"old\":1}\n{\"new\":1}\n");
    evd_dl_close(dl);
}

/* A file left ending in a partial line (a write cut short, then a restart or a reload): the next
 * line starts on a line of its own, at open and at a reopen of the same path alike. */
static void test_partial_last_line(void **state)
{
    fixture_t *f = *state;
    put_file(f->path, "{\"ok\":1}\n{\"ts\":1,\"reason\":\"retries_exh");
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    write_str(dl, "{\"n\":1}\n", false, 1);
    run(f);
    assert_string_equal(slurp(f->path), "{\"ok\":1}\n{\"ts\":1,\"reason\":\"retries_exh\n{\"n\":1}\n");
    FILE *fp = fopen(f->path, "ab"); /* cut short again, behind the writer's back */
    assert_non_null(fp);
    assert_int_equal(fputs("{\"ts\":2", fp) >= 0, 1);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(evd_dl_reopen(dl, f->path, 1 << 20), 0); /* SIGHUP, same path */
    write_str(dl, "{\"n\":2}\n", false, 2);
    run(f);
    assert_calls(f, 2);
    assert_string_equal(slurp(f->path),
                        "{\"ok\":1}\n{\"ts\":1,\"reason\":\"retries_exh\n{\"n\":1}\n{\"ts\":2\n{\"n\":2}\n");
    evd_dl_close(dl);
}

/* Past max_bytes only bad input is dropped; retries_exhausted lines are always written. */
static void test_bad_input_past_max_dropped(void **state)
{
    fixture_t *f = *state;
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 20, &dl), 0);
    write_str(dl, "{\"bad\":\"0123456\"}\n", true, 1);    /* 18 bytes: below the limit, written */
    write_str(dl, "{\"ok\":1}\n", false, 2);              /* 27 bytes now */
    write_str(dl, "{\"bad\":1}\n{\"bad\":2}\n", true, 3); /* past it: dropped */
    write_str(dl, "{\"ok\":2}\n", false, 4);
    write_str(dl, "{\"bad\":3}", true, 5); /* no final newline: still one line */
    run(f);
    assert_calls(f, 5);
    assert_int_equal(evd_dl_lines(dl), 3);
    assert_int_equal(evd_dl_dropped(dl), 3);
    assert_string_equal(slurp(f->path), "{\"bad\":\"0123456\"}\n{\"ok\":1}\n{\"ok\":2}\n");
    evd_dl_close(dl);
}

/* Only lines written are dead letters: counted by the reasons their writes gave; dropped ones,
 * and those of a write that failed, apart. */
static void test_counts_by_reason(void **state)
{
    fixture_t *f = *state;
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 200, &dl), 0);
    static const uint64_t first[EVD_DL_REASONS] = {2, 0, 0, 1}, second[EVD_DL_REASONS] = {0, 1, 1, 0},
                          dropped[EVD_DL_REASONS] = {0, 1, 0, 0};
    write_counted(dl,
                  "{\"a\":\"0123456789012345678901234567890123456789\"}\n"
                  "{\"b\":\"0123456789012345678901234567890123456789\"}\n"
                  "{\"c\":\"0123456789012345678901234567890123456789\"}",
                  first, false, 1); /* 148 bytes */
    write_counted(dl, "{\"d\":\"01234567890123456789\"}\n{\"e\":\"01234567890123456789\"}\n", second, true, 2);
    write_str(dl, "{\"f\":6}\n{}\n{}\n", false, 3);
    write_counted(dl, "{\"g\":7}\n", dropped, true, 4); /* past 200 bytes */
    run(f);
    assert_calls(f, 4);
    assert_int_equal(evd_dl_lines(dl), 8);
    assert_int_equal(evd_dl_dropped(dl), 1);
    static const uint64_t want[EVD_DL_REASONS] = {2, 1, 1, 1}; /* evd_metrics_reasons[] */
    for (int i = 0; i < EVD_DL_REASONS; i++)
        assert_int_equal(evd_dl_lines_by_reason(dl, i), want[i]);
    assert_int_equal(evd_dl_lines_by_reason(dl, -1), 0);
    assert_int_equal(evd_dl_lines_by_reason(dl, EVD_DL_REASONS), 0);
    evd_dl_close(dl);
}

static void test_max_counts_existing_size(void **state)
{
    fixture_t *f = *state;
    put_file(f->path, "0123456789012345678901234\n");
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 20, &dl), 0);
    write_str(dl, "{\"bad\":1}\n", true, 1);
    run(f);
    assert_calls(f, 1);
    assert_int_equal(evd_dl_dropped(dl), 1);
    assert_string_equal(slurp(f->path), "0123456789012345678901234\n");
    evd_dl_close(dl);
}

static void test_reopen_after_rename(void **state)
{
    fixture_t *f = *state;
    char old[160], other[160];
    snprintf(old, sizeof(old), "%s.1", f->path);
    snprintf(other, sizeof(other), "%s/other.jsonl", f->dir);
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    write_str(dl, "{\"n\":1}\n", false, 1);
    run(f);
    assert_int_equal(rename(f->path, old), 0);
    write_str(dl, "{\"n\":2}\n", false, 2); /* queued before the reopen: still the old file */
    assert_int_equal(evd_dl_reopen(dl, f->path, 1 << 20), 0);
    write_str(dl, "{\"n\":3}\n", false, 3);
    run(f);
    assert_string_equal(slurp(old), "{\"n\":1}\n{\"n\":2}\n");
    assert_string_equal(slurp(f->path), "{\"n\":3}\n");

    /* A new path and a new limit, which the reopened file is already past. */
    put_file(other, "0123456789\n");
    assert_int_equal(evd_dl_reopen(dl, other, 5), 0);
    write_str(dl, "{\"n\":4}\n", false, 4);
    write_str(dl, "{\"bad\":5}\n", true, 5);
    run(f);
    assert_calls(f, 5);
    assert_string_equal(slurp(other), "0123456789\n{\"n\":4}\n");
    assert_string_equal(slurp(f->path), "{\"n\":3}\n");
    assert_int_equal(evd_dl_lines(dl), 4);
    assert_int_equal(evd_dl_dropped(dl), 1);
    evd_dl_close(dl);
}

static void test_open_errors(void **state)
{
    fixture_t *f = *state;
    char missing[160];
    snprintf(missing, sizeof(missing), "%s/no/such/dir/dl.jsonl", f->dir);
    evd_dl_t *dl = NULL;
    assert_int_equal(evd_dl_open(&f->loop, missing, 1 << 20, &dl), -ENOENT);
    assert_null(dl);
    assert_int_equal(evd_dl_open(&f->loop, f->dir, 1 << 20, &dl), -EISDIR);

    /* A failed reopen keeps the old file. */
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    assert_int_equal(evd_dl_reopen(dl, missing, 1 << 20), -ENOENT);
    write_str(dl, "{\"n\":1}\n", false, 1);
    run(f);
    assert_calls(f, 1);
    assert_string_equal(slurp(f->path), "{\"n\":1}\n");
    evd_dl_close(dl);
}

/* A failing write reports its errno and the next batch is still attempted. */
static void test_write_error(void **state)
{
    fixture_t *f = *state;
    evd_dl_t *dl;
    if (access("/dev/full", W_OK) != 0)
        skip();
    assert_int_equal(evd_dl_open(&f->loop, "/dev/full", 1 << 20, &dl), 0);
    write_str(dl, "{\"n\":1}\n", false, 1);
    write_str(dl, "{\"n\":2}\n", false, 2);
    run(f);
    assert_int_equal(f->ncalls, 2);
    assert_int_equal(f->ids[0], 1);
    assert_int_equal(f->statuses[0], -ENOSPC);
    assert_int_equal(f->ids[1], 2);
    assert_int_equal(f->statuses[1], -ENOSPC);
    assert_int_equal(evd_dl_lines(dl), 0);
    evd_dl_close(dl);
}

/* Close with writes pending: they complete, their callbacks run, then dl is freed (ASan and
 * uv_loop_close in the teardown check the rest). Closing from the last callback works too. */
static void test_close_pending(void **state)
{
    fixture_t *f = *state;
    evd_dl_t *dl;
    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    write_str(dl, "{\"n\":1}\n", false, 1);
    write_str(dl, "", false, 2);
    write_str(dl, "{\"n\":3}\n", false, 3);
    evd_dl_close(dl);
    run(f);
    assert_calls(f, 3);
    assert_string_equal(slurp(f->path), "{\"n\":1}\n{\"n\":3}\n");

    assert_int_equal(evd_dl_open(&f->loop, f->path, 1 << 20, &dl), 0);
    f->dl = dl;
    f->close_in_callback = true;
    write_str(dl, "{\"n\":4}\n", false, 4);
    run(f);
    assert_calls(f, 4);
    assert_null(f->dl);
    assert_string_equal(slurp(f->path), "{\"n\":1}\n{\"n\":3}\n{\"n\":4}\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_two_batches_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_appends_to_existing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_partial_last_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_input_past_max_dropped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_counts_by_reason, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_counts_existing_size, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen_after_rename, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_pending, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
