"""The accuracy search on real models: quantize until an evaluator (a real metric on held-out data) is satisfied.

    python bench/accuracy.py           # writes bench/ACCURACY.md and bench/accuracy.json, after every case
    python bench/accuracy.py digits    # one case again; the others keep their last figures

1. EfficientNet-Lite0, FULL_QUANT with an evaluator: top-1 agreement with the float model on
   300 held-out crops of natural photos, "less than one point lost" (agreement >= 0.99),
   max_evaluations=15; evaluations used, weighted nodes still int8, latency at batch 1 and 8
   beside the float and the plain int8 model.
   The same goal as ``--target top1-agreement>=0.99`` with the crops as ``eval_data``: the
   sensitivity ranking then reads the goal's own samples.
2. The digit CNN, FULL_QUANT with an evaluator that lets no prediction of 1000 held-out
   opencv digits change (top-1 agreement 1.0).
3. PP-OCRv4 rec, ``accuracy_target="cosine>=0.995"`` on ``eval_data`` (60 held-out text
   strips as an .npz): nodes moved, evaluations, latency.
4. ddddocr's YOLOX character detector (``pip install --no-deps ddddocr``; the data of
   ``bench/silu.py``), an evaluator of the score error (the best score of a candidate
   detection moves by at most 0.05 on average over 60 held-out scenes): the range search
   judges the whole output, where box coordinates outweigh scores, so the search first
   tries its other range candidates.
5. MiniLM, WEIGHT_QUANT bit_num=0 with an evaluator of sentence-embedding cosine >= 0.998
   on 256 held-out sentences: the file against the 8-bit weight-only file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run, silu, zoo

HERE = Path(__file__).resolve().parent
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# the machine of the rows measured before each row named its own
EARLIER_MACHINE = "AMD EPYC (AVX2, no VNNI), 2 cores, Linux x86_64, Python 3.11.7"


class Agreement:
    """Top-1 agreement with the float model on held-out inputs; satisfied above ``least``."""

    def __init__(self, inputs: np.ndarray, input_name: str, least: float):
        self.inputs, self.input_name, self.least = inputs, input_name, least
        self.reference = None

    def eval_model(self, model_file, batch_num):
        session = run.quiet_session(Path(model_file))
        top = np.concatenate([session.run(None, {self.input_name: x[np.newaxis]})[0] for x in self.inputs]).argmax(-1)
        if self.reference is None:
            self.reference = top
        return float(np.mean(top == self.reference))

    def is_satisfied(self, original_metric, new_metric):
        return new_metric >= self.least


class EmbeddingCosine:
    """Mean cosine of mean-pooled sentence embeddings against the float model's; satisfied above ``least``."""

    def __init__(self, batches: list[dict], least: float):
        self.batches, self.least, self.reference = batches, least, None

    def embed(self, path: Path) -> np.ndarray:
        from bench import minilm

        session = run.quiet_session(path)
        vectors = np.concatenate([minilm.mean_pool(session.run(None, b)[0], b["attention_mask"])
                                  for b in self.batches])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def eval_model(self, model_file, batch_num):
        vectors = self.embed(Path(model_file))
        if self.reference is None:
            self.reference = vectors
        return float(np.mean((vectors * self.reference).sum(1)))

    def is_satisfied(self, original_metric, new_metric):
        return new_metric >= self.least


class DetectorScoreError:
    """A detector's score error against the float model (``bench/silu.py``'s): the mean absolute change of each
    anchor's best score, over the anchors whose float best score is above 0.1; satisfied at most ``most``."""

    def __init__(self, inputs: np.ndarray, input_name: str, most: float):
        self.inputs, self.input_name, self.most = inputs, input_name, most
        self.reference = None

    def eval_model(self, model_file, batch_num):
        session = run.quiet_session(Path(model_file))
        scores, _ = silu.scores_and_boxes(np.concatenate([session.run(None, {self.input_name: x[np.newaxis]})[0]
                                                          for x in self.inputs]))
        if self.reference is None:
            self.reference = scores
        return silu.score_error(self.reference, scores)

    def is_satisfied(self, original_metric, new_metric):
        return new_metric <= self.most


def weighted_int8(result) -> tuple[int, int]:
    nodes = [n for n in result.quantized_nodes + result.float_nodes if n.op_type in WEIGHTED]
    int8 = [n for n in result.quantized_nodes if n.op_type in WEIGHTED and n.precision in ("int8", "")]
    return len(int8), len(nodes)


def search_row(label: str, result, seconds: float) -> dict:
    accuracy = result.accuracy
    int8, weighted = weighted_int8(result)
    row = {"case": label, "seconds": seconds, "size_ratio": result.size_ratio, "weighted_int8": int8,
           "weighted": weighted, "evaluations": accuracy.evaluations, "original": accuracy.original,
           "quant_config": str(result.quant_config_path)}
    if hasattr(accuracy, "kept"):
        row.update(first=accuracy.first.metric, final=accuracy.final.metric, moved=len(accuracy.kept),
                   int4_weights=accuracy.int4_weights, ladder=list(accuracy.ladder),
                   bytes=result.output_path.stat().st_size,
                   stopped=accuracy.stopped, ranking_seconds=accuracy.ranking_seconds,
                   ranges_kept=accuracy.ranges_kept,
                   near_ties=accuracy.near_ties.line().strip() if accuracy.near_ties else None,
                   trials=[(f"ranges of {t.label}", t.evaluation.metric, t.evaluation.satisfied)
                           for t in accuracy.range_trials]
                   + [(t.label, t.evaluation.metric, t.evaluation.satisfied) for t in accuracy.trials])
    else:
        search = accuracy.search
        final = next(t.evaluation.metric for t in reversed(search.tries) if t.init_scale == search.init_scale)
        row.update(final=final, init_scale=search.init_scale, stopped=search.stopped,
                   average_bits=result.mixed_bits.average_bits,
                   trials=[(t.init_scale, t.average_bits, t.evaluation.metric, t.evaluation.satisfied)
                           for t in search.tries])
    print(f"   {label}: {json.dumps(row)}", flush=True)
    return row


def full_search(case: run.Case, work: Path, evaluator, label: str, batches: tuple[int, ...] = (1, 8),
                **settings) -> dict:
    """The search's row; "int8" in its latencies is the planned model without a search (W4A8 with
    weight_bit_num=4)."""
    import lowbit

    calib = run.write_calibration(case, work)
    plain, searched = work / "int8.onnx", work / "searched.onnx"
    lowbit.quantize(case.model, plain, data=calib, progress=False,
                    **{key: value for key, value in settings.items() if key == "weight_bit_num"})
    start = time.perf_counter()
    result = lowbit.quantize(case.model, searched, data=calib, progress=False, evaluator=evaluator,
                             **settings)
    row = search_row(label, result, time.perf_counter() - start)
    paths = {"float": case.model, "int8": plain, "searched": searched}
    row["latency_ms"] = {str(b): run.compare_latency(paths, {case.input_name: case.evaluation[:b]},
                                                     runs=20 if b == 1 else 8) for b in batches}
    return row


def efficientnet(work: Path) -> dict:
    case = run.efficientnet_case(256, 20)
    held = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    case.evaluation = held
    return full_search(case, work / "efficientnet", Agreement(held, "input", 0.99),
                       "EfficientNet-Lite0, top-1 agreement >= 0.99 on 300 crops", max_evaluations=15)


def efficientnet_target(work: Path) -> dict:
    """The same goal as a built-in --target on the same crops as eval_data: the ranking reads them too."""
    case = run.efficientnet_case(256, 20)
    case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    eval_file = work / "efficientnet-target" / "eval.npz"
    eval_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(eval_file, input=case.evaluation)
    return full_search(case, work / "efficientnet-target", None,
                       "EfficientNet-Lite0, --target top1-agreement>=0.99 with the 300 crops as eval_data",
                       accuracy_target="top1-agreement>=0.99", eval_data=str(eval_file), max_evaluations=15)


def efficientnet_w4a8(work: Path, variant: int = 0) -> dict:
    """W4A8 (weight_bit_num=4) until top-1 agreement >= 0.90 on the 300 crops: which weights go back to 8 bits."""
    case = run.efficientnet_case(256, 20, variant)
    case.evaluation = case.evaluation[np.random.default_rng(1).permutation(len(case.evaluation))[:300]]
    folder = work / f"efficientnet-lite{variant}-w4a8"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "eval.npz", input=case.evaluation)
    return full_search(case, folder, None, f"EfficientNet-Lite{variant} W4A8, --target top1-agreement>=0.90 with "
                       "the 300 crops as eval_data", accuracy_target="top1-agreement>=0.90",
                       eval_data=str(folder / "eval.npz"), weight_bit_num=4, max_evaluations=15)


def digits(work: Path) -> dict:
    case = run.digits_case(256, 1000)
    return full_search(case, work / "digit", Agreement(case.evaluation, "input", 1.0),
                       "digit CNN, no prediction of 1000 held-out digits may change (agreement 1.0)")


def ppocr_rec(work: Path) -> dict:
    case = run.ppocr_rec_case(256)
    work.mkdir(parents=True, exist_ok=True)
    eval_file = work / "rec" / "eval.npz"
    eval_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(eval_file, x=case.evaluation)
    return full_search(case, work / "rec", None, "PP-OCRv4 rec, accuracy_target cosine>=0.995 (60 strips)",
                       accuracy_target="cosine>=0.995", eval_data=str(eval_file))


def yolox(work: Path) -> dict:
    """ddddocr's YOLOX character detector (``pip install --no-deps ddddocr``), the data of ``bench/silu.py``."""
    work.mkdir(parents=True, exist_ok=True)
    calibration, natural = list(zoo.calibration_images().values()), list(zoo.natural_photos().values())
    held = np.concatenate([silu.ddddocr_input(s) for s in zoo.text_on_photos(natural, 60, 1, True)])
    case = run.Case("ddddocr YOLOX", silu.ddddocr_model("common_det", work), "images",
                    [silu.ddddocr_input(s)[0] for s in zoo.text_on_photos(calibration, 64, 0, False)], held)
    return full_search(case, work / "yolox", DetectorScoreError(held, "images", 0.05),
                       "ddddocr YOLOX character detector, score error <= 0.05 on 60 scenes", batches=(1,))


def minilm_widths(work: Path, rounding: str = "NEAREST") -> dict:
    """The mixed-bit search with an evaluator; with weight_rounding=GPTQ the 8-bit file and every candidate
    are GPTQ-rounded, and the search measures each width as GPTQ rounds it."""
    import lowbit
    from bench import minilm as text

    work.mkdir(parents=True, exist_ok=True)
    model = zoo.minilm_encoder("torchscript")
    calib, batches = text.sentence_data()
    evaluator = EmbeddingCosine(batches, 0.998)
    eight = work / "minilm-8bit.onnx"
    settings = dict(quant_type="WEIGHT_QUANT", weight_rounding=rounding)
    lowbit.quantize(model, eight, data=calib, progress=False, bit_num=8, **settings)
    start = time.perf_counter()
    result = lowbit.quantize(model, work / "minilm-mixed.onnx", data=calib, progress=False, evaluator=evaluator,
                             bit_num=0, **settings)
    how = "" if rounding == "NEAREST" else f", weight_rounding={rounding}"
    row = search_row(f"MiniLM weight-only mixed bit{how}, embedding cosine >= 0.998 on 256 sentences", result,
                     time.perf_counter() - start)
    row["bytes"] = run.model_bytes(work / "minilm-mixed.onnx")
    row["bytes_8bit"] = run.model_bytes(eight)
    row["cosine_8bit"] = evaluator.eval_model(str(eight), None)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# The accuracy search on real models", "",
             "`python bench/accuracy.py`; every evaluator scores held-out data (never used for calibration). Each "
             f"case names the machine it ran on (a case that does not: {EARLIER_MACHINE}).", ""]
    for row in rows:
        lines += [f"## {row['case']}", "", f"- machine: {row.get('machine', EARLIER_MACHINE)}"]
        lines.append(f"- float metric {row['original']:.4f}; "
                     + (f"as planned (int8) {row['first']:.4f}; " if "first" in row else "")
                     + f"kept {row['final']:.4f} after {row['evaluations']} evaluations ({row['stopped']}), "
                     f"{row['seconds']:.0f} s in all")
        if "moved" in row:
            lines.append(f"- nodes moved: {row['moved']}; weighted nodes int8: {row['weighted_int8']} of "
                         f"{row['weighted']}; sensitivity ranking {row['ranking_seconds']:.1f} s")
            if row.get("ranges_kept"):
                lines.append(f"- ranges: {row['ranges_kept']}'s, not the range search's choice: "
                             + ("the evaluator accepted them with every node as planned" if not row["moved"] else
                                "of the range search's candidates, its metric came closest to the float model's, "
                                "and the nodes moved from there"))
            if row.get("near_ties"):
                lines.append(f"- {row['near_ties']}")
            for b, ms in row["latency_ms"].items():
                lines.append(f"- latency batch {b}: float {ms['float']:.2f} ms, int8 {ms['int8']:.2f} ms, "
                             f"searched {ms['searched']:.2f} ms (float time / searched time: "
                             f"{ms['float'] / ms['searched']:.2f})")
            lines += ["", "| # | candidate | metric | satisfied |", "|---|---|---|---|"]
            lines += [f"| {i} | {label} | {metric:.4f} | {'yes' if ok else 'no'} |"
                      for i, (label, metric, ok) in enumerate(row["trials"], start=3)]
        else:
            lines.append(f"- init_scale {row['init_scale']:.4g}, average {row['average_bits']:.2f} bits; file "
                         f"{row['bytes'] / 1e6:.2f} MB against {row['bytes_8bit'] / 1e6:.2f} MB at 8 bits "
                         f"({row['bytes'] / row['bytes_8bit']:.2f}x; the 8-bit file's metric "
                         f"{row['cosine_8bit']:.4f})")
            lines += ["", "| init_scale | average bits | metric | satisfied |", "|---|---|---|---|"]
            lines += [f"| {s:.4g} | {b:.2f} | {m:.4f} | {'yes' if ok else 'no'} |" for s, b, m, ok in row["trials"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--markdown"]:  # the tables again from accuracy.json, without running anything
        (HERE / "ACCURACY.md").write_text(markdown(json.loads((HERE / "accuracy.json").read_text())))
        return
    work = zoo.cache_dir("bench", "accuracy")
    only = set(sys.argv[1:])
    cases = {"efficientnet": efficientnet, "efficientnet-target": efficientnet_target,
             "efficientnet-w4a8": efficientnet_w4a8, "efficientnet-lite1-w4a8": lambda work: efficientnet_w4a8(work, 1),
             "digits": digits,
             "ppocr": ppocr_rec, "yolox": yolox, "minilm": minilm_widths,
             "minilm-gptq": lambda work: minilm_widths(work, "GPTQ")}
    kept = json.loads((HERE / "accuracy.json").read_text()) if (HERE / "accuracy.json").exists() else []
    fresh: dict[str, dict] = {}
    for name, case in cases.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        fresh[name] = {"name": name, "machine": run.describe_machine(), **case(work / name)}
        # after every case: a run cut short (the GPTQ case takes half an hour on 2 cores) keeps what it measured,
        # and the cases it did not reach keep their last figures
        rows = [fresh.get(case_name) or next((row for row in kept if row.get("name") == case_name), None)
                for case_name in cases]
        rows = [row for row in rows if row is not None]
        (HERE / "accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
        (HERE / "ACCURACY.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
