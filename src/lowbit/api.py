"""``lowbit.quantize``: the whole job, from a float ONNX file to a checked int8 QDQ file.

Stages: resolve the configuration; load and prepare the graph; plan what to quantize;
stream the calibration data through the float model into the plan's observers; turn
ranges into scales and zero points; rewrite the graph; correct biases with a second
streaming pass; write it atomically.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from .calibration.collector import collect
from .calibration.histogram import HistogramObserver
from .calibration.observers import MinMaxObserver
from .calibration.ranges import Range
from .config import QuantConfig, load_config
from .config.model import CalibrationSource
from .data.feeds import at_most, batched, checked_feeds, input_specs
from .data.images import ImagePreprocess
from .data.sources import DataOptions, folder_samples, list_samples
from .data.split import HOLD_BACK_EVERY, SampleSplit
from .errors import LowbitError, closest
from .graph.loading import load_model, with_opset
from .graph.passes import prepare
from .graph.query import constant_array
from .graph.runtime import make_session
from .graph.saving import check_output_path, save_atomically
from .quantizers.dynamic import DynamicOptions, apply_dynamic, plan_dynamic
from .quantizers.plan import PlanOptions, QuantPlan, plan_quantization
from .quantizers.qdq import activation_qparams, apply_plan
from .quantizers.qparams import QParams
from .quantizers.targets import TARGETS
from .quantizers.weight_only import (
    StoredWeight,
    WeightOnlyOptions,
    WeightOnlyPlan,
    apply_weight_only,
    plan_weight_only,
)
from .recovery.bias_correction import (
    BiasCorrectionReport,
    Layer,
    correct_biases,
    correctable,
)
from .recovery.gptq import SAMPLES as GPTQ_SAMPLES
from .recovery.gptq import RoundingLayer, RoundingReport, compensable, compensate_rounding
from .search.metrics import METRICS, PairStats
from .search.mixed_bits import (
    LayerBits,
    MixedBitReport,
    OutputProbe,
    allocate,
    output_errors,
    shares_of,
    tune_init_scale,
    weight_errors,
    widths,
)
from .search.modelwise import (
    Candidate,
    SearchOptions,
    SearchReport,
    candidates,
    choose_ranges,
)

WEIGHT_SAMPLES = 16  # calibration samples the weight-only mode measures output errors and cosine on
INT4_OPSET = 21  # DequantizeLinear reads int4 and int16 from this opset on


class LowbitWarning(UserWarning):
    """Something the user may want to fix, that does not stop the job."""


@dataclass(frozen=True)
class NodeReport:
    name: str
    op_type: str
    reason: str = ""


@dataclass(frozen=True)
class TensorReport:
    """Calibrated range and quantization parameters of one activation tensor."""

    name: str
    min: float  # the values seen in calibration
    max: float
    range_min: float  # the range quantized (after clipping, before the group's union)
    range_max: float
    scale: float
    zero_point: int
    dtype: str


@dataclass
class QuantizeResult:
    """What :func:`quantize` did: where the model went, what was quantized, and what it cost."""

    output_path: Path
    target: str
    quantized_nodes: list[NodeReport]
    float_nodes: list[NodeReport]
    tensors: dict[str, TensorReport]
    calibration_samples: int
    float_bytes: int
    output_bytes: int
    bias_correction: BiasCorrectionReport | None = None
    weight_rounding: RoundingReport | None = None  # FULL_QUANT with weight_rounding=GPTQ
    search: SearchReport | None = None
    weights: list[StoredWeight] = field(default_factory=list)  # WEIGHT_QUANT: how each weight is stored
    mixed_bits: MixedBitReport | None = None
    output_cosine: float | None = None  # WEIGHT_QUANT with data: output cosine vs float on a few samples
    output_cosine_samples: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.float_bytes if self.float_bytes else float("nan")

    def summary(self) -> str:
        from .reports.summary import format_summary

        return format_summary(self)


FeedSource = str | Path | Iterable[dict[str, np.ndarray]]


def quantize(
    model: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    data: FeedSource | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> QuantizeResult:
    """Quantize ``model`` into ``output`` and return what was done.

    ``config`` is a MindSpore-style INI file; ``settings`` override its keys by name
    (``per_channel=False``, ``target_device="NVGPU"`` ...). ``data`` is the calibration
    data: a folder (.npy, .npz, .bin or image files), or an iterable of feed dicts (input
    name to array; a list, since bias correction reads the data twice). Without it,
    ``calibrate_path`` or ``data_list`` from the configuration is used.
    """
    resolved = load_config(config, settings, describe=lambda key: f"argument {key}=")
    return run(model, output, resolved, data, progress=progress)


def run(
    model: str | Path,
    output: str | Path,
    config: QuantConfig,
    data: FeedSource | None = None,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize with an already resolved configuration (the CLI's entry point)."""
    model_path, output_path = Path(model), Path(output)
    notes: list[str] = []

    def note(message: str) -> None:
        if message in notes:  # the bias-correction pass reads the data again: say things once
            return
        notes.append(message)
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, LowbitWarning, stacklevel=3)

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    check_output_path(output_path, model_path)
    graph_model, float_bytes = load_model(model_path)
    try:
        graph_model = prepare(graph_model)
    except ir.passes.PassError as exc:  # shape inference or a folding rule rejected the graph
        cause = exc.__cause__ or exc
        raise LowbitError(f"{model_path}: the graph could not be prepared for quantization "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
    timings["load"] = time.perf_counter() - clock

    _warn_unknown_skip_nodes(graph_model, config.skip_quant_node, note)
    search, weight_only, rounding = None, None, None
    if config.quant_type == "DYNAMIC_QUANT":
        target_name = "CPU, dynamic"
        plan, samples, tensors, correction = _dynamic(graph_model, config, data, note, timings)
    elif config.quant_type == "WEIGHT_QUANT":
        target_name = "any runtime, weights only" if not config.matmul_nbits else "ONNX Runtime, weights only"
        graph_model, weight_only = _weight(graph_model, config, data, progress, note, timings)
        plan, samples, tensors, correction = weight_only.plan, weight_only.samples, {}, weight_only.correction
    else:
        target_name = config.target
        plan, samples, tensors, correction, search, rounding = _full(graph_model, config, data, progress, note,
                                                                     timings)
    if not plan.quantized_nodes:
        note(f"nothing in {model_path} can be quantized for target {target_name}; the output is the float model")

    clock = time.perf_counter()
    output_bytes = save_atomically(graph_model, output_path)
    timings["save"] = time.perf_counter() - clock

    return QuantizeResult(
        output_path=output_path,
        target=target_name,
        quantized_nodes=[NodeReport(d.node.name, d.node.op_type, f"fused into {d.fused_into}" if d.fused_into else "")
                         for d in plan.quantized_nodes],
        float_nodes=[NodeReport(d.node.name, d.node.op_type, d.reason) for d in plan.float_nodes],
        tensors=tensors,
        calibration_samples=samples,
        bias_correction=correction,
        weight_rounding=rounding,
        search=search,
        weights=weight_only.stored if weight_only else [],
        mixed_bits=weight_only.mixed_bits if weight_only else None,
        output_cosine=weight_only.cosine if weight_only else None,
        output_cosine_samples=len(weight_only.probe_samples) if weight_only else 0,
        float_bytes=float_bytes,
        output_bytes=output_bytes,
        timings=timings,
        warnings=notes,
    )


def _full(model: ir.Model, config: QuantConfig, data, progress: bool, note, timings: dict):
    """Weights and activations int8: plan, calibrate, choose ranges, rewrite, correct biases."""
    target = TARGETS[config.target]
    plan_options = PlanOptions(**_weight_selection(config))
    plan = plan_quantization(model, target, plan_options)
    clock = time.perf_counter()
    samples, ranges, search, observers = 0, {}, None, {}
    specs = input_specs(model)
    if plan.activations:
        feeds, total = _calibration_feeds(specs, config, data, note)
        candidate_list, fallback = _candidates(config, total, note)
        compare = len(candidate_list) > 1
        tune = any(c.method == "AUTO_TUNE" for c in candidate_list) or (config.layerwise_search and compare)
        histograms = any(c.method != "MAX_MIN" for c in candidate_list)
        observers = {name: HistogramObserver(config.max_num_bin) if histograms else MinMaxObserver()
                     for name in plan.activations}
        split = SampleSplit(feeds, total, config.search_samples, hold_back=compare, keep_for_tuning=tune)
        run_stats = collect(model, observers, batched(split, specs, config.calibrate_batch_size),
                            split.statistics_total, progress)
        samples = run_stats.samples
        if compare and not split.held_back:  # a stream of unknown length turned out short
            if config.activation_quant_method is not None:
                split.require_held_back()
            fallback = _too_few_to_search(samples)
            candidate_list = candidates(("MAX_MIN",), config.num_bin, config.max_percentile)
        if fallback:  # said once the data has proved readable, so that it never precedes an error
            note(fallback)
        timings["calibrate"] = time.perf_counter() - clock
        clock = time.perf_counter()
        ranges, search = choose_ranges(
            model, plan, observers,
            SearchOptions(config.search_metric, config.layerwise_search, config.tune_num),
            candidate_list, split.tuning, split.held_back,
            build=lambda candidate: _quantized_copy(model, target, plan_options, candidate))
        timings["search"] = time.perf_counter() - clock

    clock = time.perf_counter()
    qparams = activation_qparams(plan, ranges)
    layers = _correctable_layers(plan) if config.bias_correction else []
    to_round = _rounding_layers(plan) if config.weight_rounding == "GPTQ" and plan.activations else []
    apply_plan(model, plan, qparams)
    timings["rewrite"] = time.perf_counter() - clock

    rounding = None
    if to_round and (feeds := _another_pass(specs, config, data, note, "weight_rounding=GPTQ",
                                            limit=GPTQ_SAMPLES)) is not None:
        rounding = compensate_rounding(model, to_round, *feeds, progress)
        timings["weight_rounding"] = rounding.seconds
    correction = _correct_biases(model, layers, specs, config, data, progress, note, timings)
    return plan, samples, _tensor_reports(observers, ranges, qparams), correction, search, rounding


def _another_pass(specs, config: QuantConfig, data, note: Callable[[str], None], what: str,
                  limit: int | None = None):
    """(batched feeds, total) for one more pass over the calibration data (its first ``limit``
    samples), or None when ``data`` is an iterator, which can be read once."""
    if data is not None and not isinstance(data, (str, Path)) and iter(data) is data:
        note(f"{what} needs another pass over the calibration data, and an iterator can be read once; "
             f"pass a list or a folder ({what} was skipped)")
        return None
    feeds, total = _calibration_feeds(specs, config, data, note)
    if limit is not None:
        feeds, total = itertools.islice(feeds, limit), limit if total is None else min(total, limit)
    return batched(feeds, specs, config.calibrate_batch_size), total


def _correct_biases(model: ir.Model, layers: list[Layer], specs, config: QuantConfig, data, progress: bool,
                    note: Callable[[str], None], timings: dict) -> BiasCorrectionReport | None:
    """Bias correction's second pass over the calibration data (None when there is nothing to do)."""
    if not layers or (feeds := _another_pass(specs, config, data, note, "bias_correction")) is None:
        return None
    correction = correct_biases(model, layers, *feeds, progress)
    timings["bias_correction"] = correction.seconds
    return correction


def _candidates(config: QuantConfig, total: int | None, note: Callable[[str], None]) -> tuple[list[Candidate], str]:
    """The activation-range candidates, and a message when the default search had to fall back.

    The default search holds back every 8th sample to compare methods, so it needs 8 samples.
    """
    methods, fallback = config.activation_quant_method, ""
    if methods is None and total is not None and total < HOLD_BACK_EVERY:
        fallback = _too_few_to_search(total)
        methods = ("MAX_MIN",)
    found = candidates(methods, config.num_bin, config.max_percentile)
    if config.layerwise_search and len(found) < 2:
        note("layerwise_search chooses among several activation_quant_method candidates; with one there is "
             "nothing to choose")
    return found, fallback


def _too_few_to_search(total: int) -> str:
    return (f"with {total} calibration samples lowbit does not search activation_quant_method (it holds "
            f"back every {HOLD_BACK_EVERY}th sample to compare methods, so it needs {HOLD_BACK_EVERY}): "
            "using MAX_MIN")


def _weight_selection(config: QuantConfig) -> dict[str, Any]:
    """The settings of :class:`~lowbit.quantizers.selection.WeightSelection`, which every mode shares."""
    return {"per_channel": config.per_channel, "skip_nodes": frozenset(config.skip_quant_node),
            "min_weight_size": config.min_quant_weight_size,
            "min_weight_channels": config.min_quant_weight_channel}


def _quantized_copy(model: ir.Model, target, plan_options: PlanOptions, ranges: dict[str, Range]):
    """The model quantized with ``ranges``, as a new proto; ``model`` itself is left float."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    plan = plan_quantization(copy, target, plan_options)
    apply_plan(copy, plan, activation_qparams(plan, ranges))
    return ir.serde.serialize_model(copy)


@dataclass
class _WeightOnlyRun:
    plan: WeightOnlyPlan
    stored: list[StoredWeight]
    samples: int = 0
    probe_samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    mixed_bits: MixedBitReport | None = None
    correction: BiasCorrectionReport | None = None
    cosine: float | None = None


def _weight(model: ir.Model, config: QuantConfig, data, progress: bool, note, timings: dict):
    """Weights only: plan, choose widths (fixed, or mixed by init_scale / auto_tune), rewrite, correct biases.

    Data is optional. Given, it measures mixed-bit output errors, drives bias correction,
    and gives the output cosine against the float model on its first WEIGHT_SAMPLES samples.
    """
    has_data = data is not None or config.calibrate_path is not None or config.data_list is not None
    if config.auto_tune and not has_data:
        raise LowbitError(f"{config.source('auto_tune')}: auto_tune measures the model's output cosine on "
                          "calibration data: give --data FOLDER (or calibrate_path / data_list)")
    if not has_data and not config.is_default("bias_correction") and config.bias_correction:
        raise LowbitError(f"{config.source('bias_correction')}: bias_correction is measured on calibration "
                          "data: give --data FOLDER (or calibrate_path / data_list), or leave it unset")
    opset21 = False
    if config.bit_num <= 4 or config.bit_num > 8:  # 0 (mixed) may choose 4 or 16 bits
        upgraded = with_opset(model, INT4_OPSET)
        if upgraded is not None:
            model, opset21 = upgraded, True
        elif config.bit_num > 8:
            raise LowbitError(f"bit_num={config.bit_num} stores weights in int16, which DequantizeLinear reads "
                              f"from opset {INT4_OPSET} on, and onnx's converter could not take the model there")
        else:
            note(f"the model could not be converted to opset {INT4_OPSET}, which int4 and int16 weights need: "
                 "weights are stored in int8" + (" (the mixed-bit search keeps 8 bits)" if config.bit_num == 0 else ""))
    options = WeightOnlyOptions(
        **_weight_selection(config),
        opset21=opset21,
        matmul_nbits=config.matmul_nbits,
        block_size=config.block_size,
    )
    plan = plan_weight_only(model, options)
    specs = input_specs(model)
    probe_samples = []
    if has_data:
        feeds, _ = _calibration_feeds(specs, config, data, note)
        probe_samples = list(itertools.islice(feeds, WEIGHT_SAMPLES))
        if not probe_samples:
            raise LowbitError("the calibration data holds no samples")
    reference = _model_outputs(model, probe_samples) if probe_samples else []
    clock = time.perf_counter()
    mixed = None
    if config.bit_num == 0:
        mixed = _mixed_bits(model, plan, config, probe_samples, opset21, progress)
        bits = mixed.bits
    else:
        bits = {name: config.bit_num for name in plan.tensors}
    timings["mixed_bits"] = time.perf_counter() - clock

    clock = time.perf_counter()
    layers = []
    if config.bias_correction and has_data:
        layers = [Layer(node, tensor.array, constant_array(node.inputs[2]) if len(node.inputs) > 2 else None)
                  for tensor in plan.tensors.values() for node, index in tensor.readers
                  if index == 1 and correctable(node)]
    stored = apply_weight_only(model, plan, bits, options)
    timings["rewrite"] = time.perf_counter() - clock

    result = _WeightOnlyRun(plan, stored, len(probe_samples), probe_samples, mixed)
    result.correction = _correct_biases(model, layers, specs, config, data, progress, note, timings)
    if result.correction is not None:
        result.samples = max(result.samples, result.correction.samples)
    if probe_samples:
        result.cosine = _output_cosine(model, probe_samples, reference)
    return model, result


def _model_outputs(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = make_session(model)
    names = [o.name for o in session.get_outputs() if o.type == "tensor(float)"]
    return [session.run(names, feed) for feed in samples]


def _output_cosine(model: ir.Model, samples: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]]) -> float:
    """Cosine similarity of the model's float outputs to ``reference`` over ``samples``, as ONNX Runtime runs it."""
    stats = PairStats()
    for outputs, expected in zip(_model_outputs(model, samples), reference):
        for actual, wanted in zip(outputs, expected):
            stats.update(actual, wanted)
    return METRICS["cosine-similarity"].value(stats)


def _mixed_bits(model: ir.Model, plan: WeightOnlyPlan, config: QuantConfig, samples: list, opset21: bool,
                progress: bool) -> MixedBitReport:
    choices = widths(opset21)
    shares = shares_of(plan)
    if not samples:
        errors = weight_errors(plan, choices)
        bits = allocate(errors, shares, config.init_scale, choices)
        return _mixed_report(plan, config.init_scale, "weights", errors, bits)
    probe = OutputProbe(model, plan, samples, correct_biases=config.bias_correction)
    with tqdm(total=len(plan.tensors) * (len(choices) - 1), desc="measuring layer errors", unit="run",
              disable=None if progress else True) as bar:
        errors = output_errors(plan, probe, choices, step=lambda: bar.update(1))
    where = f"model outputs on {len(samples)} calibration samples"
    if config.auto_tune:
        init_scale, bits, cosine, tries = tune_init_scale(plan, probe, errors, choices)
        report = _mixed_report(plan, init_scale, where, errors, bits)
        report.auto_tuned, report.cosine, report.tries = True, cosine, tries
        return report
    bits = allocate(errors, shares, config.init_scale, choices)
    return _mixed_report(plan, config.init_scale, where, errors, bits)


def _mixed_report(plan: WeightOnlyPlan, init_scale: float, where: str, errors, bits) -> MixedBitReport:
    layers = [LayerBits(name, tuple(node.name for node, _ in tensor.readers), tensor.size, bits[name],
                        errors[name]) for name, tensor in plan.tensors.items()]
    return MixedBitReport(init_scale, where, layers)


def _dynamic(model: ir.Model, config: QuantConfig, data, note, timings: dict):
    """int8 weights, activations quantized at run time: no calibration."""
    if data is not None or config.calibrate_path is not None or config.data_list is not None:
        note("DYNAMIC_QUANT computes activation scales at run time; the calibration data is not used")
    clock = time.perf_counter()
    options = DynamicOptions(
        **_weight_selection(config),
        activation_matmul=config.dynamic_quant_activation_matmul,
        granularity=config.dynamic_quant_granularity,
    )
    plan = plan_dynamic(model, options)
    apply_dynamic(model, plan, options)
    timings["rewrite"] = time.perf_counter() - clock
    return plan, 0, {}, None


def _warn_unknown_skip_nodes(model: ir.Model, names: tuple[str, ...], note: Callable[[str], None]) -> None:
    known = [node.name for node in model.graph]
    for name in names:
        if name not in known:
            near = closest(name, known)
            hint = f"; closest node names: {', '.join(near)}" if near else ""
            note(f"skip_quant_node names '{name}', which is not a node of the model{hint}")


def _calibration_feeds(specs, config: QuantConfig, data: FeedSource | None, note: Callable[[str], None]):
    """The stream of checked feed dicts and its length (None when unknown)."""
    size = config.calibrate_size
    if data is not None and not isinstance(data, (str, Path)):
        known = _len_or_none(data)
        feeds = at_most(checked_feeds(data, specs), size, known, "the samples passed as data")
        return feeds, size if size is not None else known
    options = data_options(config)
    if data is not None:
        samples = folder_samples((CalibrationSource(Path(data)),), specs, size, options)
    elif config.data_list is not None:
        if config.calibrate_path is not None:
            raise LowbitError(f"give calibrate_path ({config.source('calibrate_path')}) or data_list "
                              f"({config.source('data_list')}), not both")
        samples = list_samples(Path(config.data_list), specs, size, options)
    elif config.calibrate_path is not None:
        samples = folder_samples(config.calibrate_path, specs, size, options)
    else:
        raise LowbitError("full quantization needs calibration data: give --data FOLDER or --data-list FILE "
                          "(calibrate_path or data_list in [data_preprocess_param])")
    samples.warn = note
    return samples, len(samples)


def data_options(config: QuantConfig) -> DataOptions:
    """The data-layer view of the [data_preprocess_param] settings."""
    return DataOptions(
        input_type=config.input_type,
        images=ImagePreprocess(
            to_format=config.image_to_format,
            resize=_pair(config, "resize_width", "resize_height"),
            resize_method=config.resize_method,
            center_crop=_pair(config, "center_crop_width", "center_crop_height"),
            mean=config.normalize_mean,
            std=config.normalize_std,
        ),
        input_layout=config.input_layout,
        bin_layout=config.input_data_format,
        shapes=config.input_shape or {},
        skip_bad_samples=config.skip_bad_samples,
    )


def _pair(config: QuantConfig, width_key: str, height_key: str) -> tuple[int, int] | None:
    width, height = getattr(config, width_key), getattr(config, height_key)
    if (width is None) != (height is None):
        given = width_key if width is not None else height_key
        raise LowbitError(f"{config.source(given)}: {given} needs {width_key} and {height_key} together")
    return None if width is None else (width, height)


def _len_or_none(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _correctable_layers(plan: QuantPlan) -> list[Layer]:
    """The int8 Conv/Gemm layers, with their float weight and bias as they are before the rewrite."""
    layers = []
    for slot in plan.weights:
        node = slot.node
        if slot.index == 1 and correctable(node):
            bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
            layers.append(Layer(node, constant_array(node.inputs[1]), bias))
    return layers


def _rounding_layers(plan: QuantPlan) -> list[RoundingLayer]:
    """The integer weights GPTQ can re-round (Conv/Gemm/MatMul), with their float values before the rewrite."""
    return [RoundingLayer(slot.node, constant_array(slot.node.inputs[1]), slot.scheme.qmin, slot.scheme.qmax)
            for slot in plan.weights if slot.index == 1 and compensable(slot.node)]


def _tensor_reports(observers: dict, ranges: dict[str, Range], qparams: dict[str, QParams]) -> dict[str, TensorReport]:
    reports = {}
    for name, observer in observers.items():
        lo, hi = observer.range()
        q = qparams[name]
        reports[name] = TensorReport(name, float(lo), float(hi), *ranges[name], float(q.scale), int(q.zero_point),
                                     q.scheme.qtype.name)
    return reports
