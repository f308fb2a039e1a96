#!/bin/bash
# Quiet-machine speed run (docs/benchmarks.md section 8, last subsection): scsnn with the default
# settings, scsnn with --skip and hidden 128-32, and CellTypist, on a 100,000-cell reference and a
# 200,000-cell query (scsnn dataset synthetic --n-cells 100000 --n-query 200000) and on the shift task.
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python}; CT=${CELLTYPIST_PYTHON:?a python with celltypist}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH=.
D=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}
W=$D/work; mkdir -p $W
R=$D/data/reference.h5ad; Q=$D/data/query.h5ad
SR=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/reference.h5ad
SQ=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/query.h5ad
H='{"skip": true, "skip_class_weight": "balanced", "hidden": [128, 32]}'
run() { local tag=$1; shift; echo "== $tag"; out=$("$@" 2>/dev/null | tail -1); echo "{\"tag\": \"$tag\", \"result\": $out}"; }
# the same six steps on each data set: scsnn default, scsnn with $H, CellTypist
steps() {  # tag reference query
  local t=$1 r=$2 q=$3
  run $t-def-train $PY benchmarks/scale.py --step scsnn-train --ref $r --model $W/${t}_def --threads 2
  run $t-def-annot $PY benchmarks/scale.py --step scsnn-annotate --query $q --model $W/${t}_def --work $W --threads 2
  run $t-h128-train $PY benchmarks/scale.py --step scsnn-train --ref $r --model $W/${t}_h128 --threads 2 --settings "$H"
  run $t-h128-annot $PY benchmarks/scale.py --step scsnn-annotate --query $q --model $W/${t}_h128 --work $W --threads 2
  run $t-ct-train $CT benchmarks/scale.py --step celltypist-train --ref $r --model $W/${t}_ct.pkl --threads 2
  run $t-ct-annot $CT benchmarks/scale.py --step celltypist-annotate --query $q --model $W/${t}_ct.pkl --threads 2
}
steps s100k $R $Q
steps shift $SR $SQ
