"""Preprocessing: geometry (orientation, resampling, crops, each with its inverse) and
intensity normalisation, put together as a bundle's :class:`Preprocessor`."""

from medseg.preprocessing.intensity import (
    CTNormalization,
    PercentileNormalization,
    WindowNormalization,
    ZScoreNormalization,
    normalize,
)
from medseg.preprocessing.preprocessor import Preprocessor

__all__ = [
    "CTNormalization",
    "PercentileNormalization",
    "Preprocessor",
    "WindowNormalization",
    "ZScoreNormalization",
    "normalize",
]
