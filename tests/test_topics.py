"""Property tests of topics.py against independent references (PROTOCOL.md section 3).

The references here share no code with the module: a regular expression for the
grammar, a recursive matcher for the wildcards, and a model of the subject tree
that scans every (pattern, subscriber) pair.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from wsbroadcast.errors import TopicError
from wsbroadcast.topics import (
    MAX_TOPIC_BYTES,
    SubjectTree,
    is_wildcard,
    iter_patterns,
    pattern_matches,
    validate_pattern,
    validate_topic,
)

pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------- references

_REF_TOKEN = r"[A-Za-z0-9_:@-]+"
_REF_TOPIC = re.compile(r"%s(?:\.%s)*" % (_REF_TOKEN, _REF_TOKEN))
_REF_PATTERN_TOKEN = r"(?:%s|\*)" % _REF_TOKEN
_REF_PATTERN = re.compile(r"(?:%s\.)*(?:%s|>)" % (_REF_PATTERN_TOKEN, _REF_PATTERN_TOKEN))


def ref_valid_topic(s: object) -> bool:
    return (isinstance(s, str) and 1 <= len(s.encode("utf-8", "surrogatepass")) <= 255
            and _REF_TOPIC.fullmatch(s) is not None)


def ref_valid_pattern(s: object) -> bool:
    return (isinstance(s, str) and 1 <= len(s.encode("utf-8", "surrogatepass")) <= 255
            and _REF_PATTERN.fullmatch(s) is not None)


def ref_matches(pattern: str, topic: str) -> bool:
    """Recursive token matcher: '*' one token, '>' one or more tokens (last only)."""

    def go(p, t):
        if not p:
            return not t
        if p[0] == ">":
            return len(t) >= 1
        if not t:
            return False
        return (p[0] == "*" or p[0] == t[0]) and go(p[1:], t[1:])

    return go(pattern.split("."), topic.split("."))


def _accepts(fn, value) -> bool:
    try:
        out = fn(value)
    except TopicError:
        return False
    assert out == value
    return True


# ---------------------------------------------------------------- strategies

_LEGAL = "ABCXYZabcxyz0189_-:@"
_ODD = _LEGAL + ".*> \t\n/#$+éλ\u00a0\u2028\x00\U0001f600\\\"'"

legal_token = st.text(alphabet=_LEGAL, min_size=1, max_size=8)
odd_text = st.text(alphabet=_ODD, min_size=0, max_size=40)
any_text = st.text(max_size=40)

#: topics and patterns over a tiny alphabet, so that matches are common
small_token = st.sampled_from(["a", "b", "c", "ab"])
small_topic = st.lists(small_token, min_size=1, max_size=4).map(".".join)


@st.composite
def small_pattern(draw):
    toks = draw(st.lists(st.sampled_from(["a", "b", "c", "ab", "*"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        toks[-1] = ">"
    return ".".join(toks)


@st.composite
def token_soup(draw):
    """Strings assembled from legal tokens, wildcards and junk, near the grammar's edges."""
    parts = draw(st.lists(st.one_of(legal_token, st.sampled_from(["*", ">", "", "a*", ">b", "**", " ", "é"])),
                          min_size=1, max_size=10))
    return ".".join(parts)


candidates = st.one_of(odd_text, any_text, token_soup(), small_pattern(), small_topic)


# ---------------------------------------------------------------- validation

@settings(max_examples=1000, deadline=None)
@given(candidates)
@example("a")
@example("*")
@example(">")
@example("a.>")
@example("a.>.b")
@example(">.a")
@example("a..b")
@example(".a")
@example("a.")
@example("")
@example("a\n")
@example("a.*b")
@example("\u0661")  # an Arabic-Indic digit: not in 0-9
@example("K")  # KELVIN SIGN: folds to 'k' under IGNORECASE, must not count as a letter
def test_validate_topic_and_pattern_accept_exactly_the_grammar(s):
    assert _accepts(validate_topic, s) == ref_valid_topic(s), s
    assert _accepts(validate_pattern, s) == ref_valid_pattern(s), s
    if ref_valid_topic(s):
        assert ref_valid_pattern(s)  # every topic is a pattern
        assert not is_wildcard(s)
    elif ref_valid_pattern(s):
        assert is_wildcard(s)


@settings(max_examples=300, deadline=None)
@given(st.lists(legal_token, min_size=1, max_size=80), st.integers(0, 3))
def test_length_limit_is_255_bytes(tokens, wild):
    topic = ".".join(tokens)
    assert _accepts(validate_topic, topic) == (len(topic) <= MAX_TOPIC_BYTES)
    pattern = ".".join(tokens[:-1] + [["*", ">", tokens[-1], "*"][wild]])
    assert _accepts(validate_pattern, pattern) == (len(pattern) <= MAX_TOPIC_BYTES)


@pytest.mark.parametrize("n", [254, 255, 256])
def test_length_edges(n):
    topic = "a" * n
    assert _accepts(validate_topic, topic) == (n <= 255)
    assert _accepts(validate_pattern, "a" * (n - 2) + ".>") == (n <= 255)


@pytest.mark.parametrize("value", [None, 1, 1.5, b"abc", ["a"], {"a": 1}, True])
def test_non_strings_are_refused(value):
    with pytest.raises(TopicError):
        validate_topic(value)
    with pytest.raises(TopicError):
        validate_pattern(value)


def test_iter_patterns_validates_each():
    assert iter_patterns(["a", "a.*", "b.>"]) == ["a", "a.*", "b.>"]
    with pytest.raises(TopicError):
        iter_patterns(["a", "a.>.b"])


# ---------------------------------------------------------------- matching

def test_pattern_matches_the_reference_exhaustively():
    """Every pattern of up to 4 tokens over {a, ab, *, >} against every topic of up to 4 tokens over {a, ab, b}."""
    import itertools

    patterns = []
    for n in range(1, 5):
        for head in itertools.product(["a", "ab", "*"], repeat=n - 1):
            for last in ["a", "ab", "*", ">"]:
                patterns.append(".".join(head + (last,)))
    topics = [".".join(t) for n in range(1, 5) for t in itertools.product(["a", "ab", "b"], repeat=n)]
    hits = 0
    for p in patterns:
        for t in topics:
            want = ref_matches(p, t)
            assert pattern_matches(p, t) == want, (p, t)
            hits += want
    assert 0 < hits < len(patterns) * len(topics)


@settings(max_examples=400, deadline=None)
@given(small_pattern(), small_topic)
@example("a.>", "a")
@example("a.>", "a.b")
@example(">", "a")
@example("*", "a.b")
@example("a.*", "a")
@example("*.*", "a.b")
def test_pattern_matches_the_reference(pattern, topic):
    assert pattern_matches(pattern, topic) == ref_matches(pattern, topic)


@settings(max_examples=500, deadline=None)
@given(small_topic)
def test_a_topic_matches_itself_and_only_itself(topic):
    assert pattern_matches(topic, topic)
    assert pattern_matches(topic, topic + ".a") is False


# ---------------------------------------------------------------- the subject tree

class SubjectTreeModel(RuleBasedStateMachine):
    """Random interleavings of insert/remove/match against a brute-force model."""

    cache_size = 4096

    def __init__(self):
        super().__init__()
        self.tree = SubjectTree(cache_size=self.cache_size)
        self.model = set()  # (pattern, sub)

    def expected(self, topic):
        return frozenset(s for p, s in self.model if ref_matches(p, topic))

    @rule(pattern=small_pattern(), sub=st.integers(0, 4))
    def insert(self, pattern, sub):
        new = (pattern, sub) not in self.model
        assert self.tree.insert(pattern, sub) is new
        self.model.add((pattern, sub))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def reinsert_existing(self, data):
        pattern, sub = data.draw(st.sampled_from(sorted(self.model)))
        assert self.tree.insert(pattern, sub) is False

    @rule(pattern=small_pattern(), sub=st.integers(0, 4))
    def remove_any(self, pattern, sub):
        # mostly entries that are not there: other subscribers, other patterns, removed ones
        there = (pattern, sub) in self.model
        assert self.tree.remove(pattern, sub) is there
        self.model.discard((pattern, sub))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove_existing(self, data):
        pattern, sub = data.draw(st.sampled_from(sorted(self.model)))
        assert self.tree.remove(pattern, sub) is True
        self.model.discard((pattern, sub))
        assert self.tree.remove(pattern, sub) is False  # twice: already gone

    @rule(topic=small_topic)
    def match(self, topic):
        # twice: the second answer comes from the cache
        assert self.tree.match(topic) == self.expected(topic), topic
        assert self.tree.match(topic) == self.expected(topic), topic

    @invariant()
    def size_and_cached_answers_are_current(self):
        assert len(self.tree) == len(self.model)
        # every answer the cache would give now must be fresh
        for topic in ("a", "b", "a.b", "ab.c.a", "a.a.a.a", "c.b"):
            assert self.tree.match(topic) == self.expected(topic), topic

    @invariant()
    def no_empty_nodes_are_left_behind(self):
        if not self.model:
            assert self.tree._root.empty(), "nodes left in an empty tree"


class TinyCacheSubjectTreeModel(SubjectTreeModel):
    """The same with a cache that is evicted all the time."""

    cache_size = 2


TestSubjectTree = SubjectTreeModel.TestCase
TestSubjectTree.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
TestSubjectTreeTinyCache = TinyCacheSubjectTreeModel.TestCase
TestSubjectTreeTinyCache.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])


def test_cache_is_invalidated_by_insert_and_remove():
    tree = SubjectTree()
    assert tree.match("a.b") == frozenset()
    tree.insert("a.*", 1)
    assert tree.match("a.b") == {1}
    tree.insert("a.>", 2)
    assert tree.match("a.b") == {1, 2}
    tree.insert(">", 3)
    assert tree.match("a.b") == {1, 2, 3}
    tree.remove("a.*", 1)
    assert tree.match("a.b") == {2, 3}
    assert tree.remove("a.*", 1) is False
    assert tree.match("a.b") == {2, 3}
    tree.remove(">", 3)
    tree.remove("a.>", 2)
    assert tree.match("a.b") == frozenset()
    assert len(tree) == 0 and tree._root.empty()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(small_pattern(), st.integers(0, 3)), max_size=30), st.lists(small_topic, max_size=10))
def test_bulk_insert_then_remove_all_leaves_an_empty_tree(entries, topics):
    tree = SubjectTree()
    for p, s in entries:
        tree.insert(p, s)
    for t in topics:
        assert tree.match(t) == frozenset(s for p, s in set(entries) if ref_matches(p, t))
    for p, s in reversed(entries):
        tree.remove(p, s)
    assert len(tree) == 0
    assert tree._root.empty()
    for t in topics:
        assert tree.match(t) == frozenset()


@pytest.mark.parametrize("check", [validate_topic, validate_pattern])
@pytest.mark.parametrize("topic, said", [
    ("news..eu", "'news..eu' has an empty part"),
    ("news.", "'news.' has an empty part"),
    ("", "no topic given"),
    ("news.e u", "the part 'e u'"),
])
def test_errors_say_what_was_given_and_what_is_allowed(check, topic, said):
    with pytest.raises(TopicError) as info:
        check(topic)
    assert said in info.value.message
    assert "A-Z a-z 0-9 _ - : @" in info.value.message and "news.eu" in info.value.message


def test_wildcard_errors_say_where_wildcards_belong():
    with pytest.raises(TopicError, match="'news.\\*' has a wildcard.*for subscribing"):
        validate_topic("news.*")
    with pytest.raises(TopicError, match="'>' may only be the last part"):
        validate_pattern("news.>.eu")
