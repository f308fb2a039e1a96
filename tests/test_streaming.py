"""Annotation of files block by block (bounded memory), chunks gathered back, and the file
helpers behind them: the results must equal an in-memory annotation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scsnn
from scsnn.errors import InputError
from scsnn.io import H5adRows, chunk_bounds, subset_h5ad, write_annotations, write_h5ad_blocks


def _same_annotation(a: ad.AnnData, b: ad.AnnData, key: str = "scsnn") -> None:
    assert a.obs_names.equals(b.obs_names)
    assert a.obs[key].astype(str).equals(b.obs[key].astype(str))
    assert list(a.obs[key].cat.categories) == list(b.obs[key].cat.categories)
    np.testing.assert_array_equal(a.obs[f"{key}_confidence"], b.obs[f"{key}_confidence"])
    pa, pb = scsnn.tl.probabilities(a, key), scsnn.tl.probabilities(b, key)
    np.testing.assert_array_equal(pa.to_numpy(), pb.to_numpy())
    assert list(pa.columns) == list(pb.columns)
    np.testing.assert_array_equal(a.obsm[f"{key}_step_labels"], b.obsm[f"{key}_step_labels"])


@pytest.fixture
def query_file(pbmc, tmp_path):
    p = tmp_path / "query.h5ad"
    pbmc.write_h5ad(p)
    return p


@pytest.mark.parametrize("chunk_size", [64, 100, 10_000])
def test_annotate_file_equals_in_memory(query_file, pbmc_model, pbmc_annotated, tmp_path,
                                        chunk_size):
    out = tmp_path / "out.h5ad"
    summary = scsnn.tl.annotate_file(query_file, pbmc_model, output=out, batch_size=64,
                                     chunk_size=chunk_size, device="cpu")
    assert summary["n_cells"] == 700
    b = ad.read_h5ad(out)
    mem = scsnn.tl.annotate(ad.read_h5ad(query_file), pbmc_model, batch_size=64,
                            device="cpu", copy=True)
    _same_annotation(mem, b)
    _same_annotation(pbmc_annotated, b)  # batch size 1024 there: per-cell results
    # everything else of the file is kept
    src = ad.read_h5ad(query_file)
    assert (b.X != src.X).nnz == 0
    assert set(src.obs.columns) < set(b.obs.columns)
    e_mem, e_file = mem.uns["scsnn"]["energy"], b.uns["scsnn"]["energy"]
    assert e_file["n_cells"] == 700
    assert e_file["ratio_ann_over_snn"] == pytest.approx(e_mem["ratio_ann_over_snn"], rel=1e-9)


def test_annotate_file_in_place_is_atomic_and_keeps_mode(query_file, pbmc_model):
    query_file.chmod(0o640)
    scsnn.tl.annotate_file(query_file, pbmc_model, device="cpu")
    assert (query_file.stat().st_mode & 0o777) == 0o640
    assert "scsnn" in ad.read_h5ad(query_file).obs
    assert not list(query_file.parent.glob(".*.tmp.h5ad"))


def test_annotate_file_failure_leaves_input_untouched(query_file, pbmc_model, tmp_path):
    before = query_file.read_bytes()
    with pytest.raises(InputError, match="gene symbols"):
        scsnn.tl.annotate_file(query_file, pbmc_model, gene_symbols="no_such_column",
                               device="cpu")
    assert query_file.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp.h5ad"))


def test_annotate_file_reads_layers_and_raw(pbmc_model, tmp_path, pbmc):
    a = pbmc.copy()
    a.layers["expr"] = a.X.copy()
    a.raw = a.copy()
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)  # X would be refused: all zeros
    p = tmp_path / "q.h5ad"
    a.write_h5ad(p)
    ref = scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", copy=True)
    for kw in ({"layer": "expr"}, {"use_raw": True}):
        out = tmp_path / f"{next(iter(kw))}.h5ad"
        scsnn.tl.annotate_file(p, pbmc_model, output=out, device="cpu", **kw)
        _same_annotation(ref, ad.read_h5ad(out))
    with pytest.raises(InputError, match="layer 'nope' not found"):
        scsnn.tl.annotate_file(p, pbmc_model, layer="nope", device="cpu")


def test_annotate_file_refuses_negative_values_in_a_later_block(pbmc, pbmc_model, tmp_path):
    a = pbmc.copy()
    X = a.X.toarray()
    X[650, :3] = -1.0
    a.X = sp.csr_matrix(X)
    p = tmp_path / "neg.h5ad"
    a.write_h5ad(p)
    with pytest.raises(InputError, match="negative"):
        scsnn.tl.annotate_file(p, pbmc_model, output=tmp_path / "o.h5ad", batch_size=64,
                               chunk_size=64, device="cpu")
    assert not (tmp_path / "o.h5ad").exists()
    # the output's copy, begun in the background before the bad block was read, is removed
    assert sorted(f.name for f in tmp_path.iterdir()) == ["neg.h5ad"]


def test_chunks_gathered_equal_whole_run(query_file, pbmc_model, pbmc_annotated, tmp_path):
    parts = []
    for i in range(4):
        p = tmp_path / f"part{i}.h5ad"
        scsnn.tl.annotate_file(query_file, pbmc_model, output=p, batch_size=64, chunk=(i, 4),
                               device="cpu")
        parts.append(p)
    part0 = ad.read_h5ad(parts[0])
    assert part0.n_vars == 0 and part0.n_obs == 192  # 175 rounded up to 3 batches of 64
    out = tmp_path / "gathered.h5ad"
    summary = scsnn.tl.gather(query_file, parts[::-1], out)  # any order
    assert summary["n_chunks"] == 4
    g = ad.read_h5ad(out)
    _same_annotation(pbmc_annotated, g)
    assert g.n_vars == 765
    assert "chunk" not in g.uns["scsnn"]
    assert g.uns["scsnn"]["energy"]["n_cells"] == 700
    assert g.uns["scsnn"]["energy"]["ratio_ann_over_snn"] == pytest.approx(
        pbmc_annotated.uns["scsnn"]["energy"]["ratio_ann_over_snn"], rel=1e-6)


def test_more_chunks_than_batches_gives_empty_chunks(query_file, pbmc_model, tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"p{i}.h5ad"
        scsnn.tl.annotate_file(query_file, pbmc_model, output=p, batch_size=512,
                               chunk=(i, 3), device="cpu")
        parts.append(p)
    assert [ad.read_h5ad(p).n_obs for p in parts] == [512, 188, 0]
    out = tmp_path / "g.h5ad"
    scsnn.tl.gather(query_file, parts, out)
    assert ad.read_h5ad(out).obs["scsnn"].notna().all()


def test_gather_refuses_missing_or_foreign_chunks(query_file, pbmc_model, pbmc, tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"p{i}.h5ad"
        scsnn.tl.annotate_file(query_file, pbmc_model, output=p, batch_size=64, chunk=(i, 3),
                               device="cpu")
        parts.append(p)
    out = tmp_path / "g.h5ad"
    with pytest.raises(InputError, match="missing"):
        scsnn.tl.gather(query_file, parts[:2], out)
    with pytest.raises(InputError, match="missing or given twice"):
        scsnn.tl.gather(query_file, [parts[0], parts[0], parts[1], parts[2]], out)
    other = tmp_path / "other.h5ad"
    pbmc[:500].copy().write_h5ad(other)
    with pytest.raises(InputError, match="query of 700 cells"):
        scsnn.tl.gather(other, parts, out)
    with pytest.raises(InputError, match="not a chunk"):
        scsnn.tl.gather(query_file, [query_file], out)
    assert not out.exists()


def test_chunk_bounds():
    assert chunk_bounds(700, 4, 0, align=64) == (0, 192)
    assert chunk_bounds(700, 4, 3, align=64) == (576, 700)
    assert chunk_bounds(10, 3, 2) == (8, 10)
    covered = [chunk_bounds(1000, 7, i, align=32) for i in range(7)]
    assert covered[0][0] == 0 and covered[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    with pytest.raises(InputError, match="does not exist"):
        chunk_bounds(10, 3, 3)


def test_h5ad_rows_blocks(tmp_path, synth):
    p = tmp_path / "s.h5ad"
    synth.write_h5ad(p)
    with H5adRows(p) as rows:
        assert (rows.n_obs, rows.n_vars) == synth.shape
        assert rows.detect_kind() == "counts"
        blk = rows.block(10, 20)
        assert (blk != synth.X[10:20]).nnz == 0
        assert list(rows.genes) == list(synth.var_names)
    dense = synth.copy()
    dense.X = synth.X.toarray()
    dense.write_h5ad(tmp_path / "d.h5ad")
    with H5adRows(tmp_path / "d.h5ad") as rows:
        assert (rows.block(0, 5) != synth.X[:5]).nnz == 0
    with pytest.raises(InputError, match="file not found"):
        H5adRows(tmp_path / "missing.h5ad")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="cannot read"):
        H5adRows(tmp_path / "bad.h5ad")


def test_write_h5ad_blocks_round_trip(tmp_path, synth):
    p = tmp_path / "b.h5ad"
    blocks = (synth.X[i : i + 70] for i in range(0, synth.n_obs, 70))
    write_h5ad_blocks(p, blocks, obs=synth.obs, var=synth.var, uns={"x": 1})
    b = ad.read_h5ad(p)
    assert (b.X != synth.X).nnz == 0
    assert b.obs.equals(synth.obs) and b.uns["x"] == 1
    with pytest.raises(ValueError, match="rows"):
        write_h5ad_blocks(tmp_path / "c.h5ad", iter([synth.X[:5]]), obs=synth.obs,
                          var=synth.var)
    assert not (tmp_path / "c.h5ad").exists()


def test_synthetic_to_file_equals_in_memory(tmp_path):
    p = tmp_path / "syn.h5ad"
    kw = dict(n_genes=100, n_types=4, rare_fraction=0.02, n_markers=5, seed=2, chunk=70)
    scsnn.datasets.synthetic(300, path=p, **kw)
    a, b = ad.read_h5ad(p), scsnn.datasets.synthetic(300, **kw)
    assert (a.X != b.X).nnz == 0
    assert a.obs["cell_type"].equals(b.obs["cell_type"])


def test_write_annotations_leaves_source_and_replaces_columns(tmp_path, synth):
    src = tmp_path / "src.h5ad"
    synth.write_h5ad(src)
    before = src.read_bytes()
    dst = tmp_path / "dst.h5ad"
    lab = pd.Categorical(["a"] * synth.n_obs)
    write_annotations(src, dst, obs={"pred": lab}, obsm={"m": np.ones((synth.n_obs, 2))},
                      uns={"info": {"k": 1}})
    assert src.read_bytes() == before
    d = ad.read_h5ad(dst)
    assert (d.obs["pred"] == "a").all() and d.obsm["m"].shape == (synth.n_obs, 2)
    write_annotations(dst, dst, obs={"pred": np.zeros(synth.n_obs)}, obsm={}, uns={},
                      drop_obs=("cell_type",))
    d = ad.read_h5ad(dst)
    assert "cell_type" not in d.obs and (d.obs["pred"] == 0).all()
    assert d.uns["info"]["k"] == 1


def test_subset_h5ad(tmp_path, synth):
    src = tmp_path / "s.h5ad"
    synth.write_h5ad(src)
    out = tmp_path / "sub.h5ad"
    n = subset_h5ad(src, out, {"cell_type": ["type_0", "type_3"]})
    sub = ad.read_h5ad(out)
    assert n == sub.n_obs == int(synth.obs["cell_type"].isin(["type_0", "type_3"]).sum())
    assert (sub.X != synth[sub.obs_names].X).nnz == 0
    with pytest.raises(InputError, match="no value type_9"):
        subset_h5ad(src, out, {"cell_type": ["type_9"]})
    with pytest.raises(InputError, match="obs column 'donor' not found"):
        subset_h5ad(src, out, {"donor": ["a"]})


def test_balanced_quota():
    from scsnn.io import balanced_quota

    assert list(balanced_quota(np.array([5, 100, 1000]), 2000)) == [5, 100, 1000]
    q = balanced_quota(np.array([5, 100, 1000]), 305)
    assert list(q) == [5, 100, 200] and q.sum() <= 305
    q = balanced_quota(np.array([50, 60, 70]), 90)
    assert q.sum() <= 90 and q.max() - q.min() == 0


def test_read_h5ad_sample_keeps_rare_classes_whole(tmp_path, synth):
    from scsnn.io import read_h5ad_sample

    p = tmp_path / "s.h5ad"
    synth.write_h5ad(p)
    counts = synth.obs["cell_type"].value_counts()
    sub = read_h5ad_sample(p, "cell_type", 100, seed=0)
    assert sub.n_obs <= 100
    got = sub.obs["cell_type"].value_counts()
    rare = counts.idxmin()
    assert got[rare] == counts[rare]  # 9 rare cells, all kept
    assert got.drop(rare).max() - got.drop(rare).min() <= 1
    assert (sub.X != synth[sub.obs_names].X).nnz == 0
    assert list(sub.obs_names) == [n for n in synth.obs_names if n in set(sub.obs_names)]
    again = read_h5ad_sample(p, "cell_type", 100, seed=0)
    assert again.obs_names.equals(sub.obs_names)
    with pytest.raises(InputError, match="label key"):
        read_h5ad_sample(p, "nope", 100)


def test_training_streamed_from_disk_equals_in_memory(tmp_path, synth):
    """With the whole file as the gene-space sample, reading every mini-batch from disk
    trains exactly the model that in-memory training gives."""
    from conftest import small

    from scsnn.io import read_h5ad_sample

    p = tmp_path / "ref.h5ad"
    synth.write_h5ad(p)
    sample = read_h5ad_sample(p, "cell_type", 10_000)
    assert sample.n_obs == synth.n_obs
    mem = scsnn.tl.train(sample, "cell_type", **small(seed=0))
    disk = scsnn.tl.train(sample, "cell_type", **small(seed=0, stream_from=p))
    assert disk.model_id == mem.model_id
    assert disk.settings["streamed_from"] == str(p)


def test_training_streamed_uses_every_labelled_cell(tmp_path, synth):
    from conftest import small

    from scsnn.io import read_h5ad_sample

    a = synth.copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[:5, a.obs.columns.get_loc("cell_type")] = None  # unlabelled: left out
    p = tmp_path / "ref.h5ad"
    a.write_h5ad(p)
    sample = read_h5ad_sample(p, "cell_type", 60)
    m = scsnn.tl.train(sample, "cell_type", **small(seed=0, stream_from=p))
    assert sum(m.metrics["class_counts"].values()) == synth.n_obs - 5 > sample.n_obs
    b = scsnn.tl.annotate(synth, m, device="cpu", copy=True)
    assert (b.obs["scsnn"].astype(str) == synth.obs["cell_type"].astype(str)).mean() > 0.6


def test_streamed_training_refuses_a_file_without_the_sample_classes(tmp_path, synth):
    from conftest import small

    other = synth[synth.obs["cell_type"] != "type_0"].copy()
    p = tmp_path / "other.h5ad"
    other.write_h5ad(p)
    with pytest.raises(InputError, match="no cell of class"):
        scsnn.tl.train(synth, "cell_type", **small(stream_from=p))


def test_projected_rows_reads_any_order_with_repeats(tmp_path, synth, pbmc_model):
    from scsnn.io import get_expression
    from scsnn.pp import ProjectedRows

    p = tmp_path / "s.h5ad"
    synth.write_h5ad(p)
    gs, _ = scsnn.pp.fit_gene_space(get_expression(synth),
                                    synth.obs["cell_type"].cat.codes.to_numpy(),
                                    list(synth.obs["cell_type"].cat.categories), n_hvg=50)
    full, _ = gs.project(get_expression(synth))
    with H5adRows(p) as src:
        rows = ProjectedRows(src, gs, "counts")
        assert rows.shape == (synth.n_obs, gs.n_genes)
        view = rows[np.arange(100, 200)]
        idx = np.array([5, 3, 5, 99, 0])
        got = view.take_rows(idx)
        assert (got != full[100 + idx]).nnz == 0
        assert view.digest() != rows.digest()


# -- majority voting and CellTypist columns on files ---------------------------------------
VOTE_COLUMNS = ("scsnn_majority_voting", "scsnn_majority_voting_fraction",
                "scsnn_majority_voting_probability", "predicted_labels", "conf_score",
                "majority_voting", "over_clustering")


def _same_votes(a: ad.AnnData, b: ad.AnnData) -> None:
    for c in VOTE_COLUMNS:
        assert c in b.obs, c
        if isinstance(a.obs[c].dtype, pd.CategoricalDtype):
            assert list(a.obs[c].astype(str)) == list(b.obs[c].astype(str)), c
            assert list(a.obs[c].cat.categories) == list(b.obs[c].cat.categories), c
        else:
            np.testing.assert_array_equal(a.obs[c].to_numpy(), b.obs[c].to_numpy())


def test_annotate_file_majority_voting_over_an_obs_key(query_file, pbmc_model, tmp_path):
    if "louvain" not in ad.read_h5ad(query_file).obs:
        pytest.skip("needs obs['louvain']")
    out = tmp_path / "voted.h5ad"
    summary = scsnn.tl.annotate_file(query_file, pbmc_model, output=out, batch_size=64,
                                     chunk_size=128, device="cpu", over_clustering="louvain",
                                     celltypist_columns=True)
    assert sum(summary["majority_voting"].values()) == 700
    b = ad.read_h5ad(out)
    mem = scsnn.tl.annotate(ad.read_h5ad(query_file), pbmc_model, batch_size=64, device="cpu",
                            copy=True, over_clustering="louvain", celltypist_columns=True)
    _same_annotation(mem, b)
    _same_votes(mem, b)
    assert b.uns["scsnn"]["params"]["over_clustering"] == "louvain"
    # annotated again without voting: the earlier run's voting columns go
    scsnn.tl.annotate_file(out, pbmc_model, device="cpu")
    c = ad.read_h5ad(out)
    assert "scsnn_majority_voting" not in c.obs and "scsnn" in c.obs


def test_annotate_file_refuses_voting_it_cannot_do(query_file, pbmc_model, tmp_path):
    before = query_file.read_bytes()
    with pytest.raises(InputError, match="needs over_clustering, an obs column") as e:
        scsnn.tl.annotate_file(query_file, pbmc_model, majority_voting=True, device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="is not an obs column"):
        scsnn.tl.annotate_file(query_file, pbmc_model, over_clustering="nope", device="cpu")
    with pytest.raises(InputError, match="not a chunk"):
        scsnn.tl.annotate_file(query_file, pbmc_model, output=tmp_path / "p.h5ad",
                               chunk=(0, 2), over_clustering="louvain", device="cpu")
    assert query_file.read_bytes() == before
    assert not (tmp_path / "p.h5ad").exists()
    assert not [p for p in query_file.parent.iterdir() if p.name.startswith(".")]


def test_gather_votes_and_keeps_every_category(query_file, pbmc_model, tmp_path):
    src = ad.read_h5ad(query_file)
    if "louvain" not in src.obs:
        pytest.skip("needs obs['louvain']")
    parts = []
    for i in range(4):
        p = tmp_path / f"part{i}.h5ad"
        scsnn.tl.annotate_file(query_file, pbmc_model, output=p, batch_size=64, chunk=(i, 4),
                               device="cpu", min_confidence=0.5)
        parts.append(p)
    cats = [set(ad.read_h5ad(p).obs["scsnn"].cat.categories) for p in parts]
    out = tmp_path / "gathered.h5ad"
    summary = scsnn.tl.gather(query_file, parts, out, over_clustering="louvain",
                              celltypist_columns=True)
    assert "majority_voting" in summary
    whole = tmp_path / "whole.h5ad"
    scsnn.tl.annotate_file(query_file, pbmc_model, output=whole, batch_size=64, device="cpu",
                           min_confidence=0.5, over_clustering="louvain",
                           celltypist_columns=True)
    g, w = ad.read_h5ad(out), ad.read_h5ad(whole)
    _same_annotation(w, g)  # categories too, although each chunk held fewer
    _same_votes(w, g)
    assert set(g.obs["scsnn"].cat.categories) == set().union(*cats)
    with pytest.raises(InputError, match="needs over_clustering"):
        scsnn.tl.gather(query_file, parts, tmp_path / "x.h5ad", majority_voting=True)
    assert not (tmp_path / "x.h5ad").exists()


def test_annotate_file_progress_bar_counts_every_cell(tmp_path, pbmc_model, _pbmc_session,
                                                     capsys):
    src = tmp_path / "q.h5ad"
    _pbmc_session.write_h5ad(src)
    scsnn.tl.annotate_file(src, pbmc_model, output=tmp_path / "out.h5ad", chunk_size=256,
                           batch_size=128, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "annotating" in err and f"/{_pbmc_session.n_obs}" in err and "cells/s" in err
    scsnn.tl.annotate_file(src, pbmc_model, output=tmp_path / "out2.h5ad", chunk_size=256,
                           batch_size=128, device="cpu", progress=False)
    assert "annotating" not in capsys.readouterr().err
