"""Tokens and keys for tests: HS256 tokens minted by the package, hand-built bad ones, key pairs."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from typing import Any, Iterable, Optional, Tuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsbroadcast.auth import mint_token

SECRET = "security-test-secret-0123456789-abcdef"  # >= 32 bytes: no PyJWT key warning
OTHER_SECRET = "another-secret-entirely-0123456789-xyz"


def b64(data: bytes) -> str:
    """Unpadded base64url, as in JWTs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def token(key: Any = SECRET, algorithm: str = "HS256", sub: str = "ann", subscribe: Iterable[str] = (),
          publish: Iterable[str] = (), lifetime: Optional[float] = 60.0) -> str:
    """A valid token minted by the package."""
    return mint_token(key, algorithm=algorithm, sub=sub, subscribe=subscribe, publish=publish,
                      lifetime=lifetime)


def expired_token(key: Any = SECRET, algorithm: str = "HS256") -> str:
    """A token that expired a minute ago (allowed everything)."""
    now = int(time.time())
    return jwt.encode({"sub": "ann", "iat": now - 120, "exp": now - 60, "subscribe": [">"],
                       "publish": [">"]}, key, algorithm=algorithm)


def unsigned_token(alg: str = "none") -> str:
    """A token with an empty signature and the given ``alg``."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "ann", "exp": int(time.time()) + 60, "subscribe": [">"],
                           "publish": [">"]}).encode())
    return head + "." + body + "."


def raw_token(header: dict, payload: dict, key: bytes = b"", sign: bool = True) -> str:
    """A token built by hand: any header and payload, HMAC-SHA256 signed with ``key`` unless not ``sign``."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = (head + "." + body).encode("ascii")
    sig = b64(hmac.new(key, signing_input, hashlib.sha256).digest()) if sign else ""
    return head + "." + body + "." + sig


def hs256_with_key(key: bytes) -> str:
    """An HS256 token signed with raw ``key`` bytes (PyJWT refuses PEM keys as secrets)."""
    return raw_token({"alg": "HS256", "typ": "JWT"},
                     {"sub": "ann", "exp": int(time.time()) + 60, "subscribe": [">"], "publish": [">"]},
                     key)


def pem_pair(private_key: Any) -> Tuple[bytes, bytes]:
    """(private PKCS8 PEM, public SubjectPublicKeyInfo PEM) of a cryptography private key."""
    private = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@functools.lru_cache(maxsize=None)
def rsa_pair(n: int = 0) -> Tuple[bytes, bytes]:
    """An RSA-2048 key pair as PEM, made once per process per ``n`` (n=1: another pair)."""
    return pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@functools.lru_cache(maxsize=None)
def ec_pair(n: int = 0) -> Tuple[bytes, bytes]:
    """A P-256 key pair as PEM, made once per process per ``n``."""
    return pem_pair(ec.generate_private_key(ec.SECP256R1()))
