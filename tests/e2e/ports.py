#!/usr/bin/env python3
"""ports.py - race-free loopback ports for the end-to-end tests (lib.sh's free_port).

    ports.py reserve OWNER_PID [TAG]   prints a port now reserved for OWNER_PID
    ports.py release OWNER_PID         drops every reservation OWNER_PID holds

Why: a port that was merely free when a test looked ("bind port 0, close, print") can be
handed to another test running at the same time before the first one listens on it, and
Postfix's master sets SO_REUSEPORT on its inet listeners, so two Postfix instances (both run
as root) then share the port and the kernel spreads connections between them: a client of
one test meets the other test's certificate ("certificate signer not trusted").

How: ports come from a range outside the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range), so neither bind(port 0) nor an outgoing connection
(relayd, swaks, a unit test's server) is ever given one.  Each reservation is a file
E2E_PORT_DIR/PORT (default /tmp/relayd-e2e-ports, shared by every suite on the machine)
holding "PID STARTTIME TAG" of the owning test shell; it is created with O_EXCL while holding
an flock on E2E_PORT_DIR/.lock, and a port is handed out only when its file is absent (or
its owner is dead: a test killed by SIGKILL leaves a stale file that is reclaimed) and a
plain bind (no SO_REUSEADDR) on 127.0.0.1 succeeds.  lib.sh releases at exit.
"""
import fcntl
import os
import random
import socket
import sys

PORT_DIR = os.environ.get("E2E_PORT_DIR", "/tmp/relayd-e2e-ports")
TRIES = 2000


def start_time(pid):
    """The process's start time in clock ticks, or None when it does not run."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def port_range():
    """The ports to hand out: below the ephemeral range, or above it if that is too small."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    if lo - 1 - 20000 >= 1000:
        return 20000, lo - 1
    if 65535 - (hi + 1) >= 1000:
        return hi + 1, 65535
    sys.exit("ports.py: no port range outside the ephemeral range %d-%d" % (lo, hi))


def owner_alive(path):
    try:
        with open(path) as f:
            parts = f.read().split()
    except OSError:
        return False
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    return start_time(int(parts[0])) == parts[1]


def bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def locked():
    os.makedirs(PORT_DIR, mode=0o1777, exist_ok=True)
    fd = os.open(os.path.join(PORT_DIR, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def reserve(owner, tag):
    st = start_time(owner)
    if st is None:
        sys.exit("ports.py: owner pid %d does not run" % owner)
    lo, hi = port_range()
    fd = locked()
    try:
        for _ in range(TRIES):
            port = random.randint(lo, hi)
            path = os.path.join(PORT_DIR, str(port))
            if os.path.exists(path):
                if owner_alive(path):
                    continue
                os.unlink(path)  # stale: its test is gone
            if not bindable(port):
                continue
            wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(wfd, ("%d %s %s\n" % (owner, st, tag)).encode())
            os.close(wfd)
            print(port)
            return
        sys.exit("ports.py: no free port in %d-%d after %d tries" % (lo, hi, TRIES))
    finally:
        os.close(fd)


def release(owner):
    if not os.path.isdir(PORT_DIR):
        return
    fd = locked()
    try:
        for name in os.listdir(PORT_DIR):
            if not name.isdigit():
                continue
            path = os.path.join(PORT_DIR, name)
            try:
                with open(path) as f:
                    parts = f.read().split()
            except OSError:
                continue
            if parts and parts[0] == str(owner):
                os.unlink(path)
    finally:
        os.close(fd)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "reserve":
        reserve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "-")
    elif len(sys.argv) == 3 and sys.argv[1] == "release":
        release(int(sys.argv[2]))
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
