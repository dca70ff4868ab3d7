#!/usr/bin/env bash
# Short CPU run of TRADES vs TRADES + CSR on CIFAR-10 (JPEG archive in ../shared/data), then one
# comparison table. Usage: bash benchmarks/cifar10_cpu/run.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/cifar10_cpu/runs
for method in scratch_trades scratch_trades_csr; do
  common=(--config "configs/cifar10/$method.yaml" --config benchmarks/cifar10_cpu/small.yaml
          --trainer.logger.init_args.save_dir "$out")
  if [ ! -f "$out/cifar10_$method/done" ]; then
    rm -rf "$out/cifar10_$method"
    .venv/bin/confspec fit "${common[@]}"
    .venv/bin/confspec test "${common[@]}" --ckpt_path last
    touch "$out/cifar10_$method/done"
  fi
done
# the newest test report of each run (runs/<name>/<version>/evaluation/<checkpoint>/evaluation.json)
report() { ls -t "$out/cifar10_$1"/*/evaluation/*/evaluation.json | head -n 1; }
.venv/bin/confspec-compare "$(report scratch_trades)" "$(report scratch_trades_csr)" \
  --names "TRADES" "TRADES + CSR" --output benchmarks/cifar10_cpu/compare.md
