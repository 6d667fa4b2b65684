#!/usr/bin/env bash
# t_out_no_starttls: an upstream that does not offer STARTTLS (but would take AUTH in
# cleartext) with tls = starttls in relayd: no AUTH is sent, no mail, the message is
# deferred and the reason names STARTTLS.
source "$(dirname "$0")/lib.sh"

make_ca
PF_DIR=$T/postfix
PF_PORT=$(free_port)
P2=$(free_port)
PF_EXTRA_MASTER=$(pf_service "$P2" plain smtpd_tls_security_level=none smtpd_tls_auth_only=no)
PF_EXTRA_PORTS=$P2
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
relayd_conf_pf_upstream "$T/relayd.conf" plain "$P2" starttls
start_relayd "$T/relayd.conf"

make_message "$T/m.eml" "no starttls"
relay_send "$T/m.eml" user@example.com || fail "relayd did not accept the message"
id=$(wait_for_attempt 30) || { queue_json >&2 || true; fail "no delivery attempt recorded"; }
state=$(queue_field "$id" state)
err=$(queue_field "$id" last_error)
say "   $id is $state: $err"
case $state in deferred|held) ;; *) fail "state is '$state', want deferred (or held)" ;; esac
printf '%s' "$err" | grep -q 'STARTTLS' || fail "the reason does not mention STARTTLS: '$err'"
grep -q 'postfix/plain/smtpd.*connect from' "$PF_DIR/maillog" ||
    fail "relayd never reached the STARTTLS-less service"
postfix_saw_auth && fail "relayd sent AUTH to an upstream without TLS"
# smtpd's "disconnect from ... ehlo=1 quit=1" line counts every command it got.
grep -qE 'postfix/plain/smtpd.*disconnect from .* (mail|rcpt|data)=' "$PF_DIR/maillog" &&
    fail "relayd sent MAIL, RCPT or DATA to an upstream without TLS"
sleep 1
[ "$(maildir_count)" -eq 0 ] || fail "mail was delivered without TLS"
pass
