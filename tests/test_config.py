import dataclasses
from pathlib import Path

import pytest
import yaml

from datamodels.config import RunConfig, diff_identity, load_config
from datamodels.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_digits_yaml_is_the_embedded_default():
    assert load_config(ROOT / "pipelines" / "digits.yaml") == load_config(None) == RunConfig()


def test_digits_yaml_lists_every_key():
    from datamodels.config import _flatten, describe_fields

    listed = set(_flatten(yaml.safe_load((ROOT / "pipelines" / "digits.yaml").read_text())))
    assert listed == {key for key, _, _ in describe_fields()}


def test_cifar10_yaml_loads_full_width_with_width_flips():
    cfg = load_config(ROOT / "pipelines" / "cifar10.yaml")
    assert cfg.model.widths == (64, 128, 256, 512)
    assert cfg.train.flip and cfg.train.tta_flip and cfg.data.dataset == "cifar10"


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.epoch" in msg and "epochs" in msg


@pytest.mark.parametrize("text,key,expected,got", [
    ("collect:\n  alpha: 1.5\n", "collect.alpha", "(0, 1]", "1.5"),
    ("collect:\n  alpha: 0\n", "collect.alpha", "(0, 1]", "0"),
    ("collect:\n  models: 0\n", "collect.models", "[1, inf]", "0"),
    ("train:\n  epochs: ten\n", "train.epochs", "int", "'ten'"),
    ("train:\n  flip: 3\n", "train.flip", "bool", "3"),
    ("data:\n  dataset: imagenet\n", "data.dataset", "digits", "'imagenet'"),
    ("model:\n  widths: [1, 2]\n", "model.widths", "list of 4", "[1, 2]"),
])
def test_bad_values_name_key_expected_and_actual(tmp_path, text, key, expected, got):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and expected in msg and got in msg, msg


def test_int_is_accepted_for_float_and_types_are_kept(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_overrides_apply_and_are_validated():
    cfg = load_config(None, ["train.epochs=8", "collect.alpha=0.25", "model.widths=[8, 8, 8, 8]"])
    assert (cfg.train.epochs, cfg.collect.alpha, cfg.model.widths) == (8, 0.25, (8, 8, 8, 8))
    with pytest.raises(ConfigError, match="--set.*collect.alpha"):
        load_config(None, ["collect.alpha=2"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(None, ["train.nope=1"])


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(None).train.epochs = 3


def test_identity_ignores_models_and_resources_only():
    a = load_config(None)
    b = load_config(None, ["collect.models=999", "resources.workers=7", "name=other"])
    assert diff_identity(a, b) == {}
    c = load_config(None, ["train.epochs=3", "collect.alpha=0.3"])
    assert set(diff_identity(a, c)) == {"train.epochs", "collect.alpha"}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    assert yaml.safe_load((ROOT / "pipelines" / "digits.yaml").read_text())["name"] == "digits"


def test_every_seed_domain_is_distinct():
    from datamodels.domains import DOMAINS

    assert len(DOMAINS) >= 12
    assert len(set(DOMAINS.values())) == len(DOMAINS), DOMAINS
