"""The best that moving nodes float can do for issue 16's EfficientNet-Lite0 goal, with the answers known.

    python bench/bound_agreement_oracle.py              # about 35 minutes here (about 420 runs over 300 crops)
    python bench/bound_agreement_oracle.py --fit-other  # the same choice made on 300 other crops
    python bench/bound_agreement_oracle.py --fit-other --random 40  # 40 random choices instead
    python bench/bound_agreement_oracle.py --time NODE,NODE,...  # a choice written by lowbit, timed

The default int8 EfficientNet-Lite0 is turned into the switched model of ``lowbit analyze``
(every quantized node can run quantized or float, as a float simulation of its Q/DQ nodes).
Nodes then go float one at a time, each time the one that raises the top-1 agreement with the
float model most *on the 300 evaluation crops themselves* (ties: the lower 1 - cosine), among
the 15 best nodes alone by agreement and the 20 best alone by 1 - cosine, until 10 weighted
nodes are float (issue 16 asks for at least 80% of the 50 int8). No search that must not see
the evaluation crops, and has 15 evaluations, can do better than this choice on them.

With ``--fit-other`` the nodes are chosen the same way on 300 *other* crops (15 new random crops
of each of the same photos, so data far closer to the evaluation crops than calibration data is), and
each step prints the agreement on both: what a search with unlimited runs on data of its own
could reach on the evaluation crops.

``--random N`` (with ``--fit-other``) draws N random sets of 10 weighted nodes among the 20 whose
float alone lowers 1 - cosine on the other crops most, and counts how many reach 0.99 on the
evaluation crops: the odds of a search that has the ranking and guesses the rest.

``--time`` writes the model a choice stands for (``node_config`` float32 for the nodes named,
everything else as the default), and gives its top-1 agreement in ONNX Runtime's integer kernels
on the 300 evaluation crops and its latency at batch 8 beside the float and the default int8 model
(issue 16 also asks for 1.5x float's speed). The search prints its last choice in that form.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
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


def evaluation_case() -> run.Case:
    """EfficientNet-Lite0 with the 300 held-out crops of bench/accuracy.py's goal."""
    case = run.efficientnet_case(256, 20, 0)
    case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    return case


def time_choice(float_nodes: list[str]) -> None:
    """The default int8 model with ``float_nodes`` float32, as lowbit writes it: agreement and latency."""
    import lowbit

    case = evaluation_case()
    calibration = run.write_calibration(case, WORK)
    paths = {"float": case.model, "default int8": WORK / "default.onnx", "choice": WORK / "choice.onnx"}
    lowbit.quantize(case.model, paths["default int8"], data=calibration, progress=False)
    lowbit.quantize(case.model, paths["choice"], data=calibration, progress=False,
                    node_config={name: {"qtype": "float32"} for name in float_nodes})
    reference = run.outputs(case.model, case)
    for name in ("default int8", "choice"):
        agreement, error = agreement_and_error(reference, run.outputs(paths[name], case))
        print(f"{name}: agreement {agreement:.3f}, 1 - cosine {error:.5f}")
    feed = {case.input_name: case.evaluation[:8]}
    latency = run.compare_latency(paths, feed, runs=20)
    print("latency at batch 8: " + ", ".join(f"{name} {ms:.1f} ms ({latency['float'] / ms:.2f}x float's speed)"
                                               for name, ms in latency.items()))
    print("ONNX Runtime's profile of the choice at batch 8, per run: " + ", ".join(
        f"{op} {ms:.2f} ms ({count})" for op, (ms, count) in kernel_time_by_op(paths["choice"], feed).items()))


def agreement_and_error(expected: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean 1 - cosine of ``got`` against ``expected`` (one row a crop)."""
    return (float(np.mean(expected.argmax(-1) == got.argmax(-1))),
            float(1 - np.mean([zoo.cosine(a, b) for a, b in zip(expected, got)])))


def kernel_time_by_op(path: Path, feed: dict[str, np.ndarray], runs: int = 20) -> dict[str, tuple[float, int]]:
    """ONNX Runtime's profiler: per op type, the kernel time of one run in ms and the number of nodes,
    largest first (the nodes ONNX Runtime runs after its own fusions and layout changes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    options.profile_file_prefix = str(WORK / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    profile = Path(session.end_profiling())
    kernel_ms, nodes = Counter(), Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel_ms[event["args"]["op_name"]] += event["dur"] / 1000 / runs
            nodes[event["args"]["op_name"]] += 1
    profile.unlink()
    return {op: (ms, nodes[op] // runs) for op, ms in kernel_ms.most_common()}


def main(fit_other: bool, random_sets: int = 0) -> None:
    import lowbit

    WORK.mkdir(parents=True, exist_ok=True)
    case = evaluation_case()
    evaluation = case.evaluation
    quantized = WORK / "default.onnx"
    lowbit.quantize(case.model, quantized, data=run.write_calibration(case, WORK), progress=False)
    reference = run.outputs(case.model, case)
    kernels = run.outputs(quantized, case)
    print(f"default int8, integer kernels: agreement {np.mean(reference.argmax(-1) == kernels.argmax(-1)):.3f}")
    fit_crops, fit_reference = evaluation, reference
    if fit_other:
        size = zoo.EFFICIENTNET_LITE_SIZES[0]
        other = np.concatenate([zoo.efficientnet_input(c, size) for i, p in enumerate(zoo.natural_photos().values())
                                for c in zoo.crops(p, 15, seed=500 + i)])
        case.evaluation = other
        fit_crops, fit_reference = other, run.outputs(case.model, case)
        print(f"choosing on {len(other)} other crops of the same photos", flush=True)

    float_model = _as_quantize_rewrote(prepare(load_model(case.model)[0]), _load_quantized(quantized),
                                       case.model, quantized)
    switched = switched_model(_load_quantized(quantized), float_model)
    session = make_session(switched.model)
    output = switched.model.graph.outputs[0].name
    names = [n.name for n in switched.nodes]
    weighted = {n.name for n in switched.nodes if n.op_type in WEIGHTED}

    def measure(float_nodes: list[str], crops: np.ndarray = fit_crops,
                expected: np.ndarray = fit_reference) -> tuple[float, float]:
        feeds = switched.feeds(set(names) - set(float_nodes))
        got = np.concatenate([session.run([output], {"input": x[np.newaxis], **feeds})[0] for x in crops])
        return agreement_and_error(expected, got)

    baseline = f"; on the evaluation crops {measure([], evaluation, reference)}" if fit_other else ""
    print(f"{len(names)} quantized nodes, {len(weighted)} weighted; simulated: {measure([])}{baseline}", flush=True)
    alone = {name: measure([name]) for name in names}
    if random_sets:
        ranked = sorted(weighted, key=lambda n: (alone[n][1], n))[:20]  # by name on ties: not the set's order
        rng = np.random.default_rng(0)
        scores = sorted(measure(list(rng.choice(ranked, MOST_WEIGHTED_FLOAT, replace=False)), evaluation, reference)[0]
                        for _ in range(random_sets))
        print(f"{random_sets} random sets of {MOST_WEIGHTED_FLOAT} of the 20 weighted nodes best alone, on the "
              f"evaluation crops: {sum(a >= 0.99 for a in scores)} reach 0.99; agreement min {scores[0]:.3f}, "
              f"median {np.median(scores):.3f}, max {scores[-1]:.3f}")
        return
    by_agreement = sorted(names, key=lambda n: (-alone[n][0], alone[n][1]))
    by_error = sorted(names, key=lambda n: alone[n][1])
    pool = list(dict.fromkeys(by_agreement[:15] + by_error[:20]))
    chosen: list[str] = []
    while sum(n in weighted for n in chosen) < MOST_WEIGHTED_FLOAT:
        trials = {n: measure(chosen + [n]) for n in pool if n not in chosen}
        best = max(trials, key=lambda n: (trials[n][0], -trials[n][1]))
        chosen.append(best)
        on_evaluation = f"; on the evaluation crops {measure(chosen, evaluation, reference)}" if fit_other else ""
        print(f"{len(chosen):2} float: {best}  agreement {trials[best][0]:.3f}  1 - cosine {trials[best][1]:.5f}  "
              f"({sum(n in weighted for n in chosen)} weighted float){on_evaluation}", flush=True)
    print(f"to time it: python bench/bound_agreement_oracle.py --time {','.join(chosen)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-other", action="store_true", help="choose on 300 other crops of the same photos")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="N random choices instead of the greedy one")
    parser.add_argument("--time", metavar="NODE,NODE,...", help="write this choice with lowbit and time it")
    args = parser.parse_args()
    if args.time:
        WORK.mkdir(parents=True, exist_ok=True)
        time_choice(args.time.split(","))
    else:
        main(args.fit_other, args.random)
