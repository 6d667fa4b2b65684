#!/usr/bin/env bash
# t_api_emulator: the HTTPS emulation of Graph and Gmail (tests/e2e/api_server.py) that the
# HTTP transport's tests rely on, checked with curl alone: a Graph sendMail and a Gmail raw
# send are stored byte-identical with their recipients (Bcc included), a draft gets a
# 2-chunk upload session and is sent, faults answer with their status and Retry-After
# a given number of times, the bearer token and the upload URL's "no Authorization" rule are
# enforced, 413 above 4 MiB, a fifth concurrent request per mailbox gets 429 and SIGTERM
# stops it.  No relayd.
source "$(dirname "$0")/lib.sh"

make_ca
API_PORT=$(free_port)
API_DIR=$T/api
TOKEN=e2e-bearer-token
mkdir -p "$API_DIR"
/usr/bin/python3 "$E2E_SRC/tests/e2e/api_server.py" --port "$API_PORT" \
    --cert "$T/ca/server.pem" --key "$T/ca/server.key" --state-dir "$API_DIR" \
    --token "$TOKEN" --ready-file "$T/api.ready" \
    --fault 'users/busy@corp\.example/sendMail=429:2:retry-after=3' \
    --fault 'users/denied@corp\.example=403:code=ErrorAccessDenied:message=Access is denied: check credentials' \
    --delay 'users/slow@corp\.example$=2' \
    > "$T/api_server.log" 2>&1 &
API_PID=$!
E2E_PIDS+=("$API_PID")
for ((i = 0; i < 50; i++)); do
    [ -f "$T/api.ready" ] && break
    pid_alive "$API_PID" || { cat "$T/api_server.log" >&2; fail "api_server.py exited"; }
    sleep 0.2
done
[ -f "$T/api.ready" ] || fail "api_server.py not ready after 10 s"
BASE=https://127.0.0.1:$API_PORT
say "emulator on $BASE (pid $API_PID)"

# api METHOD PATH [curl args]: prints the HTTP status; the body goes to $T/body, headers to
# $T/headers.
api() {
    local method=$1 path=$2
    shift 2
    curl -sS --max-time 20 --cacert "$T/ca/ca.pem" -X "$method" -o "$T/body" \
        -D "$T/headers" -w '%{http_code}' "$@" "$BASE$path"
}
auth=(-H "Authorization: Bearer $TOKEN")

printf 'From: "Fax" <fax@corp.example>\r\nTo: a@x.example\r\nBcc: hidden@y.example\r\nSubject: scan\r\n\r\nbody line\r\n' \
    > "$T/msg.eml"

# Graph sendMail: base64 MIME, stored as received, Bcc a recipient.
base64 -w0 "$T/msg.eml" > "$T/msg.b64"
st=$(api POST /v1.0/users/fax@corp.example/sendMail "${auth[@]}" -H 'Content-Type: text/plain' \
    --data-binary @"$T/msg.b64")
[ "$st" = 202 ] || fail "sendMail answered $st: $(cat "$T/body")"
cmp -s "$T/msg.eml" "$API_DIR/0001.eml" || fail "0001.eml is not the MIME sent"
python3 - "$API_DIR/0001.json" <<'EOF' || fail "0001.json is wrong: $(cat "$API_DIR/0001.json")"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["api"] == "graph-sendmail" and j["mailbox"] == "fax@corp.example", j
assert j["recipients"] == ["a@x.example", "hidden@y.example"] and j["bcc"] == ["hidden@y.example"], j
EOF
grep -qx 'POST /v1.0/users/fax@corp.example/sendMail 202' "$API_DIR/requests.log" ||
    fail "requests.log lacks the sendMail line"

# The bearer token is checked.
st=$(api POST /v1.0/users/fax@corp.example/sendMail -H 'Authorization: Bearer wrong' \
    -H 'Content-Type: text/plain' --data-binary @"$T/msg.b64")
[ "$st" = 401 ] || fail "a wrong token got $st"

# Gmail raw: base64url without padding.
python3 -c 'import base64,sys; print("{\"raw\": \"%s\"}" % base64.urlsafe_b64encode(open(sys.argv[1],"rb").read()).decode().rstrip("="))' \
    "$T/msg.eml" > "$T/gmail.json"
st=$(api POST /gmail/v1/users/me/messages/send "${auth[@]}" -H 'Content-Type: application/json' \
    --data-binary @"$T/gmail.json")
[ "$st" = 200 ] || fail "gmail send answered $st: $(cat "$T/body")"
grep -q '"SENT"' "$T/body" || fail "gmail send reply: $(cat "$T/body")"
cmp -s "$T/msg.eml" "$API_DIR/0002.eml" || fail "0002.eml is not the MIME sent"
grep -q '"api": "gmail-raw"' "$API_DIR/0002.json" || fail "0002.json: $(cat "$API_DIR/0002.json")"

# Faults: two 429 with Retry-After, then accepted; a 403 with its code.
for n in 1 2; do
    st=$(api POST /v1.0/users/busy@corp.example/sendMail "${auth[@]}" \
        -H 'Content-Type: text/plain' --data-binary @"$T/msg.b64")
    [ "$st" = 429 ] || fail "fault $n: got $st"
    grep -qi '^Retry-After: 3' "$T/headers" || fail "fault $n: no Retry-After: 3"
done
st=$(api POST /v1.0/users/busy@corp.example/sendMail "${auth[@]}" -H 'Content-Type: text/plain' \
    --data-binary @"$T/msg.b64")
[ "$st" = 202 ] || fail "after the faults: got $st"
st=$(api GET /v1.0/users/denied@corp.example "${auth[@]}")
[ "$st" = 403 ] && grep -q '"ErrorAccessDenied"' "$T/body" && grep -q 'check credentials' "$T/body" ||
    fail "403 fault: $st $(cat "$T/body")"
st=$(api GET /v1.0/users/fax@corp.example "${auth[@]}")
[ "$st" = 200 ] && grep -q '"mail": "fax@corp.example"' "$T/body" || fail "user probe: $st"

# 413 above 4 MiB of request body.
head -c $((4 * 1024 * 1024 + 4)) /dev/zero | tr '\0' 'A' > "$T/big.b64"
st=$(api POST /v1.0/users/fax@corp.example/sendMail "${auth[@]}" -H 'Content-Type: text/plain' \
    --data-binary @"$T/big.b64")
[ "$st" = 413 ] && grep -q ErrorRequestEntityTooLarge "$T/body" || fail "big sendMail: $st"

# Draft + upload session in two chunks (320 KiB + the rest) + send.
printf 'From: fax@corp.example\r\nTo: a@x.example\r\nX-Relayd-Queue-Id: 0190A3F2C1D4\r\nSubject: big\r\n\r\nsee attachment\r\n' \
    | base64 -w0 > "$T/draft.b64"
st=$(api POST /v1.0/users/fax@corp.example/messages "${auth[@]}" -H 'Content-Type: text/plain' \
    --data-binary @"$T/draft.b64")
[ "$st" = 201 ] || fail "draft: $st $(cat "$T/body")"
did=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$T/body")
filter="singleValueExtendedProperties/Any(ep:%20ep/id%20eq%20'String%20%7B00020386-0000-0000-C000-000000000046%7D%20Name%20X-Relayd-Queue-Id'%20and%20ep/value%20eq%20'0190A3F2C1D4')"
st=$(api GET "/v1.0/users/fax@corp.example/mailFolders/drafts/messages?\$filter=$filter" "${auth[@]}")
[ "$st" = 200 ] && grep -q "$did" "$T/body" || fail "draft listing: $st $(cat "$T/body")"
head -c 400000 /dev/urandom > "$T/att.bin"
size=$(stat -c %s "$T/att.bin")
printf '{"AttachmentItem":{"attachmentType":"file","name":"scan.pdf","size":%d,"contentType":"application/pdf","isInline":false}}' \
    "$size" > "$T/session.json"
st=$(api POST "/v1.0/users/fax@corp.example/messages/$did/attachments/createUploadSession" \
    "${auth[@]}" -H 'Content-Type: application/json' --data-binary @"$T/session.json")
[ "$st" = 201 ] || fail "createUploadSession: $st $(cat "$T/body")"
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["uploadUrl"])' "$T/body")
upath=${url#"$BASE"}
head -c 327680 "$T/att.bin" > "$T/chunk1"
tail -c +327681 "$T/att.bin" > "$T/chunk2"
st=$(api PUT "$upath" "${auth[@]}" -H "Content-Range: bytes 0-327679/$size" --data-binary @"$T/chunk1")
[ "$st" = 401 ] || fail "an upload URL with Authorization got $st"
st=$(api PUT "$upath" -H "Content-Range: bytes 0-327679/$size" --data-binary @"$T/chunk1")
[ "$st" = 200 ] && grep -q '"327680-"' "$T/body" || fail "chunk 1: $st $(cat "$T/body")"
st=$(api PUT "$upath" -H "Content-Range: bytes 327680-$((size - 1))/$size" --data-binary @"$T/chunk2")
[ "$st" = 201 ] || fail "chunk 2: $st $(cat "$T/body")"
st=$(api POST "/v1.0/users/fax@corp.example/messages/$did/send" "${auth[@]}" -d '')
[ "$st" = 202 ] || fail "draft send: $st $(cat "$T/body")"
sum=$(sha256sum "$T/att.bin" | cut -d' ' -f1)
python3 - "$API_DIR/0004.json" "$sum" "$size" <<'EOF' || fail "0004.json: $(cat "$API_DIR/0004.json")"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["api"] == "graph-draft" and j["queueId"] == "0190A3F2C1D4", j
a, = j["attachments"]
assert a["name"] == "scan.pdf" and a["sha256"] == sys.argv[2] and a["size"] == int(sys.argv[3]), a
EOF
st=$(api GET "/v1.0/users/fax@corp.example/mailFolders/drafts/messages" "${auth[@]}")
[ "$st" = 200 ] && grep -q '"value": \[\]' "$T/body" || fail "the sent draft is still listed"

python3 -c 'import json,sys; assert json.load(open(sys.argv[1])) == []' "$API_DIR/drafts.json" ||
    fail "drafts.json after the send: $(cat "$API_DIR/drafts.json")"

# A draft deleted (what relayd does with the draft of an upload it gave up) is gone.
st=$(api POST /v1.0/users/fax@corp.example/messages "${auth[@]}" -H 'Content-Type: text/plain' \
    --data-binary @"$T/draft.b64")
did=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$T/body")
grep -q "$did" "$API_DIR/drafts.json" || fail "the new draft is not in drafts.json"
st=$(api DELETE "/v1.0/users/fax@corp.example/messages/$did" "${auth[@]}")
[ "$st" = 204 ] || fail "draft delete: $st"
grep -q "$did" "$API_DIR/drafts.json" && fail "the deleted draft is still in drafts.json"

# --compare: equal but for To/Cc/Bcc (folded lines included); anything else differs.
printf 'From: "Fax" <fax@corp.example>\r\nTo: undisclosed-recipients:;\r\nSubject: scan\r\nBcc: x@y.example,\r\n z@y.example\r\n\r\nbody line\r\n' \
    > "$T/api-copy.eml"
python3 "$E2E_SRC/tests/e2e/api_server.py" --compare "$T/msg.eml" "$T/api-copy.eml" ||
    fail "--compare: the copies should be equal but for To/Cc/Bcc"
sed 's/scan/scam/' "$T/api-copy.eml" > "$T/api-bad.eml"
python3 "$E2E_SRC/tests/e2e/api_server.py" --compare "$T/msg.eml" "$T/api-bad.eml" > /dev/null &&
    fail "--compare: a changed Subject went unnoticed"

# Graph's concurrency limit: five requests at once for one mailbox, one gets 429.
pids=()
for n in 1 2 3 4 5; do
    curl -sS --max-time 20 --cacert "$T/ca/ca.pem" -o /dev/null -w '%{http_code}\n' \
        "${auth[@]}" "$BASE/v1.0/users/slow@corp.example" > "$T/conc.$n" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "a concurrent curl failed"; done
[ "$(cat "$T"/conc.* | grep -c 429)" = 1 ] || fail "concurrency: $(cat "$T"/conc.* | tr '\n' ' ')"
grep -q '^CONCURRENCY GET /v1.0/users/slow@corp.example 429' "$API_DIR/requests.log" ||
    fail "no CONCURRENCY line"

# SIGTERM stops it.
kill -TERM "$API_PID"
wait_pid_gone "$API_PID" 5 || fail "api_server.py did not stop on SIGTERM"
pass
