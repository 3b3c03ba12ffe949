"""Shared helpers of the layers: argument checks, the reshaping between a
channels-last map and its non-overlapping pooling windows, and the scope of a
hand-written backward pass."""

from __future__ import annotations

import contextlib
import math

import keras
from keras import ops


def after_upstream(upstream):
    """A context in which the ops of a hand-written backward pass wait for the
    upstream gradient.

    Without it TensorFlow's graph executor runs the backward ops that read only forward
    tensors (``x - mean``, ``y > 0``) as soon as the forward pass has made those, and
    keeps their full-size results until the backward pass reaches the layer: memory
    the gradient was written not to keep.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.control_dependencies([upstream])
    return contextlib.nullcontext()


def waits_for_upstream(gradient):
    """The ``backward`` function for ``keras.ops.custom_gradient`` that computes
    ``gradient(upstream)`` inside :func:`after_upstream` (the upstream gradient comes
    positionally or as ``upstream=``, by backend)."""

    def backward(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        with after_upstream(upstream):
            return gradient(upstream)

    return backward


def as_tuple(value, spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of ``spatial_dims`` positive ints, as a tuple.

    Raises:
        ValueError: naming ``name`` and the bad value.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * spatial_dims
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(
                f"{name} must be an int or {spatial_dims} ints, got {value!r}"
            ) from None
    if len(values) != spatial_dims or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(
            f"{name} must be a positive int or {spatial_dims} positive ints, "
            f"got {value!r}"
        )
    return values


def dims(x) -> list:
    """Static size where known, else the dynamic size tensor, for each axis of ``x``."""
    static = tuple(x.shape)
    dynamic = ops.shape(x)
    return [s if s is not None else dynamic[i] for i, s in enumerate(static)]


def to_windows(x, pool: tuple[int, ...]):
    """``(B, *S, C)`` -> ``(B, *cells, C, P)`` with ``cells = S // pool``, ``P =
    prod(pool)``.

    Voxels past the last whole window are dropped, as 'valid' pooling drops them.
    """
    n = len(pool)
    shape = dims(x)
    batch, spatial, channels = shape[0], shape[1:-1], shape[-1]
    cells = [s // p for s, p in zip(spatial, pool, strict=True)]
    x = x[(slice(None), *(slice(0, c * p) for c, p in zip(cells, pool, strict=True)))]
    split = [batch]
    for c, p in zip(cells, pool, strict=True):
        split += [c, p]
    x = ops.reshape(x, [*split, channels])
    # (B, c1, p1, ..., cn, pn, C) -> (B, c1, ..., cn, C, p1, ..., pn)
    order = [
        0,
        *(1 + 2 * i for i in range(n)),
        2 * n + 1,
        *(2 + 2 * i for i in range(n)),
    ]
    x = ops.transpose(x, order)
    return ops.reshape(x, [batch, *cells, channels, math.prod(pool)])


def from_windows(windows, pool: tuple[int, ...]):
    """Inverse of :func:`to_windows`: ``(B, *cells, C, P)`` -> ``(B, *S, C)``."""
    n = len(pool)
    shape = dims(windows)
    batch, cells, channels = shape[0], shape[1 : n + 1], shape[n + 1]
    x = ops.reshape(windows, [batch, *cells, channels, *pool])
    order = [0]
    for i in range(n):
        order += [1 + i, n + 2 + i]
    order.append(n + 1)
    x = ops.transpose(x, order)
    return ops.reshape(
        x, [batch, *(c * p for c, p in zip(cells, pool, strict=True)), channels]
    )


def window_offsets(pool: tuple[int, ...]) -> list[list[int]]:
    """For each flat window position ``k``, its offset along each axis (C order)."""
    offsets = []
    for k in range(math.prod(pool)):
        offset, rest = [], k
        for p in reversed(pool):
            offset.append(rest % p)
            rest //= p
        offsets.append(offset[::-1])
    return offsets
