#!/usr/bin/env bash
# Compares Go benchmarks of two revisions side by side, in one run on one
# machine: each revision's test binary is built once, then the two are run
# in turn (old, new, old, new, …) so both see the same load, and every
# metric a benchmark reports is printed as old / new / new÷old (medians over
# the rounds).
#
#   bench/compare-revs.sh OLD NEW PACKAGE BENCH [BENCHTIME] [ROUNDS]
#   bench/compare-revs.sh e8190ef HEAD ./internal/host/ '^BenchmarkCreateToStarted$' 30x 5
#
# BENCHTIME is -test.benchtime (default 1s), ROUNDS how many times each
# revision runs (default 5). Needs only git and Go.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
old=$1 new=$2 pkg=$3 bench=$4 benchtime=${5:-1s} rounds=${6:-5}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'for r in old new; do git -C "$root" worktree remove --force "$work/$r" 2>/dev/null || true; done; rm -rf "$work"' EXIT

for r in old new; do
  rev=${!r}
  git -C "$root" worktree add -q --detach "$work/$r" "$rev"
  echo "building $r ($(git -C "$root" rev-parse --short "$rev")) $pkg…" >&2
  (cd "$work/$r" && go test -c -o "$work/$r.test" "$pkg")
done

for i in $(seq 1 "$rounds"); do
  for r in old new; do
    echo "round $i/$rounds: $r" >&2
    # Run from the package's directory, as go test does (testdata, relative paths).
    (cd "$work/$r/$pkg" && "$work/$r.test" -test.run '^$' -test.bench "$bench" \
      -test.benchtime "$benchtime" -test.count 1) | sed "s/^/$r /" >>"$work/results"
  done
done

# Lines look like: "old BenchmarkX-2  30  0 ns/op  3.1 p50-ms  9.2 p99-ms".
awk '
  $2 ~ /^Benchmark/ {
    for (i = 4; i + 1 <= NF; i += 2) {
      key = $2 SUBSEP $(i + 1)
      if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      v[$1, key, ++c[$1, key]] = $i
    }
  }
  function median(side, key,   m, i, j, t, a) {
    m = c[side, key]
    for (i = 1; i <= m; i++) a[i] = v[side, key, i]
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
  }
  END {
    printf "%-44s %-16s %12s %12s %9s\n", "benchmark", "metric", "old", "new", "new/old"
    for (k = 1; k <= n; k++) {
      split(order[k], p, SUBSEP)
      if (p[2] == "ns/op" && median("old", order[k]) == 0) continue
      o = median("old", order[k]); w = median("new", order[k])
      printf "%-44s %-16s %12.4g %12.4g %9s\n", p[1], p[2], o, w, (o > 0 ? sprintf("%.2f", w / o) : "-")
    }
  }' "$work/results"
