# Train the model once on the reference (skipped when `model:` names a model directory).

if not config.get("model"):

    rule train:
        input:
            reference_file(),
        output:
            directory(f"{OUT}/model"),
        params:
            label_key=config["reference"]["label_key"],
            options=train_options(),
            extra=setting("train", "extra"),
        threads: setting("train", "threads")
        resources:
            mem_mb=setting("train", "mem_mb"),
            runtime=setting("train", "runtime"),
        log:
            f"{OUT}/logs/train.log",
        conda:
            "../envs/scsnn.yaml"
        shell:
            "scsnn --threads {threads} train {input:q} --label-key {params.label_key:q} "
            "--out {output:q} {params.options} {params.extra} > {log:q} 2>&1"
