"""Plot output throughput against concurrency from bench JSON files: ``python bench/plot.py DIR OUT.png``.

Reads ``tripod-<engine>-c<N>.json`` (as bench/cpu_compare.sh and bench/gpu.sh name them) and draws one line
per engine.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(folder: str, out: str) -> None:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    machine = ""
    for path in sorted(Path(folder).glob("*.json")):
        match = re.fullmatch(r"(?:tripod-)?(hf-cb|hf)-c(\d+)", path.stem)
        if not match:
            continue
        result = json.loads(path.read_text())
        if "output_throughput" not in result:
            continue
        series[match.group(1)].append((int(match.group(2)), result["output_throughput"]))
        info = result.get("machine", {})
        machine = f"{info.get('cuda_device') or str(info.get('cpu_count', '?')) + ' CPU cores'}"
    figure, axis = plt.subplots(figsize=(6, 4))
    for engine, points in sorted(series.items()):
        points.sort()
        axis.plot([c for c, _ in points], [t for _, t in points], marker="o", label=f"Tripod {engine}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent SSE streams")
    axis.set_ylabel("output tokens/s (all streams)")
    axis.set_title(f"Output throughput vs concurrency ({machine})")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
