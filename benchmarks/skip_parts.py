"""What each path of a ``--skip`` network decides: macro-F1 of the whole readout, of the
input-to-readout synapses alone and of the hidden HIFI layers alone, on the first split of
every task of ``hifi_claims.py`` (training seed 0, default settings plus ``skip=True`` and
``skip_hidden_gain=1``, so that the hidden path is the one training left; the skip fit's
class weights are ``--skip-class-weight``, default ``none``, the setting the tables of
``docs/benchmarks.md`` section 8 were measured with).

The readout is the sum of the two paths' logits; each path alone is scored from its own
logits (the hidden path's includes the output bias). ``sd ratio`` is the spread of the
skip path's logits over the hidden path's (how much of the decision each carries).

With ``--gains 0,0.5,1`` a second table gives, for each gain g, the macro-F1 of the readout
skip + g * hidden on the trainer's selection split (the part of the reference that the
trainer scores, rebuilt from its seed; the g = 1 figure is checked against the trainer's own)
and on the query: whether the selection split could choose g.

    python benchmarks/skip_parts.py [--tasks a,b] [--gains 0,0.25,0.5,0.75,1]
        [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from spikingjelly.activation_based import functional

    import hifi_claims as hc
    from scsnn import benchmark as bm
    from scsnn.evaluate import classification_report
    from scsnn.io import get_expression
    from scsnn.training import TrainConfig, stratified_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=hc.DEFAULT_DATA)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--skip-class-weight", default="none", choices=("none", "balanced"))
    ap.add_argument("--gains", default=None,
                    help="comma-separated hidden-path gains for the second table")
    args = ap.parse_args()
    gains = [float(g) for g in args.gains.split(",")] if args.gains else []
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table = hc.tasks(args.data_dir, 5, 0)
    names = args.tasks.split(",") if args.tasks else list(table)
    print("| task | whole readout | skip synapses alone | hidden layers alone | sd ratio |")
    print("|---|---|---|---|---|")
    by_gain = []
    for name in names:
        desc, label, make = table[name]
        split = next(iter(make()))
        model = bm.train_method(split, label, 0, {"device": "cpu", "progress": False,
                                                  "skip": True, "skip_hidden_gain": 1.0,
                                                  "skip_class_weight": args.skip_class_weight})
        net = model.network.eval()
        classes = np.asarray(model.classes)

        def paths(adata):
            z = torch.as_tensor(model.gene_space.features(get_expression(adata)),
                                dtype=torch.float32)
            with torch.no_grad():
                functional.reset_net(net)
                whole = net(z)
                skip = net.input_trace(z) @ net.skip.weight.t()
            return skip, whole - skip

        def score(truth, logits):
            return classification_report(truth, classes[logits.argmax(1).numpy()])["macro_f1"]

        truth = split.query.obs[label].astype(str).to_numpy()
        skip, hidden = paths(split.query)
        f1 = {k: score(truth, v) for k, v in
              (("whole", skip + hidden), ("skip", skip), ("hidden", hidden))}
        ratio = float(skip.std() / hidden.std())
        print(f"| {name} | {f1['whole']:.3f} | {f1['skip']:.3f} | {f1['hidden']:.3f} | "
              f"{ratio:.1f} |", flush=True)
        if gains:
            ref = split.reference
            ylab = ref.obs[label].astype(str).to_numpy()
            codes = pd.Categorical(ylab, categories=list(classes)).codes
            cfg = TrainConfig()
            sel = np.sort(stratified_split(codes, cfg.alpha_fraction, cfg.select_fraction,
                                           0).select)
            s_sel, h_sel = paths(ref[sel])
            row = [name, model.metrics.get("select_macro_f1")]
            for part, tr in (((s_sel, h_sel), ylab[sel]), ((skip, hidden), truth)):
                row.append([score(tr, part[0] + g * part[1]) for g in gains])
            by_gain.append(row)
    if gains:
        head = " | ".join(f"g = {g:g}" for g in gains)
        print("\nmacro-F1 of skip + g * hidden: selection split (trainer's own figure at g = 1 "
              "in brackets) | query")
        print(f"| task | {head} | {head} |")
        print("|---|" + "---|" * (2 * len(gains)))
        for name, own, sel_f1, q_f1 in by_gain:
            own_s = f"{own:.3f}" if own is not None else "n/a"
            print(f"| {name} ({own_s}) | " + " | ".join(f"{v:.3f}" for v in sel_f1) + " | "
                  + " | ".join(f"{v:.3f}" for v in q_f1) + " |", flush=True)


if __name__ == "__main__":
    main()
