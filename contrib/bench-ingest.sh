#!/usr/bin/env bash
# contrib/bench-ingest.sh - relayd's inbound side under load: pure durable ingest as a
# ratio of what the same client achieves against smtp-sink, bursts of connects, and many
# idle sessions.
#
# Not a test (ctest does not run it); needs smtp-source and smtp-sink (postfix), python3.
# Runs build/relayd (RELAYD_BIN overrides).
#
#   contrib/bench-ingest.sh                   everything, about a minute
#   INGEST_MSGS=20000 INGEST_SESSIONS=20 INGEST_SIZE=2048   the ingest run
#   BURST_CONNECTS=3000                       connections opened one after another
#   IDLE_SESSIONS=10000                       sessions held open after HELO
#   BENCH_PERF=1                              also record relayd with perf (perf.data in $T,
#                                             report printed)
#
# (1) ingest: smtp-source -s SESSIONS -m MSGS -l SIZE, one message per connection (as
# devices send), first into smtp-sink (the ceiling of this client on this machine, nothing
# stored), then into relayd with no route (mail held, every 250 after a durable commit).
# Printed: msg/s of both and relayd's ratio of the ceiling (target >= 0.5).
# (2) connect burst: one client opens BURST_CONNECTS connections one after another as fast
# as connect() returns, keeping them open (devices reconnecting after an outage).  Printed:
# connects/s, the slowest connect (a SYN retransmit shows as >= 1 s) and how many took
# over 100 ms.
# (3) idle sessions: IDLE_SESSIONS sessions each send HELO and stay; printed: relayd's
# resident memory per session, and how long one more client takes for a whole message
# (connect to 250) while they are open.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/e2e/lib.sh
E2E_NAME=bench-ingest

MSGS=${INGEST_MSGS:-20000}
SESSIONS=${INGEST_SESSIONS:-20}
SIZE=${INGEST_SIZE:-2048}
BURST=${BURST_CONNECTS:-3000}
IDLE=${IDLE_SESSIONS:-10000}
command -v smtp-source > /dev/null || fail "no smtp-source (apt-get install postfix)"
[ -x "$RELAYD_BIN" ] || fail "no relayd at $RELAYD_BIN: build first (contrib/build.sh)"
ulimit -n "$(ulimit -Hn)"
now() { date +%s.%N; }
rate() { python3 -c "import sys; n,a,b=map(float,sys.argv[1:]); print('%.0f' % (n/(b-a)))" "$@"; }

# ---- (1) ingest
SINK_PORT=$(free_port)
smtp-sink -u nobody -c "127.0.0.1:$SINK_PORT" 1000 > "$T/sink.log" 2>&1 &
E2E_PIDS+=($!)
wait_for_port "$SINK_PORT" 10 || fail "smtp-sink did not start"
t0=$(now)
smtp-source -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@lan.test -t user@example.com \
    -M bench.lan "127.0.0.1:$SINK_PORT" > "$T/source-sink.log" 2>&1 || true
t1=$(now)
sink_rate=$(rate "$MSGS" "$t0" "$t1")

RELAYD_PORT=$(free_port)
cat > "$T/relayd.conf" <<EOF2
[relayd]
hostname = relay.bench
spool = $T/spool
max_connections = $((IDLE + BURST + 100))
max_connections_per_client = $((IDLE + BURST + 100))

[listener lan]
listen = 127.0.0.1:$RELAYD_PORT
allow = 127.0.0.0/8
EOF2
start_relayd "$T/relayd.conf"
if [ "${BENCH_PERF:-0}" = 1 ]; then
    perf record -g -p "$RELAYD_PID" -o "$T/perf.data" > "$T/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 0.5
fi
t0=$(now)
smtp-source -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@lan.test -t user@example.com \
    -M bench.lan "127.0.0.1:$RELAYD_PORT" > "$T/source-relayd.log" 2>&1 ||
    say "smtp-source: $(tail -n 1 "$T/source-relayd.log")"
t1=$(now)
if [ -n "${PERF_PID:-}" ]; then
    kill -INT "$PERF_PID"
    wait "$PERF_PID" || true
    perf report -i "$T/perf.data" --no-children --percent-limit 2 --stdio 2>/dev/null |
        grep -E '^ +[0-9]' | head -n 25
fi
stored=$("$RELAYCTL_BIN" --spool "$T/spool" stats --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
relayd_rate=$(rate "$stored" "$t0" "$t1")
say "ingest: $SESSIONS sessions, $SIZE bytes, one connection per message"
say "   smtp-sink ceiling: $sink_rate msg/s"
say "   relayd (durable, held): $relayd_rate msg/s ($stored stored)"
say "   ratio: $(python3 -c "import sys; print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))" "$relayd_rate" "$sink_rate")x"

# ---- (2) connect burst, (3) idle sessions
python3 - "$RELAYD_PORT" "$BURST" "$IDLE" "$RELAYD_PID" <<'PY'
import socket, sys, time
port, burst, idle, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss():
    for l in open("/proc/%s/status" % pid):
        if l.startswith("VmRSS:"):
            return int(l.split()[1])
socks, times = [], []
t0 = time.time()
for i in range(burst):
    a = time.time()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    times.append(time.time() - a)
    socks.append(s)
el = time.time() - t0
times.sort()
print("bench-ingest: connect burst: %d connects in %.2f s = %.0f/s, slowest %.0f ms, "
      "%d over 100 ms" % (burst, el, burst / el, times[-1] * 1000,
                          sum(1 for t in times if t > 0.1)))
for s in socks:
    s.close()
socks = []
time.sleep(1)
r0 = rss()
for i in range(idle):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"HELO idle\r\n")
    socks.append(s)
for s in socks:   # the greeting and the HELO reply
    f = b""
    while f.count(b"\n") < 2:
        f += s.recv(4096)
r1 = rss()
a = time.time()
s = socket.create_connection(("127.0.0.1", port), timeout=30)
f = s.makefile("rb")
f.readline()
s.sendall(b"HELO one\r\nMAIL FROM:<a@lan.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
for _ in range(4):
    f.readline()
s.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")
line = f.readline()
print("bench-ingest: %d idle sessions after HELO: %.1f KiB each; one more message took "
      "%.0f ms (%s)" % (idle, (r1 - r0) / idle, (time.time() - a) * 1000,
                        line.decode().split(":")[0].strip()))
PY
check_relayd_exit
say "done"
