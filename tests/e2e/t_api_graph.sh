#!/usr/bin/env bash
# t_api_graph: transport = graph.  relayctl test-upstream takes a token and reads the mailbox;
# a legacy device's message (TNCS style: HELO, no Date, no Message-ID) goes out through
# Graph sendMail (save_to_sent_items = yes; the default's draft path is t_api_graph_sent) as
# base64 MIME with relayd's repairs, under the app-only token of the token
# endpoint; of one message split between Graph and an SMTP route, a recipient only in the
# envelope is added as Bcc for the API call only, a Cc: address outside the envelope gets no
# copy, and the rest is byte for byte what the SMTP upstream got.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

start_token_server
start_api
FAKE_PORT=$(free_port)
start_fake_upstream "$FAKE_PORT" "$T/fake"
CONF=$T/relayd.conf
write_api_conf "$CONF" graph "mailbox = fax@contoso.example
save_to_sent_items = yes"
relayd_conf "$CONF" "upstream fake" "host = 127.0.0.1" "port = $FAKE_PORT" "tls = none"
relayd_conf "$CONF" "route smtp" "recipient_domain = smtp.example" "upstream = fake"

say "--check: graph upstream"
"$RELAYD_BIN" -c "$CONF" --check > "$T/check.out" 2>&1 || { cat "$T/check.out"; fail "--check failed"; }
grep -qx 'transport = graph' "$T/check.out" || fail "transport not shown"

say "relayctl test-upstream: token, then the mailbox"
timeout 60 "$RELAYCTL_BIN" -c "$CONF" test-upstream provider > "$T/probe.out" 2>&1 ||
    { cat "$T/probe.out"; fail "test-upstream failed"; }
cat "$T/probe.out"
grep -q '^\[ ok \] token (client_credentials): ok' "$T/probe.out" || fail "no token step"
grep -q '^\[ ok \] GET fax@contoso.example: HTTP 200' "$T/probe.out" || fail "no mailbox step"
grep -q '^\[ ok \] drafts: readable (HTTP 200)' "$T/probe.out" || fail "no drafts step"
grep -q '^verdict: upstream provider works: Microsoft Graph API' "$T/probe.out" || fail "no verdict"

start_relayd "$CONF"
say "1: TNCS-style message through Graph sendMail"
send_tncs_alarm "TNCS alarm 0042" "ALARM 0042 zone 3 door open"
wait_for_api 1 30 || { cat "$T/relayd.log"; fail "not delivered through Graph"; }
[ "$(api_json 1 api)" = graph-sendmail ] || fail "not sendMail"
[ "$(api_json 1 saveToSentItems)" = True ] || fail "sendMail not saved to Sent Items"
[ "$(api_json 1 mailbox)" = fax@contoso.example ] || fail "wrong mailbox: $(api_json 1 mailbox)"
[ "$(api_json 1 recipients)" = user@example.net ] || fail "recipients: $(api_json 1 recipients)"
grep -q '^Date: ' "$API_DIR/0001.eml" || fail "no Date: added"
grep -q '^Message-ID: <' "$API_DIR/0001.eml" || fail "no Message-ID: added"
grep -q '^Bcc:' "$API_DIR/0001.eml" && fail "a Bcc: for a recipient already in To:"
grep -q 'ALARM 0042 zone 3 door open' "$API_DIR/0001.eml" || fail "body lost"
grep -qE 'upstream provider: graph sendMail as fax@contoso.example: HTTP 202 \(saved to Sent Items\) \(mailbox fixed\)' \
    "$T/relayd.log" || fail "no delivery log line"
grep -qE 'to=<user@example.net> relay=provider.*status=sent' "$T/relayd.log" || fail "not logged as sent"

say "2: one message, Graph and SMTP: Bcc for the envelope-only, no copy for a Cc: outside it"
make_message "$T/m2.eml" "graph bcc"
sed -i 's/^To: <user@example.com>$/To: <user@example.com>\nCc: Member <member@example.net>/' "$T/m2.eml"
relay_send "$T/m2.eml" user@example.com,hidden@example.org,archive@smtp.example || fail "not accepted"
wait_for_api 2 30 || fail "second message not delivered through Graph"
wait_for_fake_count "$T/fake" 1 30 || fail "second message not delivered through SMTP"
[ "$(api_json 2 bcc)" = hidden@example.org ] || fail "bcc: $(api_json 2 bcc)"
[ "$(api_json 2 recipients)" = "user@example.com hidden@example.org" ] ||
    fail "recipients: $(api_json 2 recipients)"
grep -q '^Cc:' "$API_DIR/0002.eml" && fail "the Cc: outside the envelope reached Graph"
"$PY" "$E2E_SRC/tests/e2e/api_server.py" --compare "$T"/fake/msg-*.eml "$API_DIR/0002.eml" ||
    fail "the API copy differs from the SMTP copy beyond To/Cc/Bcc"
grep -qE '\(mailbox fixed\) \(.*bcc \+1' "$T/relayd.log" || fail "the log does not note the added Bcc"
grep -qE '\(mailbox fixed\) \(.*member@example.net' "$T/relayd.log" ||
    fail "the log does not note the Cc: left out"

say "3: relayctl send-test through the daemon"
rc=0
relayctl send-test provider --to ops@example.com --wait 30 > "$T/st.out" 2>&1 || rc=$?
sed 's/^/   | /' "$T/st.out"
[ "$rc" -eq 0 ] || fail "send-test exited $rc"
grep -q '^result: delivered' "$T/st.out" || fail "send-test: not delivered"
wait_for_api 3 10 || fail "the test message was not recorded"
[ "$(api_json 3 recipients)" = ops@example.com ] || fail "test message to $(api_json 3 recipients)"
grep -q '^From: .*fax@contoso.example' "$API_DIR/0003.eml" || fail "test message not from the mailbox"
assert_no_token_in_logs
# The emulation took only the tokens the token endpoint issued for Graph's audience: a
# token it never issued is refused as Graph refuses it.
code=$(curl -sS --max-time 10 --cacert "$T/ca/ca.pem" -o /dev/null -w '%{http_code}' \
    -H 'Authorization: Bearer at-never-issued' "https://127.0.0.1:$API_PORT/v1.0/users/fax@contoso.example")
[ "$code" = 401 ] || fail "a token never issued got HTTP $code from the Graph emulation, want 401"
pass
