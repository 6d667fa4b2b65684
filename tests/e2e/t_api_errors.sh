#!/usr/bin/env bash
# t_api_errors: the Graph answers mapped to relayd's causes.  401 and 403 ErrorAccessDenied
# hold the mail (the upstream turns unhealthy with what to grant, no DSN) until a probe works;
# 429 with Retry-After pauses the upstream that long; 400 ErrorInvalidRecipients fails the
# message with the provider's text in the DSN; 500 defers and the retry delivers.  A 403 on
# the draft creation (save_to_sent_items = no: the app lacks Mail.ReadWrite) holds the mail
# with an action naming Mail.ReadWrite.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

start_token_server
start_api --fault 'sendMail=401:1:code=InvalidAuthenticationToken:message=Access token validation failure.' \
    --fault 'sendMail=403:1:code=ErrorAccessDenied:message=Access is denied. Check credentials and try again.'
CONF=$T/relayd.conf
# Cases 1-4 are about sendMail (save_to_sent_items = yes); case 5 the default's draft path.
write_api_conf "$CONF" graph "mailbox = fax@contoso.example
save_to_sent_items = yes"
start_relayd "$CONF"

# sendmail_statuses: the HTTP statuses of the sendMail requests so far, in order.
sendmail_statuses() { awk '$2 ~ /sendMail$/ { printf "%s ", $3 }' "$API_DIR/requests.log"; }

say "1: 401 then 403 ErrorAccessDenied: held (unhealthy, what to grant), then delivered once"
api_relay 1 "api hold"
[ "$(sendmail_statuses)" = "401 403 202 " ] || fail "sendMail statuses: $(sendmail_statuses)"
grep -qE "upstream provider: unhealthy.*HTTP 401 InvalidAuthenticationToken.*client_id" "$T/relayd.log" ||
    fail "no one-line reason for the 401"
grep -qE "upstream provider: unhealthy.*HTTP 403 ErrorAccessDenied.*Mail.Send.*application access policy" \
    "$T/relayd.log" || fail "no one-line reason with what to grant for the 403"
grep -qE 'to=<user@example.com> .*status=deferred .*cause=relay-configuration' "$T/relayd.log" ||
    fail "not deferred as a configuration fault"
grep -q 'bounced' "$T/relayd.log" && fail "a hold bounced"
wait_for_queue_empty 10 || fail "message still queued"

say "2: 429 with Retry-After: 3: the next request waits at least that long"
start_api --fault 'sendMail=429:1:retry-after=3:code=ApplicationThrottled:message=Application is over its MailboxConcurrency limit.'
make_message "$T/m2.eml" "api throttled"
relay_send "$T/m2.eml" user@example.com || fail "not accepted"
# The emulation's log has no times: watch it (every 0.1 s, which can only make the gap
# look shorter) for the 429 and the next sendMail.
t429= t202=
for ((i = 0; i < 300; i++)); do
    now=$(date +%s.%N)
    [ -z "$t429" ] && grep -q 'sendMail 429$' "$API_DIR/requests.log" && t429=$now
    [ -n "$t429" ] && grep -q 'sendMail 202$' "$API_DIR/requests.log" && { t202=$now; break; }
    sleep 0.1
done
[ -n "$t202" ] || { cat "$T/relayd.log"; fail "not delivered after the 429"; }
gap=$(awk -v a="$t429" -v b="$t202" 'BEGIN { printf "%.2f", b - a }')
say "next request ${gap}s after the 429"
awk -v g="$gap" 'BEGIN { exit !(g >= 2.8) }' || fail "the request after the 429 came before Retry-After"
wait_for_api 2 10 || fail "not recorded after the 429"
grep -qE 'upstream provider: pausing all deliveries to it for 3s \(Retry-After\)' "$T/relayd.log" ||
    fail "the pause is not logged"
grep -qE 'to=<user@example.com> .*status=deferred .*cause=slow-down' "$T/relayd.log" ||
    fail "not deferred as a slow-down"

say "3: 400 ErrorInvalidRecipients: failed, the DSN carries the provider's text"
start_api --fault 'sendMail=400:1:code=ErrorInvalidRecipients:message=At least one recipient is not valid.'
make_message "$T/m3.eml" "api invalid"
relay_send "$T/m3.eml" nobody@example.com || fail "not accepted"
wait_for_api 3 30 || { cat "$T/relayd.log"; fail "no DSN went out"; }
grep -qE 'to=<nobody@example.com> .*status=bounced .*HTTP 400 ErrorInvalidRecipients: At least one recipient is not valid' \
    "$T/relayd.log" || fail "not bounced with the provider's text"
dsn=$API_DIR/0003.eml
[ "$(api_json 3 recipients)" = sender@lan.test ] || fail "DSN to $(api_json 3 recipients)"
grep -q 'At least one recipient is not valid' "$dsn" || fail "the DSN lacks the provider's text"

say "4: 500: deferred, the retry delivers"
start_api --fault 'sendMail=500:1:code=InternalServerError:message=boom'
api_relay 4 "api retry"
[ "$(sendmail_statuses)" = "500 202 " ] || fail "sendMail statuses: $(sendmail_statuses)"
grep -qE 'to=<user@example.com> .*status=deferred \(graph sendMail as fax@contoso.example: HTTP 500' \
    "$T/relayd.log" || fail "the 500 was not a deferral"
# Delivered mail leaves the spool (the failed message of step 3 stays, as failed).
for ((i = 0; i < 40; i++)); do
    [ "$(grep -c ': removed$' "$T/relayd.log")" -ge 4 ] && break
    sleep 0.25
done
[ "$(grep -c ': removed$' "$T/relayd.log")" -eq 4 ] || fail "delivered messages still queued"

say "5: save_to_sent_items = no, 403 on the draft creation: held, the action names Mail.ReadWrite"
stop_relayd
sed -i '/^save_to_sent_items = yes$/d' "$CONF"
start_api --fault 'users/fax@contoso\.example/messages$=403:1:code=ErrorAccessDenied:message=Access is denied. Check credentials and try again.' \
    --fault 'drafts/messages\?.*top=1=403:1:code=ErrorAccessDenied:message=Access is denied.'
# test-upstream reads the Drafts folder: a 403 there fails it with Mail.ReadWrite to grant.
rc=0
timeout 60 "$RELAYCTL_BIN" -c "$CONF" test-upstream provider > "$T/probe5.out" 2>&1 || rc=$?
sed 's/^/   | /' "$T/probe5.out"
[ "$rc" -ne 0 ] || fail "test-upstream passed without access to the drafts"
grep -q '^\[FAIL\] drafts: GET fax@contoso.example Drafts: HTTP 403' "$T/probe5.out" ||
    fail "no failed drafts step"
grep -q '^what to do: .*Mail\.ReadWrite' "$T/probe5.out" || fail "test-upstream does not name Mail.ReadWrite"
start_relayd "$CONF"
api_relay 5 "api draft hold"
grep -qE "upstream provider: unhealthy.*HTTP 403 ErrorAccessDenied.*Mail\.ReadWrite" "$T/relayd.log" ||
    fail "the 403 on the draft does not name Mail.ReadWrite"
grep -qE 'status=deferred \(graph draft \(create draft\) as fax@contoso.example: HTTP 403.*cause=relay-configuration' \
    "$T/relayd.log" || fail "the 403 on the draft is not a hold"
grep -q 'bounced' "$T/relayd.log" && fail "a hold bounced"
[ "$(api_json 5 api)" = graph-draft ] && [ "$(api_json 5 saveToSentItems)" = False ] ||
    fail "not the draft path without Sent Items"
[ "$(grep -c '/send 202$' "$API_DIR/requests.log")" = 1 ] || fail "not sent once"
pass
