"""How cl-audit talks to MLflow, shared by the tracker (:mod:`pipelines.tracking`) and
the journal (:mod:`pipelines.journal`): a quiet client, a tracking URI that means one
place in every process and working folder (:func:`absolute_uri`), a client built under
the store's lock (:func:`store_client`), and a tracking URI fit to print."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# How long a process waits for another one that creates or migrates the same sqlite
# store (a fresh store's schema migration takes a few seconds; a killed holder's lock is
# released by the kernel at once).
STORE_LOCK_TIMEOUT_S = 600


def quiet_mlflow() -> None:
    import logging

    for name in ("mlflow", "alembic"):  # no schema-migration chatter on the console
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <tracking URI>" per finished run: noise, and the
    # URI may carry a password (the summary holds the redacted URI and the run ids)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def redact_uri(uri: str) -> str:
    """``uri`` without a password (``http://user:secret@host`` -> ``http://user:***@host``),
    for everything that is printed, logged or written to a file."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def absolute_uri(uri: str | None, cwd: Path | None = None) -> str | None:
    """``uri`` with a relative local path made absolute against ``cwd`` (default: the
    current folder), so that every process and working folder (a Ray worker, a Tune
    trial's own folder) means the same store.

    ``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` (a ``?query`` is kept),
    ``file:rel`` / ``file:./rel`` -> ``file:///abs/rel``, a bare path ``./mlruns`` or
    ``~/mlruns`` -> ``/abs/mlruns``; absolute ones, in-memory sqlite, ``databricks`` and
    every network URI (``http://``, ``postgresql://`` ...) are returned unchanged.
    None or ``""`` is returned as given.
    """
    from urllib.parse import urlsplit

    if not uri:
        return uri
    base = Path(cwd) if cwd is not None else Path.cwd()

    def local(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (base / q).resolve()

    if uri.startswith("sqlite:///"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        if not path or path == ":memory:" or path.startswith("/"):
            return uri
        return f"sqlite:///{local(path)}{sep}{query}"
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc or parts.path.startswith("/"):
            return uri
        return local(parts.path).as_uri()
    if uri == "databricks" or parts.scheme or "://" in uri:
        return uri
    return str(local(uri))


HOME_ENV = "CL_AUDIT_HOME"
DEFAULT_HOME = "runs"  # relative to the current folder


def default_home(cwd: Path | None = None) -> Path:
    """The root of everything cl-audit keeps (model cache ``cache/``, stage store
    ``store/``, MLflow sqlite store ``mlflow.db``, default run folders ``audits/`` and
    ``sweeps/``): ``$CL_AUDIT_HOME`` (set by ``--home``) or ``./runs``, absolute against
    ``cwd`` (default: the current folder). The one place that decides it."""
    return _under(os.environ.get(HOME_ENV) or DEFAULT_HOME, cwd)


def set_home(home: Path | str, cwd: Path | None = None) -> Path:
    """Make ``home`` (``--home``) the root for this process and every process it starts
    (Ray workers, Tune trials, kfp components inherit ``CL_AUDIT_HOME``).

    Returns:
        The absolute root (what :func:`default_home` returns from now on).
    """
    root = _under(home, cwd)
    os.environ[HOME_ENV] = str(root)
    return root


def _under(path: Path | str, cwd: Path | None) -> Path:
    base = Path(cwd) if cwd is not None else Path.cwd()
    return (base / Path(path).expanduser()).resolve()


def absolute_env(cwd: Path | None = None) -> None:
    """Make the paths the environment gives (``MLFLOW_TRACKING_URI``, ``CL_AUDIT_HOME``)
    absolute in ``os.environ``, so that child processes (Ray workers, Tune trials in
    their own working folders, MLflow's own calls) mean the same place as this one."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = absolute_uri(uri, cwd)
    if os.environ.get(HOME_ENV):
        set_home(os.environ[HOME_ENV], cwd)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other URI or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    return None if not path or path == ":memory:" else Path(path)


def store_lock(uri: str):
    """A context manager held while a process creates, migrates or sets up the tracking
    store of ``uri``: an exclusive file lock ``<db>.lock`` beside a sqlite database (two
    processes running MLflow's schema migration on one fresh file at once break it for
    good); nothing for other stores (a server serialises its own migrations).

    Raises:
        filelock.Timeout: another process held it for :data:`STORE_LOCK_TIMEOUT_S`.
    """
    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(str(db) + ".lock", timeout=STORE_LOCK_TIMEOUT_S)


def store_client(uri: str):
    """An ``MlflowClient`` on ``uri``, built under :func:`store_lock` (building it opens
    the store, which creates or migrates a sqlite database). A sqlite database that does
    not exist yet (or is empty) is created whole first (:func:`create_sqlite_store`).

    Raises:
        whatever MLflow raises for an unusable store, or ``filelock.Timeout``.
    """
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        ensure_sqlite_store(uri)
        return MlflowClient(tracking_uri=uri)


def ensure_sqlite_store(uri: str) -> None:
    """Create the sqlite database of ``uri`` whole (:func:`create_sqlite_store`) when it
    does not exist yet or is empty; nothing for other stores. Call it under
    :func:`store_lock`."""
    db = sqlite_path(uri)
    if db is not None and (not db.exists() or db.stat().st_size == 0):
        create_sqlite_store(db)


def create_sqlite_store(db: Path) -> None:
    """Create a fresh MLflow sqlite store at ``db`` so that it appears complete or not at
    all: MLflow builds its schema by running every migration in turn (seconds), and a
    process killed in between would leave a half-migrated file that no later process can
    open. The schema is built in a hidden temporary file beside ``db``, fsynced, then
    renamed into place; a temporary file a killed creator left is removed. Call it under
    :func:`store_lock`.

    Raises:
        whatever MLflow raises while building the schema (nothing is left behind).
    """
    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in db.parent.glob(f".{db.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # the schema is built when the store opens
        with contextlib.suppress(Exception):  # close the temporary file's connections
            client._tracking_client.store.engine.dispose()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
