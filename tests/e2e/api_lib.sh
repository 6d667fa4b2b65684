# tests/e2e/api_lib.sh - helpers for the HTTP API transport tests (t_api_*.sh); source it
# after lib.sh and oauth2_lib.sh.  Runs the API emulation (api_server.py) on API_PORT (kept
# across restarts); stopped by pid.

API_PORT=
API_PID=
API_DIR=$T/api

# start_api [--token T] [--fault SPEC]...: (re)starts the emulation with the given options;
# requests.log starts empty, message numbers go on.
start_api() {
    make_ca
    if [ -n "$API_PID" ]; then
        stop_pid "$API_PID" 5
        wait_for_port_closed "$API_PORT" 10 || fail "API emulation still listening"
    fi
    mkdir -p "$API_DIR"
    : > "$API_DIR/requests.log" # the requests of this run only
    API_PORT=${API_PORT:-$(free_port)}
    # With the token endpoint emulation running, only the tokens it issued for this API's
    # audience open the API (an Exchange token does not open Graph).
    local tokens=()
    [ -n "${OA_PORT:-}" ] && tokens=(--tokens-dir "$OA_STATE")
    "$PY" "$E2E_SRC/tests/e2e/api_server.py" --port "$API_PORT" --cert "$T/ca/server.pem" \
        --key "$T/ca/server.key" --state-dir "$API_DIR" "${tokens[@]}" "$@" >> "$T/api_server.log" 2>&1 &
    API_PID=$!
    E2E_PIDS+=("$API_PID")
    wait_for_port "$API_PORT" 15 || { cat "$T/api_server.log" >&2; fail "API emulation did not start"; }
    say "API emulation on https://127.0.0.1:$API_PORT (pid $API_PID${*:+, $*})"
}

# write_api_conf FILE TRANSPORT [LINES]: relayd with [upstream provider] on the API emulation,
# app-only token from oauth2_server.py for Graph's audience (scope defaults to
# https://graph.microsoft.com/.default with transport = graph); the emulation checks it.
write_api_conf() {
    write_m365_app_conf "$1" "transport = $2
api_url = https://127.0.0.1:$API_PORT
${3:-}"
}

# send_tncs_alarm SUBJECT BODY_LINE: a TNCS panel's alarm (tncs_prelude: HELO, no Date, no
# Message-ID) from alarm@example.net to user@example.net through relayd; fails the test unless
# it is queued and the session ends with 221.
send_tncs_alarm() {
    { tncs_prelude; printf '%s\n' '> To: user@example.net' '> From: alarm@example.net' \
        "> Subject: $1" '>' "> $2" '> .' '<~ ^250 2\.0\.0 Ok: queued as [0-9A-F]+$' '> QUIT' \
        '< 221' 'eof 5'; } | smtp_dialogue || fail "TNCS dialogue failed"
}

# api_relay N SUBJECT: relays a new message $T/mN.eml (make_message) to user@example.com and
# waits (30 s) for it as the emulation's Nth message; fails the test, showing relayd's log,
# if relayd does not accept it or it does not arrive.
api_relay() {
    make_message "$T/m$1.eml" "$2"
    relay_send "$T/m$1.eml" user@example.com || fail "message $1 ($2) not accepted"
    wait_for_api "$1" 30 || { cat "$T/relayd.log"; fail "message $1 ($2) not delivered"; }
}

# api_count: messages the emulation recorded (NNNN.json is written last).
api_count() { ls "$API_DIR" 2>/dev/null | grep -c '^[0-9]*\.json$' || true; }

# wait_for_api N SECONDS
wait_for_api() {
    local i
    for ((i = 0; i < ${2:-30} * 4; i++)); do
        relayd_must_run
        [ "$(api_count)" -ge "$1" ] && return 0
        sleep 0.25
    done
    return 1
}

# api_json N FIELD: a field of the Nth recorded message's JSON (lists joined by spaces).
api_json() {
    "$PY" -c 'import json,sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(" ".join(v) if isinstance(v, list) else v)' "$API_DIR/$(printf %04d "$1").json" "$2"
}
