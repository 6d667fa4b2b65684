#!/usr/bin/env bash
# t_out_421: an upstream that answers 421 in the middle of the session (after RCPT) and
# closes: the message is deferred with that reply, then delivered exactly once on the retry.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --fault 421-after-rcpt --fault-times 1
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "421 mid-session"
relay_send "$T/m.eml" user@example.com || fail "relayd did not accept the message"
wait_for_fake_count "$T/fake" 1 25 || { queue_json >&2 || true; fail "not delivered after the 421"; }
grep -qE 'to=<user@example.com> .*status=deferred \(.*421 4\.4\.2' "$T/relayd.log" ||
    fail "relayd's log has no deferral with the upstream's 421"
grep -q 'session 2 ' "$T/fake/conn.log" || fail "no second session"
sleep 5
[ "$(fake_count "$T/fake")" -eq 1 ] || fail "$(fake_count "$T/fake") copies arrived, want 1"
body_of "$T/fake/msg-1.eml" > "$T/got"
cmp -s <(tr -d '\r' < "$T/got") "$T/m.eml.body" || fail "body changed"
wait_for_queue_empty 10 || fail "queue not empty"
pass
