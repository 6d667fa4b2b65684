#!/usr/bin/env bash
# contrib/bench-relay.sh - end-to-end throughput from smtp-source through relayd to a real
# Postfix upstream (STARTTLS required, SASL AUTH), with upstream connection reuse on and off.
#
# Not a test (ctest does not run it); needs root (Postfix), smtp-source (postfix), certtool,
# saslpasswd2 and python3, as the e2e tests do (contrib/setup.sh installs them).  Builds
# nothing: it runs build/relayd and build/relayctl (RELAYD_BIN, RELAYCTL_BIN override).
#
#   contrib/bench-relay.sh                          reuse yes and no, both upstream sinks
#   BENCH_MSGS=500 contrib/bench-relay.sh           fewer messages (quicker, noisier)
#   BENCH_SINK=discard contrib/bench-relay.sh       one upstream sink only (maildir|discard)
#   BENCH_REUSE="no yes" BENCH_REPEAT=3 ...         order of the runs, and how many rounds
#
# Other knobs: BENCH_SESSIONS (smtp-source -s, default 20), BENCH_SIZE (-l, bytes, 2048),
# BENCH_WORKERS ([relayd] workers, 8), BENCH_UPCONN ([upstream] max_connections, 4),
# BENCH_TIMEOUT (seconds each phase may take at most, 150).
#
# What is measured, per run (a fresh relayd and spool each time, the same Postfix per sink):
#   accept    smtp-source's wall time: -m messages of -l bytes over -s parallel sessions, one
#             message per connection, until relayd acknowledged the last one (durably: relayd
#             runs with its default fsync'd spool);
#   e2e       from smtp-source's start until the upstream Postfix logged status=sent for every
#             message (its own delivery: into the Maildir, or to discard:), i.e. until every
#             message has crossed relayd -> Postfix over SMTP+STARTTLS+AUTH and left Postfix;
#   sessions  SMTP sessions Postfix accepted ("connect from" in its maillog);
#   TLS       TLS handshakes Postfix completed ("TLS connection established from").
# Upstream sinks: "maildir" is the e2e upstream as is (virtual(8) into one Maildir, an fsync
# per message on the upstream's side too); "discard" sets virtual_transport = discard so that
# Postfix still receives, queues (fsync) and logs every message but writes no mailbox: the
# figures then describe relayd -> Postfix SMTP rather than Postfix's local delivery.
# Everything runs on 127.0.0.1 on one machine: client, relayd and upstream share the CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

RELAYD_BIN=${RELAYD_BIN:-$PWD/build/relayd}
RELAYCTL_BIN=${RELAYCTL_BIN:-$PWD/build/relayctl}
# The e2e harness: $T (removed at exit), pid-based cleanup of relayd and Postfix, the Postfix
# upstream, the test CA and relayd's config.
source tests/e2e/lib.sh
E2E_NAME=bench-relay

MSGS=${BENCH_MSGS:-2000}
SESSIONS=${BENCH_SESSIONS:-20}
SIZE=${BENCH_SIZE:-2048}
WORKERS=${BENCH_WORKERS:-8}
UPCONN=${BENCH_UPCONN:-4}
SINKS=${BENCH_SINK:-"discard maildir"}
REUSES=${BENCH_REUSE:-"yes no"}
REPEAT=${BENCH_REPEAT:-1}
LIMIT=${BENCH_TIMEOUT:-150}

command -v smtp-source > /dev/null || fail "no smtp-source (apt-get install postfix)"
[ -x "$RELAYD_BIN" ] || fail "no relayd at $RELAYD_BIN: build first (contrib/build.sh)"
for v in "$MSGS" "$SESSIONS" "$SIZE" "$WORKERS" "$UPCONN" "$REPEAT" "$LIMIT"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || fail "not a positive number: $v"
done

RESULTS=$T/results
: > "$RESULTS"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

# now: wall clock in microseconds (bash 5's EPOCHREALTIME: no process per sample).
now() { local t=${EPOCHREALTIME/[.,]/}; echo "$t"; }
secs() { python3 -c "import sys; print('%.2f' % ((int(sys.argv[2]) - int(sys.argv[1])) / 1e6))" "$@"; }
rate() { python3 -c "import sys; n,a,b=map(int,sys.argv[1:]); print('%.0f' % (n*1e6/(b-a)) if b>a else '-')" "$@"; }

# maillog_since OFFSET: the upstream's maillog from byte OFFSET on (this run's lines).
maillog_since() { tail -c +"$(($1 + 1))" "$PF_DIR/maillog" 2>/dev/null || true; }
maillog_count() { maillog_since "$1" | grep -cE -- "$2" || true; }
maillog_size() { stat -c %s "$PF_DIR/maillog" 2>/dev/null || echo 0; }

# wait_maillog OFFSET REGEX N SECONDS: 0 once the maillog has N lines matching REGEX past
# OFFSET; relayd dying ends the wait at once.
wait_maillog() {
    local off=$1 re=$2 n=$3 end=$(($(now) + $4 * 1000000))
    while [ "$(now)" -lt "$end" ]; do
        relayd_must_run
        [ "$(maillog_count "$off" "$re")" -ge "$n" ] && return 0
        sleep 0.1
    done
    return 1
}

start_upstream() {
    local sink=$1
    PF_EXTRA_MAIN=
    if [ "$sink" = discard ]; then
        # Receive, queue and log as usual, but deliver to discard(8) instead of a Maildir.
        PF_EXTRA_MAIN="virtual_transport = discard:bench sink"
    fi
    # The e2e upstream keeps its defaults (100 processes, no per-client limits for
    # mynetworks); only the sink differs.
    start_postfix_upstream server
}

# run_once SINK REUSE: one fresh relayd (and spool) against the running upstream.
run_once() {
    local sink=$1 reuse=$2 conf=$T/relayd-$1-$2.conf off t0 t1 t2 rc=0 accepted sent
    local sessions tls relayd_sent
    rm -rf -- "$T/spool"
    RELAYD_PORT=$(free_port)
    write_relayd_conf "$conf"
    relayd_conf "$conf" "upstream provider" "max_connections = $UPCONN" "reuse = $reuse"
    relayd_conf "$conf" relayd "workers = $WORKERS
max_connections_per_client = $((SESSIONS + 10))
max_connections = $((SESSIONS + 50))"
    start_relayd "$conf" > /dev/null
    off=$(maillog_size)
    say "sink=$sink reuse=$reuse: $MSGS messages of $SIZE bytes over $SESSIONS sessions"
    t0=$(now)
    timeout "$LIMIT" smtp-source -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -f bench@lan.test \
        -t user@example.com -M bench.lan "127.0.0.1:$RELAYD_PORT" > "$T/source.log" 2>&1 || rc=$?
    t1=$(now)
    # smtp-source stops at the first unexpected reply: exit 0 means all were accepted.
    if [ "$rc" -eq 0 ]; then
        accepted=$MSGS
    else
        say "   smtp-source exit $rc: $(tail -n 1 "$T/source.log")"
        accepted=$("$RELAYCTL_BIN" -c "$conf" list --json 2> /dev/null |
            python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2> /dev/null || echo 0)
        accepted=$((accepted + $(maillog_count "$off" 'status=sent')))
    fi
    # status=sent is logged by virtual(8) or discard(8) once Postfix has delivered it.
    if ! wait_maillog "$off" ' status=sent ' "$accepted" "$LIMIT"; then
        say "   only $(maillog_count "$off" ' status=sent ') of $accepted delivered upstream" \
            "within ${LIMIT}s"
    fi
    t2=$(now)
    sent=$(maillog_count "$off" ' status=sent ')
    # Postfix logs "disconnect from" when a session ends; idle reused sessions are still
    # open, so count connects.  Each completed STARTTLS logs one "TLS connection established".
    sessions=$(maillog_count "$off" 'smtpd\[[0-9]+\]: connect from ')
    tls=$(maillog_count "$off" 'TLS connection established from ')
    stop_relayd
    relayd_sent=$(grep -c ' status=sent ' "$T/relayd.log" || true)
    [ "$relayd_sent" -eq "$sent" ] || say "   note: relayd logged $relayd_sent status=sent, Postfix $sent"
    if [ "$sink" = maildir ]; then
        say "   Maildir holds $(maildir_count) messages"
        rm -rf -- "$MAILDIR/new" "$MAILDIR/cur" "$MAILDIR/tmp"
    fi
    printf '%s %s %s %s %s %s %s %s %s %s\n' "$reuse" "$sink" "$MSGS" "$SIZE" "$accepted" \
        "$sent" "$((t1 - t0))" "$((t2 - t0))" "$sessions" "$tls" >> "$RESULTS"
    say "   accept $(secs "$t0" "$t1")s, e2e $(secs "$t0" "$t2")s, $sessions sessions," \
        "$tls TLS handshakes"
}

for sink in $SINKS; do
    case $sink in maildir | discard) ;; *) fail "BENCH_SINK: maildir or discard, not $sink" ;; esac
    start_upstream "$sink"
    for ((round = 1; round <= REPEAT; round++)); do
        for reuse in $REUSES; do
            run_once "$sink" "$reuse"
        done
    done
    stop_postfix_upstream
    # A fresh upstream (queue, log, config) for the next sink.
    rm -rf -- "$PF_DIR" "$T/mail"
    PF_DIR=
    PF_PORT=
done

echo
echo "machine: $(nproc) CPU(s) shared by smtp-source, relayd and Postfix;" \
    "relayd workers=$WORKERS, upstream max_connections=$UPCONN, smtp-source -s $SESSIONS"
echo "load average: $LOAD0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
fmt = "%-5s %-7s %8s %5s %8s %9s %8s %9s %8s %8s %8s"
print(fmt % ("reuse", "sink", "messages", "size", "accept s", "accept/s", "e2e s", "e2e msg/s",
             "sessions", "TLS hs", "msg/sess"))
for reuse, sink, msgs, size, acc, sent, ta, te, sess, tls in rows:
    ta, te, sent, sess = int(ta) / 1e6, int(te) / 1e6, int(sent), int(sess)
    note = "" if int(acc) == int(msgs) == sent else "  (%s accepted, %d delivered of %s)" % (
        acc, sent, msgs)
    print(fmt % (reuse, sink, msgs, "%dK" % (int(size) // 1024) if int(size) >= 1024 else size,
                 "%.2f" % ta, "%.0f" % (int(acc) / ta), "%.2f" % te, "%.0f" % (sent / te),
                 sess, tls, "%.1f" % (sent / sess) if sess else "-") + note)
print()
print("accept: smtp-source wall time into relayd (durable spool).  e2e: from the first message"
      " sent\n  to the last status=sent in the upstream Postfix (sink: discard = virtual_transport"
      " = discard,\n  maildir = virtual(8) into a Maildir).  sessions / TLS hs: SMTP sessions and"
      " STARTTLS\n  handshakes the upstream Postfix saw.")
PY
E2E_FAILED=0
