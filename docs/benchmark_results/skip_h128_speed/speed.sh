#!/bin/bash
# Quiet-machine speed run (docs/benchmarks.md section 8, last subsection): scsnn with the default
# settings, scsnn with --skip and hidden 128-32, and CellTypist, on a 100,000-cell reference and a
# 200,000-cell query (scsnn dataset synthetic --n-cells 100000 --n-query 200000) and on the shift task.
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python}; CT=${CELLTYPIST_PYTHON:?a python with celltypist}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH=.
W=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}/work; mkdir -p $W
R=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}/data/reference.h5ad; Q=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}/data/query.h5ad
SR=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/reference.h5ad
SQ=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/query.h5ad
H='{"skip": true, "skip_class_weight": "balanced", "hidden": [128, 32]}'
run() { local tag=$1; shift; echo "== $tag"; out=$("$@" 2>/dev/null | tail -1); echo "{\"tag\": \"$tag\", \"result\": $out}"; }
run s100k-def-train $PY benchmarks/scale.py --step scsnn-train --ref $R --model $W/m_def --threads 2
run s100k-def-annot $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/m_def --work $W --threads 2
run s100k-h128-train $PY benchmarks/scale.py --step scsnn-train --ref $R --model $W/m_h128 --threads 2 --settings "$H"
run s100k-h128-annot $PY benchmarks/scale.py --step scsnn-annotate --query $Q --model $W/m_h128 --work $W --threads 2
run s100k-ct-train $CT benchmarks/scale.py --step celltypist-train --ref $R --model $W/ct.pkl --threads 2
run s100k-ct-annot $CT benchmarks/scale.py --step celltypist-annotate --query $Q --model $W/ct.pkl --threads 2
run shift-def-train $PY benchmarks/scale.py --step scsnn-train --ref $SR --model $W/s_def --threads 2
run shift-def-annot $PY benchmarks/scale.py --step scsnn-annotate --query $SQ --model $W/s_def --work $W --threads 2
run shift-h128-train $PY benchmarks/scale.py --step scsnn-train --ref $SR --model $W/s_h128 --threads 2 --settings "$H"
run shift-h128-annot $PY benchmarks/scale.py --step scsnn-annotate --query $SQ --model $W/s_h128 --work $W --threads 2
run shift-ct-train $CT benchmarks/scale.py --step celltypist-train --ref $SR --model $W/sct.pkl --threads 2
run shift-ct-annot $CT benchmarks/scale.py --step celltypist-annotate --query $SQ --model $W/sct.pkl --threads 2
