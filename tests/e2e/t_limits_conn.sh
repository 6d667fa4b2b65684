#!/usr/bin/env bash
# t_limits_conn: max_connections_per_client and max_connections.  With 2 per client and 4
# in all, a third session from 127.0.0.1 gets 421 while 127.0.0.2 still gets in; a fifth
# session from anywhere gets 421; once sessions end, new ones are served again.  (Linux
# routes all of 127/8 to lo, so binding the client socket gives distinct client addresses.)
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "relayd" "max_connections = 4
max_connections_per_client = 2"
start_relayd "$T/relayd.conf"

python3 - "$RELAYD_PORT" <<'PY' || fail "connection limits not enforced"
import socket, sys, time
port = int(sys.argv[1])

def connect(src):
    s = socket.socket()
    s.settimeout(5)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s

def greeting(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(512)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1").strip()

def check(label, s, want):
    g = greeting(s)
    print("%s: %s" % (label, g))
    if not g.startswith(want):
        print("FAIL: %s: want %s, got %r" % (label, want, g))
        sys.exit(1)

held = []
for i in range(2):
    s = connect("127.0.0.1"); check("127.0.0.1 #%d" % (i + 1), s, "220"); held.append(s)
s = connect("127.0.0.1"); check("127.0.0.1 #3 (over per-client)", s, "421"); s.close()
s = connect("127.0.0.2"); check("127.0.0.2 #1", s, "220"); held.append(s)
s = connect("127.0.0.3"); check("127.0.0.3 #1", s, "220"); held.append(s)
s = connect("127.0.0.4"); check("127.0.0.4 #1 (over total)", s, "421"); s.close()
for s in held:
    s.sendall(b"QUIT\r\n"); s.close()
time.sleep(1)
s = connect("127.0.0.1"); check("127.0.0.1 after the others left", s, "220")
s.sendall(b"QUIT\r\n"); s.close()
PY
grep -qiE 'too many|limit' "$T/relayd.log" || fail "relayd did not log why it refused"
pass
