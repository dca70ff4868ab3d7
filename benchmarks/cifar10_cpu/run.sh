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
.venv/bin/confspec-compare "$out"/cifar10_scratch_trades/version_1/evaluation/evaluation.json \
  "$out"/cifar10_scratch_trades_csr/version_1/evaluation/evaluation.json \
  --names "TRADES" "TRADES + CSR" --output benchmarks/cifar10_cpu/compare.md
