"""``medseg train`` with instance norm and leaky ReLU as two layers.

``build_unet`` makes instance norm + leaky ReLU one ``InstanceNormLeakyReLU`` layer
(the same function, less memory kept for training). This runs ``medseg train`` with
the arguments given, building ``InstanceNormalization`` followed by ``LeakyReLU``
instead, so a fold can be trained both ways and compared:

    python experiments/train_unfused.py train \\
        --config experiments/hippocampus_3d_shipped.yaml \\
        --output runs/unfused_cv/fold_3 --fold 3
    python experiments/cross_validate.py \\
        --config experiments/hippocampus_3d_shipped.yaml --runs runs/unfused_cv \\
        --score-only --output runs/unfused_cv.json
"""

from __future__ import annotations

import sys

import medseg.layers as medseg_layers


def separate(negative_slope: float, epsilon: float, name: str):
    """What ``conv_unit`` calls in place of ``InstanceNormLeakyReLU(...)``."""
    norm = medseg_layers.InstanceNormalization(epsilon=epsilon, name=name)
    act = medseg_layers.LeakyReLU(negative_slope, name=name.replace("_norm", "_act"))
    return lambda x: act(norm(x))


if __name__ == "__main__":
    medseg_layers.InstanceNormLeakyReLU = separate
    from medseg_cli.main import main

    main(sys.argv[1:])
