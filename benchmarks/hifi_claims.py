"""The HIFI claims, measured: ``scsnn.benchmark`` on every real pairing in ../shared/data.

    python benchmarks/hifi_claims.py --table main --out docs/benchmark_results/claims
    python benchmarks/hifi_claims.py --table ablation --out docs/benchmark_results/claims
    python benchmarks/hifi_claims.py --table encoders --out docs/benchmark_results/claims
    python benchmarks/hifi_claims.py --report --out docs/benchmark_results/claims
    python benchmarks/hifi_claims.py --variant hifi-aug:augment_depth=0.3 \
        --tasks pbmc_kang,tumour --out docs/benchmark_results/claims

Tables:

* ``main``: HIFI, the fair LIF and PLIF (the same layer with frozen, shared parameters; PLIF
  with one learnable leak per layer), the ANN twin, logistic regression (plain and
  class-balanced) and CellTypist on all 12 tasks;
* ``ablation``: HIFI without the autapse, homogeneous (one value per layer), trained jointly
  (no bi-level), without smoothness, on the six ablation tasks (the three PBMC ones among them);
* ``encoders``: HIFI with the direct, rate, latency and rank encoders on all 12 tasks, at the
  same T.

``--variant NAME:key=value,...`` (repeatable) runs HIFI with other settings (flat names of
:func:`scsnn.tl.configs`) beside the stored rows, on ``--tasks`` (default: all); alone, it
runs no table. ``adapt_batchnorm=1`` (or ``reweighted``) annotates each query with test-time
adaptation of batch norm (:func:`scsnn.tl.annotate`); ``adapt_batchnorm=both`` scores every
trained network without and with it, the adapted rows named ``NAME+adabn``, and ``all`` also
with the re-weighted adaptation (``NAME+adabn-rw``). The report adds a ``variants``
table: each variant beside HIFI's default and the baselines, with rare-class recall.

Every (task, method, encoder, seed) is one job; jobs run in ``--jobs`` processes with one
torch thread each, and each finished job is appended to ``<out>/rows.jsonl``, so an
interrupted run resumes where it stopped. ``--report`` (also run after every table) writes
``<out>/<table>.md`` and ``<out>/summary.json`` from all rows present: per task mean ± sd over
the seeds, and the tally of wins and ties (a difference smaller than the larger standard
deviation is a tie). Labels: ``obs["cell_type"]`` unless the task says otherwise
(``cell_type_common`` for cross-study PBMC pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TABLES: dict[str, dict[str, Any]] = {
    "main": {"methods": ["hifi", "lif", "plif", "ann", "logreg", "logreg-balanced",
                         "celltypist"], "tasks": None, "encoders": [None]},
    "ablation": {"methods": ["hifi", "hifi-no-autapse", "hifi-homogeneous", "hifi-joint",
                             "hifi-no-smoothness"],
                 "tasks": ["pbmc68k", "pbmc3k", "pbmc_3batch", "pbmc_kang",
                           "lymphnode_pbmc3k", "pancreas_baron"],
                 "encoders": [None]},
    "encoders": {"methods": ["hifi"], "tasks": None,
                 "encoders": ["direct", "rate", "latency", "rank"]},
}
#: methods whose result does not depend on the encoder
_NO_ENCODER = ("logreg", "logreg-balanced", "celltypist")


def _read(d: Path, name: str):
    import anndata as ad

    return ad.read_h5ad(d / f"{name}.h5ad")


def _by_obs(a, key: str, ref: set[str], query: set[str]):
    v = a.obs[key].astype(str)
    return a[v.isin(ref).to_numpy()].copy(), a[v.isin(query).to_numpy()].copy()


def _shared_labels(ref, query, label: str):
    both = set(ref.obs[label].astype(str)) & set(query.obs[label].astype(str))
    keep = lambda a: a[a.obs[label].astype(str).isin(both).to_numpy()].copy()  # noqa: E731
    return keep(ref), keep(query)


def _pair(ref, query, label: str, shared: bool = True) -> list:
    from scsnn import benchmark as bm

    if shared:
        ref, query = _shared_labels(ref, query, label)
    return [bm.pair_split(ref, query, label)]


def tasks(d: Path, folds: int, seed: int) -> dict[str, tuple[str, str, Callable[[], Iterator]]]:
    """name -> (description, label key, splits)."""
    from scsnn import benchmark as bm

    cv = lambda name, label="cell_type": lambda: bm.cv_splits(  # noqa: E731
        _read(d, name), label, folds, seed)
    return {
        "pbmc68k": ("pbmc68k_reduced, 5-fold CV", "cell_type", cv("pbmc68k_reduced")),
        "pbmc3k": ("pbmc3k, 5-fold CV", "cell_type", cv("pbmc3k")),
        "pbmc_3batch": ("pbmc_3batch 3'v1+3'v2 -> 5' (cross-chemistry)", "cell_type",
                        lambda: _pair(*_by_obs(_read(d, "pbmc_3batch"), "donor",
                                               {"3pv1", "3pv2"}, {"5p"}), "cell_type")),
        "pbmc_kang": ("pbmc_kang control -> IFN-beta stimulated", "cell_type",
                      lambda: _pair(*_by_obs(_read(d, "pbmc_kang"), "condition",
                                             {"ctrl"}, {"stim"}), "cell_type")),
        "pbmc3k_facs": ("pbmc3k -> pbmc_facs800 (FACS-sorted), common labels",
                        "cell_type_common",
                        lambda: _pair(_read(d, "pbmc3k"), _read(d, "pbmc_facs800"),
                                      "cell_type_common")),
        "lymphnode_pbmc3k": ("immune_lymphnode_ref -> pbmc3k (cross-study), common labels",
                             "cell_type_common",
                             lambda: _pair(_read(d, "immune_lymphnode_ref"), _read(d, "pbmc3k"),
                                           "cell_type_common")),
        "pancreas": ("pancreas Wang -> Xin, shared labels", "cell_type",
                     lambda: _pair(_read(d, "pancreas_wang"), _read(d, "pancreas_xin"),
                                   "cell_type")),
        "pancreas_baron": ("pancreas Baron human -> mouse", "cell_type",
                           lambda: _pair(*_by_obs(_read(d, "pancreas_baron_hs_mm"), "species",
                                                  {"human"}, {"mouse"}), "cell_type")),
        "celllines": ("cell lines CEL-seq2 -> Drop-seq (cross-platform)", "cell_type",
                      lambda: _pair(_read(d, "celllines3_celseq2"),
                                    _read(d, "celllines3_dropseq"), "cell_type")),
        "tumour": ("HNSCC (Puram) -> melanoma (Tirosh); query labels are CHETAH calls",
                   "cell_type",
                   lambda: _pair(_read(d, "hnscc_puram_ref"), _read(d, "melanoma_tirosh_query"),
                                 "cell_type")),
        "brain_cerebellum": ("mouse cerebellum (Saunders), 5-fold CV", "cell_type",
                             cv("brain_cerebellum_saunders")),
        "brain_hippocampus": ("mouse hippocampus (Saunders), 5-fold CV", "cell_type",
                              cv("brain_hippocampus_saunders")),
    }


# -- jobs ------------------------------------------------------------------------------------
def _init_worker() -> None:
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("scsnn").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)


def _key(task: str, method: str, encoder: str | None, seed: int) -> str:
    return f"{task}|{method}|{encoder or '-'}|{seed}"


def run_job(data_dir: str, folds: int, task: str, method: str, encoder: str | None, seed: int,
            settings: dict[str, Any], name: str | None = None,
            variant: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One method (or the variant ``name``: HIFI with the ``variant`` settings), one encoder,
    one seed on every split of one task; one record (two with ``adapt_batchnorm=both``)."""
    from scsnn import benchmark as bm

    desc, label, make = tasks(Path(data_dir), folds, 0)[task]
    kw = dict(settings, device="cpu", **(variant or {}))
    if encoder is not None:
        kw["encoder"] = encoder
    name = name or method
    t0 = time.perf_counter()
    res = bm.run(list(make()), label, methods=[method], seeds=[seed], train_kwargs=kw)
    wall = time.perf_counter() - t0
    recs = []
    for suffix in ("", "+adabn", "+adabn-rw"):
        rows = [dict(r, method=name + suffix) for r in res["rows"]
                if r["method"] == method + suffix]
        if rows:
            recs.append({"key": _key(task, name + suffix, encoder, seed), "task": task,
                         "what": desc, "method": name + suffix, "encoder": encoder,
                         "seed": seed, "settings": variant or {}, "rows": rows,
                         "celltypist": res["celltypist"], "versions": res.get("versions"),
                         "wall_seconds": wall})
    return recs


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` -> (NAME, settings); values are read as JSON where they
    parse (numbers, true/false, lists such as ``hidden=[256,64]``), else kept as strings."""
    name, _, spec = text.partition(":")
    if not name or name in TABLES["main"]["methods"] or "|" in name:
        raise SystemExit(f"--variant {text!r}: give a new name before the colon")
    settings: dict[str, Any] = {}
    for kv in filter(None, re.split(r",(?![^\[]*\])", spec)):  # commas inside [...] kept
        k, eq, val = kv.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {kv!r} is not key=value")
        try:
            settings[k] = json.loads(val)
        except ValueError:
            settings[k] = val
    flat = {k: v for k, v in settings.items() if k != "adapt_batchnorm"}
    from scsnn import tl

    try:
        tl.configs(**flat)  # an unknown name or a bad value fails here, before any job runs
    except Exception as exc:
        raise SystemExit(f"--variant {text!r}: {exc}") from None
    if settings.get("adapt_batchnorm") not in (None, 0, 1, True, False, "reweighted", "both",
                                               "all"):
        raise SystemExit(f"--variant {text!r}: adapt_batchnorm is 0, 1, reweighted, both or "
                         "all")
    return name, settings


def _done(rows_file: Path) -> set[str]:
    if not rows_file.is_file():
        return set()
    return {json.loads(line)["key"] for line in rows_file.read_text().splitlines() if line}


def run_table(table: str, args: argparse.Namespace) -> None:
    spec = TABLES[table]
    names = args.tasks.split(",") if args.tasks else (spec["tasks"] or list(tasks(
        args.data_dir, args.folds, 0)))
    seeds = [int(s) for s in args.seeds.split(",")]
    encoders = spec["encoders"] if spec["encoders"] != [None] else [None]
    rows_file = args.out / "rows.jsonl"
    done = _done(rows_file)
    jobs = []
    for task in names:
        for method in spec["methods"]:
            for enc in encoders:
                enc_used = None if method in _NO_ENCODER else (enc or args.encoder)
                for seed in seeds:
                    key = _key(task, method, enc_used, seed)
                    if key not in done and key not in {j[-1] for j in jobs}:
                        jobs.append((task, method, enc_used, seed, key))
    print(f"table {table}: {len(jobs)} jobs to run ({len(done)} rows already in {rows_file})",
          flush=True)
    _run_jobs([(t, m, e, s, None, None) for t, m, e, s, _ in jobs], args)


def run_variants(args: argparse.Namespace) -> None:
    names = args.tasks.split(",") if args.tasks else list(tasks(args.data_dir, args.folds, 0))
    seeds = [int(s) for s in args.seeds.split(",")]
    done = _done(args.out / "rows.jsonl")
    jobs = []
    for name, settings in (parse_variant(v) for v in args.variant):
        enc = settings.get("encoder", args.encoder)  # a variant may set its own encoder
        for task in names:
            for seed in seeds:
                keys = [_key(task, name, enc, seed)]
                extra = {"both": ["+adabn"], "all": ["+adabn", "+adabn-rw"]}.get(
                    settings.get("adapt_batchnorm"), [])
                keys += [_key(task, name + x, enc, seed) for x in extra]
                if not all(k in done for k in keys):
                    jobs.append((task, "hifi", enc, seed, name, settings))
    print(f"variants: {len(jobs)} jobs to run", flush=True)
    _run_jobs(jobs, args)


def _run_jobs(jobs: list[tuple], args: argparse.Namespace) -> None:
    rows_file = args.out / "rows.jsonl"
    done = _done(rows_file)
    settings = {"timesteps": args.timesteps, "epochs": args.epochs}
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        futures = [pool.submit(run_job, str(args.data_dir), args.folds, t, m, e, s, settings,
                               name, variant) for t, m, e, s, name, variant in jobs]
        for fut in as_completed(futures):
            for rec in fut.result():
                if rec["key"] in done:  # a stored row that this job measured again
                    continue
                done.add(rec["key"])
                with rows_file.open("a") as f:
                    f.write(json.dumps(rec, default=str) + "\n")
                f1 = [r.get("macro_f1") for r in rec["rows"] if r.get("macro_f1") is not None]
                print(f"{rec['key']}: macro-F1 {sum(f1) / len(f1) if f1 else float('nan'):.3f} "
                      f"({rec['wall_seconds']:.0f} s)", flush=True)


# -- report ----------------------------------------------------------------------------------
def _load(rows_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in rows_file.read_text().splitlines() if line]


def summaries(records: list[dict[str, Any]], default_encoder: str) -> dict[str, Any]:
    """task -> variant ("method" or "method@encoder") -> summary over seeds."""
    from scsnn import benchmark as bm

    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec in records:
        name = rec["method"]
        enc = rec["encoder"]
        if enc is not None and enc != default_encoder:
            name = f"{name}@{enc}"
        for r in rec["rows"]:
            by.setdefault(rec["task"], {}).setdefault(name, []).append(dict(r, method=name))
    out: dict[str, Any] = {}
    for task, variants in by.items():
        rows = [r for rs in variants.values() for r in rs]
        out[task] = {s["method"]: s for s in bm.summarise(rows, list(variants))}
    return out


def _marked_cells(row: dict[str, Any], cols: list[str]) -> list[str]:
    """One task's cells for the methods ``cols``: the best macro-F1 in bold, those tied with
    it (difference under the larger sd) in italics."""
    cands = [row[v] for v in cols if v in row and "macro_f1" in row[v]]
    best = max(cands, key=lambda s: s["macro_f1"]) if cands else None
    cells = []
    for v in cols:
        s = row.get(v)
        c = _cell(s)
        if s is best:
            c = f"**{c}**"
        elif s is not None and best is not None and _compare(s, best) == "tie":
            c = f"_{c}_"
        cells.append(c)
    return cells


def _cell(s: dict[str, Any] | None, key: str = "macro_f1", fmt: str = "{:.3f}") -> str:
    if not s or key not in s:
        return "–" if not s or "unavailable" not in s else "n/a"
    sd = s.get(f"{key}_sd", 0.0)
    return fmt.format(s[key]) + (f" ± {fmt.format(sd)}" if sd else "")


def _compare(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """'win', 'tie' or 'loss' of a against b on macro-F1 (ties: within the larger sd)."""
    from scsnn import benchmark as bm

    if not a or not b or "macro_f1" not in a or "macro_f1" not in b:
        return "n/a"
    if bm.tie(a, b):
        return "tie"
    return "win" if a["macro_f1"] > b["macro_f1"] else "loss"


def report(args: argparse.Namespace) -> None:
    records = _load(args.out / "rows.jsonl")
    summ = summaries(records, args.encoder)
    order = [t for t in tasks(args.data_dir, args.folds, 0) if t in summ]
    lines_all = []
    for table, spec in TABLES.items():
        variants = []
        for m in spec["methods"]:
            for enc in spec["encoders"]:
                name = m if (enc in (None, args.encoder) or m in _NO_ENCODER) else f"{m}@{enc}"
                if name not in variants:
                    variants.append(name)
        tnames = [t for t in order if t in (spec["tasks"] or order)]
        present = [t for t in tnames if any(v in summ[t] for v in variants)]
        if not present:
            continue
        lines = [f"## {table}", "",
                 "macro-F1, mean ± sd over training seeds; **bold** = best of the row, "
                 "_italic_ = tied with the best (difference under the larger sd).", "",
                 "| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for t in present:
            lines.append(f"| {t} | " + " | ".join(_marked_cells(summ[t], variants)) + " |")
        # the mean over the tasks where every method of the table that ran everywhere has a
        # result (a method that could not run on some task, e.g. CellTypist refusing the
        # input, is averaged over its own tasks, their number in brackets)
        has = {v: [t for t in present if "macro_f1" in summ[t].get(v, {})] for v in variants}
        n_max = max((len(x) for x in has.values()), default=0)
        core = [v for v in variants if len(has[v]) == n_max]
        full = [t for t in present if all(t in has[v] for v in core)]
        means = []
        for v in variants:
            ts = full if v in core else has[v]
            f1 = [summ[t][v]["macro_f1"] for t in ts]
            means.append((f"{sum(f1) / len(f1):.3f}" + ("" if v in core else f" ({len(ts)})"))
                         if f1 else "–")
        lines.append(f"| mean ({len(full)} tasks) | " + " | ".join(means) + " |")
        if table == "main":
            lines += _main_extras(summ, present)
        if table == "ablation":
            lines += _tally(summ, present, "hifi", [v for v in variants if v != "hifi"])
        if table == "encoders":
            lines += _encoder_extras(summ, present, variants, args.encoder)
        text = "\n".join(lines) + "\n"
        (args.out / f"{table}.md").write_text(text)
        lines_all.append(text)
    known = {m for spec in TABLES.values() for m in spec["methods"]}
    variants = []
    for rec in records:  # named as summaries() names them: NAME@ENCODER off the default
        enc = rec["encoder"]
        name = rec["method"] if enc in (None, args.encoder) else f"{rec['method']}@{enc}"
        if rec["method"] not in known and name not in variants:
            variants.append(name)
    if variants:
        text = _variants_table(summ, order, variants)
        (args.out / "variants.md").write_text(text)
        lines_all.append(text)
    (args.out / "summary.md").write_text("\n".join(lines_all))
    (args.out / "summary.json").write_text(json.dumps(summ, indent=1, default=str))
    print("\n".join(lines_all))


BASELINES = ("logreg", "logreg-balanced", "celltypist")


def _variants_table(summ: dict[str, Any], order: list[str], variants: list[str]) -> str:
    """Each variant beside HIFI's default and the baselines: macro-F1 and rare-class recall
    per task, then per variant its tally against the default and against the best baseline
    (ties: under the larger sd; a deterministic baseline has sd 0)."""
    cols = ["hifi", *variants, *BASELINES]
    present = [t for t in order if any(v in summ[t] for v in variants)]
    lines = ["## variants", "",
             "macro-F1, mean ± sd over training seeds (rare mean recall below it); **bold** = "
             "best of the row, _italic_ = tied with the best.", "",
             "| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in present:
        row = summ[t]
        lines.append(f"| {t} | " + " | ".join(_marked_cells(row, cols)) + " |")
        lines.append("| (rare recall) | " + " | ".join(
            _cell(row.get(v), "rare_mean_recall", "{:.2f}") for v in cols) + " |")
    lines += ["", "| variant | vs hifi (win / tie / loss) | mean Δ to hifi | vs best baseline "
              "(win / tie / loss) | tasks ≥ best baseline − 0.01 | tasks |",
              "|---|---|---|---|---|---|"]
    for v in variants:
        ts = [t for t in present if "macro_f1" in summ[t].get(v, {})]
        vs_h = [_compare(summ[t][v], summ[t].get("hifi")) for t in ts]
        deltas = [summ[t][v]["macro_f1"] - summ[t]["hifi"]["macro_f1"] for t in ts
                  if "macro_f1" in summ[t].get("hifi", {})]
        vs_b, close = [], 0
        for t in ts:
            bs = [summ[t][b] for b in BASELINES if "macro_f1" in summ[t].get(b, {})]
            if not bs:
                continue
            b = max(bs, key=lambda s: s["macro_f1"])
            vs_b.append(_compare(summ[t][v], b))
            close += summ[t][v]["macro_f1"] >= b["macro_f1"] - 0.01
        mean_d = f"{sum(deltas) / len(deltas):+.4f}" if deltas else "–"
        lines.append(f"| {v} | {vs_h.count('win')} / {vs_h.count('tie')} / {vs_h.count('loss')}"
                     f" | {mean_d} | {vs_b.count('win')} / {vs_b.count('tie')} / "
                     f"{vs_b.count('loss')} | {close} | {len(ts)} |")
    return "\n".join(lines) + "\n"


def _tally(summ: dict[str, Any], present: list[str], ref: str, others: list[str]) -> list[str]:
    lines = ["", f"{ref} against each (win / tie / loss over the tasks):", ""]
    for o in others:
        res = [_compare(summ[t].get(ref), summ[t].get(o)) for t in present]
        lines.append(f"- {ref} vs {o}: {res.count('win')} / {res.count('tie')} / "
                     f"{res.count('loss')}")
    return lines


def _main_extras(summ: dict[str, Any], present: list[str]) -> list[str]:
    lines = _tally(summ, present, "hifi", ["lif", "plif", "ann", "logreg", "logreg-balanced",
                                           "celltypist"])
    lines += ["", "| task | rare mean recall hifi / lif / plif / logreg | steps to 99 % hifi / "
              "lif / plif | E_ANN/E_SNN hifi / lif / plif | spike rate per layer hifi |",
              "|---|---|---|---|---|"]
    for t in present:
        r = summ[t]

        def g(m, k, f="{:.2f}"):
            return _cell(r.get(m), k, f)
        rates = r.get("hifi", {}).get("spike_rate_per_layer")
        lines.append(
            f"| {t} | {' / '.join(g(m, 'rare_mean_recall') for m in ('hifi', 'lif', 'plif', 'logreg'))}"
            f" | {' / '.join(g(m, 'steps_to_99pct', '{:.1f}') for m in ('hifi', 'lif', 'plif'))}"
            f" | {' / '.join(g(m, 'energy_ratio', '{:.1f}') for m in ('hifi', 'lif', 'plif'))}"
            f" | {' / '.join(f'{x:.3f}' for x in rates) if rates else '–'} |")
    return lines


def _encoder_extras(summ: dict[str, Any], present: list[str], variants: list[str],
                    default: str) -> list[str]:
    import numpy as np

    lines = ["", "| encoder | mean macro-F1 over the tasks | mean difference to direct | "
             "E_ANN/E_SNN on pbmc68k / pbmc3k / pbmc_3batch |", "|---|---|---|---|"]
    direct = "hifi" if default == "direct" else "hifi@direct"
    for v in variants:
        f1 = [summ[t][v]["macro_f1"] for t in present if v in summ[t] and direct in summ[t]]
        d = [summ[t][v]["macro_f1"] - summ[t][direct]["macro_f1"] for t in present
             if v in summ[t] and direct in summ[t]]
        e = [_cell(summ[t].get(v), "energy_ratio", "{:.1f}") for t in
             ("pbmc68k", "pbmc3k", "pbmc_3batch") if t in summ]
        lines.append(f"| {v} | {np.mean(f1):.4f} ({len(f1)} tasks) | {np.mean(d):+.4f} | "
                     f"{' / '.join(e)} |" if f1 else f"| {v} | – | – | – |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=list(TABLES), action="append",
                    help="table(s) to run (repeat the option for several)")
    ap.add_argument("--report", action="store_true", help="only write the report")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,... HIFI with other settings, on --tasks "
                         "(repeatable; adapt_batchnorm=1|both for test-time adaptation)")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the table's)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--encoder", default=None, help="encoder of the scsnn networks outside "
                    "the encoder table (default: scsnn's default encoder)")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmark_results"))
    args = ap.parse_args()
    if args.encoder is None:
        from scsnn.models import NetworkConfig

        args.encoder = NetworkConfig().encoder
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for v in args.variant:
            parse_variant(v)  # every variant checked before anything runs
        for table in args.table or ([] if args.variant else ["main"]):
            run_table(table, args)
        if args.variant:
            run_variants(args)
    report(args)


if __name__ == "__main__":
    main()
