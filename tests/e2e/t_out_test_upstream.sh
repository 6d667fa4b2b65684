#!/usr/bin/env bash
# t_out_test_upstream: relayctl test-upstream against real upstreams prints each step and a
# plain verdict: works (STARTTLS, implicit TLS) or FAILED at the right step with the reason
# (untrusted certificate: no AUTH sent; no STARTTLS; wrong password; nothing listening;
# unknown name).  Exit status 0 only when every step passed.
source "$(dirname "$0")/lib.sh"

make_ca
PF_DIR=$T/postfix
PF_PORT=$(free_port)
P_EVIL=$(free_port)
P_PLAIN=$(free_port)
P_SMTPS=$(free_port)
DOWN=$(free_port)
PF_EXTRA_MASTER="$(pf_service "$P_EVIL" evil smtpd_tls_cert_file="$T/ca/evil.pem" \
    smtpd_tls_key_file="$T/ca/evil.key")
$(pf_service "$P_PLAIN" plain smtpd_tls_security_level=none smtpd_tls_auth_only=no)
$(pf_service "$P_SMTPS" smtps smtpd_tls_wrappermode=yes)"
PF_EXTRA_PORTS="$P_EVIL $P_PLAIN $P_SMTPS"
start_postfix_upstream
write_relayd_conf "$T/relayd.conf"
(umask 077; printf 'wrong\n' > "$T/wrong.pw")
up() { # NAME PORT TLS [PWFILE]
    relayd_conf "$T/relayd.conf" "upstream $1" "host = localhost
port = $2
tls = $3
ca_file = $T/ca/ca.pem
username = $SASL_LOGIN
password_file = ${4:-$T/provider.secret}
connect_timeout = 3s
command_timeout = 10s"
}
up evil "$P_EVIL" starttls
up plain "$P_PLAIN" starttls
up smtps "$P_SMTPS" implicit
up wrongpw "$PF_PORT" starttls "$T/wrong.pw"
up down "$DOWN" starttls
RELAYD_CONF=$T/relayd.conf # relayctl needs no running relayd for this

# probe NAME WANT-EXIT PATTERN...: runs test-upstream NAME; checks exit status and output.
probe() {
    local name=$1 want=$2 rc=0 p
    shift 2
    relayctl test-upstream "$name" > "$T/probe-$name.txt" 2>&1 || rc=$?
    sed "s/^/   $name| /" "$T/probe-$name.txt"
    [ "$rc" -eq "$want" ] || fail "test-upstream $name exited $rc, want $want"
    for p in "$@"; do
        grep -qE -- "$p" "$T/probe-$name.txt" || fail "test-upstream $name: no line matching /$p/"
    done
}

probe provider 0 '^\[ ok \] ' '^verdict: upstream provider works: TLS verified' \
    'authenticated as relay@example\.com'
grep -q '^\[FAIL\]' "$T/probe-provider.txt" && fail "a FAIL step for a working upstream"
probe smtps 0 '^verdict: upstream smtps works: TLS verified'
rm -f "$PF_DIR/maillog.evil"
probe evil 1 '^\[FAIL\] .*(certificate|trusted)' '^verdict: FAILED at TLS: .*(certificate|trusted)' \
    '^what to do: .*ca_file'
grep -E 'postfix/evil/' "$PF_DIR/maillog" | grep -qE ' auth=[0-9]|sasl_method=' &&
    fail "test-upstream sent AUTH to an untrusted upstream"
probe plain 1 '^\[FAIL\] .*STARTTLS' '^verdict: FAILED.*STARTTLS'
grep -E 'postfix/plain/' "$PF_DIR/maillog" | grep -qE ' auth=[0-9]|sasl_method=' &&
    fail "test-upstream sent AUTH without TLS"
probe wrongpw 1 '^\[ ok \] .*TLS' '^\[FAIL\] .*(535|AUTH|auth)' '^verdict: FAILED at AUTH: .*535' \
    '^what to do: .*password'
probe down 1 '^\[FAIL\] .*(refused|connect)' '^verdict: FAILED at connect: .*refused'
probe nope 1 'no \[upstream nope\]'
[ "$(maildir_count)" -eq 0 ] || fail "test-upstream delivered mail"
pass
