#!/usr/bin/env bash
# t_out_drop_data: the upstream drops the connection in the middle of DATA (no reply to the
# final dot): the message is not lost and not counted as sent; the retry delivers it once.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --fault drop-in-data --fault-times 1
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "dropped in data"
relay_send "$T/m.eml" user@example.com || fail "relayd did not accept the message"
wait_for_fake_count "$T/fake" 1 25 || { queue_json >&2 || true; fail "not delivered after the drop"; }
grep -q "dropping in DATA" "$T/fake/conn.log" || fail "the fault was not injected"
grep -qE 'to=<user@example.com> .*status=deferred' "$T/relayd.log" ||
    fail "relayd's log has no deferral for the dropped connection"
sleep 4
[ "$(fake_count "$T/fake")" -eq 1 ] || fail "$(fake_count "$T/fake") copies arrived, want 1"
body_of "$T/fake/msg-1.eml" > "$T/got"
cmp -s <(tr -d '\r' < "$T/got") "$T/m.eml.body" || fail "body changed"
wait_for_queue_empty 10 || fail "queue not empty"
pass
