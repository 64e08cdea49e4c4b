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
    "Replicator",
    "restore",
    "ShutdownError",
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
    "S3Error",
    "S3ReplicaClient",
    "SigV4Signer",
    "MetricsServer",
    "METRICS",
    "main",
]

import abc
import argparse
import base64
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import datetime
import decimal
import difflib
import email.utils
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import io
import itertools
import json
import logging
import multiprocessing
import os
import posixpath
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from itertools import accumulate, chain, zip_longest
from typing import BinaryIO, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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
DEFAULT_RETENTION_MIN_SNAPSHOTS = 1
DEFAULT_RESTORE_PARALLELISM = 8
# LZ4 worker processes (snapshots, restore).  Spawned workers import the
# program's main module again: litestream.py guards its own, but a script
# that imports litestream may not, so as a library the default is none.
DEFAULT_LZ4_WORKERS = min(4, os.cpu_count() or 1) if __name__ == "__main__" else 0
VALIDATION_RESTORE_PARALLELISM = 2  # WAL indices a restore drill stages at once (bounds its disk use)
VALIDATION_PIN_ATTEMPTS = 3  # a drill pins a position again after a WAL restart met mid-pin
RESTORE_RANGED_GET_MIN = 16 << 20  # snapshots this big are fetched with parallel ranged GETs
RESTORE_REPLAN_ATTEMPTS = 5  # fresh listings a restore or verify takes when objects vanish
BUSY_TIMEOUT = 1.0

MAX_INDEX = 0x7FFFFFFF
DEFAULT_CONFIG_PATH = "/etc/litestream.ini"
DEFAULT_CONFIG_PATHS = (DEFAULT_CONFIG_PATH, "/etc/litestream.yml")  # looked up in this order
DEFAULT_S3_CONCURRENCY = 5  # aws-sdk-go s3manager
DEFAULT_S3_MAX_RETRIES = 3  # aws-sdk-go DefaultRetryer
S3_MAX_KEYS = 1000
S3_MIN_PART_SIZE = 5 * 1024 * 1024  # s3manager.MinUploadPartSize
DEFAULT_S3_PART_SIZE = S3_MIN_PART_SIZE
S3_MAX_PARTS = 10000  # s3manager.MaxUploadParts
S3_DEFAULT_REGION = "us-east-1"
S3_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
S3_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
S3_CREDENTIALS_REFRESH_WINDOW = 5 * 60.0  # refresh temporary keys this long before expiry
STALE_UPLOAD_AGE = 6 * 3600.0  # incomplete multipart uploads this old are a crash's leftovers

DEFAULT_MAX_RETRY_DELAY = 60.0  # the longest wait between retries of a failed replica sync
DEFAULT_SHUTDOWN_TIMEOUT = 25.0  # fits Kubernetes' default 30 s grace period, with room to exit
DEFAULT_HEARTBEAT_INTERVAL = 60.0  # Go 0.5's heartbeat-interval
MIN_MAX_LAG = 10.0  # the default max-lag is 10 x sync-interval, and at least this
HEARTBEAT_CHECK_INTERVAL = 5.0  # how often a due heartbeat looks whether everything replicates
HEALTH_STALL = 60.0  # /healthz fails when a DB's sync loop has not run for this long (or 10 intervals)


def default_max_lag(sync_interval: float) -> float:
    """Return the default max-lag of a replica with this sync interval."""
    return max(10 * sync_interval, MIN_MAX_LAG)

WAL_HEADER_SIZE = 32
SHADOW_COPY_CHUNK = 64 << 20  # replicas are woken after each chunk of a big backlog
WAL_FRAME_HEADER_SIZE = 24

log = logging.getLogger("litestream")


class _LogAdapter(logging.LoggerAdapter):
    """A logger carrying fields (db, replica) for log-type json, as slog's With().

    Unlike LoggerAdapter before Python 3.13 it keeps a call's own `extra`
    (position, elapsed ...) next to its fields; adapters nest.
    """

    def process(self, msg, kwargs):
        kwargs["extra"] = dict(self.extra, **kwargs.get("extra") or {})
        return msg, kwargs


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


class S3Error(LitestreamError):
    """An error answered by an S3 server, or a request that never got an answer.

    status is the HTTP status (0 when no response arrived), code the S3
    error code ("NoSuchKey", "SignatureDoesNotMatch", ...).  The text never
    carries credentials: the client redacts its secrets before raising.
    """

    def __init__(self, status: int, code: str, message: str = "", key: str = "",
                 request_id: str = "", bucket: str = ""):
        self.status = status
        self.code = code
        self.message = message
        self.key = key
        self.request_id = request_id
        self.bucket = bucket
        super().__init__(str(self))

    def __str__(self) -> str:
        ctx = []
        if self.bucket:
            ctx.append("bucket=%s" % self.bucket)
        if self.key:
            ctx.append("key=%s" % self.key)
        if self.status:
            ctx.append("status=%d" % self.status)
        if self.request_id:
            ctx.append("request_id=%s" % self.request_id)
        msg = "s3: %s" % self.code
        if self.message:
            msg += ": %s" % self.message
        if ctx:
            msg += " (%s)" % ", ".join(ctx)
        return msg.replace("\n", " ")


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


def _match_name(rx, name: str, kind: str):
    m = rx.match(name)
    if not m:
        raise ValueError("invalid %s path: %r" % (kind, name))
    return m


def parse_snapshot_path(name: str) -> int:
    """Return the index in a snapshot file name; ValueError if it is not one."""
    return int(_match_name(_SNAPSHOT_RE, name, "snapshot").group(1), 16)


def format_wal_segment_path(index: int, offset: int) -> str:
    """Return a WAL segment's file name: "%08x_%08x.wal.lz4"."""
    _check_u32("wal index", index)
    _check_u32("wal offset", offset)
    return "%08x_%08x%s" % (index, offset, WAL_SEGMENT_EXT)


def parse_wal_segment_path(name: str) -> "tuple[int, int]":
    """Return (index, offset) from a WAL segment file name."""
    m = _match_name(_WAL_SEGMENT_RE, name, "wal segment")
    return int(m.group(1), 16), int(m.group(2), 16)


def format_wal_path(index: int) -> str:
    """Return a shadow WAL file name: "%08x.wal"."""
    return "%08x%s" % (index, WAL_EXT)


def parse_wal_path(name: str) -> int:
    """Return the index in a shadow WAL file name."""
    return int(_match_name(_WAL_RE, name, "wal").group(1), 16)


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


def remove_quietly(*paths: str) -> None:
    """Unlink each path; one that is already gone is not an error."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def atomic_write(path: str, data) -> None:
    """Replace path with data (bytes, or a binary reader read to EOF), whole or not at all.

    The data goes to "<path>.tmp", is fsynced and renamed over path, and
    the directory is fsynced, so a crash leaves the old or the new file.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                copy_stream(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of data at offset, or raise OSError.

    os.pwrite may write fewer bytes than asked (a disk filling up does
    exactly that); the rest is retried, and a write that makes no progress
    is ENOSPC.
    """
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        mv = mv[n:]
        offset += n


def pread_chunks(fd: int, start: int = 0, end: Optional[int] = None, chunk: int = 4 << 20):
    """Yield the bytes [start, end) of fd (end None: to EOF) in chunks of at most chunk bytes.

    With an end, a file that ends early raises LitestreamError.
    """
    off = start
    while end is None or off < end:
        want = chunk if end is None else min(chunk, end - off)
        b = os.pread(fd, want, off)
        if not b:
            if end is None:
                return
            raise LitestreamError("short read at offset %d of %d" % (off, end))
        off += len(b)
        yield b


###############################################################################
# SQLite WAL format
###############################################################################

# Spec: https://www.sqlite.org/fileformat2.html#the_write_ahead_log
#
# WAL header (32 bytes, big-endian):      frame header (24 bytes, big-endian):
#   0  magic 0x377f0682 / 0x377f0683        0  page number
#   4  format version (3007000)             4  commit: db size in pages, else 0
#   8  page size                            8  salt-1 (copied from the header)
#  12  checkpoint sequence                 12  salt-2
#  16  salt-1, 20 salt-2                   16  checksum-1, 20 checksum-2
#  24  checksum-1, 28 checksum-2 over bytes 0..24
#
# Frame checksums are cumulative: each continues from the previous frame's
# (or the header's) over frame header bytes 0..8 and the page.  The magic's
# low bit says whether the checksum reads words big-endian (1) or little (0).

WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class WALHeader:
    """The fields of a WAL file header."""

    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def big_endian(self) -> bool:
        return self.magic == WAL_MAGIC_BE


def _keep_wal_on_close(conn: sqlite3.Connection) -> bool:
    """Ask SQLite not to checkpoint and delete the WAL when conn closes last.

    Go sets SQLITE_FCNTL_PERSIST_WAL for the same reason: a restart then
    finds the WAL it left and continues the generation.  Python offers the
    equivalent only from 3.12 (Connection.setconfig); returns whether it
    could be set.
    """
    setconfig = getattr(conn, "setconfig", None)
    op = getattr(sqlite3, "SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE", None)
    if setconfig is None or op is None:
        return False
    setconfig(op, True)
    return True


_KEPT_FOREVER: list = []


def _keep_forever(obj) -> None:
    """Make sure obj is never deallocated, not even when the interpreter exits."""
    _KEPT_FOREVER.append(obj)
    try:
        import ctypes
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except (ImportError, AttributeError, OSError):
        pass  # the list alone keeps it until interpreter teardown


def parse_wal_header(b: bytes) -> WALHeader:
    """Parse and verify a 32-byte WAL header; CorruptFrameError if invalid."""
    if len(b) < WAL_HEADER_SIZE:
        raise CorruptFrameError("wal header too short: %d bytes" % len(b))
    hdr = WALHeader(*struct.unpack(">8I", b[:WAL_HEADER_SIZE]))
    if hdr.magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise CorruptFrameError("invalid wal header magic: %08x" % hdr.magic)
    ps = hdr.page_size
    if ps == 1:
        ps = 65536  # The 64 KiB page size is stored as 1.
    if ps < 512 or ps > 65536 or ps & (ps - 1):
        raise CorruptFrameError("invalid wal page size: %d" % hdr.page_size)
    s0, s1 = wal_checksum(hdr.big_endian, b[:24], 0, 0)
    if (s0, s1) != (hdr.checksum1, hdr.checksum2):
        raise CorruptFrameError("wal header checksum mismatch")
    if ps != hdr.page_size:
        hdr = WALHeader(hdr.magic, hdr.version, ps, hdr.checkpoint_seq,
                        hdr.salt1, hdr.salt2, hdr.checksum1, hdr.checksum2)
    return hdr


def wal_checksum(big_endian: bool, data, s0: int, s1: int) -> "tuple[int, int]":
    """Continue SQLite's WAL checksum (s0, s1) over data (a multiple of 8 bytes)."""
    n = len(data) // 4
    words = struct.unpack((">%dI" if big_endian else "<%dI") % n, data)
    it = iter(words)
    for w0, w1 in zip(it, it):
        s0 = (s0 + w0 + s1) & _U32
        s1 = (s1 + w1 + s0) & _U32
    return s0, s1


def frame_align(offset: int, page_size: int) -> int:
    """Round a WAL offset down to the end of the last whole frame."""
    if offset < WAL_HEADER_SIZE:
        return 0
    fs = page_size + WAL_FRAME_HEADER_SIZE
    return WAL_HEADER_SIZE + (offset - WAL_HEADER_SIZE) // fs * fs


def calc_wal_size(page_size: int, n: int) -> int:
    """Return the size of a WAL holding n frames."""
    return WAL_HEADER_SIZE + (WAL_FRAME_HEADER_SIZE + page_size) * n


def iter_wal_frames(f, start: int, hdr: WALHeader, s0: int, s1: int, chunk_frames: int = 256,
                    end: Optional[int] = None):
    """Yield (offset, frame bytes, is_commit) for each valid frame of f (a file or an fd) from start.

    Iteration stops at end (default: end of file), at a partial frame, at a
    frame whose salt differs from hdr's, or at one whose checksum breaks the
    chain.  The first read is one frame, so finding nothing new is cheap.
    """
    ps = hdr.page_size
    fs = ps + WAL_FRAME_HEADER_SIZE
    be = hdr.big_endian
    salt = struct.pack(">II", hdr.salt1, hdr.salt2)
    off = start
    fd = f if isinstance(f, int) else f.fileno()
    frames = 1
    while True:
        want = fs * frames
        if end is not None:
            want = min(want, end - off)
        buf = os.pread(fd, want, off) if want > 0 else b""
        n = len(buf) // fs
        if n == 0:
            return
        mv = memoryview(buf)
        for i in range(n):
            fr = mv[i * fs:(i + 1) * fs]
            if fr[8:16] != salt:
                return
            s0, s1 = wal_checksum(be, fr[0:8], s0, s1)
            s0, s1 = wal_checksum(be, fr[WAL_FRAME_HEADER_SIZE:], s0, s1)
            if struct.unpack(">II", fr[16:24]) != (s0, s1):
                return
            yield off, fr, fr[4:8] != b"\0\0\0\0"
            off += fs
        if n < frames:
            return
        frames = min(chunk_frames, frames * 16)


###############################################################################
# LZ4 frame codec
###############################################################################

# --------------------------------------------------------------------------
# xxHash32 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)

_P1, _P2, _P3, _P4, _P5 = (2654435761, 2246822519, 3266489917,
                           668265263, 374761393)
_M32 = 0xFFFFFFFF


def _xxh32_lanes(lanes, data, nstripes):
    """Run the four accumulators over `nstripes` 16-byte stripes of data."""
    p1, p2, m32 = _P1, _P2, _M32      # locals: global lookups cost ~20%
    v1, v2, v3, v4 = lanes
    chunk = 16384                     # stripes per unpack: bounded memory
    for first in range(0, nstripes, chunk):
        count = min(chunk, nstripes - first)
        words = struct.unpack_from("<%dI" % (count * 4), data, first * 16)
        # Each lane only sees every fourth word, so process it as one flat
        # slice; skipping the final mask is safe because the next addition
        # is masked before the rotation reads the high bits.
        for w in words[0::4]:
            v1 = (v1 + w * p2) & m32
            v1 = (v1 << 13 | v1 >> 19) * p1
        for w in words[1::4]:
            v2 = (v2 + w * p2) & m32
            v2 = (v2 << 13 | v2 >> 19) * p1
        for w in words[2::4]:
            v3 = (v3 + w * p2) & m32
            v3 = (v3 << 13 | v3 >> 19) * p1
        for w in words[3::4]:
            v4 = (v4 + w * p2) & m32
            v4 = (v4 << 13 | v4 >> 19) * p1
        v1, v2, v3, v4 = v1 & m32, v2 & m32, v3 & m32, v4 & m32
    return [v1, v2, v3, v4]


def _xxh32_finish(h, tail, total):
    """Mix in the total length and the <16 trailing bytes, then avalanche."""
    h = (h + total) & _M32
    p = 0
    n = len(tail)
    while p + 4 <= n:
        h = (h + struct.unpack_from("<I", tail, p)[0] * _P3) & _M32
        h = ((h << 17 | h >> 15) * _P4) & _M32
        p += 4
    while p < n:
        h = (h + tail[p] * _P5) & _M32
        h = ((h << 11 | h >> 21) * _P1) & _M32
        p += 1
    h ^= h >> 15
    h = (h * _P2) & _M32
    h ^= h >> 13
    h = (h * _P3) & _M32
    return h ^ (h >> 16)


def _xxh32_merge(lanes):
    v1, v2, v3, v4 = lanes
    return ((v1 << 1 | v1 >> 31) + (v2 << 7 | v2 >> 25) +
            (v3 << 12 | v3 >> 20) + (v4 << 18 | v4 >> 14)) & _M32


def xxh32(data, seed=0):
    """Return the 32-bit xxHash of a bytes-like object."""
    data = bytes(data)
    n = len(data)
    seed &= _M32
    if n < 16:
        return _xxh32_finish((seed + _P5) & _M32, data, n)
    lanes = [(seed + _P1 + _P2) & _M32, (seed + _P2) & _M32, seed,
             (seed - _P1) & _M32]
    nstripes = n // 16
    lanes = _xxh32_lanes(lanes, data, nstripes)
    return _xxh32_finish(_xxh32_merge(lanes), data[nstripes * 16:], n)


def _xxh32_lanes_job(data, first, lanes):
    """Run lanes first, first+1, ... (values `lanes`) over whole 16-byte stripes of data (a worker job).

    The four lanes are independent, so two workers can each take two.
    """
    p1, p2, m32 = _P1, _P2, _M32
    out = list(lanes)
    nwords = len(data) // 16 * 4
    for start in range(0, nwords, 65536):
        words = struct.unpack_from("<%dI" % min(65536, nwords - start), data, start * 4)
        for j in range(len(out)):
            v = out[j]
            for w in words[first + j::4]:
                v = (v + w * p2) & m32
                v = (v << 13 | v >> 19) * p1
            out[j] = v & m32
    return out


_POOL_XXH32_MIN = 1 << 20   # smaller updates are hashed in the calling process


class _XXH32Stream:
    """Incremental xxh32 with seed 0 (for frame content checksums).

    With a pool, large updates run as two worker jobs of two lanes each,
    chained on the previous update's lanes.
    """

    def __init__(self, pool=None):
        self._lanes = [(_P1 + _P2) & _M32, _P2, 0, (-_P1) & _M32]
        self._pending = b""
        self._total = 0
        self._pool = pool
        self._futures = None

    def _resolve(self):
        if self._futures is not None:
            lo, hi = self._futures
            self._futures = None
            self._lanes = self._pool.result(lo) + self._pool.result(hi)
        return self._lanes

    def update(self, data):
        self._total += len(data)
        data = self._pending + bytes(data)
        nstripes = len(data) // 16
        if nstripes and self._pool is not None and nstripes * 16 >= _POOL_XXH32_MIN:
            lanes = self._resolve()
            whole = data[:nstripes * 16]
            self._futures = (self._pool.submit(_xxh32_lanes_job, whole, 0, lanes[:2]),
                             self._pool.submit(_xxh32_lanes_job, whole, 2, lanes[2:]))
        elif nstripes:
            self._lanes = _xxh32_lanes(self._resolve(), data, nstripes)
        self._pending = data[nstripes * 16:]

    def intdigest(self):
        self._resolve()
        if self._total < 16:
            return _xxh32_finish(_P5, self._pending, self._total)
        return _xxh32_finish(_xxh32_merge(self._lanes), self._pending,
                             self._total)


# --------------------------------------------------------------------------
# Block format (lz4_Block_format.md).  A block is a series of sequences:
#   token (hi nibble literal length, lo nibble match length - 4; 15 means
#   "add following bytes until one is < 255"), literals, u16le offset (1..65535),
#   optional match length bytes.  The last sequence is literals only; the last
#   5 bytes are literals and the last match starts >= 12 bytes before the end.

_MIN_MATCH = 4
_LAST_LITERALS = 5
_MFLIMIT = 12
_MAX_OFFSET = 65535
_KEY = 8                # bytes hashed at each anchor
_ZERO_RUN = 32          # shortest run of zero bytes encoded as a match
_NONZERO = re.compile(b"[^\x00]")


def _anchor_table(first, second):
    """Translate table marking anchor pairs: byte in `first` then in `second`."""
    table = bytearray(256)
    for b in second:
        table[b] = 2
    for b in first:
        table[b] = 1
    return bytes(table)


# Match candidates are only looked for at content-defined anchors (a separator
# byte followed by a byte from a fixed pseudo-random subset), so both copies
# of a repeated string are sampled at the same place whatever their
# alignment.  Finding anchors costs C-speed translate()+split(); the Python
# loop then runs once per anchor, not once per byte.  Higher levels sample
# more densely: better ratio, slower.
_SEPARATORS = b' ,"\n\t'
_LEVELS = {
    1: _anchor_table(_SEPARATORS, [b for b in range(256) if (b * 167) & 255 < 86]),
    2: _anchor_table(_SEPARATORS, [b for b in range(256) if (b * 167) & 128]),
    3: _anchor_table(_SEPARATORS + b'.@:-/', range(256)),
}
# Level 0 stores blocks uncompressed (block size with its high bit set, which
# every LZ4 frame reader accepts, Go's pierrec/lz4 included): the small,
# frequent WAL segments then cost a memcpy and a sha256 instead of a Python
# matcher that would gain them ~1.2x.  Snapshots use a compressing level.
LZ4_STORED = 0
LZ4_DEFAULT_LEVEL = 1
LZ4_LEVELS = (LZ4_STORED,) + tuple(sorted(_LEVELS))
WAL_SEGMENT_LZ4_LEVEL = LZ4_STORED


def _emit(out, src, lit, start, offset, mlen):
    """Append one sequence: literals src[lit:start], then a match."""
    ll = start - lit
    ml = mlen - _MIN_MATCH
    out.append((15 if ll >= 15 else ll) << 4 | (15 if ml >= 15 else ml))
    if ll >= 15:
        out += b"\xff" * ((ll - 15) // 255)
        out.append((ll - 15) % 255)
    out += src[lit:start]
    out.append(offset & 255)
    out.append(offset >> 8)
    if ml >= 15:
        out += b"\xff" * ((ml - 15) // 255)
        out.append((ml - 15) % 255)


def _emit_last(out, src, lit):
    """Append the final, literals-only sequence."""
    ll = len(src) - lit
    out.append((15 if ll >= 15 else ll) << 4)
    if ll >= 15:
        out += b"\xff" * ((ll - 15) // 255)
        out.append((ll - 15) % 255)
    out += src[lit:]


def _zero_runs(src):
    """Yield (start, end) of runs of >= _ZERO_RUN zero bytes, then a sentinel."""
    n = len(src)
    zeros = b"\x00" * _ZERO_RUN
    i = src.find(zeros, 1)       # a run needs one earlier zero to copy from
    while i >= 0:
        m = _NONZERO.search(src, i + _ZERO_RUN)
        j = m.start() if m else n
        yield i, j
        i = src.find(zeros, j)
    yield n + 1, n + 1


def lz4_compress_block(src, level=LZ4_DEFAULT_LEVEL):
    """Compress bytes into one independent raw LZ4 block (no frame).

    Level 0 (LZ4_STORED) gives a literals-only block; frames store such
    blocks uncompressed instead (see LZ4FrameWriter).
    """
    src = bytes(src)
    n = len(src)
    out = bytearray()
    if n < _MFLIMIT + 1 or level == LZ4_STORED:
        _emit_last(out, src, 0)
        return bytes(out)
    last = n - _MFLIMIT          # a match must start at or before this
    end = n - _LAST_LITERALS     # ... and end at or before this
    pieces = src.translate(_LEVELS[level]).split(b"\x01\x02")
    pieces.pop()
    anchors = accumulate(map((2).__add__, map(len, pieces)), initial=-2)
    next(anchors)
    runs = _zero_runs(src)
    zs, ze = next(runs)
    table = {}
    get = table.get
    frombytes = int.from_bytes
    lit = 0                      # first byte not yet covered by a sequence
    # The sentinel anchor n flushes zero runs after the last real anchor.
    for a in chain(anchors, (n,)):
        while a >= zs:           # zero runs found before this anchor
            s = zs + 1 if zs >= lit else lit
            e = ze if ze < end else end
            if e - s >= _MIN_MATCH and s <= last:
                _emit(out, src, lit, s, 1, e - s)
                lit = e
            zs, ze = next(runs)
        if a > last:
            break
        key = src[a:a + _KEY]
        c = get(key)
        table[key] = a
        if c is None or a < lit or a - c > _MAX_OFFSET:
            continue
        # Forward extension: the lowest set bit of the XOR of two
        # little-endian ints marks the first differing byte.
        p = a + _KEY
        width = end - p
        if width < 0:
            continue
        if width > 32:
            width = 32
        x = frombytes(src[p:p + width], "little") ^ frombytes(
            src[c + _KEY:c + _KEY + width], "little")
        if x:
            f = _KEY + (((x & -x).bit_length() - 1) >> 3)
        else:
            # Long match: gallop then binary-search with slice compares.
            f = _KEY + width
            hi = end - a
            step = 64
            while f + step <= hi and src[a + f:a + f + step] == src[c + f:c + f + step]:
                f += step
                step <<= 1
            while step > 1:
                step >>= 1
                if f + step <= hi and src[a + f:a + f + step] == src[c + f:c + f + step]:
                    f += step
        # Backward extension (big-endian: trailing equal bytes are low zeros).
        b = 0
        width = min(a - lit, c, 16)
        if width and src[a - 1] == src[c - 1]:
            x = frombytes(src[a - width:a], "big") ^ frombytes(src[c - width:c], "big")
            b = (((x & -x).bit_length() - 1) >> 3) if x else width
        _emit(out, src, lit, a - b, a - c, f + b)
        lit = a + f
    _emit_last(out, src, lit)
    return bytes(out)


_FF_RUN = re.compile(b"\xff*")


def _decode_block(src, out, limit):
    """Decode block `src`, appending to bytearray `out` (which may already
    hold up to 64 KiB of history); `out` may not grow beyond `limit`."""
    n = len(src)
    i = 0
    olen = len(out)      # tracked locally: len() calls dominate short sequences
    try:
        while i < n:
            token = src[i]
            i += 1
            ll = token >> 4
            if ll:
                if ll == 15:
                    ll += src[i]
                    i += 1
                    if ll == 270:                    # 255s follow: skip at C speed
                        j = _FF_RUN.match(src, i).end()
                        ll += 255 * (j - i) + src[j]
                        i = j + 1
                j = i + ll
                if j > n:
                    raise CorruptFrameError("lz4: literal run overruns block")
                olen += ll
                if olen > limit:
                    raise CorruptFrameError("lz4: block decodes beyond maximum size")
                out += src[i:j]
                i = j
            if i == n:
                break
            offset = src[i] | src[i + 1] << 8
            i += 2
            ml = token & 15
            if ml == 15:
                ml += src[i]
                i += 1
                if ml == 270:
                    j = _FF_RUN.match(src, i).end()
                    ml += 255 * (j - i) + src[j]
                    i = j + 1
            ml += 4                                  # minmatch
            start = olen - offset
            if offset == 0:
                raise CorruptFrameError("lz4: zero match offset")
            if start < 0:
                raise CorruptFrameError("lz4: match offset beyond output")
            olen += ml
            if olen > limit:
                raise CorruptFrameError("lz4: block decodes beyond maximum size")
            if ml <= offset:
                out += out[start:start + ml]
            else:
                # Overlapping copy repeats the last `offset` bytes.
                out += (out[start:] * (ml // offset + 1))[:ml]
    except IndexError:
        raise CorruptFrameError("lz4: truncated sequence in block") from None


def lz4_decompress_block(src, max_size, prefix=b""):
    """Decode one raw LZ4 block of at most max_size bytes.  `prefix` is the
    preceding output for linked blocks (only its last 64 KiB is used)."""
    prefix = bytes(prefix[-65536:])
    out = bytearray(prefix)
    _decode_block(bytes(src), out, len(prefix) + max_size)
    return bytes(out[len(prefix):])


# --------------------------------------------------------------------------
# Frame format (lz4_Frame_format.md):
#   magic u32le 0x184D2204 | FLG | BD | [content size u64le] | [dict id u32le]
#   | HC | blocks... | u32le 0 end mark | [content xxh32 u32le]
# FLG bits: 7-6 version (01), 5 block independence, 4 block checksum,
#   3 content size, 2 content checksum, 1 reserved (0), 0 dictionary id.
# BD bits: 7 reserved, 6-4 block max size (4=64K 5=256K 6=1M 7=4M), 3-0 reserved.
# HC = (xxh32(FLG..last descriptor byte, 0) >> 8) & 0xFF.
# Block: u32le size (bit 31 set = stored uncompressed), data, [xxh32 of data].
# Skippable frame: u32le 0x184D2A50..0x184D2A5F, u32le length, payload.

LZ4_MAGIC = 0x184D2204
_SKIP_MIN, _SKIP_MAX = 0x184D2A50, 0x184D2A5F
LZ4_TRAILER_MAGIC = 0x184D2A5C
LZ4_TRAILER_TAG = b"LSH1"
_BLOCK_IDS = {64 << 10: 4, 256 << 10: 5, 1 << 20: 6, 4 << 20: 7}
LZ4_BLOCK_SIZE = 4 << 20


def lz4_compress_frame(data, *, block_size=LZ4_BLOCK_SIZE, content_checksum=False,
                       level=LZ4_DEFAULT_LEVEL):
    """Compress bytes into one LZ4 frame followed by the LSH1 sha256 trailer."""
    buf = io.BytesIO()
    w = LZ4FrameWriter(buf, content_checksum=content_checksum,
                       block_size=block_size, level=level)
    w.write(data)
    w.close()
    return buf.getvalue()


def lz4_decompress_frame(data):
    """Decompress the first LZ4 frame in `data` (skippable frames before it
    are skipped, trailing bytes after it ignored)."""
    return LZ4FrameReader(io.BytesIO(data)).read()


class LZ4FrameWriter:
    """Write one LZ4 frame of independent blocks to a binary file object."""

    def __init__(self, fp, *, content_checksum=False, block_size=LZ4_BLOCK_SIZE,
                 level=LZ4_DEFAULT_LEVEL, pool=None):
        if block_size not in _BLOCK_IDS:
            raise ValueError("lz4: unsupported block size %r" % (block_size,))
        if level not in LZ4_LEVELS:
            raise ValueError("lz4: unsupported level %r" % (level,))
        self._fp = fp
        self._block_size = block_size
        self._level = level
        self._pool = pool if level != LZ4_STORED else None
        self._queue = collections.deque()  # (block, compress job) in frame order
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._xxh = _XXH32Stream() if content_checksum else None
        self._closed = False
        flg = 0x40 | 0x20 | (0x04 if content_checksum else 0)
        desc = bytes((flg, _BLOCK_IDS[block_size] << 4))
        fp.write(struct.pack("<I", LZ4_MAGIC) + desc +
                 bytes(((xxh32(desc) >> 8) & 0xFF,)))

    def write(self, data):
        """Buffer and compress `data`; returns the number of bytes taken."""
        if self._closed:
            raise ValueError("lz4: write to closed LZ4FrameWriter")
        data = memoryview(data).cast("B")
        self._sha.update(data)
        if self._xxh is not None:
            self._xxh.update(data)
        bs = self._block_size
        pos = 0
        if self._buf:
            pos = bs - len(self._buf)
            self._buf += data[:pos]
            if len(self._buf) < bs:
                return len(data)
            self._write_block(bytes(self._buf))
            self._buf = bytearray()
        while len(data) - pos >= bs:      # whole blocks skip the buffer
            self._write_block(bytes(data[pos:pos + bs]))
            pos += bs
        self._buf += data[pos:]
        return len(data)

    def _write_block(self, block):
        if self._pool is not None:
            # Compress in the workers, at most workers + 1 blocks in flight.
            self._queue.append((block, self._pool.submit(lz4_compress_block, block, self._level)))
            while len(self._queue) > self._pool.workers:
                self._put_next()
            return
        packed = lz4_compress_block(block, self._level) if self._level != LZ4_STORED else block
        self._put(block, packed)

    def _put_next(self):
        block, fut = self._queue.popleft()
        self._put(block, self._pool.result(fut))

    def _put(self, block, packed):
        if len(packed) < len(block):
            self._fp.write(struct.pack("<I", len(packed)) + packed)
        else:
            self._fp.write(struct.pack("<I", len(block) | 0x80000000) + block)

    def close(self):
        """Flush, write end mark, checksum and sha256 trailer (fp stays open)."""
        if self._closed:
            return
        self._closed = True
        if self._buf:                 # never emit an empty block
            self._write_block(bytes(self._buf))
            self._buf = bytearray()
        while self._queue:
            self._put_next()
        tail = b"\x00\x00\x00\x00"
        if self._xxh is not None:
            tail += struct.pack("<I", self._xxh.intdigest())
        tail += struct.pack("<II", LZ4_TRAILER_MAGIC, 4 + 32) + LZ4_TRAILER_TAG
        self._fp.write(tail + self._sha.digest())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LZ4FrameReader:
    """Stream-decode one LZ4 frame from a binary file object.

    Memory is bounded by one block plus a 64 KiB history (with a pool, by
    workers + 1 blocks in flight).  After the end of the frame, `verified`
    is True if a content check (xxh32 content checksum and/or LSH1 sha256
    trailer) passed; `checks` names the ones performed.  With an LZ4Pool,
    the blocks of independent-block frames decode in its worker processes
    and the xxh32 lanes run there too; every check is the same.
    """

    def __init__(self, fp, pool=None):
        self._fp = fp
        self._pool = pool
        self._queue = collections.deque()
        self._raw_eof = False
        self._out = b""
        self._pos = 0
        self._started = False
        self._eof = False
        self._history = b""
        self._total = 0
        self._sha = hashlib.sha256()
        self._xxh = None
        self.verified = False
        self.checks = ()

    def _read_exact(self, n):
        data = self._fp.read(n)
        while len(data) < n:
            more = self._fp.read(n - len(data))
            if not more:
                raise CorruptFrameError("lz4: truncated frame")
            data += more
        return data

    def _read_header(self):
        self._started = True
        while True:
            magic, = struct.unpack("<I", self._read_exact(4))
            if _SKIP_MIN <= magic <= _SKIP_MAX:
                size, = struct.unpack("<I", self._read_exact(4))
                while size:
                    size -= len(self._read_exact(min(size, 1 << 20)))
                continue
            if magic != LZ4_MAGIC:
                raise CorruptFrameError("lz4: bad magic number 0x%08x" % magic)
            break
        desc = self._read_exact(2)
        flg, bd = desc
        if flg >> 6 != 1:
            raise CorruptFrameError("lz4: unsupported frame version %d" % (flg >> 6))
        if flg & 0x02 or bd & 0x8F:
            raise CorruptFrameError("lz4: reserved bits set in frame descriptor")
        if (bd >> 4) < 4:
            raise CorruptFrameError("lz4: invalid block maximum size id %d" % (bd >> 4))
        if flg & 0x08:
            desc += self._read_exact(8)
        if flg & 0x01:
            desc += self._read_exact(4)
        hc = self._read_exact(1)[0]
        if hc != (xxh32(desc) >> 8) & 0xFF:
            raise CorruptFrameError("lz4: header checksum mismatch")
        if flg & 0x01:
            raise CorruptFrameError("lz4: dictionary frames are not supported")
        self._linked = not flg & 0x20
        self._block_checksum = bool(flg & 0x10)
        self._content_size = struct.unpack_from("<Q", desc, 2)[0] if flg & 0x08 else None
        if flg & 0x04:
            self._xxh = _XXH32Stream(self._pool)
        self._block_max = 1 << (2 * (bd >> 4) + 8)

    def _read_raw(self):
        """Return (block data, stored) of the next block, or None at the end mark."""
        size, = struct.unpack("<I", self._read_exact(4))
        if size == 0:                 # only 0 is the end mark; 0x80000000 is
            return None               # an empty stored block (Go emits it)
        stored = size & 0x80000000
        size &= 0x7FFFFFFF
        if size > self._block_max:
            raise CorruptFrameError("lz4: block size %d exceeds maximum %d"
                                    % (size, self._block_max))
        data = self._read_exact(size)
        if self._block_checksum:
            want, = struct.unpack("<I", self._read_exact(4))
            if xxh32(data) != want:
                raise CorruptFrameError("lz4: block checksum mismatch")
        return data, stored

    def _next_block_pooled(self):
        # Keep workers + 1 blocks in flight; results are taken in order.
        q = self._queue
        while not self._raw_eof and len(q) <= self._pool.workers:
            raw = self._read_raw()
            if raw is None:
                self._raw_eof = True
                break
            data, stored = raw
            q.append(data if stored else self._pool.submit(_lz4_block_job, data, self._block_max))
        if not q:
            self._finish()
            return
        item = q.popleft()
        self._accept(item if isinstance(item, bytes) else self._pool.result(item))

    def _accept(self, block):
        self._total += len(block)
        self._sha.update(block)
        if self._xxh is not None:
            self._xxh.update(block)
        self._out = block
        self._pos = 0

    def _next_block(self):
        """Decode the next block into self._out; handle the frame end."""
        if not self._started:
            self._read_header()
        if self._pool is not None and not self._linked:
            self._next_block_pooled()
            return
        size, = struct.unpack("<I", self._read_exact(4))
        if size == 0:                 # only 0 is the end mark; 0x80000000 is
            self._finish()            # an empty stored block (Go emits it)
            return
        stored = size & 0x80000000
        size &= 0x7FFFFFFF
        if size > self._block_max:
            raise CorruptFrameError("lz4: block size %d exceeds maximum %d"
                                    % (size, self._block_max))
        data = self._read_exact(size)
        if self._block_checksum:
            want, = struct.unpack("<I", self._read_exact(4))
            if xxh32(data) != want:
                raise CorruptFrameError("lz4: block checksum mismatch")
        if stored:
            block = data
        else:
            hist = self._history if self._linked else b""
            buf = bytearray(hist)
            _decode_block(data, buf, len(hist) + self._block_max)
            block = bytes(buf[len(hist):]) if hist else bytes(buf)
        if self._linked:
            self._history = (self._history + block[-65536:])[-65536:]
        self._accept(block)

    def _finish(self):
        self._eof = True
        self._out, self._pos = b"", 0
        checks = []
        if self._content_size is not None and self._content_size != self._total:
            raise CorruptFrameError("lz4: content size mismatch")
        if self._xxh is not None:
            want, = struct.unpack("<I", self._read_exact(4))
            if self._xxh.intdigest() != want:
                raise CorruptFrameError("lz4: content checksum mismatch")
            checks.append("xxh32")
        # Optional LSH1 trailer; anything else after the frame is ignored.
        head = self._fp.read(8)
        if len(head) == 8 and struct.unpack("<II", head) == (LZ4_TRAILER_MAGIC, 36):
            payload = self._read_exact(36)
            if payload[:4] == LZ4_TRAILER_TAG:
                if payload[4:] != self._sha.digest():
                    raise CorruptFrameError("lz4: content sha256 mismatch")
                checks.append("sha256")
        self.checks = tuple(checks)
        self.verified = bool(checks)

    def read(self, n=-1):
        """Return up to n decoded bytes (all remaining if n < 0); b"" at end."""
        if n is None or n < 0:
            parts = [self._out[self._pos:]]
            while not self._eof:
                self._next_block()
                parts.append(self._out)
            self._out, self._pos = b"", 0
            return b"".join(parts)
        while self._pos >= len(self._out) and not self._eof:
            self._next_block()
        chunk = self._out[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readable(self):
        return True

    def close(self):
        """Release buffers; the underlying file object is left open."""
        self._out = self._history = b""
        self._eof = True
        for item in self._queue:
            if not isinstance(item, bytes):
                item.cancel()
        self._queue.clear()


def _lz4_block_job(data, block_max):
    """Decode one independent block (a worker job)."""
    out = bytearray()
    _decode_block(data, out, block_max)
    return bytes(out)


def _lz4_frame_job(data, limit):
    """Decode a whole small LZ4 frame with every check (a worker job); None if it decodes past limit."""
    r = LZ4FrameReader(io.BytesIO(data))
    out = r.read(limit + 1)
    if len(out) > limit:
        return None
    if r.read(1):
        return None
    return out


class LZ4Pool:
    """Worker processes for independent LZ4 work: block decoding and xxh32 lanes.

    The processes are started (spawned: never forked from a threaded
    process) at the first submit, at most `workers` of them, so a pool that
    is never used costs nothing.  A worker that dies fails every job in
    flight with LitestreamError; close() stops them all.
    """

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._ex = None
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        with self._lock:
            if self._ex is None:
                self._ex = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                return self._ex.submit(fn, *args)
            except concurrent.futures.BrokenExecutor as e:
                raise LitestreamError("lz4 worker process died: %s" % e) from None

    @staticmethod
    def result(fut: concurrent.futures.Future):
        """Return a job's result; LitestreamError if its worker died."""
        try:
            return fut.result()
        except concurrent.futures.BrokenExecutor as e:
            raise LitestreamError("lz4 worker process died: %s" % e) from None

    def close(self) -> None:
        """Stop the workers (jobs not started are dropped)."""
        with self._lock:
            ex, self._ex = self._ex, None
        if ex is not None:
            ex.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_lz4_workers = DEFAULT_LZ4_WORKERS


def set_lz4_workers(n: int) -> None:
    """Set how many worker processes a snapshot may compress in (0: in the calling process)."""
    global _lz4_workers
    _lz4_workers = n


def snapshot_pool(size: int) -> Optional[LZ4Pool]:
    """Return a new LZ4Pool for compressing a snapshot of size bytes, or None if one process will do.

    A snapshot's pool lives only as long as the snapshot, so the
    replicator's process tree is small between snapshots.
    """
    if _lz4_workers < 1 or size < 2 * LZ4_BLOCK_SIZE:
        return None
    return LZ4Pool(_lz4_workers)


class _Sink:
    """A write-only buffer that a frame writer fills and a reader drains."""

    def __init__(self):
        self.buf = bytearray()

    def write(self, b):
        self.buf += b
        return len(b)


class CompressingReader:
    """A binary reader of the LZ4 frame of a stream of chunks.

    Memory is bounded by one LZ4 block plus one source chunk, so snapshots
    and large WAL segments stream through without being held whole.
    """

    def __init__(self, chunks: Iterable[bytes], progress=None, level: int = LZ4_DEFAULT_LEVEL,
                 pool: Optional[LZ4Pool] = None):
        self._chunks = iter(chunks)
        self._progress = progress
        self._sink = _Sink()
        self._writer = LZ4FrameWriter(self._sink, level=level, pool=pool)
        self._done = False
        self.raw_bytes = 0

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._sink.buf) < n):
            chunk = next(self._chunks, None)
            if chunk is None:
                self._writer.close()
                self._done = True
            else:
                self.raw_bytes += len(chunk)
                self._writer.write(chunk)
                if self._progress:
                    self._progress(self.raw_bytes)
        buf = self._sink.buf
        if n < 0 or n >= len(buf):
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:n])
            del buf[:n]
        return out

    def close(self) -> None:
        pass


def copy_stream(rd, wr, bufsize: int = 1 << 20) -> int:
    """Copy rd to wr until EOF; return the byte count."""
    n = 0
    while True:
        b = rd.read(bufsize)
        if not b:
            return n
        wr.write(b)
        n += len(b)


###############################################################################
# Metrics
###############################################################################
#
# Spec: https://github.com/prometheus/docs/blob/main/content/docs/instrumenting/exposition_formats.md
# Text exposition 0.0.4, one family after another:
#   # HELP <name> <help, with \ and newline escaped>
#   # TYPE <name> counter|gauge|histogram
#   <name>{<label>="<value, with \ " and newline escaped>",...} <value>
# A histogram's series are cumulative <name>_bucket{...,le="<bound>"} lines
# ending with le="+Inf", then <name>_sum and <name>_count.  As Go's
# client_golang writes it: families sorted by name, series by label values,
# label pairs by label name with "le" last, values as strconv.FormatFloat(v,
# 'g', -1, 64), and counter names as declared (no "_total" added).
#
# Wiring, at Go 0.3.13's update points (p = db.path, n = replica.name):
#   DB opened          register_db_metrics(p); for each replica
#                      register_replica_metrics(p, n, r.client.client_type)
#   DB closed          unregister_db_metrics(p, replica names) (drops its replicas' series too)
#   every sync         SYNC_COUNT.labels(p).inc(), SYNC_SECONDS.labels(p).inc(dt),
#                      SYNC_ERROR_COUNT.labels(p).inc() if it failed (Go's defer)
#   sync, after stat   DB_SIZE.labels(p).set(db file size), WAL_SIZE.labels(p).set(-wal size)
#   shadow WAL copy    TOTAL_WAL_BYTES.labels(p).inc(bytes copied)
#   end of sync        SHADOW_WAL_INDEX.labels(p).set(index), SHADOW_WAL_SIZE.labels(p).set(sum of sizes)
#   every checkpoint   CHECKPOINT_COUNT.labels(p, mode).inc(), CHECKPOINT_SECONDS.labels(p, mode).inc(dt),
#                      CHECKPOINT_ERROR_COUNT.labels(p, mode).inc() if it failed
#   segment uploaded   REPLICA_WAL_BYTES.labels(p, n).inc(uncompressed bytes),
#                      REPLICA_WAL_INDEX.labels(p, n).set(i), REPLICA_WAL_OFFSET.labels(p, n).set(off)
#   replica synced     REPLICA_LAST_SUCCESS_TIMESTAMP_SECONDS.labels(p, n).set(time.time())
#   lag, pending       REPLICA_LAG_SECONDS.labels(p, n).set_function(fn) (read at each scrape,
#                      so an idle stall still rises), REPLICA_PENDING_BYTES likewise or .set()
#   validation         REPLICA_VALIDATION_TOTAL.labels(p, n, "ok"|"error").inc(),
#                      VALIDATION_CHECKS_TOTAL.labels(p, n, "success"|"invalid"|"error").inc(),
#                      LAST_VALIDATION_SUCCESS(_TIMESTAMP_SECONDS).labels(p, n).set(...)
#   client operations  counted by the clients themselves (replica_operation)
#   serving            MetricsServer(cfg.addr, healthz=..., readyz=...).start() / .close()

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def format_go_float(v: float) -> str:
    """Format v as Go's strconv.FormatFloat(v, 'g', -1, 64) (shortest digits)."""
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if repr(v)[0] == "-" else "0"
    sign, digits, exp = decimal.Decimal(repr(v)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    dp = len(ds) + exp  # the decimal point sits after dp digits
    # %e when the exponent is < -4 or >= the precision, which is 6 for
    # the shortest form.
    x = dp - 1
    if x < -4 or x >= 6:
        m = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        s = "%se%s%02d" % (m, "-" if x < 0 else "+", abs(x))
    elif dp <= 0:
        s = "0." + "0" * -dp + ds
    elif dp >= len(ds):
        s = ds + "0" * (dp - len(ds))
    else:
        s = ds[:dp] + "." + ds[dp:]
    return "-" + s if sign else s


def _escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


class _Series:
    """One series of a family: a float, or for a gauge a function read at each scrape."""

    __slots__ = ("_lock", "_value", "_fn")

    def __init__(self, lock):
        self._lock = lock
        self._value = 0.0
        self._fn = None

    def get(self) -> float:
        """Return the current value."""
        with self._lock:
            fn, value = self._fn, self._value
        if fn is None:
            return value
        try:
            return float(fn())
        except Exception as e:  # a scrape must not fail because one value could not be computed
            log.debug("metrics: %s", e)
            return float("nan")


class CounterSeries(_Series):
    """A counter's series: only goes up."""

    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Add amount (>= 0)."""
        if amount < 0:
            raise ValueError("counters only go up (inc by %r)" % amount)
        with self._lock:
            self._value += amount


class GaugeSeries(_Series):
    """A gauge's series: set, raised or lowered, or computed at each scrape."""

    __slots__ = ()

    def set(self, value: float) -> None:
        with self._lock:
            self._value, self._fn = float(value), None

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set_function(self, fn) -> None:
        """Compute the value with fn() at each scrape (called without the registry lock held)."""
        with self._lock:
            self._fn = fn


class HistogramSeries(_Series):
    """A histogram's series: per-bucket counts, the sum and the count of observations."""

    __slots__ = ("_bounds", "_counts", "_count")

    def __init__(self, lock, bounds):
        super().__init__(lock)
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._count = 0

    def observe(self, value: float) -> None:
        """Record one observation (the sum is _value)."""
        with self._lock:
            for i, b in enumerate(self._bounds):
                if value <= b:
                    self._counts[i] += 1
                    break
            self._value += value
            self._count += 1

    def get(self) -> "tuple[List[int], float, int]":
        """Return (cumulative bucket counts, sum, count)."""
        with self._lock:
            return list(accumulate(self._counts)), self._value, self._count


class MetricFamily:
    """A named metric of one type with fixed label names; its series are made by labels().

    Usage: ``DB_SIZE.labels(db_path).set(n)``, ``SYNC_COUNT.labels(db_path).inc()``,
    ``CHECKPOINT_SECONDS.labels(db_path, mode).inc(seconds)``,
    ``REPLICA_OPERATION_DURATION_SECONDS.labels("s3", "PUT").observe(seconds)``.
    Label values are given in the order of labelnames (or by name) and
    turned into str.  A series exists, at 0, from its first labels() call.
    """

    def __init__(self, registry: "Metrics", name: str, type_: str, help_: str,
                 labelnames: Sequence[str] = (), buckets: Sequence[float] = ()):
        if not _METRIC_NAME_RE.match(name):
            raise ValueError("invalid metric name %r" % name)
        for ln in labelnames:
            if not _LABEL_NAME_RE.match(ln) or ln.startswith("__") or (type_ == "histogram" and ln == "le"):
                raise ValueError("invalid label name %r for %s" % (ln, name))
        if type_ == "histogram" and (not buckets or list(buckets) != sorted(set(buckets))):
            raise ValueError("histogram %s needs increasing buckets" % name)
        self.name, self.type, self.help = name, type_, help_
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._lock = registry._lock
        self._series = {}  # type: Dict[Tuple[str, ...], _Series]

    def _key(self, values, kw) -> Tuple[str, ...]:
        if kw:
            if values:
                raise TypeError("%s: label values by position or by name, not both" % self.name)
            if set(kw) != set(self.labelnames):
                raise ValueError("%s: labels %s expected, got %s" % (self.name, list(self.labelnames), sorted(kw)))
            values = [kw[n] for n in self.labelnames]
        if len(values) != len(self.labelnames):
            raise ValueError("%s: %d label values expected (%s), got %d"
                             % (self.name, len(self.labelnames), ", ".join(self.labelnames), len(values)))
        return tuple(str(v) for v in values)

    def labels(self, *values, **kw) -> _Series:
        """Return the series with these label values, creating it at 0."""
        key = self._key(values, kw)
        with self._lock:
            s = self._series.get(key)
            if s is None:
                if self.type == "counter":
                    s = CounterSeries(self._lock)
                elif self.type == "gauge":
                    s = GaugeSeries(self._lock)
                else:
                    s = HistogramSeries(self._lock, self.buckets)
                self._series[key] = s
            return s

    def remove(self, *values, **kw) -> None:
        """Drop the series with these label values, if it exists."""
        key = self._key(values, kw)
        with self._lock:
            self._series.pop(key, None)

    def remove_matching(self, **labels: str) -> int:
        """Drop every series whose labels include these; return how many went."""
        idx = [(self.labelnames.index(k), str(v)) for k, v in labels.items() if k in self.labelnames]
        if len(idx) != len(labels):
            return 0
        with self._lock:
            gone = [k for k in self._series if all(k[i] == v for i, v in idx)]
            for k in gone:
                del self._series[k]
        return len(gone)

    def series(self) -> "List[Tuple[Tuple[str, ...], _Series]]":
        """Return [(label values, series)] sorted by label values."""
        with self._lock:
            return sorted(self._series.items(), key=lambda kv: kv[0])


class Metrics:
    """A lock-protected registry of metric families that renders the text exposition.

    One lock guards every family and series: updates are a few float
    operations, so contention is negligible next to a sync.  Collectors
    (callables returning [(name, type, help, [({label: value}, float)])])
    add families computed at each scrape, such as the process_* series.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._families = {}  # type: Dict[str, MetricFamily]
        self._collectors = []

    def _add(self, name, type_, help_, labelnames, buckets=()) -> MetricFamily:
        fam = MetricFamily(self, name, type_, help_, labelnames, buckets)
        with self._lock:
            if name in self._families:
                raise ValueError("metric %s is already registered" % name)
            self._families[name] = fam
        return fam

    def counter(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> MetricFamily:
        return self._add(name, "counter", help_, labelnames)

    def gauge(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> MetricFamily:
        return self._add(name, "gauge", help_, labelnames)

    def histogram(self, name: str, help_: str, labelnames: Sequence[str], buckets: Sequence[float]) -> MetricFamily:
        return self._add(name, "histogram", help_, labelnames, buckets)

    def family(self, name: str) -> MetricFamily:
        """Return a registered family by name (KeyError if unknown)."""
        with self._lock:
            return self._families[name]

    def add_collector(self, fn) -> None:
        with self._lock:
            self._collectors.append(fn)

    def remove_matching(self, **labels: str) -> int:
        """Drop the series of every family whose labels include these (e.g. db=path)."""
        with self._lock:
            fams = list(self._families.values())
        return sum(f.remove_matching(**labels) for f in fams)

    def render(self) -> str:
        """Return the whole registry in the text exposition format 0.0.4."""
        with self._lock:
            fams = sorted(self._families.values(), key=lambda f: f.name)
            collectors = list(self._collectors)
        out = []
        blocks = [(f.name, f.type, f.help, f.labelnames, f.series()) for f in fams]
        for fn in collectors:
            for name, type_, help_, samples in fn():
                names = sorted({k for labels, _ in samples for k in labels})
                blocks.append((name, type_, help_, tuple(names), [
                    (tuple(str(labels.get(n, "")) for n in names), value) for labels, value in samples]))
        blocks.sort(key=lambda b: b[0])
        for name, type_, help_, labelnames, series in blocks:
            if not series:
                continue  # as client_golang: a family without series is not exposed
            out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, _escape_help(help_), name, type_))
            order = sorted(range(len(labelnames)), key=lambda i: labelnames[i])
            for values, s in sorted(series, key=lambda vs: [vs[0][i] for i in order]):
                pairs = ",".join('%s="%s"' % (labelnames[i], _escape_label_value(values[i])) for i in order)
                if type_ != "histogram":
                    v = s.get() if isinstance(s, _Series) else s
                    out.append("%s%s %s\n" % (name, "{%s}" % pairs if pairs else "", format_go_float(v)))
                    continue
                counts, total, count = s.get()
                sep = "," if pairs else ""
                for b, c in zip(s._bounds, counts):
                    out.append('%s_bucket{%s%sle="%s"} %d\n' % (name, pairs, sep, format_go_float(b), c))
                out.append('%s_bucket{%s%sle="+Inf"} %d\n' % (name, pairs, sep, count))
                out.append("%s_sum%s %s\n" % (name, "{%s}" % pairs if pairs else "", format_go_float(total)))
                out.append("%s_count%s %d\n" % (name, "{%s}" % pairs if pairs else "", count))
        return "".join(out)


def _process_metrics():
    """Return the process_* families (Prometheus client conventions) from /proc/self; [] off Linux."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        with open("/proc/self/limits", "rb") as f:
            limits = {line[:26].strip(): line[26:].split()[0] for line in f}
        # Soft limits; "unlimited" is Go's MaxUint64.
        max_fds, max_vm = (float(2**64 - 1) if limits[k] == b"unlimited" else int(limits[k])
                           for k in (b"Max open files", b"Max address space"))
        open_fds = len(os.listdir("/proc/self/fd"))
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, StopIteration, IndexError, KeyError, AttributeError):
        return []
    # proc(5): fields after "(comm)": 3 state ... 14 utime, 15 stime,
    # 22 starttime (ticks since boot), 23 vsize (bytes), 24 rss (pages).
    f = stat[stat.rindex(b")") + 2:].split()
    utime, stime, start, vsize, rss = int(f[11]), int(f[12]), int(f[19]), int(f[20]), int(f[21])
    return [
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
         [({}, (utime + stime) / ticks)]),
        ("process_open_fds", "gauge", "Number of open file descriptors.", [({}, open_fds)]),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors.", [({}, max_fds)]),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", [({}, vsize)]),
        ("process_virtual_memory_max_bytes", "gauge", "Maximum amount of virtual memory available in bytes.",
         [({}, max_vm)]),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [({}, rss * page)]),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
         [({}, btime + start / ticks)]),
    ]


# Every metric litestream.py exports.  Go 0.3.13's families keep Go's names,
# types, labels and help strings byte for byte (typo included), so
# dashboards and alerts written for Go Litestream work unchanged.
METRICS = Metrics()
METRICS.add_collector(_process_metrics)

# Per database; db is the DB's absolute path (db.go).
DB_SIZE = METRICS.gauge("litestream_db_size", "The current size of the real DB", ("db",))
WAL_SIZE = METRICS.gauge("litestream_wal_size", "The current size of the real WAL", ("db",))
TOTAL_WAL_BYTES = METRICS.counter("litestream_total_wal_bytes", "Total number of bytes written to shadow WAL", ("db",))
SHADOW_WAL_INDEX = METRICS.gauge("litestream_shadow_wal_index", "The current index of the shadow WAL", ("db",))
SHADOW_WAL_SIZE = METRICS.gauge("litestream_shadow_wal_size", "Current size of shadow WAL, in bytes", ("db",))
SYNC_COUNT = METRICS.counter("litestream_sync_count", "Number of sync operations performed", ("db",))
SYNC_ERROR_COUNT = METRICS.counter("litestream_sync_error_count", "Number of sync errors that have occurred", ("db",))
SYNC_SECONDS = METRICS.counter("litestream_sync_seconds", "Time spent syncing shadow WAL, in seconds", ("db",))
CHECKPOINT_COUNT = METRICS.counter("litestream_checkpoint_count", "Number of checkpoint operations performed",
                                   ("db", "mode"))
CHECKPOINT_ERROR_COUNT = METRICS.counter("litestream_checkpoint_error_count",
                                         "Number of checkpoint errors that have occurred", ("db", "mode"))
CHECKPOINT_SECONDS = METRICS.counter("litestream_checkpoint_seconds", "Time spent checkpointing WAL, in seconds",
                                     ("db", "mode"))

# Per replica; name is the replica's name, or its type when it has none (replica.go).
REPLICA_WAL_BYTES = METRICS.counter("litestream_replica_wal_bytes", "The number wal bytes written", ("db", "name"))
REPLICA_WAL_INDEX = METRICS.gauge("litestream_replica_wal_index", "The current WAL index", ("db", "name"))
REPLICA_WAL_OFFSET = METRICS.gauge("litestream_replica_wal_offset", "The current WAL offset", ("db", "name"))
REPLICA_VALIDATION_TOTAL = METRICS.counter("litestream_replica_validation_total",
                                           "The number of validations performed", ("db", "name", "status"))

# Per replica client type (internal/internal.go), counted as Go 0.3.13's S3
# client counts: LIST per page, DELETE per DeleteObjects batch, PUT per
# object (a multipart upload once), GET per object read; bytes of PUT and
# GET only.  The file client counts none of these, as in Go.
REPLICA_OPERATION_TOTAL = METRICS.counter("litestream_replica_operation_total",
                                          "The number of replica operations performed",
                                          ("replica_type", "operation"))
REPLICA_OPERATION_BYTES = METRICS.counter("litestream_replica_operation_bytes",
                                          "The number of bytes used by replica operations",
                                          ("replica_type", "operation"))

# Ours: what no Litestream exports.
REPLICA_LAG_SECONDS = METRICS.gauge(
    "litestream_replica_lag_seconds",
    "Age of the oldest transaction committed locally that is not yet durable in the replica, "
    "in seconds; 0 when caught up", ("db", "name"))
REPLICA_PENDING_BYTES = METRICS.gauge(
    "litestream_replica_pending_bytes",
    "Bytes of WAL committed locally that are not yet durable in the replica", ("db", "name"))
REPLICA_LAST_SUCCESS_TIMESTAMP_SECONDS = METRICS.gauge(
    "litestream_replica_last_success_timestamp_seconds",
    "Unix time of the replica's last successful sync", ("db", "name"))
# Names, help and buckets of Go 0.5; kept for every operation of every client.
REPLICA_OPERATION_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
REPLICA_OPERATION_DURATION_SECONDS = METRICS.histogram(
    "litestream_replica_operation_duration_seconds", "Duration of replica operations by type and operation",
    ("replica_type", "operation"), REPLICA_OPERATION_DURATION_BUCKETS)
REPLICA_OPERATION_ERRORS_TOTAL = METRICS.counter(
    "litestream_replica_operation_errors_total",
    "Number of replica operation errors by type, operation, and error code",
    ("replica_type", "operation", "code"))
# Proposed upstream in Litestream #1535, with the replica's name where the
# proposal has an LTX level.  result is success, invalid or error.
VALIDATION_CHECKS_TOTAL = METRICS.counter(
    "litestream_validation_checks_total", "Number of replica validation checks completed, by result",
    ("db", "name", "result"))
LAST_VALIDATION_SUCCESS = METRICS.gauge(
    "litestream_last_validation_success",
    "Whether the last replica validation check passed (1) or not (0)", ("db", "name"))
LAST_VALIDATION_SUCCESS_TIMESTAMP_SECONDS = METRICS.gauge(
    "litestream_last_validation_success_timestamp_seconds",
    "Unix time of the last passing replica validation check; 0 until one passes", ("db", "name"))

REPLICA_OPERATIONS = ("GET", "PUT", "DELETE", "LIST")
VALIDATION_RESULTS = ("success", "invalid", "error")
_DB_FAMILIES = (DB_SIZE, WAL_SIZE, TOTAL_WAL_BYTES, SHADOW_WAL_INDEX, SHADOW_WAL_SIZE,
                SYNC_COUNT, SYNC_ERROR_COUNT, SYNC_SECONDS)
_CHECKPOINT_FAMILIES = (CHECKPOINT_COUNT, CHECKPOINT_ERROR_COUNT, CHECKPOINT_SECONDS)
_REPLICA_FAMILIES = (REPLICA_WAL_BYTES, REPLICA_WAL_INDEX, REPLICA_WAL_OFFSET, REPLICA_LAG_SECONDS,
                     REPLICA_PENDING_BYTES, REPLICA_LAST_SUCCESS_TIMESTAMP_SECONDS,
                     LAST_VALIDATION_SUCCESS, LAST_VALIDATION_SUCCESS_TIMESTAMP_SECONDS)


def register_db_metrics(db: str) -> None:
    """Create a DB's series at 0 (db = its absolute path), so scrapes never see one appear late.

    Covers the eight per-DB families and the checkpoint families for each
    mode (PASSIVE, RESTART, TRUNCATE).  Call it when the DB is opened.
    """
    for fam in _DB_FAMILIES:
        fam.labels(db)
    for fam in _CHECKPOINT_FAMILIES:
        for mode in (CHECKPOINT_MODE_PASSIVE, CHECKPOINT_MODE_RESTART, CHECKPOINT_MODE_TRUNCATE):
            fam.labels(db, mode)


def unregister_db_metrics(db: str, replicas: Optional[Sequence[str]] = None) -> None:
    """Drop every series labelled with this DB: its own and its replicas'.

    With the replicas' names each series is removed by its key (what a
    closing DB does: a scan of every family per DB would make closing N
    databases cost N squared); without, every family is searched.
    """
    if replicas is None:
        METRICS.remove_matching(db=db)
        return
    for fam in _DB_FAMILIES:
        fam.remove(db)
    for fam in _CHECKPOINT_FAMILIES:
        for mode in (CHECKPOINT_MODE_PASSIVE, CHECKPOINT_MODE_RESTART, CHECKPOINT_MODE_TRUNCATE):
            fam.remove(db, mode)
    for name in replicas:
        unregister_replica_metrics(db, name)


def register_replica_metrics(db: str, name: str, replica_type: str) -> None:
    """Create a replica's series at 0, and its client type's, so scrapes never see one appear late.

    Per replica: wal bytes/index/offset, lag, pending bytes, last success,
    validation_total for status ok and error (as Go), validation checks for
    each result.  Per client type: the duration histogram of each operation,
    and Go's operation counters (not for the file client, as Go).  Error
    series appear with their first error: their code is not known before.
    """
    for fam in _REPLICA_FAMILIES:
        fam.labels(db, name)
    for status in ("ok", "error"):
        REPLICA_VALIDATION_TOTAL.labels(db, name, status)
    for result in VALIDATION_RESULTS:
        VALIDATION_CHECKS_TOTAL.labels(db, name, result)
    for op in REPLICA_OPERATIONS:
        REPLICA_OPERATION_DURATION_SECONDS.labels(replica_type, op)
        if replica_type != "file":
            REPLICA_OPERATION_TOTAL.labels(replica_type, op)
            if op in ("GET", "PUT"):
                REPLICA_OPERATION_BYTES.labels(replica_type, op)


def unregister_replica_metrics(db: str, name: str) -> None:
    """Drop a replica's series (its client type's stay: other replicas share them)."""
    for fam in _REPLICA_FAMILIES:
        fam.remove(db, name)
    for status in ("ok", "error"):
        REPLICA_VALIDATION_TOTAL.remove(db, name, status)
    for result in VALIDATION_RESULTS:
        VALIDATION_CHECKS_TOTAL.remove(db, name, result)


class _DBSeries:
    """A DB's own series, looked up once (db = its absolute path)."""

    def __init__(self, db: str):
        self.db_size, self.wal_size = DB_SIZE.labels(db), WAL_SIZE.labels(db)
        self.total_wal_bytes = TOTAL_WAL_BYTES.labels(db)
        self.shadow_wal_index, self.shadow_wal_size = SHADOW_WAL_INDEX.labels(db), SHADOW_WAL_SIZE.labels(db)
        self.sync_count, self.sync_errors = SYNC_COUNT.labels(db), SYNC_ERROR_COUNT.labels(db)
        self.sync_seconds = SYNC_SECONDS.labels(db)


class _ReplicaSeries:
    """A replica's own series, looked up once."""

    def __init__(self, db: str, name: str):
        self.wal_bytes = REPLICA_WAL_BYTES.labels(db, name)
        self.wal_index, self.wal_offset = REPLICA_WAL_INDEX.labels(db, name), REPLICA_WAL_OFFSET.labels(db, name)
        self.lag, self.pending = REPLICA_LAG_SECONDS.labels(db, name), REPLICA_PENDING_BYTES.labels(db, name)
        self.last_success = REPLICA_LAST_SUCCESS_TIMESTAMP_SECONDS.labels(db, name)


def _error_code(e: BaseException) -> str:
    """Return the code an operation error is counted under: S3's, else the errno name, else the type."""
    for err in (e, e.__cause__):
        if isinstance(err, S3Error) and err.code:
            return err.code
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


class replica_operation:
    """Time one replica client operation and count it (a context manager).

    On success it observes litestream_replica_operation_duration_seconds
    and, when count is true (Go's semantics; the file client passes false),
    adds 1 to litestream_replica_operation_total and op.bytes, if set, to
    litestream_replica_operation_bytes.  On an exception it observes the
    duration and counts litestream_replica_operation_errors_total under
    the error's code.  op.skip() records nothing (an attempt that does not
    count, such as a refused ListObjectsV2 before the V1 fallback).

        with replica_operation("s3", "PUT") as op:
            op.bytes = self.upload(key, rd)
    """

    __slots__ = ("replica_type", "operation", "count", "bytes", "_skip", "_t0")

    def __init__(self, replica_type: str, operation: str, count: bool = True):
        self.replica_type, self.operation, self.count = replica_type, operation, count
        self.bytes = None
        self._skip = False

    def skip(self) -> None:
        self._skip = True

    def __enter__(self) -> "replica_operation":
        self._t0 = time.monotonic()
        return self

    def __exit__(self, typ, e, tb) -> None:
        if self._skip or (typ is not None and not issubclass(typ, Exception)):
            return
        REPLICA_OPERATION_DURATION_SECONDS.labels(self.replica_type, self.operation).observe(
            time.monotonic() - self._t0)
        if e is not None:
            REPLICA_OPERATION_ERRORS_TOTAL.labels(self.replica_type, self.operation, _error_code(e)).inc()
        elif self.count:
            REPLICA_OPERATION_TOTAL.labels(self.replica_type, self.operation).inc()
            if self.bytes is not None:
                REPLICA_OPERATION_BYTES.labels(self.replica_type, self.operation).inc(self.bytes)


# --------------------------------------------------------------------------
# MetricsServer


def parse_bind_addr(addr: str) -> "tuple[str, int]":
    """Split a bind address as Go's net.SplitHostPort; "" as host means every interface.

    ":9090", "127.0.0.1:9090", "localhost:9090" and "[::1]:9090" are
    accepted.  Raises ValueError (Go's "must specify port for bind address")
    when there is no port.
    """
    host, port = "", ""
    if addr.startswith("["):
        end = addr.find("]")
        if end > 0 and addr[end + 1:end + 2] == ":":
            host, port = addr[1:end], addr[end + 2:]
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    if not port:
        raise ValueError('must specify port for bind address: "%s"' % addr)
    if not re.fullmatch(r"\d{1,5}", port, re.ASCII) or int(port) > 65535:
        raise ValueError('invalid port in bind address: "%s" (expected a number from 0 to 65535)' % addr)
    return host, int(port)


class MetricsServer:
    """Serve GET /metrics, /healthz and /readyz on a bind address from a daemon thread.

    addr is Go's "addr" (":9090" listens on every interface, IPv6 too where
    the system allows).  /metrics renders registry (default METRICS) as
    text exposition 0.0.4.  healthz and readyz are callables returning
    (ok, body): 200 and body when ok, else 503 and body; an endpoint
    without a callable, like any other path, is 404.  They run on the
    request's thread, so they must be quick and must not block on a sync.

        srv = MetricsServer(":9090", healthz=engine.healthz, readyz=engine.readyz)
        srv.start()      # LitestreamError: one line, if the address cannot be bound
        ...
        srv.close()      # shutdown() and server_close()
    """

    def __init__(self, addr: str, registry: Optional[Metrics] = None, healthz=None, readyz=None):
        self.addr = addr
        self.host, self.port = parse_bind_addr(addr)
        self.registry = registry if registry is not None else METRICS
        self.routes = {"/healthz": healthz, "/readyz": readyz}
        self._server = None  # type: Optional[http.server.ThreadingHTTPServer]
        self._thread = None  # type: Optional[threading.Thread]

    @property
    def url(self) -> str:
        """Return http://HOST:PORT of the listening socket ("localhost" for every interface, as Go logs)."""
        host, port = self.host or "localhost", self._server.server_address[1] if self._server else self.port
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def _handler(self):
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30  # a stalled client gives its thread back

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                ctype = "text/plain; charset=utf-8"
                try:
                    if path == "/metrics":
                        status, body, ctype = 200, srv.registry.render(), PROMETHEUS_CONTENT_TYPE
                    elif srv.routes.get(path) is not None:
                        ok, body = srv.routes[path]()
                        status = 200 if ok else 503
                    else:
                        status, body = 404, "404 page not found\n"
                except Exception as e:
                    log.error("metrics: %s: %s", path, e)
                    status, body = 500, "internal error\n"
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt, *args):
                log.debug("metrics: %s %s", self.address_string(), fmt % args)

        return Handler

    def start(self) -> None:
        """Bind and serve; raise LitestreamError naming the address if it cannot be bound."""
        host, family = self.host, socket.AF_INET
        if ":" in host:
            family = socket.AF_INET6
        elif not host and socket.has_dualstack_ipv6():
            host, family = "::", socket.AF_INET6
        dual_stack = family == socket.AF_INET6 and not self.host

        class Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def server_bind(self):
                if dual_stack:
                    # Go's ":PORT" takes IPv4 clients on the IPv6 socket too.
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                # HTTPServer.server_bind would also look up the host's FQDN: skip that.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

            def handle_error(self, request, client_address):
                # A scraper that hangs up mid-answer is not worth a traceback on stderr.
                log.debug("metrics: request from %s failed: %s", client_address[0], sys.exc_info()[1])

        try:
            self._server = Server((host, self.port), self._handler())
        except (OSError, OverflowError) as e:
            raise LitestreamError("cannot start metrics server on %s: %s" % (self.addr, e)) from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="litestream-metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None



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
    # Its replica's logger (db and replica fields), set by Replica.
    logger = log

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

    def abort(self) -> None:
        """Make operations in progress fail soon, and later ones at once (shutdown out of time)."""

    # Clients that can fetch one object with parallel ranged reads set this
    # and implement download_snapshot; restore then stages big snapshots.
    parallel_download = False

    def download_snapshot(self, generation: str, index: int, w: BinaryIO) -> int:
        """Copy a snapshot's stored bytes into w; return the byte count."""
        rd = self.snapshot_reader(generation, index)
        try:
            return copy_stream(rd, w)
        finally:
            rd.close()


###############################################################################
# FileReplicaClient
###############################################################################


class FileReplicaClient(ReplicaClient):
    """A replica in a local directory, laid out as Go Litestream's file replica.

    Every object is written to "<name>.tmp", fsynced, renamed into place, and
    its directory fsynced, so an object is either whole or absent.  Each
    method is timed and its errors counted (replica_operation); like Go's,
    it adds nothing to litestream_replica_operation_total or _bytes.
    """

    client_type = "file"

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))

    def __str__(self) -> str:
        return "file://" + self.path

    def _gen_dir(self, generation: str) -> str:
        return generation_path(self.path, generation)

    def _op(self, operation: str) -> "replica_operation":
        return replica_operation(self.client_type, operation, count=False)

    def generations(self) -> List[str]:
        with self._op("LIST"):
            try:
                names = os.listdir(os.path.join(self.path, "generations"))
            except FileNotFoundError:
                return []
            return sorted(n for n in names if is_generation_name(n)
                          and os.path.isdir(os.path.join(self.path, "generations", n)))

    def delete_generation(self, generation: str) -> None:
        d = self._gen_dir(generation)
        with self._op("DELETE"):
            try:
                shutil.rmtree(d)
            except FileNotFoundError:
                return
            fsync_dir(os.path.dirname(d))

    def _list(self, d: str):
        try:
            with os.scandir(d) as it:
                for e in it:
                    yield e
        except FileNotFoundError:
            return

    def snapshots(self, generation: str) -> List[SnapshotInfo]:
        out = []
        with self._op("LIST"):
            for e in self._list(os.path.join(self._gen_dir(generation), "snapshots")):
                try:
                    index = parse_snapshot_path(e.name)
                    st = e.stat()
                except (ValueError, FileNotFoundError):
                    continue
                out.append(SnapshotInfo(generation, index, st.st_size, utc_from_timestamp(st.st_mtime)))
        return sorted(out, key=lambda s: s.index)

    def wal_segments(self, generation: str) -> List[WALSegmentInfo]:
        out = []
        with self._op("LIST"):
            for e in self._list(os.path.join(self._gen_dir(generation), "wal")):
                try:
                    index, offset = parse_wal_segment_path(e.name)
                    st = e.stat()
                except (ValueError, FileNotFoundError):
                    continue
                out.append(WALSegmentInfo(generation, index, offset, st.st_size,
                                          utc_from_timestamp(st.st_mtime)))
        return sorted(out, key=lambda s: (s.index, s.offset))

    def _write(self, path: str, rd: BinaryIO) -> os.stat_result:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, rd)
        return os.stat(path)

    def write_snapshot(self, generation: str, index: int, rd: BinaryIO) -> SnapshotInfo:
        with self._op("PUT"):
            st = self._write(snapshot_path(self.path, generation, index), rd)
        return SnapshotInfo(generation, index, st.st_size, utc_from_timestamp(st.st_mtime))

    def write_wal_segment(self, pos: Pos, rd: BinaryIO) -> WALSegmentInfo:
        with self._op("PUT"):
            st = self._write(wal_segment_path(self.path, pos.generation, pos.index, pos.offset), rd)
        return WALSegmentInfo(pos.generation, pos.index, pos.offset, st.st_size,
                              utc_from_timestamp(st.st_mtime))

    def delete_snapshot(self, generation: str, index: int) -> None:
        with self._op("DELETE"):
            remove_quietly(snapshot_path(self.path, generation, index))

    def delete_wal_segments(self, positions: Iterable[Pos]) -> None:
        dirs = set()
        with self._op("DELETE"):
            for p in positions:
                path = wal_segment_path(self.path, p.generation, p.index, p.offset)
                remove_quietly(path)
                dirs.add(os.path.dirname(path))
            for d in dirs:
                fsync_dir(d)

    def snapshot_reader(self, generation: str, index: int) -> BinaryIO:
        with self._op("GET"):
            return open(snapshot_path(self.path, generation, index), "rb")

    def wal_segment_reader(self, pos: Pos) -> BinaryIO:
        with self._op("GET"):
            return open(wal_segment_path(self.path, pos.generation, pos.index, pos.offset), "rb")


###############################################################################
# SigV4Signer
###############################################################################

# Spec: https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
#
#   CanonicalRequest = HTTPMethod "\n" CanonicalURI "\n" CanonicalQueryString "\n"
#                      CanonicalHeaders "\n" SignedHeaders "\n" HashedPayload
#   StringToSign     = "AWS4-HMAC-SHA256\n" <x-amz-date> "\n"
#                      <yyyymmdd>/<region>/<service>/aws4_request "\n" hex(SHA256(CanonicalRequest))
#   SigningKey       = HMAC(HMAC(HMAC(HMAC("AWS4"+secret, yyyymmdd), region), service), "aws4_request")
#   Signature        = hex(HMAC(SigningKey, StringToSign))
#
# S3 differs from the other services: the URI is encoded once (each segment,
# "/" kept) and never normalised, so "a//b" and "a/./b" are distinct keys.

_URI_UNRESERVED = "-_.~"  # RFC 3986 unreserved, besides letters and digits


def s3_uri_encode(s: str, safe: str = "") -> str:
    """Percent-encode s as SigV4's UriEncode does (UTF-8, RFC 3986 unreserved kept)."""
    return urllib.parse.quote(s, safe=_URI_UNRESERVED + safe)


class SigV4Signer:
    """Sign S3 requests with AWS Signature Version 4.

    Holds no clock and does no I/O: the caller passes the time.  Only the
    headers S3-compatible servers agree on are signed: host, x-amz-*,
    content-md5, content-type and content-length (signing user-agent or
    accept-encoding breaks on servers that drop them before verifying).
    """

    ALGORITHM = "AWS4-HMAC-SHA256"
    SIGNED_HEADER_NAMES = ("host", "content-md5", "content-type", "content-length")

    def __init__(self, access_key_id: str, secret_access_key: str, region: str,
                 service: str = "s3", session_token: str = ""):
        self.access_key_id = access_key_id
        self._secret = secret_access_key
        self.region = region
        self.service = service
        self.session_token = session_token or ""

    def __repr__(self) -> str:
        return "SigV4Signer(%r, <secret>, %r, %r)" % (self.access_key_id, self.region, self.service)

    def sign(self, method: str, url: str, headers: dict, payload_sha256: str,
             now: datetime.datetime) -> dict:
        """Return the headers to add to a request so that it carries a signature.

        payload_sha256 is the hex SHA-256 of the body, or S3_UNSIGNED_PAYLOAD.
        """
        amz_date = now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        add = {"x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256}
        if self.session_token:
            add["x-amz-security-token"] = self.session_token
        # Merge case-insensitively: what we add replaces what the caller had.
        merged = {k: v for k, v in headers.items() if k.lower() not in add}
        merged.update(add)
        if not any(k.lower() == "host" for k in merged):
            merged["host"] = self.host_header(url)
        to_sign = {k: v for k, v in merged.items() if self.is_signed_header(k)}
        creq = self.canonical_request(method, url, to_sign, payload_sha256)
        sts = self.string_to_sign(amz_date, creq)
        sig = self.signature(sts, amz_date[:8])
        add["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
            self.ALGORITHM, self.access_key_id, self.scope(amz_date[:8]),
            self.signed_headers(to_sign), sig)
        return add

    @classmethod
    def is_signed_header(cls, name: str) -> bool:
        name = name.lower()
        return name in cls.SIGNED_HEADER_NAMES or name.startswith("x-amz-")

    @staticmethod
    def host_header(url: str) -> str:
        """Return the Host header value for url: host, plus the port if not the default."""
        u = urllib.parse.urlsplit(url)
        host = u.hostname or ""
        if ":" in host:
            host = "[%s]" % host
        default = 443 if u.scheme == "https" else 80
        if u.port and u.port != default:
            host += ":%d" % u.port
        return host

    @staticmethod
    def canonical_uri(path: str) -> str:
        """Return the URI-encoded path, encoding each segment once.

        A path that is already encoded stays as it is, so callers may pass
        either form; "+" and "%" in keys must then arrive encoded.
        """
        if not path:
            return "/"
        return "/".join(s3_uri_encode(urllib.parse.unquote(seg)) for seg in path.split("/"))

    @staticmethod
    def canonical_query(query: str) -> str:
        """Return the query string sorted by name then value, each part RFC 3986 encoded."""
        pairs = []
        for part in query.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            # Decode without turning "+" into a space: S3 clients encode spaces as %20.
            pairs.append((s3_uri_encode(urllib.parse.unquote(name)),
                          s3_uri_encode(urllib.parse.unquote(value))))
        pairs.sort()
        return "&".join("%s=%s" % p for p in pairs)

    @staticmethod
    def canonical_headers(headers: dict) -> str:
        # Sort by name alone: "key" must come before "key-md5" (":" sorts after "-").
        items = sorted((k.lower(), " ".join(str(v).split())) for k, v in headers.items())
        return "".join("%s:%s\n" % kv for kv in items)

    @staticmethod
    def signed_headers(headers: dict) -> str:
        return ";".join(sorted(k.lower() for k in headers))

    def canonical_request(self, method: str, url: str, headers: dict, payload_sha256: str) -> str:
        """Return the canonical request that signs exactly the given headers."""
        u = urllib.parse.urlsplit(url)
        return "\n".join([
            method.upper(),
            self.canonical_uri(u.path),
            self.canonical_query(u.query),
            self.canonical_headers(headers),
            self.signed_headers(headers),
            payload_sha256,
        ])

    def scope(self, datestamp: str) -> str:
        return "%s/%s/%s/aws4_request" % (datestamp, self.region, self.service)

    def string_to_sign(self, amz_date: str, canonical_request: str) -> str:
        return "\n".join([
            self.ALGORITHM,
            amz_date,
            self.scope(amz_date[:8]),
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        ])

    def signing_key(self, datestamp: str) -> bytes:
        k = ("AWS4" + self._secret).encode("utf-8")
        for msg in (datestamp, self.region, self.service, "aws4_request"):
            k = hmac.new(k, msg.encode("utf-8"), hashlib.sha256).digest()
        return k

    def signature(self, string_to_sign: str, datestamp: str) -> str:
        key = self.signing_key(datestamp)
        return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


###############################################################################
# S3 HTTP transport and XML
###############################################################################


_RETRYABLE_CODES = frozenset([
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "RequestThrottled", "TooManyRequestsException", "ExpiredToken",
])


class _Retryable(Exception):
    """A failed attempt that may succeed when tried again."""

    def __init__(self, err: Exception):
        super().__init__(str(err))
        self.err = err


def _xml_root(body: bytes) -> ET.Element:
    """Parse an S3 XML document, dropping namespaces from every tag."""
    root = ET.fromstring(body)
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def _xml_text(el: "ET.Element | None", name: str, default: str = "") -> str:
    if el is None:
        return default
    child = el.find(name)
    if child is None or child.text is None:
        return default
    return child.text


def _parse_s3_time(s: str) -> datetime.datetime:
    """Parse S3's ISO 8601 timestamps ("2009-10-12T17:50:30.000Z") as aware UTC."""
    s = s.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    # fromisoformat in 3.8-3.10 takes only 0, 3 or 6 fraction digits.
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", s)
    if m and m.group(2):
        s = m.group(1) + (m.group(2) + "000000")[:7] + m.group(3)
    dt = datetime.datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.astimezone(datetime.timezone.utc)


class _HTTPPool:
    """Keep up to `size` idle keep-alive connections to one host.

    Connections are taken and given back by threads; a connection in use
    belongs to one thread only.  More than `size` may be open at once, but
    only `size` are kept when idle.
    """

    def __init__(self, scheme: str, host: str, port: int, ssl_context, size: int,
                 connect_timeout: float, timeout: float):
        self.scheme, self.host, self.port = scheme, host, port
        self._ssl = ssl_context
        self._size = size
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._idle = []
        self._lock = threading.Lock()
        self._out = weakref.WeakSet()  # connections handed out, for abort()
        self._aborted = False
        netloc = "[%s]" % host if ":" in host else host
        self.host_header = SigV4Signer.host_header("%s://%s:%d" % (scheme, netloc, port))

    def get(self):
        """Return (connection, reused)."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError(errno.ECONNABORTED, "client aborted")
            if self._idle:
                conn = self._idle.pop()
                self._out.add(conn)
                return conn, True
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self._connect_timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self._connect_timeout)
        with self._lock:
            self._out.add(conn)
        conn.connect()
        conn.sock.settimeout(self._timeout)
        return conn, False

    def abort(self) -> None:
        """Fail every request in flight now, and every later one."""
        with self._lock:
            self._aborted = True
            out = list(self._out)
        for c in out:
            sock = getattr(c, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def put(self, conn) -> None:
        with self._lock:
            self._out.discard(conn)
            if len(self._idle) < self._size and not self._aborted:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


class _Response:
    """A finished response: status, lower-cased headers and the whole body."""

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body


_UNKNOWN_LENGTH = 1 << 62


class _ObjectReader(io.RawIOBase):
    """Stream an object's body, resuming with a Range GET after a broken read.

    A connection that drops mid-body, times out or ends early resumes at the
    current offset (If-Match on the ETag) up to the client's retry limit.
    """

    def __init__(self, client: "S3ReplicaClient", key: str, conn, resp, start: int, end: int,
                 etag: str):
        super().__init__()
        self._client = client
        self._key = key
        self._conn = conn
        self._resp = resp
        self._pos = start
        self._end = end  # exclusive
        self._etag = etag
        self._failures = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos >= self._end:
            self._release()
            return 0
        want = min(len(b), self._end - self._pos)
        while True:
            try:
                if self._resp is None:
                    self._reopen()
                n = self._resp.readinto(memoryview(b)[:want])
                if n == 0:
                    if self._end == _UNKNOWN_LENGTH:
                        self._end = self._pos
                        self._release()
                        return 0
                    raise http.client.IncompleteRead(b"", self._end - self._pos)
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise S3Error(0, "TLSError", "TLS certificate verification failed: %s" % e,
                                  key=self._key, bucket=self._client.bucket) from e
                self._drop()
                self._failures += 1
                if self._failures > self._client.max_retries:
                    raise S3Error(0, "ReadError", "read body failed after %d attempts: %s"
                                  % (self._failures, e), key=self._key) from e
                self._client.logger.warning(
                    "s3: %s: read of %s broke at byte %d (attempt %d of %d), resuming: %s",
                    self._client._server_name(), self._key, self._pos, self._failures,
                    self._client.max_retries + 1, e, extra={"attempt": self._failures, "key": self._key})
                self._client._sleep_backoff(self._failures)
                continue
            self._pos += n
            if self._pos >= self._end:
                self._release()
            return n

    def _reopen(self) -> None:
        headers = {"range": "bytes=%d-%d" % (self._pos, self._end - 1)}
        if self._etag:
            headers["if-match"] = self._etag
        conn, resp = self._client._open("GET", self._key, headers=headers, expect=(206,))
        self._conn, self._resp = conn, resp

    def _release(self) -> None:
        if self._resp is not None:
            # A fully read body leaves the connection reusable for the next request.
            if self._resp.isclosed() and not self._resp.will_close:
                self._client._pool.put(self._conn)
            else:
                self._conn.close()
            self._conn = self._resp = None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._resp = None

    def close(self) -> None:
        if not self.closed:
            if self._pos >= self._end:
                self._release()
            else:
                self._drop()
        super().close()


###############################################################################
# Credentials
###############################################################################


@dataclass(frozen=True)
class Credentials:
    """An access key pair, with a session token and expiry for temporary keys."""

    access_key_id: str
    secret_access_key: str
    session_token: str = ""
    expiration: Optional[float] = None  # epoch seconds
    source: str = ""

    def __repr__(self) -> str:
        return "Credentials(access_key_id=%r, source=%r, expiration=%r)" % (
            self.access_key_id, self.source, self.expiration)


def _parse_iso8601_epoch(s: str) -> float:
    return _parse_s3_time(s).timestamp()


_LITESTREAM_ENV = (("LITESTREAM_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
                   ("LITESTREAM_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"))


def apply_litestream_env(env) -> None:
    """Copy LITESTREAM_ACCESS_KEY_ID/_SECRET_ACCESS_KEY into AWS_* names that are not set.

    This is Go's applyLitestreamEnv: each LITESTREAM_* variable only fills
    in its AWS_* twin when that is absent from env (set but empty counts
    as set), so AWS_* always wins.
    """
    for ls_key, aws_key in _LITESTREAM_ENV:
        if ls_key in env and aws_key not in env:
            env[aws_key] = env[ls_key]


class CredentialsProvider:
    """Find S3 credentials along the AWS SDK's default chain, and refresh them.

    Order: explicit keys; AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN),
    each filled in from LITESTREAM_* when unset (apply_litestream_env); the shared
    credentials and config files (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE,
    AWS_CONFIG_FILE); web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN
    through STS AssumeRoleWithWebIdentity); ECS container credentials
    (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI); EC2 IMDSv2.

    Temporary credentials are fetched again S3_CREDENTIALS_REFRESH_WINDOW
    seconds before they expire.  environ defaults to os.environ; clock returns
    epoch seconds; the endpoints can be pointed at test servers
    (sts_endpoint, ecs_host, imds_endpoint; AWS_ENDPOINT_URL_STS and
    AWS_EC2_METADATA_SERVICE_ENDPOINT do the same from the environment).
    """

    def __init__(self, access_key_id: str = "", secret_access_key: str = "",
                 session_token: str = "", environ=None, clock=time.time,
                 sts_endpoint: str = "", ecs_host: str = "http://169.254.170.2",
                 imds_endpoint: str = "", timeout: float = 2.0):
        self._explicit = (access_key_id or "", secret_access_key or "", session_token or "")
        self._env = os.environ if environ is None else environ
        self._clock = clock
        self._sts_endpoint = sts_endpoint
        self._ecs_host = ecs_host
        self._imds_endpoint = imds_endpoint
        self._timeout = timeout
        self._lock = threading.Lock()
        self._creds = None  # type: Optional[Credentials]

    def get(self) -> Credentials:
        """Return current credentials, resolving or refreshing them as needed."""
        with self._lock:
            c = self._creds
            if c is not None and (c.expiration is None
                                  or c.expiration - self._clock() > S3_CREDENTIALS_REFRESH_WINDOW):
                return c
            try:
                self._creds = self.resolve()
            except LitestreamError as e:
                # Keep using keys that have not expired yet; the next call retries.
                if c is not None and c.expiration is not None and c.expiration > self._clock():
                    log.warning("s3: refresh credentials: %s", e)
                    return c
                raise
            return self._creds

    def invalidate(self) -> None:
        """Forget cached credentials, e.g. after the server said they expired."""
        with self._lock:
            self._creds = None

    def resolve(self) -> Credentials:
        """Walk the chain once and return the first credentials found."""
        for source in (self._from_explicit, self._from_env,
                       self._from_shared_files, self._from_web_identity,
                       self._from_container, self._from_imds):
            c = source()
            if c is not None:
                log.debug("s3: credentials from %s", c.source)
                return c
        raise LitestreamError(
            "s3: no credentials found: set access-key-id/secret-access-key, "
            "LITESTREAM_ACCESS_KEY_ID/LITESTREAM_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, a shared credentials file, or run with an IAM role")

    def _from_explicit(self):
        ak, sk, tok = self._explicit
        if ak or sk:
            if not (ak and sk):
                raise LitestreamError("s3: access-key-id and secret-access-key must be set together")
            return Credentials(ak, sk, tok, source="config")
        return None

    def _from_env(self):
        env = {k: self._env[k] for pair in _LITESTREAM_ENV for k in pair if k in self._env}
        apply_litestream_env(env)
        ak, sk = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        if ak and sk:
            return Credentials(ak, sk, self._env.get("AWS_SESSION_TOKEN", ""), source="env")
        return None

    def _from_shared_files(self):
        profile = self._env.get("AWS_PROFILE") or self._env.get("AWS_DEFAULT_PROFILE") or "default"
        home = os.path.expanduser("~")
        cred_path = self._env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials")
        conf_path = self._env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
        # The credentials file names sections "NAME"; the config file "profile NAME"
        # (except "default").  The credentials file wins.
        for path, section in ((cred_path, profile),
                              (conf_path, profile if profile == "default" else "profile " + profile)):
            cp = configparser.RawConfigParser()
            try:
                cp.read(os.path.expanduser(path))
            except configparser.Error as e:
                raise LitestreamError("s3: parse %s: %s" % (path, e)) from e
            if not cp.has_section(section):
                continue
            ak = cp.get(section, "aws_access_key_id", fallback="").strip()
            sk = cp.get(section, "aws_secret_access_key", fallback="").strip()
            if ak and sk:
                tok = cp.get(section, "aws_session_token", fallback="").strip()
                return Credentials(ak, sk, tok, source="%s [%s]" % (path, section))
        return None

    def _http(self, method: str, url: str, headers=None, body=None, timeout=None):
        """Do one small HTTP request; return (status, body bytes)."""
        u = urllib.parse.urlsplit(url)
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout or self._timeout,
                                               context=_ssl_context(env=self._env))
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout or self._timeout)
        try:
            path = u.path or "/"
            if u.query:
                path += "?" + u.query
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _from_web_identity(self):
        token_file = self._env.get("AWS_WEB_IDENTITY_TOKEN_FILE", "")
        role_arn = self._env.get("AWS_ROLE_ARN", "")
        if not (token_file and role_arn):
            return None
        try:
            with open(token_file, "r") as f:
                token = f.read().strip()
        except OSError as e:
            raise LitestreamError("s3: read web identity token: %s" % e) from e
        endpoint = self._sts_endpoint or self._env.get("AWS_ENDPOINT_URL_STS", "")
        if not endpoint:
            region = self._env.get("AWS_REGION") or self._env.get("AWS_DEFAULT_REGION")
            endpoint = ("https://sts.%s.amazonaws.com" % region) if region else "https://sts.amazonaws.com"
        session = self._env.get("AWS_ROLE_SESSION_NAME") or "litestream-%d" % int(self._clock())
        form = urllib.parse.urlencode({
            "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
            "RoleArn": role_arn, "RoleSessionName": session, "WebIdentityToken": token,
        })
        try:
            status, body = self._http("POST", endpoint.rstrip("/") + "/", body=form.encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                "Accept": "application/xml"})
        except (OSError, http.client.HTTPException) as e:
            raise LitestreamError("s3: sts AssumeRoleWithWebIdentity: %s" % e) from e
        try:
            root = _xml_root(body)
        except ET.ParseError:
            root = None
        if status != 200 or root is None:
            err = root.find(".//Error") if root is not None else None
            raise LitestreamError("s3: sts AssumeRoleWithWebIdentity: status %d %s: %s" % (
                status, _xml_text(err, "Code"), _xml_text(err, "Message")))
        c = root.find(".//Credentials")
        if c is None:
            raise LitestreamError("s3: sts AssumeRoleWithWebIdentity: no credentials in response")
        return Credentials(_xml_text(c, "AccessKeyId"), _xml_text(c, "SecretAccessKey"),
                           _xml_text(c, "SessionToken"),
                           _parse_iso8601_epoch(_xml_text(c, "Expiration")), source="web identity")

    def _from_container(self):
        rel = self._env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
        full = self._env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
        if rel:
            url = self._ecs_host.rstrip("/") + rel
        elif full:
            url = full
        else:
            return None
        headers = {"Accept": "application/json"}
        token = self._env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN", "")
        token_file = self._env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "")
        if token_file:
            try:
                with open(token_file, "r") as f:
                    token = f.read().strip()
            except OSError as e:
                raise LitestreamError("s3: read container authorization token: %s" % e) from e
        if token:
            headers["Authorization"] = token
        try:
            status, body = self._http("GET", url, headers=headers)
        except (OSError, http.client.HTTPException) as e:
            raise LitestreamError("s3: container credentials: %s" % e) from e
        if status != 200:
            raise LitestreamError("s3: container credentials: status %d" % status)
        return self._from_json(body, "container")

    def _from_json(self, body: bytes, source: str) -> Credentials:
        try:
            d = json.loads(body.decode("utf-8"))
            exp = d.get("Expiration")
            return Credentials(d["AccessKeyId"], d["SecretAccessKey"], d.get("Token", ""),
                               _parse_iso8601_epoch(exp) if exp else None, source=source)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LitestreamError("s3: %s credentials: bad response: %s" % (source, e)) from e

    def _from_imds(self):
        if self._env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            return None
        base = (self._imds_endpoint or self._env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                or "http://169.254.169.254").rstrip("/")
        # IMDSv2: a session token first, then the role name, then its keys.
        try:
            status, token = self._http("PUT", base + "/latest/api/token",
                                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
                                       timeout=1.0)
            if status != 200:
                return None
            hdr = {"X-aws-ec2-metadata-token": token.decode("ascii").strip()}
            status, roles = self._http("GET", base + "/latest/meta-data/iam/security-credentials/",
                                       headers=hdr)
            if status != 200 or not roles.strip():
                return None
            role = roles.decode("utf-8").split()[0]
            status, body = self._http("GET", base + "/latest/meta-data/iam/security-credentials/"
                                      + urllib.parse.quote(role), headers=hdr)
        except (OSError, http.client.HTTPException) as e:
            log.debug("s3: no instance metadata: %s", e)
            return None
        if status != 200:
            raise LitestreamError("s3: instance metadata credentials: status %d" % status)
        return self._from_json(body, "ec2 instance metadata")


def _ssl_context(ca_bundle: str = "", skip_verify: bool = False, env=None):
    """Return a TLS context: the system store, or ca_bundle / AWS_CA_BUNDLE."""
    env = os.environ if env is None else env
    cafile = ca_bundle or env.get("AWS_CA_BUNDLE") or None
    ctx = ssl.create_default_context(cafile=cafile)
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


###############################################################################
# S3ReplicaClient
###############################################################################


_HOST_PATTERNS = [
    # (regex, endpoint template, region from group 2?)
    (re.compile(r"^(?:(.+)\.)?localhost$"), "http://localhost", False),
    (re.compile(r"^(?:(.+)\.)?s3.([^.]+)\.backblazeb2.com$"), "https://s3.%s.backblazeb2.com", True),
    (re.compile(r"^(?:(.+)\.)?s3.filebase.com$"), "https://s3.filebase.com", False),
    (re.compile(r"^(?:(.+)\.)?([^.]+)\.digitaloceanspaces.com$"), "https://%s.digitaloceanspaces.com", True),
    (re.compile(r"^(?:(.+)\.)?s3.([^.]+)\.scw\.cloud$"), "https://s3.%s.scw.cloud", True),
    (re.compile(r"^(?:(.+)\.)?([^.]+)\.linodeobjects.com$"), "https://%s.linodeobjects.com", True),
]


def parse_s3_host(host: str) -> "tuple[str, str, str, bool]":
    """Return (bucket, region, endpoint, force_path_style) for a replica URL host.

    A port of Go's s3.ParseHost: known providers and "BUCKET.localhost[:PORT]"
    get an endpoint and path-style addressing; any other host is an AWS
    bucket name, addressed virtual-hosted style.
    """
    hostname, port = host, ""
    m = re.match(r"^(.*):(\d+)$", host)
    if m:
        hostname, port = m.group(1), m.group(2)
    for rx, endpoint, has_region in _HOST_PATTERNS:
        m = rx.match(hostname)
        if not m:
            continue
        bucket = m.group(1) or ""
        region = ""
        if has_region:
            region = m.group(2)
            endpoint = endpoint % region
        elif endpoint == "http://localhost":
            region = S3_DEFAULT_REGION
        if port:
            endpoint += ":" + port
        return bucket, region, endpoint, True
    return host, "", "", False


class S3ReplicaClient(ReplicaClient):
    """Store a replica in an S3 bucket, under the key prefix `path`.

    Tunables (constructor keywords):
      region, endpoint: with neither, the bucket's region is looked up
        (GetBucketLocation, then HEAD bucket); an endpoint alone means us-east-1.
      force_path_style: "endpoint/bucket/key" URLs; default True with an endpoint.
      skip_verify: accept any TLS certificate (logged as a warning).
      ca_bundle: a PEM file to verify TLS with instead of the system store
        (AWS_CA_BUNDLE is used when unset).
      access_key_id, secret_access_key, session_token: explicit keys; else the
        CredentialsProvider chain (credentials= to pass one).
      sse: "" | "AES256" | "aws:kms"; sse_kms_key_id; sse_c_key (base64 of 32 bytes).
      sign_payload: sign the body's SHA-256 (default) or send UNSIGNED-PAYLOAD.
      part_size: multipart part size and single-PUT threshold (min 5 MiB).
      concurrency: parallel parts on upload and ranges on download.
      max_retries: retries per request after the first attempt (0 = none).
      retry_base_delay, retry_max_delay: backoff bounds in seconds; jittered.
      connect_timeout, timeout: seconds to connect, and per socket operation.
      pool_size: idle keep-alive connections kept.
      list_page_size: keys per list request (max 1000).
      verify_deletes: list after DeleteObjects to catch servers that answer 200
        but keep objects.
    """

    client_type = "s3"

    def __init__(self, bucket: str, path: str = "", region: str = "", endpoint: str = "",
                 force_path_style: Optional[bool] = None, skip_verify: bool = False,
                 access_key_id: str = "", secret_access_key: str = "", *,
                 session_token: str = "", sse: str = "", sse_kms_key_id: str = "",
                 sse_c_key: str = "", ca_bundle: str = "", sign_payload: bool = True,
                 part_size: int = DEFAULT_S3_PART_SIZE, concurrency: int = DEFAULT_S3_CONCURRENCY,
                 max_retries: int = DEFAULT_S3_MAX_RETRIES, retry_base_delay: float = 0.1,
                 retry_max_delay: float = 20.0, connect_timeout: float = 10.0,
                 timeout: float = 60.0, pool_size: int = 8, list_page_size: int = S3_MAX_KEYS,
                 verify_deletes: bool = True, credentials: Optional[CredentialsProvider] = None,
                 clock=time.time):
        if not bucket:
            raise ConfigError("s3: bucket required")
        if part_size < S3_MIN_PART_SIZE:
            raise ConfigError("s3: part size must be at least %d bytes" % S3_MIN_PART_SIZE)
        if sse not in ("", "AES256", "aws:kms"):
            raise ConfigError("s3: sse must be AES256 or aws:kms, not %r" % sse)
        if sse and sse_c_key:
            raise ConfigError("s3: sse and sse-c-key cannot be used together")
        self.bucket = bucket
        self.path = path.strip("/") if path not in (".", "/") else ""
        self.region = region
        self.endpoint = endpoint.rstrip("/")
        self.force_path_style = bool(endpoint) if force_path_style is None else force_path_style
        self.skip_verify = skip_verify
        self.ca_bundle = ca_bundle
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.sign_payload = sign_payload
        self.part_size = part_size
        self.concurrency = max(1, concurrency)
        self.max_retries = max(0, max_retries)
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.pool_size = pool_size
        self.list_page_size = max(1, min(S3_MAX_KEYS, list_page_size))
        self.verify_deletes = verify_deletes
        self._clock = clock
        self._clock_offset = 0.0
        self._sse_c_headers = {}
        self._secrets = [secret_access_key] if secret_access_key else []
        if sse_c_key:
            try:
                raw = base64.b64decode(sse_c_key, validate=True)
            except ValueError as e:
                raise ConfigError("s3: sse-c-key must be base64") from e
            if len(raw) != 32:
                raise ConfigError("s3: sse-c-key must be 32 bytes, base64 encoded")
            self._sse_c_headers = {
                "x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key": sse_c_key,
                "x-amz-server-side-encryption-customer-key-md5":
                    base64.b64encode(hashlib.md5(raw).digest()).decode("ascii"),
            }
            self._secrets.append(sse_c_key)
        self._credentials = credentials or CredentialsProvider(
            access_key_id, secret_access_key, session_token, clock=clock)
        self._init_lock = threading.Lock()
        self._aborted = threading.Event()
        self._pool = None  # type: Optional[_HTTPPool]
        self._list_v2 = True
        self._base_path = ""

    def __repr__(self) -> str:
        return "S3ReplicaClient(bucket=%r, path=%r, endpoint=%r)" % (self.bucket, self.path, self.endpoint)

    def __str__(self) -> str:
        return "s3://%s/%s" % (self.bucket, self.path)

    # -- connection setup ------------------------------------------------

    def init(self) -> None:
        """Resolve the region and endpoint and set up the connection pool (Go's Init)."""
        with self._init_lock:
            if self._pool is not None:
                return
            region = self.region
            if not region:
                region = self.find_bucket_region() if not self.endpoint else S3_DEFAULT_REGION
            self.region = region
            self._pool = self._new_pool(self._endpoint_url())

    def _endpoint_url(self) -> str:
        if self.endpoint:
            ep = self.endpoint if "://" in self.endpoint else "https://" + self.endpoint
        elif self.region == S3_DEFAULT_REGION:
            ep = "https://s3.amazonaws.com"
        else:
            ep = "https://s3.%s.amazonaws.com" % (self.region or S3_DEFAULT_REGION)
        u = urllib.parse.urlsplit(ep)
        # Dotted bucket names do not match the wildcard certificate, so they go path style.
        if self.force_path_style or "." in self.bucket:
            self._base_path = "/" + s3_uri_encode(self.bucket)
            return "%s://%s" % (u.scheme, u.netloc)
        self._base_path = ""
        return "%s://%s.%s" % (u.scheme, self.bucket, u.netloc)

    def _new_pool(self, url: str) -> _HTTPPool:
        u = urllib.parse.urlsplit(url)
        ctx = None
        if u.scheme == "https":
            if self.skip_verify:
                self.logger.warning("s3: skip-verify is set: TLS certificates of %s are not checked", u.hostname)
            ctx = _ssl_context(self.ca_bundle, self.skip_verify)
        port = u.port or (443 if u.scheme == "https" else 80)
        return _HTTPPool(u.scheme, u.hostname, port, ctx, self.pool_size,
                         self.connect_timeout, self.timeout)

    def find_bucket_region(self) -> str:
        """Return the bucket's region: GetBucketLocation, then HEAD bucket's x-amz-bucket-region."""
        if self.endpoint:
            url = self.endpoint if "://" in self.endpoint else "https://" + self.endpoint
        else:
            url = "https://s3.amazonaws.com"
        path = "/" + s3_uri_encode(self.bucket)
        pool = self._new_pool(url)
        try:
            try:
                resp = self._do(pool, S3_DEFAULT_REGION, "GET", path, {"location": ""}, {}, b"")
                loc = (_xml_root(resp.body).text or "").strip() if resp.body else ""
                # Legacy names: an empty constraint is us-east-1, "EU" is eu-west-1.
                return {"": S3_DEFAULT_REGION, "EU": "eu-west-1"}.get(loc, loc)
            except (S3Error, ET.ParseError) as e:
                self.logger.debug("s3: GetBucketLocation %s: %s; trying HEAD", self.bucket, e)
            resp = self._do(pool, S3_DEFAULT_REGION, "HEAD", path, {}, {}, b"",
                            expect=(200, 301, 307, 400, 403))
            region = resp.headers.get("x-amz-bucket-region", "")
            if not region:
                raise S3Error(resp.status, "RegionNotFound", "cannot find the bucket's region",
                              bucket=self.bucket)
            return region
        finally:
            pool.close()

    def close(self) -> None:
        with self._init_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    # -- request machinery -----------------------------------------------

    def _now(self) -> float:
        return self._clock() + self._clock_offset

    def _key_path(self, key: str) -> str:
        return self._base_path + "/" + s3_uri_encode(key, safe="/")

    def _sleep_backoff(self, attempt: int) -> None:
        # "Full jitter": uniform in [0, min(cap, base * 2^attempt)], never below base/2.
        cap = min(self.retry_max_delay, self.retry_base_delay * (2 ** attempt))
        self._aborted.wait(max(self.retry_base_delay / 2, random.uniform(0, cap)))

    def abort(self) -> None:
        """Fail the requests in flight and every later one at once (a shutdown that ran out of time)."""
        self._aborted.set()
        pool = self._pool
        if pool is not None:
            pool.abort()

    def _check_aborted(self, key: str) -> None:
        if self._aborted.is_set():
            raise S3Error(0, "Aborted", "request abandoned: the client was aborted", key=key, bucket=self.bucket)

    def _redact(self, text: str) -> str:
        for s in self._secrets + [self._current_secret()]:
            if s:
                text = text.replace(s, "<redacted>")
        return text

    def _current_secret(self) -> str:
        c = self._credentials._creds
        return c.secret_access_key if c is not None else ""

    def _error_from(self, status: int, headers: dict, body: bytes, key: str) -> S3Error:
        code, message, request_id, bucket = "", "", headers.get("x-amz-request-id", ""), ""
        if body:
            try:
                root = _xml_root(body)
                err = root if root.tag == "Error" else root.find(".//Error")
                code = _xml_text(err, "Code")
                message = _xml_text(err, "Message")
                request_id = _xml_text(err, "RequestId", request_id)
                bucket = _xml_text(err, "BucketName")
                key = _xml_text(err, "Key", key)
            except ET.ParseError:
                message = body[:200].decode("utf-8", "replace")
        if not code:
            code = {301: "PermanentRedirect", 403: "Forbidden", 404: "NotFound",
                    412: "PreconditionFailed"}.get(status, "HTTP%d" % status)
        if code == "NoSuchBucket" and not bucket:
            bucket = self.bucket
        return S3Error(status, code, self._redact(message), key=key, request_id=request_id,
                       bucket=bucket)

    def _send(self, pool: _HTTPPool, region: str, method: str, path: str, query: dict,
              headers: dict, body: bytes):
        """Sign and send one request; return (conn, response) with the body unread.

        A failure to connect or send raises _Retryable; TLS verification
        failures are not retried.
        """
        qs = "&".join("%s=%s" % (s3_uri_encode(k), s3_uri_encode(v)) for k, v in sorted(query.items()))
        target = path + ("?" + qs if qs else "")
        url = "%s://%s%s" % (pool.scheme, pool.host_header, target)
        creds = self._credentials.get()
        signer = SigV4Signer(creds.access_key_id, creds.secret_access_key, region,
                             session_token=creds.session_token)
        hdrs = dict(headers)
        hdrs["host"] = pool.host_header
        has_body = bool(body) or method in ("PUT", "POST")
        if has_body:
            hdrs["content-length"] = str(len(body))
        payload = hashlib.sha256(body).hexdigest() if self.sign_payload else S3_UNSIGNED_PAYLOAD
        now = datetime.datetime.fromtimestamp(self._now(), datetime.timezone.utc)
        hdrs.update(signer.sign(method, url, hdrs, payload, now))
        reused = False
        conn = None
        try:
            conn, reused = pool.get()
            conn.request(method, target, body=body if has_body else None, headers=hdrs)
            return conn, conn.getresponse()
        except ssl.SSLCertVerificationError as e:
            if conn is not None:
                conn.close()
            # Not retried: a certificate will not verify on the next try either.
            raise S3Error(0, "TLSError", "TLS certificate verification failed: %s" % e,
                          bucket=self.bucket) from e
        except (OSError, http.client.HTTPException) as e:
            if conn is not None:
                conn.close()
            r = _Retryable(e)
            r.reused = reused
            raise r from e

    def _server_name(self, pool: Optional[_HTTPPool] = None) -> str:
        """Return scheme://host:port of the server requests go to (for messages)."""
        p = pool or self._pool
        return "%s://%s:%s" % (p.scheme, p.host, p.port) if p else "server"

    def _attempts(self, fn, key: str = "", stats: Optional[dict] = None, pool: Optional[_HTTPPool] = None):
        """Call fn() until it returns, retrying _Retryable failures with backoff (each logged at WARN).

        stats["sent"] counts the attempts made, for callers that must know
        whether a request may have taken effect more than once.
        """
        attempt = 0
        free_retry = True
        while True:
            self._check_aborted(key)
            if stats is not None:
                stats["sent"] = stats.get("sent", 0) + 1
            try:
                return fn()
            except _Retryable as r:
                self._check_aborted(key)
                e = r.err
                # A kept-alive connection the server already closed fails at once:
                # one immediate retry on a new connection, not counted.
                if getattr(r, "reused", False) and free_retry and not isinstance(e, S3Error):
                    free_retry = False
                    continue
                attempt += 1
                where = self._server_name(pool)
                if attempt > self.max_retries:
                    if isinstance(e, S3Error):
                        raise e
                    raise S3Error(0, "RequestError", "cannot reach %s after %d attempts: %s" % (
                        where, attempt, e), key=key, bucket=self.bucket) from e
                self.logger.warning("s3: %s: attempt %d of %d failed, retrying: %s",
                                    where, attempt, self.max_retries + 1, e,
                                    extra={"endpoint": where, "attempt": attempt})
                self._sleep_backoff(attempt)

    def _do(self, pool, region, method, path, query, headers, body, expect=(200,), key="", stats=None):
        """Send a request with retries and read its whole response."""
        def once():
            conn, resp = self._send(pool, region, method, path, query, headers, body)
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise _Retryable(e) from e
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                conn.close()
            else:
                pool.put(conn)
            if resp.status in expect:
                # CompleteMultipartUpload can answer 200 with an error document.
                if method == "POST" and b"<Error>" in data[:300]:
                    err = self._error_from(500, hdrs, data, key)
                    raise _Retryable(err) if err.code in _RETRYABLE_CODES else err
                return _Response(resp.status, hdrs, data)
            raise self._classify(self._error_from(resp.status, hdrs, data, key), hdrs)
        return self._attempts(once, key, stats, pool)

    def _classify(self, err: S3Error, headers: dict) -> Exception:
        """Wrap retryable S3 errors; fix clock skew; leave the rest to fail fast."""
        if err.code == "RequestTimeTooSkewed" and headers.get("date"):
            try:
                server = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
            except (TypeError, ValueError):
                return err
            self._clock_offset = server - self._clock()
            self.logger.warning("s3: clock skew of %.0fs with the server, adjusting", self._clock_offset)
            return _Retryable(err)
        if err.code == "ExpiredToken":
            self._credentials.invalidate()
        if err.status == 501 or err.code == "NotImplemented":
            return err  # a missing feature does not appear on retry
        if err.status >= 500 or err.status == 429 or err.code in _RETRYABLE_CODES:
            return _Retryable(err)
        return err

    def _request(self, method: str, key: Optional[str], query=None, headers=None, body: bytes = b"",
                 expect=(200,), stats: Optional[dict] = None) -> _Response:
        """Send a request for a key (None: the bucket) with retries; return the response."""
        self.init()
        path = self._key_path(key) if key is not None else (self._base_path or "/")
        return self._do(self._pool, self.region, method, path, query or {}, headers or {}, body,
                        expect=expect, key=key or "", stats=stats)

    def _open(self, method: str, key: str, headers=None, expect=(200,)):
        """Send a GET with retries and return (conn, response) with its body unread."""
        self.init()

        def once():
            conn, resp = self._send(self._pool, self.region, method, self._key_path(key),
                                    {}, headers or {}, b"")
            if resp.status in expect:
                return conn, resp
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise _Retryable(e) from e
            finally:
                conn.close()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            raise self._classify(self._error_from(resp.status, hdrs, data, key), hdrs)
        return self._attempts(once, key)

    # -- object primitives -----------------------------------------------

    def _sse_headers(self, for_write: bool) -> dict:
        h = dict(self._sse_c_headers)
        if for_write and self.sse:
            h["x-amz-server-side-encryption"] = self.sse
            if self.sse == "aws:kms" and self.sse_kms_key_id:
                h["x-amz-server-side-encryption-aws-kms-key-id"] = self.sse_kms_key_id
        return h

    def create_bucket(self) -> None:
        """Create the bucket (setup and tests; replication never creates buckets, as in Go)."""
        body = b""
        if self.region and self.region != S3_DEFAULT_REGION:
            body = ('<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    "<LocationConstraint>%s</LocationConstraint></CreateBucketConfiguration>"
                    % self.region).encode()
        self._request("PUT", None, body=body)

    def head_object(self, key: str) -> dict:
        """Return {"size", "etag", "last_modified"} of an object; FileNotFoundError if missing."""
        try:
            resp = self._request("HEAD", key, headers=self._sse_headers(False))
        except S3Error as e:
            if e.status == 404:
                raise FileNotFoundError(errno.ENOENT, "s3: no such key", key) from e
            raise
        return {
            "size": int(resp.headers.get("content-length", "0")),
            "etag": resp.headers.get("etag", ""),
            "last_modified": email.utils.parsedate_to_datetime(resp.headers["last-modified"])
            if "last-modified" in resp.headers else None,
        }

    def put_object(self, key: str, data: bytes) -> None:
        """Store data under key with a single PutObject."""
        headers = self._sse_headers(True)
        headers["content-md5"] = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        self._request("PUT", key, headers=headers, body=data)

    def upload(self, key: str, rd: BinaryIO) -> int:
        """Stream rd to key and return the byte count.

        One PutObject when the stream ends within part_size bytes, else a
        multipart upload whose memory is bounded by part_size x (concurrency+1).
        Either counts as one PUT, as Go's uploader does.
        """
        with replica_operation(self.client_type, "PUT") as op:
            first = _read_full(rd, self.part_size)
            second = _read_full(rd, self.part_size) if len(first) == self.part_size else b""
            if not second:
                self.put_object(key, first)
                op.bytes = len(first)
            else:
                op.bytes = self._multipart_upload(key, rd, first, second)
        return op.bytes

    def _multipart_upload(self, key: str, rd: BinaryIO, first: bytes, second: bytes) -> int:
        # A CreateMultipartUpload sent more than once may have created
        # uploads whose answers were lost: nobody knows their ids, so they
        # would cost storage until a lifecycle rule removed them.  Once this
        # upload is over (done or aborted), every other upload of the key
        # is one of those (one replicator per database writes its keys).
        stats: dict = {}
        try:
            return self._multipart_upload_once(key, rd, first, second, stats)
        finally:
            if stats.get("sent", 1) > 1:
                try:
                    n = self.abort_uploads(key, exact=True)
                    if n:
                        self.logger.info("s3: aborted %d orphaned multipart uploads of %s", n, key)
                except (LitestreamError, OSError) as e:
                    self.logger.warning("s3: cannot clean up multipart uploads of %s: %s", key, e)

    def _multipart_upload_once(self, key: str, rd: BinaryIO, first: bytes, second: bytes, stats: dict) -> int:
        resp = self._request("POST", key, query={"uploads": ""}, headers=self._sse_headers(True), stats=stats)
        upload_id = _xml_text(_xml_root(resp.body), "UploadId")
        if not upload_id:
            raise S3Error(resp.status, "InvalidResponse", "no UploadId in CreateMultipartUpload",
                          key=key, bucket=self.bucket)
        etags = {}
        total = 0
        slots = threading.BoundedSemaphore(self.concurrency)

        def put_part(n: int, data: bytes) -> None:
            try:
                headers = dict(self._sse_c_headers)
                md5 = hashlib.md5(data)
                headers["content-md5"] = base64.b64encode(md5.digest()).decode("ascii")
                r = self._request("PUT", key, query={"partNumber": str(n), "uploadId": upload_id},
                                  headers=headers, body=data)
                etags[n] = r.headers.get("etag", "")
            finally:
                slots.release()

        try:
            with concurrent.futures.ThreadPoolExecutor(self.concurrency,
                                                       thread_name_prefix="litestream-s3-upload") as ex:
                futures = []
                n, data = 1, first
                while data:
                    if n > S3_MAX_PARTS:
                        raise LitestreamError("s3: %s: stream exceeds %d parts of %d bytes" % (
                            key, S3_MAX_PARTS, self.part_size))
                    slots.acquire()
                    # Stop reading as soon as a part failed.
                    for f in futures:
                        if f.done() and f.exception() is not None:
                            slots.release()
                            raise f.exception()
                    futures.append(ex.submit(put_part, n, data))
                    total += len(data)
                    if second is not None:
                        data, second = second, None
                    else:
                        data = _read_full(rd, self.part_size)
                    n += 1
                for f in futures:
                    f.result()
            root = ET.Element("CompleteMultipartUpload")
            for i in sorted(etags):
                part = ET.SubElement(root, "Part")
                ET.SubElement(part, "PartNumber").text = str(i)
                ET.SubElement(part, "ETag").text = etags[i]
            try:
                self._request("POST", key, query={"uploadId": upload_id}, body=ET.tostring(root),
                              headers={"content-type": "application/xml"})
            except S3Error as e:
                # A retried Complete whose first answer was lost finds the upload gone.
                if e.code != "NoSuchUpload" or not self.head_object(key)["etag"].strip('"').endswith(
                        "-%d" % len(etags)):
                    raise
        except BaseException:
            try:
                self._request("DELETE", key, query={"uploadId": upload_id}, expect=(200, 204, 404))
            except (LitestreamError, OSError) as e:
                self.logger.warning("s3: abort multipart upload %s: %s", key, e)
            raise
        return total

    def list_multipart_uploads(self, prefix: str) -> "List[tuple[str, str, Optional[datetime.datetime]]]":
        """Return (key, upload id, initiated) of every incomplete multipart upload under prefix."""
        out = []
        key_marker = id_marker = ""
        while True:
            query = {"uploads": "", "prefix": prefix}
            if key_marker:
                query["key-marker"] = key_marker
                query["upload-id-marker"] = id_marker
            root = _xml_root(self._request("GET", None, query=query).body)
            for u in root.findall("Upload"):
                t = _xml_text(u, "Initiated")
                out.append((_xml_text(u, "Key"), _xml_text(u, "UploadId"), _parse_s3_time(t) if t else None))
            if _xml_text(root, "IsTruncated").lower() != "true":
                return out
            key_marker = _xml_text(root, "NextKeyMarker")
            id_marker = _xml_text(root, "NextUploadIdMarker")
            if not key_marker:
                raise S3Error(200, "InvalidResponse", "truncated upload list without a marker", bucket=self.bucket)

    def abort_uploads(self, prefix: str, exact: bool = False, older_than: Optional[float] = None) -> int:
        """Abort incomplete multipart uploads under prefix (exact: of that key only); return how many.

        With older_than (seconds), only uploads initiated longer ago than that.
        """
        now = utc_from_timestamp(self._now())
        n = 0
        for k, upload_id, initiated in self.list_multipart_uploads(prefix):
            if exact and k != prefix:
                continue
            if older_than is not None and (initiated is None or (now - initiated).total_seconds() < older_than):
                continue
            self._request("DELETE", k, query={"uploadId": upload_id}, expect=(200, 204, 404))
            n += 1
        return n

    def abort_stale_uploads(self, older_than: float = STALE_UPLOAD_AGE) -> int:
        """Abort this replica's multipart uploads older than older_than seconds (left by a crash); log how many."""
        prefix = _join(self.path, "generations") + "/"
        n = self.abort_uploads(prefix, older_than=older_than)
        if n:
            self.logger.info("s3: aborted %d incomplete multipart uploads older than %dh under s3://%s/%s",
                             n, older_than // 3600, self.bucket, prefix)
        return n

    def open_object(self, key: str) -> BinaryIO:
        """Return a streaming reader of an object; FileNotFoundError if it is missing.

        Counted as one GET of Content-Length bytes, timed to the response
        headers (resumed reads are part of the same GET).
        """
        with replica_operation(self.client_type, "GET") as op:
            try:
                conn, resp = self._open("GET", key, headers=self._sse_headers(False))
            except S3Error as e:
                if e.code in ("NoSuchKey", "NotFound") or (e.status == 404 and e.code != "NoSuchBucket"):
                    raise FileNotFoundError(errno.ENOENT, "s3: no such key", key) from e
                raise
            length = resp.getheader("content-length")
            op.bytes = int(length) if length is not None else None
        if length is None:
            # No length to resume against: hand out the body as it comes.
            return _ObjectReader(self, key, conn, resp, 0, _UNKNOWN_LENGTH, "")
        return _ObjectReader(self, key, conn, resp, 0, int(length), resp.getheader("etag", ""))

    def download(self, key: str, w: BinaryIO, chunk_size: Optional[int] = None,
                 concurrency: Optional[int] = None) -> int:
        """Copy an object into w with parallel ranged GETs; return the byte count.

        Ranges are written in order, so w need not be seekable; memory is
        bounded by chunk_size x concurrency.  FileNotFoundError if missing.
        Counted as one GET of the object's size, timed to the last byte.
        """
        with replica_operation(self.client_type, "GET") as op:
            op.bytes = self._download(key, w, chunk_size, concurrency)
        return op.bytes

    def _download(self, key: str, w: BinaryIO, chunk_size: Optional[int], concurrency: Optional[int]) -> int:
        chunk = chunk_size or self.part_size
        conc = concurrency or self.concurrency
        headers = dict(self._sse_headers(False))
        headers["range"] = "bytes=0-%d" % (chunk - 1)
        try:
            resp = self._request("GET", key, headers=headers, expect=(200, 206))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NotFound") or (e.status == 404 and e.code != "NoSuchBucket"):
                raise FileNotFoundError(errno.ENOENT, "s3: no such key", key) from e
            if e.code == "InvalidRange":  # empty object
                return 0
            raise
        w.write(resp.body)
        if resp.status == 200:
            return len(resp.body)
        m = re.match(r"bytes \d+-\d+/(\d+)", resp.headers.get("content-range", ""))
        if not m:
            raise S3Error(resp.status, "InvalidResponse", "bad Content-Range %r"
                          % resp.headers.get("content-range"), key=key, bucket=self.bucket)
        size = int(m.group(1))
        etag = resp.headers.get("etag", "")

        def get_range(start: int) -> bytes:
            end = min(size, start + chunk) - 1
            h = dict(self._sse_headers(False))
            h["range"] = "bytes=%d-%d" % (start, end)
            if etag:
                h["if-match"] = etag
            r = self._request("GET", key, headers=h, expect=(206,))
            if len(r.body) != end - start + 1:
                raise S3Error(r.status, "InvalidResponse", "short range %d-%d" % (start, end), key=key)
            return r.body

        with concurrent.futures.ThreadPoolExecutor(conc, thread_name_prefix="litestream-s3-get") as ex:
            pending = []
            starts = iter(range(len(resp.body), size, chunk))
            for start in starts:
                pending.append(ex.submit(get_range, start))
                if len(pending) >= conc:
                    w.write(pending.pop(0).result())
            for f in pending:
                w.write(f.result())
        return size

    def list_objects(self, prefix: str, delimiter: str = "") -> "tuple[list, list]":
        """Return ([(key, size, last_modified, etag)], [common prefixes]) under prefix, all pages."""
        objects, prefixes = [], []
        token = marker = ""
        while True:
            query = {"prefix": prefix, "max-keys": str(self.list_page_size)}
            if delimiter:
                query["delimiter"] = delimiter
            if self._list_v2:
                query["list-type"] = "2"
                if token:
                    query["continuation-token"] = token
            elif marker:
                query["marker"] = marker
            with replica_operation(self.client_type, "LIST") as op:  # one per page, as Go
                try:
                    resp = self._request("GET", None, query=query)
                except S3Error as e:
                    if self._list_v2 and e.status in (400, 501) and e.code not in ("NoSuchBucket",):
                        op.skip()
                        self.logger.info("s3: ListObjectsV2 refused (%s); using ListObjects", e.code)
                        self._list_v2, token, marker = False, "", ""
                        continue
                    raise
                root = _xml_root(resp.body)
            if self._list_v2 and root.find("KeyCount") is None and not token:
                # A V1-only server ignored list-type=2 and answered V1: keep paging V1.
                self._list_v2 = False
            last = ""
            for c in root.findall("Contents"):
                k = _xml_text(c, "Key")
                objects.append((k, int(_xml_text(c, "Size", "0")),
                                _parse_s3_time(_xml_text(c, "LastModified")), _xml_text(c, "ETag")))
                last = k
            for p in root.findall("CommonPrefixes"):
                prefixes.append(_xml_text(p, "Prefix"))
                last = max(last, _xml_text(p, "Prefix"))
            if _xml_text(root, "IsTruncated").lower() != "true":
                return objects, prefixes
            if self._list_v2:
                token = _xml_text(root, "NextContinuationToken")
                if not token:
                    raise S3Error(resp.status, "InvalidResponse", "truncated list without token",
                                  bucket=self.bucket)
            else:
                marker = _xml_text(root, "NextMarker") or last
                if not marker:
                    raise S3Error(resp.status, "InvalidResponse", "truncated list without marker",
                                  bucket=self.bucket)

    def delete_objects(self, keys: Iterable[str]) -> None:
        """Delete keys with DeleteObjects in batches of S3_MAX_KEYS.

        Every per-key error is raised.  With verify_deletes, a list afterwards
        catches a server that answers success but keeps the objects.
        """
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), S3_MAX_KEYS):
            batch = keys[i:i + S3_MAX_KEYS]
            root = ET.Element("Delete")
            ET.SubElement(root, "Quiet").text = "true"
            for k in batch:
                ET.SubElement(ET.SubElement(root, "Object"), "Key").text = k
            body = ET.tostring(root, encoding="utf-8")
            with replica_operation(self.client_type, "DELETE"):  # one per batch, as Go
                resp = self._request("POST", None, query={"delete": ""}, body=body, headers={
                    "content-md5": base64.b64encode(hashlib.md5(body).digest()).decode("ascii"),
                    "content-type": "application/xml"})
                errors = _xml_root(resp.body).findall("Error") if resp.body.strip() else []
                if errors:
                    first = errors[0]
                    detail = "; ".join("%s: %s %s" % (_xml_text(e, "Key"), _xml_text(e, "Code"),
                                                      _xml_text(e, "Message")) for e in errors)
                    raise S3Error(resp.status, _xml_text(first, "Code") or "DeleteError",
                                  self._redact("%d keys not deleted: %s" % (len(errors), detail)),
                                  key=_xml_text(first, "Key"), bucket=self.bucket)
            if self.verify_deletes:
                self._verify_deleted(batch)

    def _verify_deleted(self, keys: List[str]) -> None:
        wanted = set(keys)
        dirs = sorted({k.rsplit("/", 1)[0] + "/" if "/" in k else "" for k in keys})
        left = []
        for d in dirs:
            objs, _ = self.list_objects(d, delimiter="/")
            left.extend(o[0] for o in objs if o[0] in wanted)
        if left:
            raise S3Error(200, "DeleteNotApplied", "server reported success but %d of %d objects "
                          "remain, e.g. %s" % (len(left), len(keys), left[0]), key=left[0],
                          bucket=self.bucket)

    # -- ReplicaClient ----------------------------------------------------

    def generations(self) -> List[str]:
        _, prefixes = self.list_objects(_join(self.path, "generations") + "/", delimiter="/")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes]
        return sorted(n for n in names if is_generation_name(n))

    def delete_generation(self, generation: str) -> None:
        objs, _ = self.list_objects(generation_path(self.path, generation) + "/")
        self.delete_objects(o[0] for o in objs)

    def snapshots(self, generation: str) -> List[SnapshotInfo]:
        prefix = _join(generation_path(self.path, generation), "snapshots") + "/"
        objs, _ = self.list_objects(prefix, delimiter="/")
        out = []
        for key, size, mtime, _etag in objs:
            try:
                index = parse_snapshot_path(key.rsplit("/", 1)[-1])
            except ValueError:
                continue
            out.append(SnapshotInfo(generation, index, size, mtime))
        out.sort(key=lambda s: s.index)
        return out

    def write_snapshot(self, generation: str, index: int, rd: BinaryIO) -> SnapshotInfo:
        started = datetime.datetime.now(datetime.timezone.utc)
        n = self.upload(snapshot_path(self.path, generation, index), rd)
        return SnapshotInfo(generation, index, n, started)

    def delete_snapshot(self, generation: str, index: int) -> None:
        self.delete_objects([snapshot_path(self.path, generation, index)])

    def snapshot_reader(self, generation: str, index: int) -> BinaryIO:
        return self.open_object(snapshot_path(self.path, generation, index))

    parallel_download = True

    def download_snapshot(self, generation: str, index: int, w: BinaryIO) -> int:
        return self.download(snapshot_path(self.path, generation, index), w)

    def wal_segments(self, generation: str) -> List[WALSegmentInfo]:
        prefix = _join(generation_path(self.path, generation), "wal") + "/"
        objs, _ = self.list_objects(prefix, delimiter="/")
        out = []
        for key, size, mtime, _etag in objs:
            try:
                index, offset = parse_wal_segment_path(key.rsplit("/", 1)[-1])
            except ValueError:
                continue
            out.append(WALSegmentInfo(generation, index, offset, size, mtime))
        out.sort(key=lambda s: (s.index, s.offset))
        return out

    def write_wal_segment(self, pos: Pos, rd: BinaryIO) -> WALSegmentInfo:
        started = datetime.datetime.now(datetime.timezone.utc)
        n = self.upload(wal_segment_path(self.path, pos.generation, pos.index, pos.offset), rd)
        return WALSegmentInfo(pos.generation, pos.index, pos.offset, n, started)

    def delete_wal_segments(self, positions: Iterable[Pos]) -> None:
        self.delete_objects(wal_segment_path(self.path, p.generation, p.index, p.offset)
                            for p in positions)

    def wal_segment_reader(self, pos: Pos) -> BinaryIO:
        return self.open_object(wal_segment_path(self.path, pos.generation, pos.index, pos.offset))


def _read_full(rd: BinaryIO, n: int) -> bytes:
    """Read up to n bytes, stopping early only at EOF."""
    chunks, got = [], 0
    while got < n:
        b = rd.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


###############################################################################
# Scheduler
###############################################################################


class Task:
    """A job that a Scheduler runs when it is due.

    fn() runs on a scheduler thread and returns the delay in seconds until
    its next run, or None to wait until schedule() is called.  A task
    never runs on two threads at once: schedule() while it runs asks for
    one more run as soon as it finishes (at the earlier of the two times).
    """

    def __init__(self, scheduler: "Scheduler", fn, name: str):
        self.scheduler = scheduler
        self.fn = fn
        self.name = name
        self.due: Optional[float] = None  # monotonic time of the next run, while queued
        self.running = False
        self.cancelled = False
        self._rerun: Optional[float] = None

    def schedule(self, delay: float = 0.0) -> None:
        """Run the task within delay seconds (an earlier run already queued stays)."""
        self.scheduler._schedule(self, delay)

    def cancel(self) -> None:
        """Run the task no more; a run in progress finishes."""
        self.scheduler._cancel(self)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until the task is not running; return False on timeout."""
        return self.scheduler._wait_idle(self, timeout)


class Scheduler:
    """Run many timed tasks on a few named threads.

    Hundreds of databases each want a sync every second and their replicas
    an upload after each change; Go gives each loop a goroutine, but a
    thread per loop costs memory and wake-ups.  Here every task waits in
    one heap.  One worker (the leader) sleeps until the earliest task is
    due; when it takes a task to run, an idle worker becomes the leader, or
    a new one starts, up to max_workers threads.  So the threads are the
    tasks running at once plus one, and a long task (a snapshot) never
    holds up the others' timers.  With short_tasks (quick, local work such
    as WAL copies) the leader runs a task itself unless more is due
    already.  Idle workers beyond the leader stop after idle_timeout
    seconds.  Threads are daemons: closing a DB runs its final
    sync itself, so no interpreter exit waits on a task stuck in I/O.
    """

    def __init__(self, name: str = "litestream", max_workers: int = 4, idle_timeout: float = 30.0,
                 short_tasks: bool = False):
        self.name = name
        self.max_workers = max(1, max_workers)
        self.idle_timeout = idle_timeout
        self.short_tasks = short_tasks
        self._lock = threading.Lock()
        self._leader_cv = threading.Condition(self._lock)  # the leader waits here for the heap's head
        self._idle_cv = threading.Condition(self._lock)    # the other idle workers wait here
        self._done_cv = threading.Condition(self._lock)    # wait_idle callers
        self._heap: list = []  # (due, seq, task); entries whose task.due moved on are stale
        self._seq = itertools.count()
        self._names = itertools.count(1)
        self._workers = 0
        self._idle = 0
        self._leader = False
        self._closed = False

    def task(self, fn, name: str) -> Task:
        """Return a new, unscheduled task running fn."""
        return Task(self, fn, name)

    def close(self) -> None:
        """Stop every worker once its current task is done; queued tasks never run."""
        with self._lock:
            self._closed = True
            self._heap.clear()
            self._leader_cv.notify_all()
            self._idle_cv.notify_all()
            self._done_cv.notify_all()

    def _push(self, task: Task, due: float) -> None:
        earliest = not self._heap or due < self._heap[0][0]
        task.due = due
        heapq.heappush(self._heap, (due, next(self._seq), task))
        if self._leader:
            if earliest:
                self._leader_cv.notify()
        elif self._idle:
            self._idle_cv.notify()
        elif self._workers < self.max_workers:
            self._spawn()

    def _schedule(self, task: Task, delay: float) -> None:
        with self._lock:
            if self._closed or task.cancelled:
                return
            due = time.monotonic() + max(0.0, delay)
            if task.running:
                if task._rerun is None or due < task._rerun:
                    task._rerun = due
                return
            if task.due is not None and task.due <= due:
                return
            self._push(task, due)

    def _cancel(self, task: Task) -> None:
        with self._lock:
            task.cancelled = True
            task.due = task._rerun = None

    def _wait_idle(self, task: Task, timeout: Optional[float]) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while task.running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done_cv.wait(left)
            return True

    def _spawn(self) -> None:
        self._workers += 1
        t = threading.Thread(target=self._work, daemon=True,
                             name="litestream-%s-%d" % (self.name, next(self._names)))
        t.start()

    def _work(self) -> None:
        with self._lock:
            try:
                self._work_locked()
            finally:
                self._workers -= 1

    def _work_locked(self) -> None:
        while not self._closed:
            if not self._leader:
                # Lead: wait for the head of the heap to fall due.
                self._leader = True
                try:
                    while not self._closed:
                        now = time.monotonic()
                        if self._heap and self._heap[0][0] <= now:
                            break
                        timeout = self._heap[0][0] - now if self._heap else self.idle_timeout
                        if not self._leader_cv.wait(min(timeout, self.idle_timeout)) and not self._heap \
                                and self._workers > 1:
                            return  # nothing to watch for a while, and another worker remains
                    if self._closed:
                        return
                    due, _, task = heapq.heappop(self._heap)
                finally:
                    self._leader = False
                if task.due != due or task.cancelled:
                    continue  # stale entry
                # Hand the watch over before running: an idle worker, or a
                # new one.  With short_tasks, only when more work is due
                # already: a quick task is back before the next is due, and
                # a hand-over per task would cost two thread switches.
                if not self.short_tasks or (self._heap and self._heap[0][0] <= time.monotonic()):
                    if self._idle:
                        self._idle_cv.notify()
                    elif self._heap and self._workers < self.max_workers:
                        self._spawn()
                self._run_locked(task)
                continue
            self._idle += 1
            woken = self._idle_cv.wait(self.idle_timeout)
            self._idle -= 1
            if not woken and self._leader and self._workers > 1:
                return  # idle for a while, and someone else watches the heap

    def _run_locked(self, task: Task) -> None:
        task.due, task.running, task._rerun = None, True, None
        self._lock.release()
        try:
            delay = self._run(task)
        finally:
            self._lock.acquire()
        task.running = False
        if not task.cancelled and not self._closed:
            nxt = [d for d in (task._rerun, None if delay is None else time.monotonic() + delay)
                   if d is not None]
            if nxt:
                self._push(task, min(nxt))
        task._rerun = None
        self._done_cv.notify_all()

    @staticmethod
    def _run(task: Task) -> Optional[float]:
        try:
            return task.fn()
        except Exception as e:  # A task's own errors are its business; this is the last guard.
            log.error("%s: unexpected error: %s: %s", task.name, type(e).__name__, e)
            return 1.0


class _Deadline:
    """A point in time work must finish by (None: no bound), which abort() moves to now."""

    def __init__(self, timeout: Optional[float] = None):
        self.end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self.aborted = threading.Event()

    def remaining(self) -> Optional[float]:
        """Return the seconds left (0 when past or aborted), or None without a bound."""
        if self.aborted.is_set():
            return 0.0
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        r = self.remaining()
        return r is not None and r <= 0

    def abort(self) -> None:
        self.aborted.set()

    def join(self, thread: threading.Thread) -> bool:
        """Wait for thread until the deadline; return whether it finished."""
        while thread.is_alive() and not self.expired():
            r = self.remaining()
            thread.join(0.1 if r is None else min(0.1, r))
        return not thread.is_alive()


def _join_all(threads, timeout: float) -> None:
    """Join threads for at most timeout seconds in all."""
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))


###############################################################################
# ShadowWAL and DB
###############################################################################

CHECKPOINT_MODE_PASSIVE = "PASSIVE"
CHECKPOINT_MODE_RESTART = "RESTART"
CHECKPOINT_MODE_TRUNCATE = "TRUNCATE"

_SEQ_UPSERT = ("INSERT INTO _litestream_seq (id, seq) VALUES (1, 1) "
               "ON CONFLICT (id) DO UPDATE SET seq = seq + 1")

# The shadow WAL's invariant, which makes every partial step harmless:
#
#   For the current index, bytes [0, pos.offset) of its shadow file are a
#   byte-exact copy of the real WAL's, end at a commit frame, and were
#   fsynced before pos moved past them.  Finished indices are whole.
#
# Replicas read only below pos, so whatever lies past pos belongs to an
# unfinished step and is never uploaded.  A step writes its frames past
# pos, checks that every write wrote every byte (pwrite_all: a disk that
# fills up returns short writes), truncates the file to the last commit
# frame it actually wrote (shrinking only: a file is never extended over
# bytes we did not write), fsyncs, and only then moves pos.  A step that
# fails part way (short write, full disk, fsync error) keeps the whole
# transactions it did write and cuts the rest, so the next step continues
# from a consistent point; a crash leaves bytes past the last durable pos,
# which start-up checks frame by frame and cuts after the last valid commit.
#
# What the copy trusts.  Frames are normally checked one by one against
# the index's salt and the running checksum, as Go does.  When SQLite's
# wal-index header in "-shm" (read with SQLite's two-copy and checksum
# protocol) carries this index's salts, its mxFrame names the last
# committed frame, and those frames are final: a committed frame is only
# ever overwritten after a WAL restart, a restart rewrites the WAL header
# before any frame, and the copy re-reads the header after copying (and
# checks the last frame's salt and checksum against the wal-index).  Such
# frames are copied without recomputing checksums SQLite already computed.
# Without a usable "-shm" (locking_mode=EXCLUSIVE, a torn or stale header,
# another cycle's salts) the frame-by-frame copy runs.

SHADOW_WRITE_CHUNK = 4 << 20
PRE_LOCK_COPY_ENOUGH = 1 << 20  # a backlog this small is copied under the write lock
PRE_LOCK_COPY_ROUNDS = 4         # ... else copied first without it, at most this often
SHUTDOWN_HASH_UNDER_LOCK = 64 << 20  # smaller files are hashed holding the write lock
SHM_HEADER_SIZE = 136  # two WalIndexHdr copies (48 bytes each) and the WalCkptInfo
WAL_INDEX_VERSION = 3007000


@dataclass(frozen=True)
class WALIndexHeader:
    """The fields of SQLite's wal-index header (the start of "-shm") that the copy uses."""

    change: int
    page_size: int
    max_frame: int
    frame_checksum: "tuple[int, int]"
    salt: bytes  # the 8 salt bytes exactly as in the WAL header


def parse_wal_index_header(b: bytes, big_endian: bool = sys.byteorder == "big") -> Optional[WALIndexHeader]:
    """Return the wal-index header in the first bytes of "-shm", or None if it is not usable.

    Spec: https://www.sqlite.org/walformat.html#the_wal_index_file_format
    The header is stored twice, in the writer's native byte order:
      0 iVersion (3007000)  8 iChange  12 isInit  13 bigEndCksum  14 szPage
      16 mxFrame  20 nPage  24 aFrameCksum[2]  32 aSalt[2]  40 aCksum[2]
    aCksum is the WAL checksum (native order) of bytes 0..40.  Writers
    store copy 2 then copy 1; a reader that sees both equal and the
    checksum right has a consistent header, else it must not use it.
    """
    if len(b) < 96:
        return None
    h1, h2 = b[0:48], b[48:96]
    if h1 != h2:
        return None
    order = ">" if big_endian else "<"
    version, _, change, is_init, _, sz, mx, _, fc1, fc2 = struct.unpack(order + "IIIBBHIIII", h1[:32])
    if version != WAL_INDEX_VERSION or is_init != 1:
        return None
    if wal_checksum(big_endian, h1[:40], 0, 0) != struct.unpack(order + "II", h1[40:48]):
        return None
    page_size = 65536 if sz == 1 else sz
    return WALIndexHeader(change, page_size, mx, (fc1, fc2), bytes(h1[32:40]))


@dataclass(frozen=True)
class CopyResult:
    """What one copy step did: bytes appended to the shadow WAL, and the write error that cut it short."""

    copied: int = 0
    error: Optional[OSError] = None


@dataclass(frozen=True)
class SyncResult:
    """What one DB.sync did.

    exists is False while the database file does not exist (nothing was
    done).  new_generation names the reason a generation was started;
    copied counts bytes appended to the shadow WAL; checkpoint is the mode
    of a checkpoint that ran ("" for none).
    """

    exists: bool = True
    pos: Pos = Pos()
    copied: int = 0
    new_generation: str = ""
    checkpoint: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.copied or self.new_generation or self.checkpoint)


class ShadowWAL:
    """The shadow WAL of one database: durable, byte-exact copies of the real WAL's cycles.

    Files live in "<meta>/generations/<gen>/wal/<index %08x>.wal", one per
    WAL cycle (index); "<meta>/generation" names the current generation.
    pos is the end of what has been copied and made durable in the current
    index, always at a commit frame (see the invariant above).  Only the DB
    holding the meta directory's lock writes here; replicas read below pos.
    """

    def __init__(self, meta_path: str, logger=None):
        self.meta_path = meta_path
        self.logger = logger or log
        self.page_size = 0
        self.pos = Pos()
        self.header = b""        # the current index's 32-byte WAL header
        self._hdr: Optional[WALHeader] = None
        self._checksum = (0, 0)  # the running checksum at pos
        self._fd = -1            # the current index, open for writing

    # Paths -------------------------------------------------------------------

    def generation_name_path(self) -> str:
        return os.path.join(self.meta_path, "generation")

    def dir(self, generation: str) -> str:
        return os.path.join(self.meta_path, "generations", generation, "wal")

    def path(self, generation: str, index: int) -> str:
        return os.path.join(self.dir(generation), format_wal_path(index))

    def current_generation(self) -> str:
        """Return the generation the meta directory names, or ""."""
        try:
            with open(self.generation_name_path()) as f:
                g = f.read().strip()
        except FileNotFoundError:
            return ""
        return g if is_generation_name(g) else ""

    def indexes(self, generation: str) -> List[int]:
        """Return the indexes with a shadow file in a generation, sorted."""
        try:
            names = os.listdir(self.dir(generation))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            try:
                out.append(parse_wal_path(n))
            except ValueError:
                pass
        return sorted(out)

    def size(self) -> int:
        """Return the bytes the current generation's shadow files take."""
        gen = self.pos.generation
        total = 0
        for i in self.indexes(gen) if gen else ():
            try:
                total += os.path.getsize(self.path(gen, i))
            except FileNotFoundError:
                pass
        return total

    # Opening and starting ----------------------------------------------------

    def open(self, page_size: int, wal_fd: int = -1, trusted: Optional[WALIndexHeader] = None) -> Pos:
        """Load the current generation's last index and cut it after its last valid commit.

        A crash can leave bytes past the last durable position (see the
        invariant); they are checked here.  When the real WAL (wal_fd) is
        still the same cycle and SQLite's wal-index (trusted) vouches for
        its committed frames, the shadow is compared with it byte for byte;
        otherwise every frame's checksum is verified.  Returns pos, zero
        when there is no usable generation.
        """
        self.close()
        self.page_size = page_size
        self.pos = Pos()
        gen = self.current_generation()
        idx = self.indexes(gen) if gen else []
        if not idx:
            return self.pos
        path = self.path(gen, idx[-1])
        fd = os.open(path, os.O_RDWR)
        try:
            header = os.pread(fd, WAL_HEADER_SIZE, 0)
            try:
                hdr = parse_wal_header(header)
                if hdr.page_size != page_size:
                    raise CorruptFrameError("page size %d, database has %d" % (hdr.page_size, page_size))
            except CorruptFrameError as e:
                self.logger.info("shadow wal %s unusable (%s): a new generation will start", path, e)
                os.close(fd)
                return self.pos
            size = os.fstat(fd).st_size
            end = None
            if wal_fd >= 0 and trusted is not None and trusted.salt == header[16:24] \
                    and os.pread(wal_fd, WAL_HEADER_SIZE, 0) == header:
                end = self._end_by_comparison(fd, wal_fd, min(size, calc_wal_size(page_size, trusted.max_frame)))
            if end is None:
                end = self._end_by_checksums(fd, hdr)
            s0, s1 = hdr.checksum1, hdr.checksum2
            if end > WAL_HEADER_SIZE:
                fs = page_size + WAL_FRAME_HEADER_SIZE
                s0, s1 = struct.unpack(">II", os.pread(fd, 8, end - fs + 16))
            if size > end:
                self.logger.info("shadow wal %s: cut %d bytes after the last commit frame", path, size - end)
                os.ftruncate(fd, end)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.header, self._hdr = fd, header, hdr
        self._checksum = (s0, s1)
        self.pos = Pos(gen, idx[-1], end)
        return self.pos

    def _end_by_checksums(self, fd: int, hdr: WALHeader) -> int:
        # The end of the last commit frame whose checksum chain holds.
        end = WAL_HEADER_SIZE
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        for off, _, is_commit in iter_wal_frames(fd, WAL_HEADER_SIZE, hdr, hdr.checksum1, hdr.checksum2):
            if is_commit:
                end = off + fs
        return end

    def _end_by_comparison(self, fd: int, wal_fd: int, limit: int) -> int:
        # The end of the last commit frame in the longest prefix the shadow
        # shares with the real WAL, within what SQLite says is committed.
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        step = max(1, SHADOW_WRITE_CHUNK // fs) * fs
        off = end = WAL_HEADER_SIZE
        while off + fs <= limit:
            n = min(step, (limit - off) // fs * fs)
            a, b = memoryview(os.pread(fd, n, off)), memoryview(os.pread(wal_fd, n, off))
            frames = min(len(a), len(b)) // fs
            for i in range(frames):
                fa = a[i * fs:(i + 1) * fs]
                if fa != b[i * fs:(i + 1) * fs]:
                    return end
                if fa[4:8] != b"\0\0\0\0":
                    end = off + (i + 1) * fs
            if frames * fs < n:
                break
            off += n
        return end

    def new_generation(self) -> str:
        """Create a new generation's directory and return its name (not yet current)."""
        gen = new_generation_name()
        os.makedirs(self.dir(gen), mode=0o700, exist_ok=True)
        return gen

    def set_current(self, generation: str) -> None:
        """Make generation the one the meta directory names, durably."""
        atomic_write(self.generation_name_path(), (generation + "\n").encode())

    def start_index(self, generation: str, index: int, header: bytes) -> None:
        """Start index with the real WAL's header; pos moves to just after it."""
        hdr = parse_wal_header(header)  # A bad header checksum is an error, as in Go.
        if hdr.page_size != self.page_size:
            raise LitestreamError("wal page size %d does not match db page size %d"
                                  % (hdr.page_size, self.page_size))
        if self._fd >= 0 and self.pos.generation == generation and index == self.pos.index + 1:
            # The finished index is read by its size from now on: nothing
            # past pos may remain in it.
            os.ftruncate(self._fd, self.pos.offset)
            os.fsync(self._fd)
        path = self.path(generation, index)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pwrite_all(fd, header, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        fsync_dir(os.path.dirname(path))
        self.close()
        self._fd, self.header, self._hdr = fd, bytes(header), hdr
        self._checksum = (hdr.checksum1, hdr.checksum2)
        self.pos = Pos(generation, index, WAL_HEADER_SIZE)

    def last_frame(self) -> bytes:
        """Return the last frame before pos ("" at the header)."""
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        if self.pos.offset <= WAL_HEADER_SIZE:
            return b""
        return os.pread(self._fd, fs, self.pos.offset - fs)

    # Copying -----------------------------------------------------------------

    def copy(self, wal_fd: int, end: int, max_bytes: int = 0,
             trusted: Optional[WALIndexHeader] = None) -> CopyResult:
        """Append the real WAL's committed frames in [pos.offset, end) to the current index.

        Only whole transactions are kept: copying stops at the first frame
        of another salt or with a broken checksum chain, and the shadow
        file is cut after the last commit frame written.  With max_bytes,
        stop after the first commit at or past that many bytes.  With a
        trusted wal-index header of this index's salts, the frames up to
        its mxFrame are copied without checksumming (see above).  Write
        errors do not raise: the result carries the error and the whole
        transactions that were written before it.
        """
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        start = self.pos.offset
        if trusted is not None and trusted.salt == self.header[16:24] and trusted.page_size == self.page_size:
            trusted_end = calc_wal_size(self.page_size, trusted.max_frame)
            if trusted_end == start:
                return CopyResult()  # nothing committed since the last copy
            if start < trusted_end:
                # Frames below mxFrame are committed and final whatever the
                # bound: a writer that is still committing moves mxFrame past
                # end, and the copy stops at end's last commit frame.
                res = self._copy_trusted(wal_fd, min(trusted_end, end), trusted_end, trusted, max_bytes)
                if res is not None:
                    return res
        written = start  # [start, written) of the file now holds frames of this step
        kept = start     # ... of which [start, kept) ends at a commit frame
        kept_sum = self._checksum
        commit_end, commit_sum = start, self._checksum
        buf = bytearray()
        try:
            for off, frame, is_commit in iter_wal_frames(wal_fd, start, self._hdr, *self._checksum, end=end):
                buf += frame
                if is_commit:
                    commit_end, commit_sum = off + fs, struct.unpack(">II", frame[16:24])
                    if max_bytes and commit_end - start >= max_bytes:
                        break
                if len(buf) >= SHADOW_WRITE_CHUNK:
                    pwrite_all(self._fd, buf, written)
                    written += len(buf)
                    buf.clear()
                    kept, kept_sum = commit_end, commit_sum
            if commit_end > written:
                pwrite_all(self._fd, memoryview(buf)[:commit_end - written], written)
                written = commit_end
            kept, kept_sum = commit_end, commit_sum
            err = None
        except OSError as e:
            err = e
        return self._finish(start, written, kept, kept_sum, err)

    def _copy_trusted(self, wal_fd: int, end: int, trusted_end: int, trusted: WALIndexHeader,
                      max_bytes: int) -> Optional[CopyResult]:
        # Copy [pos.offset, end) as it is (end <= trusted_end, the end of
        # mxFrame), finding commit frames by their header; None means "not
        # trusted after all": use the checked copy.
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        start = self.pos.offset
        written = kept = start
        kept_sum = self._checksum
        step = max(1, SHADOW_WRITE_CHUNK // fs) * fs
        salt = self.header[16:24]
        err = None
        try:
            while written < end:
                data = os.pread(wal_fd, min(step, end - written), written)
                n = len(data) // fs
                if n == 0:
                    break
                mv = memoryview(data)[:n * fs]
                last_commit = -1
                stop = False
                for i in range(n):
                    if mv[i * fs + 8:i * fs + 16] != salt:
                        self._cut(start)  # not this cycle's frame: never copied
                        return None
                    if mv[i * fs + 4:i * fs + 8] != b"\0\0\0\0":
                        last_commit = i
                        if max_bytes and written + (i + 1) * fs - start >= max_bytes:
                            stop = True
                            break
                chunk_start = written
                if last_commit < 0:
                    pwrite_all(self._fd, mv, written)
                    written += n * fs
                    continue
                upto = (last_commit + 1) * fs if stop else n * fs
                pwrite_all(self._fd, mv[:upto], written)
                written = chunk_start + upto
                kept = chunk_start + (last_commit + 1) * fs
                fh = mv[last_commit * fs:last_commit * fs + WAL_FRAME_HEADER_SIZE]
                kept_sum = struct.unpack(">II", fh[16:24])
                if stop:
                    break
        except OSError as e:
            err = e
        if kept > start:
            # Trust only what is provably this cycle's committed frames: the
            # WAL did not restart while we read (its header is unchanged),
            # and the last frame is what the wal-index says it is.
            last = os.pread(wal_fd, WAL_FRAME_HEADER_SIZE, kept - fs)
            ok = os.pread(wal_fd, WAL_HEADER_SIZE, 0) == self.header and last[8:16] == self.header[16:24]
            if ok and kept == trusted_end:
                ok = struct.unpack(">II", last[16:24]) == trusted.frame_checksum
            if not ok:
                self._cut(start)
                return None if err is None else CopyResult(0, err)
        return self._finish(start, written, kept, kept_sum, err)

    def _finish(self, start: int, written: int, kept: int, kept_sum, err: Optional[OSError]) -> CopyResult:
        # Cut what is past the last whole transaction, make the rest durable, then move pos.
        try:
            if written > kept or err is not None:
                os.ftruncate(self._fd, kept)  # never beyond what was written: kept <= written
            if kept > start:
                os.fsync(self._fd)
        except OSError as e:
            self._cut(start)
            return CopyResult(0, err or e)
        if kept > start:
            self.pos = Pos(self.pos.generation, self.pos.index, kept)
            self._checksum = tuple(kept_sum)
        return CopyResult(kept - start, err)

    def _cut(self, offset: int) -> None:
        # Best effort: bytes past pos are never read, and the next step overwrites them.
        try:
            os.ftruncate(self._fd, offset)
        except OSError:
            pass

    # Reading -----------------------------------------------------------------

    def range(self, pos: Pos) -> "Optional[tuple[Pos, int]]":
        """Return (start, end) of the shadow bytes a replica at pos has not sent.

        Moves to the next index when pos is at the end of a finished one;
        returns None when there is nothing new.
        """
        cur = self.pos
        if pos.generation != cur.generation:
            raise LitestreamError("generation changed: replica at %s, db at %s" % (pos, cur))
        while True:
            if pos.index == cur.index:
                end = cur.offset
            else:
                try:
                    end = frame_align(os.path.getsize(self.path(pos.generation, pos.index)), self.page_size)
                except FileNotFoundError:
                    raise LitestreamError("shadow wal missing for %s" % pos) from None
            if pos.offset > end:
                raise LitestreamError("wal reader offset too high: %s > %d" % (pos, end))
            if pos.offset < end:
                return pos, end
            if pos.index >= cur.index:
                return None
            pos = Pos(pos.generation, pos.index + 1, 0)

    def read_chunks(self, pos: Pos, end: int, chunk: int = 1 << 20):
        """Yield the shadow bytes [pos.offset, end) of pos.index."""
        with open(self.path(pos.generation, pos.index), "rb") as f:
            try:
                yield from pread_chunks(f.fileno(), pos.offset, end, chunk)
            except LitestreamError:
                raise LitestreamError("shadow wal shrank while reading %s" % pos) from None

    # Cleanup -----------------------------------------------------------------

    def remove_below(self, index: int) -> None:
        """Delete the current generation's files of indexes below index."""
        gen = self.pos.generation
        for i in self.indexes(gen) if gen else ():
            if i < index:
                remove_quietly(self.path(gen, i))

    def remove_other_generations(self) -> None:
        """Delete every generation directory but the current one."""
        gen = self.current_generation()
        d = os.path.join(self.meta_path, "generations")
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return
        for n in names:
            if n != gen:
                shutil.rmtree(os.path.join(d, n), ignore_errors=True)

    def remove_generation(self) -> None:
        """Forget the current generation and delete its files."""
        gen = self.pos.generation or self.current_generation()
        self.close()
        remove_quietly(self.generation_name_path())
        if gen:
            shutil.rmtree(os.path.join(self.meta_path, "generations", gen), ignore_errors=True)
        self.pos = Pos()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _CommitLog:
    """When each stretch of the shadow WAL was committed: the basis of every replica's lag.

    An entry (pos, t) says the shadow WAL up to pos holds transactions
    committed no earlier than t.  t is the last time the database was seen
    without them (the previous sync's look at the WAL), so a lag computed
    from it is never understated, and overstated by at most one monitor
    interval.  Entries every replica holds are pruned; past MAX_ENTRIES,
    neighbours merge keeping the earlier time, so memory stays bounded
    while ages still never read low.
    """

    MAX_ENTRIES = 4096

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: "collections.deque[Tuple[Pos, float]]" = collections.deque()

    def add(self, pos: Pos, t: float) -> None:
        """Record that the shadow WAL now reaches pos with transactions from t on."""
        with self._lock:
            e = self._entries
            if e and e[-1][0].generation != pos.generation:
                # A new generation holds everything the old one had: what
                # was pending stays pending from its own time.
                t = min(t, e[0][1])
                e.clear()
            e.append((pos, t))
            if len(e) > self.MAX_ENTRIES:
                old = list(e)
                e.clear()
                for i in range(0, len(old) - 1, 2):
                    e.append((old[i + 1][0], old[i][1]))
                if len(old) % 2:
                    e.append(old[-1])

    def prune(self, positions: Sequence[Pos]) -> None:
        """Drop the entries every one of positions holds."""
        with self._lock:
            e = self._entries
            while e and all(_holds(p, e[0][0]) for p in positions):
                e.popleft()

    def oldest_pending(self, pos: Pos) -> Optional[float]:
        """Return the time of the oldest transaction pos does not hold, or None."""
        with self._lock:
            for p, t in self._entries:
                if not _holds(pos, p):
                    return t
        return None


def _holds(have: Pos, want: Pos) -> bool:
    """Whether a replica at have holds the shadow WAL up to want."""
    return have.generation == want.generation and (have.index, have.offset) >= (want.index, want.offset)


class _DBLock:
    """One replicator per database: an exclusive flock on "<meta>/lock" for the replicator's life.

    flock locks are separate from SQLite's fcntl locks (and on another
    file), so they never block the application, restore or listings.  The
    holder's PID is written into the file for the error a second replicator
    gets; restore and the listing commands never take the lock.
    """

    def __init__(self, meta_path: str, db_path: str):
        self.path = os.path.join(meta_path, "lock")
        os.makedirs(meta_path, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LitestreamError("%s: cannot lock %s: %s" % (db_path, self.path, e.strerror)) from None
            raise LitestreamError("%s: already replicated by another litestream (pid %s, lock %s)"
                                  % (db_path, pid or "unknown", self.path)) from None
        try:
            os.ftruncate(fd, 0)
            pwrite_all(fd, ("%d\n" % os.getpid()).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise LitestreamError("%s: cannot write %s: %s" % (db_path, self.path, e.strerror)) from None
        self._fd = fd

    @staticmethod
    def holder(meta_path: str) -> int:
        """Return the PID of the replicator holding a meta directory's lock, or 0."""
        path = os.path.join(meta_path, "lock")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return 0
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


_OPEN_DBS: "weakref.WeakSet[DB]" = weakref.WeakSet()


def _forget_dbs_after_fork() -> None:
    # A forked child inherits our SQLite connections and descriptors but
    # none of our threads or POSIX locks.  If it closed those connections
    # (at exit, say) SQLite would think it the last user: checkpoint, then
    # delete the parent's -wal and -shm.  So the child never closes them,
    # and drops its copies of our descriptors (the replicator lock stays
    # with the parent).
    for db in list(_OPEN_DBS):
        db._forked()
        log.error("%s: forked while replicating it: SQLite connections this process opens to it now do not "
                  "lock it correctly (SQLite forbids carrying connections across fork()); run the replicator "
                  "in a separate process", db.name)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_dbs_after_fork)


class DB:
    """A SQLite database being replicated: the shadow WAL, checkpoints and the sync loop.

    Tunables (as Go's DB fields):
      monitor_interval       seconds between syncs; 0 runs no background work.
      checkpoint_interval    PASSIVE checkpoint once the DB file is this old.
      min_checkpoint_page_n  PASSIVE checkpoint at this many WAL pages.
      max_checkpoint_page_n  RESTART checkpoint at this many pages; 0 = never.
      truncate_page_n        TRUNCATE checkpoint at this many pages; 0 = never.
      scheduler, replica_scheduler  the Scheduler running this DB's syncs and
        its replicas' uploads (shared by a Replicator); a DB makes its own
        when none is given.

    Lifecycle: open() takes the database's replicator lock, initialises it
    if the file exists (else waits for it) and starts the background sync,
    which starts the replicas when the database is first initialised (as
    Go's does).  sync() runs one step by hand.  close() runs the final sync
    of the DB and of every replica and releases everything; a DB is also a
    context manager doing both.
    """

    def __init__(self, path: str, *, name: str = "", meta_path: str = "",
                 monitor_interval: float = DEFAULT_MONITOR_INTERVAL,
                 checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
                 min_checkpoint_page_n: int = DEFAULT_MIN_CHECKPOINT_PAGE_N,
                 max_checkpoint_page_n: int = DEFAULT_MAX_CHECKPOINT_PAGE_N,
                 truncate_page_n: int = DEFAULT_TRUNCATE_PAGE_N,
                 scheduler: Optional[Scheduler] = None,
                 replica_scheduler: Optional[Scheduler] = None,
                 clock=time.time):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.name = name or self.path
        d, base = os.path.split(self.path)
        self.meta_path = meta_path or os.path.join(d, "." + base + META_DIR_SUFFIX)
        self.monitor_interval = monitor_interval
        self.checkpoint_interval = checkpoint_interval
        self.min_checkpoint_page_n = min_checkpoint_page_n
        self.max_checkpoint_page_n = max_checkpoint_page_n
        self.truncate_page_n = truncate_page_n
        self.scheduler = scheduler
        self.replica_scheduler = replica_scheduler
        self.clock = clock
        self.replicas: List[Replica] = []
        self.page_size = 0
        self.logger = _LogAdapter(log, {"db": self.path})
        self.shadow = ShadowWAL(self.meta_path, self.logger)

        self._lock = threading.RLock()       # Go's db.mu: one sync at a time.
        self._chk_lock = threading.Lock()    # Go's chkMu: snapshots hold off checkpoints.
        self._notify = threading.Event()
        self._conn: Optional[sqlite3.Connection] = None    # writes and checkpoints
        self._rconn: Optional[sqlite3.Connection] = None   # the long-running read tx
        self._db_file = None     # kept open for the process's life: see _init
        self._wal_fd = -1        # the WAL of the database we opened, read through this fd
        self._shm_fd = -1        # its wal-index, when there is one
        self._db_lock: Optional[_DBLock] = None
        self._task: Optional[Task] = None
        self._own_schedulers: List[Scheduler] = []
        self._background = False
        self._opened = False
        self._stopping = False   # close() has begun
        self._closed = False     # close() is done, or this is a forked child's copy
        self._replicas_started = False
        self._new_generation_reason = ""   # set when the next sync must start a generation
        self._no_ckpt_on_close = False     # closing our connections leaves the WAL alone (3.12+)
        self._enospc = 0                   # syncs in a row that could not copy anything: disk full
        self._enospc_replica_pos: Dict[str, Pos] = {}
        self._enospc_since = 0.0
        self._pins = 0                     # read transactions pin_read() holds open (restore drills)
        self._commits = _CommitLog()       # when the shadow WAL's data was committed: replicas' lag
        self._clean_at = 0.0               # clock() when the WAL was last seen fully copied
        self.sync_error = ""               # the last sync's error, "" when it succeeded
        self._last_monitor = 0.0           # monotonic end of the last background sync
        self._series = None

    def __repr__(self) -> str:
        return "DB(%r)" % self.path

    # Paths -------------------------------------------------------------------

    @property
    def wal_path(self) -> str:
        return self.path + "-wal"

    @property
    def shm_path(self) -> str:
        return self.path + "-shm"

    def generation_name_path(self) -> str:
        return self.shadow.generation_name_path()

    def shadow_wal_dir(self, generation: str) -> str:
        return self.shadow.dir(generation)

    def shadow_wal_path(self, generation: str, index: int) -> str:
        return self.shadow.path(generation, index)

    def current_generation(self) -> str:
        """Return the current generation from the meta dir, or ""."""
        return self.shadow.current_generation()

    # Lifecycle ---------------------------------------------------------------

    def open(self, background: Optional[bool] = None) -> "DB":
        """Lock the database for this replicator, initialise it if it exists, and start syncing.

        background (default: monitor_interval > 0) runs the sync loop and,
        once the database is initialised, the replicas' loops.  Raises
        LitestreamError if another replicator holds the database, or if the
        file exists but cannot be replicated (not SQLite, stuck in rollback
        mode); nothing is left locked then.
        """
        if self._opened:
            raise LitestreamError("%s: already open" % self.path)
        self._db_lock = _DBLock(self.meta_path, self.path)
        self._opened = True
        _OPEN_DBS.add(self)
        register_db_metrics(self.path)
        for r in self.replicas:
            r.register_metrics()
        self._clean_at = self.clock()
        self._background = self.monitor_interval > 0 if background is None else background
        self._last_monitor = time.monotonic()
        try:
            if self._background:
                if self.scheduler is None:
                    self.scheduler = Scheduler("sync", 1, short_tasks=True)
                    self._own_schedulers.append(self.scheduler)
                if self.replica_scheduler is None:
                    # A restore drill holds a worker for minutes: one more each.
                    self.replica_scheduler = Scheduler("replica", max(2, len(self.replicas)) + sum(
                        1 for r in self.replicas if r.validation_interval > 0))
                    self._own_schedulers.append(self.replica_scheduler)
            # A database that exists must be usable now: a file that is not
            # SQLite fails at start instead of logging an error every second.
            if os.path.exists(self.path):
                self.sync()
        except BaseException:
            with self._lock:
                self._close_sqlite()
                self.shadow.close()
            self._release()
            raise
        if self._background:
            self._task = self.scheduler.task(self._monitor_step, "sync:%s" % self.name)
            # Spread many databases over the interval instead of waking them together.
            self._task.schedule(random.uniform(0, self.monitor_interval) if self.monitor_interval > 0 else 0)
        return self

    def __enter__(self) -> "DB":
        if not self._opened:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: Optional[float] = None, *, deadline: Optional[_Deadline] = None) -> None:
        """Stop syncing, run the final sync of the DB and then of every replica, release everything.

        With timeout (or a shared deadline), replicas still uploading when
        it passes are abandoned and reported.  Closing always finishes; the
        first error is raised afterwards.  A closed DB cannot sync again.
        """
        if self._stopping:
            return
        self._stopping = True
        dl = deadline or _Deadline(timeout)
        first: Optional[BaseException] = None
        if self._task is not None:
            self._task.cancel()
            self._task.wait_idle(dl.remaining())
        for r in self.replicas:
            r.stop()
        for r in self.replicas:
            r.wait_validation(dl.remaining())  # a drill gives up at its next step
        try:
            if self._lock.acquire(timeout=-1 if dl.remaining() is None else dl.remaining()):
                try:
                    if self._conn is not None or (self._opened and os.path.exists(self.path)):
                        self.sync()
                finally:
                    self._lock.release()
            else:
                raise LitestreamError("%s: final sync: timed out waiting for a sync in progress" % self.name)
        except Exception as e:  # Keep closing; report the first error.
            first = e
            self.logger.error("%s: final sync: %s", self.name, e)
        if self._conn is not None:
            e = self._final_replica_syncs(dl)
            first = first or e
            with self._lock:
                self._write_shutdown_record(dl)
        for r in self.replicas:
            r.client.close()
        # A snapshot still reading through our descriptor (its replica ran
        # out of time) must not read another file that reuses the number.
        r = dl.remaining()
        snapshot_done = self._chk_lock.acquire(timeout=-1 if r is None else max(r, 0.5))
        with self._lock:
            if not snapshot_done and self._db_file is not None:
                _keep_forever(self._db_file)
                self._db_file = None
            self._close_sqlite()
            self.shadow.close()
        if snapshot_done:
            self._chk_lock.release()
        self._closed = True
        self._release()
        unregister_db_metrics(self.path, [r.name for r in self.replicas])
        if first is not None:
            raise first

    def _final_replica_syncs(self, dl: _Deadline) -> Optional[BaseException]:
        # Each replica uploads on its own thread so one slow store cannot
        # use up the others' time; a replica still busy at the deadline is
        # aborted and reported with what it is missing.
        errors: Dict[str, BaseException] = {}

        def run(r):
            try:
                r.final_sync(dl)
            except BaseException as e:
                errors[r.name] = e

        threads = [threading.Thread(target=run, args=(r,), daemon=True,
                                    name="litestream-final:%s:%s" % (self.name, r.name)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            dl.join(t)
        late = [(r, t) for r, t in zip(self.replicas, threads) if t.is_alive()]
        for r, _ in late:
            r.client.abort()
        _join_all([t for _, t in late], 2.0)  # one grace period for all, to notice the abort
        first = None
        for r, t in zip(self.replicas, threads):
            if t.is_alive():
                errors.setdefault(r.name, LitestreamError(
                    "%s(%s): final sync did not finish in time" % (self.name, r.name)))
            e = errors.get(r.name)
            if e is not None:
                r.logger.error("%s(%s): not replicated: replica at %s, db at %s (%s): %s",
                               self.name, r.name, r.pos or "nothing", self.pos(), r.behind(), e)
                first = first or e
        return first

    def _forked(self) -> None:
        """Make this copy of the DB, in a forked child, inert (see _forget_dbs_after_fork)."""
        self._closed = self._stopping = True
        for c in (self._rconn, self._conn):
            if c is not None:
                _keep_forever(c)
        self._rconn = self._conn = None
        fds = [self._wal_fd, self._shm_fd, self.shadow._fd]
        if self._db_file is not None:
            fds.append(self._db_file.fileno())
            _keep_forever(self._db_file)  # its fd is closed below; never again through the object
            self._db_file = None
        if self._db_lock is not None:
            fds.append(self._db_lock._fd)
            self._db_lock._fd = -1
            self._db_lock = None
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wal_fd = self._shm_fd = self.shadow._fd = -1
        self._own_schedulers = []

    def _release(self) -> None:
        _OPEN_DBS.discard(self)
        for s in self._own_schedulers:
            s.close()
        self._own_schedulers = []
        if self._db_lock is not None:
            self._db_lock.release()
            self._db_lock = None

    def _close_sqlite(self) -> None:
        for c in (self._rconn, self._conn):
            if c is not None:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
        self._rconn = self._conn = None
        for fd in (self._wal_fd, self._shm_fd):
            if fd >= 0:
                os.close(fd)
        self._wal_fd = self._shm_fd = -1
        # Closing our fd of the DB file last: POSIX drops every lock this
        # process holds on the file when any of its fds closes, and our
        # SQLite connections to it are closed (or, for a replaced file, kept
        # for good: their locks on the old file no longer matter).
        if self._db_file is not None:
            self._db_file.close()
            self._db_file = None

    def _drop_stale_sqlite(self) -> None:
        """Let go of a database file that was replaced or removed under us, without touching the new one."""
        if not self._no_ckpt_on_close:
            # Before Python 3.12 the last connection to close checkpoints and
            # then deletes "<path>-wal" and "<path>-shm" by name: by now those
            # may be the new database's, which the application is using.  So
            # the old connections are never closed (their reference is kept
            # for good); the OS releases them when the process exits.
            for c in (self._rconn, self._conn):
                if c is not None:
                    _keep_forever(c)
            self._rconn = self._conn = None
        self._close_sqlite()

    def _monitor_step(self) -> Optional[float]:
        t0 = time.monotonic()
        try:
            self.sync()
        except Exception as e:
            self.logger.error("%s: sync error: %s", self.name, e)
        self._last_monitor = time.monotonic()
        return max(0.0, self.monitor_interval - (self._last_monitor - t0))

    def notify(self) -> threading.Event:
        """Return the event that is set the next time the shadow WAL changes."""
        return self._notify

    def _broadcast(self) -> None:
        self._notify.set()
        self._notify = threading.Event()
        for r in self.replicas:
            r.wake()

    def pos(self) -> Pos:
        """Return the shadow WAL position: (generation, index, committed size)."""
        return self.shadow.pos

    # Lag ---------------------------------------------------------------------

    def lag(self, pos: Pos) -> float:
        """Return the age in seconds of the oldest transaction a replica at pos lacks (0 when none)."""
        t = self._commits.oldest_pending(pos)
        if self.sync_error and not self._closed:
            # The WAL may hold commits the shadow WAL could not take.
            t = self._clean_at if t is None else min(t, self._clean_at)
        return 0.0 if t is None else max(0.0, self.clock() - t)

    def pending_bytes(self, pos: Pos) -> int:
        """Return the bytes of the shadow WAL a replica at pos lacks."""
        dpos = self.shadow.pos
        if not dpos.generation or _holds(pos, dpos):
            return 0
        if pos.generation != dpos.generation:
            return self.shadow.size()
        total = 0
        for i in self.shadow.indexes(dpos.generation):
            if i < pos.index or i > dpos.index:
                continue
            try:
                size = dpos.offset if i == dpos.index else os.path.getsize(self.shadow.path(dpos.generation, i))
            except FileNotFoundError:
                continue
            total += max(0, size - (pos.offset if i == pos.index else 0))
        return total

    def replicated(self, positions: Sequence[Pos]) -> None:
        """Forget the commit times of what every replica holds (positions: each replica's)."""
        self._commits.prune(positions)

    # Init --------------------------------------------------------------------

    def _init(self) -> None:
        # Keep one fd of the DB file for the life of the process (format note
        # §12.12): closing any fd of it would drop SQLite's POSIX locks.
        f = open(self.path, "rb")
        try:
            head = os.pread(f.fileno(), 100, 0)
            if head and not head.startswith(b"SQLite format 3\0"):
                raise LitestreamError("%s: not a SQLite database" % self.path)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            self._conn = conn
            self._db_file = f
            self._no_ckpt_on_close = _keep_wal_on_close(conn)
            try:
                mode = conn.execute("PRAGMA journal_mode = wal").fetchone()[0]
            except sqlite3.OperationalError as e:
                raise LitestreamError("%s: cannot switch to WAL mode: %s (another process holds it "
                                      "open in rollback mode?)" % (self.path, e)) from e
            if str(mode).lower() != "wal":
                raise LitestreamError(
                    "%s: cannot switch to WAL mode (journal_mode is %s; is another "
                    "process holding the database open in rollback mode?)" % (self.path, mode))
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("CREATE TABLE IF NOT EXISTS _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER)")
            conn.execute("CREATE TABLE IF NOT EXISTS _litestream_lock (id INTEGER)")
            self.page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            rconn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                    check_same_thread=False)
            self._rconn = rconn
            self._no_ckpt_on_close = _keep_wal_on_close(rconn) and self._no_ckpt_on_close
            rconn.execute("PRAGMA wal_autocheckpoint = 0")
            self._acquire_read_lock()
            self._ensure_wal_exists()
            # The WAL and wal-index of the database we opened: while our
            # connections are open SQLite keeps them, and reading through
            # our own fds keeps a database renamed over ours from mixing in.
            self._wal_fd = os.open(self.wal_path, os.O_RDONLY)
            try:
                self._shm_fd = os.open(self.shm_path, os.O_RDONLY)
            except OSError:
                self._shm_fd = -1
        except sqlite3.DatabaseError as e:
            self._close_sqlite_after_failed_init(f)
            raise LitestreamError("%s: %s" % (self.path, e)) from e
        except BaseException:
            self._close_sqlite_after_failed_init(f)
            raise
        try:
            os.makedirs(self.meta_path, mode=0o700, exist_ok=True)
            record = self._take_shutdown_record()
            self.shadow.open(self.page_size, self._wal_fd, self._wal_index_header())
            # If the real WAL no longer continues the last shadow WAL, the
            # position is unknown unless our clean-shutdown record proves the
            # database file is still exactly what the shadow WAL describes;
            # otherwise clear the generation so sync starts a new one.
            gen = self.shadow.pos.generation
            if gen and not self._new_generation_reason and not self._headers_match():
                why = self._resume_after_shutdown(gen, record)
                if why:
                    self.logger.info("%s: init: cannot determine last wal position, clearing generation (%s)",
                                     self.name, why)
                    self.shadow.remove_generation()
            self.shadow.remove_other_generations()
        except BaseException:
            # Half initialised is not initialised: the next sync starts over.
            self._close_sqlite()
            self.shadow.close()
            raise
        self.logger.info("%s: initialized db path=%s", self.name, self.path)
        if self._background and not self._replicas_started:
            self._replicas_started = True
            for r in self.replicas:
                r.start()

    # Clean-shutdown record ----------------------------------------------------
    #
    # When our connection is the last to close, SQLite checkpoints the WAL
    # into the database and deletes it, so a restart cannot match the WAL
    # against the shadow WAL (Go avoids this with SQLITE_FCNTL_PERSIST_WAL,
    # which Python's sqlite3 cannot set).  At a clean shutdown we therefore
    # take the write lock, copy every committed frame, and checkpoint; if
    # that backfilled the whole WAL, the database file is now exactly the
    # state S that replaying the shadow WAL produces, and nothing can change
    # it while we hold the lock.  We record S's SHA-256 with the shadow
    # position.  At restart, if the WAL no longer matches, we continue the
    # generation only if the file still hashes to S: then the new WAL (if
    # any) holds frames written on top of S, so replaying it as the next
    # index gives the live database.  Any other change (a TRUNCATE or
    # RESTART checkpoint of later writes, VACUUM, a replaced file, or a
    # commit that slipped in before our last close) changes the file and
    # starts a new generation.

    def shutdown_record_path(self) -> str:
        return os.path.join(self.meta_path, "shutdown")

    def _hash_db_file(self) -> str:
        h = hashlib.sha256()
        for b in pread_chunks(self._db_file.fileno()):
            h.update(b)
        return h.hexdigest()

    def _write_shutdown_record(self, dl: Optional[_Deadline] = None) -> None:
        """Record the database's state at a clean shutdown (see above).

        The hash of a large file is taken with the write lock released, so
        the application is not held up: the wal-index's change counter,
        frame count and backfill mark, unchanged when the lock is taken
        again, prove that nothing committed (and so nothing could be
        checkpointed into the file) meanwhile.
        """
        if self._conn is None or not self.shadow.pos.generation:
            return
        if dl is not None and dl.expired():
            self.logger.info("%s: shutdown: no time left for a shutdown record", self.name)
            return
        try:
            with self._locked_backfill(False, reacquire=False) as (n_log, n_ckpt):
                if n_log != n_ckpt:
                    self.logger.info("%s: shutdown: other readers hold the wal; no shutdown record", self.name)
                    return
                mark = self._wal_index_mark()
                size = os.fstat(self._db_file.fileno()).st_size
                if mark is None or size <= SHUTDOWN_HASH_UNDER_LOCK:
                    self._record(size, self._hash_db_file())
                    return
            digest = self._hash_db_file()
            self._begin_write()
            try:
                if self._wal_index_mark() != mark or os.fstat(self._db_file.fileno()).st_size != size:
                    self.logger.info("%s: shutdown: the database changed while it was hashed; "
                                     "no shutdown record", self.name)
                    return
                self._record(size, digest)
            finally:
                self._conn.execute("ROLLBACK")
        except (_WriteLockBusy, _ShadowWriteError) as e:
            self.logger.info("%s: shutdown: no shutdown record: %s", self.name, e)

    def _wal_index_mark(self):
        """Return what changes in the wal-index whenever anything commits or is checkpointed, or None."""
        h = self._wal_index_header()
        if h is None:
            return None
        return h.change, h.max_frame, h.salt, os.pread(self._shm_fd, 4, 96)

    def _record(self, size: int, digest: str) -> None:
        pos = self.shadow.pos
        rec = {"generation": pos.generation, "index": pos.index, "offset": pos.offset,
               "wal_header": self.shadow.header.hex(), "db_size": size, "db_sha256": digest}
        atomic_write(self.shutdown_record_path(), json.dumps(rec).encode())

    def _take_shutdown_record(self) -> Optional[dict]:
        """Read and remove the shutdown record; it is good for one start only."""
        path = self.shutdown_record_path()
        try:
            with open(path) as f:
                rec = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            rec = None
        remove_quietly(path)
        return rec if isinstance(rec, dict) else None

    def _resume_after_shutdown(self, gen: str, rec: Optional[dict]) -> str:
        """Continue gen at the next index if rec proves the file unchanged.

        Returns "" when resumed, else why not.
        """
        if rec is None:
            return "no clean-shutdown record"
        pos = self.shadow.pos
        if rec.get("generation") != gen or rec.get("index") != pos.index:
            return "shutdown record is for another position"
        if pos.offset != rec.get("offset") or self.shadow.header.hex() != rec.get("wal_header"):
            return "shadow wal changed since shutdown"
        if (os.fstat(self._db_file.fileno()).st_size != rec.get("db_size")
                or self._hash_db_file() != rec.get("db_sha256")):
            return "database file changed while litestream was stopped"
        self._start_index(gen, pos.index + 1)
        self.logger.info("%s: init: database unchanged since clean shutdown, continuing generation %s "
                         "at index %08x", self.name, gen, pos.index + 1)
        return ""

    def _close_sqlite_after_failed_init(self, f) -> None:
        if self._db_file is None:
            self._db_file = f
        self._close_sqlite()

    def _acquire_read_lock(self) -> None:
        if not self._rconn.in_transaction:
            self._rconn.execute("BEGIN")
            try:
                # BEGIN is deferred: the read lock is only taken by a read.
                self._rconn.execute("SELECT COUNT(1) FROM _litestream_seq").fetchone()
            except BaseException:
                self._rconn.execute("ROLLBACK")
                raise

    def _release_read_lock(self) -> None:
        if self._rconn.in_transaction:
            self._rconn.execute("ROLLBACK")

    def _ensure_wal_exists(self) -> None:
        try:
            if os.path.getsize(self.wal_path) >= WAL_HEADER_SIZE:
                return
        except FileNotFoundError:
            pass
        self._conn.execute(_SEQ_UPSERT)

    def _headers_match(self) -> bool:
        return os.pread(self._wal_fd, WAL_HEADER_SIZE, 0) == self.shadow.header

    def _replaced(self) -> str:
        """Return why the files at our paths are no longer the ones we opened, or ""."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "database file removed"
        fst = os.fstat(self._db_file.fileno())
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            return "database file replaced"
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            return "wal file removed"
        fst = os.fstat(self._wal_fd)
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            return "wal file replaced"
        return ""

    # Sync --------------------------------------------------------------------

    def sync(self) -> SyncResult:
        """Copy new committed WAL frames to the shadow WAL and checkpoint if due.

        Does nothing while the database file does not exist (the result's
        exists is False).  Wakes the replicas when the shadow WAL changed,
        and raises LitestreamError when the shadow WAL could not be written
        (after waking them for what was written).
        """
        if self._closed:
            raise LitestreamError("%s: the database is closed" % self.name)
        with self._lock:
            m = self._metrics()
            t0 = time.monotonic()
            before = self.shadow.pos
            try:
                res = self._sync()
            except BaseException as e:
                self.sync_error = str(e) or type(e).__name__
                m.sync_count.inc()
                m.sync_errors.inc()
                m.sync_seconds.inc(time.monotonic() - t0)
                raise
            self.sync_error = ""
            if res.exists:
                # Counted as Go counts: every sync of a database that exists.
                m.sync_count.inc()
                m.sync_seconds.inc(time.monotonic() - t0)
                if self._db_file is not None:
                    m.db_size.set(os.fstat(self._db_file.fileno()).st_size)
                    m.wal_size.set(os.fstat(self._wal_fd).st_size)
                if res.pos != before:
                    m.shadow_wal_index.set(res.pos.index)
                    m.shadow_wal_size.set(self.shadow.size())
            return res

    def _metrics(self) -> "_DBSeries":
        if self._series is None:
            self._series = _DBSeries(self.path)
        return self._series

    def _sync(self) -> SyncResult:
        with self._lock:
            if self._conn is not None:
                why = self._replaced()
                if why:
                    # A database renamed over ours (or removed): never mix
                    # its WAL with our file.  Start again from the new file,
                    # once no snapshot reads the old one through our
                    # descriptor (until then, nothing new can reach the old
                    # file's WAL anyway).
                    if not self._chk_lock.acquire(blocking=False):
                        return SyncResult(True, self.shadow.pos)
                    try:
                        self.logger.warning("%s: %s while replicating: reopening", self.name, why)
                        self._drop_stale_sqlite()
                        self.shadow.close()
                        self._new_generation_reason = why
                    finally:
                        self._chk_lock.release()
            if self._conn is None:
                if not os.path.exists(self.path):
                    return SyncResult(exists=False)
                # What the WAL holds already is counted from now: its
                # commit times are not known.
                self._clean_at = self.clock()
                self._init()
            self._ensure_wal_exists()
            copied, new_gen, mode, changed = 0, "", "", False
            seen = self.clock()  # no later than the look at the WAL below
            try:
                reason, restart, wal_size = self._verify()
                if reason:
                    self._create_generation(reason)
                    new_gen, changed = reason, True
                elif restart:
                    # The real WAL restarted but our last frame was intact:
                    # copy what is left of the old cycle, then start the next
                    # index.  The new cycle overwrites the old from the start,
                    # so this happens under the write lock, after checking
                    # again that it has not reached our last frame.
                    n, reason = self._finish_old_cycle()
                    copied += n
                    if reason:
                        self._create_generation(reason)
                        new_gen = reason
                    changed = True
                else:
                    # Copy in bounded chunks and wake the replicas after each,
                    # so they upload while a large backlog is still being copied.
                    # (One notification per sync otherwise: a second one would
                    # put the replicas a whole interval out of phase.)
                    limit = frame_align(wal_size, self.page_size)
                    while True:
                        n = self._copy_or_raise(limit, SHADOW_COPY_CHUNK)
                        copied += n
                        if n < SHADOW_COPY_CHUNK:
                            break  # caught up with the WAL as it was at the start
                        self._broadcast()
                self._enospc = 0
                db_mtime = os.fstat(self._db_file.fileno()).st_mtime
                mode = self._checkpoint_mode(frame_align(wal_size, self.page_size), self.shadow.pos.offset, db_mtime)
                if mode and not self.checkpoint(mode):
                    mode = ""
            except _ShadowWriteError as e:
                self._shadow_write_failed(e.err, e.copied + copied)
            except _WriteLockBusy as e:
                seen = self._clean_at  # the new cycle is not copied yet
                self.logger.warning("%s: sync: wal restarted; write lock busy, trying again next sync: %s",
                                    self.name, e)
            finally:
                # Wake the replicas for what was copied even if a later step failed.
                if copied or changed or mode:
                    self._broadcast()
                self._clean_wal()
            self._clean_at = seen
            return SyncResult(True, self.shadow.pos, copied, new_gen, mode)

    def _finish_old_cycle(self) -> "tuple[int, str]":
        """Copy the rest of a restarted WAL's old cycle and start the next index.

        Returns (bytes copied, new-generation reason or "").  Raises
        _WriteLockBusy if a writer keeps the lock (try again next sync).
        """
        fs = self.page_size + WAL_FRAME_HEADER_SIZE
        self._begin_write()
        try:
            pos = self.shadow.pos
            if pos.offset > WAL_HEADER_SIZE and \
                    os.pread(self._wal_fd, fs, pos.offset - fs) != self.shadow.last_frame():
                return 0, "wal overwritten by another process"
            n = self._copy_or_raise(None, trusted=False)
            self._start_index(pos.generation, pos.index + 1)
            return n, ""
        finally:
            self._conn.execute("ROLLBACK")

    def _copy_or_raise(self, end: Optional[int], max_bytes: int = 0, trusted: bool = True,
                       since: Optional[float] = None, ours: bool = False) -> int:
        res = self._copy(end, max_bytes, trusted, since, ours)
        if res.error is not None:
            raise _ShadowWriteError(res.error, res.copied)
        return res.copied

    def _copy(self, end: Optional[int], max_bytes: int = 0, trusted: bool = True,
              since: Optional[float] = None, ours: bool = False) -> CopyResult:
        """Copy committed frames up to end (None: the WAL's current size) into the shadow WAL.

        What is copied is recorded for the replicas' lag as committed no
        earlier than since (default: the last look that found the WAL
        fully copied).  With ours, the copy follows our own one-page write
        (checkpoint): a copy of just that frame holds no application
        transaction and adds no lag.
        """
        if end is None:
            end = frame_align(os.fstat(self._wal_fd).st_size, self.page_size)
        hdr = self._wal_index_header() if trusted else None
        res = self.shadow.copy(self._wal_fd, end, max_bytes, hdr)
        if res.copied:
            self._metrics().total_wal_bytes.inc(res.copied)
            if not (ours and res.copied <= self.page_size + WAL_FRAME_HEADER_SIZE):
                self._commits.add(self.shadow.pos, self._clean_at if since is None else since)
        return res

    def _wal_index_header(self) -> Optional[WALIndexHeader]:
        if self._shm_fd < 0:
            return None
        for _ in range(3):  # A header caught mid-update is read again.
            try:
                h = parse_wal_index_header(os.pread(self._shm_fd, SHM_HEADER_SIZE, 0))
            except OSError:
                return None
            if h is not None:
                return h
        return None

    def _shadow_write_failed(self, err: OSError, copied: int) -> None:
        """Report a shadow WAL write error; give up the generation if a full disk will not let it go on."""
        path = self.shadow_wal_path(self.shadow.pos.generation, self.shadow.pos.index) \
            if self.shadow.pos.generation else self.meta_path
        full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        now = time.monotonic()
        if not (full and copied == 0):
            self._enospc, self._enospc_since = 0, now
            raise LitestreamError("%s: cannot write shadow wal %s: %s" % (self.name, path, err)) from err
        positions = {r.name: r.pos for r in self.replicas}
        moving = positions != self._enospc_replica_pos
        if self._enospc == 0:
            self._enospc_since = now
        self._enospc += 1
        self._enospc_replica_pos = positions
        # A full disk that replicas cannot drain (they are stuck, or what
        # they would free is the current index itself) would pin the WAL
        # and grow it until the application's disk fills too: after a few
        # tries (or a minute, however the replicas move), drop the
        # generation (its replica stays a clean, restorable prefix) and let
        # a new one start from a snapshot once space returns.
        gen = self.shadow.pos.generation
        drainable = any(r.pos.generation == gen and r.pos.index < self.shadow.pos.index - 1 for r in self.replicas)
        if gen and self._enospc >= 3 and (not (moving and drainable) or now - self._enospc_since > 60):
            if self._abandon_generation("shadow wal disk full (%s)" % path):
                self._enospc = 0
        raise LitestreamError("%s: cannot write shadow wal %s: %s" % (self.name, path, err)) from err

    def _abandon_generation(self, why: str) -> bool:
        # A snapshot in progress relies on our read lock and on no restart:
        # wait for it to end (a later sync gives up the generation then).
        if not self._chk_lock.acquire(blocking=False):
            return False
        try:
            self._abandon_generation_locked(why)
        finally:
            self._chk_lock.release()
        return True

    def _abandon_generation_locked(self, why: str) -> None:
        pos = self.shadow.pos
        self.logger.warning("%s: sync: giving up generation %s at %s: %s; a new generation will start "
                            "from a snapshot", self.name, pos.generation, pos, why)
        self.shadow.remove_generation()
        self._new_generation_reason = why
        # Nothing in the WAL needs protecting now: let it be checkpointed
        # and truncated, so the new generation starts from a small WAL.
        try:
            with self._locked_backfill(True, reacquire=False, copy=False):
                pass
            self._conn.execute("PRAGMA journal_size_limit = 0")
            try:
                self._conn.execute(_SEQ_UPSERT)
            finally:
                self._conn.execute("PRAGMA journal_size_limit = -1")
        except (LitestreamError, sqlite3.Error) as e:
            self.logger.warning("%s: sync: checkpoint after giving up the generation: %s", self.name, e)
            self._release_read_lock()  # nothing to protect; holding it would pin the WAL

    def _checkpoint_mode(self, orig_wal_size: int, shadow_size: int, db_mtime: float) -> str:
        ps = self.page_size
        # While a drill pins a reader, RESTART and TRUNCATE would wait out
        # the busy timeout for it under the write lock: PASSIVE until it ends.
        if self.truncate_page_n > 0 and orig_wal_size >= calc_wal_size(ps, self.truncate_page_n) \
                and not self._pins:
            return CHECKPOINT_MODE_TRUNCATE
        if self.max_checkpoint_page_n > 0 and shadow_size >= calc_wal_size(ps, self.max_checkpoint_page_n) \
                and not self._pins:
            return CHECKPOINT_MODE_RESTART
        if shadow_size >= calc_wal_size(ps, self.min_checkpoint_page_n):
            return CHECKPOINT_MODE_PASSIVE
        if (self.checkpoint_interval > 0 and db_mtime
                and self.clock() - db_mtime > self.checkpoint_interval
                and shadow_size > calc_wal_size(ps, 1)):
            return CHECKPOINT_MODE_PASSIVE
        return ""

    def _verify(self) -> "tuple[str, bool, int]":
        """Return (new-generation reason or "", WAL restarted, real WAL size)."""
        wal_size = os.fstat(self._wal_fd).st_size
        if self._new_generation_reason:
            return self._new_generation_reason, False, wal_size
        pos = self.shadow.pos
        if not pos.generation:
            return "no generation exists", False, wal_size
        if pos.index >= MAX_INDEX:
            return "max index exceeded", False, wal_size
        if pos.offset < WAL_HEADER_SIZE:
            return "short shadow wal", False, wal_size
        if pos.offset > wal_size:
            return "wal truncated by another process", False, wal_size
        restart = not self._headers_match()
        if pos.offset == WAL_HEADER_SIZE and restart:
            return "wal header only, mismatched", False, wal_size
        if pos.offset > WAL_HEADER_SIZE:
            fs = self.page_size + WAL_FRAME_HEADER_SIZE
            if os.pread(self._wal_fd, fs, pos.offset - fs) != self.shadow.last_frame():
                return "wal overwritten by another process", False, wal_size
        return "", restart, wal_size

    def _create_generation(self, reason: str) -> None:
        # The read lock protects the frames about to be copied.  Without a
        # generation there is nothing to protect, so a failed start lets it
        # go: holding it would pin the WAL (see _shadow_write_failed).
        self._acquire_read_lock()
        gen = ""
        try:
            try:
                gen = self.shadow.new_generation()
                self._start_index(gen, 0)
                self.shadow.set_current(gen)
            except OSError as e:
                raise _ShadowWriteError(e, 0) from e
        except BaseException:
            if self.shadow.pos.generation == gen:
                self.shadow.close()
                self.shadow.pos = Pos()
            if gen:
                shutil.rmtree(os.path.join(self.meta_path, "generations", gen), ignore_errors=True)
            self._release_read_lock()
            raise
        self._new_generation_reason = ""
        self.logger.info("%s: sync: new generation %s reason=%s", self.name, gen, reason,
                         extra={"generation": gen, "reason": reason})
        self.shadow.remove_other_generations()

    def _start_index(self, generation: str, index: int, since: Optional[float] = None, ours: bool = False) -> None:
        """Start shadow index from the real WAL's header, then copy its frames."""
        try:
            self.shadow.start_index(generation, index, os.pread(self._wal_fd, WAL_HEADER_SIZE, 0))
        except OSError as e:
            raise _ShadowWriteError(e, 0) from e
        self._copy_or_raise(None, since=since, ours=ours)

    # Checkpoint --------------------------------------------------------------

    def checkpoint(self, mode: str = CHECKPOINT_MODE_PASSIVE) -> bool:
        """Checkpoint the WAL without losing frames to a WAL restart.

        Go's version copies, then checkpoints, then takes the write lock, so
        frames committed in between can be overwritten by a restarted WAL
        before they are copied (format note §12.2).  Here the write lock is
        held from the last copy until the checkpoint is done (the copy
        before it, in sync, leaves little for that last copy), so the old
        WAL cycle is complete in the shadow WAL before anything can restart
        it; our read transaction is taken again before the lock is released,
        which keeps anyone from backfilling (and so restarting) a second
        time before we copy the new cycle.  RESTART and TRUNCATE wait up to
        the busy timeout for other readers; TRUNCATE also shrinks the WAL.

        Returns False if a snapshot holds checkpoints off or the write lock
        stayed busy for the whole busy timeout.
        """
        with self._lock:
            if not self._chk_lock.acquire(blocking=False):
                return False
            t0 = time.monotonic()
            ok = False
            try:
                ok = self._checkpoint(mode)
                return ok
            finally:
                self._chk_lock.release()
                # As Go: every attempt counts; one that did not checkpoint is an error.
                CHECKPOINT_COUNT.labels(self.path, mode).inc()
                CHECKPOINT_SECONDS.labels(self.path, mode).inc(time.monotonic() - t0)
                if not ok:
                    CHECKPOINT_ERROR_COUNT.labels(self.path, mode).inc()

    def _begin_write(self) -> None:
        """Take SQLite's write lock on our connection; _WriteLockBusy after the busy timeout."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise _WriteLockBusy(str(e)) from e

    @contextlib.contextmanager
    def _locked_backfill(self, wait_for_readers: bool, reacquire: bool, copy: bool = True):
        """Hold the write lock, copy every committed frame, then backfill.

        Yields (frames in the WAL, frames backfilled) while the write lock
        is still held, so nothing can commit meanwhile.  Our read
        transaction is released for the backfill; with reacquire it is taken
        again before the write lock goes (see checkpoint()).  With
        wait_for_readers, other readers are waited for up to the busy
        timeout.  Raises _WriteLockBusy if the lock stays busy, and the
        copy's write error if the copy fails (nothing is backfilled then).
        """
        if copy:
            # Catch up without the lock first (our read lock keeps the WAL
            # from restarting): the application goes on committing, and only
            # what it commits during the last, short copy is left to copy
            # under the write lock, where it would stall every writer.
            for _ in range(PRE_LOCK_COPY_ROUNDS):
                if self._copy_or_raise(None) < PRE_LOCK_COPY_ENOUGH:
                    break
        self._begin_write()
        try:
            if copy:
                self._copy_or_raise(None)
            self._release_read_lock()
            try:
                deadline = time.monotonic() + BUSY_TIMEOUT
                while True:
                    _, n_log, n_ckpt = self._rconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if not wait_for_readers or n_log == n_ckpt or time.monotonic() >= deadline:
                        break
                    time.sleep(0.01)
                yield n_log, n_ckpt
            finally:
                if reacquire:
                    self._acquire_read_lock()
        finally:
            self._conn.execute("ROLLBACK")

    def _checkpoint(self, mode: str) -> bool:
        pos = self.shadow.pos
        try:
            with self._locked_backfill(mode != CHECKPOINT_MODE_PASSIVE, reacquire=True) as (n_log, n_ckpt):
                self.logger.debug("%s: checkpoint mode=%s log=%d checkpointed=%d",
                                  self.name, mode, n_log, n_ckpt,
                                  extra={"mode": mode, "log": n_log, "checkpointed": n_ckpt})
        except _WriteLockBusy as e:
            # A writer held the lock for the whole busy timeout: try again
            # at the next sync rather than failing this one.
            self.logger.warning("%s: checkpoint skipped: mode=%s: %s", self.name, mode, e)
            return False

        # Write to force the WAL to restart if it was fully backfilled.
        # Anything the application commits from here on comes after
        # released: what is copied next is counted from then for the lag.
        released = self.clock()
        if mode == CHECKPOINT_MODE_TRUNCATE:
            self._conn.execute("PRAGMA journal_size_limit = 0")
        try:
            self._conn.execute(_SEQ_UPSERT)
        finally:
            if mode == CHECKPOINT_MODE_TRUNCATE:
                self._conn.execute("PRAGMA journal_size_limit = -1")

        # A changed header means the WAL restarted after the old cycle was
        # copied whole: begin the next index.  Otherwise keep copying.
        if not self._headers_match():
            self._start_index(pos.generation, pos.index + 1, since=released, ours=True)
        else:
            self._copy_or_raise(None, since=released, ours=True)
        return True

    # Snapshots ---------------------------------------------------------------

    def begin_snapshot(self) -> "_SnapshotSource":
        """Hold off checkpoints and return the position and content for a snapshot.

        Use as a context manager.  The snapshot is named by the current index
        only: restore replays that whole index from offset 0 on top of it,
        which repairs pages other processes backfilled meanwhile.
        """
        return _SnapshotSource(self)

    # Restore drills ----------------------------------------------------------

    def pin_read(self) -> "tuple[Pos, sqlite3.Connection, float]":
        """Copy every committed frame and open a read transaction at exactly that position.

        Returns (P, conn, seconds the write lock was held): the shadow WAL
        ends at P and conn's read transaction sees the database as of P,
        whatever the application commits afterwards.  SQLite's write lock
        is held only for the copy of what the last sync left (as a
        checkpoint holds it, and shorter: no backfill) and for the first
        read of conn.  In WAL mode the open read transaction blocks no
        writer, but while it lasts no checkpoint backfills past P and the
        WAL cannot restart (it grows with what is committed meanwhile), so
        call unpin() as soon as the comparison is done.  Raises
        _PinRetry when the WAL restarted since the last sync (sync and
        call again).
        """
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only = 1")
            with self._lock:
                if self._conn is None or self._closed:
                    raise LitestreamError("%s: the database is not open" % self.name)
                why = self._replaced()
                if why:
                    raise _PinRetry(why)
                self._begin_write()
                t0 = time.monotonic()
                try:
                    if not self._headers_match():
                        raise _PinRetry("wal restarted")
                    try:
                        copied = self._copy_or_raise(None)
                    except _ShadowWriteError as e:
                        raise LitestreamError("%s: cannot write shadow wal: %s" % (self.name, e.err)) from e
                    pos = self.shadow.pos
                    # Nobody can commit now, so a new reader sees exactly
                    # the last commit: the end of what was just copied.
                    hdr = self._wal_index_header()
                    if hdr is not None and hdr.salt == self.shadow.header[16:24] and \
                            calc_wal_size(self.page_size, hdr.max_frame) != pos.offset:
                        raise _PinRetry("shadow wal ends at %d, the wal's last commit at %d"
                                        % (pos.offset, calc_wal_size(self.page_size, hdr.max_frame)))
                    conn.execute("BEGIN")
                    conn.execute("SELECT COUNT(1) FROM sqlite_master").fetchone()
                finally:
                    self._conn.execute("ROLLBACK")
                    held = time.monotonic() - t0
                self._pins += 1
                if copied:
                    self._broadcast()
            return pos, conn, held
        except BaseException:
            conn.close()
            raise

    def unpin(self, conn: sqlite3.Connection) -> None:
        """End a read transaction pin_read() opened."""
        try:
            conn.close()
        finally:
            with self._lock:
                self._pins = max(0, self._pins - 1)

    # Cleanup -----------------------------------------------------------------

    def _clean_wal(self) -> None:
        # Keep shadow files from the lowest replica index - 1 upward; a
        # replica on another generation pins everything.  Without replicas
        # only the current index and the one before it are kept.
        pos = self.shadow.pos
        if not pos.generation:
            return
        lo = pos.index
        for r in self.replicas:
            p = r.pos
            lo = min(lo, p.index if p.generation == pos.generation else 0)
        if lo > 0:
            self.shadow.remove_below(lo - 1)

    # Shadow WAL reading -------------------------------------------------------

    def shadow_wal_range(self, pos: Pos) -> "Optional[tuple[Pos, int]]":
        """Return (start, end) of the shadow bytes a replica at pos has not sent."""
        return self.shadow.range(pos)

    def read_shadow_chunks(self, pos: Pos, end: int, chunk: int = 1 << 20):
        """Yield the shadow WAL bytes [pos.offset, end) of pos.index."""
        return self.shadow.read_chunks(pos, end, chunk)


class _WriteLockBusy(LitestreamError):
    """Another writer held the write lock for the whole busy timeout."""


class _DrillCancelled(LitestreamError):
    """A restore drill gave up because its replica stopped."""


class _PinRetry(LitestreamError):
    """pin_read() met a WAL restart or replaced file the next sync must handle first."""


class _ShadowWriteError(Exception):
    """Writing the shadow WAL failed (err) after copied bytes of whole transactions were kept."""

    def __init__(self, err: OSError, copied: int):
        super().__init__(str(err))
        self.err = err
        self.copied = copied


class _SnapshotSource:
    def __init__(self, db: DB):
        self.db = db
        self.pos = Pos()

    def __enter__(self):
        db = self.db
        db._chk_lock.acquire()
        try:
            with db._lock:
                if db._conn is None:
                    raise NoGenerationError()
                why = db._replaced()
                if why:
                    # Never snapshot through a descriptor of a file that is
                    # no longer the database: the next sync reopens it.
                    raise LitestreamError("%s: %s: snapshot deferred until the next sync" % (db.name, why))
                # Every frame our read mark lets a checkpoint backfill into
                # the file is copied first, so the snapshot holds nothing
                # past self.pos; then backfill what we can so the replay
                # after the snapshot is short.
                try:
                    if db.pos().generation:
                        db._copy_or_raise(None)
                except _ShadowWriteError as e:
                    raise LitestreamError("%s: snapshot: cannot write shadow wal: %s" % (db.name, e.err)) from e
                db._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.pos = db.pos()
            if not self.pos.generation:
                raise NoGenerationError()
        except BaseException:
            db._chk_lock.release()
            raise
        return self

    def chunks(self, chunk: int = 4 << 20):
        """Yield the database file from offset 0 to EOF through the long-lived fd.

        Raises LitestreamError at the end (so the upload fails) if the
        database's descriptor or generation changed while it was read.
        """
        db = self.db
        f = db._db_file
        if f is None:
            raise LitestreamError("%s: snapshot: the database is closed" % db.name)
        ident = os.fstat(f.fileno())
        yield from pread_chunks(f.fileno(), 0, None, chunk)
        st = os.fstat(f.fileno()) if db._db_file is f else None
        if st is None or (st.st_dev, st.st_ino) != (ident.st_dev, ident.st_ino) \
                or db.pos().generation != self.pos.generation:
            raise LitestreamError("%s: snapshot %s/%08x: the database changed while it was read"
                                  % (db.name, self.pos.generation, self.pos.index))

    def __exit__(self, *exc):
        self.db._chk_lock.release()


###############################################################################
# Replica
###############################################################################


def decompress_object(rd: BinaryIO, name: str, out=None, pool: Optional[LZ4Pool] = None) -> int:
    """Decompress a stored object into out (or nowhere); return its length.

    Streams one block at a time (a pool decodes blocks in its workers),
    and names the object in any error.
    """
    n = 0
    try:
        if pool is not None:
            # A small object is decoded whole by one worker, which lets
            # many small WAL segments use every worker.
            head = _read_full(rd, POOL_OBJECT_MAX + 1)
            if len(head) < POOL_OBJECT_MIN:
                pool = None  # decoded here faster than a worker (or its start) would take
            elif len(head) <= POOL_OBJECT_MAX:
                data = pool.result(pool.submit(_lz4_frame_job, head, POOL_OBJECT_DECODED_MAX))
                if data is not None:
                    if out is not None:
                        out.write(data)
                    return len(data)
            rd = _Prefixed(head, rd)
        fr = LZ4FrameReader(rd, pool)
        while True:
            b = fr.read(4 << 20)
            if not b:
                return n
            n += len(b)
            if out is not None:
                out.write(b)
    except CorruptFrameError as e:
        raise CorruptFrameError("%s: %s" % (name, e)) from e
    finally:
        rd.close()


POOL_OBJECT_MIN = 64 << 10           # smaller objects are decoded in the calling process
POOL_OBJECT_MAX = 4 << 20            # objects up to this size go to one worker whole
POOL_OBJECT_DECODED_MAX = 64 << 20   # ... if they decode to at most this (else streamed)


class _Prefixed:
    """A reader of bytes already read followed by the rest of a stream."""

    def __init__(self, head: bytes, rd):
        self._head, self._rd = head, rd

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._rd.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._rd.read(n)

    def close(self) -> None:
        self._rd.close()


def _tty_progress(what: str, total: int, min_total: int = 64 << 20):
    """Return a progress callback that draws on a TTY stderr, or None.

    Only long work (at least min_total bytes) reports, and logs stay
    quiet and parseable when stderr is not a terminal.
    """
    if total < min_total or not sys.stderr.isatty():
        return None

    def progress(done: int) -> None:
        sys.stderr.write("\r%s: %d/%d MiB" % (what, done >> 20, total >> 20))
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return progress


class Replica:
    """A DB's copy in one place: sync, snapshots, retention, and their timers.

    Tunables (as Go's Replica fields):
      sync_interval             seconds between uploads while the DB changes.
      retention                 keep snapshots this long; 0 disables the retainer.
      retention_check_interval  how often retention is enforced.
      retention_min_snapshots   snapshots of the current generation kept
                                whatever their age (at least 1).
      snapshot_interval         take a snapshot this often; 0 = only when needed.
      validation_interval       run a restore drill (validate()) this often; 0 = never.
      max_retry_delay           the longest wait between retries of a failed sync.
      max_lag                   readiness fails when lag exceeds this (0: the
                                default, 10 x sync_interval and at least 10 s).

    A failed sync or snapshot is retried on a timer, with jittered
    exponential backoff from about sync_interval up to max_retry_delay,
    whether or not the database changes, until the replica has caught up.
    """

    def __init__(self, db: Optional[DB], name: str, client: ReplicaClient, *,
                 sync_interval: float = DEFAULT_SYNC_INTERVAL,
                 retention: float = DEFAULT_RETENTION,
                 retention_check_interval: float = DEFAULT_RETENTION_CHECK_INTERVAL,
                 retention_min_snapshots: int = DEFAULT_RETENTION_MIN_SNAPSHOTS,
                 snapshot_interval: float = 0.0,
                 validation_interval: float = 0.0,
                 max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY,
                 max_lag: float = 0.0,
                 clock=time.time):
        self.db = db
        self.name = name or client.client_type
        self.client = client
        client.logger = self.logger
        self.sync_interval = sync_interval
        self.retention = retention
        self.retention_check_interval = retention_check_interval
        self.retention_min_snapshots = retention_min_snapshots
        self.snapshot_interval = snapshot_interval
        self.validation_interval = validation_interval
        self.max_retry_delay = max_retry_delay
        self.max_lag = max_lag if max_lag > 0 else default_max_lag(sync_interval)
        self.clock = clock
        self.pos = Pos()
        self.durable = Pos()          # the furthest position known stored (pos is reset on errors)
        self.failures = 0             # failed syncs in a row
        self.last_error = ""
        self.last_success = 0.0       # clock() of the last successful sync
        self._failing_since = 0.0
        self._snapshot_failures = 0
        self._mu = threading.Lock()    # one sync, snapshot or retention pass at a time
        self._changed = threading.Condition()  # notified when pos moves
        self._tasks: List[Task] = []
        self._sync_task: Optional[Task] = None
        self._last_sync_start = -1e9   # monotonic
        self._drill_stop = threading.Event()   # set by stop(): a drill in progress gives up
        self._drill_idle = threading.Event()   # clear while a drill runs
        self._drill_idle.set()
        self._series: Optional[_ReplicaSeries] = None

    def __repr__(self) -> str:
        return "Replica(%r, %s)" % (self.name, self.client)

    def _label(self) -> str:
        return "%s(%s)" % (self.db.name if self.db else "", self.name)

    @property
    def logger(self) -> logging.LoggerAdapter:
        """The DB's logger with this replica's name (Go's Replica.Logger)."""
        return _LogAdapter(self.db.logger if self.db else log, {"replica": self.name})

    # Metrics and health ------------------------------------------------------

    def register_metrics(self) -> None:
        """Create this replica's series; lag and pending bytes are computed at each scrape."""
        register_replica_metrics(self.db.path, self.name, self.client.client_type)
        self._series = m = _ReplicaSeries(self.db.path, self.name)
        m.lag.set_function(self.lag)
        m.pending.set_function(self.pending_bytes)

    def _metrics(self) -> _ReplicaSeries:
        if self._series is None:
            self._series = _ReplicaSeries(self.db.path, self.name)
        return self._series

    def lag(self) -> float:
        """Return the age in seconds of the oldest committed transaction this replica lacks (0: caught up)."""
        return self.db.lag(self.durable) if self.db is not None else 0.0

    def pending_bytes(self) -> int:
        """Return the bytes of the DB's shadow WAL this replica lacks."""
        return self.db.pending_bytes(self.durable) if self.db is not None else 0

    def problem(self) -> str:
        """Return why this replica is not ready ("" when it is): lag above max_lag, or a failing sync."""
        lag = self.lag()
        why = []
        if lag > self.max_lag:
            why.append("lag exceeds max-lag %s" % format_duration(int(self.max_lag * 1e9)))
        if self.failures:
            why.append("last sync failed (attempt %d): %s" % (self.failures, self.last_error))
        elif self.db is not None and self.db.sync_error:
            why.append("database sync failed: %s" % self.db.sync_error)
        if not why:
            return ""
        return "%s(%s): lag=%.1fs: %s" % (self.db.name if self.db else "", self.name, lag, "; ".join(why))

    # Lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start syncing on the DB's replica scheduler, with the retention and snapshot timers if enabled."""
        sched = self.db.replica_scheduler
        if sched is None:
            raise LitestreamError("%s: no scheduler: open the DB with background work" % self._label())
        self.stop()
        self._drill_stop.clear()
        label = self._label()
        self._sync_task = sched.task(self._sync_step, "sync:" + label)
        self._tasks = [self._sync_task]
        self._sync_task.schedule(0)
        if self.retention > 0:
            t = sched.task(self._retention_step, "retention:" + label)
            t.schedule(min(self.retention_check_interval, self.retention))
            self._tasks.append(t)
        if self.snapshot_interval > 0:
            t = sched.task(self._snapshot_step, "snapshot:" + label)
            t.schedule(0)
            self._tasks.append(t)
        if self.validation_interval > 0:
            t = sched.task(self._validation_step, "validation:" + label)
            t.schedule(self.validation_interval)
            self._tasks.append(t)
        if hasattr(self.client, "abort_stale_uploads"):
            t = sched.task(self._stale_uploads_step, "uploads:" + label)
            t.schedule(0)
            self._tasks.append(t)

    def stop(self) -> None:
        """Stop the timers; a step in progress finishes on its own, but a restore drill gives up soon."""
        self._drill_stop.set()
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self._sync_task = None

    def wait_validation(self, timeout: Optional[float] = None) -> bool:
        """Wait until no restore drill runs (after stop(), one gives up at its next step); False on timeout."""
        return self._drill_idle.wait(timeout)

    def wake(self) -> None:
        """Ask for an upload: the DB's shadow WAL changed.

        At most one upload per sync interval; while syncs are failing,
        the retry timer decides when the next attempt is.
        """
        t = self._sync_task
        if t is not None and not self.failures:
            t.schedule(max(0.0, self._last_sync_start + self.sync_interval - time.monotonic()))

    def final_sync(self, deadline: Optional[_Deadline] = None) -> None:
        """Wait for a step in progress (until deadline), then upload everything the DB has copied."""
        r = None if deadline is None else deadline.remaining()
        if not self._mu.acquire(timeout=-1 if r is None else r):
            raise LitestreamError("%s: timed out waiting for an upload in progress" % self._label())
        try:
            self._sync_locked()
        finally:
            self._mu.release()

    def behind(self) -> str:
        """Describe how far the replica is behind the DB, e.g. "12345 bytes behind"."""
        dpos = self.db.pos() if self.db else Pos()
        if not dpos.generation:
            return "nothing to replicate"
        if self.pos.generation != dpos.generation:
            return "generation %s not started" % dpos.generation
        if self.pos.index == dpos.index:
            return "%d bytes behind" % max(0, dpos.offset - self.pos.offset)
        return "%d indexes behind" % (dpos.index - self.pos.index)

    # Timers ------------------------------------------------------------------

    def _retry_delay(self, failures: int) -> float:
        # Jittered ("equal jitter") exponential backoff: the first retry
        # comes after about one sync interval.
        d = min(self.max_retry_delay, max(self.sync_interval, 0.1) * (2 ** min(failures - 1, 30)))
        return d / 2 + random.uniform(0, d / 2)

    def _sync_failed(self, e: BaseException) -> float:
        if not self.failures:
            self._failing_since = self.clock()
        self.failures += 1
        self.last_error = str(e)
        delay = self._retry_delay(self.failures)
        self.logger.warning("%s: sync failed (attempt %d), retrying in %.1fs: %s",
                            self._label(), self.failures, delay, e)
        return delay

    def _sync_recovered(self) -> None:
        if self.failures:
            self.logger.info("%s: replica caught up after %d failed attempts; it was behind for %.1fs",
                             self._label(), self.failures, self.clock() - self._failing_since)
        self.failures = 0
        self.last_error = ""

    def _sync_step(self) -> Optional[float]:
        self._last_sync_start = time.monotonic()
        try:
            self.sync()
        except Exception as e:
            return self._sync_failed(e)
        if self.pos.generation:
            self._sync_recovered()
        return None

    def _retention_step(self) -> Optional[float]:
        interval = min(self.retention_check_interval, self.retention)
        try:
            self.enforce_retention()
        except NoGenerationError:
            pass
        except Exception as e:
            self.logger.error("%s: retainer error: %s", self._label(), e)
        return interval

    def _snapshot_step(self) -> Optional[float]:
        # Time the next snapshot from the newest one in the replica, so a
        # restart does not reset the clock (upstream #479).
        try:
            delay = self._next_snapshot_delay()
            if delay > 0:
                return delay
            self.snapshot()
        except NoGenerationError:
            return min(self.snapshot_interval, 1.0)
        except Exception as e:
            # Its own count: a failed snapshot must not hold off WAL uploads.
            self._snapshot_failures += 1
            delay = self._retry_delay(self._snapshot_failures)
            self.logger.warning("%s: snapshot failed (attempt %d), retrying in %.1fs: %s",
                                self._label(), self._snapshot_failures, delay, e)
            return delay
        self._snapshot_failures = 0
        return self.snapshot_interval

    def _validation_step(self) -> Optional[float]:
        self.validate()  # logs and counts its own result
        return self.validation_interval

    def _stale_uploads_step(self) -> Optional[float]:
        try:
            self.client.abort_stale_uploads()
        except Exception as e:
            self.logger.warning("%s: cannot list incomplete uploads: %s", self._label(), e)
        return None

    def _next_snapshot_delay(self) -> float:
        gen = self.db.pos().generation
        if not gen:
            return min(self.snapshot_interval, 1.0)
        snaps = self.client.snapshots(gen)
        if not snaps:
            return min(self.snapshot_interval, 1.0)
        newest = max(s.created_at.timestamp() for s in snaps)
        return max(0.0, newest + self.snapshot_interval - self.clock())

    # Sync --------------------------------------------------------------------

    def sync(self) -> Pos:
        """Upload the shadow WAL written since the replica's position; return the new position.

        The position is recomputed from the replica when the generation
        changes or after any error, so nothing already stored is sent again.
        """
        if self.db is not None and self.db._closed:
            raise LitestreamError("%s: the database is closed" % self._label())
        with self._mu:
            return self._sync_locked()

    def _sync_locked(self) -> Pos:
        try:
            self._sync()
        except BaseException:
            self._set_pos(Pos())
            raise
        self.last_success = self.clock()
        if self.db is not None:
            self._metrics().last_success.set(self.last_success)
            self.db.replicated([r.durable for r in self.db.replicas])
        return self.pos

    def _set_pos(self, pos: Pos) -> None:
        with self._changed:
            self.pos = pos
            if pos.generation:
                self.durable = pos
            self._changed.notify_all()

    def wait_pos(self, pred, timeout: Optional[float]) -> bool:
        """Wait until pred(self.pos) holds; return False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: pred(self.pos), timeout)

    def _sync(self) -> None:
        dpos = self.db.pos()
        if not dpos.generation:
            return
        if self.pos.generation != dpos.generation:
            if not self.client.snapshots(dpos.generation):
                self._snapshot()
            self._set_pos(self.calc_pos(dpos.generation))
            self.logger.info("%s: replicating to %s position=%s",
                             self._label(), self.client.client_type, self.pos)
        self._upload_wal(self.pos, None, track=True)

    def _upload_wal(self, pos: Pos, stop: Optional[Pos], track: bool) -> None:
        """Upload the shadow WAL from pos, as far as stop (None: all of it).

        With track, the replica's position follows; without, the objects
        belong to a generation whose snapshot is not stored yet.
        """
        while True:
            rng = self.db.shadow_wal_range(pos)
            if rng is None:
                return
            start, end = rng
            if stop is not None:
                if (start.index, start.offset) >= (stop.index, stop.offset):
                    return
                if start.index == stop.index:
                    end = min(end, stop.offset)
            rd = CompressingReader(self.db.read_shadow_chunks(start, end), level=WAL_SEGMENT_LZ4_LEVEL)
            self.logger.info("%s: write wal segment position=%s", self._label(), start, extra={"position": str(start)})
            t0 = time.monotonic()
            info = self.client.write_wal_segment(start, rd)
            self._log_written("wal segment", start, t0, rd.raw_bytes, info.size)
            pos = Pos(start.generation, start.index, end)
            m = self._metrics()
            m.wal_bytes.inc(end - start.offset)
            m.wal_index.set(start.index)
            m.wal_offset.set(end)
            if track:
                self._set_pos(pos)

    def _index_end(self, generation: str, index: int) -> int:
        """Return where the replica's segments of one index end (0 without any)."""
        segs = [s for s in self.client.wal_segments(generation) if s.index == index]
        if not segs:
            return 0
        seg = segs[-1]
        return seg.offset + decompress_object(self.client.wal_segment_reader(seg.pos()), self._object_name(seg))

    def calc_pos(self, generation: str) -> Pos:
        """Return where the replica's copy of a generation ends."""
        snaps = self.client.snapshots(generation)
        if not snaps:
            raise NoSnapshotError()
        snap = max(snaps, key=lambda s: s.index)
        segs = [s for s in self.client.wal_segments(generation) if s.index >= snap.index]
        if not segs:
            return Pos(generation, snap.index, 0)
        seg = segs[-1]
        n = decompress_object(self.client.wal_segment_reader(seg.pos()), self._object_name(seg))
        return Pos(generation, seg.index, seg.offset + n)

    def _object_name(self, info) -> str:
        if isinstance(info, SnapshotInfo):
            rel = "generations/%s/snapshots/%s" % (info.generation, format_snapshot_path(info.index))
        else:
            rel = "generations/%s/wal/%s" % (info.generation, format_wal_segment_path(info.index, info.offset))
        return "%s replica %s: %s" % (self.client.client_type, self.name, rel)

    # Snapshot ----------------------------------------------------------------

    def snapshot(self) -> SnapshotInfo:
        """Write a snapshot of the DB at the current index."""
        with self._mu:
            return self._snapshot()

    def _snapshot(self) -> SnapshotInfo:
        with self.db.begin_snapshot() as src:
            # A restore that picks this snapshot replays its index from
            # offset 0 on top of it, and the file may already hold pages of
            # frames up to src.pos (backfilled by checkpoints): those frames
            # go up first, so the snapshot is never restorable without them.
            p = src.pos
            if self.pos.generation == p.generation:
                self._upload_wal(self.pos, p, track=True)
            else:
                start = Pos(p.generation, p.index, min(p.offset, self._index_end(p.generation, p.index)))
                self._upload_wal(start, p, track=False)
            self.logger.info("%s: write snapshot position=%s", self._label(), p, extra={"position": str(p)})
            t0 = time.monotonic()
            size = os.path.getsize(self.db.path)
            pool = snapshot_pool(size)
            try:
                rd = CompressingReader(src.chunks(), _tty_progress("snapshot %s" % self._label(), size), pool=pool)
                info = self.client.write_snapshot(src.pos.generation, src.pos.index, rd)
            finally:
                if pool is not None:
                    pool.close()
        self._log_written("snapshot", p, t0, rd.raw_bytes, info.size)
        return info

    def _log_written(self, what: str, pos: Pos, t0: float, size: int, compressed: int) -> None:
        """Log an uploaded object as Go: "wal segment written" / "snapshot written" position elapsed sz."""
        elapsed = format_duration(int((time.monotonic() - t0) * 1e9))
        self.logger.info("%s: %s written position=%s elapsed=%s sz=%d compressed=%d", self._label(), what,
                         pos, elapsed, size, compressed,
                         extra={"position": str(pos), "elapsed": elapsed, "sz": size, "compressed": compressed})

    # Validation --------------------------------------------------------------

    def validate(self, log_result: bool = True) -> "ValidationResult":
        """Run one restore drill: restore the replica at a position P and compare it with the database at P.

        P is pinned first (DB.pin_read): every committed frame is copied
        to the shadow WAL under SQLite's write lock, and a read transaction
        opened then keeps seeing the database as of P however the
        application goes on writing; the replica is then brought exactly to
        P (so P is a segment boundary).  The replica is restored at P into
        a scratch file in the DB's meta directory (one copy of the database,
        plus at most VALIDATION_RESTORE_PARALLELISM staged WAL indices),
        which must pass integrity_check and hold the same schema and rows,
        table by table in rowid (or primary key) order, as the pinned read
        transaction; both are streamed, so memory stays bounded.  Nothing
        the application commits after P can make the two differ: that is
        what kept Go 0.3's validation (which compared a checksum of the
        live file with a restore taken later) from being trusted.  The
        reader pins P for the length of the drill only.

        Returns a ValidationResult (status ok, invalid or error; never
        raises for a failed drill), logs it (INFO "validation ok", ERROR
        otherwise) unless log_result is false, and counts it in the
        validation metrics.
        """
        db = self.db
        if db is None:
            raise LitestreamError("%s: a restore drill needs the replica's database" % self.name)
        t0 = time.monotonic()
        scratch = os.path.join(db.meta_path, "validation-%s.db" % re.sub(r"[^A-Za-z0-9_.-]", "_", self.name))
        pos, held, conn = Pos(), 0.0, None
        status, msg = "error", ""

        def check(*_):
            if self._drill_stop.is_set():
                raise _DrillCancelled("replica stopped")

        self._drill_idle.clear()
        try:
            _remove_scratch(scratch)  # a crashed drill's leftovers
            pos, conn, held = self._pin_replicated()
            check()
            restore_replica(self, RestoreOptions(scratch, pos.generation, index=pos.index, offset=pos.offset,
                                                 parallelism=VALIDATION_RESTORE_PARALLELISM),
                            progress=check, ranged=False)
            check()
            diff = _compare_with(scratch, conn, self._drill_stop)
            check()
            if diff:
                status, msg = "invalid", "mismatch: %s" % diff
            else:
                status = "ok"
        except _DrillCancelled:
            status = ""
        except (CorruptFrameError, ChecksumMismatchError, _IntegrityCheckFailed) as e:
            status, msg = "invalid", str(e)
        except Exception as e:
            status, msg = "error", str(e) or type(e).__name__
        finally:
            try:
                if conn is not None:
                    db.unpin(conn)
                _remove_scratch(scratch)
            finally:
                self._drill_idle.set()
        res = ValidationResult(status or "error", pos, time.monotonic() - t0, held, msg or "cancelled")
        if status:
            self._record_validation(res, log_result)
        else:
            db.logger.info("%s: validation cancelled: the replica stopped", self._label())
        return res

    def _pin_replicated(self) -> "tuple[Pos, sqlite3.Connection, float]":
        """Pin the DB at a position P and upload the replica exactly to P; return (P, reader, lock seconds)."""
        db = self.db
        why = ""
        for _ in range(VALIDATION_PIN_ATTEMPTS):
            db.sync()
            with self._mu:
                if not db.pos().generation:
                    raise NoGenerationError()
                if self.pos.generation != db.pos().generation:
                    self._sync_locked()  # a new generation: its snapshot first, outside the pin
                try:
                    pos, conn, held = db.pin_read()
                except (_PinRetry, _WriteLockBusy) as e:
                    why = str(e)
                    continue
                try:
                    if pos.generation != self.pos.generation:
                        why = "generation changed"
                        db.unpin(conn)
                        continue
                    # Upload up to P and no further, so that restore can stop
                    # exactly at P (it stops only at segment boundaries).
                    try:
                        self._upload_wal(self.pos, pos, track=True)
                    except BaseException:
                        self._set_pos(Pos())
                        raise
                    if self.pos != pos:
                        raise LitestreamError("replica reached %s, not %s" % (self.pos, pos))
                except BaseException:
                    db.unpin(conn)
                    raise
                return pos, conn, held
        raise LitestreamError("cannot pin a position to validate at: %s" % why)

    def _record_validation(self, res: "ValidationResult", log_result: bool) -> None:
        p, n = self.db.path, self.name
        if self.db._stopping:
            return  # a drill outliving close(): the DB's series are gone and must stay gone
        REPLICA_VALIDATION_TOTAL.labels(p, n, "ok" if res.ok else "error").inc()
        VALIDATION_CHECKS_TOTAL.labels(p, n, {"ok": "success"}.get(res.status, res.status)).inc()
        LAST_VALIDATION_SUCCESS.labels(p, n).set(1 if res.ok else 0)
        if res.ok:
            LAST_VALIDATION_SUCCESS_TIMESTAMP_SECONDS.labels(p, n).set(time.time())
        if not log_result:
            return
        if res.ok:
            self.logger.info("%s: validation ok position=%s elapsed=%.3fs write_lock=%.6fs",
                                self._label(), res.pos, res.seconds, res.write_lock_seconds)
        elif res.status == "invalid":
            self.logger.error("%s: validation failed position=%s elapsed=%.3fs: %s",
                                 self._label(), res.pos or "none", res.seconds, res.message)
        else:
            self.logger.error("%s: validation error position=%s elapsed=%.3fs: %s",
                                 self._label(), res.pos or "none", res.seconds, res.message)

    # Retention ---------------------------------------------------------------

    def enforce_retention(self) -> None:
        """Delete snapshots and WAL older than the retention window.

        The current generation keeps its newest retention_min_snapshots
        snapshots (at least one) whatever their age, and everything after
        the oldest snapshot kept: a restore of the latest state, or of any
        point after that snapshot, can never lose an object to retention.
        If none of its snapshots is inside the window a new one is taken
        first, as Go does, so the window stays bounded.  Deletes in an order
        that keeps the replica restorable throughout: older snapshots first,
        then within each old index the later segments before its offset-0
        one.  Without a current generation (the DB is not there yet)
        nothing is deleted.
        """
        with self._mu:
            cur = (self.db.pos().generation if self.db else "") or self.pos.generation
            if not cur:
                return
            cutoff = self.clock() - self.retention
            gens = self.client.generations()
            snaps = {g: self.client.snapshots(g) for g in gens}
            if not any(s.created_at.timestamp() >= cutoff for s in snaps.get(cur, ())):
                info = self._snapshot()
                cur = info.generation
                # It replaces any snapshot of the same index.
                snaps[cur] = [s for s in snaps.get(cur, []) if s.index != info.index] + [info]
                if cur not in gens:
                    gens.append(cur)
            for g in gens:
                keep = [s for s in snaps[g] if s.created_at.timestamp() >= cutoff]
                if g == cur:
                    keep += sorted(snaps[g], key=lambda s: s.index)[-max(1, self.retention_min_snapshots):]
                if not keep:
                    if g == self.pos.generation:
                        continue  # still being uploaded to
                    self.client.delete_generation(g)
                    self.logger.info("%s: generation deleted generation=%s", self._label(), g,
                                     extra={"generation": g})
                    continue
                lo = min(s.index for s in keep)
                for s in snaps[g]:
                    if s.index < lo:
                        self.client.delete_snapshot(g, s.index)
                        self.logger.info("%s: snapshot deleted generation=%s index=%08x", self._label(), g,
                                         s.index, extra={"generation": g, "index": s.index})
                old = [w.pos() for w in self.client.wal_segments(g) if w.index < lo]
                if old:
                    self.client.delete_wal_segments([p for p in old if p.offset != 0])
                    self.client.delete_wal_segments([p for p in old if p.offset == 0])
                    self.logger.info("%s: wal segments deleted before generation=%s index=%08x n=%d",
                                     self._label(), g, lo, len(old), extra={"generation": g, "index": lo,
                                                                            "n": len(old)})


###############################################################################
# Restore
###############################################################################


@dataclass(frozen=True)
class RestoreOptions:
    """What to restore: generation "" = latest, index None = all, timestamp None = latest.

    offset (with index) stops inside that index at a segment boundary, so a
    position (generation, index, offset) a replica reported can be restored
    exactly; the restore then fails unless it reaches that position.
    """

    output_path: str
    generation: str = ""
    index: Optional[int] = None
    timestamp: Optional[datetime.datetime] = None
    parallelism: int = DEFAULT_RESTORE_PARALLELISM
    offset: Optional[int] = None
    lz4_workers: int = DEFAULT_LZ4_WORKERS  # worker processes decoding objects; 0 = none


def generation_time_bounds(client: ReplicaClient, generation: str) -> "tuple[datetime.datetime, datetime.datetime]":
    """Return the (oldest, newest) object timestamps of a generation."""
    times = [s.created_at for s in client.snapshots(generation)]
    times += [w.created_at for w in client.wal_segments(generation)]
    if not times:
        raise NoSnapshotError()
    return min(times), max(times)


def calc_restore_target(replicas: "List[Replica]", generation: str = "",
                        timestamp: Optional[datetime.datetime] = None) -> "tuple[Optional[Replica], str]":
    """Pick the replica and generation to restore from, as Go does.

    The generation whose newest object is newest wins (ties: first replica,
    then first generation); with a timestamp, only generations whose time
    span contains it are candidates.
    """
    best, best_gen, best_t = None, "", None
    for r in replicas:
        for g in r.client.generations():
            if generation and g != generation:
                continue
            try:
                lo, hi = generation_time_bounds(r.client, g)
            except NoSnapshotError:
                continue
            if timestamp is not None and not (lo <= timestamp <= hi):
                continue
            if best_t is None or hi > best_t:
                best, best_gen, best_t = r, g, hi
    return best, best_gen


def _choose_snapshot(snaps: List[SnapshotInfo], opt: RestoreOptions) -> SnapshotInfo:
    # By index, not by timestamp (format note §12.6-12.7): the highest index
    # at or below the target, among those written by the target time.
    cands = snaps
    if opt.index is not None:
        cands = [s for s in cands if s.index <= opt.index]
        if opt.offset is not None and any(s.index < opt.index for s in cands):
            # A snapshot taken in the target's own index may hold pages
            # other processes backfilled from past the target offset.
            cands = [s for s in cands if s.index < opt.index]
    if opt.timestamp is not None:
        cands = [s for s in cands if s.created_at <= opt.timestamp]
    if not cands:
        raise NoSnapshotError()
    return max(cands, key=lambda s: s.index)


def _missing(name, generation: str, index: int, offset: int, why: str) -> str:
    """Describe a WAL segment that should exist but does not."""
    return "%s: missing: %s" % (name(WALSegmentInfo(generation, index, offset, 0, utc_from_timestamp(0))), why)


def _plan_wal(segs: List[WALSegmentInfo], snap: SnapshotInfo, opt: RestoreOptions, name) -> "List[List[WALSegmentInfo]]":
    """Group the segments to replay after snap by index, checking for gaps."""
    last = max([s.index for s in segs] + [snap.index])
    if opt.index is not None and opt.index > last:
        # Restoring less than was asked for must not look like success.
        raise LitestreamError("index %x (%d) is past the last index %x (%d) of generation %s"
                              % (opt.index, opt.index, last, last, snap.generation))
    by_index: "dict[int, List[WALSegmentInfo]]" = {}
    for s in segs:
        # Indices below the snapshot are not needed, so a broken one left by
        # retention cannot spoil the restore (format note §12.4).
        if s.index < snap.index:
            continue
        if opt.timestamp is not None and s.created_at > opt.timestamp:
            break
        if opt.index is not None and s.index > opt.index:
            break
        if opt.offset is not None and s.index == opt.index and s.offset >= opt.offset:
            break
        by_index.setdefault(s.index, []).append(s)
    if not by_index:
        return []
    plan = []
    for i in range(snap.index, max(by_index) + 1):
        group = by_index.get(i)
        if not group:
            raise LitestreamError(_missing(name, snap.generation, i, 0, "no wal segments for index %08x: "
                                           "cannot replay past a gap" % i))
        if group[0].offset != 0:
            raise LitestreamError(_missing(name, snap.generation, i, 0, "wal index %08x starts at offset %d"
                                           % (i, group[0].offset)))
        plan.append(group)
    return plan


def _list_generation(client: ReplicaClient, generation: str) -> "tuple[List[WALSegmentInfo], List[SnapshotInfo]]":
    """List a generation's WAL segments and snapshots so that concurrent changes leave no false gap.

    The WAL is listed first: retention deletes old snapshots before their
    WAL, so every snapshot listed still had all its WAL in the earlier
    listing, and retention running meanwhile shows up as an object that
    vanishes when read, never as a gap.  WAL newer than that listing which
    a newer snapshot needs is listed again after the snapshots.
    """
    segs = client.wal_segments(generation)
    snaps = client.snapshots(generation)
    top = segs[-1].index if segs else -1
    if snaps and snaps[-1].index > top:
        segs += [s for s in client.wal_segments(generation) if s.index > top]
    return segs, snaps


def _plan_restore(client: ReplicaClient, opt: RestoreOptions, name) -> "tuple[SnapshotInfo, List[List[WALSegmentInfo]]]":
    """List opt.generation and return the snapshot and WAL groups that restore opt."""
    segs, snaps = _list_generation(client, opt.generation)
    snap = _choose_snapshot(snaps, opt)
    return snap, _plan_wal(segs, snap, opt, name)


def _plan_end(snap: SnapshotInfo, plan) -> "tuple[int, int]":
    """Return (index, offset) of the last object a plan uses, to compare plans."""
    if plan:
        return plan[-1][-1].index, plan[-1][-1].offset
    return snap.index, -1


class _Vanished(LitestreamError):
    """A listed object was gone when read: retention (or another writer) deleted it."""


@contextlib.contextmanager
def _reading(what: str):
    """Turn a replica object missing while it is read into _Vanished naming it."""
    try:
        yield
    except FileNotFoundError as e:
        raise _Vanished("%s: deleted after it was listed" % what) from e


def _remove_db(path: str) -> None:
    remove_quietly(path, path + "-wal", path + "-shm")


def _restore_snapshot(replica: Replica, snap: SnapshotInfo, path: str, ranged: bool = True,
                      pool: Optional[LZ4Pool] = None) -> int:
    """Decompress a snapshot into a new file at path; return its page size.

    Big snapshots on clients with ranged reads come down as parallel ranged
    GETs into a staged file beside path (one stream is the bottleneck of
    large restores, upstream #266), then decompress from disk; ranged=False
    streams them instead, so no compressed copy takes disk space.
    """
    client = replica.client
    what = replica._object_name(snap)
    staged = path + "-snapshot.lz4"
    try:
        with open(path, "xb") as f:
            with _reading(what):
                if ranged and client.parallel_download and snap.size >= RESTORE_RANGED_GET_MIN:
                    with open(staged, "xb") as sf:
                        client.download_snapshot(snap.generation, snap.index, sf)
                    rd = open(staged, "rb")
                else:
                    rd = client.snapshot_reader(snap.generation, snap.index)
                decompress_object(rd, what, f, pool)
            f.flush()
            os.fsync(f.fileno())
    finally:
        remove_quietly(staged)
    with open(path, "rb") as f:
        head = f.read(100)
    if not head.startswith(b"SQLite format 3\0"):
        raise CorruptFrameError("%s: not a SQLite database" % what)
    page_size = struct.unpack(">H", head[16:18])[0]
    return 65536 if page_size == 1 else page_size


def _stage_index(client: ReplicaClient, group: List[WALSegmentInfo], path: str, name,
                 pool: Optional[LZ4Pool] = None) -> list:
    """Decompress one index's segments, in order, into a WAL file at path.

    Returns [(end offset, segment)].  Each segment must start where the one
    before it ended, the first at offset 0.
    """
    ends = []
    with open(path, "wb") as f:
        off = 0
        for seg in group:
            if seg.offset != off and ends:
                # The segment before decoded to a length that does not reach
                # this one: it is the damaged object when it runs past this
                # one's start, and the first suspect (before a missing
                # segment) when it stops short.
                prev, n = ends[-1][1], off - (ends[-2][0] if len(ends) > 1 else 0)
                nxt = format_wal_segment_path(seg.index, seg.offset)
                if off > seg.offset:
                    why = "damaged: wal segments not contiguous: it decodes to %d bytes, ending at offset " \
                          "%d, past the start of the next segment %s" % (n, off, nxt)
                else:
                    why = "wal segments not contiguous: it decodes to %d bytes, ending at offset %d, but the " \
                          "next segment is %s: this segment is damaged, or %s is missing" \
                          % (n, off, nxt, name(WALSegmentInfo(seg.generation, seg.index, off, 0,
                                                              utc_from_timestamp(0))))
                raise LitestreamError("%s: %s" % (name(prev), why))
            if seg.offset != off:
                raise LitestreamError(_missing(name, seg.generation, seg.index, off,
                                               "wal segments not contiguous: the next one is %s"
                                               % format_wal_segment_path(seg.index, seg.offset)))
            with _reading(name(seg)):
                n = decompress_object(client.wal_segment_reader(seg.pos()), name(seg), f, pool)
            if not n:
                raise CorruptFrameError("%s: empty wal segment" % name(seg))
            off += n
            ends.append((off, seg))
    return ends


def _staged_indices(client: ReplicaClient, plan, prefix: str, parallelism: int, staged: dict, name,
                    pool: Optional[LZ4Pool] = None):
    """Yield (group, path, ends, error) for each group of a plan, in order.

    A pool of `parallelism` threads stages indices at most `parallelism`
    ahead of the consumer, so disk use is bounded by that many indices;
    staged maps index -> path for the caller to remove.  An index whose
    objects are bad comes with the error instead of a path; a vanished
    object, or a local error, is raised.
    """
    def fetch(group):
        path = "%s-%08x-wal" % (prefix, group[0].index)
        staged[group[0].index] = path
        return path, _stage_index(client, group, path, name, pool)

    parallelism = max(1, parallelism)
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="litestream-restore")
    futures = {}
    try:
        nxt = 0
        for i, group in enumerate(plan):
            while nxt < len(plan) and nxt < i + parallelism:
                futures[nxt] = ex.submit(fetch, plan[nxt])
                nxt += 1
            try:
                path, ends = futures.pop(i).result()
            except _Vanished:
                raise
            except LitestreamError as e:
                yield group, None, None, e
                continue
            yield group, path, ends, None
    finally:
        for fut in futures.values():
            fut.cancel()
        ex.shutdown(wait=True)


def _seg_at(ends, off: int) -> WALSegmentInfo:
    """Return the segment of a staged index holding the byte at off."""
    return next((seg for end, seg in ends if end > off), ends[-1][1])


def _scan_staged_wal(path: str, page_size: int, ends, name) -> "tuple[WALHeader, int, int]":
    """Check a staged WAL index's header, framing and salts.

    Returns (header, frames up to the last commit frame, frames).  A frame
    whose salt is not the header's comes from another WAL (a misplaced or
    foreign segment): SQLite would quietly stop replaying there, so here it
    is an error naming the segment.  The checksum chain is SQLite's to
    verify as it applies the frames (_apply_wal).  page_size 0: any.
    """
    with open(path, "rb") as f:
        fd = f.fileno()
        try:
            hdr = parse_wal_header(os.pread(fd, WAL_HEADER_SIZE, 0))
        except CorruptFrameError as e:
            raise CorruptFrameError("%s: %s" % (name(ends[0][1]), e)) from None
        if page_size and hdr.page_size != page_size:
            raise CorruptFrameError("%s: wal page size %d does not match database page size %d"
                                    % (name(ends[0][1]), hdr.page_size, page_size))
        fs = hdr.page_size + WAL_FRAME_HEADER_SIZE
        for end, seg in ends:
            if (end - WAL_HEADER_SIZE) % fs:
                raise CorruptFrameError("%s: does not end on a wal frame boundary (offset %d)" % (name(seg), end))
        salt = struct.pack(">II", hdr.salt1, hdr.salt2)
        n = (ends[-1][0] - WAL_HEADER_SIZE) // fs
        last = 0
        for i in range(n):
            off = WAL_HEADER_SIZE + i * fs
            fh = os.pread(fd, WAL_FRAME_HEADER_SIZE, off)
            if fh[8:16] != salt:
                raise CorruptFrameError("%s: the wal frame at offset %d belongs to another wal (salt %s, header %s)"
                                        % (name(_seg_at(ends, off)), off, fh[8:16].hex(), salt.hex()))
            if fh[4:8] != b"\0\0\0\0":
                last = i + 1
    return hdr, last, n


def _apply_wal(db_path: str, wal_file: str, page_size: int, ends, name, expect: Optional[int] = None) -> None:
    """Checkpoint one staged WAL index into the database through SQLite.

    SQLite checks the checksum chain as it reads the WAL and stops at the
    first frame that breaks it, so every committed frame (expect; counted
    by _scan_staged_wal if None) must be taken.  The WAL file is consumed.
    """
    if expect is None:
        expect = _scan_staged_wal(wal_file, page_size, ends, name)[1]
    os.replace(wal_file, db_path + "-wal")
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=5)
    try:
        busy, n_log, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if n_log != expect:
            # SQLite stops at the first frame whose checksum breaks the chain.
            off = calc_wal_size(page_size, n_log)
            raise ChecksumMismatchError("invalid replica, checksum mismatch in %s: SQLite accepted "
                                        "%d of %d committed frames" % (name(_seg_at(ends, off)), n_log, expect))
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy != 0:
            raise LitestreamError("restore: wal checkpoint busy")
    except sqlite3.DatabaseError as e:
        raise LitestreamError("cannot replay %s: %s" % (name(ends[0][1]), e)) from e
    finally:
        conn.close()


def _integrity_check(path: str) -> None:
    """Raise LitestreamError unless PRAGMA integrity_check says ok."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        rows = [str(e)]
    finally:
        conn.close()
    if rows != ["ok"]:
        raise _IntegrityCheckFailed("restored database fails integrity_check: %s" % "; ".join(rows[:5]))


class _IntegrityCheckFailed(LitestreamError):
    """A restored database failed PRAGMA integrity_check."""


def _build_restore(replica: Replica, snap: SnapshotInfo, plan, path: str, parallelism: int, progress,
                   ranged: bool = True, pool: Optional[LZ4Pool] = None) -> Pos:
    """Build the database of a snapshot and WAL plan at path (new), then integrity_check it.

    Returns the position reached.  Staged files are removed here; path and
    its -wal/-shm are the caller's to remove.
    """
    name = replica._object_name
    staged: "dict[int, str]" = {}
    try:
        page_size = _restore_snapshot(replica, snap, path, ranged, pool)
        pos = Pos(snap.generation, snap.index, 0)
        indices = _staged_indices(replica.client, plan, path, parallelism, staged, name, pool)
        try:
            for i, (group, wal, ends, err) in enumerate(indices):
                if err is not None:
                    raise err
                _apply_wal(path, wal, page_size, ends, name)
                staged.pop(group[0].index, None)
                pos = Pos(snap.generation, group[0].index, ends[-1][0])
                if progress:
                    progress(i + 1, len(plan))
        finally:
            indices.close()
        _integrity_check(path)
        return pos
    finally:
        remove_quietly(*staged.values())


def restore_replica(replica: Replica, opt: RestoreOptions, progress=None, ranged: bool = True) -> Pos:
    """Restore opt.generation of a replica to opt.output_path; return the position restored.

    Everything is built in a temp file beside the output: the snapshot,
    then each WAL index applied in order by SQLite, then integrity_check.
    Only a database that passed is linked into place, and never over an
    existing file.  Temp files are removed whatever happens.

    An object deleted between listing and reading (retention running at the
    same time) makes the restore plan again from a fresh listing, up to
    RESTORE_REPLAN_ATTEMPTS times; a new plan that ends before the first
    one fails instead, so the result is never shorter than what the replica
    held when the restore began.  ranged=False never stages a compressed
    snapshot (see _restore_snapshot).
    """
    client = replica.client
    out = os.path.abspath(opt.output_path)
    if os.path.lexists(out):
        raise LitestreamError("cannot restore, output path already exists: %s" % out)
    if not opt.generation:
        raise LitestreamError("generation required")
    if opt.offset is not None and opt.index is None:
        raise LitestreamError("restore offset requires an index")
    name = replica._object_name

    d = os.path.dirname(out)
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp-%s" % (out, secrets.token_hex(4))
    pool = LZ4Pool(opt.lz4_workers) if opt.lz4_workers > 0 else None
    try:
        floor = vanished = None
        for _ in range(RESTORE_REPLAN_ATTEMPTS):
            try:
                snap, plan = _plan_restore(client, opt, name)
            except LitestreamError as e:
                if vanished is None:
                    raise
                raise LitestreamError("cannot restore %s after objects were deleted during the restore "
                                      "(retention?): %s" % (opt.generation, e)) from e
            end = _plan_end(snap, plan)
            if floor is None:
                floor = end
            elif end < floor:
                raise LitestreamError("cannot restore %s: objects were deleted during the restore and the "
                                      "replica now ends at %08x, before %08x where it ended when the "
                                      "restore began" % (opt.generation, end[0], floor[0]))
            replica.logger.info("%s: restoring snapshot %s/%08x to %s", replica._label(), snap.generation,
                                snap.index, tmp)
            try:
                pos = _build_restore(replica, snap, plan, tmp, opt.parallelism, progress, ranged, pool)
                break
            except _Vanished as e:
                _remove_db(tmp)
                vanished = e
                replica.logger.warning("%s: %s; planning the restore again from a fresh listing",
                                       replica._label(), e)
        else:
            raise LitestreamError("cannot restore %s: replica objects vanished %d times while restoring "
                                  "(last: %s)" % (opt.generation, RESTORE_REPLAN_ATTEMPTS, vanished))
        if opt.offset is not None and pos != Pos(opt.generation, opt.index, opt.offset):
            raise LitestreamError("cannot restore to %s: the replica reaches %s"
                                  % (Pos(opt.generation, opt.index, opt.offset), pos))
        remove_quietly(tmp + "-wal", tmp + "-shm")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, out)  # Fails if out appeared meanwhile: never overwrite.
        except FileExistsError:
            raise LitestreamError("cannot restore, output path already exists: %s" % out) from None
        except OSError:
            if os.path.lexists(out):
                raise LitestreamError("cannot restore, output path already exists: %s" % out) from None
            os.rename(tmp, out)  # Filesystems without hard links.
        fsync_dir(d)
        replica.logger.info("%s: restored to %s", replica._label(), out)
    finally:
        if pool is not None:
            pool.close()
        _remove_db(tmp)
    return pos


###############################################################################
# Verify
###############################################################################


@dataclass(frozen=True)
class GenerationReport:
    """What verify found in one generation of a replica.

    first_index/first_time are the oldest restorable state (the oldest
    snapshot that decodes); last_pos/last_time the newest: the end of the
    last WAL segment that replays onto a snapshot without a gap (offset 0:
    a snapshot alone) and the newest object time in it, which restore
    -timestamp takes.  latest_ok says the generation's newest listed state
    was built and passed integrity_check.  problems are one line each,
    naming the object or the gap; notes are findings that harm no restore.
    """

    generation: str
    snapshots: int = 0
    wal_segments: int = 0
    wal_indices: int = 0
    stored_bytes: int = 0
    first_index: Optional[int] = None
    first_time: Optional[datetime.datetime] = None
    last_pos: Optional[Pos] = None
    last_time: Optional[datetime.datetime] = None
    latest_ok: bool = False
    problems: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()


def _same_bytes(a: str, b: str, bufsize: int = 1 << 20) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(bufsize), fb.read(bufsize)
            if x != y:
                return False
            if not x:
                return True


def compare_databases(a: str, b: str) -> Optional[str]:
    """Return None if two databases hold the same schema and rows, else what differs first.

    Identical files are the same without opening them.  Otherwise the
    schema is compared, then each table's rows in rowid (or primary key)
    order; virtual tables are left to their shadow tables.
    """
    if _same_bytes(a, b):
        return None
    ca = sqlite3.connect(a, isolation_level=None)
    cb = sqlite3.connect(b, isolation_level=None)
    try:
        return _compare_rows(ca, cb)
    except sqlite3.DatabaseError as e:
        return "cannot be compared: %s" % e
    finally:
        ca.close()
        cb.close()


def _quote_ident(name: str) -> str:
    return '"%s"' % name.replace('"', '""')


def _row_order(conn: sqlite3.Connection, table: str, sql: str) -> str:
    """Return the ORDER BY that walks a table's own b-tree: rowid, or a WITHOUT ROWID table's primary key."""
    info = conn.execute("PRAGMA table_info(%s)" % _quote_ident(table)).fetchall()
    if "WITHOUT ROWID" in sql.upper():
        pk = sorted((r[5], r[1]) for r in info if r[5])
        return ", ".join(_quote_ident(c) for _, c in pk) or ", ".join(_quote_ident(r[1]) for r in info)
    cols = {r[1].lower() for r in info}
    # A column may be called rowid; one of the three names is still the rowid.
    return next((a for a in ("rowid", "_rowid_", "oid") if a not in cols), "rowid")


def _compare_rows(ca: sqlite3.Connection, cb: sqlite3.Connection,
                  cancel: Optional[threading.Event] = None) -> Optional[str]:
    """Return None if two connections see the same schema and rows, else what differs first.

    Rows are streamed from both sides in step, so memory stays bounded;
    the message names the table and the row's position, never its values
    (they may be secret).  cancel, once set, raises _DrillCancelled.
    """
    q = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    if ca.execute(q).fetchall() != cb.execute(q).fetchall():
        return "the schema differs"
    tables = ca.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
    for table, sql in tables:
        if (sql or "").upper().startswith("CREATE VIRTUAL"):
            continue  # left to its shadow tables
        order = _row_order(ca, table, sql or "")
        # A rowid table's rowids are compared too (a restore is a physical copy).
        q = "SELECT %s* FROM %s ORDER BY %s" % ("" if "WITHOUT ROWID" in (sql or "").upper() else order + ", ",
                                               _quote_ident(table), order)
        for i, (x, y) in enumerate(zip_longest(ca.execute(q), cb.execute(q)), 1):
            if cancel is not None and not i % 4096 and cancel.is_set():
                raise _DrillCancelled("cancelled")
            if x != y:
                if x is None or y is None:
                    return "table %s differs: %d rows in one, more in the other" % (table, i - 1)
                return "table %s differs (first at row %d)" % (table, i)
    return None


def _compare_with(path: str, live: sqlite3.Connection, cancel: Optional[threading.Event] = None) -> Optional[str]:
    """Compare a database file with what a connection's open transaction sees (see _compare_rows)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return _compare_rows(conn, live, cancel)
    except sqlite3.DatabaseError as e:
        return "cannot be compared: %s" % e
    finally:
        conn.close()


def _remove_scratch(path: str) -> None:
    """Remove a drill's scratch database and what a restore into it may leave beside it."""
    d, base = os.path.split(path)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    remove_quietly(*(os.path.join(d, n) for n in names if n == base or n.startswith(base + "-")
                     or n.startswith(base + ".tmp-")))


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of one restore drill (Replica.validate).

    status is "ok", "invalid" (the replica restored at pos differs from the
    database at pos, fails integrity_check, or holds a corrupt object) or
    "error" (the drill could not run to the end); message says why.
    """

    status: str
    pos: Pos
    seconds: float
    write_lock_seconds: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _check_chain(path: str, hdr: WALHeader, ends, name, start: int) -> Optional[str]:
    """Return a problem if a staged WAL's checksum chain breaks at or after frame `start`.

    For frames SQLite does not replay: an index no snapshot reaches, and
    frames after an index's last commit.
    """
    fs = hdr.page_size + WAL_FRAME_HEADER_SIZE
    n = (ends[-1][0] - WAL_HEADER_SIZE) // fs
    with open(path, "rb") as f:
        # Each frame's stored checksum (or the header's) seeds the next one's.
        seed = (hdr.checksum1, hdr.checksum2) if start == 0 else struct.unpack(
            ">II", os.pread(f.fileno(), 8, calc_wal_size(hdr.page_size, start - 1) + 16))
        for _ in iter_wal_frames(f, calc_wal_size(hdr.page_size, start), hdr, *seed):
            start += 1
    if start < n:
        off = calc_wal_size(hdr.page_size, start)
        return ("invalid replica, checksum mismatch in %s: the wal frame at offset %d breaks the chain"
                % (name(_seg_at(ends, off)), off))
    return None


class _Chain:
    """A database verify is building: its file, page size, base snapshot and newest object time."""

    def __init__(self, path: str, page_size: int, base: SnapshotInfo):
        self.path, self.page_size, self.base, self.time = path, page_size, base, base.created_at

    def drop(self) -> None:
        _remove_db(self.path)


def _generation_label(replica: Replica, generation: str) -> str:
    return "%s replica %s: generations/%s" % (replica.client.client_type, replica.name, generation)


class _GenerationVerifier:
    """One pass of verify over one listing of a generation (see verify_generation).

    It walks the indices from the oldest snapshot up, replaying each onto
    the state built so far (cur) and onto a snapshot taken in it (fresh),
    so at most two databases exist at a time.  A vanished object raises
    _Vanished; every other finding becomes a problem or a note.
    """

    def __init__(self, replica: Replica, generation: str, scratch: str, parallelism: int, progress):
        self.replica, self.gen, self.scratch = replica, generation, scratch
        self.parallelism, self.progress = parallelism, progress
        self.name = replica._object_name
        self.problems: List[str] = []
        self.notes: List[str] = []
        self.n_db = 0

    def problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    def run(self) -> GenerationReport:
        gen, name = self.gen, self.name
        segs, snaps = _list_generation(self.replica.client, gen)
        by_index: "dict[int, List[WALSegmentInfo]]" = {}
        for s in segs:
            by_index.setdefault(s.index, []).append(s)
        info = dict(generation=gen, snapshots=len(snaps), wal_segments=len(segs), wal_indices=len(by_index),
                    stored_bytes=sum(s.size for s in snaps) + sum(s.size for s in segs))
        label = _generation_label(self.replica, gen)
        if not snaps:
            if segs:
                self.problem("%s: no snapshot, so none of its %d wal segments can be restored" % (label, len(segs)))
            else:
                self.notes.append("%s: no objects (deleted, or a snapshot is being written)" % label)
            return GenerationReport(problems=tuple(self.problems), notes=tuple(self.notes), **info)

        s0 = snaps[0].index
        below = sum(1 for s in segs if s.index < s0)
        if below:
            self.notes.append("%s: %d wal segments below the oldest snapshot %08x are not needed by any "
                              "restore and were not read" % (label, below, s0))
        snap_at = {s.index: s for s in snaps}
        last = max([snaps[-1].index] + list(by_index))
        last_wal = max(by_index, default=-1)
        first_index = first_time = last_pos = last_time = None
        cur: Optional[_Chain] = None  # the state replayed so far; None after a break
        staged: "dict[int, str]" = {}
        indices = _staged_indices(self.replica.client, [by_index[i] for i in range(s0, last + 1) if i in by_index],
                                  os.path.join(self.scratch, "wal"), self.parallelism, staged, name)
        try:
            for i in range(s0, last + 1):
                fresh = self.open_snapshot(snap_at[i]) if i in snap_at else None
                if fresh is not None and first_index is None:
                    first_index, first_time = i, fresh.time
                group = by_index.get(i)
                if group is None:
                    if cur is not None:
                        cur.drop()
                    cur = fresh
                    if i == last and fresh is not None:
                        last_pos, last_time = Pos(gen, i, 0), fresh.time  # its WAL is not uploaded yet
                    else:
                        if fresh is not None:
                            fresh.drop()
                        cur = None
                        self.problem(_missing(name, gen, i, 0, "no wal segments for index %08x: no state "
                                              "after it is restorable until the next snapshot" % i))
                    continue
                _, wal, ends, err = next(indices)
                try:
                    chains = self.replay(i, group, wal, ends, err, [c for c in (fresh, cur) if c is not None])
                finally:
                    p = staged.pop(i, None)
                    if p:
                        remove_quietly(p, p + "-copy")
                if fresh in chains and cur in chains and i < last_wal:
                    # Both reach the end of index i, which is complete since
                    # later WAL exists (segments are uploaded in order): the
                    # snapshot must hold the state the WAL before it builds.
                    diff = compare_databases(cur.path, fresh.path)
                    if diff:
                        self.problem("%s: does not hold the state the wal builds from snapshot %08x: %s"
                                     % (name(fresh.base), cur.base.index, diff))
                keep = fresh if fresh in chains else (cur if cur in chains else None)
                for c in (fresh, cur):
                    if c is not None and c is not keep:
                        c.drop()
                cur = keep
                if cur is not None:
                    cur.time = max([cur.time] + [s.created_at for s in group])
                    last_pos, last_time = Pos(gen, i, ends[-1][0]), cur.time
                if self.progress:
                    self.progress(i - s0 + 1, last - s0 + 1)
            latest_ok = False
            if cur is not None:
                try:
                    _integrity_check(cur.path)
                    # Restore starts from the newest snapshot: the newest
                    # state is restorable only if the chain from it got here.
                    latest_ok = cur.base is snaps[-1] and last_pos.index == last
                except LitestreamError as e:
                    self.problem("%s at %s: %s" % (label, last_pos, e))
        finally:
            indices.close()
            remove_quietly(*staged.values())
        return GenerationReport(first_index=first_index, first_time=first_time, last_pos=last_pos,
                                last_time=last_time, latest_ok=latest_ok, problems=tuple(self.problems),
                                notes=tuple(self.notes), **info)

    def open_snapshot(self, snap: SnapshotInfo) -> Optional[_Chain]:
        """Decompress a snapshot into a new database; None (and a problem) if it is bad."""
        self.n_db += 1
        path = os.path.join(self.scratch, "db-%d" % self.n_db)
        try:
            return _Chain(path, _restore_snapshot(self.replica, snap, path), snap)
        except _Vanished:
            raise
        except LitestreamError as e:
            self.problem(str(e))
            _remove_db(path)
            return None

    def replay(self, i: int, group, wal, ends, err, chains: List[_Chain]) -> List[_Chain]:
        """Check one staged WAL index and replay it onto each chain; return the chains it replayed onto."""
        name = self.name
        try:
            if err is not None:
                raise err
            hdr, committed, total = _scan_staged_wal(wal, 0, ends, name)
            # Frames SQLite will not replay get their chain checked here:
            # all of them when no snapshot reaches this index, else those
            # after the last commit.
            start = 0 if not chains else committed
            if start < total:
                msg = _check_chain(wal, hdr, ends, name, start)
                if msg:
                    self.problem(msg)
            for c in list(chains):
                if c.page_size != hdr.page_size:
                    self.problem("%s: page size %d does not match the wal's %d (%s)"
                                 % (name(c.base), c.page_size, hdr.page_size, name(group[0])))
                    chains.remove(c)
            errors = []
            for k, c in enumerate(chains):
                src = wal
                if k < len(chains) - 1:
                    src = wal + "-copy"
                    shutil.copyfile(wal, src)
                try:
                    _apply_wal(c.path, src, c.page_size, ends, name, expect=committed)
                except _Vanished:
                    raise
                except LitestreamError as e:
                    errors.append((c, e))
            if errors and len(errors) == len(chains):
                c, e = errors[0]
                # A broken chain is the WAL's fault; anything else may be the base's.
                raise e if isinstance(e, ChecksumMismatchError) else LitestreamError(
                    "%s (replayed onto %s)" % (e, name(c.base)))
            for c, e in errors:
                chains.remove(c)
                self.problem("%s: wal index %08x does not replay onto it (%s), though it does onto the "
                             "state from snapshot %08x" % (name(c.base), i, e.__cause__ or e, chains[0].base.index))
            return chains
        except _Vanished:
            raise
        except LitestreamError as e:
            self.problem(str(e))
            return []


def verify_generation(replica: Replica, generation: str, parallelism: int = DEFAULT_RESTORE_PARALLELISM,
                      progress=None) -> GenerationReport:
    """Check every object of a generation and build its newest state (see GenerationReport).

    Snapshots must decode with their checksums; each WAL index must run
    from offset 0 without a gap, decode, and keep one salt and an unbroken
    checksum chain from segment to segment; each WAL index is replayed
    onto the snapshot at or below it, and where a newer snapshot starts
    after a complete index, the two must agree.  Works in a private temp
    dir (under TMPDIR) that is removed afterwards: at most two database
    copies plus `parallelism` staged indices.  An object deleted meanwhile
    (retention) makes verify start again from a fresh listing.
    progress(done, total) is called after each index.
    """
    vanished = None
    for _ in range(RESTORE_REPLAN_ATTEMPTS):
        scratch = tempfile.mkdtemp(prefix="litestream-verify-")
        try:
            return _GenerationVerifier(replica, generation, scratch, parallelism, progress).run()
        except _Vanished as e:
            vanished = e
            replica.logger.info("%s: %s; verifying generation %s again from a fresh listing", replica._label(), e,
                                generation)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return GenerationReport(generation, problems=("%s (objects vanished %d times while verifying)"
                                                  % (vanished, RESTORE_REPLAN_ATTEMPTS),))


def verify_replica(replica: Replica, generation: str = "", parallelism: int = DEFAULT_RESTORE_PARALLELISM,
                   progress=None) -> "tuple[str, List[GenerationReport]]":
    """Verify every generation of a replica, or one; return (the generation restore picks, reports).

    progress(generation, done, total) is called after each WAL index.
    """
    gens = replica.client.generations()
    if generation:
        if generation not in gens:
            raise LitestreamError("generation %s not found in %s" % (generation, replica.client))
        gens = [generation]
    _, latest = calc_restore_target([replica], generation)
    reports = []
    for g in gens:
        p = (lambda done, total, g=g: progress(g, done, total)) if progress else None
        reports.append(verify_generation(replica, g, parallelism, p))
    return latest, reports


###############################################################################
# Config
###############################################################################


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica of a DB, from a [replica:DB:NAME] section, a URL or a path.

    Fields are the INI keys in snake_case, resolved at load time: type comes
    from the url scheme, else the type key, else "file".  A file replica's
    path is absolute.  For an s3 url, host is the URL host as written (the
    S3 client's parse_s3_host derives bucket, region and endpoint from it;
    fields set here win) and path is the key prefix.  force_path_style
    defaults to true when endpoint is set.  retention <= 0 disables
    retention; snapshot_interval and validation_interval 0 mean off.
    """

    name: str = ""
    type: str = "file"
    url: str = ""
    host: str = ""
    path: str = ""
    retention: float = DEFAULT_RETENTION
    retention_check_interval: float = DEFAULT_RETENTION_CHECK_INTERVAL
    retention_min_snapshots: int = DEFAULT_RETENTION_MIN_SNAPSHOTS
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    snapshot_interval: float = 0.0
    validation_interval: float = 0.0
    max_lag: float = 0.0
    bucket: str = ""
    region: str = ""
    endpoint: str = ""
    force_path_style: bool = False
    skip_verify: bool = False
    access_key_id: str = ""
    secret_access_key: str = ""
    sse: str = ""
    sse_kms_key_id: str = ""
    sse_c_key: str = ""
    ca_bundle: str = ""
    sign_payload: bool = True
    part_size: int = DEFAULT_S3_PART_SIZE
    concurrency: int = DEFAULT_S3_CONCURRENCY
    max_retries: int = DEFAULT_S3_MAX_RETRIES


@dataclass(frozen=True)
class DBConfig:
    """One database from a [db:NAME] section (or the replicate CLI arguments).

    path is absolute.  meta_path "" means "<dir>/.<file>-litestream".
    monitor_interval 0 disables the sync loop, checkpoint_interval 0 the
    timed checkpoint, and max_checkpoint_page_count 0 the RESTART checkpoint.
    """

    name: str
    path: str
    meta_path: str = ""
    monitor_interval: float = DEFAULT_MONITOR_INTERVAL
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    min_checkpoint_page_count: int = DEFAULT_MIN_CHECKPOINT_PAGE_N
    max_checkpoint_page_count: int = DEFAULT_MAX_CHECKPOINT_PAGE_N
    replicas: Tuple[ReplicaConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole configuration: [litestream] keys and the databases.

    log_level is normalized to DEBUG, INFO, WARN or ERROR.  config_path is
    the file it was read from ("" in CLI mode).
    """

    addr: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    exec: str = ""
    log_level: str = "INFO"
    log_stderr: bool = False
    log_type: str = "text"
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    lz4_workers: int = DEFAULT_LZ4_WORKERS
    heartbeat_url: str = ""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    dbs: Tuple[DBConfig, ...] = ()
    config_path: str = ""

    def db_config(self, path: str) -> Optional[DBConfig]:
        """Return the DB whose path is path (after ~ and abspath), as Go's Config.DBConfig."""
        path = _abspath(path)
        return next((db for db in self.dbs if db.path == path), None)


def default_config_path() -> str:
    """Return $LITESTREAM_CONFIG, else the first of DEFAULT_CONFIG_PATHS that exists.

    With neither /etc/litestream.ini nor /etc/litestream.yml present the
    answer is the .ini, so the error names the native format.
    """
    v = os.environ.get("LITESTREAM_CONFIG")
    if v:
        return v
    return next((p for p in DEFAULT_CONFIG_PATHS if os.path.exists(p)), DEFAULT_CONFIG_PATHS[0])


_DURATION_UNITS = {"ns": 1, "us": 10**3, "\u00b5s": 10**3, "\u03bcs": 10**3, "ms": 10**6,
                   "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}
_DURATION_PART = r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h|d)"
_DURATION_RE = re.compile(r"([-+]?)((?:%s)+)" % _DURATION_PART, re.ASCII)
_DURATION_PART_RE = re.compile(_DURATION_PART, re.ASCII)


def parse_duration(s: str) -> float:
    """Return the seconds in a Go duration string such as "1h30m" or "500ms".

    The syntax is Go's time.ParseDuration (units ns, us, µs, ms, s, m, h; an
    optional sign; fractions) plus d for 24-hour days.  A number without a
    unit is a ValueError, except "0".
    """
    m = _DURATION_RE.fullmatch(s)
    if m is None:
        if s in ("0", "+0", "-0"):
            return 0.0
        bare = re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", s, re.ASCII)
        raise ValueError("invalid duration %r (%sexpected e.g. 1s, 500ms, 1h30m, 2d)"
                         % (s, "missing unit; " if bare else ""))
    # Sum whole nanoseconds, as Go does, so "300us" is exactly 300000ns.
    ns = sum(int(decimal.Decimal(num) * _DURATION_UNITS[unit])
             for num, unit in _DURATION_PART_RE.findall(m.group(2)))
    return (-ns if m.group(1) == "-" else ns) / 1e9


def format_duration(ns: int) -> str:
    """Return ns nanoseconds as Go's time.Duration.String: "5m48s", "-35ms", "1h0m0s", "0s"."""
    u = abs(ns)

    def frac(v, prec):
        # v / 10**prec as whole part and ".digits" without trailing zeros.
        whole, f = divmod(v, 10 ** prec)
        digits = ("%0*d" % (prec, f)).rstrip("0") if prec else ""
        return whole, "." + digits if digits else ""

    if u == 0:
        return "0s"
    if u < 10**9:
        unit, prec = ("ns", 0) if u < 10**3 else ("\u00b5s", 3) if u < 10**6 else ("ms", 6)
        whole, f = frac(u, prec)
        out = "%d%s%s" % (whole, f, unit)
    else:
        secs, f = frac(u, 9)
        out = "%d%ss" % (secs % 60, f)
        if secs >= 60:
            out = "%dm%s" % (secs // 60 % 60, out)
            if secs >= 3600:
                out = "%dh%s" % (secs // 3600, out)
    return "-" + out if ns < 0 else out


# After "$": "$" (ours), "{NAME}", an unclosed "{", one special character
# or digit, or a run of letters, digits and "_" (Go's os.getShellName).
_ENV_RE = re.compile(r"\$(\$|\{[^}]*\}|\{|[*#$@!?\-0-9]|\w+)", re.ASCII)


def expand_env(text: str, env: Optional[Mapping[str, str]] = None) -> str:
    """Replace $VAR and ${VAR} in text with their values in env (default os.environ).

    This is Go's os.ExpandEnv: an unset variable becomes "", "${}" and an
    unclosed "${" are dropped, and a "$" before anything else stays.  One
    addition: "$$" is a literal "$" (Go reads it as the unset variable "$"
    and produces ""), so a secret can still contain a dollar sign.
    """
    env = os.environ if env is None else env

    def value(m):
        name = m.group(1)
        if name == "$":
            return "$"
        if name.startswith("{"):
            name = name[1:-1] if name.endswith("}") else ""
        return env.get(name, "") if name else ""

    return _ENV_RE.sub(value, text)


# load_config's expand_env flag hides the function inside it.
_expand_env = expand_env

_URL_RE = re.compile(r"^\w+://", re.ASCII)


def is_url(s: str) -> bool:
    """Report whether s looks like a URL ("scheme://…"), as Go's isURL."""
    return bool(_URL_RE.match(s))


def _clean(p):
    # Go's path.Clean; posixpath.normpath alone keeps a leading "//".
    p = posixpath.normpath(p or ".")
    return "/" + p.lstrip("/") if p.startswith("//") else p


def parse_replica_url(url: str) -> Tuple[str, str, str, Dict[str, str]]:
    """Return (scheme, host, path, query) of a replica URL, as Go's ParseReplicaURL.

    file:///a/b gives path "/a/b" (file://a/b gives "/a/b" too, as in Go).
    Other schemes give the cleaned path without its leading "/", and ""
    for the bucket root where Go gives ".".  Percent-escapes are decoded.
    query maps each query parameter to its value; a repeated one is an error.
    """
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # A non-numeric port raises ValueError here.
        pairs = urllib.parse.parse_qsl(u.query, keep_blank_values=True, strict_parsing=True) if u.query else []
    except ValueError as e:
        raise ConfigError("invalid replica url %r: %s" % (url, e)) from None
    if not u.scheme:
        raise ConfigError("replica url scheme required: %s" % url)
    if not is_url(url):
        raise ConfigError("invalid replica url %r (expected SCHEME://HOST/PATH)" % url)
    query = {}
    for key, value in pairs:
        if key in query:
            raise ConfigError("replica url %r: query parameter %r given twice" % (url, key))
        query[key] = value
    host = u.netloc.rpartition("@")[2]
    path = urllib.parse.unquote(u.path)
    if u.scheme == "file":
        path, host = _clean("//" + host + path if host else path), ""
    else:
        path = _clean(path)
        path = path[1:] if path.startswith("/") else path
    return u.scheme, host, "" if path in (".", "/") else path, query


def _abspath(v):
    return os.path.abspath(os.path.expanduser(v))


def _bool(v):
    b = configparser.ConfigParser.BOOLEAN_STATES.get(v.lower())
    if b is None:
        raise ValueError("invalid boolean %r (expected true or false)" % v)
    return b


def _duration(strict=False):
    # Durations that must be >= 0, or > 0 when strict.
    def convert(v):
        d = parse_duration(v)
        if d <= 0 if strict else d < 0:
            raise ValueError("duration %r must be %s" % (v, "greater than 0" if strict else "0 (off) or more"))
        return d
    return convert


def _int(lo):
    def convert(v):
        if not re.fullmatch(r"[-+]?\d+", v, re.ASCII) or int(v) < lo:
            raise ValueError("invalid value %r (expected an integer >= %d)" % (v, lo))
        return int(v)
    return convert


def _choice(*choices):
    def convert(v):
        if v not in choices:
            raise ValueError("invalid value %r (expected %s)" % (v, " or ".join(choices)))
        return v
    return convert


def _log_level(v):
    level = {"WARNING": "WARN"}.get(v.upper(), v.upper())
    if level not in ("DEBUG", "INFO", "WARN", "ERROR"):
        raise ValueError("invalid log level %r (expected DEBUG, INFO, WARN or ERROR)" % v)
    return level


def _addr(v):
    parse_bind_addr(v)
    return v


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _part_size(v):
    m = re.fullmatch(r"(\d+)\s*([a-z]*)", v, re.ASCII | re.IGNORECASE)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("invalid size %r (expected bytes, or a number with KiB, MiB, GiB, KB, MB or GB)" % v)
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not 5 * 2**20 <= n <= 5 * 2**30:
        raise ValueError("part size %r out of range (S3 takes 5MiB to 5GiB)" % v)
    return n


def _heartbeat_url(v):
    u = urllib.parse.urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return v


def _sse_c_key(v):
    try:
        ok = len(base64.b64decode(v, validate=True)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("invalid sse-c-key (expected the base64 of a 32-byte key)")
    return v


_GLOBAL_KEYS = {
    "addr": _addr, "access-key-id": str, "secret-access-key": str, "exec": str,
    "log-level": _log_level, "log-stderr": _bool, "log-type": _choice("text", "json"),
    "shutdown-timeout": _duration(), "heartbeat-url": _heartbeat_url, "heartbeat-interval": _duration(strict=True),
    "lz4-workers": _int(0),
}
_DB_KEYS = {
    "path": _abspath, "meta-path": _abspath, "replica": str,
    "monitor-interval": _duration(), "checkpoint-interval": _duration(),
    "min-checkpoint-page-count": _int(1), "max-checkpoint-page-count": _int(0),
}
_S3_KEYS = {
    "bucket": str, "region": str, "endpoint": str, "force-path-style": _bool,
    "skip-verify": _bool, "access-key-id": str, "secret-access-key": str,
    "sse": _choice("AES256", "aws:kms"), "sse-kms-key-id": str, "sse-c-key": _sse_c_key,
    "ca-bundle": _abspath, "sign-payload": _bool, "part-size": _part_size,
    "concurrency": _int(1), "max-retries": _int(0),
}
_REPLICA_KEYS = dict({
    "type": str, "url": str, "path": str, "retention": parse_duration,
    "retention-check-interval": _duration(strict=True), "retention-min-snapshots": _int(1),
    "sync-interval": _duration(strict=True),
    "snapshot-interval": _duration(), "validation-interval": _duration(),
    "max-lag": _duration(strict=True),
}, **_S3_KEYS)
# S3 keys that may also come in an s3:// URL's query; credentials may not.
_URL_QUERY_KEYS = sorted(set(_S3_KEYS) - {"bucket", "access-key-id", "secret-access-key", "sse-c-key"})
_UNSUPPORTED_KEYS = {"account-name": "abs", "account-key": "abs", "host": "sftp",
                     "user": "sftp", "password": "sftp", "key-path": "sftp"}


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(word, list(choices), n=1)
    return " (did you mean %r?)" % close[0] if close else ""


def _unknown_key(key, schema):
    if key == "age" or key.startswith(("age-", "age.", "age_")):
        return "client-side age encryption is not supported by litestream.py (use sse or sse-c-key)"
    if key in _UNSUPPORTED_KEYS and "type" in schema:
        return "%s replicas are not supported by litestream.py" % _UNSUPPORTED_KEYS[key]
    return "unknown key" + _did_you_mean(key, schema)


def _convert(raw, schema, loc):
    # Check and convert raw {key: text} to {field: value}; "" means the default.
    out = {}
    for key, text in raw.items():
        if key not in schema:
            raise ConfigError("%s: %s" % (loc(key), _unknown_key(key, schema)))
        try:
            if text != "":
                out[key.replace("-", "_")] = schema[key](text)
        except ValueError as e:
            raise ConfigError("%s: %s" % (loc(key), e)) from None
    return out


def _check_type(typ):
    if typ in ("gcs", "abs", "sftp"):
        raise ValueError("replica type %r is not supported by litestream.py (expected file or s3)" % typ)
    if typ not in ("file", "s3"):
        raise ValueError("unknown replica type %r (expected file or s3)" % typ)


def _replica_config(raw, name, loc):
    # Build one ReplicaConfig from its raw keys; an empty name means the type.
    f = _convert(raw, _REPLICA_KEYS, loc)
    url, typ, host, upath = f.get("url", ""), f.get("type", ""), "", ""
    # Derive the type as Go does: the url's scheme, else type, else file.
    if url:
        try:
            scheme, host, upath, query = parse_replica_url(url)
            _check_type(scheme)
            if typ and typ != scheme:
                raise ValueError("type %r conflicts with the url scheme %r" % (typ, scheme))
        except (ConfigError, ValueError) as e:
            raise ConfigError("%s: %s" % (loc("url"), e)) from None
        for key in ("path", "bucket"):
            if key in f:
                raise ConfigError("%s: cannot be combined with url (put it in the url)" % loc(key))
        for key in query:
            if scheme != "s3":
                raise ConfigError("%s: query parameters are only valid in s3 urls" % loc("url"))
            if key not in _URL_QUERY_KEYS:
                raise ConfigError("%s: unknown query parameter %r%s"
                                  % (loc("url"), key, _did_you_mean(key, _URL_QUERY_KEYS)))
            if raw.get(key):
                raise ConfigError("%s: set both as a key and in the url query" % loc(key))
        f.update(_convert(query, _REPLICA_KEYS, lambda key: "%s query parameter %s" % (loc("url"), key)))
        typ = scheme
    else:
        typ = typ or "file"
        try:
            _check_type(typ)
        except ValueError as e:
            raise ConfigError("%s: %s" % (loc("type"), e)) from None
    if typ == "file":
        for key in raw:
            if key in _S3_KEYS and raw[key]:
                raise ConfigError("%s: only valid for s3 replicas" % loc(key))
    if is_url(f.get("path", "")):
        raise ConfigError("%s: looks like a url (use url = %s)" % (loc("path"), f["path"]))
    path = f.get("path", upath)
    if typ == "file":
        if not path:
            raise ConfigError("%s: required for a file replica (or url = file:///DIR)" % loc("path"))
        path = _abspath(path)
    elif not host and not f.get("bucket"):
        raise ConfigError("%s: required for an s3 replica (or url = s3://BUCKET/PATH)" % loc("bucket"))
    f.setdefault("force_path_style", bool(f.get("endpoint")))
    if f.get("sse") and f.get("sse_c_key"):
        raise ConfigError("%s: cannot be combined with sse" % loc("sse-c-key"))
    if f.get("sse_kms_key_id") and f.get("sse") != "aws:kms":
        raise ConfigError("%s: requires sse = aws:kms" % loc("sse-kms-key-id"))
    f.update(name=name or typ, type=typ, host=host, path=path)
    return ReplicaConfig(**f)


###############################################################################
# Config files: INI and the YAML subset
###############################################################################


class _YAMLMap(dict):
    """A YAML mapping; line is where it starts and lines[key] where each key is."""

    def __init__(self, line):
        super().__init__()
        self.line = line
        self.lines = {}


class _YAMLSeq(list):
    """A YAML sequence; line is where it starts and lines[i] where item i is."""

    def __init__(self, line):
        super().__init__()
        self.line = line
        self.lines = []


_YAML_NULLS = ("", "~", "null", "Null", "NULL")
_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
                 "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
                 "L": "\u2028", "P": "\u2029"}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_YAML_UNSUPPORTED = {
    "&": "anchors (&) are not supported",
    "*": "aliases (*) are not supported",
    "!": "tags (!) are not supported",
    "|": "block scalars (| and >) are not supported; write the value on one line",
    ">": "block scalars (| and >) are not supported; write the value on one line",
    "{": "flow mappings ({...}) are not supported; use one 'key: value' per line",
    "?": "complex keys (?) are not supported",
}


def _yaml_is_item(s):
    return s == "-" or s.startswith("- ")


class _YAMLReader:
    """Read the block-style YAML subset that Go Litestream configs are written in.

    Accepted: block mappings and sequences (including "- key: value" items
    and sequences at their key's indentation), plain, 'single' and "double"
    quoted scalars on one line, one-line flow sequences of scalars
    ("[a, 'b']"), comments, and one leading "---".  Scalars stay text;
    null (empty, ~, null) is "".  Everything else -- anchors, aliases,
    tags, block scalars, flow mappings, multi-line scalars, several
    documents, directives, tabs, duplicate keys -- raises ConfigError
    naming FILE:LINE.  read() returns a _YAMLMap, _YAMLSeq or str.
    """

    def __init__(self, filename: str, text: str):
        self.filename = filename
        self.lines = []  # [lineno, indent, text without indentation]
        started = ended = False
        if text.startswith("\ufeff"):
            text = text[1:]
        for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            body = line.lstrip(" ")
            indent = len(line) - len(body)
            if not body.strip(" \t") or body.startswith("#"):
                continue
            if "\t" in body and self._tab_outside_quotes(body):
                self.error(n, "tab character (YAML indents and separates with spaces only)")
            if indent == 0 and re.match(r"(---|\.\.\.)( |$)", body):
                rest = body[3:].strip()
                if body.startswith("---") and (started or ended or self.lines):
                    self.error(n, "multiple documents are not supported (one file, one document)")
                if rest and not rest.startswith("#"):
                    self.error(n, "content on the %r line is not supported" % body[:3])
                if body.startswith("..."):
                    ended = True
                started = started or body.startswith("---")
                continue
            if ended:
                self.error(n, "multiple documents are not supported (one file, one document)")
            if indent == 0 and body.startswith("%"):
                self.error(n, "directives (%) are not supported")
            self.lines.append([n, indent, body])

    @staticmethod
    def _tab_outside_quotes(s):
        # Tabs inside a quoted scalar or a comment are text; elsewhere they
        # are refused (as PyYAML does).
        quote, escaped = "", False
        for i, ch in enumerate(s):
            if escaped:
                escaped = False
            elif quote:
                escaped = quote == '"' and ch == "\\"
                if ch == quote:
                    quote = ""
            elif ch == "#" and (i == 0 or s[i - 1] == " "):
                return False
            elif ch in "\"'" and re.search(r"(^|[:-] |[\[,]) *$", s[:i]):
                quote = ch
            elif ch == "\t":
                return True
        return False

    def error(self, lineno, msg):
        raise ConfigError("%s:%d: %s" % (self.filename, lineno, msg))

    def read(self):
        if not self.lines:
            return ""
        node, i = self._block(0, self.lines[0][1])
        if i < len(self.lines):
            self.error(self.lines[i][0], "unexpected %r at this indentation" % self.lines[i][2])
        return node

    def _block(self, i, indent):
        # The node starting at line i, indented by indent.
        n, _, s = self.lines[i]
        if _yaml_is_item(s):
            return self._seq(i, indent)
        if self._key(n, s) is not None:
            return self._map(i, indent)
        value = self._inline(n, s)
        i += 1
        if i < len(self.lines) and self.lines[i][1] >= indent:
            self.error(self.lines[i][0], "multi-line values are not supported; write the value on one "
                       "line, quoted if needed")
        return value, i

    def _map(self, i, indent):
        m = _YAMLMap(self.lines[i][0])
        while i < len(self.lines):
            n, ind, s = self.lines[i]
            if ind < indent:
                break
            if ind > indent:
                self.error(n, "unexpected indentation")
            if _yaml_is_item(s):
                self.error(n, "list item without a key (put 'key:' on the line before it)")
            kv = self._key(n, s)
            if kv is None:
                self._inline(n, s)  # Names anchors, tags and the like.
                hint = " (INI files start with a [section] line)" if re.match(r"[\w-]+\s*=", s) else ""
                self.error(n, "expected 'key: value', found %r%s" % (s, hint))
            key, rest = kv
            if key in m:
                self.error(n, "duplicate key %r (first on line %d)" % (key, m.lines[key]))
            m.lines[key] = n
            i += 1
            if rest == "" or rest.startswith("#"):
                if i < len(self.lines) and self.lines[i][1] > indent:
                    m[key], i = self._block(i, self.lines[i][1])
                elif i < len(self.lines) and self.lines[i][1] == indent and _yaml_is_item(self.lines[i][2]):
                    m[key], i = self._seq(i, indent)
                else:
                    m[key] = ""
            else:
                m[key] = self._inline(n, rest)
                if i < len(self.lines) and self.lines[i][1] > indent:
                    nn, _, ns = self.lines[i]
                    self.error(nn, "unexpected indentation" if self._key(nn, ns) else
                               "multi-line values are not supported; write the value on one line, quoted if needed")
        return m, i

    def _seq(self, i, indent):
        q = _YAMLSeq(self.lines[i][0])
        while i < len(self.lines):
            n, ind, s = self.lines[i]
            if ind < indent or (ind == indent and not _yaml_is_item(s)):
                break
            if ind > indent:
                self.error(n, "unexpected indentation")
            body = s[1:].lstrip(" ")
            q.lines.append(n)
            if body == "" or body.startswith("#"):
                i += 1
                if i < len(self.lines) and self.lines[i][1] > indent:
                    value, i = self._block(i, self.lines[i][1])
                else:
                    value = ""
            else:
                # "- key: value": the item is a node starting at this column.
                self.lines[i] = [n, ind + len(s) - len(body), body]
                value, i = self._block(i, self.lines[i][1])
            q.append(value)
        return q, i

    def _key(self, n, s):
        # (key, rest after ": ") if line text s starts with a mapping key, else None.
        if s[0] in "\"'":
            key, rest = self._quoted(n, s)
            rest = rest.lstrip(" ")
            if rest == ":" or rest.startswith(": "):
                return key, rest[1:].lstrip(" ")
            return None
        if s[0] in _YAML_UNSUPPORTED or s[0] in "[]{},#@`%" or _yaml_is_item(s):
            return None
        m = re.search(r" #|:( |$)", s)
        if m is None or m.group(0) == " #":
            return None
        key = s[:m.start()].rstrip(" ")
        return (key, s[m.end():].lstrip(" ")) if key else None

    def _inline(self, n, s):
        # The scalar or flow sequence that is the rest s of line n.
        c = s[0]
        if c in "\"'":
            value, rest = self._quoted(n, s)
            self._end(n, rest)
            return value
        if c == "[":
            return self._flow_seq(n, s)
        if c in _YAML_UNSUPPORTED:
            self.error(n, _YAML_UNSUPPORTED[c])
        if c in "@`%,]}" or _yaml_is_item(s) or s in (":", "?") or s.startswith((": ", "? ")):
            self.error(n, "a value cannot start with %r; quote it" % c)
        value = s.split(" #", 1)[0].rstrip(" ")
        if re.search(r":( |$)", value):
            self.error(n, "mapping values are not allowed here (quote a value that holds ': ')")
        return "" if value in _YAML_NULLS else value

    def _end(self, n, rest):
        rest = rest.lstrip(" ")
        if rest and not rest.startswith("#"):
            self.error(n, "unexpected %r after the value" % rest)

    def _quoted(self, n, s):
        # (text, rest of the line) of the quoted scalar s starts with.
        q, out, i = s[0], [], 1
        while i < len(s):
            ch = s[i]
            if ch == q:
                if q == "'" and s[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                return "".join(out), s[i + 1:]
            if ch == "\\" and q == '"':
                e = s[i + 1:i + 2]
                if e in _YAML_ESCAPES:
                    out.append(_YAML_ESCAPES[e])
                    i += 2
                    continue
                k = _YAML_HEX_ESCAPES.get(e)
                digits = s[i + 2:i + 2 + k] if k else ""
                if not k or not re.fullmatch(r"[0-9a-fA-F]{%d}" % k, digits) or int(digits, 16) > 0x10FFFF:
                    self.error(n, "invalid escape %r in a double-quoted value" % s[i:i + 2 + (k or 0)])
                out.append(chr(int(digits, 16)))
                i += 2 + k
                continue
            out.append(ch)
            i += 1
        self.error(n, "quoted value not closed on this line (multi-line values are not supported)")

    def _flow_seq(self, n, s):
        q, i = _YAMLSeq(n), 1
        while True:
            while s[i:i + 1] == " ":
                i += 1
            c = s[i:i + 1]
            if c == "]":
                self._end(n, s[i + 1:])
                return q
            if c == "":
                self.error(n, "flow sequence not closed on this line ([a, b] must fit on one line)")
            if c in "\"'":
                value, rest = self._quoted(n, s[i:])
                i = len(s) - len(rest)
            elif c in "[{":
                self.error(n, "nested flow collections are not supported")
            elif c in _YAML_UNSUPPORTED or c in "@`%,#":
                self.error(n, _YAML_UNSUPPORTED.get(c, "a value cannot start with %r; quote it" % c))
            else:
                m = re.compile(r"[^,\][{}]*").match(s, i)
                value = m.group(0).split(" #", 1)[0].rstrip(" ")
                if " #" in m.group(0) or s[m.end():m.end() + 1] in ("[", "{", "}"):
                    self.error(n, "flow sequences hold plain or quoted values only")
                if ":" in value or "?" in value:
                    # YAML 1.1 readers (PyYAML, and Go's yaml.v2) split them there.
                    self.error(n, "quote values that hold ':' or '?' inside [...]")
                i = m.end()
                value = "" if value in _YAML_NULLS else value
            q.append(value)
            q.lines.append(n)
            while s[i:i + 1] == " ":
                i += 1
            if s[i:i + 1] == ",":
                i += 1
            elif s[i:i + 1] == "":
                self.error(n, "flow sequence not closed on this line ([a, b] must fit on one line)")
            elif s[i:i + 1] != "]":
                self.error(n, "expected ',' or ']' in the flow sequence")


_SECRET_KEYS = ("secret-access-key", "sse-c-key")  # `config` prints these only with -show-secrets


class _Section:
    """One block of settings as written, before checking: what both formats read into.

    kind is "litestream", "db" or "replica".  db ties a replica to its DB
    (the INI NAME, or "dbs[N]" in YAML).  name is the DB's or replica's
    name; "" means the DB's path or the replica's type.  raw maps each key
    to its text as written.  where(key) names a key for an error
    ("FILE:[db:app] path", "FILE:7: dbs[0].path") and where() the block;
    label is how other errors refer to the block ("[db:app]", "dbs[0]").
    """

    __slots__ = ("kind", "db", "name", "raw", "where", "label")

    def __init__(self, kind, db, name, raw, where, label):
        self.kind, self.db, self.name, self.raw, self.where, self.label = kind, db, name, raw, where, label

    def with_raw(self, raw) -> "_Section":
        return _Section(self.kind, self.db, self.name, raw, self.where, self.label)


def _read_text(filename):
    try:
        with open(os.path.expanduser(filename), encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError("config file not found: %s" % filename) from None
    except OSError as e:
        raise ConfigError("%s: cannot read config file: %s" % (filename, e.strerror)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("%s: cannot read config file: not UTF-8 text (%s)" % (filename, e.reason)) from None


def _ini_sections(filename, text):
    # default_section is one no header can name: [DEFAULT] would otherwise
    # copy its keys into every section.
    parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="\0",
                                       delimiters=("=",), inline_comment_prefixes=(";", "#"))
    parser.optionxform = str  # Keys are case-sensitive, as in Go's YAML.
    try:
        parser.read_string(text, source=filename)
    except configparser.DuplicateSectionError as e:
        raise ConfigError("%s:%s: [%s]: duplicate section" % (filename, e.lineno, e.section)) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError("%s:%s: [%s] %s: duplicate key" % (filename, e.lineno, e.section, e.option)) from None
    except configparser.MissingSectionHeaderError as e:
        line = e.line.strip()
        hint = " (this looks like YAML: name the file .yml)" if re.match(r"[\w-]+:(\s|$)", line) else ""
        raise ConfigError("%s:%d: %r comes before any [section] header%s"
                          % (filename, e.lineno, line, hint)) from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0]
        line = text.splitlines()[lineno - 1].strip()
        raise ConfigError("%s:%d: cannot parse %r (expected 'key = value' or '[section]')"
                          % (filename, lineno, line)) from None
    sections = []
    for section in parser.sections():
        kind, _, rest = section.partition(":")
        parts = rest.split(":")
        if section == "litestream":
            kind, db, name = "litestream", "", ""
        elif kind == "db" and rest and len(parts) == 1:
            db, name = rest, rest
        elif kind == "replica" and len(parts) == 2 and all(parts):
            db, name = parts
        else:
            hint = {"db": " (expected [db:NAME], NAME without ':')",
                    "replica": " (expected [replica:DB:NAME])"}.get(kind)
            candidates = ["litestream", "db:" + rest, "replica:" + rest]
            raise ConfigError("%s:[%s]: unknown section%s"
                              % (filename, section, hint or _did_you_mean(section, candidates)))

        def where(key=None, section=section):
            return "%s:[%s]%s" % (filename, section, " " + key if key else "")
        sections.append(_Section(kind, db, name, dict(parser.items(section)), where, "[%s]" % section))
    return sections


# Go's YAML nests the log keys: logging.level is the INI's log-level.
_YAML_LOGGING = {"level": "log-level", "type": "log-type", "stderr": "log-stderr"}


def _yaml_keys(filename, node, prefix, schema, structural, exclude=()):
    # Split a YAML mapping into schema keys (raw text, with their lines and
    # dotted names) and the structural keys the caller reads itself.
    raw, lines, names, extra = {}, {}, {}, {}
    allowed = [k for k in schema if k not in exclude]
    moved = {v: k for k, v in _YAML_LOGGING.items()}
    for key, value in node.items():
        line = node.lines[key]
        if key in structural:
            extra[key] = value
            continue
        if key not in allowed:
            why = ("unknown key (in YAML it is logging.%s)" % moved[key] if key in moved and "dbs" in structural
                   else _unknown_key(key, allowed + list(structural)))
            raise ConfigError("%s:%d: %s%s: %s" % (filename, line, prefix, key, why))
        _yaml_scalar(filename, node, key, prefix)
        raw[key], lines[key], names[key] = value, line, prefix + key
    return raw, lines, names, extra


def _yaml_scalar(filename, node, key, prefix):
    v = node[key]
    if not isinstance(v, str):
        raise ConfigError("%s:%d: %s%s: expected one value, not a %s" % (
            filename, node.lines[key], prefix, key, "list" if isinstance(v, list) else "mapping"))
    return v


def _yaml_list(filename, node, key, prefix, what):
    v = node.get(key, "")
    if v == "":
        return []
    if not isinstance(v, list) or not all(isinstance(item, _YAMLMap) for item in v):
        raise ConfigError("%s:%d: %s%s: expected a list of %s (\"- path: ...\" items)"
                          % (filename, node.lines[key], prefix, key, what))
    return v


def _yaml_where(filename, node, lines, names, label):
    def where(key=None):
        if key is None:
            return "%s:%d: %s" % (filename, node.line, label)
        prefix = label + "." if label else ""
        return "%s:%d: %s" % (filename, lines.get(key, node.line), names.get(key, prefix + key))
    return where


def _yaml_sections(filename, text):
    first = next(((n, line) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")), (0, ""))
    if first[1].startswith("["):
        raise ConfigError("%s:%d: [section] headers are INI, not YAML (name the file .ini)" % (filename, first[0]))
    doc = _YAMLReader(filename, text).read()
    if doc == "":
        doc = _YAMLMap(1)
    if not isinstance(doc, _YAMLMap):
        raise ConfigError("%s:1: expected 'key: value' lines (dbs, addr, logging, ...)" % filename)
    raw, lines, names, extra = _yaml_keys(filename, doc, "", _GLOBAL_KEYS, ("dbs", "logging"),
                                          exclude=_YAML_LOGGING.values())
    logging_ = extra.get("logging", "")
    if logging_ != "":
        if not isinstance(logging_, _YAMLMap):
            raise ConfigError("%s:%d: logging: expected level, type and stderr keys" % (filename, doc.lines["logging"]))
        for key in logging_:
            if key not in _YAML_LOGGING:
                raise ConfigError("%s:%d: logging.%s: unknown key%s"
                                  % (filename, logging_.lines[key], key, _did_you_mean(key, _YAML_LOGGING)))
            target = _YAML_LOGGING[key]
            raw[target] = _yaml_scalar(filename, logging_, key, "logging.")
            lines[target], names[target] = logging_.lines[key], "logging." + key
    sections = [_Section("litestream", "", "", raw, _yaml_where(filename, doc, lines, names, ""), "")]
    for i, item in enumerate(_yaml_list(filename, doc, "dbs", "", "databases")):
        label = "dbs[%d]" % i
        # "replica" is the INI's one-line shorthand; YAML has the list.
        raw, lines, names, extra = _yaml_keys(filename, item, label + ".", _DB_KEYS, ("name", "replicas"),
                                              exclude=("replica",))
        name = _yaml_scalar(filename, item, "name", label + ".") if "name" in extra else ""
        sections.append(_Section("db", label, name, raw, _yaml_where(filename, item, lines, names, label), label))
        for j, r in enumerate(_yaml_list(filename, item, "replicas", label + ".", "replicas")):
            rlabel = "%s.replicas[%d]" % (label, j)
            raw, lines, names, extra = _yaml_keys(filename, r, rlabel + ".", _REPLICA_KEYS, ("name",))
            rname = _yaml_scalar(filename, r, "name", rlabel + ".") if "name" in extra else ""
            sections.append(_Section("replica", label, rname, raw,
                                     _yaml_where(filename, r, lines, names, rlabel), rlabel))
    return sections


def _config_format(path, text):
    # By extension; otherwise an INI file's first line is a [section] or a ";" comment.
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yml", ".yaml", ".ini"):
        return ext[1:].replace("yml", "yaml")
    first = next((line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")), "")
    return "ini" if first.startswith(("[", ";")) else "yaml"


def read_config_sections(path: str) -> "tuple[str, List[_Section]]":
    """Return the format ("ini" or "yaml") of a config file and its sections as written."""
    text = _read_text(path)
    fmt = _config_format(path, text)
    return fmt, (_yaml_sections if fmt == "yaml" else _ini_sections)(path, text)


def load_config(path: str, expand_env: bool = True, env: Optional[Mapping[str, str]] = None) -> Config:
    """Read an INI or YAML config file into a Config, as Go's ReadConfigFile.

    INI: sections [litestream], [db:NAME] and [replica:DB:NAME].  YAML: Go
    Litestream 0.3.13's file (dbs, replicas, logging); a DB is named by its
    path unless it has a name key, a replica by its type unless it has
    one.  Both formats take the same keys (Go's) and are checked alike.
    Files ending .yml or .yaml are YAML, .ini INI; others are INI when they
    start with a [section] or ";" comment.  Unless expand_env is false,
    $VAR and ${VAR} in values (not keys or names) are replaced from env
    (default os.environ).  An empty value means the key's default.
    Relative paths are taken from the current directory, as in Go.
    Raises ConfigError naming FILE:[SECTION] KEY or FILE:LINE: KEY.
    """
    _, sections = read_config_sections(path)
    if expand_env:
        sections = [s.with_raw({k: _expand_env(v, env) for k, v in s.raw.items()}) for s in sections]
    return _build_config(path, sections)


def _build_config(path, sections):
    glob = next((s for s in sections if s.kind == "litestream"), None)
    dbs = {s.db: s for s in sections if s.kind == "db"}
    g = _convert(glob.raw, _GLOBAL_KEYS, glob.where) if glob else {}
    by_db = {key: [] for key in dbs}
    for key, s in dbs.items():
        value = s.raw.get("replica")
        if value:
            where = s.where("replica")
            rc = _replica_config({"url" if is_url(value) else "path": value}, "",
                                 lambda key=None, where=where: where)
            by_db[key].append((lambda key=None, where=where: where, rc))
    for s in sections:
        if s.kind == "replica":
            if s.db not in dbs:
                raise ConfigError("%s: no [db:%s] section%s" % (s.where(), s.db, _did_you_mean(s.db, dbs)))
            by_db[s.db].append((s.where, _replica_config(s.raw, s.name, s.where)))

    db_configs, seen_paths = [], {}
    for key, s in dbs.items():
        f = _convert({k: v for k, v in s.raw.items() if k != "replica"}, _DB_KEYS, s.where)
        if "path" not in f:
            raise ConfigError("%s: required" % s.where("path"))
        if f["path"] in seen_paths:
            raise ConfigError("%s: %s is also the path of %s" % (s.where("path"), f["path"], seen_paths[f["path"]]))
        seen_paths[f["path"]] = s.label
        name = s.name or f["path"]
        rcs, names = [], set()
        for where, rc in by_db[key]:
            if rc.name in names:
                raise ConfigError("%s: duplicate replica name %r in db %r" % (where(), rc.name, name))
            names.add(rc.name)
            # Copy the global credentials to s3 replicas that have none, as Go.
            if rc.type == "s3":
                rc = replace(rc, access_key_id=rc.access_key_id or g.get("access_key_id", ""),
                             secret_access_key=rc.secret_access_key or g.get("secret_access_key", ""))
                if bool(rc.access_key_id) != bool(rc.secret_access_key):
                    missing = "secret-access-key" if rc.access_key_id else "access-key-id"
                    raise ConfigError("%s: required when the other S3 key is set" % where(missing))
            rcs.append(rc)
        db_configs.append(DBConfig(name=name, replicas=tuple(rcs), **f))
    return Config(dbs=tuple(db_configs), config_path=path, **g)


# The keys Go Litestream 0.3.13 reads (cmd/litestream/main.go); `config
# -format yaml` marks the others, which Go ignores.
_GO_KEYS = {"addr", "exec", "access-key-id", "secret-access-key", "log-level", "log-type", "log-stderr",
            "path", "meta-path", "monitor-interval", "checkpoint-interval", "min-checkpoint-page-count",
            "max-checkpoint-page-count", "type", "url", "retention", "retention-check-interval",
            "sync-interval", "snapshot-interval", "validation-interval", "region", "bucket", "endpoint",
            "force-path-style", "skip-verify"}
_INI_UNSAFE = re.compile(r"^\s|\s$|^[;#]|\s[;#]|[\r\n]")
_YAML_PLAIN = re.compile(r"[^\s\-?:,\[\]{}#&*!|>'\"%@`\\](?:[^\x00-\x1f\x7f]*[^\s:])?")


def _yaml_text(v: str) -> str:
    # Plain when it reads back as the same text, else double-quoted.
    if _YAML_PLAIN.fullmatch(v) and v not in _YAML_NULLS and ": " not in v and " #" not in v:
        return v
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, "\\x%02x" % ord(ch)))
        else:
            out.append(ch)
    return '"%s"' % "".join(out)


def _ini_names(sections, cfg):
    # The [db:NAME] of each DB section: its name, else its file name's stem
    # (made unique), since YAML names DBs by path.
    names, used = {}, set()
    dbs = [s for s in sections if s.kind == "db"]
    for s, dc in zip(dbs, cfg.dbs):
        name = s.name
        if not name:
            stem = os.path.splitext(os.path.basename(dc.path))[0].replace(":", "-") or "db"
            name, n = stem, 1
            while name in used:
                n += 1
                name = "%s-%d" % (stem, n)
        if ":" in name or "]" in name:
            raise ConfigError("%s: db name %r cannot be an INI section name (it holds ':' or ']')"
                              % (s.where(), name))
        names[s.db] = name
        used.add(name)
    return names


def format_config(sections: "List[_Section]", cfg: Config, fmt: str) -> str:
    """Return the text of a config in fmt ("ini" or "yaml") from its sections as written.

    Values are copied as written, $VAR references included; cfg (the same
    file, loaded) supplies the replica types and DB paths that YAML leaves
    implicit.  Raises ConfigError naming a value the format cannot hold.
    """
    glob = next((s for s in sections if s.kind == "litestream"), None)
    dbs = [s for s in sections if s.kind == "db"]
    reps = {s.db: [] for s in dbs}
    for s in sections:
        if s.kind == "replica":
            reps[s.db].append(s)
    out = []
    if fmt == "ini":
        names = _ini_names(sections, cfg)

        def put(s, header):
            out.append("[%s]" % header)
            for k, v in s.raw.items():
                if _INI_UNSAFE.search(v):
                    raise ConfigError("%s: cannot be written as INI (leading or trailing space, "
                                      "' ;' or ' #', or a line break)" % s.where(k))
                out.append(("%s = %s" % (k, v)).rstrip())
            out.append("")

        if glob is not None and glob.raw:
            put(glob, "litestream")
        for s, dc in zip(dbs, cfg.dbs):
            put(s, "db:" + names[s.db])
            # A replica is named by its type when it has no name, as Go.
            shorthand = 1 if s.raw.get("replica") else 0
            for r, rc in zip(reps[s.db], dc.replicas[shorthand:]):
                if ":" in rc.name or "]" in rc.name:
                    raise ConfigError("%s: replica name %r cannot be an INI section name" % (r.where(), rc.name))
                put(r, "replica:%s:%s" % (names[s.db], rc.name))
        return "\n".join(out)

    def put(raw, indent, first="", prefix=""):
        # An empty value (the default) is written as null, which Go reads as unset.
        for i, (k, v) in enumerate(raw.items()):
            note = "" if prefix + k in _GO_KEYS or k == "name" else "  # not read by Go 0.3.13"
            line = "%s%s:%s%s" % (first if i == 0 and first else indent, k, " " + _yaml_text(v) if v else "", note)
            out.append(line)

    if glob is not None:
        put({k: v for k, v in glob.raw.items() if k not in _YAML_LOGGING.values()}, "")
        logging_ = {k: glob.raw[v] for k, v in _YAML_LOGGING.items() if v in glob.raw}
        if logging_:
            out.append("logging:")
            put(logging_, "  ", prefix="log-")
    if dbs:
        out.append("dbs:")
    for s in dbs:
        raw = dict([("name", s.name)] if s.name else [])
        raw.update((k, v) for k, v in s.raw.items() if k != "replica")
        put(raw, "    ", "  - ")
        items = []
        if s.raw.get("replica"):
            v = s.raw["replica"]
            items.append({"url" if is_url(v) else "path": v})
        for r in reps[s.db]:
            items.append(dict([("name", r.name)] if r.name else []))
            items[-1].update(r.raw)
        if items:
            out.append("    replicas:")
        for raw in items:
            put(raw, "        ", "      - ")
    return "\n".join(out) + "\n"


def config_from_cli(db_path: str, replica_urls: Sequence[str], **tunables) -> Config:
    """Return the Config of `replicate DB_PATH REPLICA_URL...` (Go's CLI mode).

    Each replica is a URL or a directory path with default settings.  The DB
    is named by its absolute path; replicas are named by type, and a second
    replica of the same type is "<type>-2", then "<type>-3" (Go refuses
    the duplicate name instead).  tunables set DBConfig fields (e.g.
    monitor_interval) and ReplicaConfig fields (e.g. sync_interval) by
    their snake_case names, for the Python API.
    """
    if not replica_urls:
        raise ConfigError("must specify at least one replica URL for %s" % db_path)
    db_fields = {f.name for f in dataclasses.fields(DBConfig)} - {"name", "path", "replicas"}
    rep_fields = {f.name for f in dataclasses.fields(ReplicaConfig)} - {"name", "type", "url", "host", "path"}
    for k in tunables:
        if k not in db_fields | rep_fields:
            raise ConfigError("unknown setting %r%s" % (k, _did_you_mean(k, db_fields | rep_fields)))
    path, replicas, counts = _abspath(db_path), [], {}
    for url in replica_urls:
        raw = {"url" if is_url(url) else "path": url}
        rc = _replica_config(raw, "", lambda _, url=url: "replica %s" % url)
        counts[rc.type] = n = counts.get(rc.type, 0) + 1
        rc = replace(rc, **{k: v for k, v in tunables.items() if k in rep_fields})
        replicas.append(replace(rc, name="%s-%d" % (rc.type, n)) if n > 1 else rc)
    dbc = DBConfig(name=path, path=path, replicas=tuple(replicas),
                   **{k: v for k, v in tunables.items() if k in db_fields})
    return Config(dbs=(dbc,))


def new_replica_client_from_config(rc: "ReplicaConfig") -> ReplicaClient:
    """Return the storage client a replica config describes."""
    if rc.type == "file":
        return FileReplicaClient(rc.path)
    if rc.type == "s3":
        bucket, region, endpoint, path_style = parse_s3_host(rc.host) if rc.host else ("", "", "", False)
        # Keys set in the config win over what the URL's host implies (as
        # Go); the config already defaults force-path-style to true when it
        # sets an endpoint, so an explicit false stays false.
        if rc.endpoint:
            endpoint, path_style = rc.endpoint, rc.force_path_style
        else:
            path_style = rc.force_path_style or path_style
        return S3ReplicaClient(
            rc.bucket or bucket, rc.path, region=rc.region or region, endpoint=endpoint,
            force_path_style=path_style,
            skip_verify=rc.skip_verify, access_key_id=rc.access_key_id,
            secret_access_key=rc.secret_access_key, sse=rc.sse, sse_kms_key_id=rc.sse_kms_key_id,
            sse_c_key=rc.sse_c_key, ca_bundle=rc.ca_bundle, sign_payload=rc.sign_payload,
            part_size=rc.part_size, concurrency=rc.concurrency, max_retries=rc.max_retries)
    raise ConfigError("replica %s: type %r is not supported yet" % (rc.name or rc.url, rc.type))


def new_replica_from_config(db: Optional[DB], rc: "ReplicaConfig") -> Replica:
    """Return a Replica for a replica config (Go's NewReplicaFromConfig)."""
    return Replica(db, rc.name or rc.type, new_replica_client_from_config(rc),
                   sync_interval=rc.sync_interval, retention=rc.retention,
                   retention_check_interval=rc.retention_check_interval,
                   retention_min_snapshots=rc.retention_min_snapshots,
                   snapshot_interval=rc.snapshot_interval, validation_interval=rc.validation_interval,
                   max_lag=rc.max_lag)


def new_db_from_config(dc: "DBConfig", scheduler: Optional[Scheduler] = None,
                       replica_scheduler: Optional[Scheduler] = None) -> DB:
    """Return a DB with its replicas for a DB config (Go's NewDBFromConfig)."""
    db = DB(dc.path, name=dc.name, meta_path=dc.meta_path,
            monitor_interval=dc.monitor_interval,
            checkpoint_interval=dc.checkpoint_interval,
            min_checkpoint_page_n=dc.min_checkpoint_page_count,
            max_checkpoint_page_n=dc.max_checkpoint_page_count,
            scheduler=scheduler, replica_scheduler=replica_scheduler)
    db.replicas = [new_replica_from_config(db, rc) for rc in dc.replicas]
    return db


###############################################################################
# Replicator: the engine for programs (and for `replicate`)
###############################################################################


class ShutdownError(LitestreamError):
    """The final sync did not complete: the message names what is not replicated."""


class Replicator:
    """Replicate SQLite databases from inside a Python program, as `replicate` does.

        with litestream.Replicator("app.db", ["s3://bkt/app", "/mnt/backup/app"]) as r:
            ...                               # the app writes through its own connections
            pos = r.sync()                    # copy the WAL and upload now
            r.wait_replicated(timeout=10.0)   # everything committed so far is in every replica

    replicas are URLs (s3://, file://) or directory paths; keywords set the
    DB and replica tunables of CLI mode (sync_interval, monitor_interval,
    snapshot_interval, retention).  Replicator.from_config(path) runs every
    database of a config file instead.  open() takes each database's
    replicator lock (a second Replicator on the same database, in any
    process, raises LitestreamError), initialises the databases that exist
    and starts the background work on a few shared threads; close() runs
    the final syncs within shutdown_timeout seconds.  Every method may be
    called from any thread.  Threads do not survive fork(): create the
    Replicator in the process that will keep running (see README).
    """

    def __init__(self, db_path: Optional[str] = None, replicas: Sequence[str] = (), *,
                 config: Optional["Config"] = None, background: bool = True,
                 shutdown_timeout: Optional[float] = None, **tunables):
        if config is None:
            if db_path is None:
                raise ConfigError("Replicator: a database path or a config is required")
            if isinstance(replicas, str):
                replicas = [replicas]
            config = config_from_cli(db_path, list(replicas), **tunables)
        elif db_path is not None or replicas or tunables:
            raise ConfigError("Replicator: give either a config or a database path with replicas")
        self.config = config
        self.background = background
        self.shutdown_timeout = config.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
        self.dbs: List[DB] = []
        self.metrics_server: Optional[MetricsServer] = None
        self._schedulers: List[Scheduler] = []
        self._lock = threading.Lock()
        self._opened = self._closed = False
        self._deadline: Optional[_Deadline] = None
        self._heartbeat_task: Optional[Task] = None
        self._heartbeat_sent = -1e18  # monotonic

    @classmethod
    def from_config(cls, path: str, *, expand_env: bool = True, **kw) -> "Replicator":
        """Return a Replicator for every database in a config file."""
        return cls(config=load_config(path, expand_env=expand_env), **kw)

    def __enter__(self) -> "Replicator":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "Replicator(%s)" % ", ".join(repr(dc.path) for dc in self.config.dbs)

    # Lifecycle ---------------------------------------------------------------

    def open(self) -> "Replicator":
        """Lock and initialise every database and start replicating; return self.

        Raises (with nothing left locked or running) if a database is held
        by another replicator or exists but cannot be replicated.
        """
        with self._lock:
            if self._opened:
                return self
            self._opened = True
        cfg = self.config
        if not cfg.dbs:
            raise ConfigError("no databases specified in configuration")
        if cfg.addr:
            # First, as Go: a port taken by someone else fails before any database is touched.
            self.metrics_server = MetricsServer(cfg.addr, healthz=self.healthz, readyz=self.readyz)
            self.metrics_server.start()
            log.info("serving metrics on %s/metrics", self.metrics_server.url)
        # A restore drill holds a worker for minutes: one more for each.
        n_replicas = sum(len(dc.replicas) + sum(1 for rc in dc.replicas if rc.validation_interval > 0)
                         for dc in cfg.dbs)
        db_sched = rep_sched = None
        if self.background:
            # A few threads copy WALs (local I/O); more upload, since a slow
            # store holds a thread for as long as a request takes.
            db_sched = Scheduler("sync", min(4, len(cfg.dbs)), short_tasks=True)
            rep_sched = Scheduler("replica", min(64, max(2, n_replicas)))
            self._schedulers = [db_sched, rep_sched]
        self.dbs = [new_db_from_config(dc, scheduler=db_sched, replica_scheduler=rep_sched) for dc in cfg.dbs]
        for db in self.dbs:
            for r in db.replicas:
                r.logger.info("%s(%s): replicating to: name=%s type=%s db=%s replica=%s", db.name, r.name, r.name,
                              r.client.client_type, db.path, r.client,
                              extra={"type": r.client.client_type, "url": str(r.client)})
        try:
            _parallel([functools.partial(db.open, self.background) for db in self.dbs], "litestream-open")
        except BaseException:
            for db in self.dbs:
                if db._opened:
                    with contextlib.suppress(Exception):
                        db.close(0)
            for s in self._schedulers:
                s.close()
            self._close_metrics_server()
            raise
        if cfg.heartbeat_url and rep_sched is not None:
            self._heartbeat_task = rep_sched.task(self._heartbeat_step, "heartbeat")
            self._heartbeat_task.schedule(min(cfg.heartbeat_interval, HEARTBEAT_CHECK_INTERVAL))
        return self

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop, run the final sync of every database and replica, and release everything.

        Databases close in parallel, all within timeout seconds (default:
        shutdown_timeout; None and no default = no bound).  Raises
        ShutdownError naming what is not replicated if any final sync did not
        complete; everything is closed either way.
        """
        with self._lock:
            if self._closed or not self._opened:
                self._closed = True
                return
            self._closed = True
            self._deadline = dl = _Deadline(self.shutdown_timeout if timeout is None else timeout)
        failed: List[str] = []

        def close_db(db):
            try:
                db.close(deadline=dl)
            except Exception as e:
                failed.append("%s: %s" % (db.name, e))

        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        _parallel([functools.partial(close_db, db) for db in self.dbs], "litestream-close", deadline=dl,
                  on_timeout=lambda: failed.append("final sync did not finish within the shutdown timeout"))
        for s in self._schedulers:
            s.close()
        self._close_metrics_server()
        if failed:
            raise ShutdownError("not everything was replicated: " + "; ".join(sorted(failed)))

    def abort(self) -> None:
        """Cut a close() in progress short: replicas still uploading are abandoned now."""
        dl = self._deadline
        if dl is not None:
            dl.abort()

    def _close_metrics_server(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    # Health ------------------------------------------------------------------

    def healthz(self) -> "tuple[bool, str]":
        """Return (alive, body): whether every database's sync loop is running and recent (/healthz)."""
        if not self._opened or self._closed:
            return False, "replicator is not running\n"
        now, stuck = time.monotonic(), []
        for db in self.dbs:
            if db._background and not db._stopping:
                idle = now - db._last_monitor
                if idle > max(HEALTH_STALL, 10 * db.monitor_interval):
                    stuck.append("%s: sync loop has not run for %.0fs\n" % (db.name, idle))
        return (False, "".join(stuck)) if stuck else (True, "ok\n")

    def readyz(self) -> "tuple[bool, str]":
        """Return (ready, body): whether every replica is within its max-lag and syncing (/readyz).

        When not ready, the body has one line per failing replica naming
        the DB, the replica, the lag and the last error.
        """
        if not self._opened or self._closed:
            return False, "replicator is not running\n"
        lines = [r.problem() for db in self.dbs for r in db.replicas]
        lines = [line + "\n" for line in lines if line]
        return (False, "".join(lines)) if lines else (True, "ok\n")

    def _heartbeat_step(self) -> Optional[float]:
        # Go 0.5's heartbeat: a GET once per interval while everything
        # replicates (each replica's last sync succeeded, within max-lag).
        cfg = self.config
        if time.monotonic() - self._heartbeat_sent < cfg.heartbeat_interval:
            return max(0.0, self._heartbeat_sent + cfg.heartbeat_interval - time.monotonic())
        healthy = all(r.last_success and not r.problem() for db in self.dbs for r in db.replicas)
        if healthy:
            self._heartbeat_sent = time.monotonic()
            send_heartbeat(cfg.heartbeat_url)
            return cfg.heartbeat_interval
        return min(cfg.heartbeat_interval, HEARTBEAT_CHECK_INTERVAL)

    # Syncing -----------------------------------------------------------------

    def _db(self, path: Optional[str]) -> DB:
        if not self._opened or self._closed:
            raise LitestreamError("replicator is not open")
        if path is None:
            if len(self.dbs) != 1:
                raise LitestreamError("replicator has %d databases: name one (%s)"
                                      % (len(self.dbs), ", ".join(db.path for db in self.dbs)))
            return self.dbs[0]
        p = os.path.abspath(os.path.expanduser(path))
        for db in self.dbs:
            if db.path == p:
                return db
        raise LitestreamError("database not replicated here: %s" % p)

    def sync(self, path: Optional[str] = None) -> Pos:
        """Copy the WAL and upload to every replica now; return the position now in all of them.

        path names the database when there are several.  Raises the first
        replica's error (the others are still tried).
        """
        db = self._db(path)
        db.sync()
        target = db.pos()
        first = None
        for r in db.replicas:
            try:
                r.sync()
            except Exception as e:
                first = first or e
        if first is not None:
            raise first
        return target

    def sync_all(self) -> Dict[str, Pos]:
        """Sync every database and replica once (as `replicate -once`); return {path: position}.

        Failures are logged and the rest still run; raises ShutdownError
        naming every failure at the end.
        """
        out: Dict[str, Pos] = {}
        failed: List[str] = []

        def one(db):
            try:
                out[db.path] = self.sync(db.path)
            except Exception as e:
                db.logger.error("%s: sync: %s", db.name, e)
                failed.append("%s: %s" % (db.name, e))

        _parallel([functools.partial(one, db) for db in self.dbs], "litestream-sync")
        if failed:
            raise ShutdownError("sync failed: " + "; ".join(sorted(failed)))
        return out

    def wait_replicated(self, timeout: Optional[float] = None, path: Optional[str] = None) -> Pos:
        """Block until everything committed so far is in every replica; return that position.

        Raises TimeoutError naming the replicas still behind.
        """
        db = self._db(path)
        db.sync()
        target = db.pos()
        if not self.background:
            return self.sync(path)
        end = None if timeout is None else time.monotonic() + timeout
        targets = {"pos": target}

        def done(p):
            # A newer generation holds everything the old one had, once the
            # replica reaches where the database was when the change was seen.
            t = targets["pos"]
            if t.generation != db.pos().generation and db.pos().generation:
                t = targets["pos"] = db.pos()
            return bool(p.generation) and p.generation == t.generation and p >= t

        for r in db.replicas:
            r.wake()
            while True:
                left = None if end is None else max(0.0, end - time.monotonic())
                # Short waits: a generation change moves the target.
                if r.wait_pos(done, 0.5 if left is None else min(0.5, left)):
                    break
                if left is not None and left <= 0:
                    behind = [x for x in db.replicas if not done(x.pos)]
                    raise TimeoutError("%s: not replicated within %ss: %s" % (db.name, timeout, ", ".join(
                        "%s at %s (%s%s)" % (x.name, x.pos or "nothing", x.behind(),
                                             ", last error: " + x.last_error if x.last_error else "")
                        for x in behind)))
        return targets["pos"]


def send_heartbeat(url: str, timeout: float = 10.0) -> bool:
    """GET url (a healthchecks.io-style ping); log a failure and return False, never raise.

    The URL is not logged: ping URLs are bearer tokens.
    """
    import urllib.request
    host = urllib.parse.urlsplit(url).hostname or "?"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            resp.read(1 << 16)
            log.debug("heartbeat sent to %s: %d", host, resp.status)
            return True
    except Exception as e:  # urllib raises a zoo (URLError, HTTPError, OSError, ValueError...)
        code = getattr(e, "code", None)
        log.warning("heartbeat to %s failed: %s", host, "HTTP %d" % code if code else getattr(e, "reason", e))
        return False


def _parallel(fns, name: str, limit: int = 16, deadline: Optional[_Deadline] = None, on_timeout=None) -> None:
    """Run fns on up to limit daemon threads; raise the first exception.

    With a deadline, stop waiting when it passes (calling on_timeout once).
    """
    fns = list(fns)
    if len(fns) == 1 and deadline is None:
        fns[0]()
        return
    it = iter(fns)
    lock = threading.Lock()
    errors: List[BaseException] = []

    def worker():
        while True:
            with lock:
                fn = next(it, None)
            if fn is None:
                return
            try:
                fn()
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True, name="%s-%d" % (name, i))
               for i in range(min(limit, len(fns)))]
    for t in threads:
        t.start()
    for t in threads:
        if deadline is None:
            t.join()
        elif not deadline.join(t):
            # Everything still running was told about the deadline; give it
            # a moment to notice, then stop waiting.
            _join_all(threads, 2.0)
            if any(t2.is_alive() for t2 in threads) and on_timeout:
                on_timeout()
            break
    if errors:
        raise errors[0]



def restore(replica, output_path: str, *, timestamp: Optional[datetime.datetime] = None,
            generation: str = "", index: Optional[int] = None,
            parallelism: int = DEFAULT_RESTORE_PARALLELISM) -> None:
    """Restore a replica (a URL or a directory; or a list of them) to output_path, as `restore` does.

    Picks the generation as Go does, replays to the latest state, or to
    index (inclusive) or timestamp (an aware datetime), checks the result
    with PRAGMA integrity_check and links it into place.  Never overwrites
    output_path; on any failure nothing is left there.  Raises
    NoGenerationError when no backup matches.
    """
    urls = [replica] if isinstance(replica, str) else list(replica)
    if index is not None and timestamp is not None:
        raise ConfigError("cannot specify index & timestamp to restore")
    reps = []
    for i, url in enumerate(urls):
        rc = config_from_cli("/nonexistent-litestream-db", [url]).dbs[0].replicas[0]
        reps.append(new_replica_from_config(None, replace(rc, name=rc.type if len(urls) == 1 else "%s-%d" % (rc.type, i + 1))))
    try:
        rep, gen = calc_restore_target(reps, generation, timestamp)
        if not gen:
            raise NoGenerationError("no matching backups found in %s" % ", ".join(str(r.client) for r in reps))
        restore_replica(rep, RestoreOptions(output_path, gen, index, timestamp, parallelism))
    finally:
        for r in reps:
            r.client.close()


###############################################################################
# CLI
###############################################################################

_GO_TIME = "%Y/%m/%d %H:%M:%S"


class _CLIError(LitestreamError):
    """A usage error: printed on one line, exit code 1 (as Go's flag errors)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that suggest the closest flag."""

    def error(self, message):
        m = re.search(r"unrecognized arguments: (\S+)", message)
        if m and not m.group(1).startswith("-"):
            message = "too many arguments: %s" % m.group(1)
        elif m:
            flags = sorted({o for sp in [self] + [c for a in self._actions
                                                 for c in getattr(a, "choices", None) and
                                                 isinstance(a.choices, dict) and a.choices.values() or ()]
                            for a in sp._actions for o in a.option_strings
                            if o.startswith("-") and not o.startswith("--")})
            hint = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=1)
            message = "unknown flag %s%s" % (m.group(1), " (did you mean %s?)" % hint[0] if hint else "")
        elif "arguments are required: DB_PATH|REPLICA_URL" in message:
            message = "database path or replica URL required"
        raise _CLIError("%s: %s" % (self.prog, message))


# strconv.ParseBool, which Go's flag package uses for -flag=VALUE.
_GO_BOOLS = dict([(v, True) for v in ("1", "t", "T", "TRUE", "true", "True")] +
                 [(v, False) for v in ("0", "f", "F", "FALSE", "false", "False")])


def _go_bool_args(sp: argparse.ArgumentParser, args: List[str]) -> List[str]:
    """Rewrite Go's -flag=true|false forms of sp's boolean flags into argparse's -flag.

    The last setting of a flag wins, as in Go; a value ParseBool refuses is
    a usage error worded as Go's.  A flag's value and anything after "--"
    are left alone.
    """
    bools = {o: a for a in sp._actions if a.nargs == 0 and a.const is True for o in a.option_strings}
    takes_value = {o for a in sp._actions if a.nargs != 0 for o in a.option_strings}
    out, final, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        name, eq, value = arg.partition("=")
        action = bools.get(name)
        if action is None:
            out.append(arg)
            if arg in takes_value and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
        else:
            if eq and value not in _GO_BOOLS:
                raise _CLIError('%s: invalid boolean value "%s" for -%s: parse error'
                                % (sp.prog, value, name.lstrip("-")))
            if action.dest not in final:
                out.append(action)  # Where the flag goes if it ends up true.
            final[action.dest] = _GO_BOOLS[value] if eq else True
        i += 1
    return [a.option_strings[0] if isinstance(a, argparse.Action) else a
            for a in out if not isinstance(a, argparse.Action) or final[a.dest]]


def _go_level(levelno: int) -> str:
    """Return slog's name for a level: DEBUG, INFO, WARN or ERROR."""
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    return "INFO" if levelno >= logging.INFO else "DEBUG"


class _TextFormatter(logging.Formatter):
    """Format records as Go's default logger: "2006/01/02 15:04:05 LEVEL msg"."""

    def format(self, record: logging.LogRecord) -> str:
        line = "%s %s %s" % (time.strftime(_GO_TIME, time.localtime(record.created)),
                             _go_level(record.levelno), record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# What every LogRecord carries; anything else came in through `extra`.
_LOG_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _rfc3339_nano(ts: float) -> str:
    """Format a Unix time as Go's time.RFC3339Nano in local time ("Z" for UTC)."""
    dt = datetime.datetime.fromtimestamp(ts).astimezone()
    frac = ("%06d" % dt.microsecond).rstrip("0")
    off = int(dt.utcoffset().total_seconds()) // 60
    zone = "Z" if off == 0 else "%s%02d:%02d" % ("-" if off < 0 else "+", abs(off) // 60, abs(off) % 60)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ("." + frac if frac else "") + zone


class _JSONFormatter(logging.Formatter):
    """Format records as Go's slog.JSONHandler: one object per line.

    Keys are time (RFC 3339, local), level (DEBUG, INFO, WARN, ERROR) and
    msg, then every field given as `extra` (a LoggerAdapter's or a call's:
    db, replica, endpoint, attempt ...), as slog's With() attributes.
    """

    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": _rfc3339_nano(record.created), "level": _go_level(record.levelno),
               "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _LOG_RECORD_ATTRS and k not in obj:
                obj[k] = v
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def _setup_logging(level: str = "INFO", stderr: bool = False, log_type: str = "text") -> None:
    """Send the litestream logger to stdout (or stderr) at level, as text or JSON (main() only)."""
    root = logging.getLogger("litestream")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr if stderr else sys.stdout)
    h.setFormatter(_JSONFormatter() if log_type == "json" else _TextFormatter())
    root.addHandler(h)
    root.setLevel({"WARN": logging.WARNING}.get(level.upper(), getattr(logging, level.upper(), logging.INFO)))
    root.propagate = False


def _read_config(args) -> "Config":
    """Read the config file a command names (-config, $LITESTREAM_CONFIG or the defaults)."""
    path = args.config or default_config_path()
    if not args.config and not os.environ.get("LITESTREAM_CONFIG") and not os.path.exists(path):
        raise ConfigError("config file not found: %s (nor %s; use -config FILE)"
                          % (path, " or ".join(DEFAULT_CONFIG_PATHS[1:])))
    return load_config(path, expand_env=not args.no_expand_env)


def _config_for(args) -> Optional[Config]:
    """Return the Config a command reads from its config file, or None (CLI mode, a replica URL, no -config flag)."""
    target = getattr(args, "target", None)
    if not hasattr(args, "config") or (args.command == "replicate" and target) or \
            (isinstance(target, str) and is_url(target)):
        return None
    return _read_config(args)


def _load(args) -> "Config":
    cfg = getattr(args, "loaded_config", None)
    return cfg if cfg is not None else _config_for(args)


def _replicas_for(args) -> "tuple[List[Replica], Optional[DBConfig]]":
    """Return the replicas named by a command's DB path or replica URL."""
    target = args.target
    if is_url(target):
        if args.config:
            raise _CLIError("cannot specify a replica URL and the -config flag")
        rc = config_from_cli("/nonexistent-litestream-db", [target]).dbs[0].replicas[0]
        rc = replace(rc, name=rc.type)
        return [new_replica_from_config(None, rc)], None
    cfg = _load(args)
    dc = cfg.db_config(target)
    if dc is None:
        raise LitestreamError("database not found in config: %s" % os.path.abspath(target))
    db = new_db_from_config(dc)
    reps = db.replicas
    if getattr(args, "replica", ""):
        reps = [r for r in reps if r.name == args.replica]
        if not reps:
            names = [r.name for r in db.replicas]
            hint = difflib.get_close_matches(args.replica, names, n=1)
            raise LitestreamError("replica %r not found for %s%s" % (
                args.replica, dc.path, " (did you mean %r?)" % hint[0] if hint else ""))
    return reps, dc


def _table(rows: List[List[str]], out) -> None:
    """Print rows as Go's tabwriter does (padding 2)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("".join(c.ljust(w + 2) if i < len(r) - 1 else c for i, (c, w) in enumerate(zip(r, widths))).rstrip() + "\n")


def _fmt_time(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_timestamp(s: str) -> datetime.datetime:
    v = s.strip()
    if v.endswith(("Z", "z")):
        v = v[:-1] + "+00:00"
    m = re.match(r"^(\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d)(\.\d+)?([+-]\d\d:\d\d)$", v)
    if not m:
        raise _CLIError("invalid -timestamp, must specify in ISO 8601 format (e.g. 2000-01-01T00:00:00Z)")
    frac = (m.group(2) or "")[:7].ljust(7, "0")[1:] if m.group(2) else ""
    t = datetime.datetime.fromisoformat(m.group(1).replace("t", "T") + ("." + frac if frac else "") + m.group(3))
    return t.astimezone(datetime.timezone.utc)


class _Signals:
    """SIGINT and SIGTERM recorded for the main thread, which polls them.

    The handler only appends to a list: anything that takes a lock (even
    Event.set) could deadlock with the very code the signal interrupted.
    The first signal asks for shutdown.  Later ones never cut a final sync
    short, except a repeated SIGINT from a person at a terminal (stdin is a
    TTY), which aborts it.
    """

    def __init__(self):
        self.received: List[int] = []
        self._old: Dict[int, object] = {}
        self._interactive = sys.stdin is not None and sys.stdin.isatty()

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    @property
    def abort(self) -> bool:
        return self._interactive and signal.SIGINT in self.received[1:]

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to timeout seconds (None: forever) for a signal; return whether one came."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.received:
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic())))
        return True


def _parse_exec(cmd: str) -> List[str]:
    import shlex
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise ConfigError("-exec: cannot parse %r: %s" % (cmd, e)) from None
    if not argv:
        raise ConfigError("-exec: empty command")
    return argv


def cmd_replicate(args) -> int:
    if args.target:
        if args.config:
            raise _CLIError("cannot specify a replica URL and the -config flag")
        if len(args.target) < 2:
            raise _CLIError("must specify at least one replica URL for %s" % args.target[0])
        cfg = config_from_cli(args.target[0], args.target[1:])
    else:
        cfg = _load(args)
    if args.addr is not None:
        try:
            parse_bind_addr(args.addr)
        except ValueError as e:
            raise _CLIError("invalid -addr: %s" % e) from None
        cfg = replace(cfg, addr=args.addr)
    if not cfg.dbs:
        raise ConfigError("no databases specified in configuration")
    exec_cmd = args.exec if args.exec is not None else cfg.exec
    argv = _parse_exec(exec_cmd) if exec_cmd else None
    if args.once and argv:
        raise _CLIError("cannot use -once with -exec")
    set_lz4_workers(cfg.lz4_workers)
    timeout = cfg.shutdown_timeout
    if args.shutdown_timeout:
        try:
            timeout = _duration()(args.shutdown_timeout)
        except ValueError as e:
            raise _CLIError("invalid -shutdown-timeout: %s" % e) from None

    sigs = _Signals()
    sigs.install()
    try:
        rep = Replicator(config=cfg, background=not args.once, shutdown_timeout=timeout)
        rep.open()
    except BaseException:
        sigs.restore()
        raise
    code, err, end = 0, None, None
    try:
        if args.once:
            code = _sync_once(rep, sigs)
        else:
            code, err, end = _run_until_stopped(sigs, argv, timeout)
    finally:
        # One bound from the first signal: time the -exec child took to
        # exit is not given again to the final sync.
        left = timeout if end is None else max(0.5, end - time.monotonic())
        try:
            _close_replicator(rep, sigs, left)
        except ShutdownError as e:
            log.error("%s", e)
            code = code or 1
        finally:
            sigs.restore()
    log.info("litestream shut down")
    if err is not None:
        raise err
    return code


def _sync_once(rep: "Replicator", sigs: _Signals) -> int:
    """Sync every database and replica once (replicate -once), or until a signal; return the exit code."""
    result: List[int] = []

    def run():
        try:
            rep.sync_all()
            result.append(0)
        except ShutdownError:
            result.append(1)  # each failure was logged
        except BaseException as e:
            log.error("%s", e)
            result.append(1)

    t = threading.Thread(target=run, name="litestream-once", daemon=True)
    t.start()
    while t.is_alive():
        if sigs.wait(0.2):
            log.info("signal received, litestream shutting down")
            return 1
    return result[0] if result else 1


def _run_until_stopped(sigs: _Signals, argv: Optional[List[str]], timeout: float):
    """Wait for a signal or the -exec child.

    Returns (exit code, error to raise after shutdown, monotonic end of the
    shutdown bound or None when it starts only now).
    """
    import subprocess
    child = None
    if argv:
        try:
            child = subprocess.Popen(argv)
        except OSError as e:
            log.error("cannot start exec command: %s", e)
            return 1, LitestreamError("cannot start exec command %r: %s" % (argv[0], e.strerror or e)), None
    while not sigs.wait(0.2 if child else None):
        if child is not None and child.poll() is not None:
            log.info("subprocess exited with code %d, litestream shutting down", child.returncode)
            return _child_code(child.returncode, None), None, None
    log.info("signal received, litestream shutting down")
    end = time.monotonic() + timeout
    if child is None:
        return 0, None, end
    # Forward every signal to the child and give it until the shutdown
    # bound to exit; replication keeps running meanwhile.
    forwarded = 0
    while child.poll() is None:
        while forwarded < len(sigs.received):
            with contextlib.suppress(OSError):
                child.send_signal(sigs.received[forwarded])
            forwarded += 1
        if time.monotonic() >= end or sigs.abort:
            log.error("subprocess did not exit within the shutdown timeout (%s); killing it", _fmt_seconds(timeout))
            child.kill()
            child.wait()
            return 1, None, end
        time.sleep(0.05)
    log.info("subprocess exited with code %d", child.returncode)
    return _child_code(child.returncode, sigs.received[:forwarded]), None, end


def _child_code(rc: int, forwarded) -> int:
    # A child that died of the signal we passed on stopped as asked: that
    # is a clean exit, as in Go.  Other deaths by signal are 128 + signal.
    if rc < 0:
        return 0 if forwarded and -rc in forwarded else 128 - rc
    return rc


def _close_replicator(rep: "Replicator", sigs: _Signals, timeout: float) -> None:
    """Close rep within timeout seconds, answering repeated signals while it runs."""
    errors: List[BaseException] = []

    def run():
        try:
            rep.close(timeout)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="litestream-shutdown", daemon=True)
    seen = len(sigs.received)
    t.start()
    while t.is_alive():
        t.join(0.1)
        if len(sigs.received) > seen:
            seen = len(sigs.received)
            if sigs.abort:
                log.warning("signal received again: abandoning the final sync")
                rep.abort()
            else:
                log.info("signal received again: still running the final sync (bounded by the "
                         "shutdown timeout, %s)", _fmt_seconds(timeout))
    if errors:
        raise errors[0]


def _fmt_seconds(s: float) -> str:
    return ("%gs" % s) if s < 60 else "%dm%02ds" % divmod(int(s), 60)


def cmd_restore(args) -> int:
    if args.index is not None and args.timestamp:
        raise _CLIError("cannot specify index & timestamp to restore")
    index = None
    if args.index is not None:
        try:
            index = int(args.index, 16)
            if not 0 <= index <= MAX_INDEX:
                raise ValueError
        except ValueError:
            raise _CLIError("invalid -index %r: must be a hexadecimal WAL index (e.g. 1a)" % args.index) from None
    ts = _parse_timestamp(args.timestamp) if args.timestamp else None
    if args.parallelism < 1:
        raise _CLIError("invalid -parallelism %d: must be at least 1" % args.parallelism)
    if is_url(args.target) and not args.o:
        raise _CLIError("output path required")
    replicas, dc = _replicas_for(args)
    out = args.o or dc.path
    if args.if_db_not_exists and os.path.lexists(out):
        log.info("database already exists, skipping")
        return 0
    replica, gen = calc_restore_target(replicas, args.generation, ts)
    if not gen:
        if args.if_replica_exists:
            log.info("no matching backups found in %s", ", ".join(str(r.client) for r in replicas))
            return 0
        raise LitestreamError("no matching backups found in %s" % ", ".join(str(r.client) for r in replicas))
    def show(i, n):
        sys.stderr.write("\rrestore: applied wal index %d/%d" % (i, n) + ("\n" if i == n else ""))
        sys.stderr.flush()
    progress = show if sys.stderr.isatty() else None
    workers = DEFAULT_LZ4_WORKERS if is_url(args.target) else _load(args).lz4_workers
    restore_replica(replica, RestoreOptions(out, gen, index, ts, args.parallelism, lz4_workers=workers), progress)
    return 0


def _truncate_duration(ns: int) -> int:
    """Round a lag toward zero to a precision that shrinks as it grows (Go's truncateDuration)."""
    for limit, unit in ((10 * 10**9, 10**9), (10**9, 10**8), (10**6, 10**6), (10**3, 10**3)):
        if abs(ns) > limit:
            return (abs(ns) // unit * unit) * (1 if ns > 0 else -1)
    return ns


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _epoch_ns(t: datetime.datetime) -> int:
    return (t - _EPOCH) // datetime.timedelta(microseconds=1) * 1000


def _list(replicas: "List[Replica]", what: str, rows: List[List[str]], generations, per_generation) -> int:
    """Add per_generation(replica, generation) rows for each replica to rows; return the exit code.

    generations(replica) names the generations to list.  A replica or a
    generation that cannot be listed is reported on stderr and skipped, as
    Go does, so the healthy ones still print; the exit code is then 1.
    """
    code = 0
    for r in replicas:
        try:
            gens = generations(r)
        except (LitestreamError, OSError) as e:
            sys.stderr.write("litestream: replica %s (%s): cannot list %s: %s\n" % (r.name, r.client, what, e))
            code = 1
            continue
        for g in gens:
            try:
                rows.extend(per_generation(r, g))
            except (LitestreamError, OSError) as e:
                sys.stderr.write("litestream: replica %s (%s): generation %s: cannot list %s: %s\n"
                                 % (r.name, r.client, g, what, e))
                code = 1
    return code


def _fmt_time_exact(t: Optional[datetime.datetime]) -> str:
    """Format a time in RFC 3339 with its fraction: restore -timestamp takes it back exactly."""
    if t is None:
        return ""
    t = t.astimezone(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (".%06d" % t.microsecond).rstrip("0").rstrip(".") + "Z"


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024


def _verify_json(replica: Replica, latest: str, reports: "List[GenerationReport]", problems: List[str]) -> dict:
    def gen(r):
        return {"generation": r.generation, "latest": r.generation == latest, "snapshots": r.snapshots,
                "wal_segments": r.wal_segments, "wal_indices": r.wal_indices, "stored_bytes": r.stored_bytes,
                "first": None if r.first_index is None else {"index": r.first_index,
                                                             "time": _fmt_time_exact(r.first_time)},
                "last": None if r.last_pos is None else {"index": r.last_pos.index, "offset": r.last_pos.offset,
                                                         "time": _fmt_time_exact(r.last_time)},
                "latest_ok": r.latest_ok, "problems": list(r.problems), "notes": list(r.notes)}
    return {"replica": replica.name, "type": replica.client.client_type, "url": str(replica.client),
            "ok": not problems, "latest_generation": latest, "generations": [gen(r) for r in reports],
            "problems": problems}


def _verify_text(replica: Replica, latest: str, reports: "List[GenerationReport]", problems: List[str],
                 out) -> None:
    out.write("%s replica %s (%s): %s\n" % (replica.client.client_type, replica.name, replica.client,
                                            "FAILED, %d problem%s" % (len(problems), "" if len(problems) == 1 else "s")
                                            if problems else "ok"))
    for r in reports:
        out.write("  generation %s%s: %d snapshots, %d wal segments in %d indices, %s\n"
                  % (r.generation, " (latest)" if r.generation == latest else "", r.snapshots,
                     r.wal_segments, r.wal_indices, _fmt_size(r.stored_bytes)))
        if r.first_index is not None and r.last_pos is not None:
            out.write("    restorable from %08x at %s to %08x:%d at %s\n"
                      % (r.first_index, _fmt_time_exact(r.first_time), r.last_pos.index, r.last_pos.offset,
                         _fmt_time_exact(r.last_time)))
        out.write("    latest state: %s\n" % ("restorable, integrity_check ok" if r.latest_ok else "NOT restorable"))
        for n in r.notes:
            out.write("    note: %s\n" % n)
        for p in r.problems:
            out.write("    problem: %s\n" % p)
    for p in problems[sum(len(r.problems) for r in reports):]:
        out.write("  problem: %s\n" % p)


def _verify_live(args) -> int:
    """verify -live: run one restore drill per replica against the live database (see Replica.validate).

    It replicates the database itself for the drill, as `replicate -once`
    does (open, sync, drill, final sync, close), so it needs the
    database's replicator lock: alongside a running replicator it stops
    with one line naming that process instead (a drill there is what
    validation-interval is for).
    """
    if is_url(args.target):
        raise _CLIError("verify -live needs a database path from the config, not a replica URL")
    if args.generation or args.json:
        raise _CLIError("verify -live cannot be combined with -generation or -json")
    cfg = _load(args)
    dc = cfg.db_config(args.target)
    if dc is None:
        raise LitestreamError("database not found in config: %s" % os.path.abspath(args.target))
    if args.replica:
        _replicas_for(args)  # the error naming a replica that is not there
        dc = replace(dc, replicas=tuple(rc for rc in dc.replicas if (rc.name or rc.type) == args.replica))
    if not os.path.exists(dc.path):
        raise LitestreamError("verify -live: database does not exist: %s" % dc.path)
    d, base = os.path.split(dc.path)
    pid = _DBLock.holder(dc.meta_path or os.path.join(d, "." + base + META_DIR_SUFFIX))
    if pid:
        raise LitestreamError("verify -live: %s is replicated by a running litestream (pid %s); set "
                              "validation-interval on its replicas to drill there, or stop it first"
                              % (dc.path, pid if pid > 0 else "unknown"))
    rep = Replicator(config=replace(cfg, dbs=(dc,)), background=False)
    rep.open()
    failed = []
    try:
        rep.sync()
        for r in rep.dbs[0].replicas:
            res = r.validate(log_result=False)
            where = "%s replica %s" % (r.client.client_type, r.name)
            if res.ok:
                sys.stdout.write("%s: validation ok at %s in %.3fs (write lock held %.6fs)\n"
                                 % (where, res.pos, res.seconds, res.write_lock_seconds))
            else:
                line = "%s: validation %s at %s: %s" % (where, "FAILED" if res.status == "invalid" else "error",
                                                        res.pos or "no position", res.message)
                sys.stdout.write(line + "\n")
                failed.append(line)
    finally:
        rep.close()
    if failed:
        sys.stderr.write("litestream: verify: %s%s\n" % (failed[0], " (and %d more)" % (len(failed) - 1)
                                                         if len(failed) > 1 else ""))
        return 1
    return 0


def cmd_verify(args) -> int:
    # The report goes to stdout; progress and a failure summary to stderr.
    if args.parallelism < 1:
        raise _CLIError("invalid -parallelism %d: must be at least 1" % args.parallelism)
    if args.live:
        return _verify_live(args)
    replicas, _ = _replicas_for(args)
    def show(gen, i, n):
        sys.stderr.write("\rverify %s: wal index %d/%d" % (gen, i, n) + ("\n" if i == n else ""))
        sys.stderr.flush()
    progress = show if sys.stderr.isatty() else None
    results, failed = [], []
    for r in replicas:
        latest, reports = verify_replica(r, args.generation, args.parallelism, progress)
        # Every generation's problems, then the replica's own.
        problems = [p for rep in reports for p in rep.problems]
        if not latest:
            problems.append("%s: no generation with a snapshot: nothing to restore" % r.client)
        elif not any(rep.generation == latest and rep.latest_ok for rep in reports):
            problems.append("%s: the latest state of generation %s is not restorable" % (r.client, latest))
        failed += problems
        results.append((r, latest, reports, problems))
    if args.json:
        json.dump({"ok": not failed, "replicas": [_verify_json(*x) for x in results]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for x in results:
            _verify_text(*x, sys.stdout)
    if failed:
        sys.stderr.write("litestream: verify: %s%s\n" % (failed[0], " (and %d more problems)" % (len(failed) - 1)
                                                         if len(failed) > 1 else ""))
        return 1
    return 0


def cmd_generations(args) -> int:
    replicas, dc = _replicas_for(args)
    rows = [["name", "generation", "lag", "start", "end"]]
    # Lag is measured from the database's last change (or now, for a URL), as Go.
    now = time.time_ns()
    if dc is not None:
        mtimes = [os.stat(p).st_mtime_ns for p in (dc.path, dc.path + "-wal") if os.path.exists(p)]
        now = max(mtimes, default=now)

    def per_generation(r, g):
        try:
            lo, hi = generation_time_bounds(r.client, g)
        except NoSnapshotError:
            return []
        lag = format_duration(_truncate_duration(now - _epoch_ns(hi)))
        return [[r.name, g, lag, _fmt_time(lo), _fmt_time(hi)]]

    code = _list(replicas, "generations", rows, lambda r: r.client.generations(), per_generation)
    _table(rows, sys.stdout)
    return code


def cmd_snapshots(args) -> int:
    replicas, _ = _replicas_for(args)
    rows = [["replica", "generation", "index", "size", "created"]]
    code = _list(replicas, "snapshots", rows, lambda r: r.client.generations(),
                 lambda r, g: [[r.name, g, str(s.index), str(s.size), _fmt_time(s.created_at)]
                               for s in r.client.snapshots(g)])
    _table(rows, sys.stdout)
    return code


def cmd_wal(args) -> int:
    replicas, _ = _replicas_for(args)
    rows = [["replica", "generation", "index", "offset", "size", "created"]]
    code = _list(replicas, "wal segments", rows,
                 lambda r: [args.generation] if args.generation else r.client.generations(),
                 lambda r, g: [[r.name, g, str(w.index), str(w.offset), str(w.size), _fmt_time(w.created_at)]
                               for w in r.client.wal_segments(g)])
    _table(rows, sys.stdout)
    return code


def cmd_databases(args) -> int:
    cfg = _load(args)
    rows = [["path", "replicas"]]
    for dc in cfg.dbs:
        rows.append([dc.path, ",".join(rc.name or rc.type for rc in dc.replicas)])
    _table(rows, sys.stdout)
    return 0


def _shadow_ends(shadow: ShadowWAL, generation: str) -> "tuple[Pos, Dict[int, int]]":
    """Return the shadow WAL's durable position in a generation and where each of its indexes ends, read-only.

    The last index ends after its last commit frame whose checksum chain
    holds (what open() would keep; a running replicator may be appending);
    earlier ones end at their last whole frame, as range() reads them.
    """
    idx = shadow.indexes(generation)
    if not idx:
        return Pos(), {}
    ends: Dict[int, int] = {}
    page_size = 0
    with open(shadow.path(generation, idx[-1]), "rb") as f:
        try:
            hdr = parse_wal_header(f.read(WAL_HEADER_SIZE))
        except CorruptFrameError:
            hdr = None
        end = WAL_HEADER_SIZE
        if hdr is not None:
            page_size = hdr.page_size
            for off, _, is_commit in iter_wal_frames(f, WAL_HEADER_SIZE, hdr, hdr.checksum1, hdr.checksum2):
                if is_commit:
                    end = off + page_size + WAL_FRAME_HEADER_SIZE
    for i in idx[:-1]:
        try:
            size = os.path.getsize(shadow.path(generation, i))
        except FileNotFoundError:
            continue
        ends[i] = frame_align(size, page_size) if page_size else size
    ends[idx[-1]] = end
    return Pos(generation, idx[-1], end), ends


def _bytes_behind(ends: Dict[int, int], rpos: Pos) -> int:
    """Return the shadow WAL bytes after rpos (in rpos's generation), as a sync would send them."""
    return sum(max(0, end - (rpos.offset if i == rpos.index else 0)) for i, end in ends.items() if i >= rpos.index)


def _age(now: float, t: Optional[datetime.datetime]) -> Optional[float]:
    return None if t is None else round(max(0.0, now - t.timestamp()), 3)


def _pos_json(p: Pos) -> Optional[dict]:
    return None if p.is_zero() else {"generation": p.generation, "index": p.index, "offset": p.offset}


def replica_status(replica: Replica, local: Pos, ends: Dict[int, int], now: float) -> dict:
    """Describe what a replica holds compared with the local shadow WAL, from its listing alone.

    The generation is the DB's current one when the replica has it (else
    the replica's newest); its position is where its last WAL segment ends
    (the segment is downloaded to learn its uncompressed size, as calc_pos).
    bytes_behind counts the shadow WAL bytes a sync would still send: all
    of the current generation when the replica does not have it yet.
    """
    c = replica.client
    out = {"name": replica.name, "type": c.client_type, "url": str(c), "generation": "", "position": None,
           "bytes_behind": None, "last_replicated": None, "last_replicated_age_seconds": None,
           "generations": 0, "snapshots": 0, "last_snapshot": None, "last_snapshot_age_seconds": None,
           "error": None}
    gens = c.generations()
    snaps = {g: c.snapshots(g) for g in gens}
    all_snaps = [s for g in gens for s in snaps[g]]
    segs = {}

    def newest(g):
        if g not in segs:
            segs[g] = c.wal_segments(g)
        times = [o.created_at for o in snaps[g] + segs[g]]
        return max(times) if times else None
    gen = local.generation if local.generation in gens else ""
    if not gen and gens:
        dated = [(newest(g), g) for g in gens]
        dated = [x for x in dated if x[0] is not None]
        gen = max(dated)[1] if dated else ""
    last = max(all_snaps, key=lambda s: s.created_at, default=None)
    out.update(generations=len(gens), snapshots=len(all_snaps),
               last_snapshot=_fmt_time_exact(last.created_at) if last else None,
               last_snapshot_age_seconds=_age(now, last.created_at if last else None))
    if gen:
        t = newest(gen)
        rpos = Pos()
        if segs[gen]:
            seg = max(segs[gen], key=lambda s: (s.index, s.offset))
            n = decompress_object(c.wal_segment_reader(seg.pos()), replica._object_name(seg))
            rpos = Pos(gen, seg.index, seg.offset + n)
        elif snaps[gen]:
            rpos = Pos(gen, max(s.index for s in snaps[gen]), 0)
        out.update(generation=gen, position=_pos_json(rpos), last_replicated=_fmt_time_exact(t),
                   last_replicated_age_seconds=_age(now, t))
        if gen == local.generation:
            out["bytes_behind"] = _bytes_behind(ends, rpos)
    if local.generation and gen != local.generation:
        out["bytes_behind"] = _bytes_behind(ends, Pos(local.generation, 0, 0))
    return out


def db_status(db: DB, now: Optional[float] = None) -> dict:
    """Describe a DB's local replication state and each replica's, without its replicator.

    Nothing is locked or written: the meta directory is read as it is (a
    running replicator may move on meanwhile) and the replicator lock is
    only tested.  A replica that cannot be listed gets its error instead.
    """
    now = time.time() if now is None else now
    pid = _DBLock.holder(db.meta_path)
    gen = db.shadow.current_generation()
    local, ends = _shadow_ends(db.shadow, gen) if gen else (Pos(), {})
    if gen and local.is_zero():
        local = Pos(gen, 0, 0)
    reps = []
    for r in db.replicas:
        try:
            reps.append(replica_status(r, local, ends, now))
        except (LitestreamError, OSError) as e:
            reps.append({"name": r.name, "type": r.client.client_type, "url": str(r.client),
                         "error": str(e)})
    return {"path": db.path, "name": db.name, "meta_path": db.meta_path, "exists": os.path.exists(db.path),
            "replicator": {"running": pid != 0, "pid": pid if pid > 0 else None},
            "generation": gen, "position": _pos_json(local), "replicas": reps}


def _fmt_age(age: Optional[float]) -> str:
    return "" if age is None else format_duration(_truncate_duration(int(age * 1e9))) + " ago"


def _status_text(dbs: List[dict], out) -> None:
    rows = [["db", "replicator", "replica", "generation", "local", "replicated", "behind", "last upload",
             "snapshots", "last snapshot"]]
    for d in dbs:
        rep = d["replicator"]
        holder = ("pid %d" % rep["pid"] if rep["pid"] else "running") if rep["running"] else "stopped"
        local = d["position"]
        lpos = "%08x:%d" % (local["index"], local["offset"]) if local else "-"
        for r in d["replicas"] or [{"name": "-", "error": None, "position": None, "generation": ""}]:
            if r.get("error"):
                rows.append([d["path"], holder, r["name"], d["generation"] or "-", lpos, "ERROR", "", "", "", ""])
                continue
            p = r["position"]
            gen = d["generation"] or r.get("generation") or "-"
            if r.get("generation") and r["generation"] != d["generation"]:
                gen = "%s (replica: %s)" % (gen, r["generation"])
            rows.append([d["path"], holder, r["name"], gen, lpos,
                         "%08x:%d" % (p["index"], p["offset"]) if p else "-",
                         "" if r.get("bytes_behind") is None else str(r["bytes_behind"]),
                         _fmt_age(r.get("last_replicated_age_seconds")),
                         str(r.get("snapshots", "")), _fmt_age(r.get("last_snapshot_age_seconds"))])
    _table(rows, out)


def cmd_status(args) -> int:
    cfg = _load(args)
    dcs = cfg.dbs
    if args.target:
        dc = cfg.db_config(args.target)
        if dc is None:
            raise LitestreamError("database not found in config: %s" % os.path.abspath(args.target))
        dcs = [dc]
    now = time.time()
    dbs = [db_status(new_db_from_config(dc), now) for dc in dcs]
    code = 0
    for d in dbs:
        for r in d["replicas"]:
            if r.get("error"):
                sys.stderr.write("litestream: status: %s: replica %s (%s): %s\n"
                                 % (d["path"], r["name"], r["url"], r["error"]))
                code = 1
    if args.json:
        json.dump({"ok": code == 0, "time": _fmt_time_exact(utc_from_timestamp(now)), "dbs": dbs},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _status_text(dbs, sys.stdout)
    return code


def cmd_config(args) -> int:
    """Print a config file as INI or YAML (-format), after checking it as replicate would."""
    path = args.target or default_config_path()
    expand = not args.no_expand_env
    cfg = load_config(path, expand_env=expand)
    _, sections = read_config_sections(path)
    if not args.show_secrets:
        for s in sections:
            for key in _SECRET_KEYS:
                v = s.raw.get(key, "")
                if v and not re.fullmatch(r"\$(\w+|\{\w+\})", v, re.ASCII):
                    raise ConfigError("%s: a secret written in the file is printed only with -show-secrets "
                                      "(or write it as ${VAR})" % s.where(key))
    text = format_config(sections, cfg, args.format)
    # What is printed must load to the same settings, or it is not printed.
    out = "<%s output>" % args.format
    again = (_ini_sections if args.format == "ini" else _yaml_sections)(out, text)
    if expand:
        again = [s.with_raw({k: _expand_env(v) for k, v in s.raw.items()}) for s in again]

    def settings(c):
        # INI output names YAML's unnamed DBs after their files.
        dbs = tuple(replace(dc, name="") if args.format == "ini" else dc for dc in c.dbs)
        return replace(c, dbs=dbs, config_path="")
    if settings(_build_config(out, again)) != settings(cfg):
        raise LitestreamError("config: %s cannot be written as %s with the same settings" % (path, args.format))
    sys.stdout.write(text)
    return 0


def cmd_version(args) -> int:
    print("v%s" % __version__)
    return 0


COMMANDS = ("replicate", "restore", "verify", "generations", "snapshots", "wal", "databases", "status", "config",
            "version")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="litestream", allow_abbrev=False,
                description="Streaming replication of SQLite databases (Litestream 0.3 replica format).")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    p.commands = {}

    def cmd(name, help_, fn, config=True):
        sp = p.commands[name] = sub.add_parser(name, help=help_, allow_abbrev=False, prog="litestream " + name)
        sp.set_defaults(func=fn)
        if config:
            sp.add_argument("-config", "--config", default="", metavar="PATH",
                            help="config file (default: $LITESTREAM_CONFIG or %s)" % DEFAULT_CONFIG_PATH)
            sp.add_argument("-no-expand-env", "--no-expand-env", action="store_true",
                            help="do not replace $VAR in the config with environment values")
        return sp

    sp = cmd("replicate", "replicate databases until SIGINT/SIGTERM", cmd_replicate)
    sp.add_argument("-exec", "--exec", default=None, metavar="CMD", help="run CMD while replicating; exit with it")
    sp.add_argument("-once", "--once", action="store_true",
                    help="sync every database and replica once (a snapshot if none), then exit")
    sp.add_argument("-shutdown-timeout", "--shutdown-timeout", default="", metavar="DURATION",
                    help="bound on the final sync after a signal (default: config's shutdown-timeout, %gs)"
                    % DEFAULT_SHUTDOWN_TIMEOUT)
    sp.add_argument("-addr", "--addr", default=None, metavar="HOST:PORT",
                    help="serve /metrics, /healthz and /readyz here (default: config's addr; none)")
    sp.add_argument("target", nargs="*", metavar="DB_PATH REPLICA_URL", help="database and replica URLs or directories")

    sp = cmd("restore", "restore a database from a replica", cmd_restore)
    sp.add_argument("-o", "--o", default="", metavar="PATH", help="output path (default: the DB path)")
    sp.add_argument("-replica", "--replica", default="", help="restore from this replica only")
    sp.add_argument("-generation", "--generation", default="", help="restore from this generation")
    sp.add_argument("-index", "--index", default=None, metavar="HEX", help="restore up to this WAL index (hex)")
    sp.add_argument("-timestamp", "--timestamp", default="", help="restore to this time (RFC 3339)")
    sp.add_argument("-parallelism", "--parallelism", type=int, default=DEFAULT_RESTORE_PARALLELISM,
                    help="WAL indices downloaded at once (default 8)")
    sp.add_argument("-if-db-not-exists", "--if-db-not-exists", action="store_true",
                    help="do nothing if the output exists")
    sp.add_argument("-if-replica-exists", "--if-replica-exists", action="store_true",
                    help="exit 0 when there is no backup to restore")
    sp.add_argument("target", metavar="DB_PATH|REPLICA_URL")

    sp = cmd("verify", "check every object of a replica and that its latest state restores", cmd_verify)
    sp.add_argument("-replica", "--replica", default="", help="verify this replica only")
    sp.add_argument("-generation", "--generation", default="", help="verify this generation only")
    sp.add_argument("-json", "--json", action="store_true", help="print the report as JSON")
    sp.add_argument("-live", "--live", action="store_true",
                    help="restore drill: restore each replica at the database's current position and "
                         "compare it with the live database (needs the config and DB_PATH)")
    sp.add_argument("-parallelism", "--parallelism", type=int, default=DEFAULT_RESTORE_PARALLELISM,
                    help="WAL indices downloaded at once (default 8)")
    sp.add_argument("target", metavar="DB_PATH|REPLICA_URL")

    for name, fn, help_ in (("generations", cmd_generations, "list generations"),
                            ("snapshots", cmd_snapshots, "list snapshots"),
                            ("wal", cmd_wal, "list WAL segments")):
        sp = cmd(name, help_, fn)
        sp.add_argument("-replica", "--replica", default="", help="only this replica")
        if name == "wal":
            sp.add_argument("-generation", "--generation", default="", help="only this generation")
        sp.add_argument("target", metavar="DB_PATH|REPLICA_URL")

    cmd("databases", "list databases in the config", cmd_databases)
    sp = cmd("status", "show each database's and replica's position, lag and replicator, without replicating",
             cmd_status)
    sp.add_argument("-json", "--json", action="store_true", help="print one JSON document")
    sp.add_argument("target", nargs="?", default="", metavar="DB_PATH", help="only this database")
    sp = cmd("config", "print a config file (INI or Go's YAML) as INI or YAML", cmd_config, config=False)
    sp.add_argument("-format", "--format", choices=("ini", "yaml"), default="ini", help="output format (default ini)")
    sp.add_argument("-no-expand-env", "--no-expand-env", action="store_true",
                    help="check the file without replacing $VAR with environment values")
    sp.add_argument("-show-secrets", "--show-secrets", action="store_true",
                    help="print secrets written in the file (${VAR} references are always printed)")
    sp.add_argument("target", nargs="?", default="", metavar="FILE",
                    help="config file (default: $LITESTREAM_CONFIG or %s)" % " or ".join(DEFAULT_CONFIG_PATHS))
    cmd("version", "print the version", cmd_version, config=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit code (1 for usage errors and help, as Go)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "help"):
        parser.print_help()
        return 1
    if argv[0] not in COMMANDS:
        hint = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        sys.stderr.write("litestream: unknown command %r%s\n" % (
            argv[0], " (did you mean %r?)" % hint[0] if hint else ""))
        return 1
    apply_litestream_env(os.environ)
    try:
        sp = parser.commands[argv[0]]
        args, extra = parser.parse_known_args(argv[:1] + _go_bool_args(sp, argv[1:]))
        if extra:
            sp.error("unrecognized arguments: %s" % " ".join(extra))
        # Logging is set up here only, from the config the command reads,
        # as Go's ReadConfigFile does for every command.  Without a config
        # (CLI mode, a replica URL) it is INFO text on stderr, as Go's
        # default logger.  A -json report is the whole of stdout, so its
        # logs go to stderr whatever the config says.
        args.loaded_config = cfg = _config_for(args)
        if cfg is not None:
            _setup_logging(cfg.log_level, cfg.log_stderr or getattr(args, "json", False), cfg.log_type)
        else:
            _setup_logging("INFO", stderr=True)
        return args.func(args)
    except SystemExit as e:  # -h: argparse printed the help.
        return 1 if e.code in (0, None) else e.code
    except _CLIError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    except (LitestreamError, OSError, sqlite3.Error) as e:
        sys.stderr.write("litestream: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
