from __future__ import annotations

import inspect

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
