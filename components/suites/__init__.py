"""The built-in suites, one module and one YAML each (``capitals``, ``biography``,
``refusal``, ``custom``); :mod:`components.registry` registers them by name."""
