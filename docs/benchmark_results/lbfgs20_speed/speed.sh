#!/bin/bash
# Quiet-machine speed run of the default network (docs/benchmarks.md section 5): scsnn with the
# default settings, scsnn with the earlier skip fit (with WITH_SK=1: --skip-fit-steps 0,
# scikit-learn's solver; training only; run 1) and CellTypist, on a 100,000-cell reference and a 200,000-cell query
# (scsnn dataset synthetic --n-cells 100000 --n-query 200000) and on the shift task; three
# annotation runs of each model. Every step is its own process, 2 threads.
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python}; CT=${CELLTYPIST_PYTHON:?a python with celltypist}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 PYTHONPATH=.
D=${SCALE_DIR:?folder with data/reference.h5ad and data/query.h5ad}
W=$D/work; mkdir -p $W
R=$D/data/reference.h5ad; Q=$D/data/query.h5ad
SR=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/reference.h5ad
SQ=docs/benchmark_results/issue10_shift/data/shift_1_n30000_q10000_g2000/query.h5ad
run() { local tag=$1; shift; out=$("$@" 2>/dev/null | tail -1); echo "{\"tag\": \"$tag\", \"result\": $out}"; }
steps() {  # tag reference query
  local t=$1 r=$2 q=$3
  run $t-def-train $PY benchmarks/scale.py --step scsnn-train --ref $r --model $W/${t}_def --threads 2
  [ -n "$WITH_SK" ] && run $t-sk-train $PY benchmarks/scale.py --step scsnn-train --ref $r --model $W/${t}_sk --threads 2 --settings '{"skip_fit_steps": 0}'
  run $t-ct-train $CT benchmarks/scale.py --step celltypist-train --ref $r --model $W/${t}_ct.pkl --threads 2
  for i in 1 2 3; do
    run $t-def-annot-$i $PY benchmarks/scale.py --step scsnn-annotate --query $q --model $W/${t}_def --work $W --threads 2
    run $t-ct-annot-$i $CT benchmarks/scale.py --step celltypist-annotate --query $q --model $W/${t}_ct.pkl --threads 2
  done
}
steps s100k $R $Q
steps shift $SR $SQ
