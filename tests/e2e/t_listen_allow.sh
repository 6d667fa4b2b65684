#!/usr/bin/env bash
# t_listen_allow: the allow list and sender_domains / recipient_domains.  relayd listens on
# 127.0.0.1 with allow = 127.0.0.2/32: a client from 127.0.0.1 gets 554 5.7.1 and the
# log says why; a client bound to 127.0.0.2 is served.  A sender outside sender_domains and a
# recipient outside recipient_domains are refused with 5.7.1; mail inside both arrives.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
sed -i 's|^allow = 127.0.0.0/8$|allow = 127.0.0.2/32|' "$T/relayd.conf"
relayd_conf "$T/relayd.conf" "listener lan" "sender_domains = example.net, lan.test
recipient_domains = example.com"
start_relayd "$T/relayd.conf"

say "1: from 127.0.0.1 (not allowed): 554 5.7.1"
smtp_dialogue --source 127.0.0.1 <<'S' || fail "a client outside the allow list was served"
<~ ^554 5\.7\.1
eof 5
S
grep -qE 'reject.*127\.0\.0\.1.*allow' "$T/relayd.log" || fail "no log line saying why"

say "2: from 127.0.0.2: sender and recipient domain checks, then a message that arrives"
smtp_dialogue --source 127.0.0.2 <<'S' || fail "domain checks dialogue failed"
< 220
> EHLO allowed
< 250
> MAIL FROM:<someone@other.example>
<~ ^5[0-9][0-9] 5\.7\.1
> MAIL FROM:<device@lan.test>
< 250
> RCPT TO:<user@other.example>
<~ ^5[0-9][0-9] 5\.7\.1
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: allowed domains
>
> inside both lists
> .
< 250
> QUIT
< 221
S
f=$(wait_for_subject "allowed domains" 30) || fail "the allowed message did not arrive"
grep -qE '^Received: from allowed \(\[127\.0\.0\.2\]\)' "$f" ||
    fail "the Received: header does not name client 127.0.0.2"
pass
