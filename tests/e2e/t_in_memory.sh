#!/usr/bin/env bash
# t_in_memory: max_memory counts what a session holds, not what buffer doubling allocates.
# With max_memory = 1536K and max_message_size = 1200K, one 1.1 MB message is accepted
# (before: its buffer doubled to 2 MB, past max_memory, and it got 451); a client that
# pipelines behind a DATA while over the limit still gets 451 4.3.1 and a refusal line
# naming max_memory is logged when two sessions together go over it.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "relayd" "max_memory = 1536K
max_message_size = 1200K"
start_relayd "$T/relayd.conf"

say "1: a 1.1 MB message under a 1.5 MB max_memory is accepted"
timeout 60 python3 - "$RELAYD_PORT" <<'PY' || fail "a message within max_message_size was refused"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if len(l) < 4 or l[3:4] != b"-":
            return l
print(reply())
body = (b"x" * 998 + b"\r\n") * 1100
s.sendall(b"HELO big\r\nMAIL FROM:<big@lan.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
for _ in range(4):
    print(reply())
s.sendall(b"Subject: big\r\n\r\n" + body + b".\r\n")
r = reply()
print(r)
sys.exit(0 if r.startswith(b"250") else 1)
PY

say "2: two 1.1 MB messages at once go over max_memory: 451 and a line naming it"
timeout 60 python3 - "$RELAYD_PORT" <<'PY' || fail "two sessions over max_memory were not refused"
import socket, sys
port = int(sys.argv[1])
def sess():
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rb")
    return s, f
def reply(f):
    while True:
        l = f.readline()
        if len(l) < 4 or l[3:4] != b"-":
            return l
conns = [sess() for _ in range(2)]
for s, f in conns:
    reply(f)
    s.sendall(b"HELO big\r\nMAIL FROM:<big@lan.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    for _ in range(4):
        reply(f)
half = (b"x" * 998 + b"\r\n") * 550
for s, f in conns:
    s.sendall(b"Subject: big\r\n\r\n" + half)
codes = []
for s, f in conns:
    s.sendall(half + b".\r\n")
for s, f in conns:
    codes.append(reply(f)[:3])
print(codes)
sys.exit(0 if b"451" in codes else 1)
PY
log_wait 'reason=max_memory: .*setting: max_memory' 5 || fail "no refusal line naming max_memory"
check_relayd_exit
pass
