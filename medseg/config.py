"""Typed configuration loaded from YAML (safe loader); unknown keys are errors.

A config file has one section per concern. This module knows the ``model`` section::

    model:
      name: unet            # a registered builder: unet, autoencoder, classifier
      spatial_dims: 3
      in_channels: 1
      num_classes: 3
      patch_size: [40, 56, 40]
      filters: [32, 64, 128, 256]   # any further keys are the builder's options
      norm: instance

No Keras here: option names are checked against :data:`MODEL_OPTIONS`, which a test
keeps equal to the builders' signatures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from medseg.config_types import (
    OPTION_TYPES,
    _check_fields,
    check_value,
    parse_duration,
)
from medseg.config_types import (
    format_duration as format_duration,  # read from here too
)
from medseg.errors import InputFileError

_COMMON = ("spatial_dims", "in_channels", "patch_size", "name")
_BLOCK = (
    "filters",
    "convs_per_level",
    "kernel_size",
    "upsampling",
    "downsampling",
    "padding_mode",
    "norm",
    "activation",
    "dropout",
    "residual",
    "dilation",
)
#: Builder options per model name, beyond ModelConfig's own fields.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "unet": (*_BLOCK, "padding", "deep_supervision"),
    "autoencoder": (*_BLOCK, "denoising", "noise_std"),
    "classifier": (
        "architecture",
        "head",
        "base_filters",
        "stem",
        "norm",
        "dropout",
        "hidden_units",
    ),
}
#: Which models take ``num_classes``.
_CLASSIFYING = ("unet", "classifier")


@dataclass(frozen=True)
class ModelConfig:
    """The network to build.

    Attributes:
        name: registered builder (``unet``, ``autoencoder``, ``classifier``).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output classes (``None`` for the autoencoder).
        patch_size: fixed spatial input size, or ``None``.
        options: the builder's other keyword arguments (see :data:`MODEL_OPTIONS`).
    """

    name: str = "unet"
    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int | None = None
    patch_size: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_fields(self, "model")
        for key, value in self.options.items():
            if key in OPTION_TYPES:
                check_value(value, OPTION_TYPES[key], f"model.{key}")
        if self.name not in MODEL_OPTIONS:
            raise ValueError(
                f"model.name must be one of {sorted(MODEL_OPTIONS)}, got {self.name!r}"
            )
        if self.spatial_dims not in (2, 3):
            raise ValueError(
                f"model.spatial_dims must be 2 or 3, got {self.spatial_dims!r}"
            )
        if self.name not in _CLASSIFYING and self.num_classes is not None:
            raise ValueError(f"model.num_classes does not apply to {self.name}")
        unknown = sorted(set(self.options) - set(MODEL_OPTIONS[self.name]))
        if unknown:
            allowed = sorted(
                {f.name for f in fields(self)} - {"options"}
                | set(MODEL_OPTIONS[self.name])
            )
            raise ValueError(
                f"unknown model key(s) {unknown} for {self.name}; allowed: {allowed}"
            )
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
            if len(self.patch_size) != self.spatial_dims:
                raise ValueError(
                    f"model.patch_size {self.patch_size} must have {self.spatial_dims} "
                    "sizes"
                )
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        own = {f.name for f in fields(cls)} - {"options"}
        data = dict(data)
        if "options" in data:
            raise ValueError(
                "model: give builder options as keys of 'model', not 'options'"
            )
        given = {k: v for k, v in data.items() if k in own}
        options = {k: v for k, v in data.items() if k not in own}
        return cls(**given, options=options)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "patch_size": None if self.patch_size is None else list(self.patch_size),
        }
        out.update(
            {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        )
        return out

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``medseg.models.build_model(self.name, ...)``."""
        kwargs = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            **self.options,
        }
        if self.name in _CLASSIFYING:
            if self.num_classes is None:
                raise ValueError(
                    f"model.num_classes is not set for {self.name} (training fills it "
                    "in from the dataset's labels)"
                )
            kwargs["num_classes"] = self.num_classes
        return kwargs


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the random transforms (nnU-Net-like defaults).

    Attributes:
        mirror_axes: spatial axes that may be flipped (each with probability 0.5);
            left out, every spatial axis of the model. Leave out axes whose flip
            changes a label's meaning (left/right labels). Prediction mirrors the same
            axes for test-time augmentation.
        p_rotate, rotation_deg: probability and range (+-) of rotation about each axis
            (in 3D about all three, in 2D in-plane).
        p_scale, scale_range: probability and range of isotropic scaling (< 1 zooms in).
        p_elastic, elastic_sigma, elastic_magnitude: elastic deformation (voxels):
            smoothing of a random displacement field and its largest displacement.
        p_gamma, gamma_range: gamma correction of intensities rescaled to [0, 1].
        p_brightness, brightness_range: multiplicative brightness.
        p_contrast, contrast_range: contrast around the mean, range preserved.
        p_noise, noise_std: additive Gaussian noise (std drawn up to ``noise_std``).
        p_blur, blur_sigma: Gaussian blur (sigma drawn in the range, voxels).
    """

    mirror_axes: tuple[int, ...] | None = None
    p_rotate: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.0
    elastic_sigma: float = 4.0
    elastic_magnitude: float = 3.0
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self):
        _check_fields(self, "train.augment")
        for name in (
            "p_rotate",
            "p_scale",
            "p_elastic",
            "p_gamma",
            "p_brightness",
            "p_contrast",
            "p_noise",
            "p_blur",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {value!r}")
        if self.mirror_axes is not None:
            object.__setattr__(self, "mirror_axes", tuple(self.mirror_axes))
        for name in (
            "scale_range",
            "gamma_range",
            "brightness_range",
            "contrast_range",
            "blur_sigma",
        ):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"augment.{name} must be 0 < low <= high, got "
                    f"{getattr(self, name)!r}"
                )
            object.__setattr__(self, name, (float(low), float(high)))


def _from_flat_dict(cls, data: Mapping[str, Any], section: str):
    """Builds a flat dataclass, naming unknown keys and the allowed ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{section} must be a mapping of settings, got {data!r}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; allowed: {allowed}")
    return cls(**data)


def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


TASKS = ("segmentation", "classification", "reconstruction")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how each case is prepared.

    Attributes:
        dataset: dataset folder (``medseg train --data`` overrides it).
        task: ``segmentation``; ``reconstruction`` (autoencoder pretraining on the
            images, labels not needed); ``classification`` (a MedMNIST-style
            ``.npz``: trained on ``train_*``, validated on ``val_*``).
        target_spacing_mm: voxel size to resample to; ``None``: the dataset median.
        normalization: one scheme per channel (``{scheme: zscore}``, ...); ``None``:
            z-score per case for every channel.
        crop_nonzero: crop each case to its non-zero region first.
        nonfinite: ``error`` refuses scans with NaN/Inf, ``replace`` fills them.
        cache_dir: keep preprocessed cases on disk here (default: in memory).
        foreground_oversample: fraction of patches centred on a foreground voxel.
        labels: label values and names (``{0: membrane, 255: cell}``) when the dataset
            declares none, or to override what it declares.
    """

    dataset: str | None = None
    task: str = "segmentation"
    target_spacing_mm: tuple[float, ...] | None = None
    normalization: tuple[dict, ...] | None = None
    crop_nonzero: bool = True
    nonfinite: str = "error"
    cache_dir: str | None = None
    foreground_oversample: float = 0.33
    labels: dict[int, str] | None = None

    def __post_init__(self):
        _check_fields(self, "data")
        if self.labels is not None:
            try:
                labels = {int(k): str(v) for k, v in dict(self.labels).items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"data.labels must map integer label values to names, got "
                    f"{self.labels!r}"
                ) from None
            if len(labels) < 2:
                raise ValueError(f"data.labels needs at least 2 labels, got {labels!r}")
            object.__setattr__(self, "labels", labels)
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise ValueError(
                f"data.foreground_oversample must be in [0, 1], got "
                f"{self.foreground_oversample!r}"
            )
        if self.target_spacing_mm is not None:
            object.__setattr__(self, "target_spacing_mm", tuple(self.target_spacing_mm))
        if self.normalization is not None:
            object.__setattr__(
                self, "normalization", tuple(dict(n) for n in self.normalization)
            )


OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("poly", "constant")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
#: How ``medseg train --strategy`` spreads a run over devices and machines: an
#: argument of the run, not a config setting, since a run may resume elsewhere.
STRATEGIES = ("auto", "none", "mirrored", "multiworker")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: Adam 1e-3 with a poly decay (over the steps, or over the time
    budget), Dice + cross-entropy, nnU-Net's augmentation. Adam beat nnU-Net's SGD
    (0.01, Nesterov momentum 0.99) on the hippocampus at a CPU's budget
    (experiments/recipe_study.py); ``optimizer: sgd`` gives SGD.

    Attributes:
        epochs, steps_per_epoch: length of training (an epoch is a number of batches).
        batch_size: patches per step; ``None``: planned for the memory budget.
        optimizer: ``adam`` or ``sgd`` (Nesterov, with ``momentum``).
        learning_rate, lr_schedule, poly_exponent: the initial rate and its decay.
        weight_decay: decoupled weight decay (AdamW with ``adam``); 0 for none.
        loss: ``dice_ce`` (default), ``dice``, ``dice_focal``, ``focal`` or
            ``tversky``.
        folds, fold: k-fold split by case; ``fold`` is an index or ``"all"``.
        seed: makes splitting, sampling and augmentation repeatable.
        val_interval: validate on whole held-out cases every this many epochs.
        val_overlap: sliding-window overlap for validation.
        precision: ``auto`` (mixed float16 on GPU, float32 on CPU), or a Keras policy.
        keep: the bundle at the top of the run folder: ``best`` (the validated epoch
            with the best validation score so far) or ``last`` (the latest validated
            epoch, so the end of training, as nnU-Net's final checkpoint). Use ``last``
            when the run is scored on its validation cases (cross-validation): picking
            the epoch on them makes their score optimistic.
        memory_gb: memory budget for planning; ``None``: the GPU's, or 4 GB on CPU.
        augment: :class:`AugmentConfig` fields.
        init_from: a bundle whose weights start the run (fine-tuning; a
            reconstruction bundle gives its encoder). Layers are matched by name.
        freeze: glob patterns of layer names kept frozen (e.g. ``enc*``).
        unfreeze_after: unfreeze them after this many epochs (``None``: never).
        time_budget: wall-clock seconds the run may take (``"45m"``, ``"2h"``,
            ``"1h30m"`` or a number of seconds). The learning rate decays over the
            budget's elapsed fraction instead of over the steps, and the run stops
            when the budget is spent, with its bundle; ``epochs`` is then no limit.
            ``None``: ``epochs`` of ``steps_per_epoch`` steps.
        ema: keep an exponential moving average of the weights with this momentum
            (such as 0.999; the optimizer's own), used for validation and written to
            the bundle; ``None``: the weights as trained.
    """

    epochs: int = 100
    steps_per_epoch: int = 250
    batch_size: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.99
    weight_decay: float = 0.0
    lr_schedule: str = "poly"
    poly_exponent: float = 0.9
    loss: str = "dice_ce"
    folds: int = 5
    fold: int | str = 0
    seed: int = 0
    val_interval: int = 1
    val_overlap: float = 0.5
    precision: str = "auto"
    keep: str = "best"
    memory_gb: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init_from: str | None = None
    freeze: tuple[str, ...] = ()
    unfreeze_after: int | None = None
    time_budget: float | None = None
    ema: float | None = None
    calibrate: bool = False

    def __post_init__(self):
        if self.time_budget is not None:
            object.__setattr__(
                self,
                "time_budget",
                parse_duration(self.time_budget, "train.time_budget"),
            )
        _check_fields(self, "train")
        if self.ema is not None and self.unfreeze_after is not None:
            raise ValueError(
                "train.ema and train.unfreeze_after do not go together (unfreezing "
                "starts a new optimizer, and with it a new average)"
            )
        object.__setattr__(self, "freeze", tuple(str(p) for p in self.freeze))
        if self.unfreeze_after is not None and (
            not isinstance(self.unfreeze_after, int) or self.unfreeze_after < 1
        ):
            raise ValueError(
                "train.unfreeze_after must be a positive int, got "
                f"{self.unfreeze_after!r}"
            )
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("keep", ("best", "last")),
            ("loss", ("dice_ce", "dice", "dice_focal", "focal", "tversky")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"train.{name} must be one of {choices}, got "
                    f"{getattr(self, name)!r}"
                )
        for name in ("epochs", "steps_per_epoch", "folds", "val_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(
                f"train.batch_size must be positive, got {self.batch_size!r}"
            )
        if self.fold != "all" and not (
            isinstance(self.fold, int) and 0 <= self.fold < self.folds
        ):
            raise ValueError(
                f"train.fold must be 'all' or an int in [0, {self.folds - 1}], got "
                f"{self.fold!r}"
            )
        if self.augment is None:
            object.__setattr__(self, "augment", AugmentConfig())
        elif not isinstance(self.augment, AugmentConfig | Mapping):
            raise ValueError(f"train.augment must be a mapping, got {self.augment!r}")
        if isinstance(self.augment, Mapping):
            object.__setattr__(
                self,
                "augment",
                _from_flat_dict(AugmentConfig, self.augment, "train.augment"),
            )


@dataclass(frozen=True)
class Config:
    """A whole config file: ``model``, ``data`` and ``train`` sections."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.train.calibrate and self.data.task != "segmentation":
            raise ValueError(
                "train.calibrate fits a temperature for segmentation only, not for "
                f"data.task {self.data.task!r}"
            )
        augment = self.train.augment
        if augment.mirror_axes is None:  # every spatial axis of the model
            axes = tuple(range(self.model.spatial_dims))
            object.__setattr__(
                self,
                "train",
                replace(self.train, augment=replace(augment, mirror_axes=axes)),
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; allowed: {allowed}")
        if "model" not in data or not isinstance(data["model"], Mapping):
            raise ValueError("config needs a 'model' section (a mapping)")
        return cls(
            model=ModelConfig.from_dict(data["model"]),
            data=_from_flat_dict(DataConfig, data.get("data") or {}, "data"),
            train=_from_flat_dict(TrainConfig, data.get("train") or {}, "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        train = {
            f.name: _to_plain(getattr(self.train, f.name))
            for f in fields(self.train)
            if f.name != "augment"
        }
        train["augment"] = {
            f.name: _to_plain(getattr(self.train.augment, f.name))
            for f in fields(self.train.augment)
        }
        return {
            "model": self.model.to_dict(),
            "data": {
                f.name: _to_plain(getattr(self.data, f.name)) for f in fields(self.data)
            },
            "train": train,
        }

    def replace(self, **sections) -> Config:
        """A copy with whole sections replaced."""
        return Config(
            **{**{f.name: getattr(self, f.name) for f in fields(self)}, **sections}
        )


def load_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping with the safe loader (no Python objects are built).

    Raises:
        InputFileError: missing file, bad YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise InputFileError(path, f"not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "config must be a YAML mapping of sections")
    return data


def relative_to_config(dataset: str | None, config_path: str | Path) -> str | None:
    """A config's ``data.dataset`` as an absolute path: relative paths are relative to
    the folder of the config file, not to the working directory."""
    if not dataset or Path(dataset).is_absolute():
        return dataset
    return str((Path(config_path).parent / dataset).resolve())


def load_config(path: str | Path) -> Config:
    """Loads and validates a config file.

    Raises:
        InputFileError: unreadable file, or a config error (naming the bad key).
    """
    data = load_yaml(path)
    try:
        return Config.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise InputFileError(path, str(exc)) from None
