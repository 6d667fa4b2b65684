#!/usr/bin/env bash
# t_in_devices: "relayctl devices" answers "why did the fax stop sending?".  A fax that
# asks for CRAM-MD5 where it is not offered shows up with its HELO name, listener and a
# refusal "auth_mechanism" with the last one's text; a panel that sends mail shows its
# accepted count; the history survives a restart of relayd; --json and ADDR work.
source "$(dirname "$0")/lib.sh"

write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "auth = accept-any
auth_mechanisms = PLAIN LOGIN
auth_plaintext = yes"
start_relayd "$T/relayd.conf"

say "1: a fax refused (CRAM-MD5 not offered), from 127.0.0.2"
smtp_dialogue --source 127.0.0.2 <<'S' || fail "fax dialogue failed"
< 220
> EHLO fax-3rd-floor
< 250
> AUTH CRAM-MD5
< 504
> QUIT
< 221
S

say "2: a panel that sends mail, from 127.0.0.3"
smtp_dialogue --source 127.0.0.3 <<'S' || fail "panel dialogue failed"
< 220
> HELO panel
< 250
> MAIL FROM:<panel@lan.test>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: panel
>
> ALARM
> .
< 250
> QUIT
< 221
S

say "3: relayctl devices shows both (written with the next commit, or within seconds)"
ok=
for ((i = 0; i < 40; i++)); do
    relayctl devices --json > "$T/devices.json" 2> "$T/devices.err" || fail "relayctl devices failed"
    if python3 - "$T/devices.json" <<'PY'
import json, sys
d = {x["client"]: x for x in json.load(open(sys.argv[1]))}
fax, panel = d.get("127.0.0.2"), d.get("127.0.0.3")
assert fax and panel
assert fax["helo"] == "fax-3rd-floor" and fax["listener"] == "lan" and fax["accepted"] == 0
r = {x["reason"]: x for x in fax["refusals"]}["auth_mechanism"]
assert r["count"] == 1 and "CRAM-MD5" in r["last_text"], r
assert panel["accepted"] == 1 and panel["helo"] == "panel" and panel["refusals"] == []
PY
    then ok=1; break; fi
    sleep 0.5
done
[ -n "$ok" ] || { cat "$T/devices.json" >&2; fail "relayctl devices --json does not show the fax and the panel"; }
relayctl devices 127.0.0.2 > "$T/devices.txt" || fail "relayctl devices ADDR failed"
cat "$T/devices.txt"
grep -qE '^127\.0\.0\.2  listener=lan  helo=fax-3rd-floor  accepted=0' "$T/devices.txt" ||
    fail "the text output does not name the fax"
grep -qE 'refused 1 x auth_mechanism, last at .*: AUTH CRAM-MD5: not offered' "$T/devices.txt" ||
    fail "the text output does not show the refusal"
relayctl devices 192.0.2.1 > /dev/null 2>&1 && fail "an address never seen was listed"

say "4: after a restart the history is still there"
stop_relayd
start_relayd "$T/relayd.conf"
relayctl devices 127.0.0.2 | grep -q 'auth_mechanism' || fail "the device history did not survive a restart"
check_relayd_exit
pass
