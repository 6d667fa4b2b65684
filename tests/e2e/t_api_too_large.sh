#!/usr/bin/env bash
# t_api_too_large: a 36 MB message is over the Gmail API's 35 MB.  On a route whose Gmail
# upstream has an SMTP failover, the failover takes it; on a route without one it fails,
# and the DSN says why.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

TOKEN=ya29.e2e-gmail-token
start_api --token "$TOKEN"
FAKE_PORT=$(free_port)
start_fake_upstream "$FAKE_PORT" "$T/fake"
CONF=$T/relayd.conf
write_oauth2_conf "$CONF" "auth = xoauth2
oauth2_token_command = printf '%s\\n' $TOKEN
transport = gmail
api_url = https://127.0.0.1:$API_PORT"
relayd_conf "$CONF" relayd "max_message_size = 40M"
relayd_conf "$CONF" "upstream fake" "host = 127.0.0.1" "port = $FAKE_PORT" "tls = none"
relayd_conf "$CONF" "route default" "failover = fake"
relayd_conf "$CONF" "route nofail" "recipient_domain = nofail.example" "upstream = provider"
start_relayd "$CONF"

python3 - "$T/big.eml" <<'PY'
import base64, os, sys
data = os.urandom(27 * 1024 * 1024)
msg = ("From: <scanner@lan.test>\r\nTo: <user@example.com>\r\nSubject: huge scan\r\n"
       "MIME-Version: 1.0\r\nContent-Type: application/pdf\r\n"
       "Content-Transfer-Encoding: base64\r\n\r\n" +
       base64.encodebytes(data).decode().replace("\n", "\r\n"))
open(sys.argv[1], "w", newline="").write(msg)
PY
relay_send "$T/big.eml" user@example.com,user@nofail.example || fail "not accepted"
log_wait 'to=<user@example.com> relay=fake.*status=sent' 60 || { cat "$T/relayd.log"; fail "the failover did not take it"; }
grep -q 'to user@example.com' "$T"/fake/msg-*.env || fail "wrong recipient through the failover"
grep -q 'to user@nofail.example' "$T"/fake/msg-*.env && fail "the route without failover used it"
log_wait 'to=<user@nofail.example> .*status=bounced \(gmail media as .*too large for the Gmail API' 30 ||
    fail "not bounced with the reason"
wait_for_api 1 30 || fail "no DSN went out"
[ "$(api_json 1 recipients)" = sender@lan.test ] || fail "DSN to $(api_json 1 recipients)"
grep -q "large for the Gmail API" "$API_DIR/0001.eml" || fail "the DSN lacks the reason"
grep -qE 'upload/gmail.* 413' "$API_DIR/requests.log" && fail "relayd sent more than the API takes"
pass
