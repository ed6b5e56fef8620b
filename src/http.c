/* http.c - the health and metrics endpoint: HTTP/1.1 GET and HEAD, one request per connection. */
#include "http.h"
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CLIENTS 64
#define MAX_HEAD 8192
#define CLIENT_TIMEOUT_MS 5000

typedef struct client {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    evd_http_t *h;
    struct client *next, *prev;
    char head[MAX_HEAD];
    size_t len;
    evd_buf_t out;
    int closing; /* handles still to close */
    bool responded;
    bool head_only; /* a HEAD request: the headers of the GET, no body */
} client_t;

struct evd_http {
    uv_tcp_t listener;
    uv_tcp_t refused; /* takes a connection there is no memory for, and closes it */
    uv_loop_t *loop;
    evd_http_handler_fn fn;
    void *ud;
    client_t *clients;
    int nclients;
    int handles;   /* of listener and refused, not yet closed: h is freed when none is left */
    bool refusing; /* refused is closing */
    bool waiting;  /* ... and a connection waits for it to close, unaccepted */
    bool closing;
};

static void client_closed(uv_handle_t *hd)
{
    client_t *c = hd->data;
    if (--c->closing > 0)
        return;
    evd_buf_free(&c->out);
    free(c);
}

static void client_close(client_t *c)
{
    if (c->closing)
        return;
    evd_http_t *h = c->h;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    h->nclients--;
    c->closing = 2;
    uv_close((uv_handle_t *)&c->tcp, client_closed);
    uv_close((uv_handle_t *)&c->timer, client_closed);
}

static void on_written(uv_write_t *req, int status)
{
    (void)status;
    client_close(req->data);
}

static void respond(client_t *c, int code, const char *reason, const char *body, size_t blen)
{
    if (c->responded)
        return;
    c->responded = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    evd_buf_reset(&c->out);
    if (evd_buf_printf(&c->out,
                       "HTTP/1.1 %d %s\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                       "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                       code, reason, blen) < 0 ||
        (!c->head_only && evd_buf_append(&c->out, body, blen) < 0)) {
        client_close(c);
        return;
    }
    uv_buf_t b = uv_buf_init(c->out.data, (unsigned)c->out.len);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) < 0)
        client_close(c);
}

static const char *reason_of(int code)
{
    switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

static void handle(client_t *c)
{
    /* Request line: METHOD SP PATH SP VERSION */
    char *eol = memchr(c->head, '\n', c->len);
    char method[8], path[256];
    if (!eol || sscanf(c->head, "%7s %255s HTTP/1.", method, path) != 2) {
        respond(c, 400, reason_of(400), "bad request\n", 12);
        return;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        respond(c, 405, reason_of(405), "only GET and HEAD\n", 18);
        return;
    }
    c->head_only = strcmp(method, "HEAD") == 0;
    char *q = strchr(path, '?');
    if (q)
        *q = '\0';
    evd_buf_t body = {0};
    int code = c->h->fn(path, &body, c->h->ud);
    respond(c, code, reason_of(code), body.data ? body.data : "", body.len);
    evd_buf_free(&body);
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf)
{
    client_t *c = hd->data;
    (void)suggested;
    buf->base = c->head + c->len;
    buf->len = MAX_HEAD - 1 - c->len;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    client_t *c = s->data;
    (void)buf;
    if (n < 0) {
        client_close(c);
        return;
    }
    c->len += (size_t)n;
    c->head[c->len] = '\0';
    if (strstr(c->head, "\r\n\r\n") || strstr(c->head, "\n\n")) {
        handle(c);
        return;
    }
    if (c->len >= MAX_HEAD - 1)
        respond(c, 431, reason_of(431), "request head too large\n", 23);
}

static void on_timeout(uv_timer_t *t)
{
    client_close(t->data);
}

static void on_connection(uv_stream_t *server, int status);

static void free_if_closed(evd_http_t *h)
{
    if (--h->handles == 0)
        free(h);
}

static void refused_closed(uv_handle_t *hd)
{
    evd_http_t *h = hd->data;
    h->refusing = false;
    if (h->waiting && !h->closing) {
        h->waiting = false;
        on_connection((uv_stream_t *)&h->listener, 0);
    }
    free_if_closed(h);
}

/* No memory for a client: the connection is accepted and closed at once. Left unaccepted it
 * would stop the listener for good, as libuv watches it again only once it is accepted. One
 * that comes while the last refused one is still closing waits (unaccepted) until it is. */
static void refuse(evd_http_t *h)
{
    evd_log_ratelimited("http_refused", "http",
                        (const evd_field_t[]){F_STR("error", "out of memory: connection refused"), {0}});
    if (h->refusing) {
        h->waiting = true;
        return;
    }
    uv_tcp_init(h->loop, &h->refused);
    h->refused.data = h;
    h->refusing = true;
    h->handles++;
    (void)uv_accept((uv_stream_t *)&h->listener, (uv_stream_t *)&h->refused);
    uv_close((uv_handle_t *)&h->refused, refused_closed);
}

static void on_connection(uv_stream_t *server, int status)
{
    evd_http_t *h = server->data;
    if (status < 0)
        return;
    client_t *c = calloc(1, sizeof(*c));
    if (!c) {
        refuse(h);
        return;
    }
    uv_tcp_init(h->loop, &c->tcp);
    uv_timer_init(h->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->h = h;
    c->next = h->clients;
    if (h->clients)
        h->clients->prev = c;
    h->clients = c;
    h->nclients++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        client_close(c);
        return;
    }
    if (h->nclients > MAX_CLIENTS) {
        client_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, CLIENT_TIMEOUT_MS, 0);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0)
        client_close(c);
}

int evd_http_addr(uv_loop_t *loop, const char *listen, bool lookup, struct sockaddr_storage *out)
{
    char host[128];
    const char *colon = strrchr(listen, ':');
    if (!colon || (size_t)(colon - listen) >= sizeof(host))
        return UV_EINVAL;
    memcpy(host, listen, (size_t)(colon - listen));
    host[colon - listen] = '\0';
    char *h0 = host;
    size_t hl = strlen(h0);
    if (h0[0] == '[') { /* [v6]; the config checked the brackets */
        if (hl < 2 || h0[hl - 1] != ']')
            return UV_EINVAL;
        h0[hl - 1] = '\0';
        h0++;
    }
    int port = atoi(colon + 1);
    struct sockaddr_storage addr = {0};
    int rc = uv_ip4_addr(h0, port, (struct sockaddr_in *)&addr);
    if (rc < 0)
        rc = uv_ip6_addr(h0, port, (struct sockaddr_in6 *)&addr);
    if (rc < 0) {
        /* A name (localhost): resolved once, at start, before the loop runs (no callback:
         * libuv resolves it synchronously); listened on at its first IPv4 address, else its
         * first address (localhost: 127.0.0.1, not ::1). Never on the loop (a reload). */
        if (!lookup)
            return UV_ENOTSUP;
        uv_getaddrinfo_t req;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        rc = uv_getaddrinfo(loop, &req, NULL, h0, NULL, &hints);
        if (rc < 0)
            return rc;
        const struct addrinfo *ai = req.addrinfo;
        for (const struct addrinfo *a = req.addrinfo; a; a = a->ai_next)
            if (a->ai_family == AF_INET) {
                ai = a;
                break;
            }
        memcpy(&addr, ai->ai_addr, ai->ai_addrlen <= sizeof(addr) ? ai->ai_addrlen : sizeof(addr));
        uv_freeaddrinfo(req.addrinfo);
        if (addr.ss_family == AF_INET)
            ((struct sockaddr_in *)&addr)->sin_port = htons((uint16_t)port);
        else if (addr.ss_family == AF_INET6)
            ((struct sockaddr_in6 *)&addr)->sin6_port = htons((uint16_t)port);
        else
            return UV_EAI_FAMILY;
    }
    *out = addr;
    return 0;
}

int evd_http_bound(const evd_http_t *h, struct sockaddr_storage *out)
{
    int len = (int)sizeof(*out);
    return uv_tcp_getsockname(&h->listener, (struct sockaddr *)out, &len);
}

int evd_http_start(uv_loop_t *loop, const struct sockaddr *addr, evd_http_handler_fn fn, void *ud, evd_http_t **out)
{
    evd_http_t *h = calloc(1, sizeof(*h));
    if (!h)
        return UV_ENOMEM;
    h->loop = loop;
    h->fn = fn;
    h->ud = ud;
    h->handles = 1;
    uv_tcp_init(loop, &h->listener);
    h->listener.data = h;
    int rc = uv_tcp_bind(&h->listener, addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&h->listener, 64, on_connection);
    if (rc < 0) {
        evd_http_close(h);
        return rc;
    }
    *out = h;
    return 0;
}

static void listener_closed(uv_handle_t *hd)
{
    free_if_closed(hd->data);
}

void evd_http_close(evd_http_t *h)
{
    if (!h || h->closing)
        return;
    h->closing = true;
    while (h->clients)
        client_close(h->clients);
    uv_close((uv_handle_t *)&h->listener, listener_closed);
}
