"""Calibration and the default search on Ray workers, against one process, on this machine.

    python bench/distributed.py      # writes bench/DISTRIBUTED.md and bench/distributed.json

For EfficientNet-Lite0 (256 calibration samples, the bench's) and the digit CNN (72 samples):
the whole default job (calibration, the range search's 4 candidates, GPTQ, bias correction)
with no workers, then ``workers=1`` and ``workers=2``, each starting and stopping its own
local Ray (what ``lowbit quantize --workers N`` does), then the same on a Ray started
beforehand (what joining a running cluster costs). Per job: the total, each run over the
data, the search's scoring, and whether the written model is the one-process model.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo

HERE = Path(__file__).resolve().parent


def constants(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def job(model: Path, calib: Path, out: Path, workers: int | None) -> dict:
    import lowbit

    start = time.perf_counter()
    result = lowbit.quantize(model, out, data=calib, progress=False, workers=workers)
    return {"workers": workers, "seconds": time.perf_counter() - start,
            "data_passes": {p.what: p.seconds for p in result.data_passes},
            "search_scoring": result.timings.get("choose_ranges", 0.0)}


def case(name: str, model: Path, calib: Path, work: Path) -> dict:
    import ray

    work.mkdir(parents=True, exist_ok=True)
    rows = [job(model, calib, work / "alone.onnx", None)]
    reference = constants(work / "alone.onnx")
    for started in (False, True):
        if started:
            begin = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            init_seconds = time.perf_counter() - begin
        for workers in (1, 2):
            out = work / f"w{workers}.onnx"
            row = job(model, calib, out, workers)
            row["ray_started_before"] = started
            written = constants(out)
            row["same_model"] = all(np.array_equal(reference[k], written[k]) for k in reference)
            rows.append(row)
            print(f"   {name} workers={workers} started_before={started}: {row['seconds']:.1f} s, "
                  f"same model {row['same_model']}", flush=True)
        if started:
            ray.shutdown()
    return {"name": name, "rows": rows, "ray_init_seconds": init_seconds}


def markdown(cases: list[dict]) -> str:
    lines = ["# Calibration and the default search on Ray workers", "",
             f"Machine: {run.describe_machine()}, so two workers share the two cores the single process has. "
             "`python bench/distributed.py`.", ""]
    for c in cases:
        alone = c["rows"][0]
        lines += [f"## {c['name']}", "",
                  f"Ray's start on its own (`ray.init`, 2 CPUs): {c['ray_init_seconds']:.1f} s.", "",
                  "| workers | Ray | total s | vs one process | calibration run s | search scoring s | "
                  "same model |", "|---|---|---|---|---|---|---|"]
        for row in c["rows"]:
            calibration = next((s for what, s in row["data_passes"].items() if what.startswith("calibrate")), 0.0)
            ray_label = "-" if row["workers"] is None else ("running" if row["ray_started_before"] else
                                                           "started by the job")
            lines.append(f"| {row['workers'] or 'none'} | {ray_label} | {row['seconds']:.1f} | "
                         f"{row['seconds'] / alone['seconds']:.2f}x | {calibration:.1f} | "
                         f"{row['search_scoring']:.1f} | {row.get('same_model', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    work = zoo.cache_dir("bench", "distributed")
    digits = run.digits_case(72, 10)
    cases = [
        case("EfficientNet-Lite0, 256 samples", zoo.efficientnet_lite0("torchscript"),
             zoo.cache_dir("bench", "efficientnet-lite0", "calib"), work / "efficientnet"),
        case("digit CNN, 72 samples", digits.model, run.write_calibration(digits, work / "digits"),
             work / "digits"),
    ]
    (HERE / "distributed.json").write_text(json.dumps(cases, indent=1) + "\n")
    (HERE / "DISTRIBUTED.md").write_text(markdown(cases))


if __name__ == "__main__":
    main()
