"""Tests of wsbroadcast.auth: tokens, claims, wildcard coverage, API keys, redaction."""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import List, Sequence

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from logcapture import Records
from tokens import b64, ec_pair, raw_token, rsa_pair

from wsbroadcast.auth import (
    REDACTED,
    Authenticator,
    Claims,
    RedactingFilter,
    install_redaction,
    install_redaction_on_handlers,
    load_secret,
    mint_token,
    redact,
)
from wsbroadcast.errors import AuthError, ConfigError, TopicError
from wsbroadcast.topics import pattern_matches

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret-0123"  # >= 32 bytes: no PyJWT key warning


# --------------------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def rsa_keys():
    return rsa_pair()


@pytest.fixture(scope="module")
def ec_keys():
    return ec_pair()


def assert_auth_error(auth: Authenticator, token: str, fragment: str = "") -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    message = str(info.value)
    if token:
        assert token not in message
        for part in token.split("."):
            if len(part) > 8:
                assert part not in message
    assert fragment in message
    assert info.value.__cause__ is None
    return info.value


# ----------------------------------------------------------------------- HS256


def test_valid_hs256_token():
    auth = Authenticator(secret=SECRET)
    assert auth.enabled
    token = mint_token(SECRET, sub="alice", subscribe=["news.*"], publish=["chat.>"])
    claims = auth.verify(token)
    assert claims.sub == "alice"
    assert claims.subscribe == ("news.*",)
    assert claims.publish == ("chat.>",)
    assert claims.exp is not None and claims.exp > time.time()
    assert not claims.is_expired()
    assert 3500 < claims.seconds_left() <= 3600


def test_mint_token_round_trip_and_extra():
    token = mint_token(SECRET, sub="bob", lifetime=None, extra={"role": "x"})
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["sub"] == "bob"
    assert payload["role"] == "x"
    assert "exp" not in payload
    assert payload["subscribe"] == [] and payload["publish"] == []
    claims = Authenticator(secret=SECRET).verify(token)
    assert claims.exp is None and claims.seconds_left() is None and not claims.is_expired()
    assert not claims.can_publish("a") and not claims.can_subscribe("a")


def test_mint_token_rejects_bad_pattern():
    with pytest.raises(TopicError):
        mint_token(SECRET, subscribe=["a.>.b"])


def test_expired_token_refused_and_leeway():
    token = mint_token(SECRET, publish=["a"], lifetime=-30)
    assert_auth_error(Authenticator(secret=SECRET), token, "expired")
    claims = Authenticator(secret=SECRET, leeway=120).verify(token)
    assert claims.is_expired()
    assert not claims.is_expired(leeway=120)


def test_not_yet_valid_token_refused():
    token = mint_token(SECRET, extra={"nbf": int(time.time()) + 600})
    assert_auth_error(Authenticator(secret=SECRET), token, "not yet valid")


def test_wrong_signature_refused():
    token = mint_token("another-secret-another-secret-0123456")
    assert_auth_error(Authenticator(secret=SECRET), token, "signature")
    # a tampered payload with the original signature
    good = mint_token(SECRET, publish=["a"])
    head, _, sig = good.split(".")
    forged = head + "." + b64(json.dumps({"publish": [">"]}).encode()) + "." + sig
    assert_auth_error(Authenticator(secret=SECRET), forged, "signature")


def test_alg_none_refused():
    token = raw_token({"alg": "none", "typ": "JWT"}, {"publish": [">"]}, sign=False)
    assert_auth_error(Authenticator(secret=SECRET), token, "algorithm")
    token = raw_token({"alg": "None"}, {"publish": [">"]}, sign=False)
    assert_auth_error(Authenticator(secret=SECRET), token)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "eyJ.eyJ.x",
        "...",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.!!!.abc",
        "x" * 20000,
        b64(b'{"alg": 5}') + "." + b64(b"{}") + ".abc",
        b64(b"[1,2]") + "." + b64(b"{}") + ".abc",
    ],
)
def test_malformed_tokens_refused(token):
    assert_auth_error(Authenticator(secret=SECRET), token)


def test_payload_not_json_object_refused():
    token = raw_token({"alg": "HS256"}, [1, 2], SECRET.encode())  # type: ignore[arg-type]
    assert_auth_error(Authenticator(secret=SECRET), token)


def test_empty_or_non_string_token_refused():
    auth = Authenticator(secret=SECRET)
    with pytest.raises(AuthError):
        auth.verify("")
    with pytest.raises(AuthError):
        auth.verify(None)  # type: ignore[arg-type]


def test_verify_without_keys_raises():
    auth = Authenticator()
    assert not auth.enabled
    with pytest.raises(AuthError):
        auth.verify(mint_token(SECRET))


def test_other_hmac_sizes_accepted():
    token = mint_token(SECRET + SECRET, algorithm="HS512", publish=["a"])
    assert Authenticator(secret=SECRET + SECRET).verify(token).can_publish("a")


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"subscribe": "news.*"}, "subscribe"),
        ({"publish": {"a": 1}}, "publish"),
        ({"publish": None}, "publish"),
        ({"subscribe": ["news.>.x"]}, "subscribe"),
        ({"subscribe": ["bad topic"]}, "subscribe"),
        ({"publish": [""]}, "publish"),
        ({"publish": [5]}, "publish"),
        ({"subscribe": ["a..b"]}, "subscribe"),
        ({"exp": "tomorrow"}, ""),
        ({"sub": 42}, ""),
    ],
)
def test_bad_claims_refused(payload, fragment):
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    assert_auth_error(Authenticator(secret=SECRET), token, fragment)


def test_claims_from_payload_direct():
    with pytest.raises(AuthError):
        Claims.from_payload({"exp": True})
    with pytest.raises(AuthError):
        Claims.from_payload([])  # type: ignore[arg-type]
    c = Claims.from_payload({"sub": "x", "exp": 12, "subscribe": ["a"], "publish": ("b.*",)})
    assert c == Claims(sub="x", exp=12.0, subscribe=("a",), publish=("b.*",))
    with pytest.raises(TopicError):
        Claims(subscribe=("a.>.b",))


def test_audience_and_issuer():
    token = mint_token(SECRET, sub="aud-test", subscribe=["a"], extra={"aud": "svc", "iss": "me"})
    # unset audience: aud ignored
    for auth in (Authenticator(secret=SECRET), Authenticator(secret=SECRET, audience="svc", issuer="me")):
        claims = auth.verify(token)
        assert (claims.sub, claims.subscribe, claims.publish) == ("aud-test", ("a",), ())
    assert_auth_error(Authenticator(secret=SECRET, audience="other"), token, "audience")
    assert_auth_error(Authenticator(secret=SECRET, issuer="other"), token, "issuer")
    assert_auth_error(Authenticator(secret=SECRET, audience="svc"), mint_token(SECRET))


def test_constructor_validation():
    with pytest.raises(ValueError):
        Authenticator(secret="")
    with pytest.raises(ValueError):
        Authenticator(api_key="")
    with pytest.raises(ValueError):
        Authenticator(public_key="not a pem")


def test_repr_has_no_secret():
    auth = Authenticator(secret=SECRET, api_key="the-api-key")
    assert SECRET not in repr(auth) and "the-api-key" not in repr(auth)


# -------------------------------------------------------------- RS256 / ES256


def test_rs256(rsa_keys):
    private, public = rsa_keys
    auth = Authenticator(public_key=public)
    assert auth.enabled and "RS256" in auth.algorithms and "HS256" not in auth.algorithms
    token = mint_token(private, algorithm="RS256", sub="r", publish=["x.*"])
    claims = auth.verify(token)
    assert claims.sub == "r" and claims.can_publish("x.y")
    # public key as str works too
    assert Authenticator(public_key=public.decode()).verify(token).sub == "r"
    # a token signed by another RSA key
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = jwt.encode({"sub": "r"}, other, algorithm="RS256")
    assert_auth_error(auth, bad, "signature")
    assert_auth_error(auth, mint_token(private, algorithm="RS256", lifetime=-10), "expired")


def test_es256(ec_keys):
    private, public = ec_keys
    auth = Authenticator(public_key=public)
    assert auth.algorithms == ("ES256",)
    token = mint_token(private, algorithm="ES256", subscribe=["a.>"])
    assert auth.verify(token).can_subscribe("a.*")
    other = ec.generate_private_key(ec.SECP256R1())
    assert_auth_error(auth, jwt.encode({}, other, algorithm="ES256"), "signature")


def test_rs_token_refused_by_ec_key(rsa_keys, ec_keys):
    token = mint_token(rsa_keys[0], algorithm="RS256")
    assert_auth_error(Authenticator(public_key=ec_keys[1]), token, "algorithm")


def test_private_key_as_public_key_refused(rsa_keys):
    with pytest.raises(ValueError):
        Authenticator(public_key=rsa_keys[0])


def test_algorithm_confusion_refused(rsa_keys):
    _, public = rsa_keys
    # HS256 signed with the public key PEM as the HMAC secret
    token = raw_token({"alg": "HS256", "typ": "JWT"}, {"publish": [">"]}, public)
    assert_auth_error(Authenticator(public_key=public), token, "algorithm")
    # with both configured, the HMAC family uses the secret, never the public key
    assert_auth_error(Authenticator(secret=SECRET, public_key=public), token, "signature")
    # the PEM text with whitespace stripped, another classic variant
    token2 = raw_token({"alg": "HS256"}, {"publish": [">"]}, public.strip())
    assert_auth_error(Authenticator(public_key=public), token2)


def test_secret_and_public_key_together(rsa_keys):
    private, public = rsa_keys
    auth = Authenticator(secret=SECRET, public_key=public)
    assert auth.verify(mint_token(SECRET, sub="h")).sub == "h"
    assert auth.verify(mint_token(private, algorithm="RS256", sub="r")).sub == "r"


# -------------------------------------------------------------- requests


def test_authenticate_request_disabled_allows_all():
    auth = Authenticator()
    claims = auth.authenticate_request([], None)
    assert claims is Claims.allow_all()
    assert claims.is_allow_all
    assert claims.can_publish("any.topic") and claims.can_subscribe(">")
    assert not claims.can_publish("a.*")


def test_authenticate_request_header_and_query():
    auth = Authenticator(secret=SECRET)
    h = mint_token(SECRET, sub="header")
    q = mint_token(SECRET, sub="query")
    assert auth.authenticate_request([(b"Authorization", b"Bearer " + h.encode())], q).sub == "header"
    assert auth.authenticate_request({"authorization": "bearer " + h}, None).sub == "header"
    assert auth.authenticate_request([("Host", "x")], q).sub == "query"
    # a non-Bearer Authorization header is ignored
    assert auth.authenticate_request([("Authorization", "Basic dXNlcjpwYXNz")], q).sub == "query"
    # header wins even when it is bad
    with pytest.raises(AuthError):
        auth.authenticate_request([("Authorization", "Bearer garbage")], q)
    with pytest.raises(AuthError):
        auth.authenticate_request([("Authorization", "Bearer ")], q)
    with pytest.raises(AuthError, match="missing"):
        auth.authenticate_request([], None)
    with pytest.raises(AuthError, match="missing"):
        auth.authenticate_request([], "")
    with pytest.raises(AuthError):
        auth.authenticate_request([], mint_token(SECRET, lifetime=-5))


def test_authenticate_http():
    key = "k-123"
    both = Authenticator(secret=SECRET, api_key=key)
    assert both.authenticate_http([("X-API-Key", key)]).is_allow_all
    with pytest.raises(AuthError):
        both.authenticate_http([("X-API-Key", "wrong")])
    tok = mint_token(SECRET, publish=["a"])
    assert both.authenticate_http([("Authorization", "Bearer " + tok)]).publish == ("a",)
    with pytest.raises(AuthError):
        both.authenticate_http([])
    key_only = Authenticator(api_key=key)
    assert not key_only.enabled and key_only.has_api_key
    assert key_only.authenticate_http({"x-api-key": key}).is_allow_all
    with pytest.raises(AuthError):
        key_only.authenticate_http([("Authorization", "Bearer " + tok)])
    # with only a key, WebSocket requests stay open
    assert key_only.authenticate_request([]).is_allow_all
    assert Authenticator().authenticate_http([]).is_allow_all


def test_check_api_key():
    auth = Authenticator(api_key="the-key")
    assert auth.check_api_key("the-key")
    assert not auth.check_api_key("the-kez")
    assert not auth.check_api_key("")
    assert not auth.check_api_key(None)
    assert not auth.check_api_key("ключ")  # non-ASCII does not raise
    assert not Authenticator().check_api_key("the-key")
    assert not Authenticator().check_api_key(None)


# ------------------------------------------------------------ authorization


@pytest.mark.parametrize(
    "claims, topic, allowed",
    [
        (["news.*"], "news.eu", True),
        (["news.*"], "news", False),
        (["news.*"], "news.eu.fr", False),
        (["news.>"], "news.eu.fr", True),
        ([">"], "x", True),
        (["a", "b.c"], "b.c", True),
        ([], "a", False),
        (["news.*"], "news.*", False),  # wildcards are never publishable
        (["news.*"], "bad topic", False),
    ],
)
def test_can_publish(claims, topic, allowed):
    assert Claims(publish=tuple(claims)).can_publish(topic) is allowed
    # subscribe claims do not grant publishing
    assert Claims(subscribe=tuple(claims)).can_publish(topic) is False


SUBSCRIBE_CASES = [
    # the brief's examples
    (["news.*"], "news.*", True),
    (["news.*"], "news.>", False),
    (["news.>"], "news.*", True),
    (["news.>"], "news.>", True),
    (["news.>"], "news.*.x", True),
    (["*.eu", "news.*"], "news.*", True),
    (["a.*.c"], "a.*.*", False),
    ([">"], "a", True),
    ([">"], "*", True),
    ([">"], ">", True),
    ([">"], "a.*.>", True),
    # concrete topics
    (["news.*"], "news.eu", True),
    (["news.*"], "sport.eu", False),
    (["news.eu"], "news.eu", True),
    ([], "a", False),
    # unions
    (["a", "*.*"], "*", False),
    (["*"], "*", True),
    (["a.*", "a.*.>"], "a.>", True),
    (["a.*", "a.*.*"], "a.>", False),
    (["a.b", "a.c"], "a.*", False),
    (["a.b", "a.*"], "a.*", True),
    (["*.b", "a.*"], "*.*", False),
    (["*.b", "*.*"], "*.*", True),
    (["a.>", "*.b"], "*.b", True),
    (["a.>", "b.>"], "*.>", False),
    (["*.>"], ">", False),
    (["*", "*.>"], ">", True),
    (["*", "*.*", "*.*.>"], ">", True),
    (["*", "*.*.>"], ">", False),
    (["*.a.>", "*.*"], "*.*", True),
    (["a.>"], "a.b.*.>", True),
    (["a.*.>"], "a.>", False),
    (["a.*.c"], "a.b.c", True),
    (["a.*.c", "a.*.*"], "a.*.*", True),
    (["a.b.*", "a.*.c"], "a.b.c", True),
    (["a.b.*", "a.*.c"], "a.*.c", True),
    (["a.b.*", "a.*.c"], "a.b.*", True),
    (["a.b.*", "a.*.c"], "a.*.*", False),
    # invalid patterns
    ([">"], "a.>.b", False),
    ([">"], "", False),
]


@pytest.mark.parametrize("claims, pattern, allowed", SUBSCRIBE_CASES)
def test_can_subscribe(claims, pattern, allowed):
    assert Claims(subscribe=tuple(claims)).can_subscribe(pattern) is allowed
    assert Claims(publish=tuple(claims)).can_subscribe(pattern) is False
    if pattern:
        assert brute_force_cover(claims, pattern) is allowed or pattern == "a.>.b"


def test_allow_all_claims():
    c = Claims.allow_all()
    assert c is Claims.ALLOW_ALL and c.is_allow_all
    assert Claims(subscribe=(">",), publish=(">",)).is_allow_all
    # an expiring token is never "allow all": its expiry must still be enforced
    assert not Claims(exp=time.time() + 60, subscribe=(">",), publish=(">",)).is_allow_all
    assert not Claims(subscribe=(">",)).is_allow_all
    assert c.sub is None and c.exp is None
    assert c.can_subscribe("a.*.>") and c.can_publish("a.b")


def test_coverage_long_pattern_is_fast():
    claims = ["%s.>" % x for x in "abcdefgh"] + ["*." * 10 + "x"]
    start = time.perf_counter()
    assert Claims(subscribe=tuple(claims)).can_subscribe(".".join(["*"] * 100)) is False
    assert Claims(subscribe=tuple(claims + ["*.>"])).can_subscribe(".".join(["*"] * 100))
    assert time.perf_counter() - start < 10.0  # milliseconds here; an exponential search never ends


# ----------------------------------------------------- property: brute force

ALPHABET = ("a", "b", "c", "z")  # "z" never appears in claims: the fresh token


def brute_force_cover(claims: Sequence[str], pattern: str) -> bool:
    """Coverage by enumeration of every topic over ALPHABET plus the literals used.

    Exact: the alphabet holds a token no claim names ("z"), and topics longer than the
    longest pattern + 1 are covered exactly when their truncation to that length is.
    """
    words = {t for p in list(claims) + [pattern] for t in p.split(".") if t not in ("*", ">")}
    alphabet = sorted(set(ALPHABET) | words)
    assert "z" not in {t for c in claims for t in c.split(".")}
    longest = max([len(pattern.split("."))] + [len(c.split(".")) for c in claims])
    for length in range(1, longest + 2):
        for tokens in itertools.product(alphabet, repeat=length):
            topic = ".".join(tokens)
            if pattern_matches(pattern, topic) and not any(
                pattern_matches(c, topic) for c in claims
            ):
                return False
    return True


@st.composite
def patterns(draw) -> str:
    tokens: List[str] = draw(st.lists(st.sampled_from(["a", "b", "c", "*"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens[-1] = ">"
    return ".".join(tokens)


@settings(max_examples=400, deadline=None)
@given(claims=st.lists(patterns(), max_size=5), pattern=patterns())
def test_can_subscribe_matches_brute_force(claims, pattern):
    expected = brute_force_cover(claims, pattern)
    assert Claims(subscribe=tuple(claims)).can_subscribe(pattern) is expected


@st.composite
def length_split_covers(draw):
    """A pattern ending in '>' and claims that cover it only together (or almost).

    Without '>' one claim always covers a pattern alone (the one matching its all-fresh
    topic), so unions matter only across lengths: P = X.> is covered by X.*, X.*.*,
    ..., X.*...*.> together. Claims are then randomly generalised (still covering),
    one may be dropped (usually no longer covering) and noise patterns added.
    """
    prefix: List[str] = draw(st.lists(st.sampled_from(["a", "b", "c", "*"]), max_size=2))
    m = draw(st.integers(0, 2))
    claims = [prefix + ["*"] * n for n in range(1, m + 1)]
    claims.append(prefix + ["*"] * m + [">"])
    out = []
    for claim in claims:
        claim = [
            "*" if (i < len(prefix) and t != "*" and draw(st.integers(0, 4)) == 0) else t
            for i, t in enumerate(claim)
        ]
        out.append(".".join(claim))
    complete = True
    if draw(st.booleans()):
        out.pop(draw(st.integers(0, len(out) - 1)))
        complete = False
    out += draw(st.lists(patterns(), max_size=2))
    out = draw(st.permutations(out))
    return ".".join(prefix + [">"]), out, complete


@settings(max_examples=300, deadline=None)
@given(case=length_split_covers())
def test_can_subscribe_union_across_lengths(case):
    pattern, claims, complete = case
    expected = brute_force_cover(claims, pattern)
    if complete:
        assert expected
    assert Claims(subscribe=tuple(claims)).can_subscribe(pattern) is expected


@settings(max_examples=200, deadline=None)
@given(claims=st.lists(patterns(), min_size=1, max_size=5), data=st.data())
def test_can_subscribe_concrete_topics_exactly_when_a_claim_matches(claims, data):
    # a concrete topic is covered exactly when one claim matches it (an oracle without unions)
    c = Claims(subscribe=tuple(claims))
    own = data.draw(concrete_topic(data.draw(st.sampled_from(claims))))
    assert any(pattern_matches(p, own) for p in claims), (claims, own)  # the generator's own check
    assert c.can_subscribe(own) is True
    other = data.draw(concrete_topic(data.draw(patterns())))
    assert c.can_subscribe(other) is any(pattern_matches(p, other) for p in claims), (claims, other)


@st.composite
def concrete_topic(draw, pattern: str) -> str:
    """A topic without wildcards that ``pattern`` matches ("z" is a token no pattern names)."""
    out: List[str] = []
    for tok in pattern.split("."):
        if tok == "*":
            out.append(draw(st.sampled_from(["a", "b", "c", "z"])))
        elif tok == ">":
            out.extend(draw(st.lists(st.sampled_from(["a", "b", "z"]), min_size=1, max_size=2)))
        else:
            out.append(tok)
    return ".".join(out)


# --------------------------------------------------------------- redaction

JWT = mint_token(SECRET, sub="leak", lifetime=None, extra={"iat": 1700000000})  # (the same in every xdist worker)


@pytest.mark.parametrize(
    "text, secret",
    [
        ("GET /ws?token=abc123def HTTP/1.1", "abc123def"),
        ("GET /ws?x=1&token=abc123def&y=2", "abc123def"),
        ("/ws?access_token=abc123def", "abc123def"),
        ("Authorization: Bearer abc123def", "abc123def"),
        ("authorization: bearer abc123def\r\nHost: x", "abc123def"),
        ("Authorization: abc123def", "abc123def"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("X-API-Key: k-abc123def", "k-abc123def"),
        ("x-api-key:k-abc123def", "k-abc123def"),
        ("{'Authorization': 'Bearer abc123def'}", "abc123def"),
        ("[(b'authorization', b'Bearer abc123def')]", "abc123def"),
        ("[(b'x-api-key', b'k-abc123def')]", "k-abc123def"),
        ('{"token": "abc123def"}', "abc123def"),
        ("bad token " + JWT + " from 1.2.3.4", JWT),
        ("token:" + JWT, JWT),
    ],
)
def test_redact(text, secret):
    out = redact(text)
    assert secret not in out
    assert REDACTED in out
    assert redact(out) == out  # idempotent


def test_redact_keeps_other_text():
    assert redact("GET /ws?topic=a.b&since=3") == "GET /ws?topic=a.b&since=3"
    assert redact("subscribe news.* ok") == "subscribe news.* ok"
    assert redact("") == ""
    assert redact("Authorization: Bearer abc").startswith("Authorization: Bearer ")
    out = redact("GET /ws?token=" + JWT + "&topic=x")
    assert out == "GET /ws?token=[REDACTED]&topic=x"


def test_jwt_parts_not_left_behind():
    out = redact("x " + JWT + " y")
    for part in JWT.split("."):
        assert part not in out
    assert out == "x [REDACTED] y"


def _fresh_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.filters[:] = []
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_redacting_filter_on_logger():
    logger = _fresh_logger("test_auth.redact1")
    handler = Records()
    logger.addHandler(handler)
    logger.addFilter(RedactingFilter())
    logger.info("upgrade %s from %s", "/ws?token=" + JWT, "1.2.3.4")
    logger.info("plain %s", "Authorization: Bearer abc123def")
    logger.info("%d%% done", 100)
    rec = handler.records[0]
    assert rec.args == ()
    assert rec.msg == "upgrade /ws?token=[REDACTED] from 1.2.3.4"
    assert JWT not in handler.lines[0] and "abc123def" not in handler.lines[1]
    assert handler.lines[2] == "100% done"
    assert handler.records[2].msg == "100% done" and handler.records[2].args == ()


def test_redacting_filter_exception_text():
    logger = _fresh_logger("test_auth.redact2")
    handler = Records()
    logger.addHandler(handler)
    install_redaction(logger)
    try:
        raise ValueError("bad url /ws?token=" + JWT)
    except ValueError:
        logger.exception("failed")
    assert JWT not in handler.lines[0]
    assert "ValueError" in handler.lines[0] and REDACTED in handler.lines[0]


def test_install_redaction_covers_child_loggers_via_handlers():
    parent = _fresh_logger("test_auth.redact3")
    handler = Records()
    parent.addHandler(handler)
    install_redaction(parent)
    install_redaction(parent)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in parent.filters) == 1
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    child = logging.getLogger("test_auth.redact3.child")
    child.setLevel(logging.DEBUG)
    child.warning("key %s", "X-API-Key: k-abc123def")
    parent.warning("tok %s", JWT)
    assert len(handler.lines) == 2
    assert "k-abc123def" not in handler.lines[0]
    assert JWT not in handler.lines[1]


def test_install_redaction_on_root_handlers():
    root = logging.getLogger()
    handler = Records()
    root.addHandler(handler)
    old_level = root.level
    try:
        root.setLevel(logging.DEBUG)
        install_redaction_on_handlers()
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        logging.getLogger("test_auth.somewhere.deep").error("token=%s", "abc123def")
        assert handler.lines == ["token=[REDACTED]"]
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# ------------------------------------------------------------------ secrets


def test_load_secret(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text("  from-file\n")
    monkeypatch.setenv("WSB_TEST_SECRET", "from-env")
    assert load_secret("explicit", str(f), "WSB_TEST_SECRET") == "explicit"
    assert load_secret(None, str(f), "WSB_TEST_SECRET") == "from-file"
    assert load_secret(None, None, "WSB_TEST_SECRET") == "from-env"
    monkeypatch.setenv("WSB_TEST_SECRET", "")
    assert load_secret(None, None, "WSB_TEST_SECRET") is None
    monkeypatch.delenv("WSB_TEST_SECRET")
    assert load_secret(None, None, "WSB_TEST_SECRET") is None
    with pytest.raises(ConfigError, match="empty"):
        load_secret("", None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_secret(None, str(empty))
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        load_secret(None, str(tmp_path / "missing"))


def test_load_secret_default_env(monkeypatch):
    monkeypatch.setenv("WSBROADCAST_SECRET", "default-env")
    assert load_secret(None, None) == "default-env"
