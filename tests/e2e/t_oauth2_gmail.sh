#!/usr/bin/env bash
# t_oauth2_gmail: Gmail against the local emulation, both ways Google offers: an installed
# app's refresh token (device flow with verification_url, refresh with client_secret and
# without scope, no rotation) used with OAUTHBEARER, and a Workspace service account with
# domain-wide delegation (JWT bearer grant, RS256 assertion signed through GnuTLS and
# verified by the emulation; sub = the mailbox).  A service account key readable by others
# is refused.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"

make_ca
mkdir -p "$T/secrets" && chmod 0700 "$T/secrets"
SA_KEY=$T/secrets/sa-key.pem
certtool --generate-privkey --key-type rsa --bits 2048 --pkcs8 --password '' \
    --outfile "$SA_KEY" > /dev/null 2>&1 || fail "certtool: key"
certtool --load-privkey "$SA_KEY" --pubkey-info --outfile "$T/sa-pub.pem" > /dev/null 2>&1 ||
    fail "certtool: public key"
start_token_server --sa-pubkey "$T/sa-pub.pem"
SA_JSON=$T/secrets/service-account.json
(umask 077; "$PY" - "$SA_KEY" "$OA_SA_EMAIL" "$OA_PORT" > "$SA_JSON" <<'PYEOF'
import json, sys
key, email, port = sys.argv[1], sys.argv[2], sys.argv[3]
print(json.dumps({"type": "service_account", "project_id": "e2e-project",
                  "private_key_id": "0123", "private_key": open(key).read(),
                  "client_email": email, "client_id": "1234567890",
                  "token_uri": "https://127.0.0.1:%s/token" % port}, indent=2))
PYEOF
)
secret "$T/secrets/client_secret" "$OA_CLIENT_SECRET"
RT=$T/secrets/refresh_token
CONF=$T/relayd.conf
SM_PORT=$(free_port)
write_oauth2_conf "$CONF" "auth = oauthbearer
provider = google
token_endpoint = https://127.0.0.1:$OA_PORT/token
device_endpoint = https://127.0.0.1:$OA_PORT/device/code
client_id = $OA_CLIENT_ID
client_secret_file = $T/secrets/client_secret
refresh_token_file = $RT

[upstream workspace]
host = localhost
port = $SM_PORT
ca_file = $T/ca/ca.pem
username = $MAILBOX
auth = xoauth2
provider = google
token_endpoint = https://127.0.0.1:$OA_PORT/token
oauth2_ca_file = $T/ca/ca.pem
service_account_file = $SA_JSON"

"$RELAYD_BIN" -c "$CONF" --check > "$T/check.out" 2>&1 || { cat "$T/check.out"; fail "--check failed"; }
grep -qx 'scope = https://mail.google.com/' "$T/check.out" || fail "Google scope preset"
grep -qx 'oauth2_grant = jwt_bearer' "$T/check.out" || fail "jwt_bearer not inferred"

say "relayctl oauth2 authorize: Google's device flow"
"$RELAYCTL_BIN" -c "$CONF" oauth2 authorize provider > "$T/authorize.out" 2>&1 &
AUTH_PID=$!
E2E_PIDS+=("$AUTH_PID")
for ((i = 0; i < 50; i++)); do grep -q 'RLYD-E2E1' "$T/authorize.out" && break; sleep 0.2; done
grep -q 'open   https://www.google.com/device' "$T/authorize.out" || { cat "$T/authorize.out"; fail "no verification_url"; }
touch "$OA_STATE/approved"
wait_pid_gone "$AUTH_PID" 20 || fail "authorize did not finish"
wait "$AUTH_PID" || { cat "$T/authorize.out"; fail "authorize failed"; }
grep '"path": "/device/code"' "$OA_STATE/requests" | grep -q '"scope": "https://mail.google.com/"' ||
    fail "device request without Google's scope"

say "refresh in Google's shape (client_secret, no scope, no rotation)"
before=$(cat "$RT")
"$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/token.out" 2>&1 || { cat "$T/token.out"; fail "refresh failed"; }
grep -q 'token ok (grant refresh_token, OAUTHBEARER as' "$T/token.out" || fail "relayctl output"
last_request | grep -q '"path": "/token"' || fail "path: $(last_request)"
[ "$(req_field grant_type)" = refresh_token ] || fail "grant_type"
[ "$(req_field client_secret)" = "<${#OA_CLIENT_SECRET} bytes>" ] || fail "no client_secret"
[ -z "$(req_field scope)" ] || fail "Google refresh sent a scope"
[ "$(cat "$RT")" = "$before" ] || fail "refresh token file changed without rotation"

say "service account: JWT bearer grant, RS256 checked by the emulation"
"$RELAYCTL_BIN" -c "$CONF" oauth2 token workspace > "$T/sa.out" 2>&1 || { cat "$T/sa.out"; fail "JWT grant failed"; }
[ "$(req_field grant_type)" = urn:ietf:params:oauth:grant-type:jwt-bearer ] || fail "grant_type: $(last_request)"
grep -q "jwt_bearer $MAILBOX\$" "$OA_STATE/tokens" || fail "token not issued for sub=$MAILBOX"

say "a service account key readable by others is refused"
chmod 0644 "$SA_JSON"
if "$RELAYD_BIN" -c "$CONF" --check > "$T/loose.out" 2>&1; then fail "0644 key accepted"; fi
grep -q 'service_account_file: .*readable by group or others' "$T/loose.out" || { cat "$T/loose.out"; fail "unclear"; }
chmod 0600 "$SA_JSON"


say "delivery with AUTH OAUTHBEARER (installed app)"
start_xoauth2_smtpd
start_relayd "$CONF"
make_message "$T/m1.eml" "oauth2 gmail"
relay_send "$T/m1.eml" user@example.com || fail "relayd did not accept the message"
wait_for_smtp_out 1 30 || { queue_json >&2; cat "$SM_LOG" >&2; fail "not delivered"; }
grep -q "^AUTH OAUTHBEARER user=$MAILBOX verdict=ok" "$SM_LOG" || fail "no OAUTHBEARER login"
assert_no_token_in_logs
pass
