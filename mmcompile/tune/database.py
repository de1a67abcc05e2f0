"""The tuning database: a folder holding MetaSchedule's JSON database plus ``tuning.json``.

Layout of ``--db DIR``::

    tuning.json                   meta: format version, target and host measured on, tasks and
                                  models seen, jobs (for --resume)
    database_workload.json        MetaSchedule: one workload (task) per line
    database_tuning_record.json   MetaSchedule: one measured trial per line
    logs/                         MetaSchedule's per-task search logs
    .lock                         held by the tuning job using the folder

Durability: MetaSchedule appends one line per measured trial and closes the file right away
(``JSONFileAppendLine``: open, write, ``std::endl``, close), so a committed trial is in the
kernel's page cache before the next starts and survives SIGINT and SIGKILL; only trials in
flight are lost. A kill in the middle of a write can leave a last line without its newline:
a writer drops it (or completes it when it parses) before appending, and a reader ignores it.
Any other malformed line, a missing or foreign ``tuning.json``, or a record pointing at a
workload that does not exist is reported as corruption instead of crashing inside TVM.
``tuning.json`` itself is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcompile.errors import MMCompileError
from mmcompile.schedule import cpu_info

FORMAT = "mmcompile-tuning-db"
FORMAT_VERSION = 1
META = "tuning.json"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LOCK = ".lock"


class TuningError(MMCompileError):
    """Tuning cannot run as asked: a bad option, an unreachable RPC tracker, nothing to tune."""


class TuningDBError(TuningError):
    """A tuning database is missing, corrupt, foreign, in use, or for another target."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _check_workload(line: Any) -> bool:
    return isinstance(line, list) and len(line) == 2 and all(isinstance(x, str) for x in line)


def _scan(path: Path, check: Callable[[Any], bool]) -> tuple[int, int, bytes | None]:
    """(complete valid lines, bytes they span, trailing partial line or None).

    Raises:
        TuningDBError: a complete line is not JSON or fails ``check``.
    """
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    count = 0
    for number, raw in enumerate(data[:end].splitlines(), 1):
        try:
            ok = check(json.loads(raw))
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise TuningDBError(f"tuning database {path.parent} is corrupt: line {number} of "
                                f"{path.name} is not a valid entry ({raw[:60]!r}...)")
        count += 1
    return count, end, (data[end:] or None)


class TuningDB:
    """An opened tuning database folder. Use :meth:`open`; :meth:`lock` before writing."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self._lock_fd: int | None = None
        self.repaired: list[str] = []
        self.workloads = self.records = 0
        self._clean_bytes: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self._rescan()

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False,
             target: Mapping[str, Any] | None = None,
             host: Mapping[str, Any] | None = None) -> TuningDB:
        """Open (or with ``create``, create) the database at ``path``.

        Raises:
            TuningDBError: missing (without ``create``), not a tuning database, corrupt, or a
                newer format.
        """
        path = Path(path)
        meta_path = path / META
        if path.exists() and not path.is_dir():
            raise TuningDBError(f"{path} is a file, not a tuning database folder")
        if not meta_path.exists():
            leftovers = [p.name for p in path.iterdir()] if path.is_dir() else []
            if leftovers:
                what = ("a MetaSchedule database without mmcompile's tuning.json (the target it "
                        "was measured on is unknown)" if WORKLOADS in leftovers
                        else "not an mmcompile tuning database (no tuning.json)")
                raise TuningDBError(f"{path} is {what}; refusing to use it")
            if not create:
                raise TuningDBError(f"no tuning database at {path} (run 'mmcompile tune' first)")
            path.mkdir(parents=True, exist_ok=True)
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now(),
                    "target": dict(target or {}), "host": dict(host or {}), "tasks": {},
                    "models": {}, "jobs": []}
            db = cls(path, meta)
            db.save_meta()
            return db
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TuningDBError(f"tuning database {path} is corrupt: {META} is not JSON "
                                f"({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TuningDBError(f"{meta_path} is not an mmcompile tuning database meta file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise TuningDBError(f"{path} has tuning database format version "
                                f"{meta.get('format_version')}; this mmcompile reads version "
                                f"{FORMAT_VERSION}")
        for key, kind in (("target", dict), ("tasks", dict), ("models", dict), ("jobs", list)):
            if not isinstance(meta.get(key), kind):
                raise TuningDBError(f"tuning database {path} is corrupt: {META} has no valid "
                                    f"'{key}'")
        return cls(path, meta)

    def _rescan(self) -> None:
        self.workloads, end, partial = _scan(self.path / WORKLOADS, _check_workload)
        self._clean_bytes[WORKLOADS], self._partial[WORKLOADS] = end, partial
        n = self.workloads

        def record_ok(line: Any) -> bool:
            return (isinstance(line, list) and len(line) == 2 and isinstance(line[0], int)
                    and 0 <= line[0] < n and isinstance(line[1], list) and len(line[1]) >= 2)

        self.records, end, partial = _scan(self.path / RECORDS, record_ok)
        self._clean_bytes[RECORDS], self._partial[RECORDS] = end, partial

    # --- writing (tuning jobs) ------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[TuningDB]:
        """Hold the folder's lock (one tuning job at a time) and repair a torn last line.

        Raises:
            TuningDBError: another live process holds the lock.
        """
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TuningDBError(f"tuning database {self.path} is in use by another tuning job "
                                f"(pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            self._repair()
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _repair(self) -> None:
        for name in (WORKLOADS, RECORDS):
            partial = self._partial.get(name)
            if partial is None:
                continue
            path = self.path / name
            try:
                json.loads(partial)
                complete = True
            except ValueError:
                complete = False
            if complete:  # killed between the line and its newline: keep the line
                with open(path, "ab") as f:
                    f.write(b"\n")
                self.repaired.append(f"{name}: completed a last line that lacked its newline")
            else:
                os.truncate(path, self._clean_bytes[name])
                self.repaired.append(f"{name}: dropped a torn last line ({len(partial)} bytes) "
                                     f"from a job killed mid-write")
        self._rescan()

    def save_meta(self) -> None:
        """Write ``tuning.json`` atomically (temporary file, fsync, rename)."""
        self.meta["updated"] = now()
        fd, tmp = tempfile.mkstemp(prefix=".tuning.", dir=self.path)
        try:
            os.fchmod(fd, 0o644)  # as the record files; mkstemp's 0600 hides it from others
            with os.fdopen(fd, "w") as f:
                json.dump(self.meta, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / META)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # --- reading --------------------------------------------------------------------------

    def check_target(self, target: Mapping[str, Any], strict: Sequence[str],
                     host: Mapping[str, Any] | None = None) -> list[str]:
        """Compare the target (and host) the database was measured on with ``target``.

        Returns:
            Warnings for differences that leave the schedules valid but maybe slower (e.g.
            another core count, another host CPU).

        Raises:
            TuningDBError: a ``strict`` key differs (e.g. another CPU architecture).
        """
        mine = self.meta["target"]
        wrong = [k for k in strict if mine.get(k) != target.get(k)]
        if wrong:
            raise TuningDBError(
                f"tuning database {self.path} was measured for target "
                f"{mine.get('target', mine)} and does not apply to {target.get('target', target)} "
                f"({', '.join(f'{k}: {mine.get(k)!r} vs {target.get(k)!r}' for k in wrong)}); "
                f"tune for this target into another --db")
        notes = [f"{k} {mine.get(k)!r} in the database vs {target.get(k)!r} here"
                 for k in sorted(set(mine) | set(target))
                 if k not in strict and k != "target" and mine.get(k) != target.get(k)]
        theirs = self.meta.get("host", {})
        if host and theirs.get("cpu") and host.get("cpu") != theirs.get("cpu"):
            notes.append(f"measured on {theirs.get('cpu')!r} ({theirs.get('hostname', '?')}), "
                         f"this host is {host.get('cpu')!r}")
        return [f"tuning database {self.path}: {n}" for n in notes]

    def digest(self) -> str:
        """SHA-256 of the target and the complete workload and record lines."""
        self._rescan()
        sha = hashlib.sha256(json.dumps(self.meta["target"], sort_keys=True).encode())
        for name in (WORKLOADS, RECORDS):
            path = self.path / name
            if path.exists():
                with open(path, "rb") as f:
                    sha.update(f.read(self._clean_bytes[name]))
        return sha.hexdigest()

    @contextlib.contextmanager
    def clean_copy(self) -> Iterator[Path]:
        """A folder with the complete lines only: the database itself when it has no torn
        line, else a temporary copy (a reader never modifies the files)."""
        if not any(self._partial.values()):
            yield self.path
            return
        tmp = Path(tempfile.mkdtemp(prefix="mmc-tuning-db-"))
        try:
            for name in (WORKLOADS, RECORDS):
                src = self.path / name
                data = src.read_bytes()[:self._clean_bytes[name]] if src.exists() else b""
                (tmp / name).write_bytes(data)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def host_facts() -> dict[str, Any]:
    """This machine as a database records it: CPU model name, hostname, usable cores."""
    return {"cpu": cpu_info()["model"] or platform.processor(), "hostname": platform.node(),
            "cores": len(os.sched_getaffinity(0))}


def database_info(path: str | os.PathLike) -> dict[str, Any]:
    """What an artifact records about the database it was compiled with."""
    db = TuningDB.open(path)
    return {"path": str(Path(path).resolve()), "sha256": db.digest(),
            "target": db.meta["target"].get("target"), "records": db.records,
            "workloads": db.workloads}
