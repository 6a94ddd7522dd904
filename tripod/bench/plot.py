"""Output throughput against concurrency, one line per engine, drawn from the bench's JSON files.

It reads the ``tripod-<engine>-c<N>.json`` (or ``<engine>-c<N>.json``) files that ``scripts/cpu_compare.sh`` and
``scripts/gpu.sh`` write, so that how an engine scales with concurrent streams shows at a glance; the plot in
docs/BENCHMARKS.md is drawn with it.
"""

from __future__ import annotations

import argparse
import json
import re
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The folder to read and the image to write, from the command line."""
    parser = argparse.ArgumentParser(prog="python -m tripod.bench.plot", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of bench JSON files")
    parser.add_argument("out", help="the image to write, e.g. throughput-vs-concurrency.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(args.folder, args.out)
