/* Unit tests for common/sdnotify.c: the datagram systemd would read. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/sdnotify.h"
#include "tests/lib/testlib.h"

/* Receives one datagram (non-blocking: sdnotify() has already sent it). */
static void recv_one(int fd, char *buf, size_t len)
{
    ssize_t n = recv(fd, buf, len - 1, MSG_DONTWAIT);

    cr_assert(n >= 0, "nothing received: %s", strerror(errno));
    buf[n] = '\0';
}

/* Without NOTIFY_SOCKET nothing happens; a relative path is refused. */
Test(sdnotify, unset)
{
    unsetenv("NOTIFY_SOCKET");
    cr_expect(eq(int, sdnotify("READY=1"), 0));
    setenv("NOTIFY_SOCKET", "", 1);
    cr_expect(eq(int, sdnotify("READY=1"), 0));
    setenv("NOTIFY_SOCKET", "relative/sock", 1);
    cr_expect(eq(int, sdnotify("READY=1"), -EINVAL));
    unsetenv("NOTIFY_SOCKET");
}

/* A socket path: the state arrives as one datagram, byte for byte. */
Test(sdnotify, path)
{
    char dir[256];
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    char buf[256];
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);

    testlib_tmpdir(dir, sizeof dir, "sdnotify");
    cr_assert(fd >= 0);
    cr_assert(strlen(dir) + sizeof "/notify" <= sizeof sun.sun_path);
    memcpy(sun.sun_path, dir, strlen(dir));
    memcpy(sun.sun_path + strlen(dir), "/notify", sizeof "/notify");
    cr_assert(bind(fd, (struct sockaddr *)&sun, sizeof sun) == 0, "%s", strerror(errno));
    setenv("NOTIFY_SOCKET", sun.sun_path, 1);
    cr_expect(eq(int, sdnotify("READY=1\nSTATUS=accepting mail"), 1));
    recv_one(fd, buf, sizeof buf);
    cr_expect(eq(str, buf, "READY=1\nSTATUS=accepting mail"));
    cr_expect(eq(int, sdnotify("STOPPING=1"), 1));
    recv_one(fd, buf, sizeof buf);
    cr_expect(eq(str, buf, "STOPPING=1"));
    /* Nobody listening any more: an error, not a crash or a hang. */
    close(fd);
    cr_expect(sdnotify("READY=1") < 0);
    unsetenv("NOTIFY_SOCKET");
    testlib_rmtree(dir);
}

/* An abstract socket ('@name'). */
Test(sdnotify, abstract)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    char name[64], buf[64];
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    socklen_t len;

    cr_assert(fd >= 0);
    snprintf(name, sizeof name, "@relayd-test-sdnotify-%ld", (long)getpid());
    memcpy(sun.sun_path, name, strlen(name));
    sun.sun_path[0] = '\0';
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(name));
    cr_assert(bind(fd, (struct sockaddr *)&sun, len) == 0, "%s", strerror(errno));
    setenv("NOTIFY_SOCKET", name, 1);
    cr_expect(eq(int, sdnotify("RELOADING=1"), 1));
    recv_one(fd, buf, sizeof buf);
    cr_expect(eq(str, buf, "RELOADING=1"));
    close(fd);
    unsetenv("NOTIFY_SOCKET");
}
