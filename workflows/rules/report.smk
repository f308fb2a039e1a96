# Per-sample reports (tables, plots, evaluation where a truth key is given; report.md and a
# self-contained report.html) and one summary (summary.md, summary.html).


rule report:
    input:
        f"{OUT}/annotated/{{sample}}.h5ad",
    output:
        md=f"{OUT}/reports/{{sample}}/report.md",
        json=f"{OUT}/reports/{{sample}}/report.json",
        labels=f"{OUT}/reports/{{sample}}/labels.csv",
        html=f"{OUT}/reports/{{sample}}/report.html",
    params:
        options=report_options,
        outdir=lambda wildcards, output: Path(output.json).parent,
    log:
        f"{OUT}/logs/report/{{sample}}.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn report {input:q} --out {params.outdir:q} {params.options} > {log:q} 2>&1"


rule summary:
    input:
        expand(f"{OUT}/reports/{{sample}}/report.json", sample=SAMPLES),
    output:
        md=f"{OUT}/summary/summary.md",
        tsv=f"{OUT}/summary/summary.tsv",
        html=f"{OUT}/summary/summary.html",
    params:
        reports=lambda wildcards, input: [str(Path(p).parent) for p in input],
        outdir=lambda wildcards, output: Path(output.tsv).parent,
    log:
        f"{OUT}/logs/summary.log",
    conda:
        "../envs/scsnn.yaml"
    shell:
        "scsnn summarize {params.reports:q} --out {params.outdir:q} > {log:q} 2>&1"
