"""How close can K levels come to uniform int8? A floor under issue 17's figures.

    python bench/levels_bound.py             # writes bench/LEVELS_BOUND.md and levels_bound.json (about 11 minutes)
    python bench/levels_bound.py --markdown  # the tables again from levels_bound.json

weight_levels=K gives a layer K integers that all its output channels share. Giving each output
channel its own K integers, each set the optimum for that channel (the same exact dynamic program
as lowbit's, run per channel), is a superset of every per-layer choice: with the same rounding
(GPTQ onto the levels, from the same second moments) its error is, in practice, the least a
per-layer scheme can hope for. This probe quantizes with that per-channel choice by swapping lowbit's layer
rounding for one run (lookup tables keep all 256 levels, a superset too); it is not a format lowbit
writes (the integers stay unpacked, and a codebook per channel would cost more than K levels save on
small channels).

Same models and data as bench/levels.py: EfficientNet-Lite0 and Lite1 W8A8 (300 held-out crops,
1 - cosine and top-1 agreement against float), MiniLM weight-only 8 bits with GPTQ (256 held-out
sentences, embedding cosine).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import levels, recovery, run, zoo

HERE = Path(__file__).resolve().parent
COUNT = 32


@contextmanager
def levels_per_channel():
    """While open, weight_levels=K rounds every output channel onto its own K optimal integers, and lookup
    tables (MiniLM's word embeddings) keep all 256 (also a superset of any choice of K)."""
    import onnx_ir as ir

    from lowbit.passes import round_weights
    from lowbit.quantizers.levels import optimal_levels
    from lowbit.recovery import gptq

    def nearest(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Nearest level of each value; ``levels`` (groups, outputs, K), ``values`` (groups, outputs[, D])."""
        table = levels if values.ndim == 2 else levels[:, :, None, :]
        index = np.argmin(np.abs(values[..., None] - table), axis=-1)
        return np.take_along_axis(table, index[..., None], axis=-1)[..., 0].astype(np.float64)

    def on_grid(values, qmin, qmax, levels):
        return np.clip(np.rint(values), qmin, qmax) if levels is None else nearest(np.clip(values, qmin, qmax), levels)

    def round_layer(layer, covariance, count, refine, compensate, report):
        if count is None or not np.all(np.isfinite(covariance)):
            return original(layer, covariance, count, refine, compensate, report)
        dq = gptq.integer_weight(layer.node)
        rows = gptq.as_rows(layer.node, layer.float_weight)
        scale, zero_point = gptq._grid(dq, rows.shape[:2])
        values = rows / scale[..., None] + zero_point[..., None]
        diagonal = np.arange(covariance.shape[-1])
        importance = scale[..., None] ** 2 * np.maximum(covariance[:, diagonal, diagonal], 0)[:, None, :] + 1e-30
        levels = np.empty(rows.shape[:2] + (count,))
        for g, o in np.ndindex(*rows.shape[:2]):
            chosen = optimal_levels(values[g, o], importance[g, o], count, layer.qmin, layer.qmax)
            levels[g, o] = np.pad(chosen, (0, count - len(chosen)), mode="edge")
        nearest_q = nearest(np.clip(values, layer.qmin, layer.qmax), levels).astype(np.int64)
        q = gptq._round_with_fallback(rows, covariance, scale, zero_point, layer, levels)[0]
        error_nearest = gptq._layer_error(rows, nearest_q, scale, zero_point, covariance)
        if q is None or gptq._layer_error(rows, q, scale, zero_point, covariance) >= error_nearest:
            q = nearest_q
        stored = gptq.constant_array(dq.inputs[0])
        dq.inputs[0].const_value = ir.tensor(gptq.from_rows(layer.node, q, stored.shape).astype(stored.dtype),
                                             name=dq.inputs[0].name)
        report.layers += 1
        return error_nearest, gptq._layer_error(rows, q, scale, zero_point, covariance)

    original, original_on_grid, original_tables = gptq._round_layer, gptq._on_grid, round_weights._table_levels
    gptq._round_layer, gptq._on_grid, round_weights._table_levels = round_layer, on_grid, lambda state: []
    try:
        yield
    finally:
        gptq._round_layer, gptq._on_grid, round_weights._table_levels = original, original_on_grid, original_tables


VARIANTS = (("uniform (256)", None, False), (f"{COUNT} levels per layer", COUNT, False),
            (f"{COUNT} levels per output channel (floor)", COUNT, True))


def measured(work: Path, quantize, measure) -> dict:
    """Each of VARIANTS quantized by ``quantize(out, count)`` and scored by ``measure(out)``."""
    rows = {}
    for label, count, per_channel in VARIANTS:
        out = work / f"bound-{label.split(' (')[0].replace(' ', '-')}.onnx"
        start = time.perf_counter()
        with levels_per_channel() if per_channel else nullcontext():
            quantize(out, count)
        rows[label] = {**measure(out), "seconds": time.perf_counter() - start}
        print(f"  {label}: {rows[label]}", flush=True)
    return rows


def image_model(case: run.Case, work: Path) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    calib = run.write_calibration(case, work)
    reference = run.outputs(case.model, case)
    rows = measured(work, lambda out, count: lowbit.quantize(case.model, out, data=calib, progress=False,
                                                             weight_levels=count),
                    lambda out: recovery.measure(case, out, reference))
    return {"case": case.name, "inputs": len(case.evaluation), "rows": rows}


def minilm(work: Path) -> dict:
    import lowbit

    work.mkdir(parents=True, exist_ok=True)
    model, calib, cosine = levels.minilm_case()
    rows = measured(work, lambda out, count: lowbit.quantize(model, out, data=calib, progress=False,
                                                             quant_type="WEIGHT_QUANT", bit_num=8,
                                                             weight_rounding="GPTQ", weight_levels=count),
                    lambda out: {"cosine": cosine.eval_model(str(out), None)})
    return {"case": "MiniLM weight-only, 8 bits, GPTQ", "inputs": sum(len(b["input_ids"]) for b in cosine.batches),
            "rows": rows}


def markdown(models: list[dict]) -> str:
    lines = [f"# {COUNT} levels: per layer (weight_levels) against a floor (each output channel its own levels)", "",
             f"Machine: {run.describe_machine()}. `python bench/levels_bound.py`; held-out inputs only. The floor "
             "is a probe, not a format lowbit writes (see the script's docstring).", ""]
    for model in models:
        rows = model["rows"]
        uniform = rows["uniform (256)"]
        lines += [f"## {model['case']} ({model['inputs']} held-out inputs)", ""]
        if "agreement" in uniform:
            lines += ["| weights | 1 - cosine | x uniform | top-1 agreement | quantize |", "|---|---|---|---|---|"]
            lines += [f"| {label} | {row['error']:.5f} | {row['error'] / uniform['error']:.1f} | "
                      f"{row['agreement']:.3f} | {row['seconds']:.0f} s |" for label, row in rows.items()]
        else:
            lines += ["| weights | embedding cosine | 1 - cosine, x uniform | quantize |", "|---|---|---|---|"]
            lines += [f"| {label} | {row['cosine']:.5f} | {(1 - row['cosine']) / (1 - uniform['cosine']):.1f} | "
                      f"{row['seconds']:.0f} s |" for label, row in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:
        (HERE / "LEVELS_BOUND.md").write_text(markdown(json.loads((HERE / "levels_bound.json").read_text())))
        return
    work = zoo.cache_dir("bench", "levels_bound")
    models = []
    for name, case in recovery.cases().items():
        if name.startswith("EfficientNet"):
            print(f"== {name}", flush=True)
            models.append(image_model(case, work / name.split(" ")[0].lower()))
    print("== MiniLM", flush=True)
    models.append(minilm(work / "minilm"))
    (HERE / "levels_bound.json").write_text(json.dumps(models, indent=1) + "\n")
    (HERE / "LEVELS_BOUND.md").write_text(markdown(models))


if __name__ == "__main__":
    main()
