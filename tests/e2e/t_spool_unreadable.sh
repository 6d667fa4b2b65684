#!/usr/bin/env bash
# t_spool_unreadable (issue #9, defect 5): an envelope record that does not decode, at the
# head of the schedule, is set aside (held, with the decode error in last_error, the
# original bytes kept) and never stalls the mail behind it.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"
make_message "$T/m1.eml" "first"
make_message "$T/m2.eml" "second"
relay_send "$T/m1.eml" a@example.com || fail "relayd did not accept message 1"
relay_send "$T/m2.eml" b@example.com || fail "relayd did not accept message 2"
ids=$(queue_ids)
first=$(echo "$ids" | head -n 1)
[ "$(echo "$ids" | grep -c .)" -eq 2 ] || fail "want two messages queued, have: $ids"
stop_relayd

# Overwrite the first message's envelope with bytes that are no envelope record.
mdb_dump -s msg "$T/spool" > "$T/msg.dump" || fail "mdb_dump failed"
python3 - "$T/msg.dump" "$first" <<'PY'
import sys
path, first = sys.argv[1], sys.argv[2].lower().rjust(16, "0")
out, lines, i, done = [], open(path).read().split("\n"), 0, False
while i < len(lines):
    out.append(lines[i])
    if not done and lines[i].strip() == first:
        out.append(" 09ffff")  # record version 9: does not decode
        i += 2
        done = True
        continue
    i += 1
assert done, "first message not found in the dump"
open(path, "w").write("\n".join(out))
PY
mdb_load -s msg -f "$T/msg.dump" "$T/spool" || fail "mdb_load failed"

start_fake_upstream "$PORT" "$T/fake"
start_relayd "$T/relayd.conf"
wait_for_fake_count "$T/fake" 1 20 || fail "the message behind the unreadable one was not delivered"
held=$(wait_for_queue_state held 10) || fail "the unreadable message was not set aside as held"
[ "$held" = "$first" ] || fail "held $held, want $first"
relayctl show "$first" | grep -q 'unreadable envelope record' || { relayctl show "$first" >&2; fail "show lacks the reason"; }
[ "$(mdb_dump -s bad "$T/spool" | grep -c "$(echo "$first" | tr A-F a-f)")" -ge 1 ] || fail "the original record was not kept"
relayctl stats > /dev/null || fail "relayctl stats fails on the spool"
check_relayd_exit
pass
