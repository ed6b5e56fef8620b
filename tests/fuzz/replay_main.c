/* replay_main.c - a libFuzzer-free driver for the harnesses, built with gcc by the test suite.
 *
 * usage: <harness>_replay PATH...
 * Each PATH is a file or a directory; directories are walked recursively (entries sorted by
 * name, dot-files such as .gitkeep skipped). Every file is read whole and handed to
 * LLVMFuzzerTestOneInput once. A harness that finds a broken invariant aborts, which fails the
 * test. Prints "N inputs replayed" and exits 0; exits 2 on usage errors or unreadable paths.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t replayed;
static int failures;

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    uint8_t *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        fprintf(stderr, "%s: out of memory\n", path);
        return -1;
    }
    for (;;) {
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                fprintf(stderr, "%s: out of memory\n", path);
                return -1;
            }
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        free(buf);
        fprintf(stderr, "%s: read error\n", path);
        return -1;
    }
    /* A copy of exactly len bytes, so ASan (when enabled) catches reads past the input. */
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) {
        free(buf);
        fprintf(stderr, "%s: out of memory\n", path);
        return -1;
    }
    memcpy(copy, buf, len);
    free(buf);
    if (getenv("EVD_REPLAY_VERBOSE"))
        fprintf(stderr, "replaying %s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(copy, len);
    free(copy);
    replayed++;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int replay_path(const char *path, int depth)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return replay_file(path);
    if (depth > 16) {
        fprintf(stderr, "%s: directories nested too deep\n", path);
        return -1;
    }
    DIR *d = opendir(path);
    if (!d) {
        fprintf(stderr, "%s: cannot open directory: %s\n", path, strerror(errno));
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nv = realloc(names, cap * sizeof(*names));
            if (!nv) {
                rc = -1;
                break;
            }
            names = nv;
        }
        size_t len = strlen(path) + 1 + strlen(e->d_name) + 1;
        if (!(names[n] = malloc(len))) {
            rc = -1;
            break;
        }
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    if (rc == 0 && n)
        qsort(names, n, sizeof(*names), cmp_names);
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && replay_path(names[i], depth + 1) < 0)
            failures++;
        free(names[i]);
    }
    free(names);
    if (rc < 0)
        fprintf(stderr, "%s: out of memory\n", path);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIRECTORY...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++)
        if (replay_path(argv[i], 0) < 0)
            failures++;
    printf("%zu inputs replayed\n", replayed);
    if (failures) {
        fprintf(stderr, "%d path(s) could not be read\n", failures);
        return 2;
    }
    return 0;
}
