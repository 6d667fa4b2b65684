#!/usr/bin/env bash
# t_dev_quirks: legacy clients: bare LF line endings throughout, an 8-bit body without
# BODY=8BITMIME, every command pipelined in one write (DATA and the message included), and
# no HELO at all.  Each message arrives upstream with its body byte for byte and the
# missing Date:/Message-ID: added.
source "$(dirname "$0")/lib.sh"

start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
start_relayd "$T/relayd.conf"

say "1: bare LF line endings for commands and DATA"
smtp_dialogue <<'S' || fail "bare-LF dialogue failed"
< 220
>lf HELO scanner
< 250
>lf MAIL FROM:<scan@example.net>
< 250
>lf RCPT TO:<user@example.com>
< 250
>lf DATA
< 354
>raw From: scan@example.net\nTo: user@example.com\nSubject: quirk bare LF\n\nscan page 1\n.dotted line\n\nend\n.\n
< 250
>lf QUIT
< 221
S
f=$(wait_for_subject "quirk bare LF" 30) || fail "the bare-LF message did not arrive"
printf 'scan page 1\ndotted line\n\nend\n' > "$T/want1.body"
assert_body "$f" "$T/want1.body"
assert_repaired "$f"

say "2: 8-bit body (Latin-1 and UTF-8 bytes) without BODY=8BITMIME"
smtp_dialogue <<'S' || fail "8-bit dialogue failed"
< 220
> EHLO ups
< 250
> MAIL FROM:<ups@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
>raw From: ups@example.net\r\nTo: user@example.com\r\nSubject: quirk 8bit\r\n\r\nTemp\xe9rature \xfcber 40\xb0C\r\nUTF-8: \xc3\xa9t\xc3\xa9 \xe2\x82\xac\r\n\x7f\x80\xff\r\n.\r\n
< 250
> QUIT
< 221
S
f=$(wait_for_subject "quirk 8bit" 30) || fail "the 8-bit message did not arrive"
printf 'Temp\xe9rature \xfcber 40\xb0C\nUTF-8: \xc3\xa9t\xc3\xa9 \xe2\x82\xac\n\x7f\x80\xff\n' > "$T/want2.body"
assert_body "$f" "$T/want2.body"

say "3: everything pipelined in one write, DATA and message included"
smtp_dialogue <<'S' || fail "pipelined dialogue failed"
< 220
>raw EHLO printer\r\nMAIL FROM:<printer@example.net>\r\nRCPT TO:<user@example.com>\r\nRCPT TO:<other@example.net>\r\nDATA\r\nFrom: printer@example.net\r\nSubject: quirk pipelined\r\n\r\ntoner low\r\n.\r\nQUIT\r\n
< 250
<* 3 250
< 354
<~ ^250 2\.0\.0 Ok: queued as
< 221
eof 5
S
wait_for_maildir_count 4 30 || fail "the pipelined message did not reach both recipients"
f=$(maildir_find "quirk pipelined") || fail "the pipelined message is missing"
printf 'toner low\n' > "$T/want3.body"
assert_body "$f" "$T/want3.body"
assert_repaired "$f"

say "4: no HELO at all"
smtp_dialogue <<'S' || fail "HELO-less dialogue failed"
< 220
> MAIL FROM:<nohelo@example.net>
< 250
> RCPT TO:<user@example.com>
< 250
> DATA
< 354
> Subject: quirk no helo
>
> no greeting from me
> .
< 250
> QUIT
< 221
S
f=$(wait_for_subject "quirk no helo" 30) || fail "the HELO-less message did not arrive"
printf 'no greeting from me\n' > "$T/want4.body"
assert_body "$f" "$T/want4.body"
assert_repaired "$f"
grep -qE '^From: <?nohelo@example.net>?' "$f" || fail "From: was not added from the envelope"

say "5: lower-case verbs, bare HELO, tabs and trailing blanks, no brackets, no QUIT at all"
smtp_dialogue <<'S' || fail "sloppy-syntax dialogue failed"
< 220
> helo
<~ ^(250|501)
> mail from: sloppy@example.net
< 250
>raw rcpt to:\t<user@example.com>  \r\n
< 250
> data 
< 354
> Subject: quirk sloppy
>
> sloppy but fine
> .
< 250
close
S
f=$(wait_for_subject "quirk sloppy" 30) ||
    fail "the message of a client that never said QUIT did not arrive"
printf 'sloppy but fine\n' > "$T/want5.body"
assert_body "$f" "$T/want5.body"
pass
