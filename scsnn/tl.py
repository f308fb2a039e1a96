"""Scanpy-style tools: :func:`train` a model on a labelled AnnData, :func:`annotate` a query."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._version import __version__
from .errors import InputError
from .evaluate import energy_estimate
from .io import get_expression, get_labels
from .models import (
    NetworkConfig,
    ScsnnModel,
    build_network,
    predict,
    resolve_device,
    softmax,
    torch_threads_kept,
)
from .pp import fit_gene_space
from .training import BiLevelTrainer, TrainConfig

logger = logging.getLogger("scsnn")

UNASSIGNED = "Unassigned"


def train(
    adata: ad.AnnData,
    label_key: str,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    genes: Sequence[str] | None = None,
    n_hvg: int = 2000,
    n_markers: int = 25,
    neuron: str = "hifi",
    encoder: str = "direct",
    timesteps: int = 4,
    hidden: Sequence[int] = (512, 128),
    dropout: float = 0.2,
    input_dropout: float = 0.2,
    epochs: int = 40,
    batch_size: int | None = None,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    bilevel: bool = True,
    online: bool = False,
    autapse: bool = True,
    smoothness: float = 1e-2,
    alpha_interval: int = 2,
    alpha_min_steps: int = 1,
    val_fraction: float = 0.15,
    class_balance: float = 0.5,
    ema_decay: float = 0.99,
    refit_epochs: int = 2,
    min_cells_per_class: int = 1,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
) -> ScsnnModel:
    """Train a spiking cell-type classifier on a labelled reference.

    Parameters
    ----------
    adata
        Reference cells. Expression is taken from ``X``, ``layers[layer]`` or ``raw``; raw
        counts are normalised and log1p-transformed, log-normalised data are used as given.
    label_key
        ``obs`` column with the cell-type labels. Cells without a label are left out.
    gene_symbols
        ``var`` column that identifies genes instead of ``var_names``.
    genes
        Restrict the candidate genes (for example to those a query also measures).
    n_hvg, n_markers
        Highly variable genes kept, plus this many top markers per class.
    neuron
        ``hifi`` (heterogeneous self-inhibiting neurons), ``lif``, ``plif`` or ``ann``.
    encoder, timesteps
        ``direct`` (analog current each step), ``rate`` (Bernoulli spikes) or ``latency``
        (time to first spike), over ``timesteps`` steps.
    dropout, input_dropout
        Dropout between hidden layers, and on the input genes (robustness to genes that a
        query measures poorly).
    bilevel
        Neuron parameters on the validation split every ``alpha_interval`` epochs (True), or
        trained jointly with the synapses (False).
    batch_size
        Cells per mini-batch (default: 128 under 20,000 training cells, else 512).
    ema_decay
        Decay of the exponential moving average of the weights that is validated and kept
        (0 turns it off).
    refit_epochs
        After early stopping, epochs of the synapses on all reference cells (validation
        cells included) at a tenth of the learning rate.
    class_balance
        Exponent b of the sampling weight ``n_class ** -b`` (0: as in the data, 1: balanced).
    min_cells_per_class
        Classes with fewer labelled cells are dropped, with a message naming them.
    seed
        Same seed, same data, same model and predictions on the CPU.

    Returns
    -------
    The trained :class:`~scsnn.models.ScsnnModel`; ``model.save(dir)`` writes it to disk.
    """
    seed = int(seed)
    dev = resolve_device(device)
    if neuron not in ("hifi", "lif", "plif", "ann"):
        raise InputError(f"unknown neuron '{neuron}' (hifi, lif, plif or ann)")
    labels = get_labels(adata, label_key)
    keep = labels.notna().to_numpy()
    if not keep.all():
        logger.warning("%d cells without a label in obs['%s'] are left out", (~keep).sum(), label_key)
    labels = labels[keep].astype(str)
    counts = labels.value_counts()
    too_small = counts[counts < min_cells_per_class]
    if len(too_small):
        logger.warning(
            "dropping classes with fewer than %d cells: %s",
            min_cells_per_class,
            ", ".join(f"{k} ({v})" for k, v in too_small.items()),
        )
        keep_lab = ~labels.isin(too_small.index).to_numpy()
        keep[np.flatnonzero(keep)[~keep_lab]] = False
        labels = labels[keep_lab]
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise InputError(f"obs['{label_key}'] needs at least 2 classes to train, found {len(classes)}")
    tiny = counts[(counts >= min_cells_per_class) & (counts < 3)]
    if len(tiny):
        logger.warning(
            "classes too small to split (kept for training, not validated): %s",
            ", ".join(f"{k} ({v})" for k, v in tiny.items()),
        )
    code_of = {c: i for i, c in enumerate(classes)}
    codes = labels.map(code_of).to_numpy().astype(np.int64)

    sub = adata[keep] if not keep.all() else adata
    expr = get_expression(sub, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    logger.info(
        "reference: %d cells, %d genes, %d classes; expression from %s, %s",
        expr.X.shape[0],
        expr.X.shape[1],
        len(classes),
        expr.source,
        "raw counts" if expr.kind == "counts" else "log-normalised values",
    )
    with torch_threads_kept():
        gs, Xsel = fit_gene_space(
            expr,
            codes,
            classes,
            n_hvg=int(n_hvg),
            n_markers=int(n_markers),
            restrict_genes=list(genes) if genes is not None else None,
        )
    cfg = NetworkConfig(
        n_genes=gs.n_genes,
        n_classes=len(classes),
        hidden=tuple(int(h) for h in hidden),
        timesteps=int(timesteps),
        encoder=encoder,
        neuron=neuron,
        dropout=dropout,
        input_dropout=input_dropout,
        online=online,
        autapse=autapse,
        clip=gs.clip,
    )
    try:
        network = build_network(cfg, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    tcfg = TrainConfig(
        epochs=int(epochs),
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        alpha_interval=alpha_interval,
        alpha_min_steps=alpha_min_steps,
        smoothness=smoothness,
        bilevel=bilevel,
        val_fraction=val_fraction,
        class_balance=class_balance,
        ema_decay=ema_decay,
        refit_epochs=refit_epochs,
        seed=seed,
        progress=progress,
    )
    network, metrics = BiLevelTrainer(tcfg, dev).fit(network, Xsel, codes, gs, len(classes))
    network.to("cpu")
    metrics["class_counts"] = {c: int(counts[c]) for c in classes}
    metrics["unsplit_classes"] = [classes[i] for i in metrics["unsplit_classes"]]
    settings = {
        "label_key": label_key,
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
        "n_hvg": int(n_hvg),
        "n_markers": int(n_markers),
        "seed": seed,
        "device": str(dev),
        "train": tcfg.to_dict(),
    }
    model = ScsnnModel(gs, classes, network, cfg, settings=settings, metrics=metrics)
    model.model_id = model.compute_id()
    logger.info(
        "trained %s in %.1f s (%d epochs, best %d, validation macro-F1 %s)",
        model,
        metrics["train_seconds"],
        metrics["epochs_run"],
        metrics["best_epoch"],
        "n/a" if metrics["val_macro_f1"] is None else f"{metrics['val_macro_f1']:.3f}",
    )
    return model


def _as_model(model: ScsnnModel | str | os.PathLike) -> ScsnnModel:
    if isinstance(model, ScsnnModel):
        return model
    return ScsnnModel.load(model, device="cpu")


def annotate(
    adata: ad.AnnData,
    model: ScsnnModel | str | os.PathLike,
    *,
    key_added: str = "scsnn",
    min_confidence: float = 0.0,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    min_gene_overlap: float = 0.5,
    early_exit: float | None = None,
    batch_size: int = 1024,
    device: str = "auto",
    copy: bool = False,
) -> ad.AnnData | None:
    """Predict cell types of a query and write them into the AnnData.

    Parameters
    ----------
    adata
        Query cells (raw counts or log-normalised; see :func:`train`).
    model
        A trained :class:`~scsnn.models.ScsnnModel` or the path of a saved model directory.
    key_added
        Prefix of the slots written.
    min_confidence
        Cells whose top probability is below this are labelled ``"Unassigned"``.
    min_gene_overlap
        Refuse a query holding less than this fraction of the model's genes.
    early_exit
        Decide each cell at the first step whose top probability reaches this value (the
        class readout is accumulated step by step), instead of after all T steps.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Writes:

    ``obs[key_added]``
        Categorical predicted label; categories are the model's classes in model order,
        then ``"Unassigned"``.
    ``obs[f"{key_added}_confidence"]``
        Probability of the predicted class (before the ``min_confidence`` cut).
    ``obsm[f"{key_added}_probabilities"]``
        DataFrame of class probabilities, one column per class in model order.
    ``obsm[f"{key_added}_step_labels"]``
        ``[cells, T]`` class index (into the model's classes) of the readout after each step.
    ``obs[f"{key_added}_decision_step"]``
        With ``early_exit``: the step at which each cell was decided.
    ``uns[key_added]``
        ``{"params", "classes", "model", "gene_overlap", "version", "energy", "latency"}``;
        ``energy`` holds the per-cell energy of this network and of its ANN twin computed
        from the spikes counted here (see :func:`scsnn.evaluate.energy_estimate`).
    """
    m = _as_model(model)
    if not 0.0 <= min_confidence <= 1.0:
        raise InputError(f"min_confidence must be between 0 and 1, got {min_confidence}")
    if copy:
        adata = adata.copy()
    expr = get_expression(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    with torch_threads_kept():
        Xq, present = m.gene_space.project(expr)
    n_present = int(present.sum())
    frac = n_present / m.gene_space.n_genes
    if frac < min_gene_overlap:
        raise InputError(
            f"query holds {n_present} of the model's {m.gene_space.n_genes} genes "
            f"({frac:.1%}); at least {min_gene_overlap:.0%} are needed "
            "(check --gene-symbols, or lower --min-gene-overlap)"
        )
    if frac < 0.9:
        logger.warning(
            "query holds only %d of the model's %d genes (%.1f%%); absent genes are set to "
            "the reference mean", n_present, m.gene_space.n_genes, 100 * frac
        )
    dev = resolve_device(device)
    m.network.to(dev)
    seed = int(m.settings.get("seed", 0))
    pred = predict(m.network, Xq, m.gene_space, present, batch_size=batch_size, device=dev,
                   seed=seed, count_spikes=True, early_exit=early_exit)
    m.network.to("cpu")
    proba = softmax(pred.logits.astype(np.float64)).astype(np.float32)
    top = proba.argmax(1)
    conf = proba[np.arange(len(top)), top]
    labels = np.asarray(m.classes, dtype=object)[top]
    if min_confidence > 0:
        labels = np.where(conf < min_confidence, UNASSIGNED, labels)
    cats = list(m.classes) + ([UNASSIGNED] if UNASSIGNED not in m.classes else [])
    adata.obs[key_added] = pd.Categorical(labels, categories=cats)
    adata.obs[f"{key_added}_confidence"] = conf
    adata.obsm[f"{key_added}_probabilities"] = pd.DataFrame(
        proba, index=adata.obs_names, columns=[str(c) for c in m.classes]
    )
    cfg = m.config
    c = pred.counter
    energy = energy_estimate(
        [cfg.n_genes, *cfg.hidden, cfg.n_classes],
        timesteps=cfg.timesteps,
        analog_input=m.network.encoder.analog if c is not None else True,
        spiking=c is not None,
        n_cells=c.n_cells if c is not None else adata.n_obs,
        input_events=c.input_events if c is not None else 0.0,
        layer_spikes=c.layer_spikes if c is not None else (),
    )
    adata.obsm[f"{key_added}_step_labels"] = pred.step_labels
    if early_exit is not None:
        adata.obs[f"{key_added}_decision_step"] = pred.decision_step
    adata.uns[key_added] = {
        "energy": {k: v for k, v in energy.items() if v is not None},
        "latency": {
            "timesteps": int(pred.step_labels.shape[1]),
            "early_exit": float(early_exit) if early_exit is not None else 0.0,
            "mean_steps": float(pred.decision_step.mean()),
        },
        "params": {
            "min_confidence": float(min_confidence),
            "layer": layer or "",
            "use_raw": bool(use_raw),
            "gene_symbols": gene_symbols or "",
            "input_kind": expr.kind,
            "neuron": m.config.neuron,
            "encoder": m.config.encoder,
            "timesteps": int(m.config.timesteps),
        },
        "classes": np.asarray(m.classes, dtype=object),
        "model": m.model_id,
        "gene_overlap": {"n_model_genes": m.gene_space.n_genes, "n_present": n_present,
                         "fraction": float(frac)},
        "version": __version__,
    }
    n_un = int((labels == UNASSIGNED).sum()) if min_confidence > 0 else 0
    logger.info(
        "annotated %d cells (%s input, %d/%d model genes present%s)",
        adata.n_obs, expr.kind, n_present, m.gene_space.n_genes,
        f", {n_un} unassigned" if n_un else "",
    )
    return adata if copy else None


def label_summary(adata: ad.AnnData, key_added: str = "scsnn") -> pd.DataFrame:
    """Counts and mean confidence per predicted label."""
    df = pd.DataFrame({"label": adata.obs[key_added],
                       "confidence": adata.obs[f"{key_added}_confidence"]})
    g = df.groupby("label", observed=True)["confidence"]
    return pd.DataFrame({"cells": g.size(), "mean_confidence": g.mean()})

