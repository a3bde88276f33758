#!/usr/bin/env bash
# side_by_side.sh — xccl-perf against the reference programs of ../shared/bench, interleaved in
# one session (the machine's speed drifts, so only ratios from the same run mean anything).
#
#   benches/side_by_side.sh [reps]      (default 5; needs Open MPI and gcc, which it installs)
#   SHARED_BENCH=path                   where baseline.sh lives (default ../shared/bench)
#
# Per repetition it runs: single-thread memcpy (16 MiB), Open MPI's shared-memory ping-pong
# (mpi_p2p), and `xccl-perf pingpong --baseline`; then it prints each ratio and their medians.
set -euo pipefail
REPS=${1:-5}
TOP=$(cd "$(dirname "$0")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$TOP/../shared/bench}
OUT=${BENCH_OUT:-/tmp/xccl-baseline}
# Build the reference programs (baseline.sh builds everything before running a section).
BENCH_OUT=$OUT QUICK=1 bash "$SHARED_BENCH/baseline.sh" moe-small >/dev/null 2>&1 || true
B=$OUT/bin
[ -x "$B/mpi_p2p" ] || { echo "reference programs missing in $B" >&2; exit 1; }
(cd "$TOP" && cargo build --release --quiet --bin xccl-perf)
OMPI="mpirun.openmpi --allow-run-as-root --oversubscribe --mca pml ob1 --mca oob_tcp_if_include lo --mca btl_tcp_if_include lo"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for rep in $(seq 1 "$REPS"); do
  "$B/memcpy_bw" 3 1e9 | awk '$2=="1thread" && $3==16777216 {print $4}' > "$TMP/memcpy.$rep"
  $OMPI -np 2 --mca btl vader,self "$B/mpi_p2p" ompi_shm 3 0.02 | awk '$1=="mpi_lat" && $3==8 {print $4}' > "$TMP/ompi_lat.$rep"
  "$TOP/target/release/xccl-perf" pingpong -n 2 --baseline -e 16M --json "$TMP/xccl.$rep.json" > /dev/null
done
python3 - "$TMP" "$REPS" <<'PY'
import json, statistics, sys
tmp, reps = sys.argv[1], int(sys.argv[2])
lat, bw, bw_in = [], [], []
for r in range(1, reps + 1):
    memcpy = float(open(f"{tmp}/memcpy.{r}").read())
    ompi = float(open(f"{tmp}/ompi_lat.{r}").read())
    rows = {row["bytes"]: row for row in json.load(open(f"{tmp}/xccl.{r}.json"))}
    big = rows[16 << 20]
    x_lat, x_bw = rows[8]["time_us_p50"], big["put_bw_gbps"]
    inner = (16 << 20) / (big["baseline_us_p50"] * 1e3)
    lat.append(x_lat / ompi); bw.append(x_bw / memcpy); bw_in.append(x_bw / inner)
    print(f"rep {r}: 8 B one-way xccl {x_lat:.3f} us vs Open MPI shm {ompi:.3f} us (x{x_lat/ompi:.2f}); "
          f"16 MiB put {x_bw:.2f} GB/s vs memcpy_bw {memcpy:.2f} GB/s (x{x_bw/memcpy:.2f}) "
          f"vs interleaved memcpy {inner:.2f} GB/s (x{x_bw/inner:.2f})")
print(f"median: 8 B latency xccl/OpenMPI = {statistics.median(lat):.2f} (lower is better); "
      f"16 MiB put bandwidth xccl/memcpy_bw = {statistics.median(bw):.2f}, "
      f"xccl/interleaved memcpy = {statistics.median(bw_in):.2f}")
PY
