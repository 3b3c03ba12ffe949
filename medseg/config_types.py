"""The types and ranges of config values, checked in one place when a config is
read, and the durations of time budgets.

No Keras here, and nothing of the rest of medseg: :mod:`medseg.config` builds on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

#: The type of each builder option (checked on loading, before any network is
#: built); options not listed are checked by their builder.
OPTION_TYPES: dict[str, Any] = {
    "filters": tuple[int, ...],
    "convs_per_level": int,
    "kernel_size": int,
    "upsampling": str,
    "downsampling": str,
    "padding_mode": str,
    "padding": str,
    "norm": str,
    "activation": str,
    "dropout": float,
    "residual": bool,
    "dilation": int,
    "deep_supervision": int,
    "denoising": bool,
    "noise_std": float,
    "architecture": str,
    "head": str,
    "base_filters": int,
    "stem": str,
    "hidden_units": int,
}
#: Ranges of numbers, by ``section.key`` (or the key alone for every section):
#: ``(low, high, low_open, high_open)``; ``None`` leaves a side open.
RANGES: dict[str, tuple] = {
    "filters": (1, None, False, False),
    "convs_per_level": (1, None, False, False),
    "kernel_size": (1, None, False, False),
    "dilation": (1, None, False, False),
    "deep_supervision": (0, None, False, False),
    "dropout": (0.0, 1.0, False, True),
    "noise_std": (0.0, None, False, False),
    "base_filters": (1, None, False, False),
    "hidden_units": (1, None, False, False),
    "in_channels": (1, None, False, False),
    "num_classes": (1, None, False, False),
    "patch_size": (1, None, False, False),
    "target_spacing_mm": (0.0, None, True, False),
    "foreground_oversample": (0.0, 1.0, False, False),
    "epochs": (1, None, False, False),
    "steps_per_epoch": (1, None, False, False),
    "batch_size": (1, None, False, False),
    "learning_rate": (0.0, None, True, False),
    "momentum": (0.0, 1.0, False, True),
    "weight_decay": (0.0, None, False, False),
    "poly_exponent": (0.0, None, True, False),
    "folds": (1, None, False, False),
    "seed": (0, None, False, False),
    "val_interval": (1, None, False, False),
    "val_overlap": (0.0, 1.0, False, True),
    "memory_gb": (0.0, None, True, False),
    "unfreeze_after": (1, None, False, False),
    "time_budget": (0.0, None, True, False),
    "ema": (0.0, 1.0, True, True),
    "rotation_deg": (0.0, 180.0, False, False),
    "elastic_sigma": (0.0, None, True, False),
    "elastic_magnitude": (0.0, None, False, False),
    "mirror_axes": (0, 2, False, False),
}
for _p in (
    "rotate",
    "scale",
    "elastic",
    "gamma",
    "brightness",
    "contrast",
    "noise",
    "blur",
):
    RANGES[f"p_{_p}"] = (0.0, 1.0, False, False)


def check_value(value: Any, hint: Any, name: str) -> None:
    """Checks ``value`` against the type ``hint`` of the setting ``name``: ints are
    ints (not ``true``), floats are finite numbers, a tuple is a list of the right
    length and items, a mapping a mapping; numbers also against :data:`RANGES`.

    Raises:
        ValueError: ``name must be ..., got ...``.
    """
    import types
    import typing

    def fail(wanted: str):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")

    origin = typing.get_origin(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                check_value(value, option, name)
                return
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else errors[-1])
    key = name.rpartition(".")[2]
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        _check_range(value, key, name)
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        if not math.isfinite(value):
            fail("a finite number")
        _check_range(value, key, name)
        return
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail("a list")
        args = typing.get_args(hint)
        items = [args[0]] * len(value) if args[1:] == (Ellipsis,) else list(args)
        if len(items) != len(value):
            fail(f"a list of {len(items)}")
        for item, item_hint in zip(value, items, strict=True):
            check_value(item, item_hint, f"each of {name}")
        return
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            fail("a mapping")
        return


def _check_range(value, key: str, name: str) -> None:
    if key not in RANGES:
        return
    low, high, low_open, high_open = RANGES[key]
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = (
            f"{left}{'' if low is None else low}, {'' if high is None else high}{right}"
        )
        if high is None:
            interval = f"{'>' if low_open else '>='} {low}"
            raise ValueError(f"{name} must be {interval}, got {value!r}")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_fields(instance, section: str) -> None:
    """Checks every field of a config dataclass against its annotation."""
    import typing

    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):
        if f.name in ("options", "augment"):
            continue
        check_value(getattr(instance, f.name), hints[f.name], f"{section}.{f.name}")


_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?"
)


def parse_duration(value: str | float | int, name: str = "duration") -> float:
    """Seconds from ``"45m"``, ``"2h"``, ``"1h30m"``, ``"90s"`` or a number of seconds.

    Raises:
        ValueError: naming ``name``: not a duration, or not positive and finite.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a duration such as 45m or 2h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if text and match is None:
            try:
                seconds = float(text)
            except ValueError:
                seconds = math.nan
        elif not text or not any(match.groups()):
            seconds = math.nan
        else:
            hours, minutes, secs = (float(g or 0) for g in match.groups())
            seconds = 3600 * hours + 60 * minutes + secs
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"{name} must be a positive duration such as 45m, 2h or 1h30m, "
            f"got {value!r}"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``2h 05m``, ``12m 30s``, ``40s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
