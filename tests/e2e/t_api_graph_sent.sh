#!/usr/bin/env bash
# t_api_graph_sent: save_to_sent_items.  By default (no) a Graph message goes through a draft
# (stale drafts of its queue id looked up first), PATCHed with PR_DELETE_AFTER_SUBMIT
# (Boolean 0x0E01 = true) so that Exchange keeps no copy in Sent Items, then sent once; with
# save_to_sent_items = yes it goes through sendMail (one request, Mail.Send only), which keeps
# one.  The emulation records which.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oauth2_lib.sh"
source "$(dirname "$0")/api_lib.sh"

start_token_server
start_api
CONF=$T/relayd.conf
write_api_conf "$CONF" graph "mailbox = fax@contoso.example"
start_relayd "$CONF"

say "1: default (save_to_sent_items = no): a draft marked delete-after-submit, sent once"
api_relay 1 "graph no sent items"
[ "$(api_json 1 api)" = graph-draft ] || fail "not the draft path: $(api_json 1 api)"
[ "$(api_json 1 saveToSentItems)" = False ] || fail "saved to Sent Items"
[ "$(api_json 1 recipients)" = user@example.com ] || fail "recipients: $(api_json 1 recipients)"
[ -n "$(api_json 1 queueId)" ] || fail "the draft has no queue id"
m='/v1.0/users/fax@contoso.example'
grep -qE "^GET $m/mailFolders/drafts/messages 200$" "$API_DIR/requests.log" ||
    fail "stale drafts not looked up"
grep -qE "^PATCH $m/messages/[^/ ]+ 200$" "$API_DIR/requests.log" || fail "the draft was not PATCHed"
[ "$(grep -c '/send 202$' "$API_DIR/requests.log")" = 1 ] || fail "not sent once"
grep -q 'sendMail' "$API_DIR/requests.log" && fail "sendMail used"
[ "$(cat "$API_DIR/drafts.json")" = "[]" ] || fail "drafts left: $(cat "$API_DIR/drafts.json")"
grep -qE 'upstream provider: graph draft as fax@contoso.example: HTTP 202 \(not saved to Sent Items\) \(mailbox fixed\)' \
    "$T/relayd.log" || fail "no delivery log line for the draft path"
grep -qE 'to=<user@example.com> relay=provider.*status=sent' "$T/relayd.log" || fail "not logged as sent"

say "2: save_to_sent_items = yes: sendMail, saved"
stop_relayd
relayd_conf "$CONF" "upstream provider" "save_to_sent_items = yes"
: > "$API_DIR/requests.log"
start_relayd "$CONF"
api_relay 2 "graph sent items"
[ "$(api_json 2 api)" = graph-sendmail ] || fail "not sendMail: $(api_json 2 api)"
[ "$(api_json 2 saveToSentItems)" = True ] || fail "not saved to Sent Items"
[ "$(grep -c 'sendMail 202$' "$API_DIR/requests.log")" = 1 ] || fail "not one sendMail"
grep -qE 'messages' "$API_DIR/requests.log" && fail "a draft with save_to_sent_items = yes"
grep -qE 'upstream provider: graph sendMail as fax@contoso.example: HTTP 202 \(saved to Sent Items\) \(mailbox fixed\)' \
    "$T/relayd.log" || fail "no delivery log line for sendMail"
pass
