"""Artifacts: a content-addressed stage store, atomic writes, file digests and provenance.

Store layout (``<root>/store``)::

    <key>/result.json   the stage's JSON result (present = the stage finished)
    <key>/...           its files (adapter/, predictions.parquet, ...)
    executions.log      one line per stage actually computed (not reused)

A key is the sha256 of the stage's config and of the keys of its input artifacts, so an
unchanged stage is reused, and concurrent producers of one key wait on a file lock
instead of computing it twice. A stage writes into a temporary directory that is
renamed into place only when complete: no partial artifact is ever visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from components.config import stable_hash
from components.faults import failpoint

SECRET_MARKERS = ("TOKEN", "PASSWORD", "SECRET", "API_KEY", "ACCESS_KEY", "CREDENTIAL")


_UMASK: list[int] = []


def umask() -> int:
    """The process's file-mode creation mask, read once (``/proc/self/status`` on Linux,
    which does not change it; elsewhere set and restored at once)."""
    if not _UMASK:
        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
            _UMASK.append(int(line.split()[1], 8))
        except (OSError, StopIteration, ValueError, IndexError):
            mask = os.umask(0o022)
            os.umask(mask)
            _UMASK.append(mask)
    return _UMASK[0]


def file_mode() -> int:
    """The mode of a new file under the user's umask (``0o644`` under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode of a new folder under the user's umask (``0o755`` under umask 022)."""
    return 0o777 & ~umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the mode of a folder the user creates
    (mkdtemp's own is 0700): a folder published by renaming it keeps that mode."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename.

    The file gets the mode any new file of the user gets (``0o666`` less the umask),
    not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        failpoint(f"atomic_write:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:  # e.g. disk full: the previous file, if any, is untouched
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power loss (not only a crash)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing a name that would land outside ``root`` (``..``, an
    absolute path): artifact names never escape the run folder.

    Raises:
        UserError: ``rel`` is absolute or climbs out of ``root``.
    """
    from components.errors import UserError

    root = Path(root).resolve()
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(root):
        raise UserError(f"{rel!r}: artifact name escapes its folder {root}; expected a relative name without '..'")
    return target


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file so that ``dst`` appears complete or not at all."""
    atomic_write(dst, Path(src).read_bytes())


FILES = "files.json"  # in each published stage folder: relative path -> {sha256, size} of every file


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns:
        False where the system or file system does not offer it (nothing is changed).
    """
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``.

    A new ``final`` appears by one rename. An existing one is replaced by an atomic swap
    (readers see the old folder or the new one, never neither), then the old one, now at
    ``tmp``, is removed. Where the swap is not available: the old folder is renamed aside,
    the new one renamed in, the old one removed; between the two renames ``final`` is
    absent (reads as "not computed"), never partial.
    """
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


class Store:
    """Content-addressed store of stage outputs under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)

    @staticmethod
    def key(stage: str, config: Any, inputs: list[str]) -> str:
        """Key of a stage output: hash of (stage kind, its config, its inputs' keys)."""
        return f"{stage}-{stable_hash({'stage': stage, 'config': config, 'inputs': inputs}, 20)}"

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.path(key) / "result.json").exists()

    def load(self, key: str) -> dict:
        return json.loads((self.path(key) / "result.json").read_text())

    def produce(self, key: str, fn: Callable[[Path], dict], reuse: bool = True) -> tuple[dict, bool]:
        """Return the stored result of ``key``, computing it with ``fn(tmp_dir)`` if absent.

        ``fn`` writes its files into ``tmp_dir`` and returns a JSON-able dict; paths
        inside it that point into ``tmp_dir`` are rewritten to the final location.

        Returns:
            ``(result, reused)``.
        """
        with FileLock(str(self.root / ".locks" / f"{key}.lock")):
            final = self.path(key)
            for stale in self.root.glob(f".{key}.*"):  # left by a killed producer of this key (we hold its lock)
                shutil.rmtree(stale, ignore_errors=True)
            if reuse and self.done(key):
                return self.load(key), True
            tmp = make_temp_dir(self.root, f".{key}.tmp-")
            try:
                result = fn(tmp)
                text = json.dumps(result, default=str).replace(str(tmp), str(final))
                files = {}  # one pass: modes, fsync, digest
                for p in sorted(tmp.rglob("*")):
                    # the user's modes, also on files a library wrote through its own
                    # temporary file (safetensors: 0600)
                    if not p.is_symlink():
                        os.chmod(p, file_mode() if p.is_file() else dir_mode())
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                        files[str(p.relative_to(tmp))] = file_record(p)
                atomic_write(tmp / FILES, json.dumps(files, indent=1, sort_keys=True))
                atomic_write(tmp / "result.json", text)  # last: its presence means complete
                failpoint(f"store_publish:{key}")
                _publish_dir(tmp, final)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            with open(self.root / "executions.log", "a") as f:
                f.write(f"{time.time():.3f} {key}\n")
            return json.loads(text), False

    def check(self, key: str) -> list[str]:
        """Problems with the published output ``key``: a file listed in its ``files.json``
        that is missing or whose size or sha256 differs, a file not listed, or a
        safetensors file that does not open. Empty when the output is complete.

        Raises:
            FileNotFoundError: ``key`` is not published (no ``result.json``).
        """
        folder = self.path(key)
        json.loads((folder / "result.json").read_text())
        listed = json.loads((folder / FILES).read_text())
        problems = [f"{key}/{rel}: {err}" for rel, rec in listed.items() if (err := check_file(folder / rel, rec))]
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        problems += [f"{key}/{rel}: not listed in {FILES}" for rel in sorted(present - set(listed) - {FILES, "result.json"})]
        for rel in listed:
            if rel.endswith(".safetensors") and (folder / rel).exists():
                from safetensors import safe_open

                try:
                    with safe_open(str(folder / rel), framework="pt") as f:
                        for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                            f.get_slice(name)
                except Exception as e:  # noqa: BLE001 - any failure to open is the finding
                    problems.append(f"{key}/{rel}: does not open as safetensors ({e})")
        return problems

    def executions(self) -> list[str]:
        """Keys computed (not reused) so far, in order."""
        log = self.root / "executions.log"
        return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """``{"sha256": hex, "size": bytes}`` of one file (an entry of an audit manifest)."""
    path = Path(path)
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def check_file(path: Path | None, expected: dict) -> str | None:
    """Compare a file with its manifest entry.

    Args:
        path: the file to check (None or absent: it is missing).
        expected: ``{"sha256": hex, "size": bytes}``.

    Returns:
        None when size and sha256 match, else why not (``missing``, ``size 10 != 12``,
        ``sha256 ab12... != cd34...``).
    """
    if path is None or not Path(path).is_file():
        return "missing"
    got = file_record(path)
    if got["size"] != expected["size"]:
        return f"size {got['size']} != {expected['size']} bytes expected"
    if got["sha256"] != expected["sha256"]:
        return f"sha256 {got['sha256'][:16]}... != {expected['sha256'][:16]}... expected"
    return None


def git_dirty(repo: Path | None = None) -> bool | None:
    """True when tracked files of the checkout differ from its commit (None outside a checkout)."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# Device files of the NVIDIA (CUDA) and AMD (ROCm) drivers; without them torch sees no GPU.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def machine_info(task_cpus: float | None = None) -> dict[str, str]:
    """The machine this process runs on: CPU model and count, GPUs (CUDA) and count, OS.

    ``task_cpus``: the CPUs the orchestrator gave the stage (a Ray task's assigned CPUs),
    recorded as ``ray_cpus``. Values are strings (they become MLflow tags).
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        # Without a GPU driver torch would find no device: the audit's driver then does
        # not import torch (hundreds of MB) just to learn that.
        if "torch" not in sys.modules and not any(Path(d).exists() for d in GPU_DEVICE_FILES):
            raise LookupError("no GPU driver")
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA counts as no GPU
        gpus = []
    info = {
        "cpu": cpu, "cpu_count": str(os.cpu_count() or 0),
        "gpu": ", ".join(sorted(set(gpus))) or "none", "gpu_count": str(len(gpus)),
        "platform": platform.platform(),
    }
    if task_cpus is not None:
        info["ray_cpus"] = str(float(task_cpus))
    return info


def git_commit(repo: Path | None = None) -> str:
    """The git commit of the project checkout (``unknown`` outside a checkout).

    Only a checkout whose top folder is ``repo`` itself counts: code copied or installed
    into a folder inside another repository (a ``git archive`` unpacked in a checkout, a
    venv's site-packages) is not that repository's commit.
    """
    repo = (repo or Path(__file__).resolve().parent.parent).resolve()
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
            timeout=10,
        )
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != repo:
            return "unknown"
        return lines[1]
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The environment variable that names the image an audit runs in (``sha256:...``); the
# image's build or its pod spec sets it (docs/cluster.md).
IMAGE_DIGEST_ENV = "CL_AUDIT_IMAGE_DIGEST"
SOURCE_SUFFIXES = (".py", ".yaml", ".j2")


def package_version() -> str:
    """The cl-audit version from the installed package's metadata (``unknown`` when the
    code runs without an installed distribution)."""
    from importlib import metadata

    try:
        return metadata.version("cl-audit")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_digest(root: Path | None = None) -> str:
    """sha256 (hex) of the package's own source: every ``.py``, ``.yaml`` and ``.j2`` file
    under ``components/`` and ``pipelines/`` of ``root`` (default: this code's), in sorted
    order of their paths, each as ``path NUL bytes NUL``. The same with or without git:
    a ``git archive`` copy, the image and a pip install of one tree give one digest."""
    root = (root or Path(__file__).resolve().parent.parent).resolve()
    files = sorted(p for pkg in ("components", "pipelines") for p in (root / pkg).rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts and p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def provenance() -> dict[str, str]:
    """What code an audit ran: ``cl_audit_version`` (package metadata), ``git_commit``
    (``unknown`` outside a checkout), ``source_digest`` (:func:`source_digest`, always)
    and ``image_digest`` when ``CL_AUDIT_IMAGE_DIGEST`` is set. Values are strings."""
    out = {"cl_audit_version": package_version(), "git_commit": git_commit(), "source_digest": source_digest()}
    image = os.environ.get(IMAGE_DIGEST_ENV, "").strip()
    if image:
        out["image_digest"] = image
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (list, tuple)):
            out[name] = json.dumps(v)
        else:
            out[name] = v
    return out


def is_secret_key(name: str) -> bool:
    """True for names that look like credentials (never logged as params or tags)."""
    up = name.upper()
    return any(m in up for m in SECRET_MARKERS)


def safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop credential-like keys from a flat params dict."""
    return {k: v for k, v in params.items() if not is_secret_key(k)}
