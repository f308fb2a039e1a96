# Helpers shared by the rules: configuration lookups and the file layout.

import json
import shlex
from pathlib import Path

# defaults of every setting, as the config schema states them (one source of truth)
_SCHEMA = json.loads(
    (Path(workflow.basedir) / "workflows/schemas/config.schema.json").read_text()
)
DEFAULTS = {
    section: {k: v.get("default") for k, v in _SCHEMA["properties"][section]["properties"].items()}
    for section in ("train", "annotate", "report")
}

OUT = config.get("outdir", "results")
SAMPLES = list(config["queries"])


def setting(section, key):
    """A value of the configuration, or its documented default."""
    value = (config.get(section) or {}).get(key)
    return DEFAULTS[section][key] if value is None else value


def query(sample):
    return config["queries"][sample]


def n_chunks(sample):
    return int(query(sample).get("chunks") or setting("annotate", "chunks"))


def names_regex(names):
    """A wildcard constraint matching exactly these names (nothing when empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


CHUNKED = [s for s in SAMPLES if n_chunks(s) > 1]
WHOLE = [s for s in SAMPLES if n_chunks(s) == 1]


def input_options(entry):
    """--layer / --use-raw / --gene-symbols of a reference or query entry."""
    opts = []
    if entry.get("layer"):
        opts += ["--layer", entry["layer"]]
    if entry.get("use_raw"):
        opts.append("--use-raw")
    if entry.get("gene_symbols"):
        opts += ["--gene-symbols", entry["gene_symbols"]]
    return shlex.join(opts)


def subset_options(entry):
    return shlex.join(
        f"--obs={col}={','.join(str(v) for v in values)}"
        for col, values in entry["subset"].items()
    )


def reference_file():
    ref = config["reference"]
    return f"{OUT}/inputs/reference.h5ad" if ref.get("subset") else ref["path"]


def query_file(sample):
    q = query(sample)
    return f"{OUT}/inputs/{sample}.h5ad" if q.get("subset") else q["path"]


def subset_source(wildcards):
    if wildcards.name == "reference":
        return config["reference"]["path"]
    return query(wildcards.name)["path"]


def subset_entry(wildcards):
    return config["reference"] if wildcards.name == "reference" else query(wildcards.name)


def model_dir():
    return config.get("model") or f"{OUT}/model"


def annotate_options(sample):
    opts = [
        "--key-added", setting("annotate", "key_added"),
        "--min-confidence", str(setting("annotate", "min_confidence")),
        "--batch-size", str(setting("annotate", "batch_size")),
        "--chunk-size", str(setting("annotate", "chunk_size")),
        "--device", setting("annotate", "device"),
    ]
    if setting("annotate", "early_exit") is not None:
        opts += ["--early-exit", str(setting("annotate", "early_exit"))]
    return f"{shlex.join(opts)} {input_options(query(sample))}"


def voting_options(sample):
    """--majority-voting / --over-clustering / --celltypist-columns, for whole queries and
    for gather (a chunk cannot vote: it is not the whole query)."""
    opts = []
    if setting("annotate", "majority_voting"):
        clusters = query(sample).get("over_clustering") or setting("annotate", "over_clustering")
        opts.append("--majority-voting")
        if clusters:
            opts += ["--over-clustering", clusters]
        opts += ["--majority-min-fraction", str(setting("annotate", "majority_min_fraction"))]
    if setting("annotate", "celltypist_columns"):
        opts.append("--celltypist-columns")
    return shlex.join(opts)


def report_options(wildcards):
    truth = query(wildcards.sample).get("truth_key")
    opts = [
        "--sample", wildcards.sample,
        "--key-added", setting("annotate", "key_added"),
        "--rare-threshold", str(setting("report", "rare_threshold")),
    ]
    if truth:
        opts += ["--truth-key", truth]
    if setting("report", "restrict_to_model_classes"):
        opts.append("--restrict-to-model-classes")
    return shlex.join(opts)


def chunk_files(wildcards):
    n = n_chunks(wildcards.sample)
    return [f"{OUT}/chunks/{wildcards.sample}/{i}-of-{n}.h5ad" for i in range(1, n + 1)]


def final_outputs():
    return [
        *(f"{OUT}/annotated/{s}.h5ad" for s in SAMPLES),
        *(f"{OUT}/reports/{s}/report.md" for s in SAMPLES),
        f"{OUT}/summary/summary.md",
        f"{OUT}/summary/summary.tsv",
    ]


def train_options():
    opts = [
        "--seed", str(setting("train", "seed")),
        "--epochs", str(setting("train", "epochs")),
        "--neuron", setting("train", "neuron"),
        "--encoder", setting("train", "encoder"),
        "--timesteps", str(setting("train", "timesteps")),
        "--hidden", str(setting("train", "hidden")),
        "--ensemble", str(setting("train", "ensemble")),
        "--skip" if setting("train", "skip") else "--no-skip",
        "--device", setting("train", "device"),
    ]
    return f"{shlex.join(opts)} {input_options(config['reference'])}"
