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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

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
        if self.name not in MODEL_OPTIONS:
            raise ValueError(
                f"model.name must be one of {sorted(MODEL_OPTIONS)}, got {self.name!r}"
            )
        if self.spatial_dims not in (2, 3):
            raise ValueError(
                f"model.spatial_dims must be 2 or 3, got {self.spatial_dims!r}"
            )
        if self.name in _CLASSIFYING and self.num_classes is None:
            raise ValueError(f"model.num_classes is required for {self.name}")
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
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return kwargs


@dataclass(frozen=True)
class Config:
    """A whole config file (sections are added as the toolkit grows)."""

    model: ModelConfig

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; allowed: {allowed}")
        if "model" not in data or not isinstance(data["model"], Mapping):
            raise ValueError("config needs a 'model' section (a mapping)")
        return cls(model=ModelConfig.from_dict(data["model"]))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict()}


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
