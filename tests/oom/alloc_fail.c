/* alloc_fail.c - allocation failures on demand, for tests. Linked into unit_test_alloc_fail and
 * evictd_oom (a test build of evictd), whose objects' calls to malloc, calloc, realloc, strdup
 * and strndup are wrapped with -Wl,--wrap (tests/CMakeLists.txt); the libraries' own
 * allocations are left alone.
 *
 * Two ways to fail:
 * - evd_oom_arm(n): the n-th allocation from now fails, once (the unit test tries each n);
 * - the environment, for a running daemon: while the file named by EVD_OOM_FILE exists, every
 *   N-th allocation fails, N the number the file holds (at least 2; default 5), and "evd_oom:
 *   allocation failed" goes to stderr. The file is looked at every 64 allocations (open, read,
 *   write(2): nothing allocated), so a test switches failures on and off, and changes N, by
 *   writing and removing it. */
#include <fcntl.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc_fail.h"

void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);

static atomic_bool armed, armed_failed;
static atomic_long armed_left;
static atomic_ulong calls;

void evd_oom_arm(long at)
{
    atomic_store(&armed_left, at);
    atomic_store(&armed_failed, false);
    atomic_store(&armed, true);
}

bool evd_oom_disarm(void)
{
    atomic_store(&armed, false);
    return atomic_load(&armed_failed);
}

static atomic_ulong period;

/* The file's number, or 0 when there is no file. */
static unsigned long file_period(const char *file)
{
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char buf[16] = {0};
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    unsigned long p = n > 0 ? strtoul(buf, NULL, 10) : 5;
    return p < 2 ? 2 : p;
}

static bool by_file(void)
{
    static const char *file;
    static atomic_bool ready;
    if (!atomic_load(&ready)) { /* getenv allocates nothing */
        file = getenv("EVD_OOM_FILE");
        atomic_store(&ready, true);
    }
    if (!file)
        return false;
    unsigned long n = atomic_fetch_add(&calls, 1);
    if (n % 64 == 0)
        atomic_store(&period, file_period(file));
    unsigned long p = atomic_load(&period);
    if (!p || n % p != p - 1)
        return false;
    static const char line[] = "evd_oom: allocation failed\n";
    ssize_t w = write(2, line, sizeof(line) - 1);
    (void)w;
    return true;
}

static bool refuse(void)
{
    if (atomic_load(&armed)) {
        if (atomic_fetch_sub(&armed_left, 1) != 0)
            return false;
        atomic_store(&armed_failed, true);
        return true;
    }
    return by_file();
}

void *__wrap_malloc(size_t n)
{
    return refuse() ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size)
{
    return refuse() ? NULL : __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n)
{
    return refuse() ? NULL : __real_realloc(p, n);
}

char *__wrap_strdup(const char *s)
{
    return refuse() ? NULL : __real_strdup(s);
}

char *__wrap_strndup(const char *s, size_t n)
{
    return refuse() ? NULL : __real_strndup(s, n);
}
