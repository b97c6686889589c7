"""An OAuth 2.0 sign-in client for the terminal: authorization code with PKCE (RFC 7636) and
a loopback redirect (RFC 8252), standard library only.

    python3 -m mc_agent.oauth2_login --authorize-url URL --token-url URL --client-id ID
        [--scope SCOPE] [--output FILE]

It listens on 127.0.0.1 (a free port), opens the authorization URL with $BROWSER, waits for
the redirect, checks ``state``, exchanges the code (with the verifier) at the token URL and
writes the token response to the output file (0600) with an absolute ``expires_at``.
HTTP(S) proxies come from the environment (``http_proxy``/``https_proxy``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path.home() / ".config/mc-oauth2/token.json"
WAIT_SECONDS = 15 * 60


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Callback(BaseHTTPRequestHandler):
    result: dict[str, str] | None = None
    expected_state = ""
    done = threading.Event()

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/callback":
            self._reply(404, "Not the sign-in callback.")
            return
        query = dict(urllib.parse.parse_qsl(parts.query))
        if query.get("state") != type(self).expected_state:
            self._reply(400, "This sign-in answer does not belong to this login (state).")
            return
        if "error" in query:
            self._reply(400, f"The sign-in was refused: {query['error'][:100]}")
        else:
            self._reply(200, "Signed in. You can close this tab.")
        type(self).result = query
        type(self).done.set()

    def _reply(self, status: int, text: str) -> None:
        body = f"<!doctype html><title>{text}</title><p>{text}</p>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def exchange(token_url: str, form: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 (the scheme was checked: http(s) only)
        token_url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (http(s) only)
            data = json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as exc:
        raise SystemExit(
            f"the token endpoint refused the code: {exc.code} {exc.read(300)!r}"
        ) from None
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"the token endpoint could not be reached: {exc}") from None
    if not isinstance(data, dict) or not data.get("access_token"):
        raise SystemExit("the token endpoint answered without an access_token")
    return data


def save(token: dict[str, Any], output: Path, token_url: str) -> None:
    record: dict[str, Any] = {
        k: token[k]
        for k in ("access_token", "token_type", "refresh_token", "scope", "id_token")
        if k in token
    }
    if isinstance(token.get("expires_in"), int | float):
        record["expires_at"] = int(time.time() + float(token["expires_in"]))
    record["issuer"] = urllib.parse.urlsplit(token_url).netloc
    record["obtained_at"] = int(time.time())
    output.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = output.with_name(output.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    tmp.replace(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mc-oauth2-login", description=__doc__)
    parser.add_argument("--authorize-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--scope", default="")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    for url in (args.authorize_url, args.token_url):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            parser.error(f"not an http(s) URL: {url}")

    verifier, challenge = pkce_pair()
    Callback.expected_state = secrets.token_urlsafe(24)
    server = HTTPServer(("127.0.0.1", 0), Callback)
    redirect_uri = f"http://127.0.0.1:{server.server_port}/callback"
    params = {
        "response_type": "code",
        "client_id": args.client_id,
        "redirect_uri": redirect_uri,
        "state": Callback.expected_state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if args.scope:
        params["scope"] = args.scope
    separator = "&" if "?" in args.authorize_url else "?"
    url = args.authorize_url + separator + urllib.parse.urlencode(params)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    print("Sign in with your browser. If it did not open, go to:\n")
    print(url + "\n", flush=True)
    browser = os.environ.get("BROWSER")
    if browser:
        subprocess.Popen([browser, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    print("Waiting for the sign-in to finish...", flush=True)
    if not Callback.done.wait(WAIT_SECONDS):
        print("The sign-in did not finish in time.", file=sys.stderr)
        return 1
    server.shutdown()
    result = Callback.result or {}
    if "error" in result:
        print(f"The sign-in was refused: {result['error']}", file=sys.stderr)
        return 1
    token = exchange(
        args.token_url,
        {
            "grant_type": "authorization_code",
            "code": result.get("code", ""),
            "redirect_uri": redirect_uri,
            "client_id": args.client_id,
            "code_verifier": verifier,
        },
    )
    save(token, args.output, args.token_url)
    print(f"Signed in. The token is saved in {args.output}.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
