"""S3 URIs and dataset names: pure rules, no I/O.

- ``parse_s3_uri`` accepts ``s3://bucket``, ``s3://bucket/``, ``s3://bucket/key`` and
  ``s3://bucket/prefix/``. The key is kept exactly as written (a trailing ``/`` means "prefix").
  Bucket names follow S3's current rules (3-63 characters of lowercase letters, digits, ``.`` and
  ``-``, starting and ending with a letter or digit, not an IP address); legacy names with capitals
  or underscores are refused because no S3 endpoint accepts them in path-style requests any more.
- ``dataset_name`` is the Gradient rule: the basename of the last item of the path without its last
  extension (``mnist.zip`` -> ``mnist``), a known compound extension going whole (``data.tar.gz`` ->
  ``data``), the bucket name for a bare bucket.
- ``mount_table_source`` is how a mount names its URI in the mount table: percent-encoded (UTF-8)
  but for printable ASCII other than the table's separators and escapes. libfuse takes its
  options as ASCII only (pyfuse3 fails on anything else), and ``%`` is encoded too, so that
  ``uri_of_mount_table_source`` gives the URI back exactly.
- ``validate_name`` refuses names that cannot be one directory entry under the data root, and
  names with control characters (a tab or a line break in a name garbles every line that names
  it: logs, ``status``); the default name has them replaced by ``_``.
"""

from __future__ import annotations

import ipaddress
import re
import string
import urllib.parse
from dataclasses import dataclass

from .errors import UsageError

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_COMPOUND_EXTENSIONS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4", ".tar.lzma")
NAME_MAX = 255  # bytes, the Linux limit for one path component
# Kept as they are in the mount table's source: printable ASCII but option separators and
# escapes (space, tab, ``,``, ``\``) and ``%``, the escape here (letters and digits go anyway).
_MOUNT_TABLE_SAFE = "".join(c for c in string.punctuation if c not in ",\\%")


@dataclass(frozen=True, slots=True)
class S3Uri:
    bucket: str
    key: str  # "" for the whole bucket; a trailing "/" marks an explicit prefix

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_explicit_prefix(self) -> bool:
        """True when the URI can only mean a prefix (whole bucket, or key ending in ``/``)."""
        return self.key == "" or self.key.endswith("/")

    def as_prefix(self) -> str:
        """The listing prefix this URI means when it is not a single object."""
        return self.key if self.is_explicit_prefix else self.key + "/"

    def parent_prefix(self) -> str:
        """What the tree of a single-object mount is rooted at: the key up to its last ``/``
        (``s3://b/x.bin``: ``""``; ``s3://b//x.bin``: ``"/"``)."""
        return self.key[: self.key.rfind("/") + 1]

    def covers(self, bucket: str, key: str) -> bool:
        """Whether the object ``bucket``/``key`` is this URI's object or lies under its prefix
        (``s3://b/data`` covers ``data`` and ``data/x``, not ``data2.csv``)."""
        return bucket == self.bucket and (key == self.key or key.startswith(self.as_prefix()))


def parse_s3_uri(text: str) -> S3Uri:
    """Parse ``text`` or raise ``UsageError`` naming what is wrong and the expected form."""
    form = "expected s3://BUCKET[/KEY-OR-PREFIX]"
    if not text:
        raise UsageError(f"empty S3 URI: {form}")
    if not text.startswith("s3://"):
        raise UsageError(f"not an S3 URI: {text!r}: {form}")
    bucket, _, key = text[len("s3://") :].partition("/")
    if not bucket:
        raise UsageError(f"S3 URI has no bucket: {text!r}: {form}")
    check_bucket_name(bucket)
    if "\0" in key:
        raise UsageError(f"S3 URI contains a NUL byte: {text!r}")
    return S3Uri(bucket, key)


def check_bucket_name(bucket: str) -> None:
    problem = None
    if not _BUCKET_RE.match(bucket):
        problem = "use 3-63 lowercase letters, digits, '.' or '-', starting and ending alphanumeric"
    elif ".." in bucket:
        problem = "two adjacent periods are not allowed"
    elif _is_ip_address(bucket):
        problem = "a bucket name cannot be an IP address"
    if problem:
        raise UsageError(f"invalid bucket name {bucket!r}: {problem}")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def dataset_name(uri: S3Uri) -> str:
    """The default dataset name for ``uri`` (the Gradient rule), control characters made ``_``
    (a key may hold any; a name given with ``--name`` may not, see ``validate_name``)."""
    return _CONTROL.sub("_", _gradient_name(uri))


def _gradient_name(uri: S3Uri) -> str:
    last = uri.key.rstrip("/").rsplit("/", 1)[-1]
    if not last:
        return uri.bucket
    lowered = last.lower()
    for extension in _COMPOUND_EXTENSIONS:
        if lowered.endswith(extension) and len(last) > len(extension):
            return last[: -len(extension)]
    stem, dot, _extension = last.rpartition(".")
    return stem if dot and stem else last


def validate_name(name: str) -> str:
    """Return ``name`` if it can be a single directory entry, else raise ``UsageError``."""
    if name in ("", ".", ".."):
        raise UsageError(f"invalid dataset name {name!r}: choose another with --name")
    if "/" in name or "\0" in name:
        raise UsageError(f"invalid dataset name {name!r}: it may not contain '/' or NUL")
    if _CONTROL.search(name):
        raise UsageError(
            f"invalid dataset name {name!r}: it may not contain control characters; choose "
            "another with --name"
        )
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise UsageError(f"dataset name is longer than {NAME_MAX} bytes: choose a shorter --name")
    return name


def mount_table_source(uri: S3Uri) -> str:
    """The mount table's source column for ``uri`` (see the module docstring)."""
    return urllib.parse.quote(str(uri), safe=_MOUNT_TABLE_SAFE, errors="surrogateescape")


def uri_of_mount_table_source(source: str) -> str:
    """The URI a mount table's source column names (``mount_table_source`` undone)."""
    return urllib.parse.unquote(source, errors="surrogateescape")
