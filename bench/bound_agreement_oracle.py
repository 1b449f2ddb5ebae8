"""The best that moving nodes float can do for issue 16's EfficientNet-Lite0 goal, with the answers known.

    python bench/bound_agreement_oracle.py   # about 35 minutes here (about 420 runs over 300 crops)

The default int8 EfficientNet-Lite0 is turned into the switched model of ``lowbit analyze``
(every quantized node can run quantized or float, as a float simulation of its Q/DQ nodes).
Nodes then go float one at a time, each time the one that raises the top-1 agreement with the
float model most *on the 300 evaluation crops themselves* (ties: the lower 1 - cosine), among
the 15 best nodes alone by agreement and the 20 best alone by 1 - cosine, until 10 weighted
nodes are float (issue 16 asks for at least 80% of the 50 int8). No search that must not see
the evaluation crops, and has 15 evaluations, can do better than this choice on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, zoo
from lowbit.analysis.analyze import _as_quantize_rewrote, _load_quantized
from lowbit.analysis.switches import switched_model
from lowbit.graph.loading import load_model
from lowbit.graph.passes import prepare
from lowbit.graph.runtime import make_session

WORK = zoo.CACHE / "bench" / "bound_agreement"
WEIGHTED = ("Conv", "Gemm", "MatMul")
MOST_WEIGHTED_FLOAT = 10


def main() -> None:
    import lowbit

    WORK.mkdir(parents=True, exist_ok=True)
    case = run.efficientnet_case(256, 20, 0)
    case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    quantized = WORK / "default.onnx"
    lowbit.quantize(case.model, quantized, data=run.write_calibration(case, WORK), progress=False)
    reference = run.outputs(case.model, case)
    kernels = run.outputs(quantized, case)
    print(f"default int8, integer kernels: agreement {np.mean(reference.argmax(-1) == kernels.argmax(-1)):.3f}")

    float_model = _as_quantize_rewrote(prepare(load_model(case.model)[0]), _load_quantized(quantized),
                                       case.model, quantized)
    switched = switched_model(_load_quantized(quantized), float_model)
    session = make_session(switched.model)
    output = switched.model.graph.outputs[0].name
    names = [n.name for n in switched.nodes]
    weighted = {n.name for n in switched.nodes if n.op_type in WEIGHTED}

    def measure(float_nodes: list[str]) -> tuple[float, float]:
        feeds = switched.feeds(set(names) - set(float_nodes))
        got = np.concatenate([session.run([output], {"input": x[np.newaxis], **feeds})[0] for x in case.evaluation])
        return (float(np.mean(reference.argmax(-1) == got.argmax(-1))),
                float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(reference, got)])))

    print(f"{len(names)} quantized nodes, {len(weighted)} weighted; simulated: {measure([])}", flush=True)
    alone = {name: measure([name]) for name in names}
    by_agreement = sorted(names, key=lambda n: (-alone[n][0], alone[n][1]))
    by_error = sorted(names, key=lambda n: alone[n][1])
    pool = list(dict.fromkeys(by_agreement[:15] + by_error[:20]))
    chosen: list[str] = []
    while sum(n in weighted for n in chosen) < MOST_WEIGHTED_FLOAT:
        trials = {n: measure(chosen + [n]) for n in pool if n not in chosen}
        best = max(trials, key=lambda n: (trials[n][0], -trials[n][1]))
        chosen.append(best)
        print(f"{len(chosen):2} float: {best}  agreement {trials[best][0]:.3f}  1 - cosine {trials[best][1]:.5f}  "
              f"({sum(n in weighted for n in chosen)} weighted float)", flush=True)


if __name__ == "__main__":
    main()
