"""Scanpy-style tools: :func:`train` a model on a labelled AnnData, :func:`annotate` a query."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from . import distributed
from ._version import __version__, library_versions
from .errors import InputError
from .evaluate import UNASSIGNED, energy_estimate
from .io import get_expression, get_labels, read_h5ad, write_h5ad_atomic
from .bundle import ScsnnModel, predict
from .encoding import ENCODERS
from .models import (
    NETWORKS,
    NetworkConfig,
    Predictions,
    SpikeCounter,
    build_network,
    is_analog,
    member_seed,
    resolve_device,
    softmax,
    torch_threads_kept,
)
from .models import adapt_batchnorm as _adapt_batchnorm
from .pp import PreprocessConfig, ScaledCells, fit_gene_space
from .training import BiLevelTrainer, TrainConfig

logger = logging.getLogger("scsnn")

#: The majority-voting label of a cluster whose commonest label holds under
#: ``majority_min_fraction`` of its cells (CellTypist's ``min_prop``).
HETEROGENEOUS = "Heterogeneous"

#: Over half of the cells left "Unassigned" by ``min_confidence`` is warned about.
UNASSIGNED_WARN_FRACTION = 0.5


def configs(**settings: Any) -> dict[str, Any]:
    """Sort flat settings into the three configuration objects of :func:`train`.

    ``configs(epochs=20, hidden=(256, 64), n_hvg=1000)`` returns ``{"preprocess":
    PreprocessConfig(n_hvg=1000, ...), "network": NetworkConfig(hidden=(256, 64), ...),
    "training": TrainConfig(epochs=20, ...)}``, ready for ``train(adata, key, **...)``. Every
    name is a field of exactly one of them; an unknown name raises :class:`InputError`.
    """
    out = {"preprocess": {}, "network": {}, "training": {}}
    owners = {"preprocess": PreprocessConfig, "network": NetworkConfig, "training": TrainConfig}
    for name, value in settings.items():
        where = [k for k, c in owners.items() if name in c.__dataclass_fields__]
        if not where or name in ("n_genes", "n_classes", "seed", "progress"):
            raise InputError(f"unknown training setting '{name}'")
        out[where[0]][name] = value
    return {"preprocess": PreprocessConfig(**out["preprocess"]),
            "network": NetworkConfig(**out["network"]),
            "training": TrainConfig(**out["training"])}


def _config(value: Any, cls: type, what: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return dataclasses.replace(value)
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as exc:
            raise InputError(f"{what}: {exc}") from None
    raise InputError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def train(
    adata: ad.AnnData,
    label_key: str,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    genes: Sequence[str] | None = None,
    preprocess: PreprocessConfig | dict[str, Any] | None = None,
    network: NetworkConfig | dict[str, Any] | None = None,
    training: TrainConfig | dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
    stream_from: str | os.PathLike | None = None,
) -> ScsnnModel:
    """Train a spiking cell-type classifier on a labelled reference.

    Parameters
    ----------
    adata
        Reference cells. Expression is taken from ``X``, ``layers[layer]`` or ``raw``; raw
        counts are normalised and log1p-transformed, log-normalised data are used as given.
    label_key
        ``obs`` column with the cell-type labels. Cells without a label are left out.
    layer, use_raw
        Take expression from ``layers[layer]`` or from ``.raw`` instead of ``X``.
    gene_symbols
        ``var`` column that identifies genes instead of ``var_names``.
    genes
        Restrict the candidate genes (for example to those a query also measures).
    preprocess
        :class:`scsnn.pp.PreprocessConfig` (or a dict of its fields): highly variable genes,
        marker genes per class, smallest class kept, clip.
    network
        :class:`scsnn.models.NetworkConfig` (or a dict of its fields, ``n_genes`` and
        ``n_classes`` excepted: they come from the data): neuron model (``hifi``, the
        baselines ``lif``, ``plif``, ``sj-lif``, ``sj-plif``, or the ``ann`` twin), encoder
        and time steps, layer widths, dropout, ablation switches.
    training
        :class:`scsnn.training.TrainConfig` (or a dict of its fields): epochs, learning
        rates, the bi-level schedule, the splits, class balancing, early stopping.
        :func:`configs` sorts flat settings into the three objects.
    seed
        Fixes the initial weights, the splits and every random draw (it replaces
        ``training.seed``): same seed, same data, same model and predictions on the CPU.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    progress
        A progress bar over training epochs (default: when stderr is a terminal).
    stream_from
        An ``.h5ad`` file to draw the training mini-batches from, cell by cell from disk,
        so that a reference larger than memory trains on all its labelled cells. ``adata``
        is then only the sample the gene space is fitted on (for instance
        :func:`scsnn.io.read_h5ad_sample` of the same file); labels come from the file's
        ``obs[label_key]``, restricted to the classes of the sample.

    Returns
    -------
    ScsnnModel
        The trained model; ``model.save(dir)`` writes it to disk. ``model.metrics`` holds
        the training record: ``select_macro_f1`` (the saved model on the selection split, which
        fitted nothing), the epochs, the splits' sizes and roles, and per layer the neuron
        parameters' spread at the start and the end (``neurons``).
    """
    seed = int(seed)
    dev = resolve_device(device)
    pcfg = _config(preprocess, PreprocessConfig, "preprocess")
    ncfg = _config(network, NetworkConfig, "network")
    tcfg = _config(training, TrainConfig, "training")
    if ncfg.neuron not in NETWORKS:
        raise InputError(f"unknown neuron '{ncfg.neuron}' (choose from {', '.join(NETWORKS)})")
    if ncfg.encoder not in ENCODERS:
        raise InputError(f"unknown encoder '{ncfg.encoder}' (choose from {', '.join(ENCODERS)})")
    _check_robustness(pcfg, tcfg)
    labels = get_labels(adata, label_key)
    keep = labels.notna().to_numpy()
    if not keep.all():
        logger.warning("%d cells without a label in obs['%s'] are left out", (~keep).sum(), label_key)
    labels = labels[keep].astype(str)
    counts = labels.value_counts()
    min_cells = int(pcfg.min_cells_per_class)
    too_small = counts[counts < min_cells]
    if len(too_small):
        logger.warning(
            "dropping classes with fewer than %d cells: %s",
            min_cells,
            ", ".join(f"{k} ({v})" for k, v in too_small.items()),
        )
        keep_lab = ~labels.isin(too_small.index).to_numpy()
        keep[np.flatnonzero(keep)[~keep_lab]] = False
        labels = labels[keep_lab]
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise InputError(f"obs['{label_key}'] needs at least 2 classes to train, found {len(classes)}")
    tiny = counts[(counts >= min_cells) & (counts < 3)]
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
        "reference: %d cells, %d genes, %d classes; %s",
        expr.X.shape[0],
        expr.X.shape[1],
        len(classes),
        expr.describe(),
    )
    with torch_threads_kept():
        gs, Xsel = fit_gene_space(
            expr,
            codes,
            classes,
            n_hvg=int(pcfg.n_hvg),
            n_markers=int(pcfg.n_markers),
            n_pair_markers=int(pcfg.n_pair_markers),
            clip=float(pcfg.clip),
            restrict_genes=list(genes) if genes is not None else None,
        )
    ncfg = dataclasses.replace(ncfg, n_genes=gs.n_genes, n_classes=len(classes), clip=gs.clip,
                               hidden=tuple(int(h) for h in ncfg.hidden),
                               timesteps=int(ncfg.timesteps), ensemble=int(ncfg.ensemble))
    try:
        net = build_network(ncfg, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for member in getattr(net, "members", [net]):
        _fit_encoder(member, gs, Xsel, seed)
    # every cell's total count, for the thinning augmentation (raw counts only)
    library = (np.asarray(expr.X.sum(axis=1), dtype=np.float64).ravel()
               if expr.kind == "counts" and tcfg.augment_depth < 1.0 else None)
    if tcfg.augment_depth < 1.0 and (expr.kind != "counts" or stream_from is not None):
        logger.warning("augment_depth needs the reference's raw counts in memory (%s): "
                       "training without depth thinning",
                       "streamed from disk" if expr.kind == "counts" else
                       "the reference holds log-normalised values")
    source = None
    if stream_from is not None:
        library = None
        source, Xsel, codes, counts = _stream_source(stream_from, label_key, classes, gs,
                                                     expr.kind, layer, use_raw, gene_symbols)
    tcfg = dataclasses.replace(tcfg, seed=seed, progress=progress,
                               epochs=int(tcfg.epochs))
    # under torchrun: join the process group, train data-parallel on this rank's device
    try:
        with distributed.process_group(dev) as dev:
            cells = ScaledCells(Xsel, gs, library=library, depth=tcfg.augment_depth,
                                gene_noise=tcfg.augment_gene_noise)
            net, metrics = _fit_network(net, tcfg, dev, cells, codes, len(classes))
    finally:
        if source is not None:
            source.close()
    net.to("cpu")
    metrics["class_counts"] = {c: int(counts[c]) for c in classes}
    metrics["libraries"] = library_versions()  # what trained it (results depend on them)
    metrics["unsplit_classes"] = [classes[i] for i in metrics["unsplit_classes"]]
    settings = {
        "label_key": label_key,
        "layer": layer,
        "use_raw": use_raw,
        "gene_symbols": gene_symbols,
        "seed": seed,
        "device": str(dev),
        "streamed_from": str(stream_from) if stream_from is not None else "",
        "preprocess": pcfg.to_dict(),
        "train": tcfg.to_dict(),
        # kept for readers of older model files
        "n_hvg": int(pcfg.n_hvg),
        "n_markers": int(pcfg.n_markers),
    }
    model = ScsnnModel(gs, classes, net, ncfg, settings=settings, metrics=metrics)
    model.model_id = model.compute_id()
    f1 = metrics["select_macro_f1"]
    logger.info(
        "trained %s in %.1f s (%d epochs, best %d; macro-F1 %s on %d held-out reference cells)",
        model,
        metrics["train_seconds"],
        metrics["epochs_run"],
        metrics["best_epoch"],
        "n/a" if f1 is None else f"{f1:.3f}",
        metrics["n_select"],
    )
    return model


def _fit_network(net: Any, tcfg: TrainConfig, dev: Any, cells: Any, codes: np.ndarray,
                 n_classes: int) -> tuple[Any, dict[str, Any]]:
    """Train a network, or each member of an ensemble in turn (member k with
    :func:`scsnn.models.member_seed`, all on the split of the ensemble's seed); an ensemble
    is then scored, and its temperature fitted, on that split's selection cells."""
    members = getattr(net, "members", None)
    if members is None:
        return BiLevelTrainer(tcfg, dev).fit(net, cells, codes, n_classes)
    split_seed = tcfg.seed if tcfg.split_seed is None else tcfg.split_seed
    runs = []
    for k, member in enumerate(members):
        mcfg = dataclasses.replace(tcfg, seed=member_seed(tcfg.seed, k), split_seed=split_seed)
        logger.info("training member %d of %d (seed %d)", k + 1, len(members), mcfg.seed)
        _, run = BiLevelTrainer(mcfg, dev).fit(member, cells, codes, n_classes)
        cal = run.get("calibration") or {}
        net.member_temperature[k] = float(cal.get("temperature", 1.0))
        runs.append(run)
    scored = BiLevelTrainer(dataclasses.replace(tcfg, split_seed=split_seed), dev).score_select(
        net, cells, codes)
    metrics = dict(runs[0])  # splits, sizes and neuron summaries: those of member 0
    metrics.update(
        train_seconds=round(sum(r["train_seconds"] for r in runs), 3),
        epochs_run=int(sum(r["epochs_run"] for r in runs)),
        select_macro_f1=scored["select_macro_f1"],
        select_macro_f1_best_epoch=None,
        calibration=scored["calibration"],
        ensemble={
            "members": len(runs),
            "seeds": [member_seed(tcfg.seed, k) for k in range(len(runs))],
            "split_seed": int(split_seed),
            "note": "select_macro_f1 and calibration are the ensemble's (mean of the members' "
                    "tempered probabilities) on the shared selection split; epochs_run and "
                    "train_seconds add up the members'; the other fields are member 0's",
            "member_metrics": [{k: r.get(k) for k in ("train_seconds", "epochs_run",
                                                       "best_epoch", "select_macro_f1",
                                                       "calibration", "neurons", "alpha")}
                               for r in runs],
        },
    )
    return net, metrics


def _check_robustness(pcfg: PreprocessConfig, tcfg: TrainConfig) -> None:
    """Refuse out-of-range augmentation, logit-adjustment and pair-marker settings."""
    if not 0.0 < float(tcfg.augment_depth) <= 1.0:
        raise InputError(f"augment_depth must be in (0, 1] (1: off), got {tcfg.augment_depth}")
    for name in ("augment_gene_noise", "logit_adjust"):
        if not float(getattr(tcfg, name)) >= 0.0:
            raise InputError(f"{name} must be >= 0 (0: off), got {getattr(tcfg, name)}")
    if not 0.0 <= float(tcfg.step_loss) <= 1.0:
        raise InputError(f"step_loss must be in [0, 1] (0: off), got {tcfg.step_loss}")
    if tcfg.skip_fit not in ("logreg", "joint"):
        raise InputError(f"skip_fit must be 'logreg' or 'joint', got {tcfg.skip_fit!r}")
    if tcfg.skip_class_weight not in ("none", "balanced"):
        raise InputError("skip_class_weight must be 'none' or 'balanced', got "
                         f"{tcfg.skip_class_weight!r}")
    if not 0.0 <= float(tcfg.skip_hidden_gain) <= 1.0:
        raise InputError(f"skip_hidden_gain must be in [0, 1], got {tcfg.skip_hidden_gain}")
    if int(tcfg.skip_fit_steps) < 0 or int(tcfg.skip_fit_steps) != tcfg.skip_fit_steps:
        raise InputError("skip_fit_steps must be a whole number >= 0 (0: scikit-learn's "
                         f"solver), got {tcfg.skip_fit_steps}")
    if int(pcfg.n_pair_markers) < 0:
        raise InputError(f"n_pair_markers must be >= 0 (0: none), got {pcfg.n_pair_markers}")


#: Reference cells the spike encoders' per-gene levels are fitted on (a random sample).
ENCODER_FIT_CELLS = 10_000


def _fit_encoder(network: Any, gs: Any, X: Any, seed: int) -> None:
    """Fit a spike encoder's per-gene levels on (a sample of) the reference."""
    enc = getattr(network, "encoder", None)
    if enc is None or enc.analog:
        return
    import torch

    n = X.shape[0]
    rows = np.arange(n)
    if n > ENCODER_FIT_CELLS:
        rows = np.sort(np.random.default_rng(seed).choice(n, ENCODER_FIT_CELLS, replace=False))
    z = torch.from_numpy(gs.scale(X[rows]))
    enc.fit(z, torch.from_numpy(gs.floor()))


def _stream_source(path, label_key, classes, gs, kind, layer, use_raw, gene_symbols):
    """The labelled cells of ``path`` as a reference on disk for the trainer."""
    from .io import H5adRows
    from .pp import ProjectedRows

    source = H5adRows(path, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    try:
        labels = get_labels(ad.AnnData(obs=source.obs), label_key)
        known = labels.notna().to_numpy()
        labels = labels[known].astype(str)
        missing = sorted(set(classes) - set(labels.unique()))
        if missing:
            raise InputError(f"{path} has no cell of class(es) {', '.join(missing)} of the "
                             "gene-space sample")
        in_model = labels.isin(classes).to_numpy()
        if not in_model.all():
            logger.warning("%d cells of %s have classes outside the model and are left out",
                           int((~in_model).sum()), Path(path).name)
        rows = np.flatnonzero(known)[in_model]
        labels = labels[in_model]
        code_of = {c: i for i, c in enumerate(classes)}
        codes = labels.map(code_of).to_numpy().astype(np.int64)
        file_kind = source.detect_kind()
        if file_kind != kind:
            raise InputError(f"{path} holds {file_kind} but the gene-space sample holds {kind}")
    except BaseException:
        source.close()
        raise
    logger.info("training mini-batches are read from %s (%d labelled cells)", path, len(rows))
    return source, ProjectedRows(source, gs, kind, rows), codes, labels.value_counts()


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
    majority_voting: bool = False,
    over_clustering: str | Sequence[Any] | np.ndarray | pd.Series | None = None,
    over_clustering_resolution: float | None = None,
    majority_min_fraction: float = 0.0,
    celltypist_columns: bool = False,
    adapt_batchnorm: bool | str = False,
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
    majority_voting
        Refine the labels as CellTypist does: every cell of a cluster of ``over_clustering``
        takes the commonest predicted label of the cluster.
    over_clustering
        The clusters voted over: the name of an ``obs`` column (for example ``"leiden"``)
        or one cluster label per cell. Giving it turns ``majority_voting`` on. Without it,
        the query is over-clustered as CellTypist does (:func:`over_cluster`: Leiden at a
        high resolution on ``obsp["connectivities"]`` when present, else on a neighbour
        graph of the PCA of its highly variable genes).
    over_clustering_resolution
        Leiden resolution of the computed over-clustering (default: from the number of
        cells, 5 under 5,000 cells up to 30 above 200,000, as CellTypist).
    majority_min_fraction
        A cluster whose commonest label holds fewer of its cells than this is labelled
        ``"Heterogeneous"`` (CellTypist's ``min_prop``; 0: always the commonest label).
    celltypist_columns
        Also write CellTypist's obs columns: ``predicted_labels``, ``conf_score`` and,
        with majority voting, ``majority_voting`` and ``over_clustering``.
    adapt_batchnorm
        Test-time adaptation (AdaBN): before predicting, a first pass over the whole query
        replaces the network's batch-norm statistics with the query's own (on a copy of the
        network; the model is left as it was). For a query from another batch, protocol
        or condition than the reference. The statistics are sums over all query cells, so
        the result does not depend on how the cells are batched or chunked. ``"reweighted"``:
        a pass before predicts every cell with the model as it is, and the statistics weigh
        the cells so that the predicted classes come in the mix the network was trained on
        (for a query whose cell types come in other proportions than the reference's).
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Writes (see ``docs/outputs.md``):

    ``obs[key_added]``
        Categorical predicted label. Categories follow the model's class order, then
        ``"Unassigned"``, and only the labels some cell carries are kept (so that
        ``sc.tl.rank_genes_groups(adata, key_added)`` finds no empty group).
    ``obs[f"{key_added}_confidence"]``
        Probability of the predicted class (before the ``min_confidence`` cut).
    ``obsm[f"{key_added}_probabilities"]``
        ``float32`` array ``[cells, classes]`` of class probabilities; column ``j`` is
        class ``uns[key_added]["classes"][j]`` (:func:`probabilities` gives it as a
        DataFrame with class-name columns). A plain array writes to ``.h5ad`` and
        ``.zarr`` whatever the class names hold (``/``, spaces, any script).
    ``obsm[f"{key_added}_step_labels"]``
        ``[cells, T]`` array of strings: the class name of the readout after each step.
    ``obs[f"{key_added}_decision_step"]``
        With ``early_exit``: the step at which each cell was decided.
    ``obs[f"{key_added}_majority_voting"]``
        With majority voting: the categorical majority label of the cell's cluster (model
        class order, then ``"Unassigned"``, ``"Heterogeneous"``; unused ones dropped).
    ``obs[f"{key_added}_majority_voting_fraction"]``
        With majority voting: the fraction of the cluster's cells whose predicted label is
        the majority label.
    ``obs[f"{key_added}_majority_voting_probability"]``
        With majority voting: the mean probability of the majority label over the cluster's
        cells (NaN when the majority is ``"Unassigned"`` or ``"Heterogeneous"``).
    ``obs[f"{key_added}_over_clustering"]``
        With a computed over-clustering: the cluster of each cell.
    ``obs["predicted_labels"]``, ``obs["conf_score"]``, ``obs["majority_voting"]``, ...
        With ``celltypist_columns``: CellTypist's names for the same values (and
        ``obs["over_clustering"]``, the clusters voted over).
    ``uns[key_added]``
        ``{"params", "classes", "model", "gene_overlap", "version", "energy", "latency"}``;
        ``energy`` holds the per-cell energy of this network and of its ANN twin computed
        from the spikes counted here (see :func:`scsnn.evaluate.energy_estimate`).
    """
    m = _as_model(model)
    _check_confidence(min_confidence)
    majority_voting = majority_voting or over_clustering is not None
    _check_voting(majority_min_fraction, over_clustering_resolution)
    clusters = (_given_clusters(over_clustering, adata.obs, adata.n_obs, "the query")
                if majority_voting and over_clustering is not None else None)
    if copy:
        adata = adata.copy()
    expr = get_expression(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    with torch_threads_kept():
        Xq, present = m.gene_space.project(expr)
    n_present = _check_overlap(m, present, min_gene_overlap, expr)
    _check_batch_size(batch_size)
    adapt_batchnorm = _check_adapt(adapt_batchnorm)
    dev = resolve_device(device)
    seed = int(m.settings.get("seed", 0))
    if adapt_batchnorm:
        absent = "mean" if is_analog(m.network) else "zero"
        network = _adapted_network(
            m, lambda: (m.gene_space.scale(Xq[s : s + batch_size], present, absent=absent)
                        for s in range(0, Xq.shape[0], batch_size)), dev, seed,
            adapt_batchnorm, m.temperature)
    else:
        network = m.network
    network.to(dev)
    try:
        pred = predict(network, Xq, m.gene_space, present, batch_size=batch_size, device=dev,
                       seed=seed, count_spikes=True, early_exit=early_exit,
                       temperature=m.temperature)
    finally:
        network.to("cpu")
    obs, obsm, uns = _slots(
        m, pred, adata.obs_names, key_added=key_added, min_confidence=min_confidence,
        early_exit=early_exit, n_present=n_present, input_kind=expr.kind,
        params={"layer": layer or "", "use_raw": bool(use_raw),
                "gene_symbols": gene_symbols or "", "adapt_batchnorm": _adapt_param(adapt_batchnorm)},
    )
    computed = majority_voting and clusters is None
    if computed:
        clusters = over_cluster(adata, resolution=over_clustering_resolution, layer=layer,
                                use_raw=use_raw, gene_symbols=gene_symbols)
    if majority_voting:
        obs.update(_voting(obs, obsm, m.classes, clusters, key_added=key_added,
                           min_fraction=majority_min_fraction, computed=computed,
                           params=uns["params"], name=over_clustering,
                           resolution=_resolution(adata.n_obs, over_clustering_resolution)))
    if celltypist_columns:
        obs.update(_celltypist(obs, key_added, clusters, over_clustering))
    for k in _stale_columns(key_added, early_exit, majority_voting):
        if k in adata.obs.columns:
            del adata.obs[k]
    for k, v in obs.items():
        adata.obs[k] = v
    for k, v in obsm.items():
        adata.obsm[k] = v
    adata.uns[key_added] = uns
    _log_annotated(adata.n_obs, expr.kind, n_present, m, obs[key_added], min_confidence,
                   found=expr.describe(m.gene_space.target_sum))
    return adata if copy else None


def _adapt_param(mode: Any) -> Any:
    """How ``uns[key]["params"]["adapt_batchnorm"]`` records the adaptation."""
    return mode if isinstance(mode, str) else bool(mode)


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")


#: ``adapt_batchnorm`` values: off, the query's statistics, or the query's statistics with
#: its cells re-weighted to the class mix the network was trained on
ADAPT_MODES = (False, True, "reweighted")
#: the largest factor by which a predicted class's cells are re-weighted (either way)
REWEIGHT_CLIP = 10.0


def _check_adapt(mode: Any) -> Any:
    if isinstance(mode, str):
        if mode == "reweighted":
            return mode
    elif mode in (0, 1):
        return bool(mode)
    raise InputError(f"adapt_batchnorm must be False, True or 'reweighted', got {mode!r}")


def _training_mix(m: ScsnnModel) -> np.ndarray:
    """The class mix of the network's training batches: class counts tempered by the
    ``class_balance`` exponent (uniform when the model does not record its counts)."""
    counts = m.metrics.get("class_counts") if isinstance(m.metrics, dict) else None
    n = np.array([float((counts or {}).get(c, 0)) for c in m.classes])
    if not (n > 0).all():
        return np.full(len(m.classes), 1.0 / len(m.classes))
    b = float((m.settings.get("train") or {}).get("class_balance", 0.5))
    t = n ** (1.0 - b)
    return t / t.sum()


def _cell_weights(labels: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Per-cell weights (mean 1) that give the predicted classes of the query the training
    mix (over the classes predicted at all), each class's factor clipped to
    [1/REWEIGHT_CLIP, REWEIGHT_CLIP]."""
    q = np.bincount(labels, minlength=len(mix)).astype(np.float64)
    if not len(labels):
        return np.zeros(0)
    q /= q.sum()
    present = q > 0
    t = np.where(present, mix, 0.0)
    t /= t.sum()
    r = np.ones(len(mix))
    r[present] = np.clip(t[present] / q[present], 1.0 / REWEIGHT_CLIP, REWEIGHT_CLIP)
    w = r[labels]
    return w / w.mean()


def _adapted_network(m: ScsnnModel, batches: Any, device: Any, seed: int,
                     mode: Any = True, temperature: float = 1.0) -> Any:
    """A copy of the model's network with its batch-norm statistics adapted to the cells
    that ``batches()`` yields (every call: all of the query, in order); the model's own
    network is not touched. ``mode="reweighted"``: a first pass predicts every cell with the
    model as it is, and the statistics weigh each cell so that the predicted classes have
    the mix of the training batches (a query whose cell types come in other proportions
    than the reference's then shifts the statistics less)."""
    import copy

    from .models import predict_batches

    weights = None
    if mode == "reweighted":
        first = predict_batches(m.network.to(device), batches(), device=device, seed=seed,
                                temperature=temperature)
        m.network.to("cpu")
        weights = _cell_weights(first.logits.argmax(1), _training_mix(m))
    net = copy.deepcopy(m.network).to(device)
    try:
        n = _adapt_batchnorm(net, batches, device=device, seed=seed, weights=weights)
    except BaseException:
        net.to("cpu")
        raise
    logger.info("adapted the statistics of %d batch-norm layer(s) to the query%s", n,
                " (cells re-weighted to the training class mix)" if weights is not None else "")
    return net


def _stale_columns(key_added: str, early_exit: float | None, majority_voting: bool) -> tuple:
    """obs columns of an earlier annotation with the same key that this one does not
    rewrite: removed, so that no column describes another run."""
    out = () if early_exit is not None else (f"{key_added}_decision_step",)
    if not majority_voting:
        out += tuple(f"{key_added}_{s}" for s in ("majority_voting",
                                                  "majority_voting_fraction",
                                                  "majority_voting_probability",
                                                  "over_clustering"))
    return out


def _check_voting(min_fraction: float, resolution: float | None) -> None:
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise InputError(f"majority_min_fraction must be between 0 and 1, got {min_fraction}")
    if resolution is not None and not float(resolution) > 0:
        raise InputError(f"over_clustering_resolution must be positive, got {resolution}")


def _given_clusters(over_clustering: Any, obs: pd.DataFrame, n_obs: int, where: str
                    ) -> pd.Series:
    """The clusters to vote over: an obs column named by ``over_clustering``, or its values."""
    if isinstance(over_clustering, str):
        if over_clustering not in obs.columns:
            cols = ", ".join(map(str, obs.columns[:20])) or "none"
            raise InputError(f"over_clustering '{over_clustering}' is not an obs column of "
                             f"{where} (columns: {cols})")
        values = obs[over_clustering]
    else:
        values = pd.Series(np.asarray(over_clustering, dtype=object).ravel())
        if len(values) != n_obs:
            raise InputError(f"over_clustering holds {len(values)} values for {n_obs} cells")
    missing = int(pd.isna(values).sum())
    if missing:
        raise InputError(f"over_clustering leaves {missing} cells without a cluster: give "
                         "every cell one, or let scsnn compute an over-clustering")
    return pd.Series(np.asarray(values), index=obs.index[:n_obs] if len(obs.index) == n_obs
                     else None)


def _resolution(n_obs: int, resolution: float | None) -> float:
    """CellTypist's over-clustering resolution for a query of ``n_obs`` cells."""
    if resolution is not None:
        return float(resolution)
    for limit, r in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0),
                     (200_000, 25.0)):
        if n_obs < limit:
            return r
    return 30.0


def over_cluster(
    adata: ad.AnnData,
    *,
    resolution: float | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    random_state: int = 0,
) -> pd.Series:
    """Over-cluster a query as CellTypist does before majority voting.

    Leiden (igraph) at a high ``resolution`` (default from the number of cells: 5 under
    5,000 cells, 10, 15, 20, 25, then 30 above 200,000) on ``adata.obsp["connectivities"]``
    when the query has a neighbour graph (``sc.pp.neighbors``), else on one built here from
    its expression: counts normalised to 10,000 per cell and log1p-transformed, genes seen
    in fewer than 5 cells dropped, 2,000 highly variable genes, scaled (max 10), 50
    principal components, 10 neighbours. ``adata`` is not changed.

    Returns
    -------
    The categorical cluster of every cell (labels ``"0"``, ``"1"``, ...), indexed like obs.
    """
    import scanpy as sc

    n = adata.n_obs
    res = _resolution(n, resolution)
    if n < 3:  # nothing to cluster: every cell is its own cluster
        names = [str(i) for i in range(n)]
        return pd.Series(pd.Categorical(names, categories=names), index=adata.obs_names)
    graph = adata.obsp["connectivities"] if "connectivities" in adata.obsp else None
    if graph is None:
        graph = _neighbour_graph(adata, layer, use_raw, gene_symbols, random_state)
    else:
        logger.info("over-clustering on the neighbour graph of obsp['connectivities']")
    holder = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.astype(str)))
    sc.tl.leiden(holder, resolution=res, adjacency=graph, flavor="igraph", n_iterations=2,
                 directed=False, random_state=random_state, key_added="over_clustering")
    clusters = holder.obs["over_clustering"]
    logger.info("over-clustered %d cells into %d clusters (Leiden, resolution %g)", n,
                clusters.nunique(), res)
    return pd.Series(clusters.to_numpy(), index=adata.obs_names, name=None)


def _neighbour_graph(adata: ad.AnnData, layer: str | None, use_raw: bool,
                     gene_symbols: str | None, random_state: int) -> Any:
    """CellTypist's neighbour graph of a query without one (see :func:`over_cluster`)."""
    import scanpy as sc

    expr = get_expression(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    tmp = ad.AnnData(X=expr.X.copy(), obs=pd.DataFrame(index=np.arange(adata.n_obs).astype(str)),
                     var=pd.DataFrame(index=pd.Index(expr.genes).astype(str)))
    with torch_threads_kept():
        if expr.kind != "lognorm":
            sc.pp.normalize_total(tmp, target_sum=1e4)
            sc.pp.log1p(tmp)
        sc.pp.filter_genes(tmp, min_cells=min(5, max(1, adata.n_obs // 2)))
        if tmp.n_vars < 3:
            raise InputError("cannot over-cluster the query: fewer than 3 genes are "
                             "detected in 5 cells; give over_clustering (an obs column)")
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(2000, tmp.n_vars))
        tmp = tmp[:, tmp.var["highly_variable"].to_numpy()].copy()
        tmp.X = tmp.X.toarray()  # scaling centres the values: dense (the HVGs only)
        sc.pp.scale(tmp, max_value=10)
        n_comps = max(1, min(50, tmp.n_obs - 1, tmp.n_vars - 1))
        sc.pp.pca(tmp, n_comps=n_comps, random_state=random_state)
        sc.pp.neighbors(tmp, n_neighbors=min(10, tmp.n_obs - 1), n_pcs=n_comps,
                        random_state=random_state)
    logger.info("over-clustering on a neighbour graph of %d PCs of %d highly variable genes "
                "(the query has no obsp['connectivities'])", n_comps, tmp.n_vars)
    return tmp.obsp["connectivities"]


def majority_vote(
    labels: Sequence[Any] | pd.Series | pd.Categorical,
    clusters: Sequence[Any] | pd.Series | np.ndarray,
    *,
    probabilities: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    min_fraction: float = 0.0,
) -> pd.DataFrame:
    """CellTypist's majority voting: every cell takes the commonest label of its cluster.

    Ties go to the label first in ``labels``' category order (the model's class order for
    :func:`annotate`'s labels). A cluster whose commonest label holds under ``min_fraction``
    of its cells is ``"Heterogeneous"``.

    Returns
    -------
    One row per cell: ``majority_voting`` (categorical), ``majority_voting_fraction`` (the
    fraction of the cluster agreeing with it) and, with ``probabilities`` (``[cells,
    classes]``, columns in ``classes`` order), ``majority_voting_probability``, the mean
    probability of the majority label over the cluster's cells.
    """
    import scipy.sparse as sp

    if isinstance(labels, pd.Categorical):
        lab = labels
    elif isinstance(getattr(labels, "dtype", None), pd.CategoricalDtype):
        lab = pd.Series(labels).array
    else:
        lab = pd.Categorical(np.asarray(labels, dtype=object))
    cl = pd.Series(np.asarray(clusters, dtype=object).ravel())
    if len(cl) != len(lab):
        raise InputError(f"{len(cl)} clusters for {len(lab)} labels")
    if (lab.codes < 0).any() or cl.isna().any():
        raise InputError("majority voting needs a label and a cluster for every cell")
    cl_codes, _ = pd.factorize(cl.astype(str), sort=True)
    n_cl, n_lab = int(cl_codes.max()) + 1 if len(cl_codes) else 0, len(lab.categories)
    votes = np.bincount(cl_codes * n_lab + lab.codes, minlength=n_cl * n_lab).reshape(
        n_cl, n_lab)
    win = votes.argmax(1) if n_cl else np.zeros(0, np.int64)
    size = votes.sum(1)
    frac = votes[np.arange(n_cl), win] / np.maximum(size, 1)
    names = np.asarray(lab.categories, dtype=object)[win]
    names = np.where(frac < min_fraction, HETEROGENEOUS, names)
    cats = [c for c in lab.categories if c != HETEROGENEOUS] + [HETEROGENEOUS]
    out = pd.DataFrame({
        "majority_voting": pd.Categorical(names[cl_codes], categories=cats
                                          ).remove_unused_categories(),
        "majority_voting_fraction": frac[cl_codes].astype(np.float32),
    }, index=labels.index if isinstance(labels, pd.Series) else None)
    if probabilities is not None and classes is not None:
        P = np.asarray(probabilities, dtype=np.float64)
        ind = sp.csr_matrix((np.ones(len(cl_codes)), (cl_codes, np.arange(len(cl_codes)))),
                            shape=(n_cl, len(cl_codes)))
        means = np.asarray(ind @ P) / np.maximum(size, 1)[:, None]
        col = {str(c): i for i, c in enumerate(classes)}
        idx = np.array([col.get(str(nm), -1) for nm in names], dtype=np.int64)
        per = np.where(idx >= 0, means[np.arange(n_cl), np.maximum(idx, 0)], np.nan)
        out["majority_voting_probability"] = per[cl_codes].astype(np.float32)
    return out


def _voting(obs: dict[str, Any], obsm: dict[str, Any], classes: Sequence[str],
            clusters: pd.Series, *, key_added: str, min_fraction: float, computed: bool,
            params: dict[str, Any], name: Any, resolution: float) -> dict[str, Any]:
    """The obs columns of majority voting; records its settings in ``params``."""
    mv = majority_vote(obs[key_added], clusters,
                       probabilities=obsm[f"{key_added}_probabilities"], classes=classes,
                       min_fraction=min_fraction)
    out = {f"{key_added}_{c}": (mv[c].array if c == "majority_voting" else mv[c].to_numpy())
           for c in mv.columns}
    if computed:
        out[f"{key_added}_over_clustering"] = _cluster_categorical(clusters)
    params.update(majority_voting=True,
                  over_clustering=name if isinstance(name, str) else
                  ("computed" if computed else "given"),
                  over_clustering_resolution=float(resolution) if computed else 0.0,
                  majority_min_fraction=float(min_fraction))
    votes = pd.Series(np.asarray(out[f"{key_added}_majority_voting"])).value_counts()
    logger.info("majority voting over %d clusters: %s", pd.Series(clusters).nunique(),
                ", ".join(f"{k} ({v})" for k, v in votes.items()))
    return out


def _cluster_categorical(clusters: pd.Series | pd.Categorical) -> pd.Categorical:
    """Clusters as a categorical of strings, in numeric order when they are numbers."""
    values = pd.Series(np.asarray(clusters, dtype=object)).astype(str)
    uniq = values.unique().tolist()
    try:
        cats = sorted(uniq, key=float)
    except ValueError:
        cats = sorted(uniq)
    return pd.Categorical(values.to_numpy(), categories=cats)


def _celltypist(obs: dict[str, Any], key_added: str, clusters: pd.Series | None,
                over_clustering: Any) -> dict[str, Any]:
    """CellTypist's obs columns for the same predictions."""
    out = {"predicted_labels": obs[key_added], "conf_score": obs[f"{key_added}_confidence"]}
    if f"{key_added}_majority_voting" in obs:
        out["majority_voting"] = obs[f"{key_added}_majority_voting"]
        if over_clustering != "over_clustering":  # never rewrite the user's own column
            out["over_clustering"] = _cluster_categorical(clusters)
    return out


def probabilities(adata: ad.AnnData, key_added: str = "scsnn") -> pd.DataFrame:
    """The class probabilities of an annotation as a DataFrame: one row per cell, one column
    per class (named as in the model, in model order)."""
    k = f"{key_added}_probabilities"
    if k not in adata.obsm:
        raise InputError(f"no probabilities in obsm['{k}']: run scsnn annotate first")
    P = adata.obsm[k]
    if isinstance(P, pd.DataFrame):  # files written by scsnn before 0.x kept a DataFrame
        return P
    classes = [str(c) for c in adata.uns[key_added]["classes"]]
    return pd.DataFrame(np.asarray(P), index=adata.obs_names, columns=classes)


def predictions_table(adata: ad.AnnData, key_added: str = "scsnn", *,
                      probabilities_: bool = False) -> pd.DataFrame:
    """One row per cell, for a spreadsheet: ``cell``, ``predicted_label``, ``confidence``;
    ``decision_step`` with early exit; ``majority_voting``, ``majority_voting_fraction``,
    ``majority_voting_probability`` and ``over_clustering`` with majority voting; with
    ``probabilities_``, one column ``p(<class>)`` per class."""
    if key_added not in adata.obs.columns:
        raise InputError(f"no predictions in obs['{key_added}']: run scsnn annotate first")
    obs = adata.obs
    df = pd.DataFrame({"cell": obs.index.astype(str),
                       "predicted_label": obs[key_added].astype(str).to_numpy()})
    if f"{key_added}_confidence" in obs:
        df["confidence"] = obs[f"{key_added}_confidence"].to_numpy()
    if f"{key_added}_decision_step" in obs:
        df["decision_step"] = obs[f"{key_added}_decision_step"].to_numpy()
    if f"{key_added}_majority_voting" in obs:
        df["majority_voting"] = obs[f"{key_added}_majority_voting"].astype(str).to_numpy()
        for c in ("majority_voting_fraction", "majority_voting_probability"):
            if f"{key_added}_{c}" in obs:
                df[c] = obs[f"{key_added}_{c}"].to_numpy()
        params = adata.uns.get(key_added, {}).get("params", {})
        name = str(params.get("over_clustering", ""))
        col = (f"{key_added}_over_clustering" if f"{key_added}_over_clustering" in obs
               else name if name in obs.columns else None)
        if col is not None:
            df["over_clustering"] = obs[col].astype(str).to_numpy()
    if probabilities_:
        P = probabilities(adata, key_added)
        for c in P.columns:
            df[f"p({c})"] = P[c].to_numpy()
    return df


def _check_confidence(min_confidence: float) -> None:
    if not 0.0 <= min_confidence <= 1.0:
        raise InputError(f"min_confidence must be between 0 and 1, got {min_confidence}")


def _check_overlap(m: ScsnnModel, present: np.ndarray, min_gene_overlap: float,
                   expr: Any = None) -> int:
    from .io import gene_match_hint

    n_present = int(present.sum())
    frac = n_present / m.gene_space.n_genes
    hint = ""
    if frac < 0.9 and expr is not None:
        hint = gene_match_hint(expr.genes, m.gene_space.genes, expr.var, expr.gene_column)
    if frac < min_gene_overlap:
        raise InputError(
            f"query holds {n_present} of the model's {m.gene_space.n_genes} genes "
            f"({frac:.1%}); at least {min_gene_overlap:.0%} are needed "
            + (f"({hint}; or lower --min-gene-overlap)" if hint else
               "(check --gene-symbols, or lower --min-gene-overlap)")
        )
    if frac < 0.9:
        analog = getattr(getattr(m.network, "encoder", None), "analog", True)
        logger.warning(
            "query holds only %d of the model's %d genes (%.1f%%); absent genes %s%s",
            n_present, m.gene_space.n_genes, 100 * frac,
            "are set to the reference mean" if analog else "never fire (as if not detected)",
            f" ({hint})" if hint else ""
        )
    return n_present


def _log_annotated(n: int, kind: str, n_present: int, m: ScsnnModel, labels: pd.Categorical,
                   min_confidence: float, found: str = "") -> None:
    from .io import kind_mismatch

    if found:
        logger.info("query: %s", found)
    mismatch = kind_mismatch(kind, m.gene_space.reference_kind, m.gene_space.target_sum)
    if mismatch is not None:
        logger.log(mismatch[0], "%s", mismatch[1])
    n_un = int((np.asarray(labels) == UNASSIGNED).sum()) if min_confidence > 0 else 0
    logger.info(
        "annotated %d cells (%s input, %d/%d model genes present%s)",
        n, kind, n_present, m.gene_space.n_genes, f", {n_un} unassigned" if n_un else "",
    )
    if n and n_un > UNASSIGNED_WARN_FRACTION * n:
        logger.warning(unassigned_warning(n_un, n, min_confidence))


def unassigned_warning(n_unassigned: int, n_cells: int, min_confidence: float) -> str:
    """The warning given when ``min_confidence`` leaves over half of the cells Unassigned."""
    return (f"{n_unassigned} of {n_cells} cells ({n_unassigned / n_cells:.0%}) are "
            f"{UNASSIGNED}: their top probability is under min_confidence "
            f"{min_confidence:g}; lower it, or check that the model's reference covers this "
            "query's cell types")


def _energy(m: ScsnnModel, counter: SpikeCounter | None, n_cells: int) -> dict[str, Any]:
    """Energy per cell from the counted spikes. An ensemble's members each counted the
    cells (rates and spikes per cell are the members' mean); its energy is that of all K
    networks, against one ANN twin."""
    cfg = m.config
    c = counter
    n_nets = max(int(getattr(cfg, "ensemble", 1)), 1)
    energy = energy_estimate(
        [cfg.n_genes, *cfg.hidden, cfg.n_classes],
        timesteps=cfg.timesteps,
        analog_input=m.network.encoder.analog if c is not None else True,
        spiking=c is not None,
        n_cells=c.n_cells if c is not None else n_cells,
        input_events=c.input_events if c is not None else 0.0,
        layer_spikes=c.layer_spikes if c is not None else (),
        skip=bool(getattr(cfg, "skip", False)),
    )
    if n_nets > 1:
        for key in ("snn_pj_per_cell", "macs_per_cell", "sops_per_cell"):
            energy[key] = energy[key] * n_nets
        energy["ratio_ann_over_snn"] = energy["ann_pj_per_cell"] / energy["snn_pj_per_cell"]
        energy["ensemble"] = n_nets
    out = {k: v for k, v in energy.items() if v is not None}
    out["n_cells"] = int(c.n_cells // n_nets if c is not None else n_cells)
    return out


def _slots(
    m: ScsnnModel,
    pred: Predictions,
    obs_names: pd.Index,
    *,
    key_added: str,
    min_confidence: float,
    early_exit: float | None,
    n_present: int,
    input_kind: str,
    params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The obs columns, obsm entries and ``uns[key_added]`` of an annotation."""
    proba = softmax(pred.logits.astype(np.float64) / m.temperature).astype(np.float32)
    top = proba.argmax(1)
    conf = proba[np.arange(len(top)), top]
    labels = np.asarray(m.classes, dtype=object)[top]
    if min_confidence > 0:
        labels = np.where(conf < min_confidence, UNASSIGNED, labels)
    obs: dict[str, Any] = {
        key_added: _label_categorical(labels, m.classes),
        f"{key_added}_confidence": conf,
    }
    if early_exit is not None:
        obs[f"{key_added}_decision_step"] = pred.decision_step
    # plain arrays (class names in uns[key]["classes"]): they write to .h5ad and .zarr
    # whatever the class names hold, where a DataFrame's columns would become HDF5 paths
    obsm = {
        f"{key_added}_probabilities": np.ascontiguousarray(proba, dtype=np.float32),
        f"{key_added}_step_labels": np.asarray(m.classes, dtype=object)[pred.step_labels],
    }
    frac = n_present / m.gene_space.n_genes
    uns = {
        "energy": _energy(m, pred.counter, len(obs_names)),
        "latency": {
            "timesteps": int(pred.step_labels.shape[1]),
            "early_exit": float(early_exit) if early_exit is not None else 0.0,
            "mean_steps": float(pred.decision_step.mean()) if len(pred.decision_step) else 0.0,
        },
        "params": {
            "min_confidence": float(min_confidence),
            **params,
            "input_kind": input_kind,
            "neuron": m.config.neuron,
            "encoder": m.config.encoder,
            "timesteps": int(m.config.timesteps),
            # majority voting: set by _voting when it is done
            "majority_voting": False,
            "over_clustering": "",
            "over_clustering_resolution": 0.0,
            "majority_min_fraction": 0.0,
        },
        "classes": np.asarray(m.classes, dtype=object),
        "model": m.model_id,
        "gene_overlap": {"n_model_genes": m.gene_space.n_genes, "n_present": n_present,
                         "fraction": float(frac)},
        "version": __version__,
    }
    return obs, obsm, uns


def _label_categorical(labels: Any, classes: Sequence[str]) -> pd.Categorical:
    """Predicted labels as a categorical in model class order, then "Unassigned", with only
    the labels some cell carries (scanpy's group tools refuse empty groups)."""
    cats = [str(c) for c in classes]
    cats += [UNASSIGNED] if UNASSIGNED not in cats else []
    return pd.Categorical(np.asarray(labels, dtype=object), categories=cats
                          ).remove_unused_categories()


def annotate_file(
    path: str | os.PathLike,
    model: ScsnnModel | str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    key_added: str = "scsnn",
    min_confidence: float = 0.0,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    min_gene_overlap: float = 0.5,
    early_exit: float | None = None,
    batch_size: int = 1024,
    chunk_size: int = 65_536,
    chunk: tuple[int, int] | None = None,
    device: str = "auto",
    majority_voting: bool = False,
    over_clustering: str | None = None,
    majority_min_fraction: float = 0.0,
    celltypist_columns: bool = False,
    adapt_batchnorm: bool | str = False,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Annotate an ``.h5ad`` file block by block, with memory bounded by ``chunk_size`` cells.

    The expression matrix is read ``chunk_size`` cells at a time (never whole), and the
    predictions are written into a copy of the file (``output``, or the file itself,
    replaced atomically) without loading ``X``. The result equals :func:`annotate` on the
    loaded AnnData: blocks are cut at multiples of ``batch_size``, so every inference batch
    holds the same cells.

    Parameters
    ----------
    path
        Query ``.h5ad``.
    output
        Where to write; ``None`` updates ``path`` in place (atomically).
    chunk_size
        Cells read per block (rounded up to a multiple of ``batch_size``).
    chunk
        ``(i, n)``: annotate only the ``i``-th (0-based) of ``n`` equal blocks of cells and
        write a predictions-only file (obs with the predictions, obsm, uns; no expression)
        for :func:`gather`. Input kind (counts or log-normalised) is judged on the first
        block of the file, whichever chunk is annotated.
    majority_voting, over_clustering
        Majority voting over the clusters of ``obs[over_clustering]``, a column of the file
        (giving it turns voting on): done from ``obs`` alone once every cell is predicted,
        so memory stays bounded. Computing an over-clustering needs the whole expression
        matrix: use :func:`annotate` on the loaded AnnData (``scsnn annotate
        --majority-voting`` without ``--over-clustering`` does so). A chunk cannot vote (it
        is not the whole query): give the options to :func:`gather`.
    adapt_batchnorm
        Test-time adaptation of the batch-norm statistics to the query (see
        :func:`annotate`): a first pass streams the whole file block by block (memory stays
        bounded) before the prediction pass. Not with ``chunk``: a chunk's own statistics
        would make its predictions depend on the chunking; adapt the model once on the
        whole query instead (:func:`adapt`) and annotate the chunks with the adapted model.
    progress
        A progress bar over the cells on stderr (``None``: when stderr is a terminal).
    Other parameters are those of :func:`annotate`.

    Returns
    -------
    A summary: ``{"n_cells", "output", "labels": {label: count}, "n_unassigned"}``, and
    ``"majority_voting": {label: count}`` with voting. The slots written are those of
    :func:`annotate`.
    """
    from .io import BackgroundCopy, H5adRows, chunk_bounds, kind_action, write_annotations

    m = _as_model(model)
    _check_confidence(min_confidence)
    majority_voting = majority_voting or over_clustering is not None
    _check_voting(majority_min_fraction, None)
    if chunk is not None and (majority_voting or celltypist_columns):
        raise InputError("majority voting and CellTypist columns need the whole query, not "
                         "a chunk: give them to gather (scsnn gather --majority-voting "
                         "--over-clustering KEY)")
    adapt_batchnorm = _check_adapt(adapt_batchnorm)
    if chunk is not None and adapt_batchnorm:
        raise InputError("batch-norm adaptation needs the whole query, not a chunk (each "
                         "chunk would get statistics of its own): adapt the model once on the "
                         "whole query (scsnn adapt QUERY --model M --out M2) and annotate the "
                         "chunks with the adapted model")
    if majority_voting and over_clustering is None:
        raise InputError("majority voting on a file read in blocks needs over_clustering, an "
                         "obs column of the file (e.g. 'leiden'); to compute an "
                         "over-clustering, annotate in memory (scsnn.tl.annotate, or scsnn "
                         "annotate --majority-voting without --over-clustering)")
    if batch_size < 1 or chunk_size < 1:
        raise InputError("batch_size and chunk_size must be positive")
    chunk_size = -(-chunk_size // batch_size) * batch_size
    dest = Path(output) if output is not None else Path(path)
    if dest.is_dir():
        raise InputError(f"cannot write {dest}: it is a directory")
    dev = resolve_device(device)
    seed = int(m.settings.get("seed", 0))
    with contextlib.ExitStack() as stack:
        with H5adRows(path, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols) as rows:
            clusters = (_given_clusters(over_clustering, rows.obs, rows.n_obs, str(path))
                        if majority_voting else None)
            kind = rows.detect_kind(max_rows=chunk_size)
            # the output is a copy of the file: made in the background, while the cells
            # are annotated (not for a chunk, which is written as a file of its own)
            bg = stack.enter_context(BackgroundCopy(path, dest)) if chunk is None else None
            if chunk is None:
                lo, hi = 0, rows.n_obs
            else:
                lo, hi = chunk_bounds(rows.n_obs, chunk[1], chunk[0], align=batch_size)
            present = None
            n_present = 0
            parts: list[Predictions] = []
            counter = SpikeCounter()
            network = (_adapted_network(m, _streamed_batches(m, rows, kind, chunk_size, batch_size,
                                                             min_gene_overlap), dev, seed,
                                        adapt_batchnorm, m.temperature)
                       if adapt_batchnorm else m.network)
            network.to(dev)
            from tqdm.auto import tqdm

            # a bar over the cells: on request, or (progress=None) when stderr is a terminal
            show = progress if progress is not None else sys.stderr.isatty()
            bar = tqdm(total=hi - lo, desc="annotating", unit="cells", unit_scale=True,
                       disable=not show, leave=False)
            def load(a: int, b: int) -> tuple[Any, Any, Any]:
                block = rows.expression(a, b, kind)
                with torch_threads_kept():
                    Xq, present = m.gene_space.project(block)
                # the raw block is kept only where the gene overlap is checked
                return (block if a == lo else None), Xq, present

            # the next block is read and projected in a background thread while the network
            # runs on this one (two blocks in memory at most); the first block is short, so
            # that the network starts soon. Blocks start at multiples of the batch size, so
            # the batches (and predictions) are those of any other cut.
            reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scsnn-read")
            first = min(chunk_size, 8 * batch_size)
            starts = [lo, *range(lo + first, hi, chunk_size)] if hi > lo else []
            stops = [*starts[1:], hi]
            pending = reader.submit(load, starts[0], stops[0]) if starts else None
            try:
                for j, a in enumerate(starts):
                    b = stops[j]
                    block, Xq, present = pending.result()
                    pending = (reader.submit(load, starts[j + 1], stops[j + 1])
                               if j + 1 < len(starts) else None)
                    if not parts:
                        n_present = _check_overlap(m, present, min_gene_overlap, block)
                    pred = predict(network, Xq, m.gene_space, present, batch_size=batch_size,
                                   device=dev, seed=seed, count_spikes=True, early_exit=early_exit,
                                   first_batch=a // batch_size, temperature=m.temperature)
                    counter.merge(pred.counter)
                    parts.append(pred)
                    logger.debug("annotated cells %d-%d of %d", a, b, rows.n_obs)
                    bar.update(b - a)
            finally:
                if pending is not None:
                    pending.cancel()
                reader.shutdown(wait=True)
                bar.close()
                network.to("cpu")
            if not parts:  # an empty chunk: nothing to predict, but a valid (empty) result
                if present is None:
                    _, present = m.gene_space.project(rows.expression(0, 1, kind))
                n_present = int(present.sum())
                T, C = m.config.timesteps, len(m.classes)
                parts.append(Predictions(np.zeros((0, C), np.float32), np.zeros((0, T), np.int32),
                                         np.zeros((0, T), np.float32), np.zeros(0, np.int32), None))
            pred = Predictions(
                np.concatenate([p.logits for p in parts]),
                np.concatenate([p.step_labels for p in parts]),
                np.concatenate([p.step_confidence for p in parts]),
                np.concatenate([p.decision_step for p in parts]),
                counter if counter.n_cells else None,
            )
            obs_all = rows.obs
            n_total = rows.n_obs
            rows_found = (f"{rows.source} holds {rows.detection.found}: "
                          f"{kind_action(kind, m.gene_space.target_sum)}" if rows.detection else "")
        obs_names = obs_all.index[lo:hi]
        obs, obsm, uns = _slots(
            m, pred, obs_names, key_added=key_added, min_confidence=min_confidence,
            early_exit=early_exit, n_present=n_present, input_kind=kind,
            params={"layer": layer or "", "use_raw": bool(use_raw),
                    "gene_symbols": gene_symbols or "", "adapt_batchnorm": _adapt_param(adapt_batchnorm)},
        )
        if chunk is not None:
            uns["chunk"] = {"index": int(chunk[0]), "n_chunks": int(chunk[1]), "start": int(lo),
                            "stop": int(hi), "n_obs_total": int(n_total)}
            part = ad.AnnData(obs=obs_all.iloc[lo:hi].copy())
            for k, v in obs.items():
                part.obs[k] = v
            for k, v in obsm.items():
                part.obsm[k] = v
            part.uns[key_added] = uns
            write_h5ad_atomic(part, dest)
        else:
            if majority_voting:
                obs.update(_voting(obs, obsm, m.classes, clusters, key_added=key_added,
                                   min_fraction=majority_min_fraction, computed=False,
                                   params=uns["params"], name=over_clustering, resolution=0.0))
            if celltypist_columns:
                obs.update(_celltypist(obs, key_added, clusters, over_clustering))
            write_annotations(path, dest, obs=obs, obsm=obsm, uns={key_added: uns},
                              drop_obs=_stale_columns(key_added, early_exit, majority_voting),
                              copy=bg)
        _log_annotated(len(obs_names), kind, n_present, m, obs[key_added], min_confidence,
                       found=rows_found)
        return _summary(obs, key_added, n_cells=int(len(obs_names)), output=str(dest))


def _streamed_batches(m: ScsnnModel, rows: Any, kind: str, chunk_size: int, batch_size: int,
                      min_gene_overlap: float) -> Any:
    """``batches()`` for :func:`_adapted_network` over every cell of an open file, read
    ``chunk_size`` cells at a time (batches cut as the prediction pass cuts them)."""
    absent = "mean" if is_analog(m.network) else "zero"

    def batches():
        for a in range(0, rows.n_obs, chunk_size):
            block = rows.expression(a, min(rows.n_obs, a + chunk_size), kind)
            with torch_threads_kept():
                Xq, present = m.gene_space.project(block)
            if a == 0:
                _check_overlap(m, present, min_gene_overlap, block)
            for s in range(0, Xq.shape[0], batch_size):
                yield m.gene_space.scale(Xq[s : s + batch_size], present, absent=absent)

    return batches


def adapt(
    query: ad.AnnData | str | os.PathLike,
    model: ScsnnModel | str | os.PathLike,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    min_gene_overlap: float = 0.5,
    batch_size: int = 1024,
    chunk_size: int = 65_536,
    device: str = "auto",
    reweighted: bool = False,
) -> ScsnnModel:
    """A copy of the model with its batch-norm statistics adapted to a whole query (AdaBN).

    ``query`` is an AnnData or an ``.h5ad`` path (then read ``chunk_size`` cells at a time,
    memory bounded). Annotating with the returned model equals ``annotate(...,
    adapt_batchnorm=True)`` with the original one, whether the query is annotated whole or
    in chunks (``scsnn annotate --chunk I/N`` with the saved adapted model). The model
    given is not changed; the copy gets a model id of its own and records the adaptation
    in ``settings["adapted_batchnorm"]``. ``reweighted``: as ``adapt_batchnorm="reweighted"``
    of :func:`annotate`.
    """
    import copy

    m = _as_model(model)
    _check_batch_size(batch_size)
    if chunk_size < 1:
        raise InputError("chunk_size must be positive")
    chunk_size = -(-chunk_size // batch_size) * batch_size
    dev = resolve_device(device)
    seed = int(m.settings.get("seed", 0))
    mode = "reweighted" if reweighted else True
    if isinstance(query, ad.AnnData):
        expr = get_expression(query, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
        with torch_threads_kept():
            Xq, present = m.gene_space.project(expr)
        _check_overlap(m, present, min_gene_overlap, expr)
        absent = "mean" if is_analog(m.network) else "zero"
        net = _adapted_network(
            m, lambda: (m.gene_space.scale(Xq[s : s + batch_size], present, absent=absent)
                        for s in range(0, Xq.shape[0], batch_size)), dev, seed, mode,
            m.temperature)
        n_cells, source = int(query.n_obs), ""
    else:
        from .io import H5adRows

        with H5adRows(query, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols) as rows:
            kind = rows.detect_kind(max_rows=chunk_size)
            net = _adapted_network(m, _streamed_batches(m, rows, kind, chunk_size, batch_size,
                                                        min_gene_overlap), dev, seed, mode,
                                   m.temperature)
            n_cells, source = int(rows.n_obs), str(query)
    net.to("cpu").eval()
    settings = copy.deepcopy(m.settings)
    settings["adapted_batchnorm"] = {"from_model": m.model_id, "query": source,
                                     "n_cells": n_cells, "layer": layer or "",
                                     "use_raw": bool(use_raw), "reweighted": bool(reweighted)}
    out = ScsnnModel(m.gene_space, list(m.classes), net, m.config, settings=settings,
                     metrics=copy.deepcopy(m.metrics))
    out.model_id = out.compute_id()
    return out


def _summary(obs: dict[str, Any], key_added: str, **fields: Any) -> dict[str, Any]:
    """What annotate_file and gather return: label counts (and majority-vote counts)."""
    counts = pd.Series(np.asarray(obs[key_added])).value_counts()
    out = {**fields, "labels": {str(k): int(v) for k, v in counts.items() if v > 0},
           "n_unassigned": int(counts.get(UNASSIGNED, 0))}
    mv = f"{key_added}_majority_voting"
    if mv in obs:
        votes = pd.Series(np.asarray(obs[mv])).value_counts()
        out["majority_voting"] = {str(k): int(v) for k, v in votes.items() if v > 0}
    return out


def gather(
    query: str | os.PathLike,
    parts: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    key_added: str = "scsnn",
    majority_voting: bool = False,
    over_clustering: str | None = None,
    majority_min_fraction: float = 0.0,
    celltypist_columns: bool = False,
) -> dict[str, Any]:
    """Write the predictions of chunk files (from :func:`annotate_file` with ``chunk``) into
    a copy of the query ``.h5ad``, as one annotation of the whole query.

    The parts must be the chunks of this query with the same model and settings; they may be
    given in any order, but together they must cover every cell exactly once. The result
    equals a run of :func:`annotate_file` without chunks (energy figures are pooled over the
    chunks' cells), majority voting over ``obs[over_clustering]`` of the query and
    CellTypist columns included (see :func:`annotate_file`).
    """
    from .io import H5adRows, write_annotations

    if not parts:
        raise InputError("no chunk files to gather")
    majority_voting = majority_voting or over_clustering is not None
    _check_voting(majority_min_fraction, None)
    if majority_voting and over_clustering is None:
        raise InputError("majority voting at gather needs over_clustering, an obs column of "
                         "the query (e.g. 'leiden'); to compute an over-clustering, annotate "
                         "the query whole in memory")
    loaded = []
    for path in parts:
        a = read_h5ad(path, allow_empty=True)
        info = a.uns.get(key_added, {})
        if "chunk" not in info:
            raise InputError(f"{path} is not a chunk of an annotation with key '{key_added}' "
                             "(made by scsnn annotate --chunk I/N)")
        loaded.append(a)
    loaded.sort(key=lambda a: int(a.uns[key_added]["chunk"]["start"]))
    first = loaded[0].uns[key_added]
    with H5adRows(query) as rows:
        obs_names = rows.obs_names
        clusters = (_given_clusters(over_clustering, rows.obs, rows.n_obs, str(query))
                    if majority_voting else None)
    n_total = len(obs_names)
    pos = 0
    for a in loaded:
        info = a.uns[key_added]
        ch = info["chunk"]
        if int(ch["n_obs_total"]) != n_total:
            raise InputError(f"a chunk was made from a query of {int(ch['n_obs_total'])} cells, "
                             f"not of this one ({n_total})")
        if str(info["model"]) != str(first["model"]) or dict(info["params"]) != dict(
                first["params"]):
            raise InputError("the chunks were annotated with different models or settings")
        if int(ch["start"]) != pos:
            raise InputError(f"chunks do not cover the query: cells {pos}-{int(ch['start'])} "
                             "are missing or given twice")
        stop = int(ch["stop"])
        if not a.obs_names.equals(obs_names[pos:stop]):
            raise InputError(f"cells {pos}-{stop} of a chunk do not match the query's cells")
        pos = stop
    if pos != n_total:
        raise InputError(f"chunks do not cover the query: cells {pos}-{n_total} are missing")
    obs_keys = [k for k in (key_added, f"{key_added}_confidence", f"{key_added}_decision_step")
                if k in loaded[0].obs.columns]
    obs = {}
    for k in obs_keys:
        values = pd.concat([a.obs[k].astype(object) if k == key_added else a.obs[k]
                            for a in loaded], ignore_index=True)
        # every chunk keeps only the labels it holds: categories from the model's classes
        obs[k] = (_label_categorical(values, [str(c) for c in first["classes"]])
                  if k == key_added else np.asarray(values))
    obsm = {}
    for k in loaded[0].obsm.keys():
        vals = [a.obsm[k] for a in loaded]
        if isinstance(vals[0], pd.DataFrame):
            df = pd.concat(vals)
            df.index = obs_names
            obsm[k] = df
        else:
            obsm[k] = np.concatenate([np.asarray(v) for v in vals])
    uns = _pool_uns([a.uns[key_added] for a in loaded])
    if majority_voting:
        uns["params"] = dict(uns["params"])
        obs.update(_voting(obs, obsm, [str(c) for c in first["classes"]], clusters,
                           key_added=key_added, min_fraction=majority_min_fraction,
                           computed=False, params=uns["params"], name=over_clustering,
                           resolution=0.0))
    if celltypist_columns:
        obs.update(_celltypist(obs, key_added, clusters, over_clustering))
    write_annotations(query, output, obs=obs, obsm=obsm, uns={key_added: uns},
                      drop_obs=_stale_columns(
                          key_added, 1.0 if f"{key_added}_decision_step" in obs else None,
                          majority_voting))
    return _summary(obs, key_added, n_cells=n_total, output=str(output),
                    n_chunks=len(loaded))


def _pool_uns(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``uns[key]`` from those of chunks: per-cell figures averaged over all cells."""
    out = {k: v for k, v in infos[0].items() if k != "chunk"}
    counted = [i for i in infos if int(i["energy"].get("n_cells", 0)) > 0]
    infos = counted or infos[:1]  # chunks without cells say nothing about energy
    n = np.array([int(i["energy"].get("n_cells", 0)) for i in infos], dtype=np.float64)
    total = n.sum()
    w = n / total if total > 0 else np.full(len(infos), 1.0 / len(infos))
    energy = dict(infos[0]["energy"])
    for k in ("snn_pj_per_cell", "ann_pj_per_cell", "macs_per_cell", "sops_per_cell",
              "input_spike_rate"):
        if k in energy:
            energy[k] = float(sum(wi * float(i["energy"][k]) for wi, i in zip(w, infos)))
    if "spike_rate_per_layer" in energy and len(energy["spike_rate_per_layer"]):
        rates = np.array([np.asarray(i["energy"]["spike_rate_per_layer"], dtype=np.float64)
                          for i in infos])
        energy["spike_rate_per_layer"] = (w[:, None] * rates).sum(0)
    snn = float(energy.get("snn_pj_per_cell", 0.0))
    if snn > 0:
        energy["ratio_ann_over_snn"] = float(energy["ann_pj_per_cell"]) / snn
    energy["n_cells"] = int(total)
    out["energy"] = energy
    latency = dict(infos[0]["latency"])
    latency["mean_steps"] = float(sum(wi * float(i["latency"]["mean_steps"])
                                      for wi, i in zip(w, infos)))
    out["latency"] = latency
    return out


def label_summary(adata: ad.AnnData, key_added: str = "scsnn") -> pd.DataFrame:
    """Counts and mean confidence per predicted label."""
    df = pd.DataFrame({"label": adata.obs[key_added],
                       "confidence": adata.obs[f"{key_added}_confidence"]})
    g = df.groupby("label", observed=True)["confidence"]
    return pd.DataFrame({"cells": g.size(), "mean_confidence": g.mean()})

