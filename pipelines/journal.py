"""The offline journal: MLflow records kept locally while the tracking server does not answer.

:class:`pipelines.tracking.AuditTracker` appends a write that failed because the server
was unreachable to ``<run folder>/.mlflow-journal.jsonl`` (one JSON line per record;
MLflow entities encoded by :func:`_encode`, protobuf for dataset inputs) and replays
the file in order once the server answers; ``cl-audit sync`` (:func:`sync`) sends what
is left after the audit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from components.artifacts import atomic_write
from components.errors import UserError
from pipelines.mlflow_env import absolute_uri, quiet_mlflow, redact_uri, store_client
from pipelines.state import STATE, read_state

JOURNAL = ".mlflow-journal.jsonl"
TRIAL_JOURNALS = ".mlflow-journals"  # in a sweep folder: one journal per trial, <trial id>.jsonl


def unreachable(e: BaseException) -> bool:
    """True if ``e`` means the tracking store could not be reached (connection refused,
    timeout, a 503), as opposed to the store refusing the record."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                      TimeoutError)):
        return True
    if isinstance(e, MlflowException):
        text = str(e)
        return (e.error_code == "TEMPORARILY_UNAVAILABLE" or "failed with exception" in text
                or "Max retries exceeded" in text or "response code 50" in text.lower())
    return False


def _encode(v: Any) -> Any:
    from google.protobuf.json_format import MessageToDict
    from mlflow.entities import DatasetInput, Metric, Param, RunTag

    if isinstance(v, Metric):
        return {"__t": "Metric", "key": v.key, "value": v.value, "timestamp": v.timestamp, "step": v.step,
                **({"model_id": v.model_id} if v.model_id else {})}
    if isinstance(v, Param):
        return {"__t": "Param", "key": v.key, "value": v.value}
    if isinstance(v, RunTag):
        return {"__t": "RunTag", "key": v.key, "value": v.value}
    if isinstance(v, DatasetInput):
        return {"__t": "DatasetInput", "proto": MessageToDict(v.to_proto())}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    from google.protobuf.json_format import ParseDict
    from mlflow.entities import DatasetInput, Metric, Param, RunTag
    from mlflow.protos.service_pb2 import DatasetInput as ProtoDatasetInput

    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict) and "__t" in v:
        t = v["__t"]
        if t == "Metric":
            return Metric(v["key"], v["value"], v["timestamp"], v["step"], model_id=v.get("model_id"))
        if t == "Param":
            return Param(v["key"], v["value"])
        if t == "RunTag":
            return RunTag(v["key"], v["value"])
        if t == "DatasetInput":
            return DatasetInput.from_proto(ParseDict(v["proto"], ProtoDatasetInput()))
    return v


class Journal:
    """MLflow writes that could not be sent, one JSON line each, in the order they were made.

    The file (``<run folder>/.mlflow-journal.jsonl``) is appended to and fsynced per
    record, so a crash loses nothing already journaled; :meth:`replay` sends the records
    in order and rewrites the file atomically with what is left. Replaying a record
    twice is harmless: metrics carry fixed timestamps (MLflow keeps one copy of an
    identical point), params and tags are set to the same value, artifacts overwritten.

    Attributes:
        retry_s: seconds after a failed send before :meth:`due` allows another try.
    """

    retry_s = 10.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self._last_failure = 0.0
        self._pending = (sum(1 for line in self.path.read_text().splitlines() if line.strip())
                         if self.path.exists() else 0)

    def pending(self) -> int:
        """Records waiting to be sent (counted once from the file, then kept up to date:
        every MLflow write asks, so the file is not read per write)."""
        return self._pending

    def append(self, method: str, args: tuple, kwargs: dict) -> None:
        line = json.dumps({"method": method, "args": _encode(list(args)),
                           "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._pending += 1

    def failed(self) -> None:
        self._last_failure = time.time()

    def due(self) -> bool:
        return time.time() - self._last_failure >= self.retry_s

    def replay(self, client) -> bool:
        """Send every record with ``client``; True if all were sent.

        Raises:
            MlflowException: the store refused a record (not a connection failure).
        """
        lines = [x for x in self.path.read_text().splitlines() if x.strip()] if self.path.exists() else []
        sent = 0
        try:
            for line in lines:
                rec = json.loads(line)
                if rec["method"] == "cl_audit.log_model":  # a checkpoint's logged model, saved in the run folder
                    from pipelines.checkpoint_model import upload_model

                    upload_model(client, *rec["args"])
                    shutil.rmtree(rec["args"][2], ignore_errors=True)
                else:
                    getattr(client, rec["method"])(*_decode(rec["args"]),
                                                   **{k: _decode(v) for k, v in rec["kwargs"].items()})
                sent += 1
        except Exception as e:  # noqa: BLE001 - sorted by unreachable()
            if not unreachable(e):
                raise
            self.failed()
        finally:
            if sent:
                rest = lines[sent:]
                if rest:
                    atomic_write(self.path, "\n".join(rest) + "\n")
                else:
                    self.path.unlink(missing_ok=True)
                self._pending = len(rest)
        return sent == len(lines)


def journal_files(run_dir: Path) -> list[Path]:
    """The journals of a run folder in the order to send them: a sweep's trial journals
    (``.mlflow-journals/<trial id>.jsonl``, by name), then the folder's own."""
    run_dir = Path(run_dir)
    return [*sorted((run_dir / TRIAL_JOURNALS).glob("*.jsonl")), run_dir / JOURNAL]


def sync(run_dir: Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Send the MLflow records a run folder kept while its tracking server was down.

    Args:
        run_dir: the audit's or sweep's output folder (holding ``.mlflow-journal.jsonl``;
            a sweep's trials keep theirs in ``.mlflow-journals/``).
        tracking_uri: default: the one the audit used (``.cl-audit-state.json``); a
            relative local path in it is made absolute.

    Returns:
        ``(sent, left)``: records sent now, records still waiting.

    Raises:
        UserError: not a run folder, or the server is still unreachable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder; expected the folder of an audit run")
    journals = [Journal(p) for p in journal_files(run_dir)]
    n = sum(j.pending() for j in journals)
    if n == 0:
        return 0, 0
    state = read_state(run_dir) or {}
    uri = tracking_uri or state.get("tracking_uri") or (state.get("mlflow") or {}).get("tracking_uri")
    if not uri:
        raise UserError(f"{run_dir / STATE}: missing; pass --tracking-uri")
    quiet_mlflow()
    uri = absolute_uri(uri)
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    client = store_client(uri)
    for j in journals:  # the trials' first (their runs), then the sweep's own (its end)
        if not j.replay(client):
            break
    left = sum(j.pending() for j in journals)
    if left:
        raise UserError(f"--tracking-uri {redact_uri(uri)}: MLflow tracking server still not answering; "
                        f"{n - left} of {n} records sent, {left} kept in {run_dir / JOURNAL}")
    return n, 0
