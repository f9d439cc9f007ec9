"""Adapter packs: many adapters of one config and one base in one SQLite file, each stored as its name and v.

An adapter file repeats its config and base fingerprint around a few dozen bytes of v; a pack keeps those
once (table `meta`) and then one row per adapter: name, v's bytes, and a CRC-32 of both (table `adapters`).
A million adapters of 13 fp32 numbers take well under 100 MB.

Why SQLite: it is in Python's standard library, one file, and a database: each add, replace or remove is
one transaction (WAL journal, synchronous=FULL), so a kill -9 at any moment keeps every write that was
acknowledged and never leaves half an adapter readable; readers (a server) go on reading while one writer
writes; names are a primary key. A damaged row fails its checksum and is refused by name while the others
still load.

    pack = Pack.create("users.tlpack", ["alice.safetensors", "bob.safetensors"])
    pack.add(["carol.safetensors"]); pack.remove(["bob"])
    adapter = tinylora.load_adapter(model, "users.tlpack", name="alice")
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import zlib
from pathlib import Path

import torch

from tinylora.config import AdapterConfig
from tinylora.methods import SINGLE_V
from tinylora.models import DTYPES
from tinylora.storage.file import read_file, write_adapter_file
from tinylora.version import __version__

PACK_FORMAT = "tinylora-pack"
PACK_VERSION = "1"
PACKABLE = SINGLE_V  # adapters that are one tensor v
SQLITE_MAGIC = b"SQLite format 3\x00"


def is_pack(path: str | os.PathLike) -> bool:
    """True for a file that starts as an SQLite database does (how `load_adapter` and `serve` tell a pack)."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def adapter_name(path: str | os.PathLike) -> str:
    """An adapter's name in a pack, as in `serve`: its file name without `.safetensors`."""
    name = Path(path).name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def _crc(name: str, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(name.encode()))


def _expand(paths) -> list[Path]:
    """Files as given, and every *.safetensors inside the folders given, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("*.safetensors"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such adapter file or folder: {p}")
    return out


class Pack:
    """One pack file. Every method that writes commits before it returns."""

    def __init__(self, path: str | os.PathLike, *, _create: bool = False):
        self.path = Path(path)
        if not _create and not self.path.is_file():
            raise FileNotFoundError(f"pack not found: {self.path}")
        if not _create and not is_pack(self.path):
            raise ValueError(f"{self.path}: not a tinylora pack (not an SQLite file)")
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()  # one connection shared by a server's threads: one statement at a time
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        if not _create:
            self._read_meta()

    # ---- creating and describing -----------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, files=(), *, like: tuple | None = None) -> "Pack":
        """A new pack at `path` (which must not exist) holding `files` (files or folders of *.safetensors).
        The shared config, base and v shape come from the first file, or from `like` = (config, fingerprint,
        base, v_shape) for an empty pack."""
        path, files = Path(path), _expand(files)
        if path.exists():
            raise FileExistsError(f"{path} exists: add to it with `tinylora pack add`, or remove it first")
        if like is None:
            if not files:
                raise ValueError("a new pack needs at least one adapter file to take its config and base from")
            config, meta, tensors = read_file(files[0])
            like = (config, meta["fingerprint"], meta.get("base", ""), tuple(tensors.get("v", torch.empty(0)).shape))
        config, fingerprint, base, v_shape = like
        if config.method not in PACKABLE:
            raise ValueError(f"packs hold {'/'.join(PACKABLE)} adapters (one v each), not {config.method!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        pack = cls(tmp, _create=True)
        meta = {"format": PACK_FORMAT, "format_version": PACK_VERSION, "tinylora": __version__,
                "config": config.to_json(), "fingerprint": json.dumps(fingerprint, separators=(",", ":")), "base": base,
                "v_shape": json.dumps(list(v_shape))}
        with pack._transaction():
            pack.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
            pack.db.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, v BLOB NOT NULL, crc INTEGER NOT NULL) "
                            "WITHOUT ROWID")
            pack.db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        pack._read_meta()
        pack.add(files)
        pack.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pack.close()
        os.replace(tmp, path)  # the pack appears whole, or not at all
        return cls(path)

    def _read_meta(self) -> None:
        try:
            meta = dict(self._all("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a tinylora pack ({e})") from None
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"{self.path}: not a tinylora pack (meta 'format' is {meta.get('format')!r})")
        if meta.get("format_version") != PACK_VERSION:
            raise ValueError(f"{self.path}: pack format version {meta.get('format_version')!r} is not supported "
                             f"(this tinylora reads version {PACK_VERSION})")
        self.config = AdapterConfig.from_json(meta["config"])
        self.fingerprint = json.loads(meta["fingerprint"])
        self.base = meta.get("base", "")
        self.dtype = DTYPES[self.config.v_dtype]
        self.shape = tuple(json.loads(meta["v_shape"]))  # [groups, numbers per group]

    def _all(self, sql: str, args=()) -> list:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def __enter__(self) -> "Pack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection (another process) commits to this pack."""
        with self.lock:
            return self.db.execute("PRAGMA data_version").fetchone()[0]

    def __len__(self) -> int:
        return self._all("SELECT count(*) FROM adapters")[0][0]

    def __contains__(self, name: str) -> bool:
        return bool(self._all("SELECT 1 FROM adapters WHERE name = ?", (name,)))

    def names(self, after: str = "", limit: int | None = None) -> list[str]:
        """Names in sorted order, from after `after` (paging: pass the last name of the previous page)."""
        q = "SELECT name FROM adapters WHERE name > ? ORDER BY name" + (" LIMIT ?" if limit else "")
        return [r[0] for r in self._all(q, (after, limit) if limit else (after,))]

    def info(self) -> dict:
        return {"path": str(self.path), "adapters": len(self), "bytes": self.path.stat().st_size,
                "config": json.loads(self.config.to_json()), "base": self.base, "fingerprint": self.fingerprint}

    # ---- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")  # the write lock now: a second writer waits, never interleaves
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")  # durable (WAL, synchronous=FULL) before the caller hears of it

    def check(self, config: AdapterConfig, fingerprint: dict, source: str) -> None:
        """Refuse, with the reason, an adapter whose config or base differs from the pack's."""
        if config.to_json() != self.config.to_json():
            mine, theirs = json.loads(self.config.to_json()), json.loads(config.to_json())
            diff = [f"{k}={theirs[k]!r} (pack: {mine[k]!r})" for k in sorted(mine) if mine[k] != theirs.get(k)]
            raise ValueError(f"{source} does not fit pack {self.path}: its config differs: " + ", ".join(diff))
        if fingerprint != self.fingerprint:
            keys = [k for k in sorted(set(fingerprint) | set(self.fingerprint))
                    if fingerprint.get(k) != self.fingerprint.get(k)]
            raise ValueError(f"{source} does not fit pack {self.path}: it was made for another base model "
                             f"(fingerprint fields {keys} differ)")

    def _row(self, name: str, v: torch.Tensor) -> tuple[str, bytes, int]:
        if not name or "/" in name or name != name.strip():
            raise ValueError(f"adapter name {name!r} is invalid: a file name without '/' or surrounding spaces")
        if tuple(v.shape) != self.shape or v.dtype != self.dtype:
            raise ValueError(f"adapter {name!r}: v has shape {tuple(v.shape)} and dtype {v.dtype}, the pack "
                             f"holds {self.shape} {self.dtype}")
        blob = v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        return name, blob, _crc(name, blob)

    def put(self, items: dict[str, torch.Tensor]) -> None:
        """Add or replace adapters given as name -> v, in one transaction."""
        rows = [self._row(n, v) for n, v in items.items()]
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?)", rows)

    def add(self, files, *, replace: bool = True) -> list[str]:
        """Add (or replace) adapter files, or every *.safetensors in folders, in one transaction; returns
        their names. A file that does not fit the pack is refused, naming it, and nothing is written."""
        items = {}
        for f in _expand(files):
            config, meta, tensors = read_file(f)
            self.check(config, meta["fingerprint"], str(f))
            name = adapter_name(f)
            if name in items:
                raise ValueError(f"{f}: a second adapter named {name!r} in one add")
            if not replace and name in self:
                raise ValueError(f"{f}: pack {self.path} already holds {name!r}")
            items[name] = tensors["v"]
        if items:
            self.put(items)
        return list(items)

    def remove(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self]
        if missing:
            raise KeyError(f"pack {self.path} holds no adapter named {', '.join(map(repr, missing))}")
        with self._transaction():
            self.db.executemany("DELETE FROM adapters WHERE name = ?", [(n,) for n in names])

    # ---- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """v of adapter `name` [groups, numbers]; a damaged row is refused by name."""
        rows = self._all("SELECT v, crc FROM adapters WHERE name = ?", (name,))
        if not rows:
            raise KeyError(f"pack {self.path} holds no adapter named {name!r}")
        return self._decode(name, *rows[0])

    def items(self, batch: int = 10_000):
        """(name, v or the error that refuses it) for every adapter, streamed in name order."""
        after = ""
        while True:
            rows = self._all("SELECT name, v, crc FROM adapters WHERE name > ? ORDER BY name LIMIT ?", (after, batch))
            if not rows:
                return
            for name, blob, crc in rows:
                try:
                    yield name, self._decode(name, blob, crc)
                except ValueError as e:
                    yield name, e
            after = rows[-1][0]

    def _decode(self, name: str, blob: bytes, crc: int) -> torch.Tensor:
        shape = self.shape
        if _crc(name, blob) != crc or len(blob) != shape[0] * shape[1] * torch.finfo(self.dtype).bits // 8:
            raise ValueError(f"pack {self.path}: adapter {name!r} is damaged (checksum mismatch): refused")
        v = torch.frombuffer(bytearray(blob), dtype=self.dtype).view(shape).clone()
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"pack {self.path}: adapter {name!r} holds NaN or inf values: refused")
        return v

    def extract(self, name: str, out: str | os.PathLike) -> Path:
        """Write adapter `name` as a normal adapter file (loadable by `load_adapter`, `serve`, ...)."""
        return write_adapter_file(out, self.config, self.base, self.fingerprint, {"v": self.get(name)})
