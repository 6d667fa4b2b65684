#!/usr/bin/env bash
# t_control (issue #11): relayctl reload / drain / resume / daemon-status through the
# control socket (spool/control.sock, mode 0600): a clear error and exit 1 without a
# daemon; reload reports success, and the daemon's error with exit 1; drain answers new
# connections 421 4.3.2 while a session in progress finishes its message; a socket left by
# kill -9 is replaced at the next start; the socket is removed at stop.
source "$(dirname "$0")/lib.sh"

UP=$(free_port)
start_fake_upstream "$UP" "$T/up"
write_fake_relayd_conf "$T/relayd.conf" "$UP"
RELAYD_CONF=$T/relayd.conf
SOCK=$T/spool/control.sock

# No daemon: a clear error, exit 1.
rc=0
relayctl reload > "$T/out" 2> "$T/err" || rc=$?
[ "$rc" = 1 ] || fail "relayctl reload without a daemon exited $rc, want 1"
grep -q 'no relayd is running on spool' "$T/err" || fail "unclear error without a daemon: $(cat "$T/err")"

start_relayd "$T/relayd.conf"
[ -S "$SOCK" ] || fail "no control socket at $SOCK"
[ "$(stat -c %a "$SOCK")" = 600 ] || fail "control socket mode $(stat -c %a "$SOCK"), want 600"

out=$(relayctl reload) || fail "relayctl reload failed: $out"
[ "$out" = "relayd: configuration reloaded" ] || fail "relayctl reload said: $out"
log_wait 'control: reload' 5 || fail "no log line for the reload"

# The daemon's own error (the password file it re-reads is gone): exit 1, the reason shown.
mv "$T/provider.secret" "$T/provider.secret.away"
rc=0
"$RELAYCTL_BIN" --spool "$T/spool" reload > "$T/out" 2> "$T/err" || rc=$?
[ "$rc" = 1 ] || fail "a failed reload exited $rc, want 1"
grep -q 'relayctl: reload: .*provider.secret' "$T/err" || fail "the reload error does not name the file: $(cat "$T/err")"
mv "$T/provider.secret.away" "$T/provider.secret"
relayctl reload > /dev/null || fail "reload after the fix failed"

# Drain: a session already in progress finishes its message; a new connection gets 421.
sessions() { grep -c 'connect from 127.0.0.1 listener=lan session=' "$T/relayd.log" || true; }
before=$(sessions)
python3 "$E2E_SRC/tests/e2e/smtpclient.py" --port "$RELAYD_PORT" > "$T/inflight.out" 2>&1 <<'S' &
< 220
> HELO dev.lan
< 250
> MAIL FROM:<sender@lan.test>
< 250
sleep 2
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: during drain
>
> sent by a session that began before the drain
> .
< 250
> QUIT
< 221
S
INFLIGHT=$!
E2E_PIDS+=("$INFLIGHT")
for ((i = 0; i < 50; i++)); do [ "$(sessions)" -gt "$before" ] && break; sleep 0.2; done
[ "$(sessions)" -gt "$before" ] || fail "the session in progress did not start"
relayctl drain | grep -q '^relayd: draining' || fail "relayctl drain did not confirm"
printf '%s\n' '<~ ^421 4\.3\.2 relay\.test not accepting mail now \(draining\), try another server' eof |
    smtp_dialogue > /dev/null || fail "a new connection while draining did not get 421 4.3.2"
relayctl daemon-status | grep -q '^relayd: draining queued=' || fail "daemon-status: $(relayctl daemon-status)"
wait "$INFLIGHT" || { cat "$T/inflight.out" >&2; fail "the session in progress did not finish while draining"; }
wait_for_fake_count "$T/up" 1 15 || fail "the message of the session in progress was not delivered"
relayctl resume | grep -q '^relayd: accepting mail' || fail "relayctl resume did not confirm"
make_message "$T/m.eml" "after resume"
relay_send "$T/m.eml" user@example.com || fail "mail refused after resume"
wait_for_fake_count "$T/up" 2 15 || fail "mail after resume not delivered"

# kill -9 leaves the socket; the next start replaces it.
kill -KILL "$RELAYD_PID"
wait "$RELAYD_PID" 2> /dev/null || true
RELAYD_PID=
[ -S "$SOCK" ] || fail "the socket is gone after kill -9 (nothing to test)"
rc=0
relayctl daemon-status > /dev/null 2> "$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q 'no relayd is running' "$T/err" || fail "a stale socket was not reported as no daemon: $rc $(cat "$T/err")"
start_relayd "$T/relayd.conf"
log_wait 'control: removed the stale socket' 5 || fail "the stale socket was not replaced"
relayctl daemon-status | grep -q '^relayd: accepting' || fail "daemon-status after restart failed"
check_relayd_exit
[ ! -e "$SOCK" ] || fail "the control socket is still there after stop"
pass
