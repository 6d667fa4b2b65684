#!/usr/bin/env bash
# t_relay_basic: a message submitted to relayd reaches the real Postfix upstream over
# STARTTLS + AUTH and lands in its Maildir with the body byte for byte as sent; a message
# for two recipients arrives for both; the queue is empty afterwards.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

say "1: one message, one recipient, awkward body"
make_message "$T/m1.eml" "e2e basic one"
relay_send "$T/m1.eml" user@example.com || fail "relayd did not accept the message (swaks.log)"
wait_for_maildir_count 1 30 || fail "message 1 not delivered upstream within 30s"
got=$(maildir_files | head -n 1)
body_of "$got" > "$T/m1.got"
if ! cmp -s "$T/m1.eml.body" "$T/m1.got"; then
    diff -u "$T/m1.eml.body" "$T/m1.got" | head -n 40 >&2 || true
    fail "message 1 body changed on the way"
fi
grep -q '^Subject: e2e basic one$' "$got" || fail "Subject header lost"
grep -q '^Return-Path: <sender@lan.test>$' "$got" || fail "envelope sender not kept"
grep -q '^Delivered-To: user@example.com$' "$got" || fail "envelope recipient not kept"
grep -qi '^Received: .*relay\.test' "$got" || say "note: no Received header naming relay.test"
grep -q 'sasl_username=relay@example.com' "$PF_DIR/maillog" ||
    fail "upstream did not see an authenticated session"
grep -q 'TLS connection established' "$PF_DIR/maillog" || fail "upstream saw no TLS"
say "   body identical ($(wc -c < "$T/m1.got") bytes), authenticated over TLS"
# A healthy upstream takes the message on the first try.
if grep -q 'status=deferred' "$T/relayd.log"; then
    grep 'status=deferred' "$T/relayd.log" >&2
    fail "delivery to a healthy upstream was deferred"
fi

wait_for_queue_empty 15 || { queue_json >&2 || true; fail "queue not empty after delivery"; }
sleep 1
[ "$(maildir_count)" -eq 1 ] || fail "message 1 delivered $(maildir_count) times, want once"

say "2: one message, two recipients in two domains"
make_message "$T/m2.eml" "e2e basic two"
relay_send "$T/m2.eml" user@example.com,other@example.net ||
    fail "relayd did not accept message 2"
wait_for_maildir_count 3 30 || fail "message 2 not delivered to both recipients within 30s"
n=0
for f in $(maildir_files); do
    grep -q '^Subject: e2e basic two$' "$f" || continue
    body_of "$f" > "$T/m2.got"
    cmp -s "$T/m2.eml.body" "$T/m2.got" || fail "message 2 body changed on the way ($f)"
    n=$((n + 1))
done
[ "$n" -eq 2 ] || fail "message 2 arrived $n times, want 2"
grep -q '^Delivered-To: other@example.net$' $(maildir_files) ||
    fail "other@example.net got nothing"

say "3: the queue is empty once delivered, and nothing arrived twice"
wait_for_queue_empty 15 || { queue_json >&2 || true; fail "queue not empty after delivery"; }
sleep 1
[ "$(maildir_count)" -eq 3 ] || fail "$(maildir_count) deliveries in the Maildir, want 3"
pass
