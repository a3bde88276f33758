#!/usr/bin/env bash
# hosts_perf.sh — the MoE layer across two emulated hosts (4 ranks, 2 per host): the same job
# on the tcp backend and on the hybrid one (shared memory within a host, TCP between hosts),
# runs interleaved so that both see the same machine; prints each backend's medians over the
# runs and the ratio. Called by readme_perf.sh; runs alone too.
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
  for b in tcp hybrid; do
    "$PERF" "${ARGS[@]}" --backend "$b" > "$RUNS/$b.$r"
  done
done
python3 - "$RUNS" "$ROUNDS" <<'PY'
import statistics, sys
runs, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for b in ("tcp", "hybrid"):
    rows = []
    for r in range(1, rounds + 1):
        for line in open(f"{runs}/{b}.{r}"):
            f = line.split()
            if f and f[0] == "normal":
                # mode dispatch tokens rows_out bytes dispatch(us) GB/s combine(us) GB/s time(us) ...
                rows.append((float(f[5]), float(f[7]), float(f[9]), int(f[-1])))
    if len(rows) != rounds:
        sys.exit(f"{b}: {len(rows)} result rows of {rounds} runs")
    med[b] = [statistics.median(x[k] for x in rows) for k in range(4)]
print(f"{'backend':>8} {'dispatch(us)':>13} {'combine(us)':>12} {'time(us)':>10} {'rows_xhost':>11}")
for b, (d, c, t, x) in med.items():
    print(f"{b:>8} {d:>13.0f} {c:>12.0f} {t:>10.0f} {x:>11.0f}")
print(f"hybrid (flat dispatch) vs tcp: {med['tcp'][2] / med['hybrid'][2]:.2f}x faster, medians of {rounds} runs each")
PY
