#!/usr/bin/env bash
# On a host with an NVIDIA GPU: `gpu-agent run` releases a hoarding command for idling (real
# NVML readings), while `serve-metrics` and `status` read the same GPU. Getters only: no setter
# is called (power capping stays off). Usage: bash tests/gpu_check.sh OUT_DIR
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
state=$(mktemp -d); fleet=$state.toml
sed -e 's/^tick_seconds = 60/tick_seconds = 1/' -e 's/^idle_timeout_minutes = 30/idle_timeout_minutes = 0.25/' \
    -e 's/^low_util_window_minutes = 10/low_util_window_minutes = 0.1/' fleet/data/host_fleet.toml > "$fleet"
ga() { python3 -m graph.cli "$@"; }
python3 -m graph.cli run --backend nvml --fleet "$fleet" --state-dir "$state" --project hoarder --count 1 --hours 1 \
   --grace 5 --json -- python3 tests/gpu_load.py hoard 40 > "$out/run.json" 2> "$out/run.err" &
run=$!
sleep 10
ga status --backend nvml --fleet "$fleet" --state-dir "$state" > "$out/status-hoarding.txt" 2>&1
python3 -m graph.cli serve-metrics --backend nvml --fleet "$fleet" --state-dir "$state" --port 0 --json > "$state.port" 2>&1 &
metrics=$!
for _ in $(seq 50); do grep -q port "$state.port" && break; sleep 0.2; done
port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['port'])" "$state.port")
python3 -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" \
   "http://127.0.0.1:$port/metrics" > "$out/metrics.txt"
kill -TERM $metrics; wait $metrics; echo "serve-metrics exit $?" >> "$out/exits.txt"
wait $run; echo "run exit $?" >> "$out/exits.txt"
ga history --backend nvml --fleet "$fleet" --state-dir "$state" > "$out/history.txt" 2>&1
ga status --backend nvml --fleet "$fleet" --state-dir "$state" > "$out/status-after.txt" 2>&1
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> "$out/status-after.txt"
