#!/bin/bash
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python}; CT=${CELLTYPIST_PYTHON:?a python with celltypist}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH=.
W=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}/work; Q=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}/data/query.h5ad
run() { local tag=$1; shift; out=$("$@" 2>/dev/null | tail -1); echo "{\"tag\": \"$tag\", \"result\": $out}"; }
for i in 2 3; do
run s100k-ct-annot-$i $CT benchmarks/scale.py --step celltypist-annotate --query $Q --model $W/ct.pkl --threads 2
run s100k-h128-annot-$i $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/m_h128 --work $W --threads 2
run s100k-def-annot-$i $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/m_def --work $W --threads 2
done
