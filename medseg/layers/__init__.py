"""Custom Keras layers: instance normalisation, a leaky ReLU, the two fused, and a
convolution of concatenated inputs, all keeping less for training; argmax pooling and
unpooling, zero insertion, N-max pooling, and padding modes. All are registered under
the ``medseg`` package, serialisable, 2D and 3D, channels-last. Nearest-neighbour
unpooling is Keras' ``UpSampling2D/3D``.
"""

from medseg.layers.activation import LeakyReLU
from medseg.layers.concat_conv import ConcatConv2D, ConcatConv3D
from medseg.layers.normalization import InstanceNormalization, InstanceNormLeakyReLU
from medseg.layers.padding import PADDING_MODES, Padding2D, Padding3D
from medseg.layers.pooling import (
    MaxPoolingWithArgmax2D,
    MaxPoolingWithArgmax3D,
    NMaxPooling2D,
    NMaxPooling3D,
)
from medseg.layers.unpooling import (
    BedOfNailsUnpooling2D,
    BedOfNailsUnpooling3D,
    MaxUnpooling2D,
    MaxUnpooling3D,
)

__all__ = [
    "PADDING_MODES",
    "BedOfNailsUnpooling2D",
    "BedOfNailsUnpooling3D",
    "ConcatConv2D",
    "ConcatConv3D",
    "InstanceNormLeakyReLU",
    "InstanceNormalization",
    "LeakyReLU",
    "MaxPoolingWithArgmax2D",
    "MaxPoolingWithArgmax3D",
    "MaxUnpooling2D",
    "MaxUnpooling3D",
    "NMaxPooling2D",
    "NMaxPooling3D",
    "Padding2D",
    "Padding3D",
]
