# Annotate every query with the model: whole, or as chunks of cells gathered back into one file.


rule annotate:
    input:
        query=lambda wildcards: query_file(wildcards.sample),
        model=model_dir(),
    output:
        f"{OUT}/annotated/{{sample}}.h5ad",
    wildcard_constraints:
        sample=names_regex(WHOLE),
    params:
        options=lambda wildcards: annotate_options(wildcards.sample),
        voting=lambda wildcards: voting_options(wildcards.sample),
    threads: setting("annotate", "threads")
    resources:
        mem_mb=setting("annotate", "mem_mb"),
        runtime=setting("annotate", "runtime"),
    log:
        f"{OUT}/logs/annotate/{{sample}}.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn --threads {threads} annotate {input.query:q} --model {input.model:q} "
        "--output {output:q} {params.options} {params.voting} > {log:q} 2>&1"


rule annotate_chunk:
    input:
        query=lambda wildcards: query_file(wildcards.sample),
        model=model_dir(),
    output:
        temp(f"{OUT}/chunks/{{sample}}/{{i}}-of-{{n}}.h5ad"),
    wildcard_constraints:
        sample=names_regex(CHUNKED),
        i=r"\d+",
        n=r"\d+",
    params:
        options=lambda wildcards: annotate_options(wildcards.sample),
    threads: setting("annotate", "threads")
    resources:
        mem_mb=setting("annotate", "mem_mb"),
        runtime=setting("annotate", "runtime"),
    log:
        f"{OUT}/logs/annotate/{{sample}}.{{i}}-of-{{n}}.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn --threads {threads} annotate {input.query:q} --model {input.model:q} "
        "--chunk {wildcards.i}/{wildcards.n} --output {output:q} {params.options} "
        "> {log:q} 2>&1"


rule gather:
    input:
        query=lambda wildcards: query_file(wildcards.sample),
        chunks=chunk_files,
    output:
        f"{OUT}/annotated/{{sample}}.h5ad",
    wildcard_constraints:
        sample=names_regex(CHUNKED),
    params:
        key=setting("annotate", "key_added"),
        voting=lambda wildcards: voting_options(wildcards.sample),
    log:
        f"{OUT}/logs/gather/{{sample}}.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn gather {input.query:q} {input.chunks:q} --output {output:q} "
        "--key-added {params.key:q} {params.voting} > {log:q} 2>&1"
