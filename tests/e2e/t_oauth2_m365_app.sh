#!/usr/bin/env bash
# t_oauth2_m365_app: Microsoft 365 app-only (client credentials, SMTP.SendAsApp) against the
# local emulation: the token request has Microsoft's shape (tenant path, .default scope,
# form body), a secrets file readable by others is refused, a wrong client secret gives
# Microsoft's own words, and mail goes out with
# AUTH XOAUTH2 user=MAILBOX^Aauth=Bearer TOKEN^A^A and never a token in the log.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"

start_token_server
start_xoauth2_smtpd
CONF=$T/relayd.conf
write_m365_app_conf "$CONF"

say "--check: presets applied, secret masked"
"$RELAYD_BIN" -c "$CONF" --check > "$T/check.out" 2>&1 || { cat "$T/check.out"; fail "--check failed"; }
grep -qx 'scope = https://outlook.office365.com/.default' "$T/check.out" || fail "no .default scope"
grep -qx 'oauth2_grant = client_credentials' "$T/check.out" || fail "grant not shown"
grep -qF "$OA_CLIENT_SECRET" "$T/check.out" && fail "--check printed the client secret"

say "loose mode on the client secret file is refused"
chmod 0644 "$T/secrets/client_secret"
if "$RELAYD_BIN" -c "$CONF" --check > "$T/loose.out" 2>&1; then fail "0644 secret accepted"; fi
grep -q 'client_secret_file: .*readable by group or others' "$T/loose.out" ||
    { cat "$T/loose.out"; fail "no clear error for the loose secret file"; }
chmod 0600 "$T/secrets/client_secret"

say "relayctl oauth2 token: client credentials grant in Microsoft's shape"
"$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/token.out" 2>&1 ||
    { cat "$T/token.out" "$T/oauth2_server.log"; fail "no token"; }
cat "$T/token.out"
grep -q 'token ok (grant client_credentials, XOAUTH2 as relay@contoso.example' "$T/token.out" ||
    fail "unexpected relayctl output"
last_request | grep -q "\"path\": \"/$OA_TENANT/oauth2/v2.0/token\"" || fail "wrong path: $(last_request)"
last_request | grep -q '"content_type": "application/x-www-form-urlencoded"' || fail "not a form post"
[ "$(req_field grant_type)" = client_credentials ] || fail "grant_type: $(last_request)"
[ "$(req_field scope)" = https://outlook.office365.com/.default ] || fail "scope: $(last_request)"
[ "$(req_field client_id)" = "$OA_CLIENT_ID" ] || fail "client_id: $(last_request)"
[ "$(req_field client_secret)" = "<${#OA_CLIENT_SECRET} bytes>" ] || fail "client_secret: $(last_request)"

say "wrong client secret: the endpoint's words reach the operator"
secret "$T/secrets/client_secret" 'not-the-secret'
if "$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/wrong.out" 2>&1; then fail "wrong secret accepted"; fi
cat "$T/wrong.out"
grep -q 'invalid_client: AADSTS7000215: Invalid client secret provided.*(HTTP 401)' "$T/wrong.out" ||
    fail "no clear error for a wrong client secret"
secret "$T/secrets/client_secret" "$OA_CLIENT_SECRET"


say "relayctl test-upstream: the token is a step of its own, then AUTH XOAUTH2"
timeout 60 "$RELAYCTL_BIN" -c "$CONF" test-upstream provider > "$T/probe.out" 2>&1 ||
    { cat "$T/probe.out"; fail "test-upstream failed"; }
cat "$T/probe.out"
grep -q '^\[ ok \] oauth2: token ok (grant client_credentials' "$T/probe.out" || fail "no token step"
grep -q '^verdict: upstream provider works' "$T/probe.out" || fail "no verdict"
token=$(awk 'NR == 1 { print $1 }' "$OA_STATE/tokens")
[ -n "$token" ] || fail "the token endpoint recorded no token"
grep -qF -- "$token" "$T/probe.out" && fail "test-upstream printed a token"

say "delivery with AUTH XOAUTH2"
start_relayd "$CONF"
log_wait 'oauth2: upstream provider: token refreshed, expires in [0-9]+ s' 15 || fail "no token at start"
make_message "$T/m1.eml" "oauth2 app-only"
relay_send "$T/m1.eml" user@example.com || fail "relayd did not accept the message"
wait_for_smtp_out 1 30 || { queue_json >&2; cat "$SM_LOG" >&2; fail "not delivered"; }
grep -q '^AUTH XOAUTH2 user=relay@contoso.example verdict=ok' "$SM_LOG" || fail "no XOAUTH2 login"
grep -q '^Subject: oauth2 app-only' "$SM_OUT/1.eml" || fail "wrong message delivered"
assert_no_token_in_logs
pass
