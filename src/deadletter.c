/* deadletter.c - appends dead-letter batches on the thread pool, one at a time, each fsynced. */
#include "deadletter.h"
#include "metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Everything waits its turn in one FIFO, so batches reach the file in the order they were
 * handed over, and a reopen takes effect only after every batch queued before it is written
 * to the old file. Only the head of the queue is ever on the thread pool. */
typedef enum {
    DL_WRITE,  /* append buf and fsync (or count it as dropped) */
    DL_SWITCH, /* close the current file and carry on with one opened by evd_dl_reopen */
} dl_op_t;

typedef struct dl_req {
    uv_work_t work;
    struct dl_req *next;
    evd_dl_t *dl;
    dl_op_t op;
    evd_buf_t buf; /* owned */
    bool bad_input;
    void (*done)(int status, void *arg);
    void *arg;
    /* DL_SWITCH: the already opened file and its settings. DL_WRITE: the file to write, set
     * on the loop just before the work is queued. */
    int fd;
    int dir_fd; /* the file's directory, to fsync once: the file was just created (else -1) */
    int64_t size;
    int64_t max_bytes;
    /* Set on the loop before queueing, read by the worker. */
    bool drop;    /* bad input past max_bytes: count, don't write */
    bool lead_nl; /* the file ends in a partial line (an earlier failed write): end it first */
    /* Set by the worker, read on the loop afterwards. */
    int status;
    size_t written;
    uint64_t nlines;
    uint64_t by_reason[EVD_DL_REASONS]; /* of nlines */
    bool torn;                          /* the file now ends in a partial line */
} dl_req_t;

struct evd_dl {
    uv_loop_t *loop;
    int fd;
    int dir_fd;   /* the directory of the file just created, until a write has fsynced it; or -1 */
    int64_t size; /* fstat at open plus bytes written since */
    int64_t max_bytes;
    uint64_t lines;
    uint64_t by_reason[EVD_DL_REASONS]; /* of lines */
    uint64_t dropped;
    dl_req_t *head, *tail;
    bool busy;    /* head is on the thread pool */
    bool closing; /* free once the queue is empty */
    bool torn;
};

/* A file just created is not durable until its directory entry is: its directory is opened here
 * and fsynced by the first write, on the thread pool (an fsync on the loop would stall it). */
static int open_dir_of(const char *path)
{
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == path)
        snprintf(dir, sizeof(dir), "/");
    else if ((size_t)(slash - path) < sizeof(dir))
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
    else
        return -ENAMETOOLONG;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

static int fsync_fd(int fd, bool dir)
{
    while (fsync(fd) < 0) {
        /* Some file systems refuse to fsync a directory (EINVAL); PostgreSQL's fsync_fname
         * lets that pass too. */
        if (errno != EINTR)
            return dir && errno == EINVAL ? 0 : -errno;
    }
    return 0;
}

static int open_file(const char *path, int *fd_out, int *dir_fd_out, int64_t *size_out)
{
    const int flags = O_RDWR | O_APPEND | O_CLOEXEC; /* read: ends_torn */
    bool created = false;
    int fd = open(path, flags);
    if (fd < 0 && errno == ENOENT) {
        fd = open(path, flags | O_CREAT | O_EXCL, 0640);
        created = fd >= 0;
        if (fd < 0 && errno == EEXIST) /* created meanwhile by someone else */
            fd = open(path, flags);
    }
    if (fd < 0)
        return -errno;
    struct stat st;
    int err = fstat(fd, &st) < 0 ? -errno : 0;
    int dir_fd = -1;
    if (err == 0 && created) {
        dir_fd = open_dir_of(path);
        err = dir_fd < 0 ? dir_fd : 0;
    }
    if (err < 0) {
        close(fd);
        return err;
    }
    *fd_out = fd;
    *dir_fd_out = dir_fd;
    *size_out = (int64_t)st.st_size;
    return 0;
}

/* The file ends in a partial line (a write cut short, by a full disk or a crash, in this run or
 * an earlier one): the next line must start on a line of its own, or replay could read neither. */
static bool ends_torn(int fd)
{
    struct stat st;
    char last;
    return fstat(fd, &st) == 0 && st.st_size > 0 && pread(fd, &last, 1, st.st_size - 1) == 1 && last != '\n';
}

/* A final line without its '\n' still counts. */
static uint64_t count_lines(const char *p, size_t n)
{
    uint64_t lines = 0;
    const char *end = p + n, *nl;
    while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        lines++;
        p = nl + 1;
    }
    return lines + (p < end ? 1 : 0);
}

static int write_all(int fd, const char *p, size_t n, size_t *written)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
        *written += (size_t)w;
    }
    return 0;
}

/* Thread pool: touches only the request. */
static void work_cb(uv_work_t *w)
{
    dl_req_t *r = evd_container_of(w, dl_req_t, work);
    r->nlines = count_lines(r->buf.data, r->buf.len);
    r->torn = r->lead_nl;
    if (r->drop || r->buf.len == 0)
        return;
    if (r->lead_nl) {
        r->status = write_all(r->fd, "\n", 1, &r->written);
        if (r->status < 0)
            return;
        r->torn = false;
    }
    size_t before = r->written;
    r->status = write_all(r->fd, r->buf.data, r->buf.len, &r->written);
    size_t data = r->written - before;
    if (data > 0)
        r->torn = r->buf.data[data - 1] != '\n';
    if (r->status < 0)
        return;
    r->status = fsync_fd(r->fd, false);
    if (r->status == 0 && r->dir_fd >= 0) {
        r->status = fsync_fd(r->dir_fd, true);
        if (r->status == 0) {
            close(r->dir_fd);
            r->dir_fd = -1;
        }
    }
}

static void dl_destroy(evd_dl_t *dl)
{
    if (dl->dir_fd >= 0)
        close(dl->dir_fd);
    close(dl->fd);
    free(dl);
}

static void after_cb(uv_work_t *w, int status);

/* Starts the head of the queue if nothing is in flight; frees dl when it is closing and idle,
 * so callers must not touch dl after calling this. */
static void pump(evd_dl_t *dl)
{
    while (!dl->busy && dl->head) {
        dl_req_t *r = dl->head;
        if (r->op == DL_SWITCH) {
            dl->head = r->next;
            close(dl->fd);
            if (dl->dir_fd >= 0)
                close(dl->dir_fd);
            dl->fd = r->fd;
            dl->dir_fd = r->dir_fd;
            dl->size = r->size;
            dl->max_bytes = r->max_bytes;
            dl->torn = ends_torn(dl->fd);
            free(r);
            continue;
        }
        r->fd = dl->fd;
        r->dir_fd = dl->dir_fd; /* handed back in after_cb unless the write fsynced it */
        dl->dir_fd = -1;
        r->drop = r->bad_input && dl->max_bytes > 0 && dl->size >= dl->max_bytes;
        r->lead_nl = dl->torn;
        /* Fails only for a NULL work callback. */
        (void)uv_queue_work(dl->loop, &r->work, work_cb, after_cb);
        dl->busy = true;
    }
    if (!dl->head)
        dl->tail = NULL;
    if (!dl->busy && !dl->head && dl->closing)
        dl_destroy(dl);
}

static void after_cb(uv_work_t *w, int status)
{
    dl_req_t *r = evd_container_of(w, dl_req_t, work);
    evd_dl_t *dl = r->dl;
    void (*done)(int, void *) = r->done;
    void *arg = r->arg;

    dl->head = r->next;
    dl->busy = false;
    dl->dir_fd = r->dir_fd;
    if (status == 0) /* UV_ECANCELED is impossible: nothing calls uv_cancel */
        status = r->status;
    if (r->drop) {
        dl->dropped += r->nlines;
    } else {
        dl->size += (int64_t)r->written;
        dl->torn = r->torn;
        if (status == 0) {
            dl->lines += r->nlines;
            for (int i = 0; i < EVD_DL_REASONS; i++)
                dl->by_reason[i] += r->by_reason[i];
        }
    }
    evd_buf_free(&r->buf);
    free(r);
    /* Start the next batch before the callback, which may well queue another or close dl. */
    pump(dl);
    if (done)
        done(status, arg);
}

static void enqueue(evd_dl_t *dl, dl_req_t *r)
{
    r->dl = dl;
    r->next = NULL;
    if (dl->tail)
        dl->tail->next = r;
    else
        dl->head = r;
    dl->tail = r;
    pump(dl);
}

int evd_dl_open(uv_loop_t *loop, const char *path, int64_t max_bytes, evd_dl_t **out)
{
    if (!loop || !path || !out)
        return -EINVAL;
    evd_dl_t *dl = calloc(1, sizeof(*dl));
    if (!dl)
        return -ENOMEM;
    int rc = open_file(path, &dl->fd, &dl->dir_fd, &dl->size);
    if (rc < 0) {
        free(dl);
        return rc;
    }
    dl->loop = loop;
    dl->max_bytes = max_bytes;
    dl->torn = ends_torn(dl->fd);
    *out = dl;
    return 0;
}

int evd_dl_write(evd_dl_t *dl, evd_buf_t *lines, const uint64_t *by_reason, bool bad_input,
                 void (*done)(int status, void *arg), void *arg)
{
    dl_req_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->op = DL_WRITE;
    if (by_reason)
        memcpy(r->by_reason, by_reason, sizeof(r->by_reason));
    r->buf = *lines;
    *lines = (evd_buf_t){0};
    r->bad_input = bad_input;
    r->done = done;
    r->arg = arg;
    r->fd = r->dir_fd = -1;
    enqueue(dl, r);
    return 0;
}

int evd_dl_reopen(evd_dl_t *dl, const char *path, int64_t max_bytes)
{
    if (!path || dl->closing)
        return -EINVAL;
    dl_req_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    int rc = open_file(path, &r->fd, &r->dir_fd, &r->size);
    if (rc < 0) {
        free(r);
        return rc;
    }
    r->op = DL_SWITCH;
    r->max_bytes = max_bytes;
    enqueue(dl, r);
    return 0;
}

uint64_t evd_dl_lines(const evd_dl_t *dl)
{
    return dl->lines;
}

uint64_t evd_dl_lines_by_reason(const evd_dl_t *dl, int reason)
{
    return reason >= 0 && reason < EVD_DL_REASONS ? dl->by_reason[reason] : 0;
}

uint64_t evd_dl_dropped(const evd_dl_t *dl)
{
    return dl->dropped;
}

void evd_dl_close(evd_dl_t *dl)
{
    if (!dl)
        return;
    dl->closing = true;
    pump(dl);
}
