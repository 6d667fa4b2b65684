#!/usr/bin/env bash
# t_dev_fax: a fax machine that authenticates with AUTH CRAM-MD5 (it could also do LOGIN and
# DIGEST-MD5).  With auth = required, auth_mechanisms = CRAM-MD5 and no TLS (allowed without
# auth_plaintext: CRAM-MD5 never sends the password), relayd offers CRAM-MD5, refuses mail
# before AUTH and the mechanisms it does not offer, and relays the fax upstream.
# Cyrus sasldb keys are user@realm: "saslpasswd2 -u example.com fax" is the login
# "fax@example.com" (checked below; the bare "fax" only works when the realm is the host's).
source "$(dirname "$0")/lib.sh"

FAX_PW='fax-Secret.9'
start_postfix_upstream
printf '%s\n' "$FAX_PW" | saslpasswd2 -p -c -f "$T/relayd-sasldb" -u example.com fax
write_relayd_conf "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "auth = required
auth_mechanisms = CRAM-MD5
sasldb = $T/relayd-sasldb"
start_relayd "$T/relayd.conf"

say "1: EHLO offers CRAM-MD5; MAIL before AUTH, DIGEST-MD5 and cleartext LOGIN are refused"
smtp_dialogue <<'S' || fail "fax AUTH dialogue failed"
< 220
> EHLO FAX-L2750
<~ ^250[- ]AUTH( [A-Z0-9-]+)* CRAM-MD5( |$)
> MAIL FROM:<fax@example.net>
<~ ^530 5\.7\.0
> AUTH DIGEST-MD5
<~ ^5[0-9][0-9] 
> AUTH LOGIN
<~ ^5[0-9][0-9] 
> AUTH CRAM-MD5
<~ ^334 [A-Za-z0-9+/=]+$
>cram fax@example.com wrong-password
<~ ^535 5\.7\.8
> AUTH CRAM-MD5
< 334
>cram fax@example.com fax-Secret.9
<~ ^235 2\.7\.0
> MAIL FROM:<fax@example.net>
< 250
> QUIT
< 221
S

say "2: swaks --auth CRAM-MD5 sends a fax; it arrives upstream"
printf 'Fax from +49 30 1234567, 2 pages\nsee attachment\n' > "$T/want.body"
printf 'From: FAX-L2750 <fax@example.net>\nTo: user@example.com\nSubject: Fax 2 pages\n\nFax from +49 30 1234567, 2 pages\nsee attachment' > "$T/fax.eml"
send_swaks "$RELAYD_PORT" --ehlo FAX-L2750 --from fax@example.net --to user@example.com \
    --auth CRAM-MD5 --auth-user fax@example.com --auth-password "$FAX_PW" \
    --data "@$T/fax.eml" || fail "swaks --auth CRAM-MD5 failed (swaks.log)"
f=$(wait_for_subject "Fax 2 pages" 30) || fail "the fax did not arrive upstream"
assert_repaired "$f"
assert_body "$f" "$T/want.body"

say "3: which login names work with a sasldb made with -u example.com"
for login in fax@example.com fax; do
    if swaks --server 127.0.0.1 --port "$RELAYD_PORT" --timeout 10 --quit-after AUTH \
        --auth CRAM-MD5 --auth-user "$login" --auth-password "$FAX_PW" >> "$T/swaks.log" 2>&1
    then
        say "   login '$login': accepted"
    else
        say "   login '$login': refused"
        [ "$login" = fax@example.com ] && fail "the full user@realm login was refused"
    fi
done
grep -qF "$FAX_PW" "$T/relayd.log" && fail "the password appears in relayd's log"
pass
