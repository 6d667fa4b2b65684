#!/usr/bin/env bash
# t_api_gmail: transport = gmail, the token from oauth2_token_command (the emulation checks
# that exact bearer token).  A small message goes as {"raw": base64url} to messages/send, a
# legacy device's message (TNCS style: HELO, no Date, no Message-ID) arrives with relayd's
# repairs, a 10 MB scan goes through the media upload endpoint (message/rfc822), each
# byte-identical apart from the Bcc: relayd adds for an envelope-only recipient.  The first
# send gets 403 insufficientPermissions: held (no bounce), the log says what to grant.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

TOKEN=ya29.e2e-gmail-token
start_api --token "$TOKEN" \
    --fault 'messages/send=403:1:code=insufficientPermissions:message=Request had insufficient authentication scopes.'
CONF=$T/relayd.conf
write_oauth2_conf "$CONF" "auth = xoauth2
oauth2_token_command = printf '%s\\n' $TOKEN
transport = gmail
api_url = https://127.0.0.1:$API_PORT"

say "relayctl test-upstream"
timeout 60 "$RELAYCTL_BIN" -c "$CONF" test-upstream provider > "$T/probe.out" 2>&1 ||
    { cat "$T/probe.out"; fail "test-upstream failed"; }
grep -q '^verdict: upstream provider works: Gmail API' "$T/probe.out" || { cat "$T/probe.out"; fail "no verdict"; }

start_relayd "$CONF"
say "1: raw"
api_relay 1 "gmail raw"
[ "$(api_json 1 api)" = gmail-raw ] || fail "not raw: $(api_json 1 api)"
[ "$(api_json 1 mailbox)" = "$MAILBOX" ] || fail "mailbox: $(api_json 1 mailbox)"
body_of "$API_DIR/0001.eml" > "$T/got1.body"
cmp "$T/got1.body" "$T/m1.eml.body" || fail "raw body changed"
grep -q ' 200$' "$API_DIR/requests.log" || fail "no request was accepted"
grep -q ' 401$' "$API_DIR/requests.log" && fail "a request had the wrong bearer token"
grep -q 'messages/send 403$' "$API_DIR/requests.log" || fail "the 403 fault did not fire"
grep -qE "upstream provider: gmail raw as $MAILBOX: HTTP 200 \(mailbox fixed\)" "$T/relayd.log" ||
    fail "no raw log line"
grep -qE 'upstream provider: unhealthy.*HTTP 403 insufficientPermissions.*domain-wide delegation.*gmail.send' \
    "$T/relayd.log" || fail "the 403 did not hold with what to grant"
grep -q 'bounced' "$T/relayd.log" && fail "the 403 bounced"

say "2: TNCS-style message (HELO, no Date, no Message-ID)"
send_tncs_alarm "TNCS alarm 0043" "ALARM 0043 zone 1 power restored"
wait_for_api 2 30 || { cat "$T/relayd.log"; fail "TNCS message not delivered"; }
[ "$(api_json 2 api)" = gmail-raw ] || fail "not raw"
[ "$(api_json 2 recipients)" = user@example.net ] || fail "recipients: $(api_json 2 recipients)"
grep -q '^Date: ' "$API_DIR/0002.eml" || fail "no Date: added"
grep -q '^Message-ID: <' "$API_DIR/0002.eml" || fail "no Message-ID: added"

say "3: a 10 MB scan through the media upload"
python3 - "$T/m2.eml" <<'PY'
import base64, os, sys
pdf = b"%PDF-1.4\n" + os.urandom(7_500_000)
b64 = base64.encodebytes(pdf).decode().replace("\n", "\r\n")
msg = ("From: <scanner@lan.test>\r\nTo: <user@example.com>\r\nSubject: gmail media\r\n"
       "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
       "--b1\r\nContent-Type: text/plain\r\n\r\nscan attached\r\n"
       "--b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n"
       "Content-Transfer-Encoding: base64\r\n"
       "Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n" + b64 + "--b1--")
open(sys.argv[1], "w", newline="").write(msg)
PY
relay_send "$T/m2.eml" user@example.com,archive@example.org || fail "large message not accepted"
wait_for_api 3 60 || { cat "$T/relayd.log"; fail "large message not delivered"; }
[ "$(api_json 3 api)" = gmail-upload ] || fail "not media upload: $(api_json 3 api)"
[ "$(api_json 3 bcc)" = archive@example.org ] || fail "bcc: $(api_json 3 bcc)"
python3 - "$API_DIR/0003.eml" "$T/m2.eml" <<'PY' || fail "the scan changed on the way"
import sys
got = open(sys.argv[1], "rb").read()
want = open(sys.argv[2], "rb").read()
i, j = got.find(b"\r\n\r\n"), want.find(b"\r\n\r\n")
sys.exit(0 if got[i:] == want[j:] + b"\r\n" or got[i:] == want[j:] else 1)
PY
grep -qE "gmail media as $MAILBOX: HTTP 200 \(mailbox fixed\) \(bcc \+1\)" "$T/relayd.log" ||
    fail "no media log line"
grep -qF "$TOKEN" "$T/relayd.log" "$T/probe.out" && fail "a token appears in a log"
pass
