"""Key-to-path rules: which S3 keys become which names in the mounted tree (pure, no I/O).

A key is first made relative to the mounted prefix (``strip_prefix``), then split on ``"/"``
(``split_key``). The result is either a ``KeyPath`` (the segments, and whether the key is a
directory marker) or an ``Unsafe`` carrying a one-line reason for the warning the caller logs.

Invariants:
- Every segment of a ``KeyPath`` is a safe file name: non-empty, not ``.`` or ``..``, free of
  ``"/"`` and NUL, at most ``MAX_NAME_BYTES`` bytes of valid UTF-8. So no ``KeyPath`` can ever
  name anything outside the mount root, and every segment can be handed to the kernel as is.
- Splitting is injective: ``"/".join(segments)`` (plus a trailing ``"/"`` for a marker) gives the
  relative key back. Two different keys never map to the same path, except a file ``a`` and a
  directory ``a`` (from ``a/`` or ``a/...``), which the catalog resolves (the directory wins).
- Names are kept byte for byte: case, spaces, newlines, ``%``, ``\\`` and any Unicode are ordinary
  characters; nothing is normalised, unquoted or folded.
- A key ending in ``"/"`` is a directory marker: its segments are the directory's path. The empty
  relative key (the prefix's own ``prefix/`` marker) is the root marker: ``KeyPath((), True)``,
  which callers ignore silently (the catalog only borrows its LastModified for an empty root).

Everything here is a pure function of its arguments: safe from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MAX_NAME_BYTES = 255  # NAME_MAX on Linux: the kernel refuses longer names in lookup/readdir
SEPARATOR = "/"


class KeyPath(NamedTuple):
    """A safe relative path: ``segments`` from the mount root; ``is_dir`` for a marker key.

    A named tuple (made three times faster than a frozen dataclass): a catalog build makes one
    per key, a million for a large listing, snapshot or zip.
    """

    segments: tuple[str, ...]
    is_dir: bool

    @property
    def path(self) -> str:
        """The segments joined with ``"/"`` (no trailing ``"/"``; ``""`` for the root)."""
        return SEPARATOR.join(self.segments)


@dataclass(frozen=True, slots=True)
class Unsafe:
    """A key that cannot be shown; ``reason`` completes "skipping key ...: <reason>"."""

    reason: str


def strip_prefix(key: str, prefix: str) -> str | None:
    """Return ``key`` relative to ``prefix``, or ``None`` if it does not start with it.

    ``prefix`` is ``""`` (the whole bucket) or ends with ``"/"``; anything else would turn
    ``data/x`` into ``/x`` under prefix ``data`` and is rejected with ``ValueError``.
    """
    if prefix and not prefix.endswith(SEPARATOR):
        raise ValueError(f"prefix must be empty or end with '/': {prefix!r}")
    if not key.startswith(prefix):
        return None
    return key[len(prefix) :]


def segment_problem(segment: str) -> str | None:
    """Why ``segment`` cannot be a file name, or ``None`` if it can."""
    if not segment:
        return "empty path segment"
    if segment in (".", ".."):
        return f"{segment!r} path segment"
    if "\0" in segment:
        return "NUL character in path segment"
    try:
        size = len(segment.encode("utf-8"))
    except UnicodeEncodeError:
        return "path segment is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"path segment of {size} bytes (limit {MAX_NAME_BYTES})"
    return None


def split_key(relative_key: str) -> KeyPath | Unsafe:
    """Split a key relative to the mounted prefix into a ``KeyPath``, or say why it is unsafe.

    ``"a/b"`` -> file ``("a", "b")``; ``"a/b/"`` -> directory ``("a", "b")``; ``""`` -> the root
    marker ``KeyPath((), True)``; ``"a//b"``, ``"/a"``, ``"a/../b"`` ... -> ``Unsafe``.
    """
    if not relative_key:
        return KeyPath((), True)
    is_dir = relative_key.endswith(SEPARATOR)
    body = relative_key[:-1] if is_dir else relative_key
    segments = tuple(body.split(SEPARATOR))
    # Fast path for the common key: whole-key checks in C; the loop below only names the problem.
    if (
        "\0" in body
        or "" in segments
        or "." in segments
        or ".." in segments
        or not _names_fit(body, segments)
    ):
        for segment in segments:
            problem = segment_problem(segment)
            if problem is not None:
                return Unsafe(problem)
    return KeyPath(segments, is_dir)


def _names_fit(body: str, segments: tuple[str, ...]) -> bool:
    """True if every segment is valid UTF-8 of at most ``MAX_NAME_BYTES`` bytes."""
    if body.isascii():
        return max(map(len, segments)) <= MAX_NAME_BYTES
    try:
        return all(len(segment.encode("utf-8")) <= MAX_NAME_BYTES for segment in segments)
    except UnicodeEncodeError:
        return False
