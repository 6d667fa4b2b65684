# tests/e2e/lib.sh - shared harness for relayd's end-to-end tests; source it, do not run it.
#
# Every t_*.sh sources this file and gets:
#   - $T: a private directory under /tmp, removed on exit (kept when E2E_KEEP=1 or on failure
#     when E2E_KEEP=fail);
#   - an EXIT trap that stops everything the test started, each process by its own pid
#     (relayd, the Postfix master and its process group), never by name;
#   - a real Postfix upstream (own config, queue and data directories under $T, loopback
#     only, STARTTLS required before AUTH, Cyrus SASL with a private sasldb, delivery into
#     one Maildir), a throw-away CA, and helpers to start relayd and read its queue.
# Every wait is bounded; on failure the last lines of each log are printed so that
# `ctest --output-on-failure` shows why.
#
# Needs root (Postfix's master must start as root), python3, certtool (gnutls-bin),
# saslpasswd2 (sasl2-bin), postfix and swaks.  contrib/setup.sh installs all of them.

set -euo pipefail

E2E_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RELAYD_BIN=${RELAYD_BIN:-$E2E_SRC/build/relayd}
RELAYCTL_BIN=${RELAYCTL_BIN:-$E2E_SRC/build/relayctl}
E2E_NAME=$(basename "$0" .sh)

# The SASL account the upstream knows and relayd uses.
SASL_USER=relay
SASL_REALM=example.com
SASL_LOGIN=$SASL_USER@$SASL_REALM
SASL_PASSWORD='e2e-Secret_pw.1'

T=$(mktemp -d "/tmp/relayd-e2e-$E2E_NAME.XXXXXX")
# Postfix daemons run as the postfix user and open the Maildir, sasldb and log by
# absolute path, so they need to traverse (not list) the directory.
chmod 0711 "$T"

E2E_PIDS=()          # extra background processes, stopped by pid on exit
E2E_FAILED=0
RELAYD_PID=
PF_DIR=
PF_PORT=

# ---------------------------------------------------------------------------------------
# Reporting

say() { printf '%s: %s\n' "$E2E_NAME" "$*"; }

fail() {
    E2E_FAILED=1
    printf '%s: FAIL: %s\n' "$E2E_NAME" "$*" >&2
    exit 1
}

# pass: stops relayd, checks it went quietly, and ends the test with success.
pass() {
    check_relayd_exit
    say "PASS"
    exit 0
}

# Prints the tail of every log we know of, for a failing test's output.
dump_logs() {
    local f rc
    if [ -n "${RELAYD_PID:-}" ] && ! pid_alive "$RELAYD_PID"; then
        wait "$RELAYD_PID" 2>/dev/null && rc=0 || rc=$?
        printf '%s: relayd (pid %s) is gone: exit status %s%s\n' "$E2E_NAME" "$RELAYD_PID" \
            "$rc" "$([ "$rc" -gt 128 ] && echo " (signal $((rc - 128)))")" >&2
        RELAYD_PID=
    fi
    for f in "$T/relayd.log" "$T/relayd.log.old" "${PF_DIR:+$PF_DIR/maillog}" "$T/swaks.log" "$T/dialogue.log"; do
        [ -n "$f" ] && [ -s "$f" ] || continue
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n 60 "$f" >&2
    done
}

# ---------------------------------------------------------------------------------------
# Cleanup: by pid only, bounded waits.

# pid_alive PID: 0 while PID runs (a zombie waiting to be reaped counts as gone).
pid_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$st" != Z ]
}

# wait_pid_gone PID SECONDS: 0 once PID no longer runs, 1 on timeout.
wait_pid_gone() {
    local pid=$1 i n=$(($2 * 10))
    for ((i = 0; i < n; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    return 1
}

# stop_pid PID [SECONDS]: TERM, wait, then KILL.  Reaps it if it is our child.
stop_pid() {
    local pid=$1 secs=${2:-10}
    [ -n "$pid" ] || return 0
    pid_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$secs"; then
        say "pid $pid ignored SIGTERM for ${secs}s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_gone "$pid" 5 || true
    fi
    wait "$pid" 2>/dev/null || true
}

e2e_cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    [ "$rc" -ne 0 ] && E2E_FAILED=1
    if [ "$E2E_FAILED" -ne 0 ]; then
        dump_logs
    fi
    stop_relayd
    stop_postfix_upstream
    for p in "${E2E_PIDS[@]}"; do
        stop_pid "$p" 5
    done
    python3 "$E2E_SRC/tests/e2e/ports.py" release "$$"
    if [ "${E2E_KEEP:-}" = 1 ] || { [ "${E2E_KEEP:-}" = fail ] && [ "$E2E_FAILED" -ne 0 ]; }; then
        say "keeping $T" >&2
    else
        rm -rf -- "$T"
    fi
    exit "$rc"
}
trap e2e_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Ports

# free_port: prints a TCP port on 127.0.0.1 reserved for this test until it exits.  Ports come
# from outside the kernel's ephemeral range and are reserved by a lock file per port shared by
# every test and suite on the machine (tests/e2e/ports.py says why: Postfix listens with
# SO_REUSEPORT, so two tests given the same port would silently share it).  The EXIT trap
# releases them.
free_port() { python3 "$E2E_SRC/tests/e2e/ports.py" reserve "$$" "$E2E_NAME"; }

# port_open PORT: 0 when something accepts connections on 127.0.0.1:PORT.
port_open() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(1)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

# wait_for_port PORT [SECONDS]: bounded wait until 127.0.0.1:PORT accepts.
wait_for_port() {
    local port=$1 secs=${2:-15} i
    for ((i = 0; i < secs * 5; i++)); do
        port_open "$port" && return 0
        sleep 0.2
    done
    return 1
}

# wait_for_port_closed PORT [SECONDS]
wait_for_port_closed() {
    local port=$1 secs=${2:-15} i
    for ((i = 0; i < secs * 5; i++)); do
        port_open "$port" || return 0
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------------------------------
# Certificates (tests/lib/pki.sh, certtool, RSA keys).  make_ca creates, under $T/ca:
#   ca.pem                     the test CA relayd trusts
#   server.pem server.key      CN/SAN localhost + IP 127.0.0.1, signed by ca.pem
#   wrongname.pem/.key         CN/SAN wrong.example, signed by ca.pem
#   expired.pem/.key           localhost, signed by ca.pem, expired in 2001
#   evil-ca.pem                an unrelated CA relayd does not trust
#   evil.pem evil.key          localhost + 127.0.0.1, signed by evil-ca.pem

# shellcheck source=../lib/pki.sh
source "$E2E_SRC/tests/lib/pki.sh"

make_ca() {
    [ -f "$T/ca/server.pem" ] && return 0
    mkdir -p "$T/ca"
    chmod 0755 "$T/ca"
    local d=$T/ca
    {
        pki_ca "$d" ca "relayd e2e test CA" rsa &&
            pki_server "$d" server ca localhost rsa &&
            pki_server "$d" wrongname ca wrong.example rsa &&
            pki_server "$d" expired ca localhost rsa \
                $'activation_date = "2000-01-01 00:00:00"\nexpiration_date = "2001-01-01 00:00:00"' &&
            pki_ca "$d" evil-ca "relayd e2e untrusted CA" rsa &&
            pki_server "$d" evil evil-ca localhost rsa
    } || fail "certtool failed (tests/lib/pki.sh)"
    # Postfix reads the keys as root before it drops privileges, but keep them readable
    # for its user too: nothing here is secret.
    chmod 0644 "$T"/ca/*
}

# ---------------------------------------------------------------------------------------
# The Postfix upstream.
#
# start_postfix_upstream [CERT]   CERT is a make_ca name (default server): the upstream's
#   certificate.  Sets PF_DIR and PF_PORT (reused on a restart so relayd's config holds).
#   Layout: $PF_DIR/etc (config_directory; etc/sasl holds smtpd.conf and sasldb2), queue, data,
#   maillog, and the Maildir $T/mail/maildir.
# stop_postfix_upstream            TERM to the master pid, bounded wait for its group.

PF_UID=$(id -u postfix 2>/dev/null || echo '')
PF_GID=$(id -g postfix 2>/dev/null || echo '')
MAILDIR=$T/mail/maildir

_pf_write_config() {
    local cert=$1 etc=$PF_DIR/etc
    mkdir -p "$etc" "$PF_DIR/queue" "$PF_DIR/data" "$PF_DIR/etc/sasl" "$T/mail"
    chmod 0755 "$PF_DIR" "$etc" "$PF_DIR/etc/sasl"
    chown postfix:postfix "$PF_DIR/data" "$T/mail"
    chmod 0700 "$T/mail"

    # A master.cf of our own rather than an edited copy of the system one: no chroot (the
    # test directories are not inside a chroot), and only the services this test needs, so
    # that a local change to /etc/postfix/master.cf cannot change the test.
    cat > "$etc/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$PF_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
${PF_EXTRA_MASTER:-}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF

    cat > "$etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF_DIR/queue
data_directory = $PF_DIR/data
mail_owner = postfix
setgid_group = postdrop
myhostname = upstream.test
mydomain = upstream.test
myorigin = upstream.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
mydestination =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:no local delivery in the e2e upstream
# Nothing may leave this machine: anything not for the virtual domains is an error.
default_transport = error:no outbound mail from the e2e upstream
relay_transport = error:no outbound mail from the e2e upstream
virtual_mailbox_domains = example.com example.net
virtual_mailbox_base = $T/mail
virtual_mailbox_maps = static:maildir/
virtual_uid_maps = static:$PF_UID
virtual_gid_maps = static:$PF_GID
virtual_minimum_uid = 1
smtpd_banner = \$myhostname ESMTP e2e upstream
smtpd_tls_cert_file = $T/ca/$cert.pem
smtpd_tls_key_file = $T/ca/$cert.key
smtpd_tls_loglevel = 1
# No TLS session cache and no session tickets (a timeout of 0 disables both): the services of
# one instance share tlsmgr's ticket keys, so a resumed session could otherwise skip the
# certificate of the service it was resumed on.  Every handshake shows the service's own.
smtpd_tls_session_cache_timeout = 0
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
# Debian's Postfix looks for smtpd.conf in \$config_directory/sasl whatever this says;
# keep both pointing at the same place.
cyrus_sasl_config_path = $PF_DIR/etc/sasl
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_sasl_authenticated_header = no
smtp_tls_security_level = none
maillog_file = $PF_DIR/maillog
maillog_file_prefixes = /tmp, /var, /dev/stdout
biff = no
delay_warning_time = 0
bounce_queue_lifetime = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
message_size_limit = 52428800
virtual_mailbox_limit = 0
smtputf8_enable = no
${PF_EXTRA_MAIN:-}
EOF

    cat > "$PF_DIR/etc/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: $PF_DIR/etc/sasl/sasldb2
mech_list: PLAIN LOGIN CRAM-MD5
EOF
    if [ ! -f "$PF_DIR/etc/sasl/sasldb2" ]; then
        printf '%s' "$SASL_PASSWORD" |
            saslpasswd2 -p -c -f "$PF_DIR/etc/sasl/sasldb2" -u "$SASL_REALM" "$SASL_USER"
    fi
    chown root:postfix "$PF_DIR/etc/sasl/sasldb2"
    chmod 0640 "$PF_DIR/etc/sasl/sasldb2"
}

start_postfix_upstream() {
    local cert=${1:-server} out
    [ "$(id -u)" -eq 0 ] || fail "the Postfix upstream needs root"
    [ -n "$PF_UID" ] || fail "no postfix user: run contrib/setup.sh"
    make_ca
    PF_DIR=${PF_DIR:-$T/postfix}
    PF_PORT=${PF_PORT:-$(free_port)}
    _pf_write_config "$cert"
    # "postfix check" creates the queue's subdirectories with Postfix's own owners and
    # modes (post-install create-missing); start then runs master -w, which returns once
    # the master has finished initialising.
    if ! out=$(postfix -c "$PF_DIR/etc" check 2>&1); then
        printf '%s\n' "$out" >&2
        fail "postfix check failed"
    fi
    if ! out=$(postfix -c "$PF_DIR/etc" start 2>&1); then
        printf '%s\n' "$out" >&2
        fail "postfix start failed"
    fi
    wait_for_port "$PF_PORT" 20 || fail "Postfix upstream not listening on 127.0.0.1:$PF_PORT"
    local p
    for p in ${PF_EXTRA_PORTS:-}; do
        wait_for_port "$p" 20 || fail "Postfix service not listening on 127.0.0.1:$p"
    done
    say "Postfix upstream on 127.0.0.1:$PF_PORT (cert: $cert, pid $(postfix_pid))"
}

# postfix_pid: the master's pid, or nothing when it is not running.
postfix_pid() {
    local f=$PF_DIR/queue/pid/master.pid pid
    [ -n "$PF_DIR" ] && [ -s "$f" ] || return 0
    pid=$(tr -d ' \n' < "$f")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
    return 0
}

stop_postfix_upstream() {
    local pid i
    pid=$(postfix_pid)
    [ -n "$pid" ] || return 0
    # The master is a session leader; on SIGTERM it signals its process group and exits.
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 15 || { say "Postfix master $pid did not stop; SIGKILL" >&2;
                                 kill -KILL -- "-$pid" 2>/dev/null || true; }
    for ((i = 0; i < 50; i++)); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    [ -n "$PF_PORT" ] && wait_for_port_closed "$PF_PORT" 10 || true
}

# relayd_must_run: in a wait loop, stop waiting at once when relayd has died (a crash
# would otherwise cost the whole timeout).
relayd_must_run() {
    [ -z "${RELAYD_PID:-}" ] || pid_alive "$RELAYD_PID" || fail "relayd died (pid $RELAYD_PID)"
}

# ---------------------------------------------------------------------------------------
# The Maildir the upstream delivers into.

# maildir_files: one delivered message file per line, oldest first.
maildir_files() {
    [ -d "$MAILDIR/new" ] || return 0
    ls -1tr "$MAILDIR/new" 2>/dev/null | sed "s|^|$MAILDIR/new/|"
}

maildir_count() { maildir_files | grep -c . || true; }

# wait_for_maildir_count N SECONDS: 0 once at least N messages were delivered.
wait_for_maildir_count() {
    local n=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 4; i++)); do
        relayd_must_run
        [ "$(maildir_count)" -ge "$n" ] && return 0
        sleep 0.25
    done
    return 1
}

# ---------------------------------------------------------------------------------------
# relayd

# tncs_prelude: the first lines of a TNCS alarm panel's dialogue, for smtp_dialogue: HELO,
# spaces inside the brackets, up to DATA's 354 (the seeds' transcript).  Use as
#   { tncs_prelude; cat <<'S'; } | smtp_dialogue || fail "..."
tncs_prelude() {
    printf '%s\n' '< 220' '> HELO TNCS-SERVER' '< 250' '> MAIL FROM: < alarm@example.net >' \
        '< 250' '> RCPT To: < user@example.net >' '< 250' '> DATA' '< 354'
}

# smtp_prelude HELO_COMMAND SENDER: the first lines of a dialogue, for smtp_dialogue:
# HELO_COMMAND (e.g. "EHLO app"), MAIL FROM:<SENDER>, RCPT TO:<user@example.com>, up to
# DATA's 354.  Use as
#   { smtp_prelude "HELO device" device@lan.test; cat <<'S'; } | smtp_dialogue || fail "..."
smtp_prelude() {
    printf '%s\n' '< 220' "> $1" '< 250' "> MAIL FROM:<$2>" '< 250' '> RCPT TO:<user@example.com>' \
        '< 250' '> DATA' '< 354'
}

# use_wrong_password: the next write_relayd_conf gives [upstream provider] a password file
# with a wrong password ($RELAYD_PWFILE); put "$SASL_PASSWORD" into it to fix it.
use_wrong_password() {
    RELAYD_PWFILE=$T/wrong.secret
    (umask 077; printf 'not-the-password\n' > "$RELAYD_PWFILE")
}

# relayd_conf_pf_upstream FILE NAME PORT TLS: [upstream NAME] for another port of the test
# Postfix (an extra service from pf_service), with the test CA and SASL account, and
# [route default] through it.
relayd_conf_pf_upstream() {
    relayd_conf "$1" "upstream $2" "host = localhost" "port = $3" "tls = $4" \
        "ca_file = $T/ca/ca.pem" "username = $SASL_LOGIN" "password_file = $T/provider.secret" \
        "connect_timeout = 5s"
    relayd_conf "$1" "route default" "upstream = $2"
}

# write_relayd_conf FILE: a config for one LAN listener on a fresh port (RELAYD_PORT) and the
# Postfix upstream ([upstream provider], [route default]).  Override with RELAYD_CA,
# RELAYD_PWFILE, RELAYD_RETRY_FIRST, RELAYD_RETRY_MAX; RELAYD_UPSTREAM=none writes only
# [relayd] and [listener lan] (mail is held).  Change it with relayd_conf.
write_relayd_conf() {
    local conf=$1
    make_ca
    # The upstream's port is fixed before Postfix runs, so a test can start relayd first.
    PF_PORT=${PF_PORT:-$(free_port)}
    RELAYD_PORT=${RELAYD_PORT:-$(free_port)}
    local pwfile=${RELAYD_PWFILE:-$T/provider.secret}
    if [ ! -f "$pwfile" ]; then
        (umask 077; printf '%s\n' "$SASL_PASSWORD" > "$pwfile")
    fi
    mkdir -p "$T/spool"
    cat > "$conf" <<EOF
[relayd]
hostname = relay.test
spool = $T/spool
retry_first = ${RELAYD_RETRY_FIRST:-2}s
retry_max = ${RELAYD_RETRY_MAX:-4}s

[listener lan]
listen = 127.0.0.1:$RELAYD_PORT
allow = 127.0.0.0/8

[upstream provider]
host = localhost
port = $PF_PORT
tls = starttls
ca_file = ${RELAYD_CA:-$T/ca/ca.pem}
username = $SASL_LOGIN
password_file = $pwfile
connect_timeout = 5s
command_timeout = 15s

[route default]
upstream = provider
EOF
    if [ "${RELAYD_UPSTREAM:-}" = none ]; then
        sed -i '/^\[upstream provider\]$/,$d' "$conf"
    fi
}

# relayd_conf FILE SECTION [LINES]...: the one way to change a relayd config.  Each argument
# holds "key = value" lines (several per argument, newline-separated, are fine).  When
# [SECTION] exists, a key it already has is replaced in place and a new key is inserted at the
# top of the section; when it does not exist, [SECTION] is appended with the lines.  Examples:
#   relayd_conf "$conf" relayd "spool_max_size = 300K"
#   relayd_conf "$conf" "route default" "upstream = busy" "failover = dead, provider"
#   relayd_conf "$conf" "upstream fake" "host = 127.0.0.1" "port = $PORT" "tls = none"
relayd_conf() {
    python3 - "$@" <<'PY'
import sys
path, section = sys.argv[1], "[" + sys.argv[2] + "]"
new = [l for arg in sys.argv[3:] for l in arg.split("\n")]
text = open(path).read().split("\n")
while text and text[-1] == "":
    text.pop()
if section not in text:
    text += ["", section] + new
else:
    start = text.index(section) + 1
    end = start
    while end < len(text) and not text[end].startswith("["):
        end += 1
    top = []
    for l in new:
        key = l.split("=")[0].strip() if "=" in l else None
        for j in range(start, end):
            if key and "=" in text[j] and text[j].split("=")[0].strip() == key:
                text[j] = l
                break
        else:
            top.append(l)
    text[start:start] = top
open(path, "w").write("\n".join(text) + "\n")
PY
}



# start_relayd CONF: relayd in the background, stderr+stdout to $T/relayd.log.  RELAYD_WRAPPER
# (words, e.g. "strace -f -c -o FILE") runs relayd under another program; RELAYD_PID is then
# that program's.
start_relayd() {
    local conf=$1 wrapper
    read -r -a wrapper <<< "${RELAYD_WRAPPER:-}"
    [ -x "$RELAYD_BIN" ] || fail "no relayd binary at $RELAYD_BIN (set RELAYD_BIN)"
    [ -f "$T/relayd.log" ] && cat "$T/relayd.log" >> "$T/relayd.log.old"
    # The tests run as root with files under $T: relayd stays root unless the test chose
    # a user itself (t_install_privdrop).
    if [ "$(id -u)" = 0 ] && ! grep -qE '^(user|run_as_root)[[:space:]]*=' "$conf"; then
        relayd_conf "$conf" relayd "run_as_root = yes"
    fi
    "${wrapper[@]}" "$RELAYD_BIN" -c "$conf" > "$T/relayd.log" 2>&1 &
    RELAYD_PID=$!
    RELAYD_CONF=$conf
    if ! wait_for_port "$RELAYD_PORT" 15; then
        pid_alive "$RELAYD_PID" || fail "relayd exited at start (see relayd.log)"
        fail "relayd not listening on 127.0.0.1:$RELAYD_PORT"
    fi
    say "relayd pid $RELAYD_PID on 127.0.0.1:$RELAYD_PORT"
}

# stop_relayd: SIGTERM, bounded wait; RELAYD_EXIT gets its exit status (143: it died of the
# signal rather than exiting).
stop_relayd() {
    [ -n "${RELAYD_PID:-}" ] || return 0
    RELAYD_EXIT=
    if pid_alive "$RELAYD_PID"; then
        kill -TERM "$RELAYD_PID" 2>/dev/null || true
        if ! wait_pid_gone "$RELAYD_PID" 15; then
            say "relayd $RELAYD_PID ignored SIGTERM for 15s; SIGKILL" >&2
            kill -KILL "$RELAYD_PID" 2>/dev/null || true
        fi
    fi
    wait "$RELAYD_PID" 2>/dev/null && RELAYD_EXIT=0 || RELAYD_EXIT=$?
    RELAYD_PID=
}

# check_relayd_exit: stops relayd and fails on a crash or a sanitizer report.  A clean
# exit (0) and death by the SIGTERM we sent (143) both pass.
check_relayd_exit() {
    [ -n "${RELAYD_PID:-}" ] || return 0
    pid_alive "$RELAYD_PID" || fail "relayd was not running any more at the end of the test"
    stop_relayd
    if grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' \
        "$T/relayd.log" "$T/relayd.log.old" 2>/dev/null; then
        fail "sanitizer report in relayd's log"
    fi
    case "$RELAYD_EXIT" in
        0) ;;
        143) say "note: relayd died of SIGTERM instead of exiting 0" ;;
        *) fail "relayd exited with status $RELAYD_EXIT on SIGTERM" ;;
    esac
}

relayctl() { "$RELAYCTL_BIN" -c "$RELAYD_CONF" "$@"; }

# queue_json: relayctl list --json.
queue_json() { relayctl list --json; }

# queue_field ID FIELD: one field of one message from list --json ("" when absent).
queue_field() {
    queue_json | python3 -c '
import json, sys
want, field = sys.argv[1], sys.argv[2]
for m in json.load(sys.stdin):
    if m.get("id") == want:
        v = m.get(field)
        print("" if v is None else v)
        break
' "$1" "$2"
}

# queue_ids [STATE]: ids in the queue, optionally only those in STATE.
queue_ids() {
    queue_json | python3 -c '
import json, sys
state = sys.argv[1] if len(sys.argv) > 1 else None
for m in json.load(sys.stdin):
    if state is None or m.get("state") == state:
        print(m["id"])
' "$@"
}

# wait_for_queue_state STATE SECONDS: prints the id of the first message in STATE.
wait_for_queue_state() {
    local state=$1 secs=${2:-30} i id
    for ((i = 0; i < secs * 2; i++)); do
        relayd_must_run
        id=$(queue_ids "$state" 2>/dev/null | head -n 1) || true
        if [ -n "$id" ]; then
            echo "$id"
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# wait_for_attempt SECONDS: prints the id of the first message that has had a delivery
# attempt and is no longer queued (deferred, held or failed).  An attempt that failed by the
# relay's own configuration (TLS verification, AUTH) is not counted in "attempts"; its
# last_error shows it.
wait_for_attempt() {
    local secs=${1:-30} i id
    for ((i = 0; i < secs * 2; i++)); do
        relayd_must_run
        id=$(queue_json 2>/dev/null | python3 -c '
import json, sys
for m in json.load(sys.stdin):
    if ((m.get("attempts") or 0) >= 1 or m.get("last_error")) and m.get("state") != "queued":
        print(m["id"])
        break
' 2>/dev/null) || true
        if [ -n "$id" ]; then
            echo "$id"
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# wait_for_queue_empty SECONDS
wait_for_queue_empty() {
    local secs=${1:-30} i
    for ((i = 0; i < secs * 2; i++)); do
        relayd_must_run
        [ -z "$(queue_ids 2>/dev/null)" ] && return 0
        sleep 0.5
    done
    return 1
}

# ---------------------------------------------------------------------------------------
# Sending

# send_swaks PORT [swaks args...]: one message; the dialogue goes to $T/swaks.log.
send_swaks() {
    local port=$1
    shift
    printf -- '----- swaks to port %s\n' "$port" >> "$T/swaks.log"
    swaks --server 127.0.0.1 --port "$port" --timeout 20 --helo client.lan "$@" \
        >> "$T/swaks.log" 2>&1
}

# make_message FILE SUBJECT: a test message whose body has the lines SMTP transparency
# (RFC 5321 4.5.2) and careless relays get wrong: leading dots, a lone dot, blank and
# whitespace-only lines, a tab, trailing spaces.  FILE has no final newline because swaks
# adds CRLF.CRLF itself; FILE.body holds the body exactly as it must arrive (LF endings,
# as Postfix stores Maildir files).
make_message() {
    python3 - "$1" "$2" <<'PY'
import sys
path, subject = sys.argv[1], sys.argv[2]
body = ("Line one of the e2e body\n"
        ".leading dot\n"
        "..two leading dots\n"
        ".\n"
        " \n"
        "trailing spaces   \n"
        "\ttab at start\n"
        "\n"
        "\n"
        + "x" * 900 + "\n"
        "From the start of a line (mbox would quote this)\n"
        "end")
hdr = ("From: <sender@lan.test>\n"
       "To: <user@example.com>\n"
       "Subject: " + subject + "\n"
       "Message-ID: <" + subject.replace(" ", "-") + "@lan.test>\n"
       "\n")
with open(path, "w") as f:
    f.write(hdr + body)
with open(path + ".body", "w") as f:
    f.write(body + "\n")
PY
}

# relay_send FILE RCPT[,RCPT...] [swaks args...]: submit FILE to relayd over plain SMTP from
# sender@lan.test; fails (returns non-zero) unless every reply was a success.
relay_send() {
    local f=$1 rcpt=$2
    shift 2
    send_swaks "$RELAYD_PORT" --from sender@lan.test --to "$rcpt" --data "@$f" "$@"
}

# body_of FILE: everything after the first empty line (the header/body separator).
body_of() { python3 -c '
import sys
data = open(sys.argv[1], "rb").read().replace(b"\r\n", b"\n")
i = data.find(b"\n\n")
sys.stdout.buffer.write(b"" if i < 0 else data[i + 2:])
' "$1"; }

# postfix_saw_auth: 0 when the upstream's log shows any AUTH command (smtpd counts them in
# its "disconnect ... auth=N/M" line) or SASL exchange.
postfix_saw_auth() {
    grep -qE ' auth=[0-9]|sasl_method=|sasl_username=|SASL [A-Z0-9-]+ authentication' \
        "$PF_DIR/maillog" 2>/dev/null
}

# ---------------------------------------------------------------------------------------
# Listener tests: raw dialogues, extra config lines, memory figures.

# smtp_dialogue [smtpclient args...] < SCRIPT: runs tests/e2e/smtpclient.py against relayd's
# port (unless --port is given) with the script on standard input; the transcript goes to
# standard output and is appended to $T/dialogue.log.  Returns the client's status.
smtp_dialogue() {
    local port=() rc=0
    case " $* " in *" --port "*) ;; *) port=(--port "$RELAYD_PORT") ;; esac
    printf -- '----- dialogue %s\n' "$*" >> "$T/dialogue.log"
    python3 "$E2E_SRC/tests/e2e/smtpclient.py" "${port[@]}" "$@" > "$T/dialogue.out" 2>&1 ||
        rc=$?
    cat "$T/dialogue.out" >> "$T/dialogue.log"
    cat "$T/dialogue.out"
    return "$rc"
}

# spool_count: messages in relayd's queue, whatever their state.
spool_count() { queue_ids 2>/dev/null | grep -c . || true; }

# proc_status_kb PID FIELD: VmRSS, VmHWM, ... of PID in kB (empty when PID is gone).
proc_status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

# log_wait REGEX SECONDS: 0 once relayd's log has a line matching the extended REGEX.
log_wait() {
    local re=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 5; i++)); do
        grep -qE -- "$re" "$T/relayd.log" 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

# maildir_find SUBJECT: the delivered file whose Subject: is exactly SUBJECT (the first).
maildir_find() {
    local f
    for f in $(maildir_files); do
        grep -qF -x "Subject: $1" "$f" && { echo "$f"; return 0; }
    done
    return 1
}

# wait_for_subject SUBJECT SECONDS: prints the delivered file once it has arrived.
wait_for_subject() {
    local i
    for ((i = 0; i < ${2:-30} * 4; i++)); do
        relayd_must_run
        maildir_find "$1" && return 0
        sleep 0.25
    done
    return 1
}

# assert_repaired FILE: the upstream got Date: and a Message-ID: made by relayd (relay.test)
# and relayd's Received: header.
assert_repaired() {
    grep -q '^Date: ' "$1" || fail "no Date: header in $1"
    grep -qiE '^Message-ID: <[^>]*@relay\.test>' "$1" || fail "no Message-ID@relay.test in $1"
    grep -qE '^Received: from .*by relay\.test|^[[:space:]]+by relay\.test \(relayd\)' "$1" ||
        fail "no Received: header by relay.test in $1"
}

# assert_body FILE EXPECTED: the body (after the first empty line, CRLF read as LF) of the
# delivered FILE equals the file EXPECTED byte for byte.
assert_body() {
    body_of "$1" > "$T/body.got"
    if ! cmp -s "$2" "$T/body.got"; then
        diff -u "$2" "$T/body.got" | head -n 30 >&2 || true
        fail "body of $1 differs from $2"
    fi
}

# ---------------------------------------------------------------------------------------
# Outbound tests: more Postfix services, more upstreams and routes, a fault-injecting server.
#
# PF_EXTRA_MASTER: master.cf text added after the main submission service (pf_service makes
#   it); PF_EXTRA_PORTS: their ports, waited for by start_postfix_upstream; PF_EXTRA_MAIN:
#   extra main.cf lines.  Set all three before start_postfix_upstream.

# pf_service PORT NAME [k=v]...: a master.cf smtpd service on 127.0.0.1:PORT like the main
# one (STARTTLS required, AUTH after TLS, relay for authenticated clients), syslog name
# postfix/NAME; the k=v options given override (a later -o wins in master.cf).
pf_service() {
    local port=$1 name=$2
    shift 2
    printf '127.0.0.1:%s inet n - n - - smtpd\n  -o syslog_name=postfix/%s\n' "$port" "$name"
    printf '  -o %s\n' smtpd_tls_security_level=encrypt smtpd_sasl_auth_enable=yes \
        smtpd_tls_auth_only=yes smtpd_relay_restrictions=permit_sasl_authenticated,reject \
        smtpd_recipient_restrictions=permit_sasl_authenticated,reject "$@"
}

# start_fake_upstream PORT DIR [fake_upstream.py args]: the fault-injecting SMTP server
# (tests/e2e/fake_upstream.py) on 127.0.0.1:PORT, recording into DIR; stopped by pid.
start_fake_upstream() {
    local port=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    python3 "$E2E_SRC/tests/e2e/fake_upstream.py" --port "$port" --dir "$dir" "$@" \
        > "$dir/server.log" 2>&1 &
    E2E_PIDS+=($!)
    wait_for_port "$port" 10 || fail "fake upstream not listening on 127.0.0.1:$port"
    say "fake upstream on 127.0.0.1:$port (pid $!${*:+, $*})"
}

# fake_count DIR: messages the fake upstream accepted.
fake_count() { ls "$1" 2>/dev/null | grep -c '^msg-.*\.eml$' || true; }

# wait_for_fake_count DIR N SECONDS
wait_for_fake_count() {
    local i
    for ((i = 0; i < ${3:-30} * 4; i++)); do
        relayd_must_run
        [ "$(fake_count "$1")" -ge "$2" ] && return 0
        sleep 0.25
    done
    return 1
}

# write_fake_relayd_conf FILE PORT: relayd delivering to the fake upstream on PORT
# (tls = none, no AUTH), retrying fast.
write_fake_relayd_conf() {
    write_relayd_conf "$1"
    relayd_conf "$1" "upstream fake" "host = 127.0.0.1" "port = $2" "tls = none" \
        "connect_timeout = 5s" "command_timeout = 10s"
    relayd_conf "$1" "route default" "upstream = fake"
}

# install_relayd DEST LOG: cmake --install --prefix /usr of the build (RELAYD_BUILD_DIR, else
# relayd's directory) into DESTDIR=DEST, its output in LOG; fails the test, showing LOG, if
# the install fails.
install_relayd() {
    DESTDIR=$1 cmake --install "${RELAYD_BUILD_DIR:-$(dirname "$RELAYD_BIN")}" --prefix /usr \
        > "$2" 2>&1 || { cat "$2" >&2; fail "cmake --install into $1 failed"; }
}

# ---------------------------------------------------------------------------------------
# The load client (loadclient.py): numbered messages "Subject: PREFIX-N", the numbers
# acknowledged with 250 one a line in $T/acked, stopped by touching $T/stop.

# start_load_client PORT PREFIX LOADCLIENT_ARGS...: starts it in the background (output in
# $T/client.out); its pid in CLIENT_PID.
start_load_client() {
    local port=$1 prefix=$2
    shift 2
    python3 "$E2E_SRC/tests/e2e/loadclient.py" --port "$port" --prefix "$prefix" "$@" \
        --acked "$T/acked" --stop "$T/stop" > "$T/client.out" 2>&1 &
    CLIENT_PID=$!
    E2E_PIDS+=("$CLIENT_PID")
}

# load_acked: how many messages the load client has had acknowledged so far.
load_acked() { grep -c . "$T/acked" 2> /dev/null || true; }

# stop_load_client: asks the load client to stop; fails the test if it does not stop within
# 15 s or exits non-zero.
stop_load_client() {
    touch "$T/stop"
    wait_pid_gone "$CLIENT_PID" 15 || fail "the load client did not stop"
    wait "$CLIENT_PID" || fail "the load client failed: $(cat "$T/client.out")"
}

# check_acked_delivered ACKED_FILE SUBJECT_PREFIX MAX_DUPS DIR...: prints "acked A, delivered
# D distinct, duplicates X, lost L" for the numbers in ACKED_FILE against the messages
# "Subject: SUBJECT_PREFIXN" in the files of each DIR (missing DIRs are empty); returns 1 if
# an acknowledged number was not delivered or more than MAX_DUPS extra copies arrived.
check_acked_delivered() {
    python3 -c '
import os, re, sys
acked_file, prefix, max_dups = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
acked = {int(l.split()[0]) for l in open(acked_file) if l.strip()}
subject = re.compile(rb"^Subject: " + re.escape(prefix) + rb"(\d+)\s*$", re.M | re.I)
seen = {}
for d in sys.argv[4:]:
    for name in os.listdir(d) if os.path.isdir(d) else []:
        with open(os.path.join(d, name), "rb") as f:
            head = f.read(8192).replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        m = subject.search(head)
        if m:
            seen[int(m.group(1))] = seen.get(int(m.group(1)), 0) + 1
lost = sorted(n for n in acked if n not in seen)
dups = sum(c - 1 for c in seen.values() if c > 1)
print("acked %d, delivered %d distinct, duplicates %d, lost %d"
      % (len(acked), len(seen), dups, len(lost)))
if lost:
    print("lost: %s" % lost[:50])
sys.exit(1 if lost or dups > max_dups else 0)
' "$@"
}
