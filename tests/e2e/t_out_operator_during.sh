#!/usr/bin/env bash
# t_out_operator_during (issue #9, defect 6): relayctl hold and delete made while a
# delivery waits for the upstream's reply win over its result: a held message stays held
# after a 451, and a deleted message is not brought back nor bounced after a 550.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --dot-delay 4 \
    --dot-reply-for 'a@example.com=451 4.3.0 try later' \
    --dot-reply-for 'b@example.com=550 5.7.1 content rejected'
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
relayd_conf "$T/relayd.conf" "upstream fake" "data_timeout = 20s"
start_relayd "$T/relayd.conf"

dots() { grep -c ' dot$' "$T/fake/conn.log" 2>/dev/null || true; }
wait_dots() {
    local i
    for ((i = 0; i < 80; i++)); do
        [ "$(dots)" -ge "$1" ] && return 0
        sleep 0.25
    done
    return 1
}

say "1: hold during the delivery"
make_message "$T/m1.eml" "held during"
relay_send "$T/m1.eml" a@example.com || fail "relayd did not accept message 1"
id1=$(queue_ids | head -n 1)
wait_dots 1 || fail "the upstream never got the end of data"
relayctl hold "$id1" > /dev/null || fail "relayctl hold failed"
log_wait 'to=<a@example.com> .*status=deferred \(451' 15 || fail "no outcome for a@"
sleep 1
[ "$(queue_field "$id1" state)" = held ] || fail "the hold was undone by the delivery result ($(queue_field "$id1" state))"

say "2: delete during the delivery"
make_message "$T/m2.eml" "deleted during"
relay_send "$T/m2.eml" b@example.com || fail "relayd did not accept message 2"
id2=$(queue_ids | grep -v "$id1" | head -n 1)
wait_dots 2 || fail "the upstream never got the second end of data"
relayctl delete --yes "$id2" > /dev/null || fail "relayctl delete failed"
log_wait "$id2: deleted during delivery" 15 || fail "no log line for the deleted message"
sleep 1
queue_ids | grep -q "$id2" && fail "the deleted message came back"
grep -q "$id2: sender non-delivery notification" "$T/relayd.log" && fail "a deleted message was bounced"
[ "$(queue_ids | grep -c .)" -eq 1 ] || fail "want only the held message in the spool"
check_relayd_exit
pass
