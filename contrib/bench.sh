#!/usr/bin/env bash
# contrib/bench.sh - acceptance throughput of relayd with durable commits, next to what one
# fsync per message allows on the same disk and to Postfix as a smarthost on the same load.
#
# Not a test (ctest does not run it); needs root (Postfix), smtp-source and smtp-sink
# (postfix), python3.  Builds nothing: it runs build/relayd (RELAYD_BIN overrides).
#
#   contrib/bench.sh                 the whole table, a few minutes
#   BENCH_SCALE=0.2 contrib/bench.sh fewer messages per run (quicker, noisier)
#   BENCH_POSTFIX=0 contrib/bench.sh relayd and the fsync baseline only
#   BENCH_STRACE=1 contrib/bench.sh  also count fsync-family system calls with strace
#
# What is measured: Postfix's smtp-source pushes -m messages of -l bytes over -s parallel
# sessions (one message per connection, as devices send) into a server that only accepts:
# relayd has no route (mail is held in the spool), Postfix has defer_transports = smtp
# (mail stays in its queue).  Both keep every accepted message durably before their 250,
# and every spool/queue lives in one temporary directory on the same disk ($TMPDIR, default
# /tmp).  msgs/s counts from the first connection to the last reply.
#
# fsyncs/msg for relayd is its own count of durable LMDB commits divided by the messages
# stored (relayd logs "spool: N commits for M writes" at exit).  Each LMDB commit is one
# fdatasync() of the data file plus one O_DSYNC write of the meta page, i.e. two waits
# for the disk; with BENCH_STRACE=1 the fdatasync calls are also counted by strace.  The
# baseline is a loop that appends 2 KB and fdatasync()s, once per "message": the ceiling
# of any design that syncs once per message on this disk.
set -euo pipefail
cd "$(dirname "$0")/.."

# The e2e harness gives us $T (removed at exit), pid-based cleanup, free_port, wait_for_port.
source tests/e2e/lib.sh
E2E_NAME=bench

SCALE=${BENCH_SCALE:-1}
command -v smtp-source > /dev/null || fail "no smtp-source (apt-get install postfix)"
[ -x "$RELAYD_BIN" ] || fail "no relayd at $RELAYD_BIN: build first (contrib/build.sh)"

# sessions size messages, per run
RUNS=(
    "1 2048 1000"
    "1 102400 300"
    "20 2048 6000"
    "20 102400 2000"
    "200 2048 10000"
    "200 102400 3000"
)

scaled() { python3 -c "import sys; print(max(20, int(int(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"; }
now() { date +%s.%N; }
rate() { python3 -c "import sys; n,a,b=map(float,sys.argv[1:]); print('%.0f' % (n/(b-a)) if b>a else '-')" "$@"; }
secs() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$@"; }

RESULTS=$T/results
: > "$RESULTS"

# ---------------------------------------------------------------------------------------
# baseline [SIZE [SECONDS]]: prints write(SIZE) + fdatasync() pairs per second in $T.
baseline() {
    python3 - "$T/fsync.dat" "${1:-2048}" "${2:-3}" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = b"x" * int(sys.argv[2])
n, t0 = 0, time.time()
while time.time() - t0 < float(sys.argv[3]):
    os.write(fd, buf)
    os.fdatasync(fd)
    n += 1
print("%.0f" % (n / (time.time() - t0)))
os.close(fd)
os.unlink(sys.argv[1])
PY
}
# Measured before and after all runs, and again (same message size) right before each run,
# which is what x-base compares with: a shared disk's fsync rate varies by the minute.
say "baseline: append 2 KB + fdatasync() in a loop, in $T"
BASE1=$(baseline)
say "   $BASE1 fdatasync/s: one-fsync-per-message allows at most ~$BASE1 msgs/s"

# ---------------------------------------------------------------------------------------
# relayd: a fresh spool and a fresh relayd per run, so the commit count is per run.
RELAYD_PORT=$(free_port)
run_relayd() {
    local sessions=$1 size=$2 msgs=$3 spool=$T/spool-$1-$2 conf=$T/relayd-$1-$2.conf t0 t1
    local stored commits writes sc="" base
    base=$(baseline "$size" 1.5)
    RELAYD_UPSTREAM=none write_relayd_conf "$conf"
    relayd_conf "$conf" relayd "hostname = relay.bench" "spool = $spool" \
        "max_connections = 1000" "max_connections_per_client = 1000"
    if [ "${BENCH_STRACE:-0}" = 1 ]; then
        local st="strace -f --seccomp-bpf -c -e trace=fsync,fdatasync,msync,sync_file_range"
        RELAYD_WRAPPER="$st -o $T/strace-$sessions-$size" start_relayd "$conf" > /dev/null
    else
        start_relayd "$conf" > /dev/null
    fi
    t0=$(now)
    smtp-source -s "$sessions" -m "$msgs" -l "$size" -f bench@lan.test -t user@example.com \
        -M bench.lan "127.0.0.1:$RELAYD_PORT" > "$T/source.log" 2>&1 ||
        say "   smtp-source: $(tail -n 1 "$T/source.log")"
    t1=$(now)
    stored=$("$RELAYCTL_BIN" --spool "$spool" stats --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
    if [ "${BENCH_STRACE:-0}" = 1 ]; then
        # RELAYD_PID is strace; relayd is its child.  strace writes its summary at exit.
        kill -TERM "$(cat /proc/"$RELAYD_PID"/task/*/children | awk '{ print $1 }')"
        wait_pid_gone "$RELAYD_PID" 30 || fail "relayd under strace did not stop"
        wait "$RELAYD_PID" || true
        RELAYD_PID=
    else
        stop_relayd
    fi
    read -r commits writes < <(sed -nE 's/.*spool: ([0-9]+) commits for ([0-9]+) writes.*/\1 \2/p' \
        "$T/relayd.log" | tail -n 1)
    if [ "${BENCH_STRACE:-0}" = 1 ]; then
        sc=$(awk '$NF == "fdatasync" || $NF == "fsync" { n += $4 } END { print n + 0 }' \
            "$T/strace-$sessions-$size")
        sc=$(python3 -c "import sys; print('%.3f' % (int(sys.argv[1]) / max(1, int(sys.argv[2]))))" \
            "$sc" "$stored")
    fi
    printf 'relayd %s %s %s %s %s %s %s %s %s\n' "$base" "$sessions" "$size" "$stored" "$(secs "$t0" "$t1")" \
        "$(rate "$stored" "$t0" "$t1")" \
        "$(python3 -c "import sys; print('%.3f' % (int(sys.argv[1]) / max(1, int(sys.argv[2]))))" \
            "${commits:-0}" "${writes:-0}")" "${sc:--}" "$msgs" >> "$RESULTS"
    rm -rf -- "$spool"
}

for r in "${RUNS[@]}"; do
    read -r s l m <<< "$r"
    m=$(scaled "$m")
    say "relayd: $s session(s), $l bytes, $m messages"
    run_relayd "$s" "$l" "$m"
done

# ---------------------------------------------------------------------------------------
# Postfix as a smarthost (relayhost = an smtp-sink), same load, mail deferred in its queue.
run_postfix() {
    local sessions=$1 size=$2 msgs=$3 t0 t1 stored before base rc=0
    base=$(baseline "$size" 1.5)
    pf_queued() {
        find "$PF_DIR/queue/incoming" "$PF_DIR/queue/active" "$PF_DIR/queue/deferred" \
            "$PF_DIR/queue/hold" -type f 2> /dev/null | wc -l
    }
    before=$(pf_queued)
    t0=$(now)
    smtp-source -s "$sessions" -m "$msgs" -l "$size" -f bench@lan.test -t user@example.com \
        -M bench.lan "127.0.0.1:$PF_PORT" > "$T/source.log" 2>&1 || rc=$?
    t1=$(now)
    # smtp-source stops at the first unexpected reply: exit 0 means all were accepted.
    # Otherwise count the queue (approximate: Postfix moves files while we look).
    if [ "$rc" -eq 0 ]; then
        stored=$msgs
    else
        say "   smtp-source: $(tail -n 1 "$T/source.log")"
        stored=$(($(pf_queued) - before))
    fi
    postsuper -c "$PF_DIR/etc" -d ALL > /dev/null 2>&1 || true
    printf 'postfix %s %s %s %s %s %s %s %s %s\n' "$base" "$sessions" "$size" "$stored" "$(secs "$t0" "$t1")" \
        "$(rate "$stored" "$t0" "$t1")" "-" "-" "$msgs" >> "$RESULTS"
}

if [ "${BENCH_POSTFIX:-1}" = 1 ]; then
    PF_DIR=$T/postfix
    PF_PORT=$(free_port)
    SINK_PORT=$(free_port)
    mkdir -p "$PF_DIR/etc" "$PF_DIR/queue" "$PF_DIR/data"
    chown postfix:postfix "$PF_DIR/data"
    cat > "$PF_DIR/etc/master.cf" <<EOF
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    cat > "$PF_DIR/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF_DIR/queue
data_directory = $PF_DIR/data
mail_owner = postfix
setgid_group = postdrop
myhostname = smarthost.bench
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
relayhost = [127.0.0.1]:$SINK_PORT
# Accept and keep, like relayd without a route: measure acceptance only.
defer_transports = smtp, relay
smtpd_relay_restrictions = permit_mynetworks, reject
default_process_limit = 250
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
maillog_file = $PF_DIR/maillog
maillog_file_prefixes = /tmp, /var, /dev/stdout
biff = no
smtputf8_enable = no
EOF
    smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 100 > /dev/null 2>&1 &
    E2E_PIDS+=("$!")
    postfix -c "$PF_DIR/etc" check > /dev/null 2>&1 || fail "postfix check failed"
    postfix -c "$PF_DIR/etc" start > /dev/null 2>&1 || fail "postfix start failed"
    wait_for_port "$PF_PORT" 20 || fail "benchmark Postfix not listening"
    for r in "${RUNS[@]}"; do
        read -r s l m <<< "$r"
        m=$(scaled "$m")
        say "postfix: $s session(s), $l bytes, $m messages"
        run_postfix "$s" "$l" "$m"
    done
    stop_postfix_upstream
fi

# ---------------------------------------------------------------------------------------
say "baseline again"
BASE2=$(baseline)
echo
echo "disk: $(df -h --output=source,fstype "$T" | tail -n 1 | tr -s ' ')   baseline: $BASE1 / $BASE2 fdatasync/s before / after (2 KB appends)"
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print("%-8s %8s %5s %9s %8s %8s %8s %7s %10s %10s" % ("server", "sessions", "size",
      "messages", "seconds", "msgs/s", "fsync/s", "x-base", "fsyncs/msg", "strace/msg"))
for srv, b, s, size, stored, secs, rate, fpm, sc, sent in rows:
    kb = "%dK" % (int(size) // 1024)
    xb = "%.1f" % (float(rate) / float(b)) if rate != "-" and float(b) > 0 else "-"
    note = "" if stored == sent else "  (%s of %s accepted)" % (stored, sent)
    print("%-8s %8s %5s %9s %8s %8s %8s %7s %10s %10s%s" % (srv, s, kb, stored, secs, rate, b,
          xb, fpm, sc, note))
print()
print("fsync/s: write(size) + fdatasync() pairs per second measured on the same disk just "
      "before the run,\n  i.e. the most any one-fsync-per-message design could accept then; "
      "x-base = msgs/s / fsync/s.")
print("fsyncs/msg: relayd's durable LMDB commits per stored message (each commit = one "
      "fdatasync + one O_DSYNC meta-page write).")
PY
E2E_FAILED=0
