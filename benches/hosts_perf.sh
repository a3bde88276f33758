#!/usr/bin/env bash
# hosts_perf.sh — the MoE layer across two emulated hosts (4 ranks, 2 per host): the same job
# on the tcp backend (flat: every rank sends to every rank) and on the hybrid one (shared
# memory within a host, TCP between hosts), there flat and two-level (`--levels`, repetitions
# interleaved), runs alternating so that all see the same machine; prints the medians over the
# runs and the ratios. Called by readme_perf.sh; runs alone too.
#
#   benches/hosts_perf.sh [rounds]     runs per backend (default 3)
set -euo pipefail
ROUNDS=${1:-3}
TOP=$(cd "$(dirname "$0")/.." && pwd)
PERF=${PERF:-$TOP/target/release/xccl-perf}
[ -x "$PERF" ] || (cd "$TOP" && cargo build --release --quiet --bin xccl-perf)
ARGS=(moe --np 4 --hosts 2 --tokens 4096 -n 5)
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
for r in $(seq "$ROUNDS"); do
  "$PERF" "${ARGS[@]}" --backend tcp > "$RUNS/tcp.$r"
  "$PERF" "${ARGS[@]}" --backend hybrid --levels flat,two-level > "$RUNS/hybrid.$r"
done
python3 - "$RUNS" "$ROUNDS" <<'PY'
import statistics, sys
runs, rounds = sys.argv[1], int(sys.argv[2])
rows = {"tcp flat": [], "hybrid flat": [], "hybrid two-level": []}
for r in range(1, rounds + 1):
    for backend in ("tcp", "hybrid"):
        for line in open(f"{runs}/{backend}.{r}"):
            f = line.split()
            if f and f[0] == "normal":
                # mode dispatch tokens rows_out bytes dispatch(us) GB/s combine(us) GB/s time(us) ... rows_xhost
                level = "two-level" if f[1].endswith("+2lvl") else "flat"
                rows[f"{backend} {level}"].append((float(f[5]), float(f[7]), float(f[9]), int(f[-1])))
med = {}
for name, got in rows.items():
    if len(got) != rounds:
        sys.exit(f"{name}: {len(got)} result rows of {rounds} runs")
    med[name] = [statistics.median(x[k] for x in got) for k in range(4)]
print(f"{'backend, routing':>17} {'dispatch(us)':>13} {'combine(us)':>12} {'time(us)':>10} {'rows_xhost':>11}")
for name, (d, c, t, x) in med.items():
    print(f"{name:>17} {d:>13.0f} {c:>12.0f} {t:>10.0f} {x:>11.0f}")
tcp, flat, two = med["tcp flat"], med["hybrid flat"], med["hybrid two-level"]
print(f"hybrid flat vs tcp: {tcp[2] / flat[2]:.2f}x faster; two-level vs hybrid flat: "
      f"{flat[2] / two[2]:.2f}x faster, {flat[3] / two[3]:.2f}x fewer rows across hosts "
      f"(medians of {rounds} runs each)")
PY
