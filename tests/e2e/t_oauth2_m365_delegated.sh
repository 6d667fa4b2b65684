#!/usr/bin/env bash
# t_oauth2_m365_delegated: Microsoft 365 delegated (refresh token) against the local
# emulation: relayctl oauth2 authorize runs the device-code flow and stores the refresh
# token 0600; each refresh sends Microsoft's parameters and the rotated refresh token is
# written back; invalid_grant is reported in Microsoft's words.  Once smtpc asks oauth2 for
# tokens: early refresh (short-lived tokens), a 535 forces one refresh, and with the token
# endpoint down mail is held (deferred) and delivered once it is back.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"

start_token_server
mkdir -p "$T/secrets" && chmod 0700 "$T/secrets"
RT=$T/secrets/refresh_token
CONF=$T/relayd.conf
SM_PORT=$(free_port)
write_oauth2_conf "$CONF" "auth = xoauth2
provider = microsoft
tenant = $OA_TENANT
token_endpoint = https://127.0.0.1:$OA_PORT/$OA_TENANT/oauth2/v2.0/token
device_endpoint = https://127.0.0.1:$OA_PORT/$OA_TENANT/oauth2/v2.0/devicecode
client_id = $OA_CLIENT_ID
refresh_token_file = $RT"

say "no refresh token yet: relayd starts, and the error says what to run"
"$RELAYD_BIN" -c "$CONF" --check > "$T/check.out" 2>&1 || { cat "$T/check.out"; fail "--check failed"; }
grep -qx 'oauth2_grant = refresh_token' "$T/check.out" || fail "grant not inferred"
grep -qx 'scope = https://outlook.office.com/SMTP.Send offline_access' "$T/check.out" || fail "scope"
if "$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/none.out" 2>&1; then fail "token without RT"; fi
grep -q "does not exist: run relayctl oauth2 authorize provider" "$T/none.out" || { cat "$T/none.out"; fail "unclear"; }

say "relayctl oauth2 authorize: device-code flow"
"$RELAYCTL_BIN" -c "$CONF" oauth2 authorize provider > "$T/authorize.out" 2>&1 &
AUTH_PID=$!
E2E_PIDS+=("$AUTH_PID")
for ((i = 0; i < 50; i++)); do grep -q 'RLYD-E2E1' "$T/authorize.out" && break; sleep 0.2; done
cat "$T/authorize.out"
grep -q 'open   https://microsoft.com/devicelogin' "$T/authorize.out" || fail "no verification URI"
grep -q 'enter  RLYD-E2E1' "$T/authorize.out" || fail "no user code"
sleep 1.5   # at least one authorization_pending poll
touch "$OA_STATE/approved"
wait_pid_gone "$AUTH_PID" 20 || fail "authorize did not finish"
wait "$AUTH_PID" || { cat "$T/authorize.out"; fail "authorize failed"; }
[ "$(stat -c %a "$RT")" = 600 ] || fail "refresh token file mode $(stat -c %a "$RT")"
[ "$(cat "$RT")" = "$(cat "$OA_STATE/refresh")" ] || fail "stored refresh token is not the issued one"
grep -q '"grant_type": "urn:ietf:params:oauth:grant-type:device_code"' "$OA_STATE/requests" ||
    fail "no device_code grant poll"

say "refresh: Microsoft's parameters, rotated refresh token written back"
before=$(cat "$RT")
"$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/token.out" 2>&1 || { cat "$T/token.out"; fail "refresh failed"; }
[ "$(req_field grant_type)" = refresh_token ] || fail "grant_type: $(last_request)"
[ "$(req_field scope)" = 'https://outlook.office.com/SMTP.Send offline_access' ] || fail "scope: $(last_request)"
[ "$(req_field client_id)" = "$OA_CLIENT_ID" ] || fail "client_id"
[ -z "$(req_field client_secret)" ] || fail "a public client sent a client secret"
after=$(cat "$RT")
[ "$after" != "$before" ] && [ "$after" = "$(cat "$OA_STATE/refresh")" ] || fail "rotation not written back"
[ "$(stat -c %a "$RT")" = 600 ] || fail "rewritten refresh token file mode $(stat -c %a "$RT")"
grep -q 'refresh token rotated, written to' "$T/token.out" || fail "rotation not logged"

say "invalid_grant is reported in the endpoint's words"
echo invalid_grant > "$OA_STATE/mode"
if "$RELAYCTL_BIN" -c "$CONF" oauth2 token provider > "$T/ig.out" 2>&1; then fail "invalid_grant accepted"; fi
grep -q "said invalid_grant: AADSTS70000: .*(HTTP 400)" "$T/ig.out" || { cat "$T/ig.out"; fail "unclear invalid_grant"; }
echo ok > "$OA_STATE/mode"


start_xoauth2_smtpd
# One session per message, so that every message authenticates with the token of the
# moment (with reuse, m2 would ride m1's authenticated session and never see the 535).
relayd_conf "$CONF" "upstream provider" "reuse = no"
say "early refresh: 8 s tokens are refreshed ahead of expiry, rotation each time"
echo 8 > "$OA_STATE/expires_in"
start_relayd "$CONF"
for ((i = 0; i < 60; i++)); do
    [ "$(grep -c 'token refreshed, expires in 8 s' "$T/relayd.log")" -ge 2 ] && break; sleep 0.25
done
[ "$(grep -c 'token refreshed, expires in 8 s' "$T/relayd.log")" -ge 2 ] || fail "no early refresh"
[ "$(cat "$RT")" = "$(cat "$OA_STATE/refresh")" ] || fail "relayd did not write the rotation back"
make_message "$T/m1.eml" "oauth2 delegated one"
relay_send "$T/m1.eml" user@example.com || fail "relayd did not accept m1"
wait_for_smtp_out 1 20 || { queue_json >&2; fail "m1 not delivered"; }

say "535: the refused token is refreshed once and the message goes out"
echo 3600 > "$OA_STATE/expires_in"
log_wait 'token refreshed, expires in 3600 s' 10 || fail "no long-lived token"
awk '{print $1}' "$OA_STATE/tokens" > "$OA_STATE/revoked"   # every token issued so far
make_message "$T/m2.eml" "oauth2 delegated two"
relay_send "$T/m2.eml" user@example.com || fail "relayd did not accept m2"
wait_for_smtp_out 2 25 || { queue_json >&2; cat "$SM_LOG" >&2; fail "m2 not delivered after the 535"; }
grep -q 'verdict=revoked' "$SM_LOG" || fail "the upstream never refused a token"
grep -q 'refused the token; refreshing once' "$T/relayd.log" || fail "no forced refresh"

say "token endpoint down: mail is held, then delivered once it is back"
echo 4 > "$OA_STATE/expires_in"
: > "$OA_STATE/revoked"
stop_relayd
start_relayd "$CONF"
log_wait 'token refreshed, expires in 4 s' 10 || fail "no short token"
stop_token_server
sleep 4     # the token is past its last margin/2 now
make_message "$T/m3.eml" "oauth2 delegated three"
relay_send "$T/m3.eml" user@example.com || fail "relayd did not accept m3"
id=$(wait_for_attempt 20) || fail "no attempt while the endpoint was down"
queue_field "$id" last_error | grep -q 'oauth2: token endpoint 127.0.0.1' ||
    fail "last_error does not name the token endpoint: $(queue_field "$id" last_error)"
[ "$(smtp_out_count)" -eq 2 ] || fail "delivered without a token"
echo 3600 > "$OA_STATE/expires_in"
start_token_server
wait_for_smtp_out 3 30 || { queue_json >&2; fail "m3 not delivered once the endpoint was back"; }
assert_no_token_in_logs
pass
