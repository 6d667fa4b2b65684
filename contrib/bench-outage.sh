#!/usr/bin/env bash
# contrib/bench-outage.sh - what an upstream outage costs: many messages held behind a
# wrong password (the seeds' commonest fault), then released with SIGHUP once it is right.
#
# Not a test (ctest does not run it); needs root (Postfix), smtp-source (postfix), certtool,
# saslpasswd2 and python3, as the e2e tests do (contrib/setup.sh installs them).  Builds
# nothing: it runs build/relayd and build/relayctl (RELAYD_BIN, RELAYCTL_BIN override).
#
#   contrib/bench-outage.sh                      100,000 messages of 2 KB
#   BENCH_MSGS=20000 contrib/bench-outage.sh     fewer (quicker)
#
# Knobs: BENCH_MSGS (messages held, 100000), BENCH_CHUNK (messages per accept measurement,
# 10000), BENCH_SESSIONS (smtp-source -s, 20), BENCH_SIZE (bytes, 2048), BENCH_WAIT (seconds
# of waiting measured, 120), BENCH_WORKERS ([relayd] workers, 8), BENCH_UPCONN ([upstream]
# max_connections, 4), BENCH_TIMEOUT (seconds a phase may take at most, 900).
#
# Phases, against the real Postfix upstream of the e2e tests (STARTTLS, SASL AUTH; its
# sink is discard(8), so that the figures describe relayd and SMTP, not a Maildir):
#   1. baseline: a fresh relayd with the right password, BENCH_CHUNK messages end to end
#      (smtp-source -> relayd -> Postfix status=sent): relayd's empty-spool e2e rate;
#   2. outage: a fresh relayd with a wrong password; the first BENCH_CHUNK messages go into
#      the empty spool (accept rate, empty), the spool is filled up to BENCH_MSGS - CHUNK,
#      and the last BENCH_CHUNK measure the accept rate on the full spool;
#   3. waiting: BENCH_WAIT seconds with nothing to do but wait: relayd's CPU seconds
#      (utime + stime from /proc/PID/stat) and bytes written (/proc/PID/io write_bytes),
#      peak RssAnon (sampled every second; LMDB's mapped pages are page cache, shown apart
#      as RssFile), and how long `relayctl stats` takes;
#   4. release: the right password, SIGHUP; the time until Postfix logged status=sent for
#      every held message: the drain rate, compared with phase 1's rate.
set -euo pipefail
cd "$(dirname "$0")/.."

RELAYD_BIN=${RELAYD_BIN:-$PWD/build/relayd}
RELAYCTL_BIN=${RELAYCTL_BIN:-$PWD/build/relayctl}
source tests/e2e/lib.sh
E2E_NAME=bench-outage

MSGS=${BENCH_MSGS:-100000}
CHUNK=${BENCH_CHUNK:-10000}
SESSIONS=${BENCH_SESSIONS:-20}
SIZE=${BENCH_SIZE:-2048}
WAIT=${BENCH_WAIT:-120}
WORKERS=${BENCH_WORKERS:-8}
UPCONN=${BENCH_UPCONN:-4}
LIMIT=${BENCH_TIMEOUT:-900}

command -v smtp-source > /dev/null || fail "no smtp-source (apt-get install postfix)"
[ -x "$RELAYD_BIN" ] || fail "no relayd at $RELAYD_BIN: build first (contrib/build.sh)"
for v in "$MSGS" "$CHUNK" "$SESSIONS" "$SIZE" "$WAIT" "$WORKERS" "$UPCONN" "$LIMIT"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || fail "not a positive number: $v"
done
[ "$MSGS" -ge $((2 * CHUNK)) ] || fail "BENCH_MSGS must be at least twice BENCH_CHUNK"

now() { local t=${EPOCHREALTIME/[.,]/}; echo "$t"; }
rate() { python3 -c "import sys; n,a,b=map(int,sys.argv[1:]); print('%.0f' % (n*1e6/(b-a)) if b>a else '-')" "$@"; }
ratio() { python3 -c "import sys; a,b=map(float,sys.argv[1:]); print('%.2f' % (a/b) if b else '-')" "$@"; }
maillog_size() { stat -c %s "$PF_DIR/maillog" 2>/dev/null || echo 0; }
maillog_count() { tail -c +"$(($1 + 1))" "$PF_DIR/maillog" 2>/dev/null | grep -cE -- "$2" || true; }

# wait_sent OFFSET N: until the upstream logged N deliveries past OFFSET (bounded).
wait_sent() {
    local end=$(($(now) + LIMIT * 1000000))
    while [ "$(now)" -lt "$end" ]; do
        relayd_must_run
        [ "$(maillog_count "$1" ' status=sent ')" -ge "$2" ] && return 0
        sleep 0.5
    done
    return 1
}

# source_msgs N: N messages into relayd; fails on any refusal.
source_msgs() {
    timeout "$LIMIT" smtp-source -s "$SESSIONS" -m "$1" -l "$SIZE" -f bench@lan.test \
        -t user@example.com -M bench.lan "127.0.0.1:$RELAYD_PORT" > "$T/source.log" 2>&1 ||
        fail "smtp-source: $(tail -n 1 "$T/source.log")"
}

# proc_cpu PID: utime + stime in clock ticks.  proc_wbytes PID: write_bytes.
proc_cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
proc_wbytes() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$1/io"; }

start_relayd_with() {
    local conf=$1 pwfile=$2
    rm -rf -- "$T/spool"
    RELAYD_PORT=$(free_port)
    RELAYD_PWFILE=$pwfile write_relayd_conf "$conf"
    relayd_conf "$conf" "upstream provider" "max_connections = $UPCONN"
    relayd_conf "$conf" relayd "workers = $WORKERS" \
        "max_connections_per_client = $((SESSIONS + 10))" "max_connections = $((SESSIONS + 50))"
    start_relayd "$conf" > /dev/null
}

PF_EXTRA_MAIN="virtual_transport = discard:bench sink"
start_postfix_upstream server

say "1: baseline: $CHUNK messages end to end with the right password"
start_relayd_with "$T/relayd-base.conf" "$T/provider.secret"
off=$(maillog_size)
t0=$(now)
source_msgs "$CHUNK"
wait_sent "$off" "$CHUNK" || fail "baseline: not every message was delivered"
t1=$(now)
e2e_empty=$(rate "$CHUNK" "$t0" "$t1")
stop_relayd
say "   $e2e_empty msg/s end to end"

say "2: outage: $MSGS messages held behind a wrong password"
(umask 077; echo "wrong-password" > "$T/wrong.secret")
start_relayd_with "$T/relayd-out.conf" "$T/wrong.secret"
t0=$(now)
source_msgs "$CHUNK"
t1=$(now)
acc_empty=$(rate "$CHUNK" "$t0" "$t1")
fill=$((MSGS - 2 * CHUNK))
left=$fill
while [ "$left" -gt 0 ]; do
    n=$((left > 20000 ? 20000 : left))
    source_msgs "$n"
    left=$((left - n))
done
t0=$(now)
source_msgs "$CHUNK"
t1=$(now)
acc_full=$(rate "$CHUNK" "$t0" "$t1")
held=$("$RELAYCTL_BIN" -c "$RELAYD_CONF" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
say "   accept: $acc_empty msg/s into the empty spool, $acc_full msg/s into the full one; $held held"
[ "$held" -eq "$MSGS" ] || say "   note: $held messages in the spool, want $MSGS (some delivered?)"

say "3: waiting ${WAIT}s"
cpu0=$(proc_cpu "$RELAYD_PID")
wb0=$(proc_wbytes "$RELAYD_PID")
peak_anon=0
for ((i = 0; i < WAIT; i++)); do
    relayd_must_run
    a=$(proc_status_kb "$RELAYD_PID" RssAnon)
    [ "${a:-0}" -gt "$peak_anon" ] && peak_anon=$a
    sleep 1
done
cpu1=$(proc_cpu "$RELAYD_PID")
wb1=$(proc_wbytes "$RELAYD_PID")
rss_file=$(proc_status_kb "$RELAYD_PID" RssFile)
hz=$(getconf CLK_TCK)
wait_cpu=$(python3 -c "print('%.2f' % (($cpu1 - $cpu0) / $hz))")
wait_mib=$(python3 -c "print('%.1f' % (($wb1 - $wb0) / 1048576))")
ts0=$(now)
"$RELAYCTL_BIN" -c "$RELAYD_CONF" stats > /dev/null
ts1=$(now)
stats_ms=$(python3 -c "print('%.0f' % (($ts1 - $ts0) / 1000))")
say "   relayd: ${wait_cpu} CPU s, ${wait_mib} MiB written, RssAnon peak $((peak_anon / 1024)) MiB" \
    "(RssFile $((rss_file / 1024)) MiB); relayctl stats ${stats_ms} ms"

say "4: release: the right password, SIGHUP"
off=$(maillog_size)
cp "$T/provider.secret" "$T/wrong.secret"
t0=$(now)
kill -HUP "$RELAYD_PID"
wait_sent "$off" "$held" || say "   only $(maillog_count "$off" ' status=sent ') of $held delivered within ${LIMIT}s"
t1=$(now)
sent=$(maillog_count "$off" ' status=sent ')
drain=$(rate "$sent" "$t0" "$t1")
for ((i = 0; i < 120; i++)); do
    a=$(proc_status_kb "$RELAYD_PID" RssAnon)
    [ "${a:-0}" -gt "$peak_anon" ] && peak_anon=$a
    [ -z "$("$RELAYCTL_BIN" -c "$RELAYD_CONF" list 2>/dev/null | head -n 2 | tail -n +2)" ] && break
    sleep 0.5
done
stop_relayd

echo
echo "machine: $(nproc) CPU(s) shared by smtp-source, relayd and Postfix; $MSGS messages of" \
    "$SIZE bytes; relayd workers=$WORKERS, upstream max_connections=$UPCONN"
printf '%-44s %12s %12s\n' "figure" "measured" "target"
printf '%-44s %12s %12s\n' "accept, empty spool (msg/s)" "$acc_empty" ""
printf '%-44s %12s %12s\n' "accept, full spool (msg/s)" "$acc_full" ""
printf '%-44s %12s %12s\n' "accept full / empty" "$(ratio "$acc_full" "$acc_empty")" ">= 0.8"
printf '%-44s %12s %12s\n' "relayd CPU during ${WAIT}s of waiting (s)" "$wait_cpu" "<= 1.2"
printf '%-44s %12s %12s\n' "relayd bytes written while waiting (MiB)" "$wait_mib" "<= 16"
printf '%-44s %12s %12s\n' "relayctl stats (ms)" "$stats_ms" "<= 100"
printf '%-44s %12s %12s\n' "e2e rate, empty spool (msg/s)" "$e2e_empty" ""
printf '%-44s %12s %12s\n' "drain rate after SIGHUP (msg/s)" "$drain" ""
printf '%-44s %12s %12s\n' "drain / empty-spool e2e" "$(ratio "$drain" "$e2e_empty")" ">= 0.8"
printf '%-44s %12s %12s\n' "peak RssAnon (MiB)" "$((peak_anon / 1024))" "<= 64"
printf '%-44s %12s %12s\n' "RssFile at the end of waiting (MiB, LMDB map)" "$((rss_file / 1024))" ""
E2E_FAILED=0
