"""Key-to-path rules: what is a safe name, what is skipped and why."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3datafs.keypath import (
    MAX_NAME_BYTES,
    KeyPath,
    Unsafe,
    segment_problem,
    split_key,
    strip_prefix,
)


def test_file_key_splits_into_segments() -> None:
    assert split_key("a/b/c.txt") == KeyPath(("a", "b", "c.txt"), is_dir=False)
    assert split_key("top") == KeyPath(("top",), is_dir=False)


def test_marker_key_is_a_directory() -> None:
    kp = split_key("a/b/")
    assert kp == KeyPath(("a", "b"), is_dir=True)
    assert isinstance(kp, KeyPath)
    assert kp.path == "a/b"


def test_empty_relative_key_is_the_root_marker() -> None:
    kp = split_key("")
    assert kp == KeyPath((), is_dir=True)
    assert isinstance(kp, KeyPath)
    assert kp.path == ""


@pytest.mark.parametrize(
    ("key", "reason_part"),
    [
        ("a//b", "empty"),
        ("/a", "empty"),
        ("/", "empty"),
        ("//", "empty"),
        ("a//", "empty"),
        ("a/b//c/", "empty"),
        (".", "'.'"),
        ("..", "'..'"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("a/../b", "'..'"),
        ("../etc/passwd", "'..'"),
        ("a/..", "'..'"),
        ("a/../", "'..'"),
        ("a/./", "'.'"),
        ("x" * (MAX_NAME_BYTES + 1), "256 bytes"),
        ("x" * (MAX_NAME_BYTES + 1) + "/f", "256 bytes"),  # a directory's name too
        ("d/" + "é" * 128, "256 bytes"),  # 128 characters, 256 bytes
        ("😀" * 64 + "/f", "256 bytes"),  # 64 characters, 256 bytes
        ("a\0b", "NUL"),
        ("a/\0/", "NUL"),
        ("a/\ud800b", "UTF-8"),  # lone surrogate: not encodable, cannot be a real S3 key
    ],
)
def test_unsafe_keys_are_rejected_with_a_reason(key: str, reason_part: str) -> None:
    result = split_key(key)
    assert isinstance(result, Unsafe)
    assert reason_part in result.reason


@pytest.mark.parametrize(
    "name",
    [
        "x" * MAX_NAME_BYTES,
        "é" * 127 + "x",  # 255 bytes
        "😀" * 63 + "abc",  # 255 bytes
        "a b",
        " leading and trailing ",
        "new\nline",
        "tab\there",
        "100%",
        "%2F%2e%2e",
        "back\\slash",
        "...",
        ".hidden",
        "..double",
        "日本語のファイル",
        "Case",
        "case",
        "e\u0301",  # decomposed é stays decomposed
        "\u00e9",
    ],
)
def test_unusual_but_safe_names_are_kept_verbatim(name: str) -> None:
    assert split_key(f"dir/{name}") == KeyPath(("dir", name), is_dir=False)
    assert split_key(f"{name}/") == KeyPath((name,), is_dir=True)
    assert segment_problem(name) is None


def test_hundred_level_deep_key() -> None:
    segments = tuple(f"d{i}" for i in range(100))
    assert split_key("/".join(segments)) == KeyPath(segments, is_dir=False)
    assert split_key("/".join(segments) + "/") == KeyPath(segments, is_dir=True)


def test_strip_prefix() -> None:
    assert strip_prefix("data/x/y", "data/") == "x/y"
    assert strip_prefix("data/", "data/") == ""
    assert strip_prefix("database", "data/") is None
    assert strip_prefix("other/x", "data/") is None
    assert strip_prefix("anything", "") == "anything"


def test_strip_prefix_rejects_prefix_without_slash() -> None:
    with pytest.raises(ValueError, match="end with '/'"):
        strip_prefix("data/x", "data")


def _independent_problem(segment: str) -> bool:
    try:
        size = len(segment.encode("utf-8"))
    except UnicodeEncodeError:
        return True
    return segment in ("", ".", "..") or "\0" in segment or size > MAX_NAME_BYTES


_PIECES = st.sampled_from(
    ["a", "B", "", ".", "..", "...", "\0", "é", "😀", "x" * 200, "\n", "%", "\\", " ", "\ud800"]
)
_KEYS = st.lists(
    st.lists(_PIECES, min_size=1, max_size=3).map("".join), min_size=1, max_size=6
).map("/".join) | st.text()


@given(_KEYS)
def test_split_is_safe_and_lossless(key: str) -> None:
    result = split_key(key)
    segments = (key[:-1] if key.endswith("/") else key).split("/")
    if isinstance(result, Unsafe):
        assert key
        assert any(_independent_problem(segment) for segment in segments)
        return
    if key:
        assert not any(_independent_problem(segment) for segment in result.segments)
        assert result.path + ("/" if result.is_dir else "") == key
        assert list(result.segments) == segments
    else:
        assert result == KeyPath((), is_dir=True)
