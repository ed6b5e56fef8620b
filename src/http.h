/* http.h - a tiny HTTP/1.1 server on the loop for /healthz, /readyz and /metrics. */
#ifndef EVD_HTTP_H
#define EVD_HTTP_H

#include <uv.h>
#include "util.h"

typedef struct evd_http evd_http_t;

/* Fills body and returns the status code for a GET of path; content type is text/plain. A HEAD
 * gets the same status and headers, without the body. */
typedef int (*evd_http_handler_fn)(const char *path, evd_buf_t *body, void *ud);

/* Listens on "host:port". A host name is resolved synchronously, so only when resolve is true (at
 * start, before the loop runs); else it fails with UV_ENOTSUP. Returns 0 or a negative libuv error. At most 64 clients
 * at once; a request head over 8 KiB gets 431, one not complete within 5 s is dropped, so a slow or malformed client
 * cannot stall the loop or exhaust memory. */
int evd_http_start(uv_loop_t *loop, const char *listen, bool resolve, evd_http_handler_fn fn, void *ud,
                   evd_http_t **out) EVD_MUST_CHECK;
/* Closes the listener and every client; frees h in the last close callback. */
void evd_http_close(evd_http_t *h);

#endif
