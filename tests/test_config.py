"""Config loading: suite YAML, user file, --set overrides, one-line errors."""

from __future__ import annotations

import pytest

from components.config import AuditConfig, parse_set
from components.registry import load_config
from components.errors import UserError

from conftest import TINY


def test_suite_defaults_and_quick():
    full = load_config("capitals")
    quick = load_config("capitals", quick=True)
    assert full.suite == "capitals" and full.model.id == "smollm2-135m-instruct"
    assert full.data.n_eval == 40 and quick.data.n_eval == 16
    assert quick.recover.sizes == [4]
    assert full.digest() != quick.digest()


def test_set_overrides_parse_yaml_values():
    cfg = load_config("capitals", overrides=["perturb.kl_penalty=0.25", "recover.sizes=[1,3]", "seed=7"])
    assert cfg.perturb.kl_penalty == 0.25
    assert cfg.recover.sizes == [1, 3]
    assert cfg.seed == 7


def test_config_file_merges_over_suite():
    cfg = load_config(config_file=TINY)
    assert cfg.model.id == "tiny-llama"
    assert cfg.tune.lr == 0.01
    assert cfg.probe.ci_level == 0.95  # from the defaults, untouched


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["perturb.kl_penalty=-1"], "perturb.kl_penalty: Input should be greater than or equal to 0, got -1"),
        (["tune.bogus=1"], "tune.bogus: unknown key"),
        (["recover.sizes=[50]"], "recover.sizes: 50 is larger than the in-task recovery pool"),
        (["model.precision=fp8"], "model.precision: Input should be 'fp32' or 'bf16', got 'fp8'"),
        (["nokeyvalue"], "--set nokeyvalue: expected key=value"),
    ],
)
def test_bad_config_is_one_line_user_error(overrides, expected):
    with pytest.raises(UserError) as e:
        load_config("capitals", overrides=overrides)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_suite_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="suite 'nope': unknown; expected one of capitals"):
        load_config("nope")
    with pytest.raises(UserError, match="config file not found"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tune: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(config_file=bad)


def test_parse_set_keeps_strings():
    assert parse_set(["model.id=/some/path", "perturb.kind=none"]) == [
        ("model.id", "/some/path"), ("perturb.kind", "none")
    ]


def test_digest_is_stable_and_sensitive():
    a, b = AuditConfig(), AuditConfig()
    assert a.digest() == b.digest()
    b.perturb.kl_penalty = 0.5
    assert a.digest() != b.digest()


def test_perturb_kinds_and_probe_fields():
    cfg = load_config("capitals", overrides=["perturb.kind=reinit", "perturb.reinit_layers=[3,1,3]",
                                             "probe.probe_pooling=mean"])
    assert cfg.perturb.reinit_layers == [1, 3] and cfg.probe.probe_pooling == "mean"
    assert load_config("capitals").perturb.reinit_layers is None  # every block
    with pytest.raises(UserError, match="perturb.reinit_layers"):
        load_config("capitals", overrides=["perturb.reinit_layers=[-1]"])
    with pytest.raises(UserError, match="probe.probe_pooling"):
        load_config("capitals", overrides=["probe.probe_pooling=max"])


def test_orchestration_settings_are_not_part_of_the_digest():
    base = load_config("capitals")
    same = load_config("capitals", overrides=[
        "ray.probe_cpus=2", "ray.train_cpus=2", "ray.max_retries=3", "perturb.scaling.num_workers=2",
        "tune.scaling.cpus_per_worker=2", "sweep.max_concurrent=1"])
    assert same.digest() == base.digest()
    assert "ray" not in base.science() and "scaling" not in base.science()["perturb"]
    assert load_config("capitals", overrides=["perturb.kl_penalty=0.1"]).digest() != base.digest()
