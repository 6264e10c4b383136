"""Device authentication: API keys and short-lived signed tokens.

A device presents one credential, as `Authorization: Bearer <credential>` or,
for browsers that cannot set headers on a WebSocket, as `?token=<credential>`.
A credential is either an API key (stored only as its SHA-256, in lines of
`tenant:sha256hex`) or a token `esc1.<payload>.<mac>`: base64url of a msgspec
JSON `TokenPayload`, then base64url of its HMAC-SHA256 under the edge secret.
Tokens carry a kind, so a resume token is never a device credential and a
device token never resumes a session. No I/O beyond reading a keys file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

TOKEN_PREFIX = "esc1"
MIN_SECRET_BYTES = 16
MIN_SECRET_DISTINCT = 8  # "aaaa...", "0101...": long but guessable
MAX_TOKEN_CHARS = 2048
MAX_TTL_S = 24 * 3600.0  # the longest life a token is minted with
TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")

TokenKind = Literal["device", "resume"]
AuthReason = Literal["missing_credentials", "invalid_credentials", "expired_token"]


class TokenPayload(msgspec.Struct, frozen=True, omit_defaults=True):
    tenant: str
    exp: float  # unix seconds
    kind: TokenKind
    session: str | None = None  # resume tokens only
    jti: str | None = None  # resume tokens: its id, single-use (the session record names it)


class Principal(msgspec.Struct, frozen=True):
    tenant: str
    method: Literal["api_key", "token", "none"]


class AuthError(Exception):
    """Authentication refused. `message` is safe to show: it never holds a credential."""

    def __init__(self, reason: AuthReason, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TokenPayload)


# --- API keys ---------------------------------------------------------------


def generate_key() -> str:
    return secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, source: str = "<keys>") -> dict[str, str]:
    """`tenant:sha256hex` entries, one a line (or comma-separated) -> {hash: tenant}.

    Errors name the line but never echo it: a pasted plaintext key stays out of logs.
    """
    keys: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#"):
            continue
        for entry in filter(None, (e.strip() for e in line.split(","))):
            tenant, sep, digest = entry.partition(":")
            digest = digest.lower()
            where = f"{source}: line {lineno}"
            if not sep:
                raise ValueError(f"{where}: expected 'tenant:sha256hex'")
            if not TENANT_RE.fullmatch(tenant):
                raise ValueError(f"{where}: tenant must match [A-Za-z0-9_-]{{1,64}}")
            if not _HASH_RE.fullmatch(digest):
                raise ValueError(f"{where}: expected 64 hex chars, the SHA-256 of the key")
            if keys.get(digest, tenant) != tenant:
                raise ValueError(f"{where}: key hash already belongs to another tenant")
            keys[digest] = tenant
    return keys


def load_api_keys(path: str | Path | None = None, env_value: str | None = None) -> dict[str, str]:
    """Keys from a keys file and/or an env value in the same format, merged."""
    keys = parse_keys(Path(path).read_text("utf-8"), str(path)) if path else {}
    for digest, tenant in parse_keys(env_value or "", "env").items():
        if keys.get(digest, tenant) != tenant:
            raise ValueError("env: a key hash is already given to another tenant by the file")
        keys[digest] = tenant
    return keys


# --- signed tokens ----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def check_secret(secret: bytes) -> None:
    """ValueError for a token secret too short or too repetitive to be one."""
    if len(secret) < MIN_SECRET_BYTES or len(set(secret)) < MIN_SECRET_DISTINCT:
        raise ValueError(
            f"token secret must be at least {MIN_SECRET_BYTES} bytes with "
            f"{MIN_SECRET_DISTINCT} different ones (e.g. python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')"
        )


def _mac(secret: bytes, signing_input: str) -> str:
    check_secret(secret)
    return _b64(hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest())


def _mint(
    secret: bytes,
    tenant: str,
    ttl_s: float,
    now: float | None,
    kind: TokenKind,
    session: str | None = None,
    jti: str | None = None,
) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError("tenant must match [A-Za-z0-9_-]{1,64}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be positive and at most {MAX_TTL_S:g} s (24 h)")
    exp = (time.time() if now is None else now) + ttl_s
    payload = TokenPayload(tenant=tenant, exp=exp, kind=kind, session=session, jti=jti)
    signing_input = f"{TOKEN_PREFIX}.{_b64(_encoder.encode(payload))}"
    return f"{signing_input}.{_mac(secret, signing_input)}"


def mint_token(
    secret: bytes, tenant: str, ttl_s: float, now: float | None = None, kind: TokenKind = "device"
) -> str:
    if kind == "resume":
        raise ValueError("a resume token needs a session: use mint_resume_token")
    return _mint(secret, tenant, ttl_s, now, kind)


def mint_resume_token(
    secret: bytes,
    tenant: str,
    session_id: str,
    ttl_s: float,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """`jti`: the token's id; the session record names the one id that may resume it."""
    if not session_id:
        raise ValueError("session_id must not be empty")
    return _mint(secret, tenant, ttl_s, now, "resume", session_id, jti)


def verify_token(
    secret: bytes, token: str, kind: TokenKind = "device", now: float | None = None
) -> TokenPayload:
    """The payload of a genuine, unexpired token of `kind`; AuthError otherwise."""
    match = _TOKEN_RE.fullmatch(token) if len(token) <= MAX_TOKEN_CHARS else None
    if match is None:
        raise AuthError("invalid_credentials", "malformed token")
    body, mac = match.groups()
    # The MAC is checked before the payload is parsed, in constant time.
    if not hmac.compare_digest(_mac(secret, f"{TOKEN_PREFIX}.{body}"), mac):
        raise AuthError("invalid_credentials", "bad token signature")
    try:
        payload = _decoder.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        raise AuthError("invalid_credentials", "malformed token payload") from exc
    if payload.kind != kind or not TENANT_RE.fullmatch(payload.tenant):
        raise AuthError("invalid_credentials", f"not a {kind} token")
    if (time.time() if now is None else now) >= payload.exp:
        raise AuthError("expired_token", "token expired")
    return payload


def verify_resume_token(secret: bytes, token: str, tenant: str, now: float | None = None) -> str:
    """The session id of `tenant`'s resume token; AuthError for any other tenant's."""
    return resume_claims(secret, token, tenant, now)[0]


def resume_claims(
    secret: bytes, token: str, tenant: str, now: float | None = None
) -> tuple[str, str]:
    """(session id, token id) of `tenant`'s resume token (id '' for a token minted
    without one); AuthError for any other tenant's."""
    payload = verify_token(secret, token, kind="resume", now=now)
    if not payload.session:
        raise AuthError("invalid_credentials", "resume token without a session")
    if payload.tenant != tenant:
        raise AuthError("invalid_credentials", "resume token belongs to another tenant")
    return payload.session, payload.jti or ""


# --- the authenticator ------------------------------------------------------


class Authenticator:
    def __init__(self, secret: bytes, api_keys: Mapping[str, str], enabled: bool = True) -> None:
        if enabled:
            check_secret(secret)
        self._secret = secret
        self._keys = {digest.lower(): tenant for digest, tenant in api_keys.items()}
        self.enabled = enabled

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
        """The presented credential; the header wins over `?token=`."""
        header = headers.get("Authorization")
        if header is None:  # a plain dict is case-sensitive; aiohttp's CIMultiDict is not
            header = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        if header is not None:
            scheme, _, cred = header.strip().partition(" ")
            cred = cred.strip()
            # "Token <key>": how Deepgram's SDKs send an API key (/v1/listen)
            bad_scheme = scheme.lower() not in ("bearer", "token")
            if bad_scheme or not cred or any(c.isspace() for c in cred):
                raise AuthError(
                    "invalid_credentials", "malformed Authorization header; want 'Bearer <cred>'"
                )
            return cred
        cred = query.get("token")
        if cred is None:
            raise AuthError("missing_credentials", "no Authorization header or token parameter")
        if not cred:
            raise AuthError("invalid_credentials", "empty token parameter")
        return cred

    def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str], now: float | None = None
    ) -> Principal:
        if not self.enabled:
            return Principal(tenant="default", method="none")
        cred = self.credential(headers, query)
        if cred.startswith(f"{TOKEN_PREFIX}."):
            payload = verify_token(self._secret, cred, kind="device", now=now)
            return Principal(tenant=payload.tenant, method="token")
        # Lookup by digest: timing can reveal at most bytes of SHA-256(key), which do not
        # help find a key. The token MAC, where a leak would help forge, uses compare_digest.
        tenant = self._keys.get(hash_key(cred))
        if tenant is None:
            raise AuthError("invalid_credentials", "unknown API key")
        return Principal(tenant=tenant, method="api_key")
