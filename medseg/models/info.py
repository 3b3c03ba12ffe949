"""What a model costs: parameters, receptive field, FLOPs and training memory.

Used by ``medseg info`` so a user sees, before training, whether a patch and batch
size fit an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras

from medseg import layers as medseg_layers

#: Optimizer state per trainable parameter, in parameter copies.
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}

_DOWN_BY_POOL = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
)
_UP_BY_SIZE = (
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    medseg_layers.BedOfNailsUnpooling2D,
    medseg_layers.BedOfNailsUnpooling3D,
)
_WINDOWED = (
    medseg_layers.MaxPoolingWithArgmax2D,
    medseg_layers.MaxPoolingWithArgmax3D,
    medseg_layers.NMaxPooling2D,
    medseg_layers.NMaxPooling3D,
)
_UNPOOL = (medseg_layers.MaxUnpooling2D, medseg_layers.MaxUnpooling3D)
_TRANSPOSE = (keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_GLOBAL = (
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.Flatten,
)


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple
    params: int


@dataclass
class ModelInfo:
    """Summary of a model at a given input shape and batch size.

    Attributes:
        rows: one per layer (name, class, output shape without batch, parameters).
        total_params, trainable_params: counts.
        receptive_field: voxels along each spatial axis that one output voxel (or, for a
            classifier, one voxel of the last feature map) depends on.
        flops_per_sample: 2 x multiply-accumulates of convolutions and dense layers for
            one sample (``None`` without a fixed input size).
        memory_bytes: training memory estimate by part for ``batch_size``.
    """

    name: str
    input_shape: tuple
    batch_size: int
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    receptive_field: tuple[int, ...] | None = None
    flops_per_sample: int | None = None
    memory_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "batch_size": self.batch_size,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.total_params - self.trainable_params,
            "receptive_field": None
            if self.receptive_field is None
            else list(self.receptive_field),
            "flops_per_sample": self.flops_per_sample,
            "memory_bytes": dict(self.memory_bytes),
            "layers": [
                {
                    "name": r.name,
                    "class": r.kind,
                    "output_shape": list(r.output_shape),
                    "params": r.params,
                }
                for r in self.rows
            ],
        }


def _count(weights) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def _outputs(layer) -> list:
    node = layer._inbound_nodes[0]
    return list(node.output_tensors)


def _inputs(layer) -> list:
    return list(layer._inbound_nodes[0].input_tensors)


def with_input_shape(model: keras.Model, spatial_shape) -> keras.Model:
    """A clone of ``model`` with a fixed spatial input size (same weights)."""
    channels = model.inputs[0].shape[-1]
    inputs = keras.Input((*spatial_shape, channels), name=model.inputs[0].name)
    clone = keras.models.clone_model(model, input_tensors=inputs)
    clone.set_weights(model.get_weights())
    return clone


def flops_per_voxel(model: keras.Model, spatial_shape) -> float:
    """Forward FLOPs (:attr:`ModelInfo.flops_per_sample`) per input voxel of
    ``model`` at the input size ``spatial_shape``."""
    import math

    info = describe_model(with_input_shape(model, spatial_shape), batch_size=1)
    return (info.flops_per_sample or 0) / math.prod(spatial_shape)


def receptive_field(model: keras.Model) -> tuple[int, ...]:
    """Receptive field of the model's first output, from its layer graph.

    Per spatial axis, each layer updates ``(size, jump)``: a convolution or pooling
    adds ``(kernel - 1) * dilation * jump`` and multiplies the jump by its stride; a
    transposed convolution adds ``(ceil(kernel / stride) - 1) * jump`` and divides
    the jump by its stride; upsampling and unpooling divide the jump; merges take
    the largest field. Global pooling or flattening stops the count (the field of the
    last spatial map is returned). Positions differ in what they see for general
    stride combinations; this is the largest field over positions.
    """
    dims = len(model.inputs[0].shape) - 2
    state = {id(t): ((1,) * dims, (1.0,) * dims) for t in model.inputs}
    last_spatial = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        known = [state[id(t)] for t in _inputs(layer) if id(t) in state]
        if not known:
            continue
        if isinstance(layer, _UNPOOL):
            known = known[
                :1
            ]  # indices and reference tensor carry no field of their own
        size, jump = max(known, key=lambda s: s[0])
        if isinstance(layer, _GLOBAL):
            last_spatial = size
            continue
        size, jump = _step(layer, size, jump)
        for tensor in _outputs(layer):
            state[id(tensor)] = (size, jump)
    first = model.outputs[0]
    if id(first) in state:
        return tuple(int(round(s)) for s in state[id(first)][0])
    return tuple(int(round(s)) for s in last_spatial) if last_spatial else None


def _as_tuple(value, dims):
    return tuple(value) if isinstance(value, list | tuple) else (value,) * dims


def _step(layer, size, jump):
    dims = len(size)
    if isinstance(layer, _TRANSPOSE):
        kernel, strides = (
            _as_tuple(layer.kernel_size, dims),
            _as_tuple(layer.strides, dims),
        )
        size = tuple(
            s + (math.ceil(k / st) - 1) * j
            for s, k, st, j in zip(size, kernel, strides, jump, strict=True)
        )
        return size, tuple(j / st for j, st in zip(jump, strides, strict=True))
    if isinstance(layer, _CONV):
        kernel = _as_tuple(layer.kernel_size, dims)
        strides = _as_tuple(layer.strides, dims)
        dilation = _as_tuple(layer.dilation_rate, dims)
    elif isinstance(layer, _DOWN_BY_POOL):
        kernel = _as_tuple(layer.pool_size, dims)
        strides = _as_tuple(layer.strides, dims)
        dilation = (1,) * dims
    elif isinstance(layer, _WINDOWED):
        kernel = strides = layer.pool_size
        dilation = (1,) * dims
    elif isinstance(layer, _UP_BY_SIZE + _UNPOOL):
        factor = _as_tuple(
            getattr(layer, "size", getattr(layer, "pool_size", None)), dims
        )
        return size, tuple(j / f for j, f in zip(jump, factor, strict=True))
    else:
        return size, jump
    size = tuple(
        s + (k - 1) * d * j
        for s, k, d, j in zip(size, kernel, dilation, jump, strict=True)
    )
    return size, tuple(j * st for j, st in zip(jump, strides, strict=True))


def _layer_flops(layer) -> int | None:
    """2 x multiply-accumulates of a convolution or dense layer, 0 for other layers."""
    if isinstance(layer, _CONV + _TRANSPOSE):
        # kernel (*k, C_in / groups, C_out), or (*k, C_out, C_in) when transposed: one
        # product per kernel entry at every output (or, transposed, input) position
        where = (
            _inputs(layer)[0] if isinstance(layer, _TRANSPOSE) else _outputs(layer)[0]
        )
        spatial = where.shape[1:-1]
        if any(s is None for s in spatial):
            return None
        return 2 * math.prod(layer.kernel.shape) * math.prod(spatial)
    if isinstance(layer, keras.layers.Dense):
        return 2 * math.prod(layer.kernel.shape)
    return 0


def describe_model(
    model: keras.Model,
    *,
    batch_size: int = 2,
    optimizer: str = "adam",
    activation_bytes: int = 4,
) -> ModelInfo:
    """Layer table, parameters, receptive field, FLOPs and a training memory estimate.

    Memory (bytes) for one training step at ``batch_size``: ``parameters`` (float32),
    ``gradients`` (one per trainable parameter), ``optimizer`` (state slots of
    ``optimizer``: Adam 2, SGD with momentum 1), ``activations`` (every layer output,
    kept for backpropagation, at ``activation_bytes`` each: 4 float32, 2 mixed
    precision). An estimate: frameworks add workspace and fragmentation on top.

    Raises:
        ValueError: unknown optimizer.
    """
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTIMIZER_SLOTS)}, got {optimizer!r}"
        )
    info = ModelInfo(model.name, tuple(model.inputs[0].shape[1:]), batch_size)
    activations, flops = 0, 0
    for layer in model.layers:
        outputs = _outputs(layer)
        shape = tuple(outputs[0].shape[1:])
        info.rows.append(
            LayerRow(layer.name, type(layer).__name__, shape, _count(layer.weights))
        )
        for tensor in outputs:
            elems = tensor.shape[1:]
            if activations is not None and all(e is not None for e in elems):
                activations += math.prod(elems)
            else:
                activations = None
        layer_flops = _layer_flops(layer)
        flops = None if flops is None or layer_flops is None else flops + layer_flops
    info.total_params = _count(model.weights)
    info.trainable_params = _count(model.trainable_weights)
    info.receptive_field = receptive_field(model)
    info.flops_per_sample = flops
    parameters = 4 * info.total_params
    info.memory_bytes = {
        "parameters": parameters,
        "gradients": 4 * info.trainable_params,
        "optimizer": 4 * info.trainable_params * OPTIMIZER_SLOTS[optimizer],
    }
    if activations is not None:
        info.memory_bytes["activations"] = activations * batch_size * activation_bytes
        info.memory_bytes["total"] = sum(info.memory_bytes.values())
    return info


def format_info(info: ModelInfo) -> str:
    """The table and summary ``medseg info`` prints."""
    name_width = max([len(r.name) for r in info.rows] + [5])
    kind_width = max([len(r.kind) for r in info.rows] + [5])
    lines = [
        f"{'layer':<{name_width}}  {'class':<{kind_width}}  {'output shape':<22}"
        f"{'params':>12}"
    ]
    for r in info.rows:
        shape = (
            "(" + ", ".join("?" if s is None else str(s) for s in r.output_shape) + ")"
        )
        lines.append(
            f"{r.name:<{name_width}}  {r.kind:<{kind_width}}  {shape:<22}"
            f"{r.params:>12,}"
        )
    lines.append("")
    lines.append(f"model: {info.name}, input {info.input_shape}")
    lines.append(
        f"parameters: {info.total_params:,} total, {info.trainable_params:,} "
        f"trainable, {info.total_params - info.trainable_params:,} non-trainable"
    )
    if info.receptive_field is not None:
        lines.append(
            "receptive field: " + " x ".join(map(str, info.receptive_field)) + " voxels"
        )
    if info.flops_per_sample is not None:
        lines.append(f"FLOPs per sample (forward): {info.flops_per_sample / 1e9:.3f} G")
    else:
        lines.append(
            "FLOPs and activation memory: need a fixed input size (--input-shape)"
        )
    memory = info.memory_bytes
    parts = ", ".join(f"{k} {_human(v)}" for k, v in memory.items() if k != "total")
    lines.append(
        f"training memory at batch {info.batch_size}: {parts}"
        + (f"; total {_human(memory['total'])}" if "total" in memory else "")
    )
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"
