"""What HIFI learned: the spread of the neuron parameters per layer, before and after training.

    python benchmarks/neuron_params.py --out docs/benchmark_results/neurons

Trains the default HIFI model on pbmc3k (first fold of the 5-fold split, as in
``hifi_claims.py``) with each seed, and writes ``neurons.md`` (per layer: mean and sd of k,
theta, c and gamma at initialisation and after training, mean absolute change, spike rate per
layer on the held-out fold, the smoothness-to-task gradient ratio) and ``neurons.json``, plus
``neuron_parameters_pbmc3k.png`` (histograms of the first seed's model).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dataset", default="pbmc3k")
    ap.add_argument("--set", action="append", default=[],
                    help="a training setting, e.g. --set encoder=direct (repeatable)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("neurons"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import anndata as ad
    import numpy as np
    import torch

    import scsnn
    from scsnn import benchmark as bm

    torch.set_num_threads(1)
    settings = {}
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            settings[k] = json.loads(v)  # numbers, true/false, lists
        except json.JSONDecodeError:
            settings[k] = v  # a plain word: a string
    a = ad.read_h5ad(args.data_dir / f"{args.dataset}.h5ad")
    split = next(bm.cv_splits(a, "cell_type", 5, 0))
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        model = bm.train_method(split, "cell_type", seed, dict(settings, device="cpu"))
        q = scsnn.tl.annotate(split.query, model, copy=True)
        rep = scsnn.evaluate(q, "cell_type")
        m = model.metrics
        runs.append({"seed": seed, "macro_f1": rep["macro_f1"],
                     "spike_rate_per_layer": [float(x) for x in
                                              q.uns["scsnn"]["energy"]["spike_rate_per_layer"]],
                     "energy_ratio": float(q.uns["scsnn"]["energy"]["ratio_ann_over_snn"]),
                     "neurons": m["neurons"], "alpha": m["alpha"],
                     "settings": model.config.to_dict()})
        if len(runs) == 1:
            fig = scsnn.pl.neuron_parameters(
                model, title=f"HIFI neuron parameters on {args.dataset} (seed {seed}): "
                             "initial (grey) and trained (blue)")
            fig.savefig(args.out / f"neuron_parameters_{args.dataset}.png", dpi=110)
        print(f"seed {seed}: macro-F1 {rep['macro_f1']:.3f}", flush=True)
    (args.out / "neurons.json").write_text(json.dumps(runs, indent=1))

    def ms(values):
        values = np.asarray(values, dtype=float)
        return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 \
            else f"{values.mean():.3f}"

    lines = [f"HIFI on {args.dataset} (fold 1 of 5), {len(runs)} seeds; values are mean ± sd "
             "over seeds of each layer's statistic over its neurons.", "",
             "| layer | quantity | mean at start | sd at start | mean trained | sd trained | "
             "mean abs change |", "|---|---|---|---|---|---|---|"]
    n_layers = len(runs[0]["neurons"]["start"])
    for li in range(n_layers):
        for q in ("k", "theta", "c", "gamma"):
            st = [r["neurons"]["start"][li][q] for r in runs]
            en = [r["neurons"]["end"][li][q] for r in runs]
            ch = [r["neurons"]["mean_abs_change"][li][q] for r in runs]
            lines.append(f"| {li + 1} | {q} | {ms([s['mean'] for s in st])} | "
                         f"{ms([s['sd'] for s in st])} | {ms([e['mean'] for e in en])} | "
                         f"{ms([e['sd'] for e in en])} | {ms(ch)} |")
    rates = np.array([r["spike_rate_per_layer"] for r in runs])
    lines += ["", f"- macro-F1 on the held-out fold: {ms([r['macro_f1'] for r in runs])}",
              "- spike rate per layer (spikes per neuron and step, held-out cells): "
              + ", ".join(ms(rates[:, i]) for i in range(rates.shape[1])),
              f"- E_ANN/E_SNN: {ms([r['energy_ratio'] for r in runs])}",
              f"- upper-level steps per run: {runs[0]['alpha']['steps']}; smoothness / task "
              "gradient norm ratio (first step of each round, mean): "
              + ms([r["alpha"]["smoothness_grad_ratio"] or 0.0 for r in runs])]
    text = "\n".join(lines) + "\n"
    (args.out / "neurons.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
