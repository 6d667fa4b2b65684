#!/usr/bin/python3
"""oauth2_server.py - a local HTTPS emulation of Microsoft's and Google's OAuth 2.0 token
endpoints, for relayd's end-to-end tests.  Loopback only.

Paths and parameters are the providers' real ones:
  Microsoft identity platform v2.0
    POST /{tenant}/oauth2/v2.0/token       client_credentials (scope must be
                                           https://outlook.office365.com/.default),
                                           refresh_token (scope with SMTP.Send; the refresh
                                           token is ROTATED: the old one stops working),
                                           device_code
    POST /{tenant}/oauth2/v2.0/devicecode  device authorization (verification_uri)
  Google
    POST /token                            refresh_token (client_secret required, no scope),
                                           urn:ietf:params:oauth:grant-type:jwt-bearer (RS256
                                           assertion verified with --sa-pubkey), device_code
    POST /device/code                      device authorization (verification_url)

Knobs (files in --state DIR, read on every request):
  mode        "ok" (default), "invalid_grant" (every token request fails so), "503"
  expires_in  lifetime of issued access tokens in seconds (default 3599)
  approved    exists: the device code has been approved by "the administrator"
Output (in --state DIR):
  tokens      one issued access token per line: TOKEN EXPIRY-EPOCH GRANT SUBJECT
  requests    one JSON object per request: path and parameters (secret values replaced by
              their length, so tests can check the request shape without seeing secrets)
  refresh     the refresh token currently valid (rotated on each use, Microsoft style)
The server writes its port to --state/port once it listens.  Stop it by its pid.
"""
import argparse
import base64
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MS_APP_SCOPE = "https://outlook.office365.com/.default"
MS_GRAPH_SCOPE = "https://graph.microsoft.com/.default"  # transport = graph
MS_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
GOOGLE_SCOPE = "https://mail.google.com/"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SECRET_PARAMS = {"client_secret", "refresh_token", "assertion", "device_code"}

ARGS = None
LOCK = threading.Lock()


def state(name, default=None):
    try:
        with open(os.path.join(ARGS.state, name)) as f:
            return f.read().strip()
    except OSError:
        return default


def write_state(name, text):
    tmp = os.path.join(ARGS.state, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(ARGS.state, name))


def append_state(name, line):
    with open(os.path.join(ARGS.state, name), "a") as f:
        f.write(line + "\n")


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def verify_jwt(assertion, token_url):
    """Checks an RS256 service-account assertion; returns (sub, None) or (None, why)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    try:
        h64, c64, s64 = assertion.split(".")
        header = json.loads(b64url_decode(h64))
        claims = json.loads(b64url_decode(c64))
        sig = b64url_decode(s64)
    except Exception as e:  # noqa: BLE001 - any malformation is invalid_grant
        return None, "malformed assertion: %s" % e
    if header.get("alg") != "RS256" or header.get("typ") != "JWT":
        return None, "header must be RS256/JWT"
    with open(ARGS.sa_pubkey, "rb") as f:
        pub = serialization.load_pem_public_key(f.read())
    try:
        pub.verify(sig, (h64 + "." + c64).encode(), padding.PKCS1v15(), hashes.SHA256())
    except Exception:  # noqa: BLE001
        return None, "Invalid JWT Signature."
    now = time.time()
    if claims.get("iss") != ARGS.sa_email:
        return None, "iss is not the service account"
    if claims.get("aud") != token_url:
        return None, "aud %r is not %r" % (claims.get("aud"), token_url)
    if claims.get("scope") != GOOGLE_SCOPE:
        return None, "scope is not %s" % GOOGLE_SCOPE
    if not (claims.get("iat", 0) - 60 <= now <= claims.get("exp", 0)) or \
            claims["exp"] - claims["iat"] > 3600:
        return None, "Invalid JWT: Token must be a short-lived token (60 minutes)"
    if not claims.get("sub"):
        return None, "no sub (the mailbox to impersonate)"
    return claims["sub"], None


class Handler(BaseHTTPRequestHandler):
    server_version = "oauth2-emulator/1"

    def log_message(self, fmt, *args):  # quiet; requests go to the state file
        pass

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, err, desc):
        self.reply(status, {"error": err, "error_description": desc})

    def issue(self, grant, subject, scope, with_refresh):
        token = "at-" + secrets.token_urlsafe(24)
        life = int(state("expires_in", "3599"))
        append_state("tokens", "%s %d %s %s" % (token, int(time.time()) + life, grant, subject))
        # The audience, for a resource server that checks it (api_server.py --tokens-dir).
        append_state("scopes", "%s %s" % (token, scope))
        out = {"token_type": "Bearer", "scope": scope, "expires_in": life,
               "ext_expires_in": life, "access_token": token}
        if with_refresh:
            rt = "rt-" + secrets.token_urlsafe(32)
            write_state("refresh", rt)
            out["refresh_token"] = rt
        self.reply(200, out)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length).decode()
        ctype = self.headers.get("Content-Type", "")
        params = {k: v[0] for k, v in urllib.parse.parse_qs(raw, keep_blank_values=True).items()}
        shown = {k: ("<%d bytes>" % len(v) if k in SECRET_PARAMS else v) for k, v in params.items()}
        path = urllib.parse.urlsplit(self.path).path
        with LOCK:
            append_state("requests", json.dumps({"path": path, "params": shown,
                                                 "content_type": ctype}))
            self.route(path, params)

    def route(self, path, p):
        parts = path.strip("/").split("/")
        ms = len(parts) == 4 and parts[1:3] == ["oauth2", "v2.0"]
        if not ((ms and parts[3] in ("token", "devicecode")) or path in ("/token", "/device/code")):
            return self.error(404, "not_found", "no such endpoint " + path)
        if ms and parts[0] != ARGS.tenant:
            return self.error(400, "invalid_request",
                              "AADSTS90002: Tenant '%s' not found." % parts[0])
        if self.headers.get("Content-Type", "").split(";")[0] != \
                "application/x-www-form-urlencoded":
            return self.error(400, "invalid_request", "AADSTS900144: body must be a form")
        mode = state("mode", "ok")
        if mode == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.endswith("devicecode") or path == "/device/code":
            return self.device_authorization(ms, p)
        if mode == "invalid_grant":
            return self.error(400, "invalid_grant", "AADSTS70000: The provided value for the "
                              "'refresh_token' is not valid (emulated outage of the grant).")
        grant = p.get("grant_type", "")
        if grant == JWT_GRANT and not ms:
            sub, why = verify_jwt(p.get("assertion", ""), ARGS.url_base + "/token")
            if why:
                return self.error(400, "invalid_grant", why)
            return self.issue("jwt_bearer", sub, GOOGLE_SCOPE, False)
        if p.get("client_id") != ARGS.client_id:
            return self.error(400, "unauthorized_client" if not ms else "invalid_client",
                              "AADSTS700016: Application with identifier '%s' was not found."
                              % p.get("client_id", ""))
        if grant == "client_credentials" and ms:
            if p.get("client_secret") != ARGS.client_secret:
                return self.error(401, "invalid_client", "AADSTS7000215: Invalid client secret "
                                  "provided. Ensure the secret being sent in the request is the "
                                  "client secret value, not the client secret ID.")
            if p.get("scope") not in (MS_APP_SCOPE, MS_GRAPH_SCOPE):
                return self.error(400, "invalid_scope", "AADSTS1002012: The provided value for "
                                  "scope %s is not valid. Client credential flows must have a "
                                  "scope value with /.default." % p.get("scope", ""))
            return self.issue("client_credentials", "app", p.get("scope"), False)
        if grant == "refresh_token":
            if not ms and p.get("client_secret") != ARGS.client_secret:
                return self.error(401, "invalid_client", "Unauthorized")
            if ms and MS_SMTP_SCOPE not in p.get("scope", "").split():
                return self.error(400, "invalid_scope", "AADSTS70011: scope must include "
                                  + MS_SMTP_SCOPE)
            if p.get("refresh_token") != state("refresh"):
                return self.error(400, "invalid_grant", "AADSTS70008: The provided "
                                  "authorization code or refresh token has expired due to "
                                  "inactivity." if ms else "Token has been expired or revoked.")
            # Microsoft rotates on every use; Google keeps the refresh token.
            return self.issue("refresh_token", "user", p.get("scope", GOOGLE_SCOPE), ms)
        if grant == DEVICE_GRANT:
            if p.get("device_code") != state("device_code"):
                return self.error(400, "invalid_grant", "unknown device_code")
            if not ms and p.get("client_secret") != ARGS.client_secret:
                return self.error(401, "invalid_client", "Unauthorized")
            if state("approved") is None:
                return self.error(400, "authorization_pending",
                                  "AADSTS70016: OAuth 2.0 device flow error. Authorization is "
                                  "pending. Continue polling.")
            return self.issue("device_code", "user", state("device_scope", ""), True)
        return self.error(400, "unsupported_grant_type", "grant %r on %s" % (grant, self.path))

    def device_authorization(self, ms, p):
        if p.get("client_id") != ARGS.client_id:
            return self.error(400, "invalid_client", "unknown client_id")
        if ms and "offline_access" not in p.get("scope", "").split():
            return self.error(400, "invalid_scope", "scope needs offline_access")
        code = "dc-" + secrets.token_urlsafe(16)
        write_state("device_code", code)
        write_state("device_scope", p.get("scope", ""))
        out = {"device_code": code, "user_code": "RLYD-E2E1", "expires_in": 60, "interval": 1}
        if ms:
            out["verification_uri"] = "https://microsoft.com/devicelogin"
            out["message"] = "To sign in, use a web browser to open the page " \
                             "https://microsoft.com/devicelogin and enter the code RLYD-E2E1."
        else:
            out["verification_url"] = "https://www.google.com/device"
        self.reply(200, out)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--tenant", default="contoso.example")
    ap.add_argument("--client-id", default="00000000-e2e0-4000-8000-000000000001")
    ap.add_argument("--client-secret", default="e2e~client.secret")
    ap.add_argument("--sa-pubkey")
    ap.add_argument("--sa-email", default="relayd@e2e-project.iam.gserviceaccount.com")
    ap.add_argument("--host", default="localhost")
    ARGS = ap.parse_args()
    ARGS.url_base = "https://%s:%d" % (ARGS.host, ARGS.port)
    os.makedirs(ARGS.state, exist_ok=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    write_state("port", str(ARGS.port))
    sys.stderr.write("oauth2_server: listening on 127.0.0.1:%d\n" % ARGS.port)
    sys.stderr.flush()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
