__version__ = "0.1.0"

#: the libraries whose versions can change a trained model or a benchmark's result
LIBRARIES = ("scsnn", "torch", "numpy", "scipy", "scikit-learn", "scanpy", "anndata",
             "spikingjelly", "celltypist")


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`LIBRARIES` (None: not installed). Stored with
    trained models and benchmark results, so that each says what produced it."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
