"""The ``scsnn`` command line: train, annotate (whole or in chunks), adapt, gather, evaluate,
report, summarize, subset, dataset, benchmark, demo.

Exit codes: 0 success, 1 data or runtime error (a one-line message; the traceback only with
``--debug``), 2 usage error.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ._version import __version__


class _Group(TyperGroup):
    """``scsnn CMD --help`` shows CMD's help straight away. (typer coerces every non-flag
    option value through pydantic, a 0.2 s import: the group's own -v/--threads are not
    processed when nothing runs.)"""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if (len(args) > 1 and args[0] in self.commands and "--" not in args
                and not ctx.resilient_parsing
                and any(a in ("-h", "--help") for a in args[1:])):
            self.commands[args[0]].make_context(args[0], list(args[1:]), parent=ctx)
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="scsnn",
    cls=_Group,
    help="Cell-type annotation of scRNA-seq data with a heterogeneous spiking neural network.\n\n"
    "Typical use: scsnn train ref.h5ad --label-key cell_type --out model/ ; "
    "scsnn annotate query.h5ad --model model/ ; "
    "scsnn evaluate query.h5ad --truth-key cell_type --out report/",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain click help: option names never cut at 80 columns (rich's tables cut them), lines
    # up to 120 wide on a wide terminal, switches as --x/--no-x, and no rich import for --help
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

log = logging.getLogger("scsnn")
_state: dict[str, Any] = {"debug": False, "quiet": False}

#: commands that never load torch: --threads sets the variables only
_TORCH_FREE = frozenset({"info", "summarize", "subset"})
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS")


class Encoder(str, Enum):
    direct = "direct"
    rate = "rate"
    latency = "latency"
    rank = "rank"


class Neuron(str, Enum):
    hifi = "hifi"
    lif = "lif"
    plif = "plif"
    sj_lif = "sj-lif"
    sj_plif = "sj-plif"
    ann = "ann"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _setup_logging(verbosity: int) -> None:
    """-q: warnings and errors; default: what was done; -v: debug detail (per-epoch losses);
    -vv: also the warnings of the libraries underneath (torch, scanpy, ...)."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0
                                           else "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if verbosity >= 2:
        return
    # quiet third-party chatter that says nothing about the user's data
    for name in ("torch._library.triton", "torch", "spikingjelly", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Triton.*")


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.BadParameter):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            from .errors import ScsnnError

            if isinstance(exc, ScsnnError):
                msg = str(exc)
            elif isinstance(exc, OSError):
                msg = f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
            else:
                msg = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
            typer.echo(f"error: {' '.join(msg.split())}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"scsnn {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                           help="Show the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, show_default=False,
        help="More messages: -v adds debug detail (per-epoch training losses), -vv also "
        "the warnings of the libraries underneath.")] = 0,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Only warnings and errors; no progress bar.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="CPU threads for torch, BLAS and numba (default: all "
        "cores); set it when several scsnn jobs share a machine.")] = None,
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet
    if threads is not None:
        _set_threads(threads, torch_needed=ctx.invoked_subcommand not in _TORCH_FREE)
    _setup_logging(-1 if quiet else verbose)


def _set_threads(threads: int, *, torch_needed: bool = True) -> None:
    """Thread pools of BLAS (OpenMP, MKL, OpenBLAS), numba and torch. The variables are set
    before any of these libraries loads (nothing heavy is imported before a command runs),
    so their pools start at this size; torch's pool is also set directly."""
    import os

    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    if torch_needed or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def _progress() -> bool | None:
    """Progress bars: never with -q; otherwise when stderr is a terminal (None)."""
    return False if _state["quiet"] else None


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter("give layer widths as comma-separated integers, e.g. 512,128",
                                  param_hint="--hidden") from None
    if not sizes or any(s < 1 for s in sizes):
        raise typer.BadParameter("give at least one positive layer width, e.g. 512,128",
                                  param_hint="--hidden")
    return sizes


LayerOpt = Annotated[str | None, typer.Option("--layer", help="Take expression from this layer.")]
RawOpt = Annotated[bool, typer.Option("--use-raw", help="Take expression from .raw.")]
SymbolsOpt = Annotated[
    str | None, typer.Option("--gene-symbols", help="var column holding gene names to match on.")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute.")]
UsedKeyOpt = Annotated[str, typer.Option(help="Prefix used at annotation.")]
RareOpt = Annotated[float, typer.Option(min=0.0, max=1.0,
                                        help="A class under this fraction of cells is rare.")]
RestrictOpt = Annotated[bool, typer.Option(
    help="Evaluate only cells whose true label is a model class.")]
MajorityOpt = Annotated[bool, typer.Option(
    "--majority-voting", help="Refine the labels as CellTypist does: every cell of a cluster "
    "takes the commonest predicted label of its cluster (obs['KEY_majority_voting'], with "
    "the fraction of the cluster agreeing and its mean probability).")]
OverClusteringOpt = Annotated[str | None, typer.Option(
    "--over-clustering", help="obs column of clusters to vote over (e.g. leiden); implies "
    "--majority-voting. Without it, the query is loaded whole and over-clustered as "
    "CellTypist does (Leiden at a high resolution).")]
MinFractionOpt = Annotated[float, typer.Option(
    "--majority-min-fraction", min=0.0, max=1.0, help="A cluster whose commonest label "
    "holds fewer of its cells is 'Heterogeneous' (CellTypist's min_prop).")]
CelltypistOpt = Annotated[bool, typer.Option(
    "--celltypist-columns", help="Also write CellTypist's obs columns: predicted_labels, "
    "conf_score, majority_voting, over_clustering.")]
CsvOpt = Annotated[Path | None, typer.Option(
    "--csv", help="Also write a per-cell table (cell, predicted_label, confidence, majority "
    "vote...) to this .csv (.tsv: tab-separated).")]
CsvProbOpt = Annotated[bool, typer.Option(
    "--csv-probabilities", help="Add one probability column per class, p(<class>), to "
    "the --csv table.")]


@app.command()
@_guarded
def train(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad.")],
    label_key: Annotated[str, typer.Option("--label-key", "-l", help="obs column with labels.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Model directory to write: model.json (classes, genes, "
        "preprocessing, settings, training metrics) and weights.safetensors.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same model on CPU).")] = 0,
    encoder: Annotated[Encoder, typer.Option(
        help="Input encoding: direct (analog current), rate, latency or rank "
        "(spike trains).")] = Encoder.latency,
    timesteps: Annotated[int, typer.Option("--timesteps", "-T", min=1, max=64,
                                           help="Time steps T.")] = 4,
    rank_n: Annotated[int, typer.Option(min=1, help="Genes that fire per cell with the rank "
                                        "encoder.")] = 128,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum training epochs.")] = 40,
    neuron: Annotated[Neuron, typer.Option(help="Neuron model.")] = Neuron.hifi,
    hidden: Annotated[str, typer.Option(help="Hidden layer widths.")] = "128,32",
    n_hvg: Annotated[int, typer.Option(min=1, help="Highly variable genes to keep.")] = 2000,
    n_markers: Annotated[int, typer.Option(min=0, help="Top marker genes kept per class.")] = 25,
    pair_markers: Annotated[int, typer.Option(
        "--pair-markers", min=0, help="Genes kept per class that best tell it from its "
        "nearest class (one-vs-nearest), on top of the one-vs-rest markers (0: none).")] = 0,
    class_balance: Annotated[float, typer.Option(min=0.0, max=1.0,
                             help="Sampling weight exponent: 0 as in data, 1 balanced.")] = 0.5,
    bilevel: Annotated[bool, typer.Option(
        help="Neuron parameters fitted on their own split (bi-level) or jointly.")] = True,
    autapse: Annotated[bool, typer.Option(help="HIFI self-inhibiting autapse.")] = True,
    heterogeneous: Annotated[bool, typer.Option(
        help="HIFI neuron parameters per neuron, or one value per layer.")] = True,
    smoothness: Annotated[float, typer.Option(min=0.0,
                          help="Weight of the Laplacian smoothness term on neuron parameters.")]
    = 1.0,
    alpha_steps: Annotated[int, typer.Option(min=1, help="Steps of the neuron parameters per "
                                             "upper-level round.")] = 32,
    augment_depth: Annotated[float, typer.Option(
        "--augment-depth", help="Training augmentation of sequencing depth: each training "
        "cell's counts are thinned (binomially) to a fraction drawn from [D, 1]; 0 < D <= 1, "
        "1: off. Needs raw counts in the reference.")] = 1.0,
    augment_gene_noise: Annotated[float, typer.Option(
        "--augment-gene-noise", min=0.0, help="Training augmentation of per-gene batch "
        "effects: every training batch multiplies each gene by a log-normal factor of this "
        "sd (0: off).")] = 0.0,
    logit_adjust: Annotated[float, typer.Option(
        "--logit-adjust", min=0.0, help="Logit-adjusted training loss: tau * log(class "
        "prior) is added to the logits in the loss, so that common classes are not favoured "
        "(0: off; 1: the usual tau).")] = 0.0,
    step_loss: Annotated[float, typer.Option(
        "--step-loss", min=0.0, max=1.0, help="Weight of the per-step loss: the readout after "
        "every time step is trained to decide, not only the last (0: off, 1: per-step loss "
        "only).")] = 0.0,
    online: Annotated[bool, typer.Option(
        help="Online gradients (state detached between steps) instead of full BPTT.")] = False,
    ensemble: Annotated[int, typer.Option(
        "--ensemble", min=1, max=16, help="Train K networks from different seeds and average "
        "their class probabilities (costs K times the training time and the annotation "
        "energy; 1: one network).")] = 1,
    skip: Annotated[bool, typer.Option(
        "--skip/--no-skip", help="Input-to-readout synapses: every input spike also drives the "
        "output layer directly, a linear read of the spike code beside the hidden spiking "
        "layers.")] = True,
    skip_fit: Annotated[str, typer.Option(
        "--skip-fit", help="How the input-to-readout synapses are learnt: 'logreg' (first, by "
        "L2 logistic regression on the spike counts, then held fixed while the hidden "
        "layers train) or 'joint' (from zero, with the other synapses).")] = "logreg",
    skip_class_weight: Annotated[str, typer.Option(
        "--skip-class-weight", help="With --skip-fit logreg: 'none' (every reference cell "
        "counts once) or 'balanced' (every class weighs the same in the fit).")] = "balanced",
    skip_fit_steps: Annotated[int, typer.Option(
        "--skip-fit-steps", min=0, help="With --skip-fit logreg: 0 (scikit-learn's solver at "
        "its default tolerance) or K (K L-BFGS steps from zero, the same synapses "
        "on every machine and library version).")] = 20,
    skip_hidden_gain: Annotated[float, typer.Option(
        "--skip-hidden-gain", min=0.0, max=1.0, help="With --skip-fit logreg: the share of the "
        "hidden layers' correction kept in the readout after training (their output synapses "
        "are scaled by it; 1: all of it, 0: the skip read alone).")] = 0.5,
    min_cells_per_class: Annotated[int, typer.Option(min=1,
                                   help="Drop classes with fewer labelled cells.")] = 1,
    max_cells: Annotated[int | None, typer.Option(
        min=2, help="Train on at most this many cells, read from the file as a class-balanced "
        "sample (small classes whole): memory stays bounded for atlas-sized references.")]
    = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Read the training mini-batches from the file on disk (every labelled "
        "cell can be drawn; memory holds a batch). The gene space is fitted on a "
        "class-balanced sample of --max-cells cells (default 50,000).")] = False,
    layer: LayerOpt = None,
    use_raw: RawOpt = False,
    gene_symbols: SymbolsOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Train a HIFI spiking classifier on a labelled REFERENCE and write the model directory
    (--out) that 'scsnn annotate --model' reads; 'scsnn info' shows what it holds."""
    sizes = _parse_hidden(hidden)
    if not 0.0 < augment_depth <= 1.0:
        raise typer.BadParameter(f"give a fraction in (0, 1], got {augment_depth:g}",
                                 param_hint="--augment-depth")
    from . import distributed, tl
    from .io import read_h5ad

    if not distributed.is_main_process():  # under torchrun only rank 0 logs and saves
        log.setLevel(logging.ERROR)

    _check_train_job(reference, label_key, out, layer, use_raw, max_cells, stream)
    if stream or max_cells is not None:
        from .io import read_h5ad_sample

        sample = max_cells if max_cells is not None else 50_000
        adata = read_h5ad_sample(reference, label_key, sample, seed=seed)
    else:
        adata = read_h5ad(reference)
    settings = tl.configs(
        encoder=encoder.value, timesteps=timesteps, rank_n=rank_n, epochs=epochs,
        neuron=neuron.value, hidden=sizes, n_hvg=n_hvg, n_markers=n_markers,
        class_balance=class_balance, bilevel=bilevel, autapse=autapse,
        heterogeneous=heterogeneous, smoothness=smoothness, alpha_steps=alpha_steps,
        online=online, min_cells_per_class=min_cells_per_class, n_pair_markers=pair_markers,
        augment_depth=augment_depth, augment_gene_noise=augment_gene_noise,
        logit_adjust=logit_adjust, step_loss=step_loss, ensemble=ensemble, skip=skip,
        skip_fit=skip_fit, skip_hidden_gain=skip_hidden_gain,
        skip_class_weight=skip_class_weight, skip_fit_steps=skip_fit_steps,
    )
    model = tl.train(
        adata, label_key, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols, seed=seed,
        device=device.value, stream_from=reference if stream else None,
        progress=_progress(), **settings,
    )
    model.settings["reference"] = str(reference)
    if max_cells is not None:
        model.settings["max_cells"] = int(max_cells)
    if not distributed.is_main_process():
        return
    model.save(out)
    m = model.metrics
    f1 = m.get("select_macro_f1")
    typer.echo(
        f"model {model.model_id[:12]} saved to {out}: {len(model.classes)} classes, "
        f"{model.gene_space.n_genes} genes, {m['train_seconds']:.1f} s, macro-F1 "
        f"{'n/a' if f1 is None else f'{f1:.3f}'} on {m['n_select']} held-out reference cells"
    )


@app.command()
@_guarded
def annotate(
    query: Annotated[Path, typer.Argument(help="Query .h5ad to annotate.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory.")],
    output: Annotated[Path | None, typer.Option("--output", "-o",
                      help="Write here; without it the input file is updated in place "
                           "(atomically).")] = None,
    key_added: Annotated[str, typer.Option(help="Prefix of the obs/obsm/uns slots.")] = "scsnn",
    min_confidence: Annotated[float, typer.Option(min=0.0, max=1.0,
                              help="Below this, cells are 'Unassigned'.")] = 0.0,
    min_gene_overlap: Annotated[float, typer.Option(min=0.0, max=1.0,
                                help="Refuse queries with fewer of the model's genes.")] = 0.5,
    early_exit: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Decide a cell at the first step whose confidence reaches "
        "this value.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Cells per mini-batch.")] = 1024,
    chunk_size: Annotated[int, typer.Option(
        min=1, help="Cells read from the file at a time (memory stays bounded by it).")]
    = 65_536,
    chunk: Annotated[str | None, typer.Option(
        help="I/N: annotate only the I-th of N equal blocks of cells (I from 1) and write a "
        "predictions-only file for 'scsnn gather'.")] = None,
    majority_voting: MajorityOpt = False,
    over_clustering: OverClusteringOpt = None,
    majority_min_fraction: MinFractionOpt = 0.0,
    celltypist_columns: CelltypistOpt = False,
    adapt_batchnorm: Annotated[bool, typer.Option(
        "--adapt-batchnorm", help="Test-time adaptation (AdaBN): a first pass over the whole "
        "query replaces the network's batch-norm statistics with the query's own before "
        "predicting (the model directory is not changed). For a query from another batch, "
        "protocol or condition. Not with --chunk: adapt once with 'scsnn adapt' and "
        "annotate the chunks with the adapted model.")] = False,
    csv: CsvOpt = None,
    csv_probabilities: CsvProbOpt = False,
    layer: LayerOpt = None,
    use_raw: RawOpt = False,
    gene_symbols: SymbolsOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Predict cell types of QUERY and write them into the AnnData.

    The file is read in blocks of --chunk-size cells and the predictions are written into a
    copy of it (or into the file itself, atomically), so a query larger than memory can be
    annotated; the result equals an in-memory run. --majority-voting over an obs column
    (--over-clustering) keeps memory bounded; without one, the query is loaded whole to
    compute an over-clustering.
    """
    from . import tl

    part = _parse_chunk(chunk) if chunk is not None else None
    if part is not None and output is None:
        raise typer.BadParameter("--chunk needs --output (a chunk file is not the query)",
                                 param_hint="--chunk")
    majority_voting = majority_voting or over_clustering is not None
    if part is not None and (majority_voting or celltypist_columns):
        raise typer.BadParameter("majority voting and CellTypist columns need the whole "
                                 "query: give them to 'scsnn gather', not to each chunk",
                                 param_hint="--chunk")
    if part is not None and adapt_batchnorm:
        raise typer.BadParameter("batch-norm adaptation needs the whole query, not a chunk: "
                                 "adapt the model once ('scsnn adapt QUERY --model M --out "
                                 "M2') and annotate the chunks with --model M2",
                                 param_hint="--adapt-batchnorm")
    if csv_probabilities and csv is None:
        raise typer.BadParameter("--csv-probabilities needs --csv PATH",
                                 param_hint="--csv-probabilities")
    dest = output if output is not None else query
    whole = majority_voting and over_clustering is None
    _check_csv(csv, query, dest)
    loaded = _check_annotate_job(query, model, output, key_added, layer, use_raw, part,
                                 chunk_size, batch_size, whole=whole)
    options = dict(key_added=key_added, min_confidence=min_confidence, layer=layer,
                   use_raw=use_raw, gene_symbols=gene_symbols,
                   min_gene_overlap=min_gene_overlap, early_exit=early_exit,
                   batch_size=batch_size, device=device.value,
                   majority_voting=majority_voting, over_clustering=over_clustering,
                   majority_min_fraction=majority_min_fraction,
                   celltypist_columns=celltypist_columns, adapt_batchnorm=adapt_batchnorm)
    if whole:  # the over-clustering needs the whole matrix: an in-memory run
        from .io import read_h5ad, write_h5ad_atomic

        adata = read_h5ad(query)
        tl.annotate(adata, loaded, **options)
        write_h5ad_atomic(adata, dest)
        summary = tl._summary(dict(adata.obs.items()), key_added, n_cells=adata.n_obs,
                              output=str(dest))
    else:
        summary = tl.annotate_file(query, loaded, output=output, chunk_size=chunk_size,
                                   chunk=part, progress=_progress(), **options)
    what = f" (chunk {chunk})" if part is not None else ""
    typer.echo(f"annotated {summary['n_cells']} cells{what} -> {summary['output']} "
               f"(obs['{key_added}'])")
    _echo_summary(summary, key_added, min_confidence)
    if csv is not None:
        _write_csv(csv, dest, key_added, csv_probabilities)


def _echo_summary(summary: dict[str, Any], key_added: str, min_confidence: float) -> None:
    """Label counts, majority-vote counts, and a warning when most cells are Unassigned."""
    from .tl import UNASSIGNED_WARN_FRACTION, unassigned_warning

    for lab, n in sorted(summary["labels"].items(), key=lambda kv: -kv[1]):
        typer.echo(f"  {lab}: {n}")
    if "majority_voting" in summary:
        typer.echo(f"majority voting (obs['{key_added}_majority_voting']):")
        for lab, n in sorted(summary["majority_voting"].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {lab}: {n}")
    n_un, n = summary.get("n_unassigned", 0), summary["n_cells"]
    if n and n_un > UNASSIGNED_WARN_FRACTION * n:
        typer.echo(f"warning: {unassigned_warning(n_un, n, min_confidence)}")


def _check_csv(csv: Path | None, *written: Path) -> None:
    """Refuse, before any work, a table that would replace an .h5ad or cannot be written."""
    if csv is None:
        return
    from .errors import InputError
    from .io import check_writable

    for p in written:
        if p is not None and csv.resolve() == p.resolve():
            raise InputError(f"--csv {csv} would overwrite the .h5ad file: give another path")
    check_writable(csv)


def _write_csv(csv: Path, annotated: Path, key_added: str, probabilities: bool) -> None:
    """The per-cell table of an annotated file, written atomically."""
    from .io import atomic_output
    from .report import read_annotations
    from .tl import predictions_table

    table = predictions_table(read_annotations(annotated, key_added=key_added), key_added,
                              probabilities_=probabilities)
    sep = "\t" if csv.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    with atomic_output(csv) as tmp:
        table.to_csv(tmp, sep=sep, index=False)
    typer.echo(f"table of {len(table)} cells -> {csv}")


def _check_train_job(reference: Path, label_key: str, out: Path, layer: str | None,
                     use_raw: bool, max_cells: int | None, stream: bool) -> None:
    """Refuse, before any work, a model folder that cannot be written and a training job
    whose size (cells x genes x classes, from the file's metadata) exceeds the memory."""
    from .io import check_memory, check_writable, matrix_info, n_labels, train_advice, train_bytes

    check_writable(out, folder=True)
    info = matrix_info(reference, layer=layer, use_raw=use_raw) if reference.is_file() else None
    if info is None:
        return  # the reader will say what is wrong with the file
    sample = max_cells if max_cells is not None else 50_000 if stream else None
    n_cells = info.n_obs if sample is None else min(info.n_obs, sample)
    n_classes = n_labels(reference, label_key) or 1
    check_memory(
        train_bytes(info, n_cells, n_classes),
        f"training on {n_cells:,} cells x {info.n_vars:,} genes ({info.nnz:,} stored values, "
        f"{n_classes} classes) of {reference.name}",
        lambda avail: train_advice(info, n_cells, n_classes, avail,
                                   sampled=sample is not None, stream=stream))


def _check_annotate_job(query: Path, model: Path, output: Path | None, key_added: str,
                        layer: str | None, use_raw: bool, part: tuple[int, int] | None,
                        chunk_size: int, batch_size: int, *, whole: bool = False) -> Any:
    """Refuse, before any work, an output that cannot be written, slot names that would
    not read back, and a job too large for the memory; returns the loaded model. ``whole``:
    the query is loaded whole (an over-clustering is computed on it)."""
    from .bundle import ScsnnModel
    from .io import (
        annotate_advice,
        annotate_bytes,
        check_keys,
        check_memory,
        check_writable,
        matrix_info,
    )

    check_keys(obs=[key_added])
    check_writable(output if output is not None else query)
    m = ScsnnModel.load(model, device="cpu")
    info = matrix_info(query, layer=layer, use_raw=use_raw) if query.is_file() else None
    if info is None:
        return m
    n_cells = info.n_obs if part is None else -(-info.n_obs // part[1])
    block = -(-chunk_size // batch_size) * batch_size
    args = (len(m.genes), len(m.classes), int(m.config.timesteps), batch_size)
    if whole:  # the matrix, a normalised copy, and the dense scaled highly variable genes
        from .io import train_bytes

        need = (annotate_bytes(info, n_cells, n_cells, *args)
                + train_bytes(info, n_cells, 1) + n_cells * min(2000, info.n_vars) * 4 * 3)
        check_memory(need, f"loading {n_cells:,} cells of {query.name} whole to over-cluster "
                     "them for majority voting",
                     "give --over-clustering KEY (an obs column of clusters, e.g. leiden) "
                     "to vote with bounded memory")
        return m
    check_memory(
        annotate_bytes(info, n_cells, block, *args),
        f"annotating {n_cells:,} cells of {query.name} ({info.n_vars:,} genes, "
        f"{len(m.classes)} classes, blocks of {min(block, n_cells):,} cells)",
        lambda avail: annotate_advice(info, n_cells, block, *args, avail))
    return m


def _parse_chunk(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"expected I/N, e.g. 2/8, got '{text}'",
                                 param_hint="--chunk") from None
    if n < 1 or not 1 <= i <= n:
        raise typer.BadParameter(f"chunk {text}: need 1 <= I <= N", param_hint="--chunk")
    return i - 1, n


@app.command()
@_guarded
def gather(
    query: Annotated[Path, typer.Argument(help="The query .h5ad the chunks were cut from.")],
    chunks: Annotated[list[Path], typer.Argument(help="Chunk files from 'scsnn annotate "
                                                      "--chunk I/N'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Annotated .h5ad to write.")],
    key_added: UsedKeyOpt = "scsnn",
    majority_voting: MajorityOpt = False,
    over_clustering: Annotated[str | None, typer.Option(
        "--over-clustering", help="obs column of the query with the clusters to vote over "
        "(e.g. leiden); implies --majority-voting.")] = None,
    majority_min_fraction: MinFractionOpt = 0.0,
    celltypist_columns: CelltypistOpt = False,
    csv: CsvOpt = None,
    csv_probabilities: CsvProbOpt = False,
) -> None:
    """Put the predictions of annotated chunks into one copy of the query."""
    from . import tl

    if csv_probabilities and csv is None:
        raise typer.BadParameter("--csv-probabilities needs --csv PATH",
                                 param_hint="--csv-probabilities")
    _check_csv(csv, query, output)
    summary = tl.gather(query, chunks, output, key_added=key_added,
                        majority_voting=majority_voting, over_clustering=over_clustering,
                        majority_min_fraction=majority_min_fraction,
                        celltypist_columns=celltypist_columns)
    typer.echo(f"gathered {summary['n_chunks']} chunks, {summary['n_cells']} cells -> "
               f"{summary['output']}")
    if "majority_voting" in summary:
        typer.echo(f"majority voting (obs['{key_added}_majority_voting']):")
        for lab, n in sorted(summary["majority_voting"].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {lab}: {n}")
    if csv is not None:
        _write_csv(csv, output, key_added, csv_probabilities)


@app.command()
@_guarded
def adapt(
    query: Annotated[Path, typer.Argument(help="Query .h5ad whose cells the statistics come "
                                          "from (all of them).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (the "
                                      "adapted copy; not the --model directory).")],
    min_gene_overlap: Annotated[float, typer.Option(min=0.0, max=1.0,
                                help="Refuse queries with fewer of the model's genes.")] = 0.5,
    batch_size: Annotated[int, typer.Option(min=1, help="Cells per mini-batch.")] = 1024,
    chunk_size: Annotated[int, typer.Option(
        min=1, help="Cells read from the file at a time (memory stays bounded by it).")]
    = 65_536,
    layer: LayerOpt = None,
    use_raw: RawOpt = False,
    gene_symbols: SymbolsOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """Adapt a model's batch-norm statistics to a whole QUERY (AdaBN) and write the adapted
    copy to --out. Annotating with it equals 'scsnn annotate --adapt-batchnorm' with the
    original model, also chunk by chunk ('scsnn annotate --chunk I/N --model OUT'), so a
    scattered annotation adapts once on the whole query."""
    if out.resolve() == model.resolve():
        raise typer.BadParameter("write the adapted model to a new directory, not over the "
                                 "--model it comes from", param_hint="--out")
    from . import tl
    from .io import check_writable

    check_writable(out, folder=True)
    adapted = tl.adapt(query, model, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols,
                       min_gene_overlap=min_gene_overlap, batch_size=batch_size,
                       chunk_size=chunk_size, device=device.value)
    adapted.save(out)
    n = adapted.settings["adapted_batchnorm"]["n_cells"]
    typer.echo(f"model {adapted.model_id[:12]} (batch norm adapted to {n} cells of "
               f"{query.name}) saved to {out}")


@app.command()
@_guarded
def evaluate(
    annotated: Annotated[Path, typer.Argument(help="Annotated .h5ad (from scsnn annotate).")],
    truth_key: Annotated[str, typer.Option("--truth-key", "-t", help="obs column of true labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json and tables.")],
    key_added: UsedKeyOpt = "scsnn",
    rare_threshold: RareOpt = 0.03,
    restrict_to_model_classes: RestrictOpt = False,
) -> None:
    """Per-cell-type precision, recall and F1 of the predictions, rare types called out."""
    from .evaluate import evaluate as evaluate_predictions
    from .evaluate import format_table
    from .io import read_h5ad

    adata = read_h5ad(annotated)
    report = evaluate_predictions(adata, truth_key, key_added=key_added, rare_threshold=rare_threshold,
                         restrict_to_model_classes=restrict_to_model_classes, out=out)
    typer.echo(format_table(report))
    typer.echo(f"report written to {out}/report.json")


@app.command()
@_guarded
def report(
    annotated: Annotated[Path, typer.Argument(help="Annotated .h5ad (from scsnn annotate).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report.")],
    truth_key: Annotated[str | None, typer.Option(
        "--truth-key", "-t", help="obs column of true labels; adds the evaluation.")] = None,
    sample: Annotated[str | None, typer.Option(
        help="Name of the sample in the report (default: the folder name).")] = None,
    key_added: UsedKeyOpt = "scsnn",
    rare_threshold: RareOpt = 0.03,
    restrict_to_model_classes: RestrictOpt = False,
) -> None:
    """Tables, plots and report.md for one annotated sample (evaluation with --truth-key)."""
    from .report import read_annotations, sample_report

    adata = read_annotations(annotated, key_added=key_added)
    summary = sample_report(adata, out, sample=sample, truth_key=truth_key,
                            key_added=key_added, rare_threshold=rare_threshold,
                            restrict_to_model_classes=restrict_to_model_classes)
    extra = (f", macro-F1 {summary['macro_f1']:.3f}" if "macro_f1" in summary else "")
    typer.echo(f"{summary['sample']}: {summary['n_cells']} cells{extra} -> {out}/report.md")


@app.command()
@_guarded
def summarize(
    reports: Annotated[list[Path], typer.Argument(help="Report folders (from scsnn report).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for summary.md/.tsv.")],
) -> None:
    """One table across samples: cells, accuracy, macro-F1, rare recall, label counts."""
    from .report import summarize as summarize_reports

    table = summarize_reports(reports, out)
    typer.echo(f"{len(table)} samples -> {out}/summary.md")


@app.command()
@_guarded
def subset(
    adata_path: Annotated[Path, typer.Argument(metavar="H5AD", help="Input .h5ad.")],
    obs: Annotated[list[str], typer.Option(
        "--obs", help="COLUMN=VALUE[,VALUE...]: keep cells with one of these values "
        "(repeat for several columns; all must match).")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".h5ad to write.")],
) -> None:
    """Write the cells of H5AD that match obs conditions (e.g. one donor or batch)."""
    from .io import subset_h5ad

    conditions: dict[str, list[str]] = {}
    for item in obs:
        col, sep, values = item.partition("=")
        if not sep or not col or not values:
            raise typer.BadParameter(f"expected COLUMN=VALUE[,VALUE...], got '{item}'",
                                     param_hint="--obs")
        conditions.setdefault(col, []).extend(v for v in values.split(",") if v)
    n = subset_h5ad(adata_path, output, conditions)
    typer.echo(f"wrote {n} cells -> {output}")


@app.command()
@_guarded
def dataset(
    name: Annotated[str, typer.Argument(help="pbmc68k_reduced (ships with scanpy, split into "
                                             "reference.h5ad and query.h5ad) or synthetic.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into.")],
    query_fraction: Annotated[float, typer.Option(
        min=0.05, max=0.95, help="pbmc68k_reduced: fraction of cells in the query.")] = 0.25,
    n_cells: Annotated[int, typer.Option(min=10, help="synthetic: reference cells.")] = 10_000,
    n_query: Annotated[int, typer.Option(min=0, help="synthetic: query cells.")] = 0,
    n_genes: Annotated[int, typer.Option(min=10, help="synthetic: genes.")] = 3000,
    n_types: Annotated[int, typer.Option(min=2, help="synthetic: cell types.")] = 20,
    rare_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.5, help="synthetic: fraction of the rarest type.")] = 0.002,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    sparsity: Annotated[str, typer.Option(
        help="synthetic: 'realistic' (about 19 % non-zero, 1,500 counts per cell, as 10x data "
             "over highly variable genes) or 'dense' (about 44 % non-zero, 5,000 counts per "
             "cell).")] = "realistic",
) -> None:
    """Write a labelled dataset that needs no download (obs['cell_type'] holds the labels)."""
    from . import datasets
    from .errors import InputError

    if name == "pbmc68k_reduced":
        paths = datasets.write_pbmc68k_split(out, query_fraction=query_fraction, seed=seed)
    elif name == "synthetic":
        if sparsity not in ("realistic", "dense"):
            raise typer.BadParameter(f"'{sparsity}': choose realistic or dense",
                                     param_hint="--sparsity")
        counts = datasets.REALISTIC if sparsity == "realistic" else {}
        paths = datasets.write_synthetic(out, n_cells=n_cells, n_query=n_query, n_genes=n_genes,
                                         n_types=n_types, rare_fraction=rare_fraction, seed=seed,
                                         **counts)
    else:
        raise InputError(f"unknown dataset '{name}' (pbmc68k_reduced or synthetic)")
    for p in paths:
        typer.echo(f"wrote {p}")


#: the model directory's format marker and the newest schema this scsnn reads (bundle.py's
#: MODEL_FORMAT / SCHEMA_VERSION, repeated here so that 'scsnn info' needs no torch; a test
#: keeps them equal)
_MODEL_FORMAT = "scsnn-model"
_MODEL_SCHEMA = 2


def _read_model_json(path: Path) -> dict[str, Any]:
    """The model.json of a model directory, checked as ScsnnModel.load checks it (format
    marker, schema version), without torch and without reading the weights."""
    import json

    from .errors import ModelError

    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"not an scsnn model: {path} has no model.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"damaged model: {meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != _MODEL_FORMAT:
        raise ModelError(f"not an scsnn model: {meta_path} has no scsnn format marker")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise ModelError(f"damaged model: {meta_path} has no schema version")
    if version > _MODEL_SCHEMA:
        raise ModelError(f"model schema {version} is newer than this scsnn ({__version__}) "
                         f"reads (schema {_MODEL_SCHEMA}); upgrade scsnn")
    for key, kind in (("classes", list), ("network", dict), ("gene_space", dict)):
        if not isinstance(meta.get(key), kind):
            raise ModelError(f"damaged model: {meta_path} has no {key}")
    return meta


def model_info(path: Path) -> dict[str, Any]:
    """What a model directory holds, from its model.json: classes (with their labelled
    reference cells when recorded), genes, network settings, training metrics, versions."""
    meta = _read_model_json(path)
    net, settings = meta["network"], meta.get("settings") or {}
    metrics = meta.get("metrics") or {}
    counts = metrics.get("class_counts") or {}
    genes = meta["gene_space"].get("genes") or []
    pre = settings.get("preprocess") or {}
    cal = metrics.get("calibration") or {}
    weights = meta.get("weights") or {}
    return {
        "path": str(path),
        "model_id": meta.get("model_id"),
        "format": meta["format"],
        "schema_version": meta["schema_version"],
        "scsnn_version": meta.get("scsnn_version"),
        "created": meta.get("created"),
        "weights": {"file": weights.get("file"),
                    "present": bool(weights.get("file")) and (path / weights["file"]).is_file()},
        "classes": [{"name": str(c), "n_cells": counts.get(str(c))} for c in meta["classes"]],
        "n_genes": len(genes) or net.get("n_genes"),
        "gene_space": {"n_hvg": meta["gene_space"].get("n_hvg", pre.get("n_hvg")),
                       "n_markers_per_class": pre.get("n_markers"),
                       "reference_kind": meta["gene_space"].get("reference_kind")},
        "network": {k: net.get(k) for k in ("neuron", "encoder", "timesteps", "hidden",
                                            "heterogeneous", "autapse", "online", "rank_n",
                                            "ensemble", "skip")
                    if k in net},
        "training": {
            "reference": settings.get("reference"),
            "label_key": settings.get("label_key"),
            "seed": settings.get("seed"),
            "device": settings.get("device"),
            "bilevel": metrics.get("bilevel"),
            "epochs_max": (settings.get("train") or {}).get("epochs"),
            "epochs_run": metrics.get("epochs_run"),
            "best_epoch": metrics.get("best_epoch"),
            "train_seconds": metrics.get("train_seconds"),
            "n_train": metrics.get("n_train"),
            "n_alpha": metrics.get("n_alpha"),
            "n_select": metrics.get("n_select"),
            "select_macro_f1": metrics.get("select_macro_f1"),
            "libraries": metrics.get("libraries"),
        },
        "calibration": {k: cal.get(k) for k in ("temperature", "ece_before", "ece_after",
                                                "n_cells") if k in cal},
        **({"adapted_batchnorm": settings["adapted_batchnorm"]}
           if isinstance(settings.get("adapted_batchnorm"), dict) else {}),
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _format_info(info: dict[str, Any]) -> str:
    net, tr, cal = info["network"], info["training"], info["calibration"]
    lines = [f"scsnn model {str(info['model_id'] or '?')[:12]} ({info['path']})",
             f"  written by     scsnn {info['scsnn_version'] or '?'}, model schema "
             f"{info['schema_version']}" + (f", {info['created']}" if info["created"] else "")]
    if not info["weights"]["present"]:
        lines.append("  weights        MISSING (the model cannot annotate)")
    gs = info["gene_space"]
    detail = ", ".join(x for x in (
        f"{gs['n_hvg']} highly variable" if gs.get("n_hvg") is not None else "",
        f"top {gs['n_markers_per_class']} markers per class"
        if gs.get("n_markers_per_class") else "") if x)
    lines.append(f"  genes          {info['n_genes']}" + (f" ({detail})" if detail else ""))
    hidden = ",".join(str(h) for h in net.get("hidden") or [])
    neuron = str(net.get("neuron", "?"))
    if neuron == "hifi":
        traits = [("heterogeneous" if net.get("heterogeneous") else "homogeneous"),
                  ("autapse" if net.get("autapse") else "no autapse")]
        neuron += f" ({', '.join(traits)})"
    lines.append(f"  network        {neuron} neurons, {net.get('encoder', '?')} encoder, "
                 f"T={net.get('timesteps', '?')}, hidden {hidden or '-'}"
                 + (", online gradients" if net.get("online") else "")
                 + (f", ensemble of {net['ensemble']}" if (net.get("ensemble") or 1) > 1
                    else "")
                 + (", input-to-readout synapses" if net.get("skip") else ""))
    if tr.get("reference") or tr.get("label_key"):
        lines.append(f"  reference      {tr.get('reference') or '?'} "
                     f"(labels: obs['{tr.get('label_key') or '?'}'])")
    split = "/".join(_fmt(tr.get(k), "d") for k in ("n_train", "n_alpha", "n_select"))
    lines.append(f"  training       {_fmt(tr['epochs_run'], 'd')} epochs run"
                 f" (best {_fmt(tr['best_epoch'], 'd')}, at most {_fmt(tr['epochs_max'], 'd')}),"
                 f" {_fmt(tr['train_seconds'], '.1f')} s, cells train/alpha/select {split}"
                 + ("" if tr.get("bilevel") is None else
                    f", {'bi-level' if tr['bilevel'] else 'joint'}"))
    lines.append(f"  selection      macro-F1 {_fmt(tr['select_macro_f1'])} on "
                 f"{_fmt(tr.get('n_select'), 'd')} held-out reference cells")
    libs = tr.get("libraries")
    if isinstance(libs, dict) and libs:
        lines.append("  trained with   " + ", ".join(
            f"{name} {ver}" for name, ver in libs.items() if ver and name != "scsnn"))
    if cal:
        lines.append(f"  calibration    ECE {_fmt(cal.get('ece_before'))} -> "
                     f"{_fmt(cal.get('ece_after'))} (temperature "
                     f"{_fmt(cal.get('temperature'))}, {_fmt(cal.get('n_cells'), 'd')} cells)")
    ada = info.get("adapted_batchnorm")
    if ada:
        lines.append(f"  batch norm     adapted to {_fmt(ada.get('n_cells'), 'd')} cells of "
                     f"{ada.get('query') or 'a query'} (from model "
                     f"{str(ada.get('from_model') or '?')[:12]})")
    classes = info["classes"]
    with_counts = any(c["n_cells"] is not None for c in classes)
    lines.append(f"  classes        {len(classes)}"
                 + (" (labelled reference cells)" if with_counts else ""))
    width = max((len(c["name"]) for c in classes), default=0)
    for c in classes:
        n = "" if c["n_cells"] is None else f"{c['n_cells']:>8}"
        lines.append(f"    {c['name']:<{width}}{n}".rstrip())
    return "\n".join(lines)


@app.command()
@_guarded
def info(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model directory (from "
                                          "scsnn train).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the information as JSON.")]
    = False,
) -> None:
    """Show what a model holds: classes and their training cells, genes, network settings,
    training and calibration metrics, versions. Reads model.json only (fast, no torch)."""
    summary = model_info(model)
    if as_json:
        import json

        typer.echo(json.dumps(summary, indent=1))
    else:
        typer.echo(_format_info(summary))


@app.command()
@_guarded
def benchmark(
    reference: Annotated[Path, typer.Argument(help="Labelled .h5ad (reference, or the file "
                                                   "to cross-validate on).")],
    label_key: Annotated[str, typer.Option("--label-key", "-l", help="obs column with labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for benchmark.md/.json.")],
    query: Annotated[Path | None, typer.Option("--query", "-q",
                     help="Labelled query .h5ad; without it, k-fold cross-validation.")] = None,
    query_label_key: Annotated[str | None, typer.Option(
        help="obs column with the query's labels (default: --label-key).")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds of the cross-validation.")] = 5,
    methods: Annotated[str, typer.Option(
        help="Comma-separated: hifi, lif, plif, ann, logreg, logreg-balanced, celltypist, "
        "sj-lif, sj-plif (SpikingJelly's own nodes), hifi-no-autapse, hifi-homogeneous, "
        "hifi-joint, hifi-no-smoothness, hifi-online.")] = "hifi,lif,plif,ann,logreg,celltypist",
    shared_labels: Annotated[bool, typer.Option(
        help="Reference/query: keep only the labels both hold.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed of the cross-validation folds.")] = 0,
    seeds: Annotated[str, typer.Option(
        help="Comma-separated training seeds: every method is trained once per seed and the "
        "table shows mean ± sd over them.")] = "0",
    encoder: Annotated[Encoder, typer.Option(help="Input encoding of the scsnn networks.")]
    = Encoder.latency,
    timesteps: Annotated[int, typer.Option("--timesteps", "-T", min=1, max=64,
                                           help="Time steps T.")] = 4,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum training epochs.")] = 40,
    rare_threshold: RareOpt = 0.03,
    device: DeviceOpt = Device.auto,
) -> None:
    """Compare HIFI with LIF, PLIF, the ANN twin, logistic regression and CellTypist."""
    import json

    from . import benchmark as bm
    from .errors import InputError
    from .io import read_h5ad

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    ref = read_h5ad(reference)
    if label_key not in ref.obs:
        raise InputError(f"label key '{label_key}' not in obs of {reference}")
    ref = ref[ref.obs[label_key].notna().to_numpy()].copy()
    if query is None:
        splits = list(bm.cv_splits(ref, label_key, folds, seed))
        what = f"{len(splits)}-fold cross-validation on {reference.name}"
    else:
        q = read_h5ad(query)
        qkey = query_label_key or label_key
        if qkey not in q.obs:
            raise InputError(f"label key '{qkey}' not in obs of {query}")
        q = q[q.obs[qkey].notna().to_numpy()].copy()
        q.obs[label_key] = q.obs[qkey].astype(str)
        if shared_labels:
            both = set(ref.obs[label_key].astype(str)) & set(q.obs[label_key])
            if not both:
                raise InputError("reference and query share no label")
            ref = ref[ref.obs[label_key].astype(str).isin(both).to_numpy()].copy()
            q = q[q.obs[label_key].isin(both).to_numpy()].copy()
        splits = [bm.pair_split(ref, q, label_key)]
        what = f"{reference.name} -> {query.name}"
    kw = {"encoder": encoder.value, "timesteps": timesteps, "epochs": epochs,
          "device": device.value}
    try:
        train_seeds = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("give training seeds as comma-separated integers, e.g. 0,1,2",
                                  param_hint="--seeds") from None
    result = bm.run(splits, label_key, methods=chosen, seeds=train_seeds or [0],
                    rare_threshold=rare_threshold, train_kwargs=kw)
    for row in result["rows"]:  # per-cell labels are summarised, not written out
        row.pop("truth", None)
        row.pop("pred", None)
    result.update(what=what, settings=kw | {"seed": seed, "seeds": train_seeds,
                                            "methods": chosen})
    table = bm.markdown(result, what)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps(result, indent=1, default=str))
    typer.echo(table)
    typer.echo(f"written to {out}/benchmark.md and benchmark.json")


@app.command()
@_guarded
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model and results.")]
    = Path("scsnn-demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum training epochs.")] = 40,
    device: DeviceOpt = Device.auto,
) -> None:
    """Train, annotate and evaluate on the PBMC data that ship with scanpy (700 cells)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from . import datasets, tl
    from .evaluate import evaluate as evaluate_predictions
    from .evaluate import format_table
    from .io import write_h5ad_atomic

    adata = datasets.pbmc68k_reduced()
    idx = np.arange(adata.n_obs)
    tr, te = train_test_split(idx, test_size=0.25, stratify=adata.obs["cell_type"],
                              random_state=seed)
    ref, query = adata[tr].copy(), adata[te].copy()
    typer.echo(f"pbmc68k_reduced: {len(tr)} reference cells, {len(te)} query cells, "
               f"{adata.obs['cell_type'].nunique()} cell types")
    model = tl.train(ref, "cell_type", seed=seed, device=device.value,
                     progress=_progress(), **tl.configs(epochs=epochs))
    model.save(out / "model")
    query.obs["true_cell_type"] = query.obs["cell_type"]
    tl.annotate(query, model, device=device.value)
    write_h5ad_atomic(query, out / "query_annotated.h5ad")
    report = evaluate_predictions(query, "true_cell_type", out=out / "evaluation")
    typer.echo(format_table(report))
    typer.echo(f"model: {out / 'model'}; annotated query: {out / 'query_annotated.h5ad'}; "
               f"report: {out / 'evaluation' / 'report.json'}")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
