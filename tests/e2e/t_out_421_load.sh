#!/usr/bin/env bash
# t_out_421_load (issue #9, defect 8): under load, an upstream that now and then answers
# the end of data with "421 4.7.0 Service not available" (one session in five) while its
# other sessions succeed: only those sessions' messages are deferred and retried; nothing
# pauses the upstream, and every message arrives.
source "$(dirname "$0")/lib.sh"

N=40
PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --dot-421-every 5
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
relayd_conf "$T/relayd.conf" "upstream fake" "max_connections = 4"
relayd_conf "$T/relayd.conf" relayd "workers = 8"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "421 under load"
for ((i = 0; i < N; i++)); do
    relay_send "$T/m.eml" "u$i@example.com" > /dev/null || fail "relayd did not accept message $i"
done
wait_for_queue_empty 60 || { queue_json >&2; fail "not every message was delivered"; }
n421=$(grep -c ' dot 421$' "$T/fake/conn.log" || true)
say "   $n421 end-of-data replies were 421"
[ "$n421" -ge 2 ] || fail "the fault was not injected"
grep -q 'pausing all deliveries' "$T/relayd.log" && fail "a 421 among working sessions paused the upstream"
for ((i = 0; i < N; i++)); do
    [ "$(cat "$T"/fake/msg-*.env | grep -c "^to u$i@example.com\$")" -ge 1 ] || fail "u$i@ never arrived"
done
[ "$(grep -c 'status=sent' "$T/relayd.log")" -eq "$N" ] || fail "want exactly $N status=sent lines"
check_relayd_exit
pass
