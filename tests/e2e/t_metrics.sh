#!/usr/bin/env bash
# t_metrics (issue #11 item 5): /metrics counts known mail exactly (3 delivered, 1 bounced
# by the upstream, 1 refused inbound) and passes promtool; /healthz is 200 "ok", 503 while
# drained, 503 naming an unhealthy upstream and 503 when the spool directory is gone; a
# client outside metrics_allow gets 403; other paths 404, other methods 405.
source "$(dirname "$0")/lib.sh"

UP=$(free_port)
MP=$(free_port)
start_fake_upstream "$UP" "$T/up" --rcpt-reply 'bad@example.com=550 5.1.1 <bad@example.com>: no such user'
write_fake_relayd_conf "$T/relayd.conf" "$UP"
relayd_conf "$T/relayd.conf" relayd "metrics = 127.0.0.1:$MP" "metrics_allow = 127.0.0.1/32" \
    "bounces = no" "health_max_age = 1h"
relayd_conf "$T/relayd.conf" "listener lan" "recipient_domains = example.com, strict.test"
# An upstream that requires STARTTLS from a server that does not offer it: a configuration
# fault, so it turns unhealthy (used last).
relayd_conf "$T/relayd.conf" "upstream strict" "host = 127.0.0.1" "port = $UP" "tls = starttls" \
    "ca_file = $T/ca/ca.pem" "connect_timeout = 5s"
relayd_conf "$T/relayd.conf" "route strict" "recipient_domain = strict.test" "upstream = strict"
start_relayd "$T/relayd.conf"

URL=http://127.0.0.1:$MP
scrape() { curl -sS --max-time 10 "$URL/metrics" > "$T/metrics.txt" || fail "scrape failed"; }
# metric 'NAME{LABELS}' -> its value (empty when absent)
metric() { awk -v k="$1" '$1 == k { print $2 }' "$T/metrics.txt"; }
expect_metric() {
    local got
    got=$(metric "$1")
    [ "$got" = "$2" ] || { cat "$T/metrics.txt" >&2; fail "$1 = '$got', want $2"; }
}
healthz() { curl -sS --max-time 10 -o "$T/health.txt" -w '%{http_code}' "$URL/healthz"; }

code=$(healthz)
[ "$code" = 200 ] && [ "$(cat "$T/health.txt")" = ok ] || fail "/healthz at start: $code $(cat "$T/health.txt")"

for i in 1 2 3; do
    make_message "$T/m$i.eml" "metrics $i"
    relay_send "$T/m$i.eml" user@example.com || fail "message $i not accepted"
done
make_message "$T/bad.eml" "metrics bounced"
relay_send "$T/bad.eml" bad@example.com || fail "the message to bad@ not accepted"
make_message "$T/rej.eml" "metrics rejected"
relay_send "$T/rej.eml" user@elsewhere.test && fail "a recipient outside recipient_domains was accepted"
wait_for_fake_count "$T/up" 3 20 || fail "3 messages not delivered"
log_wait 'to=<bad@example.com> .*status=bounced' 20 || fail "the message to bad@ did not bounce"

scrape
expect_metric 'relayd_messages_received_total{listener="lan"}' 4
expect_metric 'relayd_recipients_delivered_total{upstream="fake"}' 3
expect_metric 'relayd_recipients_bounced_total{upstream="fake",reason="permanent"}' 1
expect_metric 'relayd_smtpd_rejected_total{listener="lan",reason="recipient_domain"}' 1
expect_metric 'relayd_delivery_latency_seconds_count' 3
expect_metric 'relayd_delivery_latency_seconds_bucket{le="+Inf"}' 3
expect_metric 'relayd_queue_messages{state="queued"}' 0
expect_metric 'relayd_queue_messages{state="failed"}' 1
# A failed message is kept for inspection, not waiting for delivery: it has no age here.
expect_metric 'relayd_queue_oldest_message_age_seconds' 0
expect_metric 'relayd_upstream_healthy{upstream="fake"}' 1
expect_metric 'relayd_upstream_healthy{upstream="strict"}' 1
expect_metric 'relayd_accepting' 1
expect_metric 'relayd_spool_fault' 0
[ "$(metric relayd_spool_commits_total)" -gt 0 ] || fail "no spool commits counted"
promtool check metrics < "$T/metrics.txt" > "$T/promtool.log" 2>&1 ||
    { cat "$T/promtool.log" >&2; fail "promtool check metrics failed"; }
say "scrape: counters as expected; promtool check metrics: ok"

# Who may scrape, and what else is answered.
code=$(curl -sS --max-time 10 --interface 127.0.0.2 -o /dev/null -w '%{http_code}' "$URL/metrics") || true
[ "$code" = 403 ] || fail "a client outside metrics_allow got $code, want 403"
grep -q 'metrics: connection from 127.0.0.2 refused' "$T/relayd.log" || fail "no log line for the refused scrape"
code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$URL/nope")
[ "$code" = 404 ] || fail "/nope got $code, want 404"
code=$(curl -sS --max-time 10 -X POST -o /dev/null -w '%{http_code}' "$URL/metrics")
[ "$code" = 405 ] || fail "POST got $code, want 405"

# Drained: /healthz says so, new SMTP connections get 421, mail is refused; resume undoes it.
relayctl drain > "$T/ctl.out" || fail "relayctl drain failed: $(cat "$T/ctl.out")"
code=$(healthz)
[ "$code" = 503 ] && grep -q '^draining' "$T/health.txt" || fail "/healthz while drained: $code $(cat "$T/health.txt")"
printf '%s\n' '<~ ^421 4\.3\.2 .*draining' eof | smtp_dialogue > /dev/null || fail "a new connection while drained did not get 421 4.3.2"
relayctl daemon-status | grep -q 'draining' || fail "daemon-status does not say draining"
relayctl resume > "$T/ctl.out" || fail "relayctl resume failed"
code=$(healthz)
[ "$code" = 200 ] || fail "/healthz after resume: $code $(cat "$T/health.txt")"

# An unhealthy upstream fails /healthz with its name and reason.
make_message "$T/s.eml" "metrics strict"
relay_send "$T/s.eml" user@strict.test || fail "the message for strict.test not accepted"
log_wait 'upstream strict: unhealthy' 15 || fail "upstream strict did not turn unhealthy"
code=$(healthz)
[ "$code" = 503 ] && grep -q '^upstream strict unhealthy: upstream does not offer STARTTLS' "$T/health.txt" ||
    fail "/healthz with an unhealthy upstream: $code $(cat "$T/health.txt")"
scrape
expect_metric 'relayd_upstream_healthy{upstream="strict"}' 0
expect_metric 'relayd_smtpd_rejected_total{listener="lan",reason="draining"}' 1
expect_metric 'relayd_smtpd_sessions' 0
expect_metric 'relayd_tls_failures_total{direction="outbound",peer="strict",reason="config"}' 1
say "healthz: ok, draining, unhealthy upstream as expected"

# A spool directory that is gone (or read-only) fails /healthz before any mail finds out.
mv "$T/spool" "$T/spool.away"
code=$(healthz)
mv "$T/spool.away" "$T/spool"
[ "$code" = 503 ] && grep -q "^spool unwritable: $T/spool: No such file or directory" "$T/health.txt" ||
    fail "/healthz without its spool directory: $code $(cat "$T/health.txt")"
pass
