"""A local OAuth 2.0 identity provider for end-to-end sign-in tests: Flask with Authlib's
authorization server, a login form, a consent page, the authorization-code grant with
PKCE required (S256), and public clients with loopback redirects (RFC 8252: any port on
127.0.0.1). Tokens are issued in memory; the test can look at what was issued.
"""

from __future__ import annotations

import html
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, Response, redirect, request, session
from werkzeug.serving import make_server

# Plain HTTP on a made-up host name (the guest reaches it through the egress proxy, which
# maps the name to 127.0.0.1); Authlib refuses non-loopback http:// unless told.
os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"

CLIENT_ID = "mc-test-cli"
SCOPE = "profile"


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in (scope or "").split() if s == SCOPE)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        parts = urlsplit(redirect_uri)  # loopback, any port (RFC 8252 section 7.3)
        return (
            parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.path == "/callback"
        )

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # a public client

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class Code(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    code_challenge: str | None
    code_challenge_method: str | None
    issued: float = field(default_factory=time.time)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() - self.issued > 300


@dataclass
class IdentityProvider:
    url: str
    users: dict[str, str]
    codes: dict[str, Code] = field(default_factory=dict)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    failed_logins: int = 0
    usernames: list[str] = field(default_factory=list)  # every login's username, as typed

    @property
    def authorize_url(self) -> str:
        return f"{self.url}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><title>{title}</title><style>"
        "body{font:20px sans-serif;margin:60px auto;width:520px}"
        "input,button{font:20px sans-serif;display:block;margin:12px 0;width:100%;padding:8px}"
        f"</style></head><body><h1>{title}</h1>{body}</body></html>"
    )


def create_app(idp: IdentityProvider) -> Flask:
    app = Flask("mc-test-idp")
    app.secret_key = secrets.token_bytes(32)
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": 3600}

    def save_token(token: dict[str, Any], req: Any) -> None:
        idp.tokens.append({**token, "user": req.user, "client_id": req.client.client_id})

    server = AuthorizationServer(
        app,
        query_client=lambda cid: Client(cid) if cid == CLIENT_ID else None,
        save_token=save_token,
    )

    class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

        def save_authorization_code(self, code: str, req: Any) -> None:
            idp.codes[code] = Code(
                code=code,
                client_id=req.client.client_id,
                redirect_uri=req.payload.redirect_uri,
                scope=req.payload.scope or "",
                user=req.user,
                code_challenge=req.payload.data.get("code_challenge"),
                code_challenge_method=req.payload.data.get("code_challenge_method"),
            )

        def query_authorization_code(self, code: str, client: Client) -> Code | None:
            found = idp.codes.get(code)
            return found if found and found.client_id == client.client_id else None

        def delete_authorization_code(self, code: Code) -> None:
            idp.codes.pop(code.code, None)

        def authenticate_user(self, code: Code) -> str:
            return code.user

    server.register_grant(CodeGrant, [CodeChallenge(required=True)])

    @app.get("/authorize")
    def authorize() -> Any:
        query = urlencode(request.args)
        user = session.get("user")
        if user is None:
            return _login_form(query, "")
        try:
            server.get_consent_grant(end_user=user)
        except Exception as exc:  # an invalid request: say why
            return Response(_page("Sign-in error", html.escape(str(exc))), status=400)
        return _page(
            "Allow access",
            f"<form method=post action='/authorize?{html.escape(query)}'>"
            "<button name=confirm value=yes autofocus>Approve</button></form>"
            f"<p>mc-test-cli wants access to {html.escape(user)}'s profile.</p>",
        )

    def _login_form(query: str, error: str) -> str:
        note = f"<p id=error>{html.escape(error)}</p>" if error else ""
        return _page(
            "Sign in to the test IdP",
            f"<form method=post action='/login?{html.escape(query)}'>"
            "<input name=username autofocus autocomplete=off>"
            "<input name=password type=password>"
            f"<button>Sign in</button></form>{note}",
        )

    @app.post("/login")
    def login() -> Any:
        query = urlencode(request.args)
        username = request.form.get("username", "")
        idp.usernames.append(username)
        if idp.users.get(username) != request.form.get("password"):
            idp.failed_logins += 1
            return _login_form(query, "Wrong username or password.")
        session["user"] = username
        return redirect(f"/authorize?{query}")

    @app.post("/authorize")
    def approve() -> Any:
        user = session.get("user")
        if user is None or request.form.get("confirm") != "yes":
            return Response(_page("Not allowed", "Sign in first."), status=403)
        grant = server.get_consent_grant(end_user=user)
        return server.create_authorization_response(grant=grant, grant_user=user)

    @app.post("/token")
    def token() -> Any:
        return server.create_token_response()

    return app


@contextmanager
def identity_provider(users: dict[str, str], host: str = "127.0.0.1") -> Iterator[IdentityProvider]:
    """The IdP on ``host`` (a free port) in a thread, for the test's duration."""
    idp = IdentityProvider(url="", users=users)
    httpd = make_server(host, 0, create_app(idp), threaded=True)
    idp.url = f"http://{host}:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield idp
    finally:
        httpd.shutdown()
        thread.join(5)
