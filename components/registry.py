"""The suite registry: every built-in suite by name, and the config resolved for one.

A suite is a module and a YAML file side by side in ``components/suites/`` (as
lm-evaluation-harness keeps a task's code and its YAML together): the module defines a
:class:`components.data.Suite` named ``SUITE``; the YAML gives the audit's sizes and
training settings, with a ``quick:`` section for the small version. This module is the
only place that knows all of them; the config (:mod:`components.config`) knows none.
"""

from __future__ import annotations

from pathlib import Path

from components.config import AuditConfig, deep_merge, read_yaml
from components.config import config_from_tree as _validate
from components.data import Suite, SuiteData, check_leakage
from components.errors import UserError
from components.suites import biography, capitals, custom, refusal

SUITE_DIR = Path(__file__).resolve().parent / "suites"
SUITES: dict[str, Suite] = {m.SUITE.name: m.SUITE for m in (capitals, biography, refusal, custom)}


def suite_names() -> list[str]:
    """The registered suites, the default (``capitals``) first."""
    return sorted(SUITES, key=lambda n: (n != "capitals", n))


def get_suite(name: str) -> Suite:
    """The suite called ``name``.

    Raises:
        UserError: no such suite (the message lists the known ones).
    """
    if name not in SUITES:
        raise UserError(f"suite '{name}': unknown; expected one of {', '.join(suite_names())}")
    return SUITES[name]


def suite_config_path(suite: str) -> Path:
    """Path of the built-in YAML for ``suite`` (``components/suites/<suite>.yaml``)."""
    return SUITE_DIR / f"{suite}.yaml"


def check_suite_rules(cfg: AuditConfig, source: str = "config") -> AuditConfig:
    """The rules a suite adds to the config's own: which ``perturb.kind`` it accepts.

    Raises:
        UserError: a perturbation the suite does not have, naming ``source``.
    """
    suite = get_suite(cfg.suite)
    if cfg.perturb.kind not in suite.perturb_kinds:
        raise UserError(
            f"{source}: perturb.kind: '{cfg.perturb.kind}' is not a perturbation of suite {cfg.suite}; "
            f"expected one of {', '.join(suite.perturb_kinds)}"
        )
    return cfg


def config_from_tree(tree: dict, overrides: list[str] | None = None, source: str = "config") -> AuditConfig:
    """Validate a config mapping (e.g. a resolved ``config.yaml``) after ``--set``
    overrides, with its suite's rules: a Kubeflow component receives the resolved config
    as a pipeline parameter and resolves it here.

    Raises:
        UserError: unknown key, invalid value or a rule of the suite, naming ``source``.
    """
    cfg = _validate(tree, overrides, source)
    return check_suite_rules(cfg, f"{source} + --set" if overrides else source)


def load_config(
    suite: str | None = None,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    quick: bool = False,
) -> AuditConfig:
    """Resolve an :class:`AuditConfig`: the suite's YAML, then ``config_file``, then ``--set``.

    ``quick`` merges the suite's ``quick:`` section (a small version of the same audit).

    Raises:
        UserError: unknown suite, unreadable file, unknown key or invalid value.
    """
    user: dict = read_yaml(config_file) if config_file is not None else {}
    suite = suite or user.get("suite") or "capitals"
    get_suite(suite)
    base_path = suite_config_path(suite)
    tree: dict = read_yaml(base_path) if base_path.exists() else {}
    quick_tree = tree.pop("quick", {}) or {}
    user_quick = user.pop("quick", {}) or {}
    tree = deep_merge(tree, user)
    if quick:
        tree = deep_merge(tree, deep_merge(quick_tree, user_quick))
    tree["suite"] = suite
    source = str(config_file) if config_file is not None else str(base_path)
    return config_from_tree(tree, overrides, source)


def check_data(cfg: AuditConfig) -> SuiteData:
    """Read, validate and split the suite's data before any model work, so that a bad
    data file or leaking pools stop the audit at once (the pools are split again once
    the base model is known, with ``data.filter_known``).

    Raises:
        UserError: as the suite's loader and split, and :func:`check_leakage`.
    """
    suite = SUITES[cfg.suite]
    data = suite.make_split(suite.items(cfg), None, cfg)
    check_leakage(data, cfg.data.allow_leakage, suite.fact_subject,
                  cfg.data.leakage_similarity if suite.near_duplicates else None)
    return data




def absolute(path: str | Path, cwd: Path | None = None) -> Path:
    """``path`` as an absolute path against ``cwd`` (default: the current folder), ``~``
    expanded, ``.`` and ``..`` folded; symbolic links are kept (an absolute path is
    returned as given), so a message names the file as the user spelled it."""
    import os

    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return Path(os.path.normpath((Path(cwd) if cwd is not None else Path.cwd()) / p))


def absolute_paths(cfg: AuditConfig, cwd: Path | None = None) -> AuditConfig:
    """``cfg`` with every local path it names made absolute against ``cwd`` (default:
    the current folder): ``data.files``, a ``model.id`` that is a local model folder
    or ``.gguf`` file, and a ``stages.<stage>.from`` that is an existing local path. Stage tasks and Tune trials run in other working folders; an
    absolute path means the same file there. A hub id, the built-in model ids and a
    path that does not exist (refused later, as given) are left alone.

    Called where a user's config enters (``cl-audit run``, ``cl-audit sweep``); not by
    ``cl-audit compile``, whose paths name files on the cluster.
    """
    from components.models import SMOLLM2_ID, TINY_ID

    tree = cfg.model_dump(mode="json")
    tree["data"]["files"] = [str(absolute(f, cwd)) for f in cfg.data.files]
    model = absolute(cfg.model.id, cwd)
    if cfg.model.id not in (SMOLLM2_ID, TINY_ID) and (
            model.is_dir() or (model.is_file() and model.suffix.lower() == ".gguf")):
        tree["model"]["id"] = str(model)
    for stage, ref in cfg.stages.given().items():  # a local checkpoint given as a stage
        path = absolute(ref, cwd)
        if not ref.startswith(("runs:/", "models:/")) and path.exists():
            tree["stages"][stage]["from"] = str(path)
    if tree == cfg.model_dump(mode="json"):
        return cfg
    return AuditConfig.model_validate(tree)
