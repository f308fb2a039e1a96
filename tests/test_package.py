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
