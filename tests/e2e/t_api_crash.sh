#!/usr/bin/env bash
# t_api_crash: relayd killed (SIGKILL) in the middle of a Graph upload session.  After the
# restart the message is delivered exactly once: the draft the killed attempt left (tagged
# with the queue id) is found and deleted, a new draft is uploaded and sent.  The only window
# for a duplicate is the final POST .../send, as with SMTP's final dot.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

start_token_server
start_api --delay 'upload/=2'
CONF=$T/relayd.conf
write_api_conf "$CONF" graph "mailbox = fax@contoso.example"
start_relayd "$CONF"

python3 - "$T/scan.eml" <<'PY'
import base64, os, sys
pdf = b"%PDF-1.4\n" + os.urandom(4 * 1024 * 1024)
msg = ("From: <scanner@lan.test>\r\nTo: <user@example.com>\r\nSubject: crash scan\r\n"
       "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
       "--b1\r\nContent-Type: text/plain\r\n\r\nscan\r\n"
       "--b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n"
       "Content-Transfer-Encoding: base64\r\n"
       "Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n" +
       base64.encodebytes(pdf).decode().replace("\n", "\r\n") + "--b1--\r\n")
open(sys.argv[1], "w", newline="").write(msg)
PY
relay_send "$T/scan.eml" user@example.com || fail "not accepted"

say "kill -9 while the first chunk is being uploaded"
for ((i = 0; i < 100; i++)); do
    grep -q 'createUploadSession 201$' "$API_DIR/requests.log" && break
    sleep 0.1
done
grep -q 'createUploadSession 201$' "$API_DIR/requests.log" || { cat "$T/relayd.log"; fail "no upload session"; }
sleep 0.5 # the first PUT is in flight: the emulation answers it 2 s late
kill -KILL "$RELAYD_PID"
wait "$RELAYD_PID" 2>/dev/null || true
RELAYD_PID=
[ "$(api_count)" = 0 ] || fail "delivered before the kill"
python3 -c 'import json,sys; sys.exit(len(json.load(open(sys.argv[1]))) != 1)' "$API_DIR/drafts.json" ||
    fail "no draft left by the killed attempt: $(cat "$API_DIR/drafts.json")"

say "restart: the stale draft is deleted, the message sent once"
start_relayd "$CONF"
wait_for_api 1 60 || { cat "$T/relayd.log"; fail "not delivered after the restart"; }
sleep 1
[ "$(api_count)" = 1 ] || fail "delivered $(api_count) times"
[ "$(cat "$API_DIR/drafts.json")" = "[]" ] || fail "drafts left: $(cat "$API_DIR/drafts.json")"
grep -qE 'deleting draft .* left by an earlier attempt' "$T/relayd.log" || fail "the stale draft was not deleted"
[ "$(grep -c '/send 202$' "$API_DIR/requests.log")" = 1 ] || fail "more than one send"
pass
