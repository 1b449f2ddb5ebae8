"""Built-in evaluators: ``accuracy_target`` goals that need no Python from the user.

``--target EXPR`` names a metric, a comparison and a threshold:

* ``cosine>=0.999``: the mean cosine similarity of the first output against the float
  model's, per sample (per row of a batch);
* ``top1-agreement>=0.99``: the share of samples whose argmax of the first output (over its
  last axis) is the float model's;
* ``accuracy-drop<0.01``: the argmax against the ``label`` array of the evaluation data,
  the float model's accuracy minus the quantized model's.

They score the samples of ``eval_data`` (an ``.npz`` file: one array per model input,
batch first, and ``label`` for accuracy-drop) or, without it, the calibration samples that
the statistics never saw (held back as the activation search holds them back).
"""

from __future__ import annotations

import operator
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..data.feeds import InputSpec, batched, check_sample
from ..errors import LowbitError, did_you_mean
from ..search.metrics import compare
from .evaluator import Evaluator

METRICS = ("cosine", "top1-agreement", "accuracy-drop")
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
LABEL = "label"
BATCH = 32  # rows per run where the model's batch dimension is free

_EXPRESSION = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Goal:
    metric: str
    comparison: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.threshold:g}"

    @property
    def needs_labels(self) -> bool:
        return self.metric == "accuracy-drop"

    def met(self, original: float, new: float) -> bool:
        value = original - new if self.metric == "accuracy-drop" else new
        return bool(COMPARISONS[self.comparison](value, self.threshold))


def parse_goal(text: str, where: str) -> Goal:
    """``cosine>=0.999`` -> Goal; errors name ``where`` and what is allowed."""
    match = _EXPRESSION.match(text)
    if match is None:
        raise LowbitError(f"{where}: accuracy_target={text!r}: expected METRIC OP NUMBER, e.g. cosine>=0.999, "
                          "top1-agreement>=0.99 or accuracy-drop<0.01")
    metric, comparison, number = match.groups()
    if metric not in METRICS:
        raise LowbitError(f"{where}: accuracy_target={text!r}: unknown metric '{metric}'"
                          + did_you_mean(metric, METRICS) + "; metrics: " + ", ".join(METRICS))
    try:
        threshold = float(number)
    except ValueError:
        raise LowbitError(f"{where}: accuracy_target={text!r}: '{number}' is not a number") from None
    upward = comparison in (">=", ">")
    if metric == "accuracy-drop" and upward:
        raise LowbitError(f"{where}: accuracy_target={text!r}: a drop is bounded from above (accuracy-drop<X)")
    if metric != "accuracy-drop" and not upward:
        raise LowbitError(f"{where}: accuracy_target={text!r}: {metric} is bounded from below ({metric}>=X)")
    if metric != "accuracy-drop" and not 0 < threshold <= 1:
        raise LowbitError(f"{where}: accuracy_target={text!r}: the threshold of {metric} lies in (0, 1]")
    if metric == "accuracy-drop" and not 0 <= threshold < 1:
        raise LowbitError(f"{where}: accuracy_target={text!r}: the threshold of accuracy-drop lies in [0, 1)")
    return Goal(metric, comparison, threshold)


@dataclass
class EvalSamples:
    feeds: list[dict[str, np.ndarray]]  # batches ready to run
    labels: np.ndarray | None
    origin: str  # "eval.npz (300 samples)", "32 held-back calibration samples"

    @property
    def count(self) -> int:
        return sum(next(iter(feed.values())).shape[0] for feed in self.feeds)


def read_eval_data(path: str | Path, specs: list[InputSpec], needs_labels: bool) -> EvalSamples:
    """The samples of an ``.npz`` file, checked against the model's inputs row by row."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"eval_data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise LowbitError(f"eval_data: {path} is not a readable .npz file ({str(exc).splitlines()[0]})") from None
    names = [spec.name for spec in specs]
    for name in arrays:
        if name not in names and name != LABEL:
            raise LowbitError(f"eval_data: {path} holds '{name}', which is neither a model input nor '{LABEL}'"
                              + did_you_mean(name, [*names, LABEL]) + f"; model inputs: {', '.join(names)}")
    for name in names:
        if name not in arrays:
            raise LowbitError(f"eval_data: {path} has no array '{name}' (model inputs: {', '.join(names)})")
    rows = {name: arrays[name].shape[0] if arrays[name].ndim else 0 for name in arrays}
    if len(set(rows.values())) != 1 or not next(iter(rows.values())):
        raise LowbitError(f"eval_data: {path}: every array needs the same number of rows (batch first), "
                          "at least one; found " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    labels = arrays.get(LABEL)
    if needs_labels and labels is None:
        raise LowbitError(f"eval_data: {path} has no '{LABEL}' array, which accuracy-drop compares with")
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise LowbitError(f"eval_data: {path}: '{LABEL}' must be a 1-D integer array (class indices), got "
                          f"{labels.dtype} of shape {list(labels.shape)}")
    count = next(iter(rows.values()))
    samples = [check_sample({name: arrays[name][i:i + 1] for name in names}, specs, f"eval_data: {path}, row {i}")
               for i in range(count)]
    return EvalSamples(list(batched(samples, specs, BATCH)), labels, f"{path.name} ({count} samples)")


@dataclass(frozen=True)
class NearTies:
    """How close the float model's predictions are to changing, against how far a quantized model moves them.

    For each prediction (the argmax over the last axis) the float model's top-1 margin is its largest
    output minus its second; the quantized model changes that same difference by some amount. Where many
    margins are smaller than the typical (rms) change, which predictions flip is decided by near-ties, and
    a goal that allows few changes needs outputs much closer to float than the change measured here.
    """

    predictions: int
    allowed: int  # the most changed predictions the goal accepts (accuracy-drop: the most lost)
    changed: int  # the predictions the quantized model changed
    rms_change: float  # of the top-1 minus top-2 difference, over every prediction
    below: int  # float margins smaller than rms_change
    counts: str = "changed"  # what the goal counts: changed predictions, or (accuracy-drop) lost correct ones

    def line(self) -> str:
        plural = "s" if self.allowed != 1 else ""
        text = (f"  near ties: the goal accepts {self.allowed} {self.counts} prediction{plural} of "
                f"{self.predictions}, the planned model changed {self.changed}; {self.below} of the float "
                f"model's top-1 margins are smaller than the planned model's typical change of them (rms "
                f"{self.rms_change:.3g})")
        if self.below > self.allowed:
            text += ": which predictions flip is decided by near ties, and meeting the goal takes outputs closer " \
                    "to float than the planned model's"
        return text


def near_ties(goal: Goal, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> NearTies | None:
    """:class:`NearTies` of ``outputs`` against the float model's ``reference`` (first outputs, batch by batch),
    for a top1-agreement or accuracy-drop goal (both count predictions); None for cosine goals or outputs with
    fewer than two classes."""
    if goal.metric == "cosine" or not reference or reference[0].ndim == 0 or reference[0].shape[-1] < 2:
        return None
    want = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    got = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs]).astype(np.float64)
    count = len(want)
    if not count:
        return None
    rows = np.arange(count)
    order = np.argsort(want, axis=-1)
    first, second = order[:, -1], order[:, -2]
    margin = want[rows, first] - want[rows, second]
    change = (got[rows, first] - got[rows, second]) - margin
    rms = float(np.sqrt(np.mean(change ** 2)))
    allowed = max((k for k in range(count + 1) if goal.met(1.0, (count - k) / count)), default=0)
    return NearTies(count, allowed, int(np.sum(got.argmax(-1) != first)), rms, int(np.sum(margin < rms)),
                    "lost correct" if goal.needs_labels else "changed")


class GoalEvaluator(Evaluator):
    """An :class:`~lowbit.accuracy.evaluator.Evaluator` for a :class:`Goal`, on fixed samples.

    The float model's outputs are computed on the first call (the float model is always
    evaluated first) and kept: cosine and agreement compare with them. The latest model's
    outputs are kept too, for :meth:`near_ties`.
    """

    def __init__(self, goal: Goal, samples: EvalSamples):
        self.goal, self.samples = goal, samples
        self.reference: list[np.ndarray] | None = None
        self.latest: list[np.ndarray] | None = None

    def near_ties(self) -> NearTies | None:
        """The near ties of the model evaluated last (see :class:`NearTies`)."""
        if self.reference is None or self.latest is None:
            return None
        return near_ties(self.goal, self.reference, self.latest)

    def eval_model(self, model_file: str, batch_num: int | None) -> float:
        outputs = _first_outputs(model_file, self.samples.feeds)
        self.latest = outputs
        if self.reference is None:
            self.reference = outputs
        if self.goal.metric == "cosine":
            return float(np.mean([compare(a, b) for got, want in zip(outputs, self.reference)
                                  for a, b in zip(_rows(got), _rows(want))]))
        predicted = np.concatenate([out.argmax(-1).reshape(-1) for out in outputs])
        if self.goal.metric == "top1-agreement":
            expected = np.concatenate([out.argmax(-1).reshape(-1) for out in self.reference])
            return float(np.mean(predicted == expected))
        if len(predicted) != len(self.samples.labels):
            raise LowbitError(f"accuracy_target: the model gives {len(predicted)} predictions for "
                              f"{len(self.samples.labels)} labels; accuracy-drop needs one per sample")
        return float(np.mean(predicted == self.samples.labels))

    def is_satisfied(self, original_metric: float, new_metric: float) -> bool:
        return self.goal.met(original_metric, new_metric)


def _first_outputs(model_file: str, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return [session.run([first], feed)[0] for feed in feeds]


def _rows(output: np.ndarray) -> np.ndarray:
    """One row per sample: (batch, everything else flattened); a scalar output is one row."""
    return output.reshape(output.shape[0] if output.ndim > 1 else 1, -1).astype(np.float64)

