#!/usr/bin/env bash
# t_limits_memory: load with Postfix's smtp-source (200 parallel sessions, 2000 messages of
# 20 kB) against relayd, which relays to a local smtp-sink.  relayd's resident memory is
# sampled from /proc throughout and must stay bounded (peak VmHWM below MEM_LIMIT_MB,
# default 200); every message must be accepted.  The figures are printed.
source "$(dirname "$0")/lib.sh"

MEM_LIMIT_MB=${MEM_LIMIT_MB:-200}
SESSIONS=${LOAD_SESSIONS:-200}
MESSAGES=${LOAD_MESSAGES:-2000}
command -v smtp-source >/dev/null || fail "smtp-source (postfix) is not installed"

SINK_PORT=$(free_port)
smtp-sink -u postfix -c "127.0.0.1:$SINK_PORT" 256 > "$T/sink.log" 2>&1 &
E2E_PIDS+=($!)
wait_for_port "$SINK_PORT" 10 || fail "smtp-sink did not start"

PF_PORT=$SINK_PORT
write_relayd_conf "$T/relayd.conf"
# The sink speaks plain SMTP without AUTH.
sed -i -e 's/^tls = starttls$/tls = none/' -e '/^username = /d' -e '/^password_file = /d' \
    "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "relayd" "max_connections = $((SESSIONS + 50))
max_connections_per_client = $((SESSIONS + 50))
workers = 8"
start_relayd "$T/relayd.conf"

( while kill -0 "$RELAYD_PID" 2>/dev/null; do
      echo "$(date +%s.%N | cut -c1-14) $(proc_status_kb "$RELAYD_PID" VmRSS)"
      sleep 0.2
  done ) > "$T/rss.samples" 2>/dev/null &
E2E_PIDS+=($!)

say "smtp-source -s $SESSIONS -m $MESSAGES -l 20000 (bounded to 40 s)"
start=$(date +%s.%N)
rc=0
timeout 40 smtp-source -s "$SESSIONS" -m "$MESSAGES" -l 20000 -f load@lan.test \
    -t user@example.com -M load.lan.test "127.0.0.1:$RELAYD_PORT" > "$T/source.log" 2>&1 || rc=$?
took=$(python3 -c "import time,sys; print(round(time.time() - float(sys.argv[1]), 1))" "$start")
relayd_must_run
hwm=$(proc_status_kb "$RELAYD_PID" VmHWM)
rss=$(proc_status_kb "$RELAYD_PID" VmRSS)
peak=$(awk '$2 > m { m = $2 } END { print m + 0 }' "$T/rss.samples")
accepted=$(grep -c ': from=<load@lan.test>' "$T/relayd.log" || true)
say "   smtp-source exit $rc after ${took}s; relayd accepted $accepted of $MESSAGES"
say "   relayd memory: VmHWM $((hwm / 1024)) MB, peak sampled VmRSS $((peak / 1024)) MB, now $((rss / 1024)) MB (limit $MEM_LIMIT_MB MB)"
[ "$rc" -eq 0 ] || { tail -n 20 "$T/source.log" >&2; fail "smtp-source failed (exit $rc)"; }
[ "$accepted" -ge "$MESSAGES" ] || fail "only $accepted of $MESSAGES messages were accepted"
[ "$hwm" -lt $((MEM_LIMIT_MB * 1024)) ] || fail "relayd's memory peaked at $((hwm / 1024)) MB"

# Deliveries to the sink go on; the queue should drain, and memory should not keep growing.
for ((i = 0; i < 60; i++)); do
    n=$(spool_count)
    [ "$n" -eq 0 ] && break
    sleep 0.5
done
say "   queue after the load: $(spool_count) left; VmRSS now $(($(proc_status_kb "$RELAYD_PID" VmRSS) / 1024)) MB"
pass
