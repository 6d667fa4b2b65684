#!/usr/bin/env bash
# t_api_graph_large: a 10 MB fax scan (a PDF attachment, over sendMail's 4 MB) goes through
# Graph's large-message path: a draft with the text body (tagged X-Relayd-Queue-Id), the PDF
# through an upload session in 320 KiB-multiple chunks (no Authorization on the upload URL), a
# small second attachment as a fileAttachment, then send.  The first attempt fails at
# createUploadSession (500): its draft is deleted and the retry delivers.  The attachments
# arrive with their sha256, the Bcc for an envelope-only recipient stays, and no draft is
# left behind.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

start_token_server
start_api --fault 'createUploadSession=500:1:code=InternalServerError:message=try later'
CONF=$T/relayd.conf
write_api_conf "$CONF" graph "mailbox = fax@contoso.example"
start_relayd "$CONF"

say "a 10 MB scan"
python3 - "$T/scan.eml" "$T/scan.sha256" <<'PY'
import base64, hashlib, os, sys
pdf = b"%PDF-1.4\n" + os.urandom(10 * 1024 * 1024) + b"\n%%EOF\n"
logo = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
b64 = lambda d: base64.encodebytes(d).decode().replace("\n", "\r\n")
msg = ("From: Scanner <scanner@lan.test>\r\nTo: <user@example.com>\r\nSubject: fax scan\r\n"
       "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
       "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nA fax from 555-0100.\r\n"
       "--b1\r\nContent-Type: application/pdf; name=\"fax-0042.pdf\"\r\n"
       "Content-Transfer-Encoding: base64\r\n"
       "Content-Disposition: attachment; filename=\"fax-0042.pdf\"\r\n\r\n" + b64(pdf) +
       "--b1\r\nContent-Type: image/png; name=\"logo.png\"\r\n"
       "Content-Transfer-Encoding: base64\r\n"
       "Content-Disposition: attachment; filename=\"logo.png\"\r\n\r\n" + b64(logo) + "--b1--\r\n")
open(sys.argv[1], "w", newline="").write(msg)
open(sys.argv[2], "w").write("%s %s\n" % (hashlib.sha256(pdf).hexdigest(), hashlib.sha256(logo).hexdigest()))
PY
relay_send "$T/scan.eml" user@example.com,archive@example.org || fail "the scan was not accepted"
wait_for_api 1 60 || { cat "$T/relayd.log"; fail "the scan was not delivered"; }
[ "$(api_json 1 api)" = graph-draft ] || fail "not the draft path: $(api_json 1 api)"
[ "$(api_json 1 recipients)" = "user@example.com archive@example.org" ] ||
    fail "recipients: $(api_json 1 recipients)"
python3 - "$API_DIR/0001.json" "$T/scan.sha256" <<'PY' || fail "attachments differ"
import json, sys
j = json.load(open(sys.argv[1]))
want = open(sys.argv[2]).read().split()
got = {a["name"]: a for a in j["attachments"]}
print("attachments:", [(a["name"], a["contentType"], a["size"]) for a in j["attachments"]])
assert got["fax-0042.pdf"]["sha256"] == want[0] and got["fax-0042.pdf"]["contentType"] == "application/pdf"
assert got["logo.png"]["sha256"] == want[1]
assert j["queueId"], "no queue id on the draft"
PY
grep -q 'PUT /upload/' "$API_DIR/requests.log" || fail "no upload session"
grep -c 'PUT /upload/.* 200$' "$API_DIR/requests.log" | grep -qx 3 || fail "not 4 chunks: $(grep PUT "$API_DIR/requests.log")"
grep -q 'attachments 201$' "$API_DIR/requests.log" || fail "the small attachment was not a fileAttachment"
grep -q '/send 202$' "$API_DIR/requests.log" || fail "no send"
grep -q 'createUploadSession 500$' "$API_DIR/requests.log" || fail "the fault did not fire"
grep -qE '^DELETE /v1.0/users/fax@contoso.example/messages/[^/ ]+ 204$' "$API_DIR/requests.log" ||
    fail "the failed attempt's draft was not deleted"
[ "$(grep -c '/send 202$' "$API_DIR/requests.log")" = 1 ] || fail "sent more than once"
grep -qE 'status=deferred \(graph draft\+upload \(createUploadSession\) as fax@contoso.example: HTTP 500 InternalServerError: try later\)' \
    "$T/relayd.log" || fail "the failed attempt is not logged as deferred with its step"
grep -q 'A fax from 555-0100' "$API_DIR/0001.eml" || fail "the text body is not in the draft"
[ "$(cat "$API_DIR/drafts.json")" = "[]" ] || fail "drafts left: $(cat "$API_DIR/drafts.json")"
[ "$(api_json 1 saveToSentItems)" = False ] || fail "saved to Sent Items (save_to_sent_items = no)"
grep -qE '^PATCH /v1.0/users/fax@contoso.example/messages/[^/ ]+ 200$' "$API_DIR/requests.log" ||
    fail "the draft was not marked delete-after-submit"
grep -qE 'graph draft\+upload as fax@contoso.example: HTTP 202 \(2 attachments, [0-9]+ bytes; not saved to Sent Items\) \(mailbox fixed\)' \
    "$T/relayd.log" || fail "no delivery log line"
pass
