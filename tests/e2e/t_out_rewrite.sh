#!/usr/bin/env bash
# t_out_rewrite: an upstream that only lets the account send as itself (Postfix with
# reject_authenticated_sender_login_mismatch: Microsoft 365's SendAsDenied) gets the
# device's mail with the envelope sender and From: rewritten to the account, the original
# From: kept as Reply-To:, recipients untouched except through recipient_map, body intact.
source "$(dirname "$0")/lib.sh"

make_ca
PF_DIR=$T/postfix
PF_EXTRA_MAIN="smtpd_sender_login_maps = inline:{ $SASL_LOGIN=$SASL_LOGIN }
smtpd_sender_restrictions = reject_authenticated_sender_login_mismatch"
start_postfix_upstream
printf '# devices\nscanner@lan.test %s\n' "$SASL_LOGIN" > "$T/senders.map"
printf 'alias@example.com user@example.com\n' > "$T/rcpts.map"
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "route default" "rewrite_sender_map = $T/senders.map"
relayd_conf "$T/relayd.conf" "route default" "rewrite_sender = $SASL_LOGIN"
relayd_conf "$T/relayd.conf" "route default" "rewrite_from = yes"
relayd_conf "$T/relayd.conf" "route default" "recipient_map = $T/rcpts.map"
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "rewrite"
relay_send "$T/m.eml" alias@example.com || fail "relayd did not accept the message"
f=$(wait_for_subject "rewrite" 25) || { queue_json >&2 || true;
    grep -q 'not owned by user' "$PF_DIR/maillog" && fail "the upstream refused the device's sender (SendAsDenied): not rewritten";
    fail "not delivered"; }
grep -qx "Return-Path: <$SASL_LOGIN>" "$f" || fail "envelope sender not rewritten: $(grep Return-Path "$f")"
grep -qx "From: <$SASL_LOGIN>" "$f" || fail "From: not rewritten: $(grep -i '^From:' "$f")"
grep -qx "Reply-To: <sender@lan.test>" "$f" || fail "no Reply-To: with the original From:"
grep -qx "Delivered-To: user@example.com" "$f" || fail "recipient_map not applied"
grep -qx "To: <user@example.com>" "$f" || fail "the To: header was changed"
assert_body "$f" "$T/m.eml.body"
pass
