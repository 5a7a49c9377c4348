"""What one mount is, as plain data: its plan, its file system settings, its summary.

Importable without pyfuse3 or trio: the mount command (and ``snapshot``, ``diff``, which share
its options) builds a ``MountPlan`` before it forks, and a mount daemon pins its dataset while
the serving modules load (``mounting``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import config
from .resolve import Pins
from .s3source import S3Settings
from .uri import S3Uri


@dataclass(frozen=True)
class FsSettings:
    """How the mount looks to the kernel (owner, modes, cache timeouts) and reads ahead."""

    uid: int
    gid: int
    file_mode: int = 0o444
    dir_mode: int = 0o555
    cache_timeout: float = 24 * 3600.0  # immutable data: let the kernel keep what it learns
    readahead_initial: int = 1024 * 1024  # first window of a sequential reader (as Mountpoint)
    readahead_max: int = 64 * 1024 * 1024  # per handle (~8 GETs in flight); reader bounds total
    prefetch_files: int = config.DEFAULT_PREFETCH_FILES  # ahead of a directory read in order
    kernel_readahead: int = config.DEFAULT_KERNEL_READAHEAD  # set by the daemon (``mount``)


@dataclass(frozen=True)
class MountPlan:
    """Everything one mount needs, validated by the CLI before any network or fork."""

    uri: S3Uri
    name: str
    mountpoint: Path
    pins: Pins
    s3: S3Settings
    fs: FsSettings
    cache_dir: Path
    block_size: int
    memory_cache_bytes: int
    allow_other: bool
    log_file: Path | None
    disk_cache_bytes: int = config.DEFAULT_DISK_CACHE
    cache_min_free: float = config.DEFAULT_CACHE_MIN_FREE
    max_prefetch_bytes: int = config.DEFAULT_MAX_PREFETCH
    as_of: float | None = None  # --as-of: the dataset as it was then (epoch seconds)
    snapshot: Path | None = None  # --snapshot: mount what this file lists (absolute; no LIST)
    save_snapshot: Path | None = None  # --save-snapshot: write what was pinned (absolute)
    expect_fingerprint: str | None = None  # refuse to mount other data
    archive: str = "auto"  # --archive: a zip single object as its members (auto) or as a file
    noexec: bool = False  # --noexec (fstab noexec; mount(8) adds it for user mounts)
    # The command line's options as given (argparse dest -> value; no secret is ever an
    # option): kept in the state file, so that a remount can tell which options it changes.
    options: dict[str, str | int | float | bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class MountSummary:
    object_count: int
    total_bytes: int
    skipped_count: int
    pid: int
    fingerprint: str = ""

    def as_dict(self) -> dict[str, int | str]:
        return dict(vars(self))
