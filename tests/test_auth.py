from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from services.edge.auth import (
    Authenticator,
    AuthError,
    Principal,
    generate_key,
    hash_key,
    load_api_keys,
    mint_resume_token,
    mint_token,
    parse_keys,
    verify_resume_token,
    verify_token,
)

SECRET = b"s3cret-s3cret-s3cret-s3cret!"
NOW = 1_700_000_000.0
KEY = generate_key()
OTHER_KEY = generate_key()


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(SECRET, {hash_key(KEY): "acme", hash_key(OTHER_KEY): "globex"}, True)


def bearer(cred: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cred}"}


def refused(auth: Authenticator, headers=None, query=None, now=NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(headers or {}, query or {}, now=now)
    assert info.value.status == 401
    return info.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(signing_input: str, secret: bytes = SECRET) -> str:
    """A token built from the documented format, independently of the module."""
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


# --- API keys ---------------------------------------------------------------


def test_key_helpers() -> None:
    assert KEY != OTHER_KEY and len(KEY) >= 40
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_valid_key_yields_its_tenant(auth: Authenticator) -> None:
    assert auth.authenticate(bearer(KEY), {}) == Principal("acme", "api_key")
    assert auth.authenticate(bearer(OTHER_KEY), {}) == Principal("globex", "api_key")


def test_header_name_and_scheme_are_case_insensitive(auth: Authenticator) -> None:
    assert auth.authenticate({"authorization": f"bearer {KEY}"}, {}).tenant == "acme"


def test_query_token_works(auth: Authenticator) -> None:
    assert auth.authenticate({}, {"token": KEY}) == Principal("acme", "api_key")
    token = mint_token(SECRET, "acme", 60, now=NOW)
    assert auth.authenticate({}, {"token": token}, now=NOW) == Principal("acme", "token")


def test_header_wins_over_query(auth: Authenticator) -> None:
    assert auth.authenticate(bearer(OTHER_KEY), {"token": KEY}).tenant == "globex"


def test_wrong_key(auth: Authenticator) -> None:
    assert refused(auth, bearer(generate_key())).reason == "invalid_credentials"
    assert refused(auth, {}, {"token": hash_key(KEY)}).reason == "invalid_credentials"


def test_missing(auth: Authenticator) -> None:
    assert refused(auth).reason == "missing_credentials"
    assert refused(auth, {"X-Other": "1"}, {"framing": "msgpack"}).reason == "missing_credentials"


@pytest.mark.parametrize(
    "header", ["Basic x", f"Basic {KEY}", "Bearer", "Bearer ", "Bearer  ", KEY, f"Bearer {KEY} x"]
)
def test_malformed_header(auth: Authenticator, header: str) -> None:
    # A malformed header is refused even when a good query token is also given.
    err = refused(auth, {"Authorization": header}, {"token": KEY})
    assert err.reason == "invalid_credentials"
    assert KEY not in str(err) and KEY not in repr(err)


def test_empty_query_token(auth: Authenticator) -> None:
    assert refused(auth, {}, {"token": ""}).reason == "invalid_credentials"


def test_disabled_accepts_anything() -> None:
    off = Authenticator(b"", {}, enabled=False)
    assert off.authenticate({}, {}) == Principal("default", "none")
    assert off.authenticate(bearer("junk"), {}) == Principal("default", "none")


def test_enabled_needs_a_real_secret() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Authenticator(b"short", {}, enabled=True)


# --- device tokens ----------------------------------------------------------


def test_token_wire_format(auth: Authenticator) -> None:
    token = mint_token(SECRET, "acme", 30, now=NOW)
    prefix, body, _ = token.split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert (prefix, payload) == ("esc1", b'{"tenant":"acme","exp":1700000030.0,"kind":"device"}')
    assert sign(f"esc1.{body}") == token
    handmade = sign("esc1." + _b64(b'{"tenant":"initech","exp":1e12,"kind":"device","v":2}'))
    assert auth.authenticate(bearer(handmade), {}, now=NOW) == Principal("initech", "token")


def test_token_valid_until_expiry(auth: Authenticator) -> None:
    token = mint_token(SECRET, "acme", 30, now=NOW)
    assert auth.authenticate(bearer(token), {}, now=NOW + 29.9) == Principal("acme", "token")
    assert verify_token(SECRET, token, now=NOW).exp == NOW + 30


def test_token_expired(auth: Authenticator) -> None:
    token = mint_token(SECRET, "acme", 30, now=NOW)
    assert refused(auth, bearer(token), now=NOW + 30).reason == "expired_token"
    assert refused(auth, bearer(token), now=NOW + 3600).reason == "expired_token"


def test_token_tampered_payload(auth: Authenticator) -> None:
    prefix, _, mac = mint_token(SECRET, "acme", 30, now=NOW).split(".")
    for payload in (
        b'{"tenant":"globex","exp":1800000000.0,"kind":"device"}',
        b'{"tenant":"acme","exp":1800000000.0,"kind":"device"}',  # extended expiry
    ):
        forged = f"{prefix}.{_b64(payload)}.{mac}"
        assert refused(auth, bearer(forged)).reason == "invalid_credentials"


def test_token_tampered_signature(auth: Authenticator) -> None:
    token = mint_token(SECRET, "acme", 30, now=NOW)
    body, mac = token.rsplit(".", 1)
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for forged in (f"{body}.{flipped}", f"{body}.{mac[:-1]}", f"{body}.", body, f"{token}.x"):
        assert refused(auth, bearer(forged)).reason == "invalid_credentials"


def test_token_wrong_secret(auth: Authenticator) -> None:
    token = mint_token(b"another-secret-another-secret", "acme", 30, now=NOW)
    err = refused(auth, bearer(token))
    assert err.reason == "invalid_credentials"
    assert token not in str(err) and SECRET.decode() not in str(err)


def test_token_garbage(auth: Authenticator) -> None:
    for junk in ("esc1.", "esc1..", "esc1.!!.??", "esc1." + "A" * 5000 + ".B", "esc1.é.é"):
        assert refused(auth, bearer(junk)).reason == "invalid_credentials"


def test_signed_but_undecodable_payload_is_refused() -> None:
    # Only a secret holder can get here; still, a bad payload must not crash verification.
    for body in (_b64(b"not json"), _b64(b'{"tenant":"a b","exp":1e12,"kind":"device"}'), "A"):
        token = sign(f"esc1.{body}")
        with pytest.raises(AuthError) as info:
            verify_token(SECRET, token, now=NOW)
        assert info.value.reason == "invalid_credentials"


def test_mint_validates_inputs() -> None:
    for tenant in ("", "a b", "a:b", "x" * 65, "acme\n", "é"):
        with pytest.raises(ValueError, match="tenant"):
            mint_token(SECRET, tenant, 30)
    with pytest.raises(ValueError, match="ttl_s"):
        mint_token(SECRET, "acme", 0)
    with pytest.raises(ValueError, match="16 bytes"):
        mint_token(b"short", "acme", 30)
    with pytest.raises(ValueError, match="mint_resume_token"):
        mint_token(SECRET, "acme", 30, kind="resume")
    assert verify_token(SECRET, mint_token(SECRET, "A-z_0" * 12 + "abcd", 30)).tenant


# --- resume tokens ----------------------------------------------------------


def test_resume_token_roundtrip() -> None:
    token = mint_resume_token(SECRET, "acme", "sess-123", 60, now=NOW)
    assert verify_resume_token(SECRET, token, "acme", now=NOW + 59) == "sess-123"


def test_resume_token_of_another_tenant_refused() -> None:
    token = mint_resume_token(SECRET, "globex", "sess-123", 60, now=NOW)
    with pytest.raises(AuthError) as info:
        verify_resume_token(SECRET, token, "acme", now=NOW)
    assert info.value.reason == "invalid_credentials"


def test_resume_token_expired_tampered_wrong_secret() -> None:
    token = mint_resume_token(SECRET, "acme", "sess-123", 60, now=NOW)
    with pytest.raises(AuthError) as info:
        verify_resume_token(SECRET, token, "acme", now=NOW + 60)
    assert info.value.reason == "expired_token"
    prefix, _, mac = token.split(".")
    payload = b'{"tenant":"acme","exp":1e12,"kind":"resume","session":"x"}'
    forged = f"{prefix}.{_b64(payload)}.{mac}"
    for bad, secret in ((forged, SECRET), (token, b"another-secret-another-secret")):
        with pytest.raises(AuthError) as info:
            verify_resume_token(secret, bad, "acme", now=NOW)
        assert info.value.reason == "invalid_credentials"


def test_resume_token_is_not_a_device_credential(auth: Authenticator) -> None:
    token = mint_resume_token(SECRET, "acme", "sess-123", 60, now=NOW)
    assert refused(auth, bearer(token)).reason == "invalid_credentials"
    assert refused(auth, {}, {"token": token}).reason == "invalid_credentials"


def test_device_token_does_not_resume() -> None:
    token = mint_token(SECRET, "acme", 60, now=NOW)
    with pytest.raises(AuthError) as info:
        verify_resume_token(SECRET, token, "acme", now=NOW)
    assert info.value.reason == "invalid_credentials"


def test_resume_needs_a_session() -> None:
    with pytest.raises(ValueError, match="session_id"):
        mint_resume_token(SECRET, "acme", "", 60)


# --- messages never leak ----------------------------------------------------


def test_errors_never_contain_credentials_or_secret(auth: Authenticator) -> None:
    device = mint_token(SECRET, "acme", 30, now=NOW)
    resume = mint_resume_token(SECRET, "globex", "sess-secret-id", 30, now=NOW)
    cases = [
        (bearer(generate_key()), {}, NOW),
        ({}, {"token": generate_key()}, NOW),
        ({"Authorization": "Basic " + generate_key()}, {}, NOW),
        (bearer(device), {}, NOW + 60),
        (bearer(device[:-3] + "AAA"), {}, NOW),
        (bearer(resume), {}, NOW),
    ]
    for headers, query, now in cases:
        err = refused(auth, headers, query, now)
        presented = next(iter(headers.values()), None) or query["token"]
        for text in (str(err), repr(err), err.message, *map(str, err.args)):
            assert presented.split()[-1] not in text
            assert SECRET.decode() not in text and KEY not in text
    with pytest.raises(AuthError) as info:
        verify_resume_token(SECRET, resume, "acme", now=NOW)
    assert resume not in str(info.value) and "sess-secret-id" not in str(info.value)


# --- keys file --------------------------------------------------------------


def test_parse_keys_file(tmp_path) -> None:
    h1, h2 = hash_key(KEY), hash_key(OTHER_KEY)
    path = tmp_path / "keys"
    path.write_text(f"# tenant:sha256, commented\n\nacme:{h1.upper()}\n  # indented\nglobex:{h2}\n")
    keys = load_api_keys(path)
    assert keys == {h1: "acme", h2: "globex"}
    auth = Authenticator(SECRET, keys, True)
    assert auth.authenticate(bearer(KEY), {}).tenant == "acme"


def test_keys_from_env_merge_with_file(tmp_path) -> None:
    h1, h2, h3 = hash_key("one"), hash_key("two"), hash_key("three")
    path = tmp_path / "keys"
    path.write_text(f"acme:{h1}\n")
    assert load_api_keys(path, f"globex:{h2}, initech:{h3},") == {
        h1: "acme",
        h2: "globex",
        h3: "initech",
    }
    assert load_api_keys(None, f"acme:{h1}\nglobex:{h2}") == {h1: "acme", h2: "globex"}
    assert load_api_keys(None, None) == {} == load_api_keys(None, "")
    assert load_api_keys(path, f"acme:{h1}") == {h1: "acme"}  # same entry twice is fine
    with pytest.raises(ValueError, match="another tenant"):
        load_api_keys(path, f"globex:{h1}")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (KEY, "expected 'tenant:sha256hex'"),  # a plaintext key pasted by mistake
        (f"acme:{KEY}", "64 hex"),
        (f"acme:{hash_key(KEY)[:-1]}", "64 hex"),
        (f"acme:{hash_key(KEY)}:x", "64 hex"),
        (f"a b:{hash_key(KEY)}", "tenant"),
        (f":{hash_key(KEY)}", "tenant"),
        (f"globex:{hash_key('two')}", "another tenant"),
    ],
)
def test_malformed_key_line(tmp_path, line: str, why: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# header\nglobex:{hash_key('one')}\nacme:{hash_key('two')}\n{line}\n")
    with pytest.raises(ValueError, match=why) as info:
        load_api_keys(path)
    assert f"{path}: line 4" in str(info.value)
    assert KEY not in str(info.value)


def test_malformed_env_entry() -> None:
    with pytest.raises(ValueError, match=r"env: line 2: .*64 hex"):
        load_api_keys(None, f"acme:{hash_key('one')}\nglobex:nothex")
    with pytest.raises(ValueError, match=r"^<keys>: line 1"):
        parse_keys("acme")
