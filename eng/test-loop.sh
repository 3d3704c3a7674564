#!/usr/bin/env bash
# Runs the test suite N times in a row (default 20) and stops at the first failure: the check that no test is flaky.
# Usage: eng/test-loop.sh [N]   (builds once, then runs the README's test command with --no-build)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
dotnet build Provider.sln -c Release -v q
log="$(mktemp -d)/test-loop"
mkdir -p "$log"
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if dotnet test Provider.sln -c Release --no-build --filter "Category!=Soak" > "$log/run-$i.txt" 2>&1; then
    echo "run $i/$runs passed in $(( $(date +%s) - start )) s: $(grep -hE '^(Passed|Failed)!' "$log/run-$i.txt" | tr '\n' ' ')"
  else
    echo "run $i/$runs FAILED after $(( $(date +%s) - start )) s; log: $log/run-$i.txt"
    grep -E '^\s+Failed |^(Passed|Failed)!' "$log/run-$i.txt" || true
    exit 1
  fi
done
echo "all $runs runs passed"
