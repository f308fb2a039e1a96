#!/bin/bash
# Runs 2 and 3 of the annotation timings, after speed.sh, on the models it trained.
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python}; CT=${CELLTYPIST_PYTHON:?a python with celltypist}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH=.
D=${SCALE_DIR:?the folder speed.sh used}
W=$D/work; Q=$D/data/query.h5ad
run() { local tag=$1; shift; out=$("$@" 2>/dev/null | tail -1); echo "{\"tag\": \"$tag\", \"result\": $out}"; }
for i in 2 3; do
run s100k-ct-annot-$i $CT benchmarks/scale.py --step celltypist-annotate --query $Q --model $W/s100k_ct.pkl --threads 2
run s100k-h128-annot-$i $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/s100k_h128 --work $W --threads 2
run s100k-def-annot-$i $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/s100k_def --work $W --threads 2
done
