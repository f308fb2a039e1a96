"""The package face: lazy imports, torch-only model code, the public names."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["scsnn", "scsnn.neurons", "scsnn.models", "scsnn.training",
                                    "scsnn.encoding", "scsnn.kernels"])
def test_torch_only_modules_load_neither_anndata_nor_scanpy(module):
    loaded = _modules_after(f"import {module}")
    assert "anndata" not in loaded and "scanpy" not in loaded
    assert "scsnn.pp" not in loaded and "scsnn.io" not in loaded


def test_annotation_loads_neither_scanpy_nor_scikit_learn():
    # seconds of start-up for every `scsnn annotate`: scanpy picks genes (training) and
    # scikit-learn scores (evaluate), annotation needs neither
    loaded = _modules_after("import scsnn.tl, scsnn.bundle, scsnn.io")
    assert "scanpy" not in loaded and "sklearn" not in loaded


def test_package_face_is_lazy_and_complete():
    import scsnn

    loaded = _modules_after("import scsnn")
    assert "torch" not in loaded  # `import scsnn` is cheap
    for name in scsnn.__all__:
        assert getattr(scsnn, name) is not None
    assert set(scsnn.__all__) <= set(dir(scsnn))
    assert callable(scsnn.evaluate) and callable(scsnn.load_model)
    assert scsnn.pl.__name__ == "scsnn.pl"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        scsnn.nope  # noqa: B018


def test_evaluate_is_callable_after_its_module_is_imported():
    """Importing the submodule rebinds scsnn.evaluate to it: it stays callable."""
    loaded = _modules_after(
        "import scsnn\nfrom scsnn.evaluate import classification_report\n"
        "import anndata as ad, numpy as np, pandas as pd\n"
        "a = ad.AnnData(np.zeros((4, 2)), obs=pd.DataFrame({'t': list('aabb'), "
        "'scsnn': list('abbb')}, index=list('wxyz')))\n"
        "assert abs(scsnn.evaluate(a, 't')['accuracy'] - 0.75) < 1e-9")
    assert "scsnn.evaluate" in loaded


HEAVY = ("torch", "scanpy", "anndata", "numba", "spikingjelly", "matplotlib", "sklearn",
         "pandas", "numpy", "scipy", "h5py", "rich")


def test_cli_help_and_version_load_no_heavy_library():
    """`scsnn --help`, `scsnn CMD --help` and `scsnn --version` answer at once: building the
    app and rendering every help page imports none of the scientific stack (nor rich)."""
    code = (
        "import sys\n"
        "import typer\n"
        "import scsnn.cli\n"
        "group = typer.main.get_command(scsnn.cli.app)\n"
        "for argv in [['--help'], ['--version'], *([c, '--help'] for c in group.commands)]:\n"
        "    try:\n"
        "        scsnn.cli.app(argv)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (argv, e.code)\n"
        "print('COMMANDS', ' '.join(group.commands), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code + "print('MODULES', ' '.join(sys.modules),"
                          " file=sys.stderr)\n"], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in out.stderr.splitlines()
                 if line.startswith(("MODULES ", "COMMANDS ")))
    assert {"train", "annotate", "info", "demo"} <= set(lines["COMMANDS"].split())
    loaded = {m.split(".")[0] for m in lines["MODULES"].split()}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # `scsnn CMD --help` does not coerce the group's options (typer does it with pydantic)
    assert "pydantic" not in loaded
    import scsnn

    assert f"scsnn {scsnn.__version__}" in out.stdout.splitlines()  # --version


def test_cli_module_import_is_light():
    loaded = _modules_after("import scsnn.cli")
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)
