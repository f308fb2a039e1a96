"""Scanpy-style tools: :func:`train` a model on a labelled AnnData, :func:`annotate` a query."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from . import distributed
from ._version import __version__
from .errors import InputError
from .evaluate import energy_estimate
from .io import get_expression, get_labels, read_h5ad, write_h5ad_atomic
from .bundle import ScsnnModel, predict
from .encoding import ENCODERS
from .models import (
    NETWORKS,
    NetworkConfig,
    Predictions,
    SpikeCounter,
    build_network,
    resolve_device,
    softmax,
    torch_threads_kept,
)
from .pp import PreprocessConfig, ScaledCells, fit_gene_space
from .training import BiLevelTrainer, TrainConfig

logger = logging.getLogger("scsnn")

UNASSIGNED = "Unassigned"


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
                               timesteps=int(ncfg.timesteps))
    try:
        net = build_network(ncfg, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    _fit_encoder(net, gs, Xsel, seed)
    # every cell's total count, for the thinning augmentation (raw counts only)
    library = (np.asarray(expr.X.sum(axis=1), dtype=np.float64).ravel()
               if expr.kind == "counts" and tcfg.augment_depth < 1.0 else None)
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
            net, metrics = BiLevelTrainer(tcfg, dev).fit(net, cells, codes, len(classes))
    finally:
        if source is not None:
            source.close()
    net.to("cpu")
    metrics["class_counts"] = {c: int(counts[c]) for c in classes}
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
    _check_confidence(min_confidence)
    if copy:
        adata = adata.copy()
    expr = get_expression(adata, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    with torch_threads_kept():
        Xq, present = m.gene_space.project(expr)
    n_present = _check_overlap(m, present, min_gene_overlap, expr)
    dev = resolve_device(device)
    m.network.to(dev)
    try:
        pred = predict(m.network, Xq, m.gene_space, present, batch_size=batch_size, device=dev,
                       seed=int(m.settings.get("seed", 0)), count_spikes=True,
                       early_exit=early_exit, temperature=m.temperature)
    finally:
        m.network.to("cpu")
    obs, obsm, uns = _slots(
        m, pred, adata.obs_names, key_added=key_added, min_confidence=min_confidence,
        early_exit=early_exit, n_present=n_present, input_kind=expr.kind,
        params={"layer": layer or "", "use_raw": bool(use_raw),
                "gene_symbols": gene_symbols or ""},
    )
    for k, v in obs.items():
        adata.obs[k] = v
    for k, v in obsm.items():
        adata.obsm[k] = v
    adata.uns[key_added] = uns
    _log_annotated(adata.n_obs, expr.kind, n_present, m, obs[key_added], min_confidence,
                   found=expr.describe(m.gene_space.target_sum))
    return adata if copy else None


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


def _energy(m: ScsnnModel, counter: SpikeCounter | None, n_cells: int) -> dict[str, Any]:
    cfg = m.config
    c = counter
    energy = energy_estimate(
        [cfg.n_genes, *cfg.hidden, cfg.n_classes],
        timesteps=cfg.timesteps,
        analog_input=m.network.encoder.analog if c is not None else True,
        spiking=c is not None,
        n_cells=c.n_cells if c is not None else n_cells,
        input_events=c.input_events if c is not None else 0.0,
        layer_spikes=c.layer_spikes if c is not None else (),
    )
    out = {k: v for k, v in energy.items() if v is not None}
    out["n_cells"] = int(c.n_cells if c is not None else n_cells)
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
    cats = list(m.classes) + ([UNASSIGNED] if UNASSIGNED not in m.classes else [])
    obs: dict[str, Any] = {
        key_added: pd.Categorical(labels, categories=cats),
        f"{key_added}_confidence": conf,
    }
    if early_exit is not None:
        obs[f"{key_added}_decision_step"] = pred.decision_step
    obsm = {
        f"{key_added}_probabilities": pd.DataFrame(
            proba, index=obs_names, columns=[str(c) for c in m.classes]
        ),
        f"{key_added}_step_labels": pred.step_labels,
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
        },
        "classes": np.asarray(m.classes, dtype=object),
        "model": m.model_id,
        "gene_overlap": {"n_model_genes": m.gene_space.n_genes, "n_present": n_present,
                         "fraction": float(frac)},
        "version": __version__,
    }
    return obs, obsm, uns


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
    Other parameters are those of :func:`annotate`.

    Returns
    -------
    A summary: ``{"n_cells", "output", "labels": {label: count}}``. The slots written are
    those of :func:`annotate`.
    """
    from .io import H5adRows, chunk_bounds, kind_action, write_annotations

    m = _as_model(model)
    _check_confidence(min_confidence)
    if batch_size < 1 or chunk_size < 1:
        raise InputError("batch_size and chunk_size must be positive")
    chunk_size = -(-chunk_size // batch_size) * batch_size
    dest = Path(output) if output is not None else Path(path)
    if dest.is_dir():
        raise InputError(f"cannot write {dest}: it is a directory")
    dev = resolve_device(device)
    seed = int(m.settings.get("seed", 0))
    with H5adRows(path, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols) as rows:
        kind = rows.detect_kind(max_rows=chunk_size)
        if chunk is None:
            lo, hi = 0, rows.n_obs
        else:
            lo, hi = chunk_bounds(rows.n_obs, chunk[1], chunk[0], align=batch_size)
        present = None
        n_present = 0
        parts: list[Predictions] = []
        counter = SpikeCounter()
        m.network.to(dev)
        try:
            for a in range(lo, hi, chunk_size):
                b = min(hi, a + chunk_size)
                block = rows.expression(a, b, kind)
                with torch_threads_kept():
                    Xq, present = m.gene_space.project(block)
                if not parts:
                    n_present = _check_overlap(m, present, min_gene_overlap, block)
                pred = predict(m.network, Xq, m.gene_space, present, batch_size=batch_size,
                               device=dev, seed=seed, count_spikes=True, early_exit=early_exit,
                               first_batch=a // batch_size, temperature=m.temperature)
                counter.merge(pred.counter)
                parts.append(pred)
                logger.debug("annotated cells %d-%d of %d", a, b, rows.n_obs)
        finally:
            m.network.to("cpu")
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
                "gene_symbols": gene_symbols or ""},
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
        write_annotations(path, dest, obs=obs, obsm=obsm, uns={key_added: uns},
                          drop_obs=() if early_exit is not None
                          else (f"{key_added}_decision_step",))
    _log_annotated(len(obs_names), kind, n_present, m, obs[key_added], min_confidence,
                   found=rows_found)
    counts = pd.Series(np.asarray(obs[key_added])).value_counts()
    return {"n_cells": int(len(obs_names)), "output": str(dest),
            "labels": {str(k): int(v) for k, v in counts.items() if v > 0}}


def gather(
    query: str | os.PathLike,
    parts: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    key_added: str = "scsnn",
) -> dict[str, Any]:
    """Write the predictions of chunk files (from :func:`annotate_file` with ``chunk``) into
    a copy of the query ``.h5ad``, as one annotation of the whole query.

    The parts must be the chunks of this query with the same model and settings; they may be
    given in any order, but together they must cover every cell exactly once. The result
    equals a run of :func:`annotate_file` without chunks (energy figures are pooled over the
    chunks' cells).
    """
    from .io import H5adRows, write_annotations

    if not parts:
        raise InputError("no chunk files to gather")
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
        values = pd.concat([a.obs[k] for a in loaded], ignore_index=True)
        if k == key_added:
            values = pd.Categorical(values.astype(object),
                                    categories=loaded[0].obs[k].cat.categories)
        obs[k] = np.asarray(values) if k != key_added else values
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
    write_annotations(query, output, obs=obs, obsm=obsm, uns={key_added: uns},
                      drop_obs=() if f"{key_added}_decision_step" in obs
                      else (f"{key_added}_decision_step",))
    counts = pd.Series(np.asarray(obs[key_added])).value_counts()
    return {"n_cells": n_total, "output": str(output), "n_chunks": len(loaded),
            "labels": {str(k): int(v) for k, v in counts.items() if v > 0}}


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

