"""Property-based and fuzz tests (hypothesis) over the readers, input-type detection, gene
matching, preprocessing and the command line.

Random shapes, sparsity, dtypes (int8 to int64, uint, float16/32/64), kinds of values
(counts, scaled, log-scale, z-scores, NaN, infinity, zeros, huge), empty cells and genes,
name collisions, unicode and '/' in labels and gene names. Every outcome must be a valid
result or a one-line refusal (InputError; on the command line exit 1 and one ``error:``
line), never a traceback, and never the catch-all message for an unexpected exception.

The runs are derandomised (the same examples every time, no example database written) and
small: ``EXAMPLES`` says how many each test runs (listed in docs/inputs.md).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import assert_one_line
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from typer.testing import CliRunner

import scsnn
from scsnn import io
from scsnn.cli import app
from scsnn.errors import InputError
from scsnn.pp import log_normalize

#: Examples per test (all of them together run in about 30 s on two shared cores).
EXAMPLES = {
    "detection": 300,
    "match_genes": 300,
    "duplicates": 200,
    "readers": 60,
    "cli_annotate": 100,
    "cli_train": 20,
}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# hypothesis keeps caches in .hypothesis/ of the working directory: keep the checkout clean
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "scsnn-hypothesis")

runner = CliRunner()
#: the inputs hold duplicated names on purpose: anndata warns about them
pytestmark = pytest.mark.filterwarnings("ignore:.*names are not unique:UserWarning")

#: Characters of names: ASCII, unicode, '/', spaces, dots (version suffixes), quotes.
NAME_CHARS = "abcXYZ019-_./ +éüß基因αµ☃'\""
names = st.text(alphabet=NAME_CHARS, min_size=0, max_size=8)

VALUE_KINDS = ("counts", "counts_float", "scaled", "cpm", "log", "negative", "nan", "inf",
               "huge", "zeros", "binary", "uniform")
DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "float16", "float32",
          "float64")


def make_matrix(seed: int, n: int, g: int, kind: str, density: float, dtype: str):
    """A random matrix of the given kind of values (counts, CPM, log1p, ...)."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.uniform(0.5, 30.0), size=(n, g)).astype(np.float64)
    X *= rng.random((n, g)) < density
    if kind == "counts_float":
        X = X.astype(np.float64)
    elif kind == "scaled":
        X = X / rng.lognormal(7, 0.5, g)[None, :] * 1e6
    elif kind == "cpm":
        s = X.sum(1, keepdims=True)
        X = np.divide(X, s, out=np.zeros_like(X), where=s > 0) * 1e6
    elif kind == "log":
        X = np.log1p(X * rng.uniform(0.1, 50.0))
    elif kind == "negative":
        X = np.log1p(X)
        X -= X.mean(0) if n > 1 else 1.0
    elif kind == "nan":
        X.flat[rng.integers(X.size)] = np.nan
    elif kind == "inf":
        X.flat[rng.integers(X.size)] = np.inf
    elif kind == "huge":
        X = X * 1e30
    elif kind == "zeros":
        X[:] = 0
    elif kind == "binary":
        X = (X > 0).astype(np.float64)
    elif kind == "uniform":
        X = rng.random((n, g)) * rng.choice([1e-3, 1.0, 25.0, 1e4])
    if dtype.startswith(("int", "uint")):
        if kind not in ("counts", "zeros", "binary"):
            return None  # only counts come as integers
        info = np.iinfo(dtype)
        X = np.clip(X, info.min, info.max)
    with np.errstate(over="ignore", invalid="ignore"):
        return X.astype(dtype)


#: Usable kinds come up more often than broken ones.
KIND_WEIGHTS = ("counts",) * 4 + ("counts_float", "scaled", "cpm") * 2 + ("log",) * 3 + (
    "negative", "nan", "inf", "huge", "zeros", "binary", "uniform")
DENSITIES = (0.05, 0.3, 0.6, 0.9, 1.0, 1.0)


@st.composite
def matrices(draw, n: int | None = None, g: int | None = None, max_cells: int = 25):
    """A random matrix: shape (``n`` x ``g`` when given), kind of values, sparsity and a dtype
    that can hold them."""
    kind = draw(st.sampled_from(KIND_WEIGHTS))
    dtypes = DTYPES if kind in ("counts", "zeros", "binary") else DTYPES[6:]
    n = n if n is not None else draw(st.integers(1, max_cells))
    g = g if g is not None else draw(st.integers(1, 25))
    return make_matrix(draw(st.integers(0, 2**31 - 1)), n, g, kind,
                       draw(st.sampled_from(DENSITIES)), draw(st.sampled_from(dtypes)))


def _refusal(exc: InputError) -> str:
    msg = str(exc)
    assert_one_line(msg)
    return msg


# -- input-type detection and normalisation ----------------------------------------------------


@fuzz("detection")
@given(X=matrices(), as_sparse=st.booleans())
def test_detection_and_normalisation_never_crash(X, as_sparse):
    a = ad.AnnData(X=sp.csr_matrix(X) if as_sparse and X.dtype != np.float16 else X)
    try:
        ex = io.get_expression(a)
    except InputError as exc:
        msg = _refusal(exc)
        event(f"refused: {msg[:40]}")
        data = np.asarray(X, dtype=np.float64)
        assert (not np.all(np.isfinite(data.astype(np.float32))) or data.min() < 0
                or not np.any(data)), msg
        return
    assert ex.kind in io.KINDS and ex.found and ex.describe()
    event(f"kind {ex.kind}")
    data = ex.X.data
    assert np.all(np.isfinite(data)) and data.min() >= 0 and ex.X.dtype == np.float32
    if np.all(data == np.round(data)) and data.max() > 1:
        assert ex.kind == "counts"
    if data.max() > io.LOG_MAX and ex.kind != "counts":
        assert ex.kind == "scaled"
    Y = log_normalize(ex)
    assert Y.shape == ex.X.shape and np.all(np.isfinite(Y.data)) and (Y.data >= 0).all()


# -- gene matching -----------------------------------------------------------------------------


@fuzz("match_genes")
@given(query=st.lists(names, max_size=30), model=st.lists(names, min_size=1, max_size=30,
                                                          unique=True))
def test_match_genes_finds_the_first_column_of_each_gene(query, model):
    cols = io.match_genes(np.asarray(query, dtype=object), model)
    assert cols.shape == (len(model),)
    for gene, c in zip(model, cols):
        if gene in query:
            assert c == query.index(gene)
        else:
            assert c == -1


@fuzz("duplicates")
@given(genes=st.lists(st.sampled_from(["A", "B", "a", "A.1", "基因/1", "", "nan", " "]),
                      min_size=1, max_size=12),
       seed=st.integers(0, 2**31 - 1), log=st.booleans())
def test_duplicated_and_unnamed_genes_collapse_exactly(genes, seed, log):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(5, len(genes))).astype(np.float32)
    plan = io.plan_genes(np.asarray(genes, dtype=object))
    named = [g for g in genes if g.strip() not in ("", "nan")]
    assert list(plan.genes) == list(dict.fromkeys(named))  # unique, in order of appearance
    if not named:
        return
    kind = "lognorm" if log else "counts"
    Xk = np.log1p(X) if log else X
    Y = plan.apply(sp.csr_matrix(Xk), kind).toarray()
    for j, gene in enumerate(plan.genes):
        idx = [i for i, g in enumerate(genes) if g == gene]
        want = np.log1p(X[:, idx].sum(1)) if log else X[:, idx].sum(1)
        np.testing.assert_allclose(Y[:, j], want, rtol=1e-5, atol=1e-6)
    msg = plan.message(kind)
    assert "\n" not in msg
    assert bool(msg) == (len(named) != len(genes) or len(set(named)) != len(named))


# -- readers -----------------------------------------------------------------------------------


def _obs_names(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = ["c/1", "zelle·ü", "基因", "a b", "x", "'", "é/é"]
    return [f"{pool[rng.integers(len(pool))]}{i if rng.random() < 0.8 else ''}"
            for i in range(n)]


@fuzz("readers")
@given(X=matrices(), genes_seed=st.integers(0, 2**31 - 1), dense=st.booleans(),
       start=st.integers(0, 30), width=st.integers(0, 30))
def test_readers_agree_with_memory(tmp_path_factory, X, genes_seed, dense, start, width):
    n, g = X.shape
    rng = np.random.default_rng(genes_seed)
    genes = [f"{rng.choice(['G', 'g/', 'ß', 'ENSG0.'])}{rng.integers(0, g + 2)}"
             for _ in range(g)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.AnnData(X=X if dense else sp.csr_matrix(X.astype(np.float32)),
                       obs=pd.DataFrame(index=_obs_names(n, genes_seed)),
                       var=pd.DataFrame(index=genes))
        p = tmp_path_factory.mktemp("rd") / "f.h5ad"
        a.write_h5ad(p)
    b = io.read_h5ad(p)
    assert b.shape == (n, g) and list(b.obs_names) == list(a.obs_names)
    try:
        mem = io.get_expression(b)
    except InputError as exc:
        _refusal(exc)
        with pytest.raises(InputError), io.H5adRows(p) as rows:
            rows.detect_kind()
        return
    lo, hi = min(start, n), min(n, start + width)
    with io.H5adRows(p) as rows:
        assert rows.n_obs == n and list(rows.obs_names) == list(a.obs_names)
        kind = rows.detect_kind()
        assert kind == mem.kind
        e = rows.expression(lo, hi, kind)
        assert list(e.genes) == list(mem.genes)
        np.testing.assert_array_equal(e.X.toarray(), mem.X[lo:hi].toarray())
        sel = np.unique(rng.integers(0, n, size=min(n, 5)))
        np.testing.assert_array_equal(rows.expression_rows(sel, kind).X.toarray(),
                                      mem.X[sel].toarray())


# -- the command line --------------------------------------------------------------------------

LABELS = ["T/NK", "B cell", "Mono ☃", "naïve/µ"]


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    """A small model on 60 genes and four classes with unicode and '/' in their names."""
    a = scsnn.datasets.synthetic(n_cells=160, n_genes=60, n_types=4, rare_fraction=0.1,
                                 n_markers=8, seed=5)
    a.obs["label"] = a.obs["cell_type"].cat.rename_categories(LABELS)
    a.var_names = [f"g{i}" for i in range(60)]
    d = tmp_path_factory.mktemp("fuzzmodel") / "model"
    scsnn.tl.train(a, "label", device="cpu", progress=False,
                   **scsnn.tl.configs(epochs=1, hidden=(8,), n_hvg=30)).save(d)
    return d, a


def _assert_clean(r, *, allow_usage: bool = False) -> None:
    """Exit 0, or exit 1 with one error line (2 for usage errors when allowed)."""
    assert "Traceback" not in r.output
    codes = (0, 1, 2) if allow_usage else (0, 1)
    assert r.exit_code in codes, (r.exit_code, r.output, r.exception)
    if r.exit_code == 1:  # warnings may come first; the refusal is one last line
        lines = r.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
        assert "run with --debug" not in errors[0], f"an unexpected exception: {errors[0]}"
        assert r.stdout == ""


@fuzz("cli_annotate")
@given(
    data=st.data(),
    n_model_genes=st.one_of(st.integers(30, 60), st.integers(0, 60)),
    extra=st.lists(names, max_size=6),
    dup=st.booleans(),
    layer=st.sampled_from([None, "counts", "missing"]),
    key=st.sampled_from(["scsnn", "pred", "a/b", "ü", "x y"]),
    min_confidence=st.sampled_from(["0", "0.5", "0.99"]),
    chunk_size=st.sampled_from(["1", "7", "65536"]),
    in_place=st.booleans(),
)
def test_cli_annotate_answers_or_refuses(fuzz_model, tmp_path_factory, data, n_model_genes,
                                         extra, dup, layer, key, min_confidence, chunk_size,
                                         in_place):
    model_dir, _ = fuzz_model
    rng = np.random.default_rng(n_model_genes * 31 + len(extra))
    genes = [f"g{i}" for i in rng.permutation(60)[:n_model_genes]] + list(extra)
    genes = genes or ["x"]
    if dup and len(genes) > 1:
        genes[-1] = genes[0]
    X = data.draw(matrices(g=len(genes)))
    n = X.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)) if X.dtype != np.float16 else X,
                       obs=pd.DataFrame(index=_obs_names(n, len(genes))),
                       var=pd.DataFrame(index=genes))
        if layer == "counts":
            q.layers["counts"] = q.X.copy()
        d = tmp_path_factory.mktemp("q")
        p = d / "q.h5ad"
        try:
            q.write_h5ad(p)
        except Exception:  # noqa: BLE001 - names anndata itself cannot write
            assume(False)
    before = p.read_bytes()
    out = p if in_place else d / "out.h5ad"
    args = ["annotate", str(p), "-m", str(model_dir), "--device", "cpu", "--key-added", key,
            "--min-confidence", min_confidence, "--chunk-size", chunk_size,
            "--min-gene-overlap", "0.2"]
    if not in_place:
        args += ["-o", str(out)]
    if layer is not None:
        args += ["--layer", layer]
    r = runner.invoke(app, args)
    _assert_clean(r)
    event(f"exit {r.exit_code}" + (f": {r.stderr.strip().splitlines()[-1][7:40]}"
                                   if r.exit_code else ""))
    if r.exit_code == 0:
        a = ad.read_h5ad(out)
        pred = a.obs[key].astype(str)
        assert len(pred) == n and set(pred) <= set(LABELS) | {"Unassigned"}
        P = np.asarray(a.obsm[f"{key}_probabilities"])
        np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
        if not in_place:
            assert p.read_bytes() == before
    else:
        assert p.read_bytes() == before  # refused: the input is left as it was
    assert not [x for x in d.iterdir() if x.name.startswith(".")]  # no temporary file left
    shutil.rmtree(d)


@fuzz("cli_train")
@given(
    X=matrices(max_cells=40),
    labels=st.lists(st.sampled_from(LABELS + ["", "x/y/z", "nan"]), min_size=2, max_size=4),
    missing=st.floats(0.0, 0.5),
)
def test_cli_train_answers_or_refuses(tmp_path_factory, X, labels, missing):
    n, g = X.shape
    rng = np.random.default_rng(n + 7 * g)
    lab = np.asarray([labels[i % len(labels)] for i in range(n)], dtype=object)
    lab[rng.random(n) < missing] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)) if X.dtype != np.float16 else X,
                       obs=pd.DataFrame({"label": pd.Categorical(lab)},
                                        index=_obs_names(n, g)),
                       var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
        d = tmp_path_factory.mktemp("t")
        p = d / "ref.h5ad"
        a.write_h5ad(p)
    out = d / "model"
    r = runner.invoke(app, ["train", str(p), "-l", "label", "-o", str(out), "--epochs", "1",
                            "--hidden", "4", "--n-hvg", "10", "--n-markers", "2",
                            "--device", "cpu"])
    _assert_clean(r)
    event(f"exit {r.exit_code}" + (f": {r.stderr.strip().splitlines()[-1][7:40]}"
                                   if r.exit_code else ""))
    if r.exit_code == 0:
        m = scsnn.load_model(out)
        assert set(m.classes) <= {str(x) for x in lab if x is not None}
        assert m.compute_id() == m.model_id
    else:
        assert not out.exists() or not any(out.iterdir())
    shutil.rmtree(d)


def test_examples_are_documented():
    """docs/inputs.md states how many examples each hypothesis test runs."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "inputs.md").read_text()
    for name, n in EXAMPLES.items():
        assert f"| `{name}` | {n} |" in text, name
