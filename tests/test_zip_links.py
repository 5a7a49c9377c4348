"""archive.links: a zip's symbolic link is answered only where following it stays in the mount.

The tree is a real member catalog of links and files; a link's target is its "member bytes",
served from a dict (counting reads), so each case says only a tree and what ``readlink`` gives.
"""

from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path

import pytest
from fakes import trio_test

from s3datafs.archive.links import MAX_LINKS, MAX_STEPS, PATH_MAX, LinkTargets
from s3datafs.archive.zipformat import Member
from s3datafs.catalog import ROOT_INODE, Catalog, CatalogBuilder, Entry
from s3datafs.errors import ArchiveError, TransientS3Error
from s3datafs.model import MemberRef, ObjectRef

LINK, FILE = 0o120777, 0o100644
ARCHIVE = ObjectRef("bkt", "links.zip", None, '"e"', 1 << 20, 1000.0)


class Links:
    """A member catalog of ``members`` (path -> link target, ``None`` for a file; a path ending
    in "/" a directory) and the ``LinkTargets`` over it."""

    def __init__(self, path: Path, members: dict[str, str | bytes | None]) -> None:
        self.targets = {name: target.encode() if isinstance(target, str) else target
                        for name, target in members.items()}
        self.reads: Counter[str] = Counter()
        self.failing: set[str] = set()
        with CatalogBuilder(path, uri=ARCHIVE.uri, bucket="bkt", prefix="", versioned=False,
                            archive=ARCHIVE, fingerprint="f" * 64) as builder:
            for i, (name, target) in enumerate(self.targets.items()):
                size = len(target) if target is not None else 1
                builder.add_member(Member(name, name.endswith("/"), 100 * i, 100 * i + 90, 0,
                                          0, size, size, 0, 1000.0,
                                          FILE if target is None else LINK))
            builder.finish()
        self.catalog = Catalog.open(path)
        self.links = LinkTargets(self.catalog, self._read)

    async def _read(self, ref: MemberRef) -> bytes:
        self.reads[ref.path] += 1
        if ref.path in self.failing:
            raise TransientS3Error(f"S3 did not answer for {ref.path}")
        target = self.targets[ref.path]
        assert target is not None
        return target

    def entry(self, path: str) -> Entry:
        entry = self.catalog.get(ROOT_INODE)
        for name in path.split("/"):
            assert entry is not None
            entry = self.catalog.lookup(entry.inode, name)
        assert entry is not None
        return entry

    async def readlink(self, path: str) -> bytes | str:
        """The target answered, or why it is refused: where it leads out, the reason the
        message gives in parentheses, else the whole message."""
        try:
            return await self.links.target(self.entry(path))
        except ArchiveError as exc:
            message = str(exc)
            assert message.startswith(f"member {path!r} of s3://bkt/links.zip is a symbolic link")
            assert message.endswith("; not followed")
            leads_out = message.partition(", which leads out of the archive (")[2]
            return leads_out.rpartition(")")[0] or message


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "links.db"


TREE: dict[str, str | bytes | None] = {
    "a.txt": None,
    "sub/deep/seq.txt": None,
    "link-a": "a.txt",
    "dirlink": "sub",
    "dot": ".",
    "sub/up": "../a.txt",
    "sub/via-dirlink": "../dirlink/deep/seq.txt",
    "sub/dangling": "no/such/../../../../../file",  # the kernel stops at "no": ENOENT
    "sub/through-a-file": "../a.txt/../../..",  # ENOTDIR at "a.txt/"
    "sub/not-utf8": b"\xff/../../..",  # no member has that name: ENOENT
    "sub/slashes": ".//deep///seq.txt",
    "abs": "/etc/passwd",
    "sub/escape": "../../outside",
    "top-up": "..",
    "sub/via-dot": "../dot/..",  # inside as spelled, the parent of the top as followed
    "sub/via-dot-inside": "../dot/sub/..",
    "sub/to-abs": "../abs",
    "sub/to-escape": "escape",
    "loop-a": "loop-b",
    "loop-b": "loop-a",
    "self": "self/x",
}


@pytest.mark.parametrize(("path", "answer"), [
    ("link-a", b"a.txt"),
    ("dirlink", b"sub"),
    ("dot", b"."),
    ("sub/up", b"../a.txt"),
    ("sub/via-dirlink", b"../dirlink/deep/seq.txt"),
    ("sub/dangling", b"no/such/../../../../../file"),
    ("sub/through-a-file", b"../a.txt/../../.."),
    ("sub/not-utf8", b"\xff/../../.."),
    ("sub/slashes", b".//deep///seq.txt"),
    ("sub/via-dot-inside", b"../dot/sub/.."),
    ("abs", "an absolute path"),
    ("sub/escape", "it climbs above the archive's top"),
    ("top-up", "it climbs above the archive's top"),
    ("sub/via-dot", "it climbs above the archive's top"),
    ("sub/to-abs", "through 'abs', an absolute path"),
    ("sub/to-escape", "it climbs above the archive's top"),
    ("loop-a", f"it passes through more than {MAX_LINKS} links"),
    ("self", f"it passes through more than {MAX_LINKS} links"),
])
@trio_test
async def test_a_target_is_answered_only_if_following_it_stays_inside(
    db: Path, path: str, answer: bytes | str
) -> None:
    assert await Links(db, TREE).readlink(path) == answer


@pytest.mark.parametrize(("count", "answered"), [(MAX_LINKS, True), (MAX_LINKS + 1, False)])
@trio_test
async def test_a_chain_of_links_is_followed_as_far_as_the_kernel_would(
    db: Path, count: int, answered: bool
) -> None:
    """``l1`` -> ``l2`` -> ... -> ``a.txt``: the kernel follows 40 links in one path."""
    tree: dict[str, str | bytes | None] = {"a.txt": None}
    tree.update({f"l{i}": f"l{i + 1}" for i in range(1, count)})
    tree[f"l{count}"] = "a.txt"
    answer = await Links(db, tree).readlink("l1")
    assert answer == (b"l2" if answered else f"it passes through more than {MAX_LINKS} links")


@pytest.mark.parametrize(("extra", "answered"), [("", True), ("/d", False)])
@trio_test
async def test_a_link_that_takes_more_than_max_steps_to_follow_is_refused(
    db: Path, extra: str, answered: bool
) -> None:
    """``wide`` climbs in and out of ``d`` 800 times (1,600 steps, 3,999 bytes); ``via-wide``
    passes it twice and climbs 447 times more: ``MAX_STEPS`` steps in all, one more with
    ``/d``. The kernel would follow both (three links); the walk would take 0.5 s of the
    mount's one thread with 40 links of 4 KiB."""
    wide = "/".join(["d", ".."] * 800)
    target = "wide/wide/" + "/".join(["d", ".."] * 447) + extra
    assert MAX_STEPS == 2 + 2 * 1600 + 2 * 447
    links = Links(db, {"d/f": None, "wide": wide, "via-wide": target})
    answer = await links.readlink("via-wide")
    assert answer == (target.encode() if answered
                      else f"following it takes more than {MAX_STEPS} steps")


@trio_test
async def test_targets_no_link_may_hold_are_refused(db: Path) -> None:
    links = Links(db, {"empty": b"", "nul": b"a\0b", "long": b"x" * PATH_MAX,
                       "longest": b"x" * (PATH_MAX - 1)})
    assert await links.readlink("empty") == (
        "member 'empty' of s3://bkt/links.zip is a symbolic link whose target is empty; "
        "not followed")
    assert (await links.readlink("nul")).endswith("whose target holds a NUL byte; not followed")
    assert await links.readlink("long") == (
        f"member 'long' of s3://bkt/links.zip is a symbolic link whose target is {PATH_MAX} "
        f"bytes long (at most {PATH_MAX - 1}); not followed")
    assert links.reads["long"] == 0  # known from its size: not read
    assert await links.readlink("longest") == b"x" * (PATH_MAX - 1)  # a dangling link


@trio_test
async def test_a_refusal_shows_the_start_and_end_of_a_long_target(db: Path) -> None:
    """Refusals are kept (4,096) and logged: a 4 KiB target not UTF-8 took 20 KiB shown whole."""
    target = b"/" + b"\xff" * 4000 + b"/end"
    shown_byte = "\\\\xff"  # repr of the byte's backslashreplace: its backslash doubled
    links = Links(db, {"long": target})
    with pytest.raises(ArchiveError) as caught:
        await links.links.target(links.entry("long"))
    assert str(caught.value) == (
        "member 'long' of s3://bkt/links.zip is a symbolic link to "
        f"'/{shown_byte * 99}'...'{shown_byte * 96}/end' (4005 bytes), which leads out of the "
        "archive (an absolute path); not followed")


@trio_test
async def test_answers_and_refusals_are_kept_errors_reading_a_target_are_not(db: Path) -> None:
    links = Links(db, TREE)
    for _ in range(3):
        assert await links.readlink("sub/via-dirlink") == b"../dirlink/deep/seq.txt"
        assert await links.readlink("sub/to-abs") == "through 'abs', an absolute path"
    assert links.reads == {"sub/via-dirlink": 1, "dirlink": 1, "sub/to-abs": 1, "abs": 1}
    links.failing.add("link-a")
    with pytest.raises(TransientS3Error) as caught:
        await links.links.target(links.entry("link-a"))
    assert caught.value.errno == errno.EIO
    links.failing.clear()
    assert await links.readlink("link-a") == b"a.txt"
    assert links.reads["link-a"] == 2


@trio_test
async def test_a_link_whose_way_passes_a_link_that_cannot_be_read_is_not_answered(
    db: Path
) -> None:
    """Where ``dot`` leads decides where ``sub/via-dot-inside`` does: not known, not answered
    (this time: the next readlink reads it again)."""
    links = Links(db, TREE)
    links.failing.add("dot")
    with pytest.raises(TransientS3Error):
        await links.links.target(links.entry("sub/via-dot-inside"))
    links.failing.clear()
    assert await links.readlink("sub/via-dot-inside") == b"../dot/sub/.."
