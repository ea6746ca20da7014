#!/usr/bin/env bash
# Issue-3 evidence on the CPU of a GPU host: build the CPU attention extension with that host's own
# compiler and Python, run its tests (every ISA the CPU has, the
# two-process doorbell tests), `neo probe-bandwidth`, and benchmarks/cpu_attention.py.
# Run from the repository root with .whl/ present (pyzmq for the process tests; see env.sh).
# Everything lands in $OUT: host.txt, build.log, tests.txt, probe.json, cpu_attention/{json,png}, bench.txt
set -uo pipefail
source benchmarks/gpu_host/env.sh
{ lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Socket|NUMA node\(s\)|L3|Flags' | sed 's/^Flags:.*\(avx512[a-z_0-9]*\).*/Flags: ... \1 .../'
  grep -E 'MemTotal|MemAvailable' /proc/meminfo; g++ --version | head -1; python3 --version
  cat /sys/fs/cgroup/cpu.max 2>/dev/null; nproc; } > "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"

# 1. build: setup.py first (same flags as `pip install`), else the same units straight through g++.
CSRC=services/common/host_kernel/csrc
SUFFIX=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
T0=$(date +%s)
if ! NEO_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
   || [ ! -f "services/common/host_kernel/_native$SUFFIX" ]; then
  echo "setup.py build failed (see build.log); compiling with g++ directly" | tee -a "$OUT/build.log"
  INC="$(python3 -m pybind11 --includes) -I$CSRC"
  mkdir -p /tmp/neo_obj
  ls $CSRC/*.cpp | xargs -P 8 -I{} sh -c \
    "g++ -O3 -fno-math-errno -fno-trapping-math -std=c++20 -fPIC -fvisibility=hidden -Wall -Wno-psabi $INC -c {} -o /tmp/neo_obj/\$(basename {} .cpp).o" \
    >> "$OUT/build.log" 2>&1
  g++ -shared -pthread /tmp/neo_obj/*.o -o "services/common/host_kernel/_native$SUFFIX" >> "$OUT/build.log" 2>&1
fi
echo "build: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/build.log"
python3 -c 'from neo_common.host_kernel import kernel; from neo_common.host_kernel.cpus import available_cpus; print("isa", kernel.isa(), "threads", kernel.get_num_threads(), "available_cpus", available_cpus())' \
  | tee -a "$OUT/host.txt"

# 2. tests (kernel vs torch reference on every ISA of this CPU, segment, two real processes)
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/common/test_host_kernel.py tests/common/test_host_cpus.py \
  tests/common/test_segment.py tests/cpu_attention 2>&1 | tee "$OUT/tests.txt" | tail -5

# 3. the operator's probe (one JSON line), all threads and one thread
python3 -m neo_common.cli probe-bandwidth --json | tee "$OUT/probe.json"
python3 -m neo_common.cli probe-bandwidth --json --threads 1 | tee -a "$OUT/probe.json"

# 4. the benchmark (all CPUs; one fewer for the handoff's serving side)
timeout 400 python3 benchmarks/cpu_attention.py --out "$OUT/cpu_attention" 2>&1 | tee "$OUT/bench.txt"
