/* http.h - a tiny HTTP/1.1 server on the loop for /healthz, /readyz and /metrics. */
#ifndef EVD_HTTP_H
#define EVD_HTTP_H

#include <uv.h>
#include "util.h"

typedef struct evd_http evd_http_t;

/* Fills body and returns the status code for a GET of path; content type is text/plain. A HEAD
 * gets the same status and headers, without the body. */
typedef int (*evd_http_handler_fn)(const char *path, evd_buf_t *body, void *ud);

/* The address of listen, "host:port" (an IPv4 address, [IPv6] or a name). A name is resolved
 * synchronously (its first IPv4 address, else its first), so only when lookup is true: at start,
 * before the loop runs; else UV_ENOTSUP. Returns 0 or a negative libuv error. */
int evd_http_addr(uv_loop_t *loop, const char *listen, bool lookup, struct sockaddr_storage *out) EVD_MUST_CHECK;

/* Listens on addr. Returns 0 or a negative libuv error. At most 64 clients at once; a request
 * head over 8 KiB gets 431, one not complete within 5 s is dropped, so a slow or malformed client
 * cannot stall the loop or exhaust memory. */
int evd_http_start(uv_loop_t *loop, const struct sockaddr *addr, evd_http_handler_fn fn, void *ud,
                   evd_http_t **out) EVD_MUST_CHECK;
/* The address h listens on. Returns 0 or a negative libuv error. */
int evd_http_bound(const evd_http_t *h, struct sockaddr_storage *out) EVD_MUST_CHECK;
/* Closes the listener (its socket at once) and every client; frees h in the last close callback. */
void evd_http_close(evd_http_t *h);

#endif
