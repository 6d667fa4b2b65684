#!/usr/bin/env bash
# t_out_implicit_tls: an upstream with implicit TLS (a Postfix smtpd with
# smtpd_tls_wrappermode, the "smtps" port 465 style) gets the mail with the certificate
# verified and AUTH inside TLS; relayd's log line names the upstream, the TLS version and
# cipher, the verification result and the upstream's own reply.
source "$(dirname "$0")/lib.sh"

make_ca
PF_DIR=$T/postfix
PF_PORT=$(free_port)
P2=$(free_port)
PF_EXTRA_MASTER=$(pf_service "$P2" smtps smtpd_tls_wrappermode=yes)
PF_EXTRA_PORTS=$P2
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
relayd_conf_pf_upstream "$T/relayd.conf" smtps "$P2" implicit
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "implicit tls"
relay_send "$T/m.eml" user@example.com || fail "relayd did not accept the message"
f=$(wait_for_subject "implicit tls" 30) || { queue_json >&2 || true; fail "not delivered over implicit TLS"; }
assert_body "$f" "$T/m.eml.body"
grep -q 'postfix/smtps/smtpd.*sasl_username=relay@example.com' "$PF_DIR/maillog" ||
    fail "the smtps service logged no authenticated client"
grep -qE 'postfix/smtps/smtpd.*TLS connection established' "$PF_DIR/maillog" ||
    fail "the smtps service logged no TLS connection"
line=$(grep -E 'to=<user@example.com> relay=smtps\[localhost\]:'"$P2"'.*status=sent' "$T/relayd.log" |
    head -n 1) || true
say "   log: ${line#*: }"
[ -n "$line" ] || fail "no status=sent line naming upstream smtps"
printf '%s' "$line" | grep -qE 'tls=TLSv1\.[23]' || fail "log line lacks the TLS version"
printf '%s' "$line" | grep -qE 'cipher' || fail "log line lacks the cipher"
printf '%s' "$line" | grep -qE 'status=sent \(250 2\.0\.0 Ok: queued as [0-9A-Za-z]+\)' ||
    fail "log line lacks the upstream's 250 reply"
printf '%s' "$line" | grep -qiE 'verif' ||
    fail "log line lacks the certificate verification result (issue: 'verification result')"
pass
