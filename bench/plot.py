"""Draws docs/benchmarks.png from the benchmark's JSON: P1 (calls per second and
latency at a fixed rate, direct vs nginx vs hangar) and P4 (p95 during operations
against the steady p95)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
p1 = results["p1"]
names = [r["name"] for r in p1]
colors = ["#8a8a8a", "#009639", "#3b6fd8", "#7a4fd0"]

fig, (rps, latency, ops) = plt.subplots(1, 3, figsize=(15, 4.5))

rps.bar(names, [r["max_rps"] for r in p1], color=colors)
rps.set_title("P1: most calls per second")
rps.set_ylabel("calls/s")

width = 0.38
xs = range(len(p1))
latency.bar([x - width / 2 for x in xs], [r["p50_ms"] for r in p1], width, label="p50", color=colors)
latency.bar([x + width / 2 for x in xs], [r["p99_ms"] for r in p1], width, label="p99", color=colors, alpha=0.5)
latency.set_xticks(list(xs), names)
latency.set_title(f"P1: latency at {results['p1_fixed_rate']} calls/s (p50 solid, p99 light)")
latency.set_ylabel("ms")

p4 = results["p4"]
labels = [r["name"].split(" (")[0] for r in p4]
ops.barh(labels, [r["p95_ms"] for r in p4], color="#3b6fd8")
steady = results["p4_steady_p95_ms"]
ops.axvline(steady, color="black", linestyle="--", label=f"steady p95 {steady:.2f} ms")
ops.axvline(steady * 1.1, color="red", linestyle=":", label="target: 1.1 × steady")
ops.set_title("P4: p95 during operations")
ops.set_xlabel("ms")
ops.legend(loc="lower right", fontsize=8)

fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"wrote {sys.argv[2]}")
