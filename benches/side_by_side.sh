#!/usr/bin/env bash
# side_by_side.sh — xccl-perf against the reference programs of ../shared/bench, interleaved in
# one session (the machine's speed drifts, so only ratios from the same run mean anything).
#
#   benches/side_by_side.sh [reps] [sections...]     sections: p2p a2a tcp moe (default: all), reps 3
#   SHARED_BENCH=path    where baseline.sh lives (default ../shared/bench)
#
# p2p: single-thread memcpy (16 MiB), Open MPI's shm ping-pong and streaming bandwidth
#      (mpi_p2p, built here with sizes up to 16 MiB), `xccl-perf pingpong --baseline` and
#      `xccl-perf sendrecv`.
# a2a: Open MPI's MPI_Alltoallv (mpi_a2a, blocks 1 KiB / 64 KiB / 1 MiB) and
#      `xccl-perf alltoallv` at the same blocks, for 2, 4 and 8 ranks.
# tcp: a plain polling loopback TCP ping-pong and stream (tcp_bench), Open MPI over its tcp
#      BTL (mpi_p2p, mpi_a2a with 2 ranks), `xccl-perf pingpong` and `alltoallv` over tcp.
# moe: Open MPI's dispatcher/combiner (moe_mpi, selfcopy, hidden 7168 bf16, top-8 of 64)
#      and `xccl-perf moe`: decode sizes T = 1, 8, 32 in both modes with 2 and 4 ranks over
#      shm (50 calls; each mode against Open MPI, low-latency against normal, and T = 1
#      against the floor the harness prints), low-latency at T = 1 and 8 with 2 ranks over
#      tcp, normal mode at T = 128 and 4096 with 2 and 4 ranks over shm, low-latency at
#      T = 128 with 2 ranks, normal mode at T = 4096 with 2 ranks over tcp (Open MPI over its
#      tcp BTL), and at T = 4096 the layer (dispatch → copy experts → combine) with the
#      copying and the zero-copy dispatch (`--expert copy`), 2 and 4 ranks.
# Each repetition runs every program once; the summary gives each ratio per repetition and
# the median, as "speedup" (> 1: xccl faster) or "fraction" (of a reference bandwidth).
set -euo pipefail
REPS=${1:-3}
shift || true
SECTIONS=${*:-p2p a2a tcp moe}
TOP=$(cd "$(dirname "$0")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$TOP/../shared/bench}
OUT=${BENCH_OUT:-/tmp/xccl-baseline}
# baseline.sh builds every reference program before it runs the (small) section asked for.
BENCH_OUT=$OUT QUICK=1 NP=2 bash "$SHARED_BENCH/baseline.sh" moe-small >/dev/null 2>&1 || true
B=$OUT/bin
[ -x "$B/mpi_p2p" ] || { echo "reference programs missing in $B" >&2; exit 1; }
(cd "$TOP" && cargo build --release --quiet --bin xccl-perf)
PERF=$TOP/target/release/xccl-perf
OMPI="mpirun.openmpi --allow-run-as-root --oversubscribe --mca pml ob1 --mca btl vader,self --mca oob_tcp_if_include lo"
OMPI_TCP="mpirun.openmpi --allow-run-as-root --oversubscribe --mca pml ob1 --mca btl tcp,self --mca oob_tcp_if_include lo --mca btl_tcp_if_include lo"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Open MPI's ping-pong/streaming program as the reference ships it stops at 4 MiB; the same
# source built with two more sizes measures it at 16 MiB too, the size send/recv is held to.
sed 's/^#define NSZ 20 .*/#define NSZ 22/' "$SHARED_BENCH/src/mpi_p2p.c" > "$TMP/mpi_p2p16.c"
grep -q '^#define NSZ 22' "$TMP/mpi_p2p16.c" || { echo "mpi_p2p.c changed: cannot extend it to 16 MiB" >&2; exit 1; }
mpicc.openmpi -O2 -march=native -I "$SHARED_BENCH/src" -o "$B/mpi_p2p16" "$TMP/mpi_p2p16.c"
for rep in $(seq 1 "$REPS"); do
  for s in $SECTIONS; do
    case $s in
      p2p)
        "$B/memcpy_bw" 3 1e9 > "$TMP/memcpy.$rep"
        $OMPI -np 2 "$B/mpi_p2p16" ompi_shm 3 0.02 > "$TMP/mpi_p2p.$rep"
        "$PERF" pingpong --np 2 --baseline -e 16M --json "$TMP/pingpong.$rep.json" > /dev/null
        "$PERF" sendrecv --np 2 -e 16M --json "$TMP/sendrecv.$rep.json" > /dev/null ;;
      a2a)
        for P in 2 4 8; do
          $OMPI -np $P "$B/mpi_a2a" ompi_shm 3 0.05 > "$TMP/mpi_a2a.$P.$rep"
          "$PERF" alltoallv --np $P -b 1K -e 1M --json "$TMP/a2a.$P.$rep.json" > /dev/null
        done ;;
      tcp)
        "$B/tcp_bench" 3 pin spin 3000 > "$TMP/tcp_bench.$rep"
        $OMPI_TCP -np 2 "$B/mpi_p2p16" ompi_tcp 3 0.02 > "$TMP/mpi_p2p_tcp.$rep"
        $OMPI_TCP -np 2 "$B/mpi_a2a" ompi_tcp 3 0.05 > "$TMP/mpi_a2a_tcp.$rep"
        "$PERF" pingpong --np 2 --backend tcp --baseline -e 16M --json "$TMP/pingpong_tcp.$rep.json" > /dev/null
        "$PERF" alltoallv --np 2 --backend tcp -b 1M -e 1M --json "$TMP/a2a_tcp.$rep.json" > /dev/null ;;
      moe)
        for P in 2 4; do
          for T in 1 8 32; do
            $OMPI -np $P "$B/moe_mpi" ompi_shm $T 7168 8 64 50 5 42 selfcopy > "$TMP/moe_mpi.$P.$T.$rep"
          done
          "$PERF" moe --np $P --tokens 1,8,32 -n 50 --mode normal,low-latency --json "$TMP/moe_decode.$P.$rep.json" > /dev/null
          "$PERF" moe --np $P --tokens 4096 -n 5 --expert copy --json "$TMP/moe_layer.$P.$rep.json" > /dev/null
        done
        for T in 1 8; do
          $OMPI_TCP -np 2 "$B/moe_mpi" ompi_tcp $T 7168 8 64 50 5 42 selfcopy > "$TMP/moe_mpi_tcp.$T.$rep"
        done
        "$PERF" moe --np 2 --backend tcp --tokens 1,8 -n 50 --mode low-latency --json "$TMP/moe_decode_tcp.$rep.json" > /dev/null
        for P in 2 4; do
          for T in 128 4096; do
            $OMPI -np $P "$B/moe_mpi" ompi_shm $T 7168 8 64 5 1 42 selfcopy > "$TMP/moe_mpi.$P.$T.$rep"
            "$PERF" moe --np $P --tokens $T -n 5 --json "$TMP/moe.$P.$T.$rep.json" > /dev/null
          done
        done
        "$PERF" moe --np 2 --tokens 128 -n 5 --mode low-latency --json "$TMP/moe_ll.$rep.json" > /dev/null
        $OMPI_TCP -np 2 "$B/moe_mpi" ompi_tcp 4096 7168 8 64 5 1 42 selfcopy > "$TMP/moe_mpi_tcp.$rep"
        "$PERF" moe --np 2 --backend tcp --tokens 4096 -n 5 --json "$TMP/moe_tcp.$rep.json" > /dev/null ;;
      *) echo "unknown section $s" >&2; exit 2 ;;
    esac
  done
done
python3 - "$TMP" "$REPS" "$SECTIONS" <<'PY'
import json, os, statistics, sys
tmp, reps, sections = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def lines(path):
    return [l.split() for l in open(path)] if os.path.exists(path) else []
def rows(path):
    return {r["bytes"]: r for r in json.load(open(path))}
results = {}
def add(name, rep, value, detail):
    results.setdefault(name, []).append((rep, value, detail))
for r in range(1, reps + 1):
    if "p2p" in sections:
        memcpy = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/memcpy.{r}") if l[1] == "1thread"}
        mlat = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/mpi_p2p.{r}") if l[0] == "mpi_lat"}
        mbw = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/mpi_p2p.{r}") if l[0] == "mpi_bw"}
        pp, sr = rows(f"{tmp}/pingpong.{r}.json"), rows(f"{tmp}/sendrecv.{r}.json")
        big = pp[16 << 20]
        add("pingpong 8 B latency, speedup vs Open MPI", r, mlat[8] / pp[8]["time_us_p50"], f'{pp[8]["time_us_p50"]:.3f} vs {mlat[8]:.3f} us')
        add("pingpong 16 MiB put bw, fraction of memcpy_bw", r, big["put_bw_gbps"] / memcpy[16 << 20], f'{big["put_bw_gbps"]:.2f} vs {memcpy[16 << 20]:.2f} GB/s')
        inner = (16 << 20) / (big["baseline_us_p50"] * 1e3)
        add("pingpong 16 MiB put bw, fraction of interleaved memcpy", r, big["put_bw_gbps"] / inner, f'{big["put_bw_gbps"]:.2f} vs {inner:.2f} GB/s')
        add("sendrecv 8 B latency, speedup vs Open MPI", r, mlat[8] / sr[8]["time_us_p50"], f'{sr[8]["time_us_p50"]:.3f} vs {mlat[8]:.3f} us')
        add("sendrecv 16 MiB bw vs Open MPI 16 MiB streaming bw", r, sr[16 << 20]["put_bw_gbps"] / mbw[16 << 20], f'{sr[16 << 20]["put_bw_gbps"]:.2f} vs {mbw[16 << 20]:.2f} GB/s')
        top = max(mbw, key=mbw.get)
        add("sendrecv 16 MiB bw vs Open MPI's best streaming bw at any size", r, sr[16 << 20]["put_bw_gbps"] / mbw[top], f'{sr[16 << 20]["put_bw_gbps"]:.2f} vs {mbw[top]:.2f} GB/s at {top >> 10} KiB')
    if "a2a" in sections:
        for P in (2, 4, 8):
            m = {int(l[4]): float(l[5]) for l in lines(f"{tmp}/mpi_a2a.{P}.{r}") if l[2] == "alltoallv"}
            x = rows(f"{tmp}/a2a.{P}.{r}.json")
            for blk in (1024, 65536, 1 << 20):
                if blk in m and P * blk in x:
                    t = x[P * blk]["time_us_p50"]
                    add(f"alltoallv P={P} block {blk >> 10} KiB, speedup vs Open MPI", r, m[blk] / t, f"{t:.2f} vs {m[blk]:.2f} us")
    if "tcp" in sections:
        tl = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/tcp_bench.{r}") if l[0] == "tcp_lat"}
        tb = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/tcp_bench.{r}") if l[0] == "tcp_bw"}
        ml = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/mpi_p2p_tcp.{r}") if l[0] == "mpi_lat"}
        mb = {int(l[2]): float(l[3]) for l in lines(f"{tmp}/mpi_p2p_tcp.{r}") if l[0] == "mpi_bw"}
        ma = {int(l[4]): float(l[5]) for l in lines(f"{tmp}/mpi_a2a_tcp.{r}") if l[2] == "alltoallv"}
        pp = rows(f"{tmp}/pingpong_tcp.{r}.json")
        x8 = pp[8]["time_us_p50"]
        add("tcp 8 B one-way latency vs plain polling TCP (RTT/2), speedup", r, (tl[8] / 2) / x8, f"{x8:.2f} vs {tl[8] / 2:.2f} us")
        add("tcp 8 B one-way latency vs Open MPI tcp, speedup", r, ml[8] / x8, f"{x8:.2f} vs {ml[8]:.2f} us")
        add("tcp 8 B one-way latency vs plain polling TCP in the same harness run, speedup", r, pp[8]["baseline_us_p50"] / x8, f'{x8:.2f} vs {pp[8]["baseline_us_p50"]:.2f} us')
        big = pp[16 << 20]["put_bw_gbps"]
        add("tcp 16 MiB put bw vs plain TCP stream of 16 MiB in the same harness run, fraction", r, big / pp[16 << 20]["baseline_gbps"], f'{big:.2f} vs {pp[16 << 20]["baseline_gbps"]:.2f} GB/s')
        add(f"tcp 16 MiB put bw vs plain TCP stream ({max(tb) >> 20} MiB writes), fraction", r, big / tb[max(tb)], f"{big:.2f} vs {tb[max(tb)]:.2f} GB/s")
        add("tcp 16 MiB put bw vs Open MPI tcp 16 MiB streaming", r, big / mb[16 << 20], f"{big:.2f} vs {mb[16 << 20]:.2f} GB/s")
        four = pp[4 << 20]["put_bw_gbps"]
        add("tcp 4 MiB put bw vs Open MPI tcp 4 MiB streaming", r, four / mb[4 << 20], f"{four:.2f} vs {mb[4 << 20]:.2f} GB/s")
        a = rows(f"{tmp}/a2a_tcp.{r}.json")
        if 2 << 20 in a and (1 << 20) in ma:
            t = a[2 << 20]["time_us_p50"]
            add("tcp alltoallv P=2 block 1 MiB, speedup vs Open MPI tcp", r, ma[1 << 20] / t, f"{t:.1f} vs {ma[1 << 20]:.1f} us")
    if "moe" in sections:
        def mpi_total(path):
            l = [x for x in lines(path) if x and x[0] == "moe"]
            return float(l[0][10]) + float(l[0][13]) if l else None
        def ours(path):
            x = json.load(open(path))[0]
            return (x["dispatch_us_p50"] + x["combine_us_p50"]) / 1e3
        def moe_ratio(name, mpi_path, our_path):
            m = mpi_total(mpi_path)
            if m is not None and os.path.exists(our_path):
                o = ours(our_path)
                add(name, r, m / o, f"{o:.2f} vs {m:.2f} ms")
        for P in (2, 4):
            for T in (128, 4096):
                moe_ratio(f"moe normal shm P={P} T={T} dispatch+combine, speedup vs Open MPI", f"{tmp}/moe_mpi.{P}.{T}.{r}", f"{tmp}/moe.{P}.{T}.{r}.json")
        moe_ratio("moe low-latency shm P=2 T=128 dispatch+combine, speedup vs Open MPI", f"{tmp}/moe_mpi.2.128.{r}", f"{tmp}/moe_ll.{r}.json")
        moe_ratio("moe normal tcp P=2 T=4096 dispatch+combine, speedup vs Open MPI tcp", f"{tmp}/moe_mpi_tcp.{r}", f"{tmp}/moe_tcp.{r}.json")
        def pick(path, tokens, mode, dispatch="copy"):
            if not os.path.exists(path):
                return None
            for x in json.load(open(path)):
                if (x["tokens"], x["mode"], x["dispatch"]) == (tokens, mode, dispatch):
                    return x
            return None
        def total_us(x):
            return x["dispatch_us_p50"] + x["combine_us_p50"]
        for P in (2, 4):
            for T in (1, 8, 32):
                m = mpi_total(f"{tmp}/moe_mpi.{P}.{T}.{r}")
                by_mode = {mode: pick(f"{tmp}/moe_decode.{P}.{r}.json", T, mode) for mode in ("normal", "low-latency")}
                for mode, x in by_mode.items():
                    if m is not None and x is not None:
                        add(f"moe {mode} shm P={P} T={T} dispatch+combine, speedup vs Open MPI", r, m * 1e3 / total_us(x), f"{total_us(x):.1f} vs {m * 1e3:.1f} us")
                    if T == 1 and x is not None:
                        add(f"moe {mode} shm P={P} T=1 dispatch+combine, multiple of the floor", r, total_us(x) / x["floor_us"], f'{total_us(x):.1f} vs floor {x["floor_us"]:.1f} us')
                if all(by_mode.values()):
                    n, l = total_us(by_mode["normal"]), total_us(by_mode["low-latency"])
                    add(f"moe low-latency vs normal shm P={P} T={T}, speedup", r, n / l, f"{l:.1f} vs {n:.1f} us")
            zc = [pick(f"{tmp}/moe_layer.{P}.{r}.json", 4096, "normal", d) for d in ("copy", "zero-copy")]
            if all(zc):
                c, z = zc[0]["layer_us_p50"], zc[1]["layer_us_p50"]
                add(f"moe zero-copy layer P={P} T=4096 (copy experts), speedup vs copying dispatch", r, c / z, f"{z / 1e3:.2f} vs {c / 1e3:.2f} ms")
        for T in (1, 8):
            m = mpi_total(f"{tmp}/moe_mpi_tcp.{T}.{r}")
            x = pick(f"{tmp}/moe_decode_tcp.{r}.json", T, "low-latency")
            if m is not None and x is not None:
                add(f"moe low-latency tcp P=2 T={T} dispatch+combine, speedup vs Open MPI tcp", r, m * 1e3 / total_us(x), f"{total_us(x):.1f} vs {m * 1e3:.1f} us")
for name, vals in results.items():
    per = "; ".join(f"rep {r}: x{v:.2f} ({d})" for r, v, d in vals)
    print(f"{name}: median x{statistics.median(v for _, v, _ in vals):.2f}   [{per}]")
PY
