#!/usr/bin/env bash
# t_out_auth_hold: a wrong password holds the mail (never bounced, never failed) and says
# why; once the password file is fixed and relayd reloaded (SIGHUP), delivery resumes by
# itself.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
use_wrong_password
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "auth hold"
relay_send "$T/m.eml" user@example.com || fail "relayd did not accept the message"
id=$(wait_for_attempt 30) || { queue_json >&2 || true; fail "no delivery attempt recorded"; }
sleep 4 # a couple of retry intervals (retry_first 2s, retry_max 4s)
state=$(queue_field "$id" state)
err=$(queue_field "$id" last_error)
say "   $id is $state: $err"
case $state in held|deferred) ;; *) fail "state '$state' with a wrong password: want held or deferred" ;; esac
printf '%s' "$err" | grep -qE '535|auth' || fail "the reason does not say authentication failed: '$err'"
grep -q 'bounce' <(relayctl show "$id") && fail "relayctl show mentions a bounce"
[ "$(maildir_count)" -eq 0 ] || fail "delivered with a wrong password"

say "   fixing the password file and reloading relayd (SIGHUP)"
(umask 077; printf '%s\n' "$SASL_PASSWORD" > "$RELAYD_PWFILE")
kill -HUP "$RELAYD_PID"
sleep 1
pid_alive "$RELAYD_PID" || fail "relayd died of SIGHUP (configuration reload not implemented)"
f=$(wait_for_subject "auth hold" 20) ||
    { queue_json >&2 || true; fail "not delivered within 20s after the reload with the right password"; }
assert_body "$f" "$T/m.eml.body"
wait_for_queue_empty 10 || fail "queue not empty"
pass
