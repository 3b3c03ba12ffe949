"""medseg: medical image segmentation with Keras 3.

Importing this package is cheap: no TensorFlow, no file or environment reads. Submodules
(``medseg.io``, ``medseg.geometry``, ...) are imported where they are used.
"""

__version__ = "0.1.0"
