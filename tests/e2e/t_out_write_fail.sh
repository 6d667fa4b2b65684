#!/usr/bin/env bash
# t_out_write_fail (issue #9, defect 4): the spool write of a delivery result fails (as on
# a full or failing disk; relayd's RELAYD_TEST_FAIL_UPDATES hook fails the next N).  The
# message was delivered upstream; it must stay busy and must not be sent again while the
# write is retried with backoff, and the log must say why delivery pauses.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake"
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
RELAYD_TEST_FAIL_UPDATES=3 start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "write fails"
relay_send "$T/m.eml" a@example.com || fail "relayd did not accept the message"
wait_for_fake_count "$T/fake" 1 20 || fail "nothing arrived"
log_wait 'could not record the delivery result: .*trying again in 1s, no new delivery starts' 10 ||
    fail "no log line about the failed result write"
# Three failures: retries after 1, 2 and 4 seconds; then the result is durable.
log_wait 'delivery result recorded after 3 failed tries' 20 || fail "the result was never recorded"
wait_for_queue_empty 10 || { queue_json >&2; fail "the delivered message stayed in the spool"; }
sleep 3
n=$(fake_count "$T/fake")
say "   copies upstream: $n"
[ "$n" -eq 1 ] || fail "the message was sent $n times while its result could not be written"
[ "$(grep -c 'to=<a@example.com> .*status=sent' "$T/relayd.log")" -eq 1 ] || fail "want one outcome line"
check_relayd_exit
pass
