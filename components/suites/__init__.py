"""The built-in suites beside ``capitals`` (which lives in ``components/data.py``), one
module each; importing this package registers them in :data:`components.data.SUITES`
(``cl-audit suites`` lists them)."""

from components.suites import biography, custom, refusal  # noqa: F401
