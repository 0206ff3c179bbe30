"""How cl-audit talks to MLflow, shared by the tracker (:mod:`pipelines.tracking`) and
the journal (:mod:`pipelines.journal`): a quiet client, and a tracking URI fit to print."""

from __future__ import annotations

import os


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
