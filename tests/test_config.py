from __future__ import annotations

import inspect
import re

import pytest

from medseg.config import MODEL_OPTIONS, Config, ModelConfig, load_config
from medseg.errors import InputFileError
from medseg.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_option_table_matches_the_builders(name):
    own = {"name", "spatial_dims", "in_channels", "num_classes", "patch_size"}
    signature = set(inspect.signature(MODELS[name]).parameters) - own
    assert set(MODEL_OPTIONS[name]) == signature


def test_model_config_round_trip_and_build():
    data = {
        "name": "unet",
        "spatial_dims": 2,
        "in_channels": 1,
        "num_classes": 2,
        "patch_size": [16, 16],
        "filters": [4, 8],
        "norm": "none",
        "convs_per_level": 1,
    }
    config = ModelConfig.from_dict(data)
    assert config.patch_size == (16, 16) and config.options["filters"] == [4, 8]
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict() == data
    model = build_model(config.name, **config.builder_kwargs())
    assert model.count_params() == 770  # the hand-counted tiny U-Net


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "vnet", "num_classes": 2}, "model.name must be one of"),
        (
            {"num_classes": 2, "depth": 4},
            r"unknown model key\(s\) \['depth'\] for unet",
        ),
        ({"name": "autoencoder", "num_classes": 2}, "does not apply to autoencoder"),
        ({"num_classes": 2, "patch_size": [8, 8]}, "must have 3 sizes"),
        ({"num_classes": 2, "spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"num_classes": 2, "options": {}}, "not 'options'"),
    ],
)
def test_model_config_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(data)


def test_num_classes_is_needed_to_build():
    config = ModelConfig.from_dict({"name": "unet"})  # training fills it in
    with pytest.raises(ValueError, match="model.num_classes is not set for unet"):
        config.builder_kwargs()


def test_data_and_train_sections(tmp_path):
    config = Config.from_dict(
        {
            "model": {"num_classes": 2},
            "data": {
                "target_spacing_mm": [1, 1, 2],
                "normalization": [{"scheme": "ct"}],
            },
            "train": {"epochs": 3, "fold": "all", "augment": {"mirror_axes": [0]}},
        }
    )
    assert config.data.target_spacing_mm == (1, 1, 2)
    assert config.train.augment.mirror_axes == (0,)
    two_d = Config.from_dict({"model": {"name": "unet", "spatial_dims": 2}})
    assert two_d.train.augment.mirror_axes == (0, 1)  # default: every spatial axis
    assert Config.from_dict(config.to_dict()) == config
    for section, data, message in [
        ("train", {"epoch": 3}, r"unknown train key\(s\) \['epoch'\]"),
        ("train", {"fold": 7}, "train.fold must be 'all' or an int in"),
        ("train", {"optimizer": "lbfgs"}, "train.optimizer must be one of"),
        ("train", {"keep": "first"}, r"train.keep must be one of \('best', 'last'\)"),
        ("train", {"augment": {"p_flip": 1}}, r"unknown train.augment key"),
        ("data", {"task": "detection"}, "data.task must be one of"),
        ("data", {"foreground_oversample": 2}, "foreground_oversample must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            Config.from_dict({"model": {"num_classes": 2}, section: data})


def test_shipped_experiment_configs_load():
    from tests.conftest import REPO

    for path in sorted((REPO / "experiments").glob("*.yaml")):
        load_config(path)


def test_config_sections_are_checked():
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['trainer'\]"):
        Config.from_dict({"model": {"num_classes": 2}, "trainer": {}})
    with pytest.raises(ValueError, match="needs a 'model' section"):
        Config.from_dict({})


def test_load_config_uses_the_safe_loader(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(InputFileError, match="evil.yaml: not valid YAML"):
        load_config(evil)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(InputFileError, match="must be a YAML mapping"):
        load_config(listed)
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  name: classifier\n  spatial_dims: 2\n  num_classes: 4\n")
    assert load_config(good).model.num_classes == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: unet\n  num_classes: 2\n  upsample: nearest\n")
    with pytest.raises(
        InputFileError, match=r"bad.yaml: unknown model key\(s\) \['upsample'\]"
    ):
        load_config(bad)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "train",
            "learning_rate",
            float("nan"),
            "train.learning_rate must be a finite",
        ),
        ("train", "learning_rate", -1, "train.learning_rate must be > 0.0, got -1"),
        ("train", "epochs", True, "train.epochs must be an integer, got True"),
        ("train", "batch_size", 2.5, "train.batch_size must be an integer"),
        ("train", "momentum", 1.0, "train.momentum must be in [0.0, 1.0), got 1.0"),
        ("train", "val_overlap", float("inf"), "train.val_overlap must be a finite"),
        ("train", "freeze", "enc*", "train.freeze must be a list, got 'enc*'"),
        ("train", "ema", 1.0, "train.ema must be in (0.0, 1.0), got 1.0"),
        ("model", "filters", 16, "model.filters must be a list, got 16"),
        ("model", "filters", [16, "a"], "each of model.filters must be an integer"),
        ("model", "dropout", 1.5, "model.dropout must be in [0.0, 1.0), got 1.5"),
        ("model", "residual", "yes", "model.residual must be true or false"),
        (
            "data",
            "target_spacing_mm",
            [1, 0, 1],
            "each of data.target_spacing_mm must be > 0",
        ),
        ("data", "labels", [1, 2], "data.labels must be a mapping, got [1, 2]"),
    ],
)
def test_every_config_value_is_checked_for_type_and_range(
    tmp_path, section, key, value, message
):
    import yaml

    data = {"model": {"name": "unet"}, "data": {}, "train": {}}
    data[section][key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputFileError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("p_rotate", float("nan"), "train.augment.p_rotate must be a finite number"),
        ("mirror_axes", [0, 5], "each of train.augment.mirror_axes must be in [0, 2]"),
        ("scale_range", [0.7, float("inf")], "train.augment.scale_range must be a"),
    ],
)
def test_augmentation_values_are_checked_too(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config.from_dict(
            {"model": {"name": "unet"}, "train": {"augment": {key: value}}}
        )


def test_a_batch_that_fits_only_a_sliver_of_a_patch_is_refused():
    from medseg.training.planning import plan_training

    fingerprint = {
        "spacing_mm": {"median": [1.0, 1.0, 1.0]},
        "shape": {"median": [36, 50, 35]},
        "num_readable_cases": 208,
    }

    def config(batch):
        return Config.from_dict(
            {
                "model": {"name": "unet", "filters": [8, 16], "num_classes": 3},
                "train": {"batch_size": batch, "memory_gb": 1.0},
            }
        )

    assert plan_training(config(2), fingerprint).patch_size == (36, 50, 36)
    with pytest.raises(ValueError, match="train.batch_size 100000 fits the 1.0 GB"):
        plan_training(config(100000), fingerprint)
