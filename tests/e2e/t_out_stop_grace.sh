#!/usr/bin/env bash
# t_out_stop_grace (issue #9, defect 7): a stop while a delivery waits for the reply to its
# final dot lets it read the reply (stop_grace) and records the result: after a restart
# nothing is sent again.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --dot-delay 3
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "stop while waiting"
relay_send "$T/m.eml" a@example.com || fail "relayd did not accept the message"
for ((i = 0; i < 80; i++)); do
    grep -q ' dot$' "$T/fake/conn.log" 2>/dev/null && break
    sleep 0.25
done
grep -q ' dot$' "$T/fake/conn.log" || fail "the upstream never got the end of data"
stop_relayd
[ "$RELAYD_EXIT" = 0 ] || fail "relayd exited with $RELAYD_EXIT"
grep -q 'waiting up to 10s for the reply to the end of data' "$T/relayd.log" || fail "no stop_grace line"
grep -q 'to=<a@example.com> .*status=sent' "$T/relayd.log" || fail "the reply was not read before the stop"
start_relayd "$T/relayd.conf"
sleep 4
n=$(fake_count "$T/fake")
[ "$n" -eq 1 ] || fail "the upstream got $n copies, want 1"
[ -z "$(queue_ids)" ] || fail "the message is still queued after the restart"
check_relayd_exit
pass
