"""Authentication and authorization: JWT verification, claims, API keys, log redaction.

PROTOCOL.md section 8. Authentication is on when a secret (HS256/384/512) or a public
key (RS*, ES*, EdDSA; PEM) is configured. Tokens are JWTs whose claims ``subscribe``
and ``publish`` are lists of topic patterns; a missing claim allows nothing.

Authorization of a wildcard subscription is exact: a pattern is allowed when *every*
topic it can match is matched by at least one of the claim's patterns
(:meth:`Claims.can_subscribe`).

Tokens and keys never appear in error messages; :func:`redact` and
:class:`RedactingFilter` keep them out of logs. A filter added to a logger only sees
records logged *on that logger*, not those propagated from its children, so the server
should call :func:`install_redaction_on_handlers` (every handler of the root logger)
and/or :func:`install_redaction` on the ``wsbroadcast`` logger, which filters its
handlers too.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import (
    Any,
    ClassVar,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.utils import base64url_decode

from .envelope import parse_json
from .errors import AuthError, ConfigError, TopicError
from .topics import pattern_matches, validate_pattern, validate_topic

__all__ = [
    "Claims",
    "Authenticator",
    "mint_token",
    "redact",
    "RedactingFilter",
    "install_redaction",
    "install_redaction_on_handlers",
    "load_secret",
    "patterns_cover",
    "REDACTED",
]

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"

#: Tokens longer than this are refused before any parsing.
MAX_TOKEN_LENGTH = 16384

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

HeadersLike = Union[
    Mapping[Any, Any],
    Iterable[Tuple[Union[str, bytes], Union[str, bytes]]],
]


# --------------------------------------------------------------------------- claims


def _parse_pattern_claim(payload: Mapping[str, Any], name: str) -> Tuple[str, ...]:
    if name not in payload:
        return ()
    value = payload[name]
    if not isinstance(value, (list, tuple)):
        raise AuthError(f"invalid '{name}' claim: not a list")
    try:
        return tuple(validate_pattern(p) for p in value)
    except TopicError:
        raise AuthError(f"invalid '{name}' claim: bad topic pattern") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Claims:
    """What a bearer may do: ``subscribe`` and ``publish`` are validated topic patterns.

    Build from a verified payload with :meth:`from_payload`; :meth:`allow_all` is the
    claim set used when authentication is off (``>`` for both).
    """

    sub: Optional[str] = None
    exp: Optional[float] = None
    subscribe: Tuple[str, ...] = ()
    publish: Tuple[str, ...] = ()
    #: subscriptions granted on connect (PROTOCOL.md "Presence"); they also allow subscribing
    channels: Tuple[str, ...] = ()

    ALLOW_ALL: ClassVar["Claims"]

    def __post_init__(self) -> None:
        # Normalise lists to tuples and validate (programming errors raise TopicError).
        object.__setattr__(self, "subscribe", tuple(validate_pattern(p) for p in self.subscribe))
        object.__setattr__(self, "publish", tuple(validate_pattern(p) for p in self.publish))
        object.__setattr__(self, "channels", tuple(validate_pattern(p) for p in self.channels))

    @classmethod
    def allow_all(cls) -> "Claims":
        """The unrestricted claims used when authentication is disabled."""
        return cls.ALLOW_ALL

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "Claims":
        """Claims of a verified JWT payload; raise AuthError when a claim is malformed."""
        if not isinstance(payload, Mapping):
            raise AuthError("invalid token payload")
        sub = payload.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise AuthError("invalid 'sub' claim")
        exp = payload.get("exp")
        if exp is not None:
            if not _is_number(exp):
                raise AuthError("invalid 'exp' claim")
            exp = float(exp)
        return cls(
            sub=sub,
            exp=exp,
            subscribe=_parse_pattern_claim(payload, "subscribe"),
            publish=_parse_pattern_claim(payload, "publish"),
            channels=_parse_pattern_claim(payload, "channels"),
        )

    @property
    def is_allow_all(self) -> bool:
        """True when these claims restrict nothing: every topic both ways and no ``exp``.

        A token granting ``>`` both ways but carrying ``exp`` is not allow-all, so a
        caller that drops allow-all claims still enforces the expiry.
        """
        return ">" in self.subscribe and ">" in self.publish and self.exp is None

    def seconds_left(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until ``exp`` (negative once past), or None without ``exp``."""
        if self.exp is None:
            return None
        return self.exp - (time.time() if now is None else now)

    def is_expired(self, now: Optional[float] = None, leeway: float = 0) -> bool:
        """True when ``exp`` is present and ``now`` is past it (plus ``leeway``)."""
        left = self.seconds_left(now)
        return left is not None and left + leeway <= 0

    def can_publish(self, topic: str) -> bool:
        """True when the concrete ``topic`` is matched by a ``publish`` pattern.

        An invalid or wildcard topic gives False (validate it first for ``bad_topic``).
        """
        try:
            validate_topic(topic)
        except TopicError:
            return False
        return any(pattern_matches(p, topic) for p in self.publish)

    def can_subscribe(self, pattern: str) -> bool:
        """True when every topic ``pattern`` can match is matched by a ``subscribe`` pattern.

        For a concrete topic that is "some pattern matches it"; for a wildcard pattern the
        union of the claim's patterns must cover its whole language (exact check, see
        :func:`patterns_cover`). An invalid pattern gives False.
        """
        try:
            validate_pattern(pattern)
        except TopicError:
            return False
        return patterns_cover(self.subscribe + self.channels if self.channels else self.subscribe,
                              pattern)


Claims.ALLOW_ALL = Claims(sub=None, exp=None, subscribe=(">",), publish=(">",))


# ------------------------------------------------------------- wildcard coverage


def patterns_cover(claims: Sequence[str], pattern: str) -> bool:
    """True when every topic matched by ``pattern`` is matched by one of ``claims``.

    Both are assumed valid patterns. Exact, in polynomial time:

    - A pattern without ``>`` is covered by a union only if one claim covers it alone:
      the topic with the pattern's literals and, at each ``*``, a token no claim names
      must be matched by some claim, and such a claim has ``*`` (or an earlier ``>``) at
      every ``*`` position and a matching token at every literal one, so it matches
      every topic of the pattern.
    - ``X.>`` is the union over lengths L of the slices ``X.*...*`` (L tokens), each
      without ``>``; so it is covered when every slice is covered by one claim. Slices
      longer than every claim are covered only by ``>`` claims, identically for all
      such lengths, so lengths up to (longest claim + 1) decide.

    The 255-byte topic limit is ignored, which can only make the answer stricter.
    """
    p = pattern.split(".")
    if not any(t == "*" or t == ">" for t in p):
        return any(pattern_matches(c, pattern) for c in claims)
    cs: List[List[str]] = [c.split(".") for c in claims]
    if p[-1] != ">":
        return any(_single_covers(c, p) for c in cs)
    head = p[:-1]
    longest = max([len(c) for c in cs] + [len(p)])
    for length in range(len(p), longest + 2):
        piece = head + ["*"] * (length - len(head))
        if not any(_single_covers(c, piece) for c in cs):
            return False
    return True


def _single_covers(c: List[str], p: List[str]) -> bool:
    """True when claim ``c`` alone matches every topic of pattern ``p``."""
    for i, ct in enumerate(c):
        if ct == ">":
            return len(p) > i
        if i >= len(p):
            return False
        pt = p[i]
        if pt == ">":
            return False
        if ct != "*" and ct != pt:
            return False
    return len(c) == len(p)


# ------------------------------------------------------------------ authenticator


def _load_public_key(public_key: Union[str, bytes]) -> Tuple[Any, Tuple[str, ...]]:
    data = public_key.encode("ascii") if isinstance(public_key, str) else bytes(public_key)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            from cryptography import x509

            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except Exception:
        raise ValueError("public_key is not a PEM public key or certificate") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return key, (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key, ("EdDSA",)
    raise ValueError("unsupported public key type")


def _text(value: Union[str, bytes]) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


def _header_values(headers: HeadersLike, name: str) -> List[str]:
    """Every value of header ``name`` (case-insensitive) from a mapping or pair list."""
    items: Iterable[Any]
    if hasattr(headers, "items"):
        items = headers.items()  # type: ignore[union-attr]
    else:
        items = headers
    out = []
    for key, value in items:
        if _text(key).strip().lower() == name:
            out.append(_text(value).strip())
    return out


#: what each PyJWT failure is called in an answer (most specific first); never the token
_JWT_ERRORS = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.DecodeError, "malformed token"),
)


def _jwt_error_text(exc: Exception) -> str:
    for cls, text in _JWT_ERRORS:
        if isinstance(exc, cls):
            return text
    return "invalid token"


class Authenticator:
    """Verifies JWTs and API keys.

    ``secret`` enables HS256/HS384/HS512; ``public_key`` (PEM public key or certificate)
    enables the algorithms of its key type only (RSA: RS256/384/512; EC P-256/384/521:
    ES256/384/512; Ed25519/Ed448: EdDSA). The key is chosen by the token's ``alg``
    family, so a public key is never used as an HMAC secret and ``alg: none`` is
    refused. ``audience``/``issuer``, when set, are required and checked; when unset an
    ``aud`` claim is ignored.
    """

    def __init__(
        self,
        secret: Optional[str] = None,
        public_key: Optional[Union[str, bytes]] = None,
        api_key: Optional[str] = None,
        leeway: float = 0,
        audience: Optional[str] = None,
        issuer: Optional[str] = None,
    ) -> None:
        if secret is not None and not secret:
            raise ValueError("secret is empty")
        if api_key is not None and not api_key:
            raise ValueError("api_key is empty")
        if secret is not None and len(secret.encode("utf-8")) < 32:
            log.warning("the JWT secret is shorter than 32 bytes; use a longer one")
        self._secret = secret.encode("utf-8") if secret is not None else None
        self._public_key: Any = None
        self._public_algorithms: Tuple[str, ...] = ()
        if public_key is not None:
            self._public_key, self._public_algorithms = _load_public_key(public_key)
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self.leeway = float(leeway)
        self.audience = audience
        self.issuer = issuer

    def __repr__(self) -> str:  # never shows key material
        return "Authenticator(enabled=%r, algorithms=%r, api_key=%s)" % (
            self.enabled,
            self.algorithms,
            "set" if self._api_key is not None else "unset",
        )

    @property
    def enabled(self) -> bool:
        """True when tokens are required (a secret or a public key is configured)."""
        return self._secret is not None or self._public_key is not None

    @property
    def has_api_key(self) -> bool:
        """True when an API key is configured."""
        return self._api_key is not None

    @property
    def algorithms(self) -> Tuple[str, ...]:
        """The JWT algorithms this authenticator accepts."""
        algs: Tuple[str, ...] = ()
        if self._secret is not None:
            algs += HMAC_ALGORITHMS
        return algs + self._public_algorithms

    def verify(self, token: str) -> Claims:
        """Verify ``token`` and return its claims; raise AuthError on any failure.

        The error message never contains the token.
        """
        if not self.enabled:
            raise AuthError("token authentication is not configured")
        if not isinstance(token, str) or not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("malformed token: too long")
        try:
            # PyJWT decodes the header before any check, recursively: read it strictly
            # first (depth, numbers) so that no token can exhaust a thread's stack
            parse_json(base64url_decode(token.split(".", 1)[0]).decode("utf-8"))
            header = jwt.get_unverified_header(token)
        except Exception:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("malformed token: no algorithm")
        key: Any
        if alg in HMAC_ALGORITHMS and self._secret is not None:
            key, algorithms = self._secret, list(HMAC_ALGORITHMS)
        elif alg in self._public_algorithms:
            key, algorithms = self._public_key, list(self._public_algorithms)
        else:
            raise AuthError("token algorithm not accepted")
        options: Any = {"verify_aud": self.audience is not None}  # PyJWT's Options TypedDict
        require = []
        if self.audience is not None:
            require.append("aud")
        if self.issuer is not None:
            require.append("iss")
        options["require"] = require
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=options,
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(_jwt_error_text(exc)) from None
        except Exception:  # e.g. a key type error deep in cryptography
            log.debug("unexpected error verifying a token", exc_info=False)
            raise AuthError("invalid token") from None
        return Claims.from_payload(payload)

    def check_api_key(self, key: Optional[str]) -> bool:
        """True when ``key`` equals the configured API key (constant time); False without one."""
        if self._api_key is None or not key:
            return False
        if isinstance(key, bytes):
            candidate = key
        else:
            candidate = str(key).encode("utf-8", "surrogatepass")
        return hmac.compare_digest(candidate, self._api_key)

    @staticmethod
    def extract_token(headers: HeadersLike, query_token: Optional[str] = None) -> Optional[str]:
        """The presented token: ``Authorization: Bearer X`` wins over ``?token=``.

        Authorization headers of other schemes are ignored. A Bearer header with an empty
        value gives ``""`` (presented but malformed).
        """
        for value in _header_values(headers, "authorization"):
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer":
                return rest.strip()
        if query_token:
            return query_token
        return None

    def authenticate_request(
        self, headers: HeadersLike, query_token: Optional[str] = None
    ) -> Claims:
        """Claims of a WebSocket upgrade (or HTTP) request.

        With authentication disabled this returns :meth:`Claims.allow_all` (never None).
        Enabled, a missing or invalid token raises AuthError (answer 401).
        ``headers``: a mapping or (name, value) pairs, str or bytes.
        """
        if not self.enabled:
            return Claims.allow_all()
        token = self.extract_token(headers, query_token)
        if token is None:
            raise AuthError("missing token")
        if not token:
            raise AuthError("malformed token")
        return self.verify(token)

    def authenticate_http(
        self, headers: HeadersLike, query_token: Optional[str] = None
    ) -> Claims:
        """Claims for ``POST /publish`` and ``GET /history`` (PROTOCOL 8).

        - nothing configured: :meth:`Claims.allow_all`;
        - an ``X-API-Key`` header when a key is configured: allow_all if it is right,
          AuthError if it is wrong;
        - otherwise with tokens enabled: :meth:`authenticate_request`;
        - with only an API key configured and none sent: AuthError.
        """
        if not self.enabled and self._api_key is None:
            return Claims.allow_all()
        if self._api_key is not None:
            keys = _header_values(headers, "x-api-key")
            if keys:
                if self.check_api_key(keys[0]):
                    return Claims.allow_all()
                raise AuthError("bad API key")
        if self.enabled:
            return self.authenticate_request(headers, query_token)
        raise AuthError("missing API key")


# ------------------------------------------------------------------------ minting


def mint_token(
    key: Union[str, bytes],
    algorithm: str = "HS256",
    sub: Optional[str] = None,
    subscribe: Iterable[str] = (),
    publish: Iterable[str] = (),
    lifetime: Optional[float] = 3600,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Sign a token with ``key`` (a secret for HS*, a private key PEM otherwise).

    The payload has ``iat``, ``exp`` (now + ``lifetime``; none when ``lifetime`` is
    None), ``sub`` when given, and ``subscribe``/``publish`` lists (validated patterns).
    ``extra`` is merged last and may override any of them.
    """
    now = int(time.time())
    payload: Dict[str, Any] = {"iat": now}
    if lifetime is not None:
        payload["exp"] = int(now + lifetime)
    if sub is not None:
        payload["sub"] = sub
    payload["subscribe"] = [validate_pattern(p) for p in subscribe]
    payload["publish"] = [validate_pattern(p) for p in publish]
    if extra:
        payload.update(extra)
    token = jwt.encode(payload, key, algorithm=algorithm)
    return token.decode("ascii") if isinstance(token, bytes) else token


# ---------------------------------------------------------------------- redaction

# Lookaheads keep redact() idempotent (no atomic groups before Python 3.11).
_NOT_DONE = r"(?!\[REDACTED\])(?!b['\"])"
_VALUE = r"[^\s'\"&#;,(){}\[\]<>]+"

_REDACTIONS = [
    # ?token=... / &access_token=... / api_key=...
    (
        re.compile(r"(?i)(\b(?:access_token|token|api_key|apikey)=)" + _NOT_DONE + r"[^\s'\"&#;<>]+"),
        r"\1" + REDACTED,
    ),
    # Authorization: Bearer X / Authorization: X (also dict/tuple reprs)
    (
        re.compile(
            r"(?i)(\bauthorization(?:['\"]?\s*[:=]|['\"]\s*,)\s*(?:b?['\"])?"
            r"(?:(?:bearer|basic|token|digest|negotiate)\s+)?)"
            + _NOT_DONE
            + r"(?!(?:bearer|basic|token|digest|negotiate)\s+\S)"
            + _VALUE
        ),
        r"\1" + REDACTED,
    ),
    # X-API-Key: K
    (
        re.compile(r"(?i)(\bx-api-key(?:['\"]?\s*[:=]|['\"]\s*,)\s*(?:b?['\"])?)" + _NOT_DONE + _VALUE),
        r"\1" + REDACTED,
    ),
    # "token": "..." in JSON-ish text
    (
        re.compile(r"(?i)([\"'](?:access_token|token|api_key)[\"']\s*:\s*[\"'])" + _NOT_DONE + r"[^\"']+"),
        r"\1" + REDACTED,
    ),
    # a bare JWT anywhere
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
]


def redact(text: str) -> str:
    """Replace tokens and keys in ``text`` with ``[REDACTED]`` (idempotent).

    Covers ``token=``/``access_token=``/``api_key=`` parameters, ``Authorization``
    and ``X-API-Key`` header values, ``"token": "..."`` and any bare JWT
    (``eyJ...``.``...``.``...``).
    """
    if not text:
        return text
    for regex, repl in _REDACTIONS:
        text = regex.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message, exception and stack text.

    Sets ``record.msg`` to the redacted message and ``record.args`` to ``()``; never
    drops a record. Safe to apply twice to the same record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_wsb_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # let the handler report the formatting error
            return True
        record.msg = redact(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            try:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            except Exception:
                pass
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._wsb_redacted = True  # type: ignore[attr-defined]
        return True


_FILTER = RedactingFilter()


def _add_filter(target: Union[logging.Logger, logging.Handler]) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(_FILTER)


def install_redaction(logger: Optional[logging.Logger] = None) -> RedactingFilter:
    """Add the redacting filter to ``logger`` (default ``wsbroadcast``) and its handlers.

    The logger-level filter only sees records logged on that very logger; the handler
    filters also see records propagated from child loggers. Handlers added later are
    not covered. Idempotent.
    """
    if logger is None:
        logger = logging.getLogger("wsbroadcast")
    _add_filter(logger)
    for handler in logger.handlers:
        _add_filter(handler)
    return _FILTER


def install_redaction_on_handlers(logger: Optional[logging.Logger] = None) -> RedactingFilter:
    """Add the redacting filter to every handler of ``logger`` (default the root logger).

    Call after logging is configured: every record that reaches those handlers, from
    any logger, is redacted. Idempotent.
    """
    if logger is None:
        logger = logging.getLogger()
    for handler in logger.handlers:
        _add_filter(handler)
    return _FILTER


# ------------------------------------------------------------------------ secrets


def load_secret(
    secret: Optional[str],
    secret_file: Optional[str],
    env_var: str = "WSBROADCAST_SECRET",
) -> Optional[str]:
    """The configured secret: ``secret``, else the stripped content of ``secret_file``,
    else the environment variable ``env_var``; None when none is set.

    An explicit empty secret, an empty or unreadable file raise ConfigError (never
    silently turn authentication off); an empty environment variable counts as unset.
    """
    if secret is not None:
        if not secret:
            raise ConfigError("the secret is empty: give one with --secret, --secret-file or "
                              "$WSBROADCAST_SECRET")
        return secret
    if secret_file:
        try:
            with open(secret_file, "r", encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError("cannot read the secret file %s: %s; give a readable file with --secret-file"
                              % (secret_file, exc.strerror or exc)) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError("the secret file %s is not UTF-8 text; put the secret in it as one line"
                              % secret_file) from exc
        if not value:
            raise ConfigError("the secret file %s is empty; put the secret in it as one line" % secret_file)
        return value
    value = os.environ.get(env_var, "").strip() if env_var else ""
    return value or None
