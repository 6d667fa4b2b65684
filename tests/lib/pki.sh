#!/usr/bin/env bash
# tests/lib/pki.sh - throw-away certificates for the tests (certtool, gnutls-bin); run it or
# source it.  One place for the PKI the unit tests (tests/lib/testlib.c) and the end-to-end
# harness (tests/e2e/lib.sh) build.
#
#   pki.sh DIR unit      the unit tests' set, ECDSA keys (fast):
#                          ca.pem/.key    "Test CA"
#                          ca2.pem/.key   "Other CA", unrelated to ca
#                          srv.pem/.key   localhost + 127.0.0.1, signed by ca
#   pki_ca DIR NAME CN [KEYTYPE]                  a self-signed CA, 30 days
#   pki_server DIR NAME CA CN [KEYTYPE [DATES]]   a server certificate for CN (and
#                                                 127.0.0.1 when CN is localhost) signed by CA
# KEYTYPE: ecdsa (default) or rsa (2048 bits).  DATES: template lines replacing
# "expiration_days = 30" (an expired certificate, say).  Files are written under DIR with
# NAME.tmpl, NAME.key, NAME.pem; certtool's output is shown only when it fails.

_pki_certtool() {
    local out
    if ! out=$(certtool "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "pki.sh: certtool $* failed" >&2
        return 1
    fi
}

_pki_key() { # FILE KEYTYPE
    case "${2:-ecdsa}" in
        rsa) _pki_certtool --generate-privkey --key-type rsa --bits 2048 --outfile "$1" ;;
        *) _pki_certtool --generate-privkey --key-type ecdsa --outfile "$1" ;;
    esac
}

pki_ca() { # DIR NAME CN [KEYTYPE]
    local d=$1 name=$2 cn=$3
    printf 'cn = "%s"\norganization = "relayd tests"\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 30\n' \
        "$cn" > "$d/$name.tmpl"
    _pki_key "$d/$name.key" "${4:-ecdsa}" &&
        _pki_certtool --generate-self-signed --load-privkey "$d/$name.key" \
            --template "$d/$name.tmpl" --outfile "$d/$name.pem"
}

pki_server() { # DIR NAME CA CN [KEYTYPE [DATES]]
    local d=$1 name=$2 ca=$3 cn=$4 dates=${6:-"expiration_days = 30"}
    {
        printf 'cn = "%s"\norganization = "relayd tests"\ndns_name = "%s"\n' "$cn" "$cn"
        [ "$cn" = localhost ] && printf 'ip_address = "127.0.0.1"\n'
        printf 'tls_www_server\nencryption_key\nsigning_key\n%s\n' "$dates"
    } > "$d/$name.tmpl"
    _pki_key "$d/$name.key" "${5:-ecdsa}" &&
        _pki_certtool --generate-certificate --load-privkey "$d/$name.key" \
            --load-ca-certificate "$d/$ca.pem" --load-ca-privkey "$d/$ca.key" \
            --template "$d/$name.tmpl" --outfile "$d/$name.pem"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    if [ $# -ne 2 ] || [ "$2" != unit ]; then
        echo "usage: pki.sh DIR unit" >&2
        exit 2
    fi
    pki_ca "$1" ca "Test CA"
    pki_ca "$1" ca2 "Other CA"
    pki_server "$1" srv ca localhost
fi
