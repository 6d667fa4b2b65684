#!/usr/bin/env bash
# t_upstream_down: with the upstream down relayd still accepts mail (250), keeps it
# deferred with a readable reason, and delivers it once the upstream is back, without a
# restart of relayd.
source "$(dirname "$0")/lib.sh"

RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=3 write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"
port_open "$PF_PORT" && fail "something already listens on the upstream port $PF_PORT"

say "1: upstream down: relayd accepts and defers"
make_message "$T/m1.eml" "e2e upstream down"
relay_send "$T/m1.eml" user@example.com || fail "relayd refused mail while the upstream is down"
id=$(wait_for_queue_state deferred 20) || { queue_json >&2 || true; fail "message never deferred"; }
err=$(queue_field "$id" last_error)
attempts=$(queue_field "$id" attempts)
say "   $id deferred after $attempts attempt(s): $err"
[ -n "$err" ] || fail "deferred message has no last_error"
printf '%s' "$err" | grep -qiE 'refused|connect' ||
    fail "last_error does not say the connection failed: '$err'"
[ "${attempts:-0}" -ge 1 ] || fail "attempts is '$attempts', want >= 1"
# Retries follow retry_first (1s) doubling up to retry_max (3s): over the next 3 seconds at
# most about 3 more attempts, not a busy loop.
sleep 3
later=$(queue_field "$id" attempts)
say "   attempts after 3s more: $later"
[ "${later:-0}" -le $((attempts + 4)) ] ||
    fail "retried $((later - attempts)) times in 3s with retry_first=1s: retries are not paced"
relayctl show "$id" > "$T/show.txt" || fail "relayctl show $id failed"
grep -qiE 'refused|connect' "$T/show.txt" || { cat "$T/show.txt" >&2; fail "show lacks the reason"; }

say "2: upstream back: the same relayd delivers it"
start_postfix_upstream
wait_for_maildir_count 1 30 || { queue_json >&2 || true; fail "not delivered after upstream came back"; }
body_of "$(maildir_files | head -n 1)" > "$T/m1.got"
cmp -s "$T/m1.eml.body" "$T/m1.got" || fail "body changed on the way"
wait_for_queue_empty 15 || { queue_json >&2 || true; fail "queue not empty after delivery"; }
pid_alive "$RELAYD_PID" || fail "relayd died"
pass
