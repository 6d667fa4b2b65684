#!/usr/bin/env bash
# t_in_flood: one allowed client cannot make relayd spend unbounded memory or CPU.
# (1) EHLO in a loop, never reading the replies: relayd stops reading once 64 KB of replies
# are unread, its memory stays small (before: 4.5 GB in 20 s), and write_timeout ends the
# session; (2) ~320 KB of pipelined NOOPs are all answered (parsed by offset: before, each
# line moved the rest of the buffer); the time taken is printed, not asserted.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "write_timeout = 3s"
start_relayd "$T/relayd.conf"
rss0=$(proc_status_kb "$RELAYD_PID" VmRSS)

say "1: EHLO flood without reading, 8 s"
timeout 60 python3 - "$RELAYD_PORT" <<'PY' > "$T/flood.out" || fail "flood client failed"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.setblocking(False)
line = b"EHLO flood.example\r\n" * 512
sent, t0 = 0, time.time()
while time.time() - t0 < 8:
    try:
        sent += s.send(line)
    except BlockingIOError:
        time.sleep(0.05)
    except OSError:
        break    # relayd closed the session (write_timeout)
print("sent %d bytes of EHLO" % sent)
PY
cat "$T/flood.out"
rss1=$(proc_status_kb "$RELAYD_PID" VmRSS)
hwm=$(proc_status_kb "$RELAYD_PID" VmHWM)
say "relayd VmRSS ${rss0} kB before, ${rss1} kB after, peak ${hwm} kB"
[ "$hwm" -lt 200000 ] || fail "relayd grew to ${hwm} kB under an EHLO flood"
log_wait 'reason=write_timeout' 10 || fail "the unread-replies session was not ended by write_timeout"

say "2: 320 KB of pipelined NOOPs are all answered"
timeout 120 python3 - "$RELAYD_PORT" <<'PY' || fail "pipelined NOOPs were not all answered"
import socket, sys, time, threading
n = 320 * 1024 // 6
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
assert s.recv(1000).startswith(b"220")
got = bytearray()
def reader():
    while got.count(b"\n") < n + 1:
        d = s.recv(65536)
        if not d:
            break
        got.extend(d)
t = threading.Thread(target=reader)
t0 = time.time()
t.start()
s.sendall(b"NOOP\r\n" * n + b"QUIT\r\n")
t.join(100)
lines = got.count(b"\n")
print("%d NOOPs answered in %.2f s" % (lines - 1, time.time() - t0))
sys.exit(0 if lines >= n + 1 and got.count(b"250 2.0.0 Ok") == n else 1)
PY
log_wait 'disconnect from 127\.0\.0\.1 session=[0-9]+ noop=[0-9]+ quit=1 commands=' 5 ||
    fail "no summary line for the NOOP session"
check_relayd_exit
pass
