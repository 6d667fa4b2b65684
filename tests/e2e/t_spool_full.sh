#!/usr/bin/env bash
# t_spool_full: with spool_max_size = 300K and the upstream down, relayd accepts mail until
# the limit, then answers 452 4.3.1 (the session stays usable); every message acknowledged
# before is still in the spool byte for byte, and all of them arrive once the upstream
# is back.  Afterwards there is room again.
source "$(dirname "$0")/lib.sh"

RELAYD_RETRY_FIRST=1 RELAYD_RETRY_MAX=2 write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" relayd "spool_max_size = 300K"
start_relayd "$T/relayd.conf"
port_open "$PF_PORT" && fail "something already listens on the upstream port $PF_PORT"

say "1: upstream down; fill the spool until relayd says 452"
mkdir -p "$T/bodies"
python3 "$E2E_SRC/tests/e2e/loadclient.py" --port "$RELAYD_PORT" --prefix full --size 20000 \
    --until-452 --max 40 --acked "$T/acked" --bodies "$T/bodies" > "$T/client.out" 2>&1 ||
    fail "no 452: $(cat "$T/client.out")"
cat "$T/client.out"
grep -q '^REFUSED .* 452 4\.3\.1' "$T/client.out" || fail "refusal is not 452 4.3.1"
grep -q '^RSET 250' "$T/client.out" || fail "session unusable after the 452"
acked=$(load_acked)
say "   $acked messages acknowledged before the 452"
[ "$acked" -ge 10 ] && [ "$acked" -le 15 ] || fail "$acked messages of 20 KB in 300K: limit not applied"
grep -q 'rejected: spool is full' "$T/relayd.log" || fail "relayd did not log the refusal"

say "2: everything acknowledged is still spooled, intact"
relayctl stats --json > "$T/stats.json" || fail "relayctl stats failed"
python3 - "$T/stats.json" "$acked" <<'PY' || fail "stats disagree: $(cat "$T/stats.json")"
import json, sys
st = json.load(open(sys.argv[1]))
assert st["messages"] == int(sys.argv[2]), st
assert st["bytes"] <= 300 * 1024, st
PY
while read -r n qid; do
    [ "$(queue_field "$qid" size)" != "" ] || fail "acknowledged message $n ($qid) is not in the spool"
    relayctl cat "$qid" > "$T/cat.eml" || fail "relayctl cat $qid failed"
    body_of "$T/cat.eml" > "$T/cat.body"
    cmp -s "$T/bodies/$n.body" "$T/cat.body" || fail "spooled body of $n ($qid) differs from what was sent"
done < "$T/acked"

say "3: upstream back: all of them arrive"
start_postfix_upstream
wait_for_maildir_count "$acked" 40 || { relayctl list >&2 || true; fail "not all delivered"; }
wait_for_queue_empty 20 || fail "spool not empty after delivery"
while read -r n qid; do
    f=$(maildir_find "full-$n") || fail "message $n ($qid) never arrived"
    body_of "$f" > "$T/got.body"
    cmp -s "$T/bodies/$n.body" "$T/got.body" || fail "delivered body of $n differs"
done < "$T/acked"

say "4: there is room again"
make_message "$T/after.eml" "e2e after full"
relay_send "$T/after.eml" user@example.com || fail "refused after the spool drained"
wait_for_subject "e2e after full" 20 > /dev/null || fail "message after the drain not delivered"
pass
