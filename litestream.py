#!/usr/bin/env python3
"""Streaming replication of SQLite databases to S3 and directories, in one file.

Usage::

    python3 litestream.py replicate app.db /path/to/backup
    python3 litestream.py replicate -config /etc/litestream.ini
    python3 litestream.py restore -o restored.db file:///path/to/backup

Replicas use the Litestream v0.3.13 layout (generations, LZ4 snapshots and
WAL segments), so Go Litestream 0.3.x restores what this writes and this
restores what Go writes.  Requires Python 3.8 or newer and nothing outside
the standard library.  Licensed under the Apache License, Version 2.0.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "DB",
    "Replica",
    "ReplicaClient",
    "FileReplicaClient",
    "Pos",
    "SnapshotInfo",
    "WALSegmentInfo",
    "LitestreamError",
    "NoGenerationError",
    "NoSnapshotError",
    "ChecksumMismatchError",
    "ConfigError",
    "CorruptFrameError",
    "main",
]

import abc
import argparse
import datetime
import errno
import hashlib
import logging
import os
import re
import secrets
import signal
import sqlite3
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterable, List, Optional

# Local metadata directory: "<dir>/.<dbfile>-litestream".
META_DIR_SUFFIX = "-litestream"

SNAPSHOT_EXT = ".snapshot.lz4"
WAL_SEGMENT_EXT = ".wal.lz4"
WAL_EXT = ".wal"
GENERATION_NAME_LEN = 16

DEFAULT_MONITOR_INTERVAL = 1.0
DEFAULT_CHECKPOINT_INTERVAL = 60.0
DEFAULT_MIN_CHECKPOINT_PAGE_N = 1000
DEFAULT_MAX_CHECKPOINT_PAGE_N = 10000
DEFAULT_TRUNCATE_PAGE_N = 500000
DEFAULT_SYNC_INTERVAL = 1.0
DEFAULT_RETENTION = 24 * 3600.0
DEFAULT_RETENTION_CHECK_INTERVAL = 3600.0
DEFAULT_RESTORE_PARALLELISM = 8
BUSY_TIMEOUT = 1.0

MAX_INDEX = 0x7FFFFFFF
S3_MAX_KEYS = 1000

WAL_HEADER_SIZE = 32
WAL_FRAME_HEADER_SIZE = 24

log = logging.getLogger("litestream")


###############################################################################
# Errors
###############################################################################


class LitestreamError(Exception):
    """Base class of every error this module raises on purpose."""


class NoGenerationError(LitestreamError):
    def __init__(self, msg: str = "no generation available"):
        super().__init__(msg)


class NoSnapshotError(LitestreamError):
    def __init__(self, msg: str = "no snapshots available"):
        super().__init__(msg)


class ChecksumMismatchError(LitestreamError):
    def __init__(self, msg: str = "invalid replica, checksum mismatch"):
        super().__init__(msg)


class ConfigError(LitestreamError):
    """A config file, flag or URL that cannot be used as written."""


class CorruptFrameError(LitestreamError, ValueError):
    """LZ4 or WAL bytes that do not follow their format."""


###############################################################################
# Value types and naming
###############################################################################


@dataclass(frozen=True, order=True)
class Pos:
    """A position in a generation's WAL stream: (generation, index, offset)."""

    generation: str = ""
    index: int = 0
    offset: int = 0

    def is_zero(self) -> bool:
        return self.generation == "" and self.index == 0 and self.offset == 0

    def __str__(self) -> str:
        if self.is_zero():
            return ""
        return "%s/%08x:%d" % (self.generation, self.index, self.offset)


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot object in a replica; size is the stored (compressed) size."""

    generation: str
    index: int
    size: int
    created_at: datetime.datetime

    def pos(self) -> Pos:
        return Pos(self.generation, self.index, 0)


@dataclass(frozen=True)
class WALSegmentInfo:
    """A WAL segment object in a replica; size is the stored size."""

    generation: str
    index: int
    offset: int
    size: int
    created_at: datetime.datetime

    def pos(self) -> Pos:
        return Pos(self.generation, self.index, self.offset)


_GENERATION_RE = re.compile(r"^[0-9a-f]{16}$")
_SNAPSHOT_RE = re.compile(r"^([0-9a-f]{8})\.snapshot\.lz4$")
_WAL_SEGMENT_RE = re.compile(r"^([0-9a-f]{8})_([0-9a-f]{8})\.wal\.lz4$")
_WAL_RE = re.compile(r"^([0-9a-f]{8})\.wal$")


def is_generation_name(s: str) -> bool:
    """Report whether s is a generation name: 16 lowercase hex digits."""
    return bool(_GENERATION_RE.match(s))


def new_generation_name() -> str:
    """Return a new random generation name."""
    return secrets.token_hex(8)


def _check_u32(name: str, n: int) -> None:
    # Names carry exactly 8 hex digits; a ninth would make the object
    # invisible to every 0.3 reader (format note §12.8), so refuse it.
    if not 0 <= n <= 0xFFFFFFFF:
        raise LitestreamError("%s out of range for replica naming: %d" % (name, n))


def format_snapshot_path(index: int) -> str:
    """Return a snapshot's file name: "%08x.snapshot.lz4"."""
    _check_u32("snapshot index", index)
    return "%08x%s" % (index, SNAPSHOT_EXT)


def parse_snapshot_path(name: str) -> int:
    """Return the index in a snapshot file name; ValueError if it is not one."""
    m = _SNAPSHOT_RE.match(name)
    if not m:
        raise ValueError("invalid snapshot path: %r" % name)
    return int(m.group(1), 16)


def format_wal_segment_path(index: int, offset: int) -> str:
    """Return a WAL segment's file name: "%08x_%08x.wal.lz4"."""
    _check_u32("wal index", index)
    _check_u32("wal offset", offset)
    return "%08x_%08x%s" % (index, offset, WAL_SEGMENT_EXT)


def parse_wal_segment_path(name: str) -> "tuple[int, int]":
    """Return (index, offset) from a WAL segment file name."""
    m = _WAL_SEGMENT_RE.match(name)
    if not m:
        raise ValueError("invalid wal segment path: %r" % name)
    return int(m.group(1), 16), int(m.group(2), 16)


def format_wal_path(index: int) -> str:
    """Return a shadow WAL file name: "%08x.wal"."""
    return "%08x%s" % (index, WAL_EXT)


def parse_wal_path(name: str) -> int:
    """Return the index in a shadow WAL file name."""
    m = _WAL_RE.match(name)
    if not m:
        raise ValueError("invalid wal path: %r" % name)
    return int(m.group(1), 16)


def generation_path(root: str, generation: str) -> str:
    """Return "<root>/generations/<generation>" with "/" separators."""
    if not generation:
        raise LitestreamError("generation required")
    return _join(root, "generations", generation)


def snapshot_path(root: str, generation: str, index: int) -> str:
    return _join(generation_path(root, generation), "snapshots", format_snapshot_path(index))


def wal_segment_path(root: str, generation: str, index: int, offset: int) -> str:
    return _join(generation_path(root, generation), "wal", format_wal_segment_path(index, offset))


def _join(*parts: str) -> str:
    # Like Go's path.Join for keys: no empty parts, no leading "./".
    out = "/".join(p.strip("/") for p in parts if p.strip("/") not in ("", "."))
    if parts and parts[0].startswith("/"):
        out = "/" + out
    return out


def utc_from_timestamp(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def fsync_dir(path: str) -> None:
    """Flush a directory entry to disk so a rename in it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some filesystems refuse fsync on directories; rename is still atomic.
    finally:
        os.close(fd)


###############################################################################
# Replica clients
###############################################################################


class ReplicaClient(abc.ABC):
    """The storage contract a Replica uses: list, read, write, delete objects.

    Clients store bytes as given: they never compress or decompress.  Lists
    come back sorted.  A missing object raises FileNotFoundError from every
    client, the counterpart of Go's os.ErrNotExist.
    """

    client_type = ""

    @abc.abstractmethod
    def generations(self) -> List[str]:
        """Return the generation names in the replica, sorted."""

    @abc.abstractmethod
    def delete_generation(self, generation: str) -> None:
        """Delete every object of a generation.  A missing one is not an error."""

    @abc.abstractmethod
    def snapshots(self, generation: str) -> List[SnapshotInfo]:
        """Return a generation's snapshots sorted by index."""

    @abc.abstractmethod
    def write_snapshot(self, generation: str, index: int, rd: BinaryIO) -> SnapshotInfo:
        """Store the stream rd (read until EOF) as the snapshot at index."""

    @abc.abstractmethod
    def delete_snapshot(self, generation: str, index: int) -> None:
        """Delete a snapshot.  A missing one is not an error."""

    @abc.abstractmethod
    def snapshot_reader(self, generation: str, index: int) -> BinaryIO:
        """Return a reader of a snapshot's stored bytes.

        Raises FileNotFoundError if the snapshot does not exist.
        """

    @abc.abstractmethod
    def wal_segments(self, generation: str) -> List[WALSegmentInfo]:
        """Return a generation's WAL segments sorted by (index, offset)."""

    @abc.abstractmethod
    def write_wal_segment(self, pos: Pos, rd: BinaryIO) -> WALSegmentInfo:
        """Store the stream rd (read until EOF) as the WAL segment at pos."""

    @abc.abstractmethod
    def delete_wal_segments(self, positions: Iterable[Pos]) -> None:
        """Delete WAL segments.  Missing ones are not an error."""

    @abc.abstractmethod
    def wal_segment_reader(self, pos: Pos) -> BinaryIO:
        """Return a reader of a WAL segment's stored bytes.

        Raises FileNotFoundError if the segment does not exist.
        """

    def close(self) -> None:
        """Release connections and other resources."""
