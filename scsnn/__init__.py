"""scsnn: cell-type annotation of scRNA-seq data with a heterogeneous spiking neural network.

Scanpy-style API::

    import scsnn
    model = scsnn.tl.train(ref, "cell_type")
    scsnn.tl.annotate(query, model)          # obs["scsnn"], obs["scsnn_confidence"], ...
    report = scsnn.evaluate(query, "cell_type")

The package face loads lazily: ``import scsnn`` (and ``import scsnn.neurons``,
``scsnn.models``, ``scsnn.training``, which are torch-only) imports neither anndata nor
scanpy; ``scsnn.tl``, ``scsnn.pp``, ... load on first use.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__
from .errors import InputError, ModelError, ScsnnError

logging.getLogger("scsnn").addHandler(logging.NullHandler())

#: public name -> (submodule, attribute in it, or None for the submodule itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "datasets": ("datasets", None),
    "io": ("io", None),
    "pl": ("pl", None),
    "pp": ("pp", None),
    "tl": ("tl", None),
    # the module is callable: scsnn.evaluate(adata, truth_key) runs evaluate.evaluate
    "evaluate": ("evaluate", None),
    "read_h5ad": ("io", "read_h5ad"),
    "write_h5ad_atomic": ("io", "write_h5ad_atomic"),
    "ScsnnModel": ("bundle", "ScsnnModel"),
    "load_model": ("bundle", "load_model"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'scsnn' has no attribute '{name}'") from None
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "datasets",
    "evaluate",
    "io",
    "load_model",
    "pl",
    "pp",
    "read_h5ad",
    "tl",
    "write_h5ad_atomic",
    "InputError",
    "ModelError",
    "ScsnnError",
    "ScsnnModel",
]
