"""What each path of a ``--skip`` network decides: macro-F1 of the whole readout, of the
input-to-readout synapses alone and of the hidden HIFI layers alone, on the first split of
every task of ``hifi_claims.py`` (training seed 0, default settings plus ``skip=True``).

The readout is the sum of the two paths' logits; each path alone is scored from its own
logits (the hidden path's includes the output bias). ``sd ratio`` is the spread of the
skip path's logits over the hidden path's (how much of the decision each carries).

    python benchmarks/skip_parts.py [--tasks a,b] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from spikingjelly.activation_based import functional

    import hifi_claims as hc
    from scsnn import benchmark as bm
    from scsnn.evaluate import classification_report
    from scsnn.io import get_expression

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=hc.DEFAULT_DATA)
    ap.add_argument("--tasks", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table = hc.tasks(args.data_dir, 5, 0)
    names = args.tasks.split(",") if args.tasks else list(table)
    print("| task | whole readout | skip synapses alone | hidden layers alone | sd ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        desc, label, make = table[name]
        split = next(iter(make()))
        model = bm.train_method(split, label, 0, {"device": "cpu", "progress": False,
                                                  "skip": True})
        net = model.network.eval()
        z = torch.as_tensor(model.gene_space.features(get_expression(split.query)),
                            dtype=torch.float32)
        truth = split.query.obs[label].astype(str).to_numpy()
        with torch.no_grad():
            functional.reset_net(net)
            whole = net(z)
            skip = net.input_trace(z) @ net.skip.weight.t()
        classes = np.asarray(model.classes)
        f1 = {k: classification_report(truth, classes[v.argmax(1).numpy()])["macro_f1"]
              for k, v in (("whole", whole), ("skip", skip), ("hidden", whole - skip))}
        ratio = float(skip.std() / (whole - skip).std())
        print(f"| {name} | {f1['whole']:.3f} | {f1['skip']:.3f} | {f1['hidden']:.3f} | "
              f"{ratio:.1f} |", flush=True)


if __name__ == "__main__":
    main()
