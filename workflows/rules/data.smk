# Input preparation: the bundled demo data, and subsets of larger files.


rule demo_data:
    output:
        reference="results/demo_data/reference.h5ad",
        query="results/demo_data/query.h5ad",
    log:
        "results/demo_data/demo_data.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn dataset pbmc68k_reduced --out results/demo_data > {log} 2>&1"


rule subset_input:
    input:
        subset_source,
    output:
        f"{OUT}/inputs/{{name}}.h5ad",
    params:
        obs=lambda wildcards: subset_options(subset_entry(wildcards)),
    log:
        f"{OUT}/logs/subset/{{name}}.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn subset {input:q} {params.obs} --output {output:q} > {log:q} 2>&1"
