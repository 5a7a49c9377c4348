"""Symbolic links in a zip: a link's target is answered only if following it stays in the mount.

Info-ZIP ``zip -y`` stores a symbolic link as a member of type S_IFLNK (its Unix mode, see
``zipformat``) whose data is the link's target; ``unzip`` makes it a link again. The mount shows
such a member as a link too (``lstat``, ``ls -l``), and ``readlink`` reads its target from the
archive like any member's bytes. But the kernel follows a link in the reader's namespace: a
target of ``/etc/passwd``, or one that climbs above the archive's top (``../../x``; ``dot/..``
where ``dot`` -> ``.`` is the top, whose parent is the mount point's directory), would lead a
job that trusts its dataset out of it, into the host's files. So before a target is answered it
is followed here as the kernel would follow it, through the archive's tree: component by
component from the link's directory, ``..`` to the real parent of where the walk is (after a
link, the parent of its target, not of the link), every link met on the way followed too (its
target read from the archive). A target that is absolute, climbs above the top, or passes more
than ``MAX_LINKS`` links (as the kernel's 40) is refused: ``readlink`` fails with EIO and one log
line naming the member and its target, and the kernel, which asks ``readlink`` to follow a
link, cannot follow it either. So is one that takes more than ``MAX_STEPS`` steps (a name
looked up, a ``..`` taken), which the kernel would follow: 40 links of 4 KiB each of ``d/..``
take 65,000 catalog queries, 0.5 s of the trio thread with every other request of the mount
waiting, and an archive of 100,000 such links would make ``ls -l`` of them take 14 hours. A
link any writer makes takes a few dozen steps; 40 links of a hundred names each fit. So is a
target no link may hold (empty, a NUL byte, longer than ``PATH_MAX``). A walk that ends at a
missing name or at a file with more to come ends inside, as the kernel's does (ENOENT,
ENOTDIR): a dangling link is answered, as unzip makes it.

Answers are kept per inode (a pinned archive never changes), refusals too; an error reading a
target (S3 trouble) is the read's, kept nowhere: the next ``readlink`` tries again.
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from typing import Protocol

import cachetools

from ..catalog import ROOT_INODE, Entry
from ..errors import ArchiveError
from ..model import MemberRef

MAX_LINKS = 40  # links one path may pass through, as the kernel's MAXSYMLINKS
MAX_STEPS = 4096  # names looked up and ``..`` taken in following one link: about 30 ms
PATH_MAX = 4096  # a target of this many bytes or more is no target: the kernel's PATH_MAX
_KEPT = 4096  # answers (and refusals) kept
_SHOWN = 200  # bytes of a target a message shows


class _Tree(Protocol):
    def get(self, inode: int) -> Entry | None: ...

    def lookup(self, parent: int, name: str) -> Entry | None: ...


def is_link(entry: Entry) -> bool:
    """Whether ``entry`` is a member its writer recorded as a symbolic link."""
    return not entry.is_dir and stat.S_ISLNK(entry.mode)


class LinkTargets:
    """The targets ``readlink`` answers (see the module docstring); ``read(ref)`` gives a
    member's bytes."""

    def __init__(self, tree: _Tree, read: Callable[[MemberRef], Awaitable[bytes]]) -> None:
        self._tree = tree
        self._read = read
        self._raw: cachetools.LRUCache[int, bytes] = cachetools.LRUCache(_KEPT)
        self._answers: cachetools.LRUCache[int, bytes | ArchiveError] = cachetools.LRUCache(_KEPT)

    async def target(self, link: Entry) -> bytes:
        """The target of ``link`` (a link entry), if following it stays in the mount; else
        ``ArchiveError``."""
        answer = self._answers.get(link.inode)
        if answer is None:
            try:
                answer = await self._checked(link)
            except ArchiveError as refused:
                answer = refused
            self._answers[link.inode] = answer
        if isinstance(answer, ArchiveError):
            raise ArchiveError(str(answer))  # a new one: a shared exception's traceback grows
        return answer

    async def _checked(self, link: Entry) -> bytes:
        target = await self._raw_target(link)
        problem = await self._leaves(link, target)
        if problem is not None:
            raise ArchiveError(f"{_what(link)} is a symbolic link to {_shown(target)}, which "
                               f"leads out of the archive ({problem}); not followed")
        return target

    async def _raw_target(self, link: Entry) -> bytes:
        """``link``'s target as stored, if a link may hold it."""
        target = self._raw.get(link.inode)
        if target is not None:
            return target
        if link.size >= PATH_MAX:
            raise ArchiveError(f"{_what(link)} is a symbolic link whose target is "
                               f"{link.size} bytes long (at most {PATH_MAX - 1}); not followed")
        assert isinstance(link.ref, MemberRef)  # links are members
        target = await self._read(link.ref)
        if not target or b"\0" in target:
            kind = "is empty" if not target else "holds a NUL byte"
            raise ArchiveError(f"{_what(link)} is a symbolic link whose target {kind}; "
                               "not followed")
        self._raw[link.inode] = target
        return target

    async def _leaves(self, link: Entry, target: bytes) -> str | None:
        """Why following ``target`` from ``link``'s directory leaves the archive, or None."""
        if target.startswith(b"/"):
            return "an absolute path"
        pending = _components(target)  # reversed: the next one last
        here, passed, steps = link.parent, 1, 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            steps += 1
            if steps > MAX_STEPS:
                return f"following it takes more than {MAX_STEPS} steps"
            if name == "..":
                if here == ROOT_INODE:
                    return "it climbs above the archive's top"
                directory = self._tree.get(here)
                if directory is None:  # a catalog holds every directory it names: not met
                    return "a directory on its way is not in the catalog"
                here = directory.parent
                continue
            entry = self._tree.lookup(here, name)
            if entry is None or not (entry.is_dir or is_link(entry)):
                return None  # the kernel stops here too: nothing there, or not a directory
            if entry.is_dir:
                here = entry.inode
                continue
            passed += 1
            if passed > MAX_LINKS:
                return f"it passes through more than {MAX_LINKS} links"
            through = await self._raw_target(entry)
            if through.startswith(b"/"):
                return f"through {entry.name!r}, an absolute path"
            pending.extend(_components(through))  # followed from ``here``, the link's directory
        return None


def _components(target: bytes) -> list[str]:
    """``target``'s names, last first; a name that is not UTF-8 matches no member's name."""
    return [name.decode("utf-8", "surrogateescape") for name in reversed(target.split(b"/"))]


def _shown(target: bytes) -> str:
    """``target`` for a message; of a long one, its first and last ``_SHOWN // 2`` bytes and its
    length: a refusal is kept (4,096 of them) and logged, and a target of 4 KiB not UTF-8 took
    20 KiB shown whole (each byte ``\\xff``, its backslash doubled by ``repr``)."""
    if len(target) > _SHOWN:
        half = _SHOWN // 2
        return f"{_shown(target[:half])}...{_shown(target[-half:])} ({len(target)} bytes)"
    return repr(target.decode("utf-8", "backslashreplace"))


def _what(link: Entry) -> str:
    assert isinstance(link.ref, MemberRef)  # links are members
    return f"member {link.ref.path!r} of {link.ref.archive.uri}"
