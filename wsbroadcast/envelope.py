"""The JSON envelope: client frames parsed into commands, server frames built from values.

Sans-I/O: text in, command objects out; values in, bytes out (PROTOCOL.md sections 3-4).
"""

from __future__ import annotations

import itertools
import json
import operator
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

from .errors import ErrorCode, ProtocolError, TopicError
from .topics import is_wildcard, validate_pattern, validate_topic

PLAIN = "plain"
V1 = "v1"
SUBPROTOCOL = "wsbroadcast.v1"
SEED_TOPIC = "broadcast"

#: deepest nesting of arrays and objects accepted in JSON from a client (PROTOCOL.md section 3)
MAX_DEPTH = 64

_MISSING = object()
#: the ``id`` of a frame that answers no client frame: the field is left out
NO_ID = _MISSING
# allow_nan=False: NaN and Infinity are not JSON; nothing the server sends may hold them
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class Subscribe(NamedTuple):
    topic: str
    id: Any
    since: Optional[int]
    epoch: Optional[str]
    join_leave: bool = False  # v1 only: receive the topic's joins and leaves


class Unsubscribe(NamedTuple):
    topic: str
    id: Any


class Publish(NamedTuple):
    topic: str
    data: str  # JSON text of the published value
    id: Any  # _MISSING when the frame carried no id


class Ping(NamedTuple):
    id: Any


class PresenceQuery(NamedTuple):
    """A v1 ``presence`` (``stats`` False) or ``presence_stats`` frame."""

    topic: str
    id: Any
    stats: bool


class Invalid(NamedTuple):
    """A refused frame: answered with an error frame."""

    code: ErrorCode
    message: str
    id: Any


Command = Union[Subscribe, Unsubscribe, Publish, Ping, PresenceQuery, Invalid]


def has_id(value: Any) -> bool:
    """True when a command carried an ``id``."""
    return value is not _MISSING


_dumps_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


def encode_json(value: Any) -> str:
    """Compact strict JSON text of ``value``, always valid UTF-8.

    Raises ValueError for a float that is not finite (or a cycle), TypeError for a value
    JSON has no form for.

    Strings holding lone surrogates (from JSON escapes like ``\\ud800``) are written
    with escapes, since they have no UTF-8 form.
    """
    text = _dumps(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _dumps_ascii(value)
    return text


#: bytes kept to find the nesting: quotes and brackets (UTF-8 never has them inside a
#: character), with '{' and '}' read as '[' and ']'
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_STEPS = bytes.maketrans(b"[]", b"\x02\x00")
#: rounds of peeling leaves off before the rest is walked: most JSON is shallower than this
_PEELS = 8


def _max_depth(brackets: bytes) -> int:
    """The deepest prefix nesting of a string of '[' and ']' (iterated at C speed)."""
    if not brackets:
        return 0
    # after i steps of +1/-1 the depth is (2 * opens so far) - i
    return max(0, max(map(operator.sub, itertools.accumulate(brackets.translate(_STEPS)),
                          itertools.count(1))))


def depth_within(text: str, limit: int = MAX_DEPTH) -> bool:
    """False when ``text`` nests arrays and objects more than ``limit`` deep; no recursion.

    Exact for JSON (brackets inside strings do not count). Invalid text is never judged
    shallower than the depth a decoder reaches before it finds the fault, so a decoder
    can be trusted with any text this accepts. Cost: linear, at C speed.
    """
    if text.count("[") + text.count("{") <= limit:
        return True  # the common case: a count at C speed
    if "\\" in text:
        # escaped backslashes, then escaped quotes: what is left of a backslash no longer
        # hides a quote (outside strings a backslash is a fault the decoder stops at)
        text = text.replace("\\\\", "").replace('\\"', "")
    skeleton = text.encode("utf-8", "surrogatepass").translate(_AS_BRACKETS, _NOT_STRUCTURE)
    if b'"' in skeleton:
        # two quotes in a row have no bracket outside strings between them: dropping them
        # keeps every bracket in or out of strings as it was (and strings without brackets go)
        skeleton = skeleton.replace(b'""', b"")
        if b'"' in skeleton:
            # between quotes: strings; an unterminated one runs to the end, where the decoder stops
            skeleton = b"".join(skeleton.split(b'"')[::2])
        if skeleton.count(b"[") <= limit:
            return True
    # Peeling the innermost pairs off lowers the deepest nesting by exactly one per round
    # (the deepest '[' is always followed by its ']'); text that closes more than it opened
    # is invalid and may be judged deeper than it is, which is bad_json all the same.
    rest, peeled = skeleton, 0
    while True:
        shorter = rest.replace(b"[]", b"")
        if len(shorter) == len(rest):  # no pair left: some ']' then some '['
            closes = len(rest) - len(rest.lstrip(b"]"))
            deepest = max(0, len(rest) - 2 * closes)
            break
        rest, peeled = shorter, peeled + 1
        if peeled == _PEELS:
            deepest = _max_depth(rest)
            break
    return deepest + peeled <= limit


def _reject_constant(name: str) -> Any:
    raise ValueError("invalid JSON constant " + name)


_INF = float("inf")


def _finite_float(text: str) -> float:
    value = float(text)
    if value == _INF or value == -_INF:
        raise ValueError("number is not finite as a double")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    if len(text) > 308:
        try:
            float(value)
        except OverflowError:
            raise ValueError("number is not finite as a double") from None
    return value


_decode_plain = json.JSONDecoder(parse_constant=_reject_constant).decode
_decode = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float).decode
_decode_checked = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                                   parse_int=_finite_int).decode
#: a digit as '0', 'e' or 'E' as 'e', any other byte as a space
_NUMBER_SHAPE = bytes(48 if 48 <= c <= 57 else 101 if c in b"eE" else 32 for c in range(256))


def parse_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON: no NaN/Infinity, every number finite as a double, nested at most
    ``max_depth`` deep (PROTOCOL.md section 3); raises ValueError."""
    if not depth_within(text, max_depth):
        raise ValueError("JSON nested deeper than %d levels" % max_depth)
    if len(text) <= 308:
        return _decode(text)  # a hook on each float: few fit in such a text
    # A number overflows a double only with an exponent (a digit, then 'e') or with 309
    # digits or more. Text with neither (found at C speed) needs no hook per number.
    shape = text.encode("utf-8", "surrogatepass").translate(_NUMBER_SHAPE)
    if b"0e" in shape or (b"0" * 16 in shape and max(map(len, shape.split())) > 308):
        return _decode_checked(text)
    return _decode_plain(text)


_decode_lenient = json.JSONDecoder().decode  # takes NaN, Infinity and 1e400 (as inf)


def _finite_or_null(value: Any) -> Any:
    if type(value) is float:
        return value if value - value == 0.0 else None  # inf - inf and nan - nan are nan
    if type(value) is list:
        return [_finite_or_null(v) for v in value]
    if type(value) is dict:
        return {k: _finite_or_null(v) for k, v in value.items()}
    return value


def strict_text(text: str) -> str:
    """Stored or relayed JSON text (perhaps written by an older version) as strict JSON.

    NaN and Infinity, which older versions let through, become null, as a browser's
    ``JSON.stringify`` writes them (and text holding them that is not JSON at all, or
    too deep, becomes null). Text without those words is returned as it is: the cost
    is two substring searches.
    """
    if "NaN" not in text and "Infinity" not in text:
        return text
    try:
        parse_json(text)
        return text  # the words were inside strings
    except ValueError:
        pass
    if not depth_within(text):
        return "null"
    try:
        return encode_json(_finite_or_null(_decode_lenient(text)))
    except (ValueError, RecursionError):
        return "null"


def parse_client_frame(text: str, kind: str) -> Command:
    """Parse one client text frame of a ``plain`` or ``v1`` connection into a command."""
    try:
        obj = parse_json(text)
    except (ValueError, RecursionError):
        return Invalid(ErrorCode.BAD_JSON, "frame is not valid JSON", _MISSING)
    if not isinstance(obj, dict):
        return Invalid(ErrorCode.BAD_REQUEST, "frame must be a JSON object", _MISSING)
    ident = obj.get("id", _MISSING)
    kind_of = obj.get("type", _MISSING)
    try:
        if kind_of == "publish":
            topic = validate_topic(_field(obj, "topic"))
            if "data" not in obj:
                raise ProtocolError("publish needs 'data'")
            return Publish(topic, encode_json(obj["data"]), ident)
        if kind_of == "subscribe":
            pattern = validate_pattern(_field(obj, "topic"))
            since = obj.get("since")
            epoch = obj.get("epoch")
            if since is not None:
                if type(since) is not int or since < 0:
                    raise ProtocolError("'since' must be a non-negative integer")
                if is_wildcard(pattern):
                    raise ProtocolError("'since' is not allowed on a wildcard pattern")
            if epoch is not None and not isinstance(epoch, str):
                raise ProtocolError("'epoch' must be a string")
            join_leave = False
            if kind != PLAIN:
                join_leave = obj.get("join_leave", False)
                if type(join_leave) is not bool:
                    raise ProtocolError("'join_leave' must be true or false")
                if join_leave and is_wildcard(pattern):
                    raise ProtocolError("'join_leave' is not allowed on a wildcard pattern")
            return Subscribe(pattern, ident, since, epoch, join_leave)
        if kind_of == "unsubscribe":
            return Unsubscribe(validate_pattern(_field(obj, "topic")), ident)
        if kind_of == "ping":
            return Ping(ident)
        if kind != PLAIN and (kind_of == "presence" or kind_of == "presence_stats"):
            return PresenceQuery(validate_topic(_field(obj, "topic")), ident,
                                 kind_of == "presence_stats")
    except ProtocolError as exc:
        return Invalid(exc.code, exc.message, ident)
    except (ValueError, TypeError, RecursionError):
        return Invalid(ErrorCode.BAD_REQUEST, "'data' is not a JSON value", ident)
    if kind == PLAIN:
        # the seed's form: the object itself, verbatim, on the seed topic
        return Publish(SEED_TOPIC, text, _MISSING)
    if kind_of is _MISSING:
        return Invalid(ErrorCode.UNKNOWN_TYPE, "frame has no 'type'", ident)
    return Invalid(ErrorCode.UNKNOWN_TYPE, "unknown frame type", ident)


def _field(obj: Dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise ProtocolError("missing field %r" % name)
    value = obj[name]
    if not isinstance(value, str):
        if name == "topic":
            raise TopicError("'topic' must be a string")
        raise ProtocolError("field %r must be a string" % name)
    return value


_MESSAGE_HEAD = '{"type":"message","topic":"%s","seq":%d,"data":'
_MESSAGE = _MESSAGE_HEAD + "%s}"


def message_text(topic: str, seq: int, data: str) -> str:
    """The v1 delivery envelope for one stored message."""
    return _MESSAGE % (topic, seq, data)


def message_head(topic: str, seq: int) -> str:
    """The v1 delivery envelope up to its data: ``message_head(t, s) + data + "}"``."""
    return _MESSAGE_HEAD % (topic, seq)


def _with_id(obj: Dict[str, Any], ident: Any) -> Dict[str, Any]:
    if ident is not _MISSING:
        obj["id"] = ident
    return obj


def ack_text(ident: Any, topic: str, seq: Optional[int] = None, epoch: Optional[str] = None,
             recovered: Optional[bool] = None) -> str:
    """An ack frame's text; fields left None are omitted."""
    obj: Dict[str, Any] = _with_id({"type": "ack"}, ident)
    obj["topic"] = topic
    if seq is not None:
        obj["seq"] = seq
    if epoch is not None:
        obj["epoch"] = epoch
    if recovered is not None:
        obj["recovered"] = recovered
    return encode_json(obj)


def error_text(ident: Any, code: Union[ErrorCode, str], message: str) -> str:
    """An error frame's text."""
    obj = _with_id({"type": "error"}, ident)
    obj["code"] = str(code)
    obj["message"] = message
    return encode_json(obj)


def presence_text(ident: Any, topic: str, total: int, clients: Sequence[str]) -> str:
    """The answer to a ``presence`` frame; ``clients`` are client objects as JSON text."""
    head = encode_json(_with_id({"type": "presence"}, ident))[:-1]
    return '%s,"topic":"%s","total":%d,"clients":[%s]}' % (head, topic, total, ",".join(clients))


def presence_stats_text(ident: Any, topic: str, clients: int, users: int) -> str:
    """The answer to a ``presence_stats`` frame."""
    obj = _with_id({"type": "presence_stats"}, ident)
    obj.update(topic=topic, clients=clients, users=users)
    return encode_json(obj)


def client_text(conn: str, sub: Optional[str], joined: float) -> str:
    """A client object of a presence answer or a join/leave event, as JSON text."""
    obj: Dict[str, Any] = {"conn": conn}
    if sub is not None:
        obj["sub"] = sub
    obj["joined"] = round(joined, 3)
    return encode_json(obj)


def join_leave_text(kind: str, topic: str, client: str) -> str:
    """A ``join`` or ``leave`` event (``client``: a client object as JSON text)."""
    return '{"type":"%s","topic":"%s","client":%s}' % (kind, topic, client)


def subscribed_text(topic: str, seq: Optional[int] = None, epoch: Optional[str] = None) -> str:
    """The frame telling a connection about a subscription granted by its token."""
    obj: Dict[str, Any] = {"type": "subscribed", "topic": topic}
    if seq is not None:
        obj["seq"] = seq
        obj["epoch"] = epoch
    return encode_json(obj)


def pong_text(ident: Any) -> str:
    """The answer to a ping frame."""
    return encode_json(_with_id({"type": "pong"}, ident))
