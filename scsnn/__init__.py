"""scsnn: cell-type annotation of scRNA-seq data with a heterogeneous spiking neural network.

Scanpy-style API::

    import scsnn
    model = scsnn.tl.train(ref, "cell_type")
    scsnn.tl.annotate(query, model)          # obs["scsnn"], obs["scsnn_confidence"], ...
    report = scsnn.evaluate(query, "cell_type")
"""

from __future__ import annotations

import logging

from . import datasets, io, pp, tl
from ._version import __version__
from .errors import InputError, ModelError, ScsnnError
from .evaluate import evaluate
from .io import read_h5ad, write_h5ad_atomic
from .models import ScsnnModel

load_model = ScsnnModel.load

logging.getLogger("scsnn").addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "datasets",
    "evaluate",
    "io",
    "load_model",
    "pp",
    "read_h5ad",
    "tl",
    "write_h5ad_atomic",
    "InputError",
    "ModelError",
    "ScsnnError",
    "ScsnnModel",
]
