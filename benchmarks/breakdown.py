"""Where annotation and training spend their time, stage by stage, event-driven or dense.

    python benchmarks/breakdown.py --cells 20000 --out docs/benchmark_results/breakdown

Writes a realistic synthetic reference and query (``scsnn dataset synthetic``: 3,000 genes,
20 types, about 19 % non-zero) unless ``--reference``/``--query`` are given, trains a model
with default settings (``--epochs``, few: speed does not depend on accuracy), then times,
over the query's cells and in this process (``--threads`` torch threads):

- annotation: read (the file's rows, ``H5adRows.expression``), normalise + project (``all
  genes``: scanpy's normalize_total + log1p over every gene, then the model's columns, as
  before; ``model genes``: :meth:`GeneSpace.project`), scale (dense ``GeneSpace.scale`` /
  sparse ``scale_sparse``), first layer (dense: encoder + linear + batch norm over
  ``[T, N, G]``; sparse: the event-driven layer), rest of the network, write
  (``write_annotations``);
- training: a batch's rows (``ScaledCells.rows`` / ``sparse_rows``), forward of the first
  layer, forward of the rest, backward and optimiser step, per training batch.

Each path is checked against the network's own forward (the breakdown measures the real
thing). Writes ``breakdown.json`` and ``breakdown.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _clock():
    return time.perf_counter()


def _rest(net, seq, skip, T):
    """The network after its first layer (what ``forward_steps`` runs), with the input's
    drive of the readout (``skip``) added to the hidden path's."""
    s = net.spiking[0](seq)
    for i in range(1, len(net.fcs)):
        s = net.spiking[i](net._layer(i, net.dropout(s)))
    out = net.head(net.dropout(s))
    if skip is not None:
        out = out + skip
    import torch

    steps = torch.arange(1, T + 1, dtype=out.dtype).view(T, 1, 1)
    return out.cumsum(0) / steps


def _first_layer(net, xb, path):
    """The first layer (with its batch norm): encoder + dense linear, or event-driven; and
    with input-to-readout synapses, the input's drive of the readout after each step."""
    from spikingjelly.activation_based import functional

    functional.reset_net(net)
    if path == "dense":
        spikes = net.encode(xb)
        skip = None if net.skip is None else net.skip(spikes).cumsum(0)
        return net._layer(0, spikes), skip
    seq, _, skip = net._sparse_first_layer(xb)
    return seq, skip


def annotate_breakdown(model, query: Path, batch_size: int, chunk: int, paths) -> dict:
    import numpy as np
    import torch
    from spikingjelly.activation_based import functional

    from scsnn.io import H5adRows, match_genes, write_annotations
    from scsnn.pp import log_normalize

    net, gs = model.network.eval(), model.gene_space
    T = net.cfg.timesteps
    out = {}
    for path in paths:
        if path == "sparse":
            from scsnn.bundle import sparse_batch
        t = dict.fromkeys(("read", "normalise_project", "scale", "first_layer", "rest"), 0.0)
        n = 0
        with H5adRows(query) as rows, torch.no_grad():
            kind = rows.detect_kind(max_rows=chunk)
            for a in range(0, rows.n_obs, chunk):
                b = min(rows.n_obs, a + chunk)
                c0 = _clock()
                block = rows.expression(a, b, kind)
                c1 = _clock()
                if path == "dense":  # all genes normalised, then the model's columns
                    cols = match_genes(block.genes, gs.genes)
                    X = log_normalize(block)[:, cols[cols >= 0]].tocsr()
                    present = cols >= 0
                else:
                    X, present = gs.project(block)
                c2 = _clock()
                t["read"] += c1 - c0
                t["normalise_project"] += c2 - c1
                for s in range(0, X.shape[0], batch_size):
                    c0 = _clock()
                    if path == "dense":
                        xb = torch.from_numpy(gs.scale(X[s : s + batch_size], present,
                                                       absent="zero"))
                    else:
                        xb = sparse_batch(gs, X[s : s + batch_size], present, absent="zero")
                    c1 = _clock()
                    seq, skip = _first_layer(net, xb, path)
                    c2 = _clock()
                    y = _rest(net, seq, skip, T)
                    c3 = _clock()
                    t["scale"] += c1 - c0
                    t["first_layer"] += c2 - c1
                    t["rest"] += c3 - c2
                    if s == 0 and a == 0:  # the stages are the network's own forward
                        functional.reset_net(net)
                        ref = net.forward_steps(xb)
                        assert torch.allclose(ref, y, atol=1e-4), "breakdown != forward_steps"
                    n += xb.shape[0]
        out[path] = {"cells": n, "seconds": t}
    # writing: the predictions of all cells into a copy of the file
    with tempfile.TemporaryDirectory() as tmp:
        n = out[paths[0]]["cells"]
        labels = np.asarray(model.classes, dtype=object)[np.zeros(n, dtype=int)]
        obs = {"scsnn": labels, "scsnn_confidence": np.ones(n, np.float32)}
        obsm = {"scsnn_probabilities": np.zeros((n, len(model.classes)), np.float32)}
        c0 = _clock()
        write_annotations(query, Path(tmp) / "q.h5ad", obs=obs, obsm=obsm, uns={})
        w = _clock() - c0
    for path in out:
        out[path]["seconds"]["write"] = w
        out[path]["cells_per_s"] = out[path]["cells"] / sum(out[path]["seconds"].values())
    return out


def train_breakdown(model, reference: Path, label_key: str, n_batches: int,
                    batch_size: int, paths) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from scsnn.io import get_expression, read_h5ad
    from scsnn.models import build_network
    from scsnn.pp import ScaledCells

    gs = model.gene_space
    adata = read_h5ad(reference)
    X, _ = gs.project(get_expression(adata))
    y = torch.from_numpy(adata.obs[label_key].cat.codes.to_numpy().astype(np.int64))
    cells = ScaledCells(X, gs)
    out = {}
    for path in paths:
        if path == "sparse":
            from scsnn.models import SparseCells
        net = build_network(model.config, seed=0)
        net.load_state_dict(model.network.state_dict())
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        t = dict.fromkeys(("rows", "first_layer", "rest", "backward_step"), 0.0)
        T = net.cfg.timesteps
        for _ in range(n_batches):
            idx = rng.integers(0, X.shape[0], batch_size)
            c0 = _clock()
            if path == "dense":
                xb = torch.from_numpy(cells.rows(idx))
            else:
                xb = SparseCells.from_numpy(*cells.sparse_rows(idx))
            c1 = _clock()
            seq, skip = _first_layer(net, xb, path)
            c2 = _clock()
            logits = _rest(net, seq, skip, T)[-1]
            c3 = _clock()
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            c4 = _clock()
            for k, v in zip(t, (c1 - c0, c2 - c1, c3 - c2, c4 - c3)):
                t[k] += v
        out[path] = {"samples": n_batches * batch_size, "seconds": t,
                     "samples_per_s": n_batches * batch_size / sum(t.values())}
    return out


def markdown(res: dict) -> str:
    a, tr = res["annotate"], res["train"]
    paths = list(a)
    head = "| stage | " + " | ".join(paths) + " |"
    lines = [f"Annotation of {a[paths[0]]['cells']:,} cells ({res['density']:.1%} non-zero over "
             f"the model's {res['n_genes']:,} genes; {res['threads']} torch thread(s)): "
             "seconds per stage", "",
             head, "|---|" + "---|" * len(paths)]
    for k in a[paths[0]]["seconds"]:
        lines.append(f"| {k.replace('_', ' ')} | "
                     + " | ".join(f"{a[p]['seconds'][k]:.2f}" for p in paths) + " |")
    lines.append("| **cells/s** | " + " | ".join(f"**{a[p]['cells_per_s']:,.0f}**"
                                                 for p in paths) + " |")
    lines += ["", f"Training, {tr[paths[0]]['samples']:,} samples in batches of "
              f"{res['train_batch']}: seconds per stage", "", head,
              "|---|" + "---|" * len(paths)]
    for k in tr[paths[0]]["seconds"]:
        lines.append(f"| {k.replace('_', ' ')} | "
                     + " | ".join(f"{tr[p]['seconds'][k]:.2f}" for p in paths) + " |")
    lines.append("| **samples/s** | " + " | ".join(f"**{tr[p]['samples_per_s']:,.0f}**"
                                                   for p in paths) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=20_000, help="reference and query cells")
    ap.add_argument("--reference", type=Path, default=None)
    ap.add_argument("--query", type=Path, default=None)
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024, help="inference batch")
    ap.add_argument("--train-batch", type=int, default=512)
    ap.add_argument("--train-batches", type=int, default=40)
    ap.add_argument("--paths", default="dense,sparse",
                    help="dense (the path before event-driven input; runs on older scsnn "
                    "too), sparse")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/scsnn-breakdown"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad

    import scsnn

    paths = a.paths.split(",")
    ref, query = a.reference, a.query
    if ref is None or query is None:
        d = a.data_dir / f"n{a.cells}"
        ref, query = d / "reference.h5ad", d / "query.h5ad"
        if not (ref.is_file() and query.is_file()):
            subprocess.run([sys.executable, "-m", "scsnn", "dataset", "synthetic", "--out",
                            str(d), "--n-cells", str(a.cells), "--n-query", str(a.cells),
                            "--sparsity", "realistic"], check=True, stdout=subprocess.DEVNULL)
    adata = ad.read_h5ad(ref)
    model = scsnn.tl.train(adata, a.label_key, training={"epochs": a.epochs, "min_epochs": 1},
                           progress=False)
    torch.set_num_threads(a.threads)
    X, _ = model.gene_space.project(scsnn.io.get_expression(adata))
    res = {"threads": a.threads, "n_genes": model.gene_space.n_genes,
           "density": X.nnz / (X.shape[0] * X.shape[1]), "train_batch": a.train_batch,
           "annotate": annotate_breakdown(model, query, a.batch_size, 65_536, paths),
           "train": train_breakdown(model, ref, a.label_key, a.train_batches, a.train_batch,
                                    paths)}
    md = markdown(res)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "breakdown.json").write_text(json.dumps(res, indent=1))
        (a.out / "breakdown.md").write_text(md)


if __name__ == "__main__":
    main()
