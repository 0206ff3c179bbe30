"""``cl-audit store ls|gc``: what the stage store and the model cache of ``CL_AUDIT_HOME``
hold, which run folders refer to each entry, and removing what nothing refers to.

The stage store (``<home>/store/<kind>-<hash>/``, :class:`components.artifacts.Store`)
and the model cache (``<home>/cache/models/<name>/``) only grow: every config, seed
and model adds entries. A run folder refers to an entry when its ``manifest.json``
lists a file inside it (``local``, every stage checkpoint and probe of a finished
audit) or its ``data_manifest.json`` names it as the model (``model.dir``). Run folders
are found under ``<home>`` (``audits/``, ``sweeps/``, and any other folder there) and
under every ``--runs`` folder given. The preparation entries (``filter``, ``candidates``,
``drift``) and a sweep's stages are not listed in any manifest: they count as
unreferenced, and a later audit or sweep recomputes what was removed.

Nothing here is removed by default: :func:`gc` lists what it would remove; ``apply``
removes it, each entry under the store's own lock for its key (one held by a running
producer is skipped). An entry that a finished run's manifest refers to is never
removed unless ``include_referenced``.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.errors import UserError

AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
UNITS = {"": 86400.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
SKIP = {"store", "cache", "mlartifacts", "ray_train", ".locks"}


@dataclass
class Entry:
    """One entry of the stage store (``kind`` the stage kind: tune, perturb, probe, ...)
    or of the model cache (``kind`` ``model``).

    Attributes:
        key: the folder's name (the store key, or the cached model's name).
        where: ``store`` or ``cache``.
        kind: stage kind, or ``model``.
        path: the folder.
        size: bytes of every file in it.
        created: when it was published (mtime of ``result.json``, or of the folder), epoch seconds.
        last_used: the newest of ``created`` and the ``created`` time of every run
            manifest that refers to it, epoch seconds.
        referenced_by: the run folders that refer to it (sorted).
        finished_refs: whether a finished run's manifest is among them.
    """

    key: str
    where: str
    kind: str
    path: str
    size: int
    created: float
    last_used: float
    referenced_by: list[str] = field(default_factory=list)
    finished_refs: bool = False

    def as_json(self) -> dict:
        d = asdict(self)
        d["created"] = _iso(self.created)
        d["last_used"] = _iso(self.last_used)
        return d


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_age(text: str) -> float:
    """Seconds of an age given as ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or a plain
    number of days (``0``: any age).

    Raises:
        UserError: anything else (names ``--older-than`` and what is expected).
    """
    m = AGE.match(text.strip())
    if not m:
        raise UserError(f"--older-than {text!r}: expected an age such as 30m, 12h, 7d or 2w (a plain number: days)")
    return float(m.group(1)) * UNITS[m.group(2)]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run_folders(home: Path, extra: list[Path] = ()) -> list[Path]:
    """Folders holding a run's ``manifest.json``, ``data_manifest.json`` or
    ``.cl-audit-state.json`` under ``home`` (not inside the store or the cache) and
    under each of ``extra``."""
    found: set[Path] = set()
    for root in [home, *extra]:
        root = Path(root).resolve()
        if not root.is_dir():
            raise UserError(f"--runs {root}: not a folder")
        for dirpath, dirnames, filenames in os.walk(root):
            if Path(dirpath) == home:
                dirnames[:] = [d for d in dirnames if d not in SKIP]
            if {"manifest.json", "data_manifest.json", ".cl-audit-state.json"} & set(filenames):
                found.add(Path(dirpath))
                dirnames[:] = [d for d in dirnames if d not in ("tune", "naive")]
    return sorted(found)


def _refs(folder: Path, store: Path, models: Path) -> tuple[set[str], set[str], float | None, bool]:
    """The store keys and model-cache names a run folder refers to, its manifest's
    creation time, and whether it is a finished run (a manifest, or a state marked finished)."""
    keys, names, created, finished = set(), set(), None, False
    mpath = folder / "manifest.json"
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
            finished = True
            if m.get("created"):
                created = calendar.timegm(time.strptime(m["created"], "%Y-%m-%dT%H:%M:%SZ"))
            for f in m.get("files") or []:
                local = f.get("local") if isinstance(f, dict) else None
                if local and Path(local).is_relative_to(store):
                    keys.add(Path(local).relative_to(store).parts[0])
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError):
            pass
    dpath = folder / "data_manifest.json"
    if dpath.is_file():
        try:
            d = (json.loads(dpath.read_text()).get("model") or {}).get("dir")
            if d and Path(d).is_relative_to(models):
                names.add(Path(d).relative_to(models).parts[0])
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, OSError, AttributeError):
            pass
    return keys, names, created, finished


def entries(home: Path, extra_runs: list[Path] = ()) -> list[Entry]:
    """Every entry of ``home``'s stage store and model cache with its size, times and the
    run folders that refer to it; store entries first, each part by key.

    Raises:
        UserError: a ``--runs`` folder that does not exist.
    """
    home = Path(home).resolve()
    store, models = home / "store", home / "cache" / "models"
    out: dict[tuple[str, str], Entry] = {}
    for where, root in (("store", store), ("cache", models)):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            marker = p / ("result.json" if where == "store" else "config.json")
            if where == "store" and not marker.exists():
                continue  # not published (a producer's folder): never listed, never removed
            t = (marker if marker.exists() else p).stat().st_mtime
            kind = p.name.rsplit("-", 1)[0] if where == "store" else "model"
            out[(where, p.name)] = Entry(p.name, where, kind, str(p), _size(p), t, t)
    for folder in run_folders(home, list(extra_runs)):
        keys, names, created, finished = _refs(folder, store, models)
        for where, names_ in (("store", keys), ("cache", names)):
            for name in names_:
                e = out.get((where, name))
                if e is None:
                    continue
                e.referenced_by.append(str(folder))
                e.finished_refs |= finished
                if created:
                    e.last_used = max(e.last_used, created)
    for e in out.values():
        e.referenced_by.sort()
    return list(out.values())


@dataclass
class GcPlan:
    """What ``cl-audit store gc`` removes (or would remove: ``applied`` False).

    Attributes:
        remove: the entries removed or to remove.
        kept: how many entries stay.
        skipped: ``(key, why)`` of entries chosen but not removed (their lock was held).
        applied: whether the entries were removed.
    """

    remove: list[Entry]
    kept: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    applied: bool = False

    @property
    def size(self) -> int:
        return sum(e.size for e in self.remove)


def gc(home: Path, older_than: float = 0.0, include_referenced: bool = False, apply: bool = False,
       extra_runs: list[Path] = ()) -> GcPlan:
    """Choose, and with ``apply`` remove, the store and model-cache entries of ``home``
    that no run folder refers to and that were last used more than ``older_than``
    seconds ago; with ``include_referenced`` also those that run folders refer to.

    A store entry is removed under the store's lock for its key (``store/.locks``); an
    entry whose lock is held by a running producer is skipped. A model-cache entry is
    removed outright: do not run gc with ``apply`` while an audit loads that model.

    Raises:
        UserError: a ``--runs`` folder that does not exist.
    """
    from filelock import FileLock, Timeout

    now = time.time()
    all_entries = entries(home, extra_runs)
    chosen = [e for e in all_entries
              if (include_referenced or not e.referenced_by) and now - e.last_used >= older_than]
    plan = GcPlan(chosen, len(all_entries) - len(chosen))
    if not apply:
        return plan
    locks = Path(home).resolve() / "store" / ".locks"
    done = []
    for e in chosen:
        if e.where == "store":
            try:
                with FileLock(str(locks / f"{e.key}.lock"), timeout=0):
                    _remove(Path(e.path))
            except Timeout:
                plan.skipped.append((e.key, "in use (its lock is held)"))
                continue
        else:
            _remove(Path(e.path))
        done.append(e)
    plan.remove, plan.applied = done, True
    plan.kept = len(all_entries) - len(done)
    return plan


def _remove(path: Path) -> None:
    """Remove an entry's folder so that no reader sees it half-removed: renamed aside
    (hidden, one rename) first, then deleted."""
    aside = path.with_name(f".{path.name}.gc-{os.getpid()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
