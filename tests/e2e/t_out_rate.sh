#!/usr/bin/env bash
# t_out_rate: [upstream] max_messages_per_minute = 6 is respected: of 10 messages queued at
# once, the upstream sees at most 6 in the first 20 seconds (arrivals counted at the
# upstream), the rest wait in the spool (not failed), and some do get through.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake"
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
relayd_conf "$T/relayd.conf" "upstream fake" "max_messages_per_minute = 6"
start_relayd "$T/relayd.conf"

start=$(date +%s)
for i in $(seq 1 10); do
    make_message "$T/m$i.eml" "rate $i"
    relay_send "$T/m$i.eml" user@example.com || fail "message $i not accepted"
done
say "   10 messages queued in $(($(date +%s) - start))s"
sleep $((20 - ($(date +%s) - start)))
n=$(fake_count "$T/fake")
say "   upstream arrivals in the first 20s: $n (limit 6 per minute)"
[ "$n" -ge 1 ] || fail "nothing was delivered in 20s"
[ "$n" -le 6 ] || fail "$n messages reached the upstream within 20s: the limit of 6/minute was exceeded"
# Arrival times from the upstream's own log: no 60s window holds more than 6.
python3 - "$T/fake/arrivals.log" <<'PY' || fail "more than 6 arrivals within a 60s window"
import sys
t = sorted(float(l.split()[0]) for l in open(sys.argv[1]))
for i in range(len(t)):
    if sum(1 for x in t[i:] if x - t[i] < 60) > 6:
        sys.exit(1)
PY
left=$(queue_ids | grep -c . || true)
failed=$(queue_ids failed | grep -c . || true)
say "   still in the spool: $left (failed: $failed)"
[ "$left" -eq $((10 - n)) ] || fail "$left messages in the spool, want $((10 - n))"
[ "$failed" -eq 0 ] || fail "rate limiting failed $failed messages instead of delaying them"
pass
