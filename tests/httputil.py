"""HTTP helpers for tests: raw requests, the publish endpoint, /healthz and /metrics."""

from __future__ import annotations

import json
from typing import Any, Iterable, List, Optional, Tuple

import wsraw

DEFAULT_TIMEOUT = 10.0


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: Iterable[Tuple[str, str]] = (), timeout: float = DEFAULT_TIMEOUT
            ) -> Tuple[int, dict, bytes]:
    """One request on its own connection (``Connection: close``); (status, headers, body)."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port, "Connection: close"]
    if body or method in ("POST", "PUT"):
        lines.append("Content-Length: %d" % len(body))
    lines.extend("%s: %s" % kv for kv in headers)
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return wsraw.http_request(port, raw, timeout)


def http_json(port: int, method: str, path: str, body: Any = None,
              headers: Iterable[Tuple[str, str]] = (), timeout: float = DEFAULT_TIMEOUT
              ) -> Tuple[int, Any]:
    """A JSON request (``body`` encoded when given); (status, decoded body or None)."""
    hdrs = list(headers)
    data = b""
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        hdrs.append(("Content-Type", "application/json"))
    status, _h, raw = request(port, method, path, data, hdrs, timeout)
    return status, (json.loads(raw) if raw else None)


def publish_raw(port: int, topic: str, data: Any, headers: Iterable[Tuple[str, str]] = (),
                timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, dict, bytes]:
    """POST /publish; (status, headers, raw body)."""
    body = json.dumps({"topic": topic, "data": data}).encode("utf-8")
    return request(port, "POST", "/publish", body,
                   [("Content-Type", "application/json")] + list(headers), timeout)


def publish(port: int, topic: str, data: Any, headers: Iterable[Tuple[str, str]] = (),
            timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, Any]:
    """POST /publish; (status, decoded answer)."""
    status, _h, raw = publish_raw(port, topic, data, headers, timeout)
    return status, (json.loads(raw) if raw else None)


def publish_ok(port: int, topic: str, data: Any, headers: Iterable[Tuple[str, str]] = ()) -> dict:
    """POST /publish that must answer 200; the answer ({"topic", "seq", ...})."""
    status, doc = publish(port, topic, data, headers)
    assert status == 200, (status, doc)
    return doc


def history(port: int, topic: str, since: Optional[int] = None, limit: Optional[int] = None) -> List[dict]:
    """GET /history of ``topic`` (must answer 200): the stored messages."""
    path = "/history?topic=" + topic
    if since is not None:
        path += "&since=%d" % since
    if limit is not None:
        path += "&limit=%d" % limit
    status, body = http_json(port, "GET", path)
    assert status == 200, (status, body)
    return body


def healthz(port: int) -> Tuple[int, dict]:
    """GET /healthz; (status, decoded body)."""
    status, doc = http_json(port, "GET", "/healthz")
    return status, doc


def health_status(port: int) -> str:
    """The "status" of GET /healthz (ok, degraded, shutting_down)."""
    return healthz(port)[1]["status"]


def metric_line(port: int, name: str) -> Optional[str]:
    """The first /metrics line of ``name`` (a bare name or ``name{labels}``), or None."""
    status, _h, body = request(port, "GET", "/metrics")
    assert status == 200, status
    prefixes = (name + " ",) if "{" in name else (name + " ", name + "{")
    for line in body.decode("utf-8").splitlines():
        if line.startswith(prefixes):
            return line
    return None


def metric(port: int, name: str) -> float:
    """The value of one /metrics sample (0 when absent)."""
    line = metric_line(port, name)
    return float(line.rpartition(" ")[2]) if line else 0.0
