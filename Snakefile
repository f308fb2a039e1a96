# scsnn: cell-type annotation with a heterogeneous spiking neural network, as a pipeline.
#
#   snakemake --cores 4                               # the demo on data shipped with scanpy
#   snakemake --configfile my_config.yaml --cores 8   # your reference and queries
#   snakemake --configfile my_config.yaml --profile workflows/profiles/slurm   # on SLURM
#
# Configuration: a --configfile is used alone (it is not merged into the demo's
# workflows/config/config.yaml, which is read only when no --configfile is given); it is
# checked against workflows/schemas/config.schema.json, and an unknown key or a bad value
# stops the run with a one-line message. Rules: workflows/rules/.

from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")


if not workflow.overwrite_configfiles:  # no --configfile: the demo

    configfile: str(Path(workflow.basedir) / "workflows/config/config.yaml")


include: "workflows/rules/config.smk"


check_config(config, Path(workflow.basedir) / "workflows/schemas/config.schema.json")
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
