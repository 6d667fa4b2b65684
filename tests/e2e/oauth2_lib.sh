# tests/e2e/oauth2_lib.sh - helpers for the OAuth 2.0 end-to-end tests (t_oauth2_*.sh); source
# it after lib.sh.  Starts the local token endpoint emulation (oauth2_server.py) and the
# bearer-token SMTP server (xoauth2_smtpd.py), both on loopback ports picked here, both
# stopped by pid (lib.sh's EXIT trap stops everything in E2E_PIDS).  Debian's Python runs
# them (python3-aiosmtpd, python3-cryptography), whatever python3 is first in PATH.

PY=/usr/bin/python3
OA_STATE=$T/oauth2
OA_PORT=
OA_PID=
SM_PORT=
SM_PID=
SM_OUT=$T/smtp-out
SM_LOG=$T/smtpd.log
OA_TENANT=contoso.example
OA_CLIENT_ID=00000000-e2e0-4000-8000-000000000001
OA_CLIENT_SECRET='e2e~client.secret'
OA_SA_EMAIL=relayd@e2e-project.iam.gserviceaccount.com
MAILBOX=relay@contoso.example

# start_token_server [extra args]: (re)starts oauth2_server.py on OA_PORT (kept on restart).
start_token_server() {
    make_ca
    mkdir -p "$OA_STATE"
    OA_PORT=${OA_PORT:-$(free_port)}
    "$PY" "$E2E_SRC/tests/e2e/oauth2_server.py" --port "$OA_PORT" --host 127.0.0.1 \
        --cert "$T/ca/server.pem" --key "$T/ca/server.key" --state "$OA_STATE" \
        --tenant "$OA_TENANT" --client-id "$OA_CLIENT_ID" --client-secret "$OA_CLIENT_SECRET" \
        --sa-email "$OA_SA_EMAIL" "$@" >> "$T/oauth2_server.log" 2>&1 &
    OA_PID=$!
    E2E_PIDS+=("$OA_PID")
    wait_for_port "$OA_PORT" 15 || fail "token endpoint emulation did not start"
    say "token endpoint emulation on https://127.0.0.1:$OA_PORT (pid $OA_PID)"
}

stop_token_server() {
    stop_pid "$OA_PID" 5
    wait_for_port_closed "$OA_PORT" 10 || fail "token endpoint still listening"
    say "token endpoint stopped"
}

# start_xoauth2_smtpd: the bearer-token upstream on SM_PORT for MAILBOX.
start_xoauth2_smtpd() {
    make_ca
    SM_PORT=${SM_PORT:-$(free_port)}
    "$PY" "$E2E_SRC/tests/e2e/xoauth2_smtpd.py" --port "$SM_PORT" --cert "$T/ca/server.pem" \
        --key "$T/ca/server.key" --state "$OA_STATE" --user "$MAILBOX" --out "$SM_OUT" \
        --log "$SM_LOG" >> "$T/xoauth2_smtpd.err" 2>&1 &
    SM_PID=$!
    E2E_PIDS+=("$SM_PID")
    wait_for_port "$SM_PORT" 20 || { cat "$T/xoauth2_smtpd.err" >&2; fail "XOAUTH2 SMTP server did not start"; }
    say "bearer-token SMTP server on 127.0.0.1:$SM_PORT (pid $SM_PID)"
}

# write_oauth2_conf FILE UPSTREAM-LINES: relayd on RELAYD_PORT, one [upstream provider] on
# the bearer-token SMTP server with the given OAuth lines.
write_oauth2_conf() {
    RELAYD_PORT=${RELAYD_PORT:-$(free_port)}
    SM_PORT=${SM_PORT:-$(free_port)}
    mkdir -p "$T/spool"
    # A configuration fault (a refused token) holds the upstream until its next probe.
    local probe='upstream_probe_interval = 1s'
    cat > "$1" <<EOC
[relayd]
hostname = relay.test
spool = $T/spool
retry_first = ${RELAYD_RETRY_FIRST:-1}s
retry_max = ${RELAYD_RETRY_MAX:-2}s
$probe

[listener lan]
listen = 127.0.0.1:$RELAYD_PORT
allow = 127.0.0.0/8

[upstream provider]
host = localhost
port = $SM_PORT
tls = starttls
ca_file = $T/ca/ca.pem
username = $MAILBOX
oauth2_ca_file = $T/ca/ca.pem
connect_timeout = 5s
command_timeout = 15s
$2

[route default]
upstream = provider
EOC
}

# write_m365_app_conf FILE [LINES]: write_oauth2_conf with Microsoft's app-only grant
# (client_credentials) from oauth2_server.py's tenant, the client secret in
# $T/secrets/client_secret, then LINES.
write_m365_app_conf() {
    mkdir -p "$T/secrets" && chmod 0700 "$T/secrets"
    secret "$T/secrets/client_secret" "$OA_CLIENT_SECRET"
    write_oauth2_conf "$1" "auth = xoauth2
provider = microsoft
tenant = $OA_TENANT
token_endpoint = https://127.0.0.1:$OA_PORT/$OA_TENANT/oauth2/v2.0/token
oauth2_grant = client_credentials
client_id = $OA_CLIENT_ID
client_secret_file = $T/secrets/client_secret${2:+
$2}"
}

# secret FILE TEXT: a 0600 secrets file.
secret() { (umask 077; printf '%s\n' "$2" > "$1"); }

# last_request: the last request the emulation received, as JSON.
last_request() { tail -n 1 "$OA_STATE/requests"; }

# req_field FIELD: a parameter of the last request ("" when absent).
req_field() {
    last_request | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["params"].get(sys.argv[1], ""))' "$1"
}

# assert_no_token_in_logs: no access or refresh token issued so far appears in relayd's log
# or relayctl's output.
assert_no_token_in_logs() {
    local t
    for t in $(awk '{print $1}' "$OA_STATE/tokens" 2>/dev/null) $(cat "$OA_STATE/refresh" 2>/dev/null); do
        if grep -qF -- "$t" "$T"/relayd.log* "$T"/*.out 2>/dev/null; then
            fail "a token appears in a log"
        fi
    done
}

# smtp_out_count: messages the bearer-token SMTP server accepted.
smtp_out_count() { ls "$SM_OUT" 2>/dev/null | grep -c '\.eml$' || true; }

wait_for_smtp_out() {
    local n=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 4; i++)); do
        relayd_must_run
        [ "$(smtp_out_count)" -ge "$n" ] && return 0
        sleep 0.25
    done
    return 1
}
