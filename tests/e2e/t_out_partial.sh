#!/usr/bin/env bash
# t_out_partial: one recipient refused with 550 and one accepted with 250 in the same
# transaction: the accepted one gets exactly one copy (never resent on later attempts), the
# refused one is failed with the upstream's reply; a DSN to the sender is noted if sent.
source "$(dirname "$0")/lib.sh"

PORT=$(free_port)
start_fake_upstream "$PORT" "$T/fake" --rcpt-reply 'bad@example.com=550 5.1.1 <bad@example.com>: Recipient address rejected: no such user'
write_fake_relayd_conf "$T/relayd.conf" "$PORT"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "partial"
relay_send "$T/m.eml" good@example.com,bad@example.com || fail "relayd did not accept the message"
wait_for_fake_count "$T/fake" 1 20 || { queue_json >&2 || true; fail "nothing arrived"; }
# retry_first 2s, retry_max 4s: wait through several retry intervals.
sleep 8
good=$(cat "$T"/fake/msg-*.env | grep -c '^to good@example.com$' || true)
bad=$(cat "$T"/fake/msg-*.env | grep -c '^to bad@example.com$' || true)
say "   copies for good@: $good, for bad@: $bad"
[ "$good" -eq 1 ] || fail "good@example.com got $good copies, want exactly 1"
[ "$bad" -eq 0 ] || fail "bad@example.com was delivered"
rcpt_bad=$(grep -c 'RCPT TO:<bad@example.com>' "$T/fake/conn.log" || true)
[ "$rcpt_bad" -eq 1 ] || fail "RCPT TO:<bad@example.com> sent $rcpt_bad times: a 550 must not be retried"
grep -qE 'to=<good@example.com> .*status=sent \(250' "$T/relayd.log" || fail "no status=sent for good@"
grep -qE 'to=<bad@example.com> .*status=(bounced|failed).*550 5\.1\.1' "$T/relayd.log" ||
    fail "no bounced/failed line with the 550 reply for bad@"
id=$(queue_ids | head -n 1) || true
if [ -n "$id" ]; then
    st=$(queue_field "$id" state)
    say "   $id stays in the spool as $st"
    [ "$st" = failed ] || fail "the message is '$st', want failed (or removed after a DSN)"
    relayctl show "$id" | grep -q '550 5.1.1' || fail "relayctl show lacks the 550 reply"
fi
if grep -l '^from <>' "$T"/fake/msg-*.env > /dev/null 2>&1; then
    say "   a DSN (MAIL FROM:<>) was sent to the sender"
else
    say "   note: no DSN was sent (bounces not implemented, or not routed here)"
fi
pass
