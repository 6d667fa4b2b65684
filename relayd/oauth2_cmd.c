/*
 * oauth2_cmd - oauth2_token_command: a program run with uv_spawn() whose standard output is
 * the token (or a JSON token response), bounded in time and size; its end calls
 * oauth2__acct_success() or oauth2__acct_fail().  See oauth2_int.h.
 */
#include "relayd/oauth2_int.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/xalloc.h"

/* ---- oauth2_token_command ---- */

static void cmd_closed(uv_handle_t *h)
{
    struct o2_cmd *c = h->data;
    struct oauth2 *o = c->o;

    if (--c->nopen > 0)
        return;
    if (c->body != NULL) {
        explicit_bzero(c->body->data, c->body->cap);
        buf_free(c->body);
    }
    free(c);
    if (--o->open_handles == 0 && o->stopping && o->stopped != NULL) {
        void (*fn)(void *) = o->stopped;

        o->stopped = NULL;
        fn(o->stopped_arg);
    }
}

void oauth2__cmd_close(struct o2_cmd *c)
{
    uv_timer_stop(&c->timer);
    if (!uv_is_closing((uv_handle_t *)&c->timer))
        uv_close((uv_handle_t *)&c->timer, cmd_closed);
    if (!uv_is_closing((uv_handle_t *)&c->out))
        uv_close((uv_handle_t *)&c->out, cmd_closed);
    if (!uv_is_closing((uv_handle_t *)&c->proc))
        uv_close((uv_handle_t *)&c->proc, cmd_closed);
}

/* Both the exit and the end of output have been seen: judge the run. */
static void cmd_finish(struct o2_cmd *c)
{
    struct o2_acct *a = c->a;
    struct oauth2_resp resp;
    char why[500], *p, *nl;

    if (!(c->exited && c->eof) && !c->timed_out)
        return;
    if (a == NULL) {
        oauth2__cmd_close(c);
        return;
    }
    a->cmd = NULL;
    c->a = NULL;
    memset(&resp, 0, sizeof resp);
    if (c->timed_out) {
        oauth2__cmd_close(c);
        oauth2__acct_fail(a, "oauth2_token_command did not finish within %d s",
                          O2_COMMAND_TIMEOUT_MS / 1000);
        return;
    }
    if (c->signal != 0 || c->status != 0) {
        if (c->signal != 0)
            snprintf(why, sizeof why, "oauth2_token_command was killed by signal %d", c->signal);
        else
            snprintf(why, sizeof why, "oauth2_token_command exited with status %lld",
                     (long long)c->status);
        oauth2__cmd_close(c);
        oauth2__acct_fail(a, "%s", why);
        return;
    }
    p = c->body->data + strspn(c->body->data, " \t\r\n");
    if (*p == '{') {
        if (oauth2_resp_parse(200, p, strlen(p), &resp, why, sizeof why) != 0) {
            oauth2_resp_clear(&resp);
            oauth2__cmd_close(c);
            oauth2__acct_fail(a, "oauth2_token_command printed %s", why);
            return;
        }
    } else {
        if ((nl = strpbrk(p, "\r\n")) != NULL)
            *nl = '\0';
        if (*p == '\0' || strpbrk(p, " \t\x01") != NULL) {
            oauth2__cmd_close(c);
            oauth2__acct_fail(a, "oauth2_token_command printed no token (one line, no spaces)");
            return;
        }
        resp.access_token = xstrdup(p);
        resp.expires_in = O2_DEFAULT_LIFETIME;
    }
    oauth2__cmd_close(c);
    oauth2__acct_success(a, &resp);
    oauth2_resp_clear(&resp);
}

static void cmd_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    static char scratch[4096];

    (void)h;
    (void)suggested;
    b->base = scratch;
    b->len = sizeof scratch;
}

static void cmd_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct o2_cmd *c = s->data;

    if (n > 0) {
        if (buf_append(c->body, b->base, (size_t)n) != 0)
            buf_reset(c->body); /* too much: not a token; judged as no token */
        explicit_bzero(b->base, (size_t)n);
        return;
    }
    if (n < 0) {
        uv_read_stop(s);
        c->eof = 1;
        cmd_finish(c);
    }
}

static void cmd_exit(uv_process_t *p, int64_t status, int sig)
{
    struct o2_cmd *c = p->data;

    c->exited = 1;
    c->status = status;
    c->signal = sig;
    cmd_finish(c);
}

static void cmd_timeout(uv_timer_t *t)
{
    struct o2_cmd *c = t->data;

    c->timed_out = 1;
    if (!c->exited)
        uv_process_kill(&c->proc, SIGKILL);
    cmd_finish(c);
}

void oauth2__cmd_start(struct o2_acct *a)
{
    struct oauth2 *o = a->o;
    struct o2_cmd *c = xcalloc(1, sizeof(*c));
    uv_process_options_t opts;
    uv_stdio_container_t stdio[3];
    char *args[4], *env[64], *e_up, *e_user;
    extern char **environ;
    size_t n = 0, i;
    int rc;

    c->a = a;
    c->o = o;
    c->body = buf_new(O2_BODY_MAX);
    uv_pipe_init(o->loop, &c->out, 0);
    c->out.data = c;
    uv_timer_init(o->loop, &c->timer);
    c->timer.data = c;
    c->proc.data = c;
    e_up = xasprintf("RELAYD_UPSTREAM=%s", a->up->name);
    e_user = xasprintf("RELAYD_USERNAME=%s", a->up->username);
    for (i = 0; environ[i] != NULL && n < 60; i++)
        if (strncmp(environ[i], "RELAYD_", 7) != 0)
            env[n++] = environ[i];
    env[n++] = e_up;
    env[n++] = e_user;
    env[n] = NULL;
    args[0] = "/bin/sh";
    args[1] = "-c";
    args[2] = a->up->oauth2_token_command;
    args[3] = NULL;
    memset(&opts, 0, sizeof opts);
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
    stdio[1].data.stream = (uv_stream_t *)&c->out;
    stdio[2].flags = UV_INHERIT_FD; /* its complaints go to relayd's log */
    stdio[2].data.fd = 2;
    opts.file = args[0];
    opts.args = args;
    opts.env = env;
    opts.stdio = stdio;
    opts.stdio_count = 3;
    opts.exit_cb = cmd_exit;
    rc = uv_spawn(o->loop, &c->proc, &opts);
    free(e_up);
    free(e_user);
    c->nopen = 3;
    o->open_handles++;
    if (rc != 0) {
        c->a = NULL;
        oauth2__cmd_close(c);
        oauth2__acct_fail(a, "oauth2_token_command: cannot start /bin/sh: %s", uv_strerror(rc));
        return;
    }
    a->cmd = c;
    uv_read_start((uv_stream_t *)&c->out, cmd_alloc, cmd_read);
    uv_timer_start(&c->timer, cmd_timeout, O2_COMMAND_TIMEOUT_MS, 0);
}
