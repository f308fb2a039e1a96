# scsnn: cell-type annotation with a heterogeneous spiking neural network, as a pipeline.
#
#   snakemake --cores 4                               # the demo on data shipped with scanpy
#   snakemake --configfile my_config.yaml --cores 8   # your reference and queries
#   snakemake --configfile my_config.yaml --profile workflows/profiles/slurm   # on SLURM
#
# Configuration: workflows/config/config.yaml (validated against
# workflows/schemas/config.schema.json). Rules: workflows/rules/.

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "workflows/config/config.yaml"


validate(config, "workflows/schemas/config.schema.json")


include: "workflows/rules/common.smk"
include: "workflows/rules/data.smk"
include: "workflows/rules/train.smk"
include: "workflows/rules/annotate.smk"
include: "workflows/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
