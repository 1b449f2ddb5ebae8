"""The evaluator protocol: the user's own metric decides whether a quantized model is good enough.

As in Ascend AMCT's accuracy-driven modes, an evaluator is an object with two methods:

* ``eval_model(model_file, batch_num) -> float``: run the ONNX model at ``model_file`` on the
  user's data and return one number (top-1, mAP, a weighted score ...);
* ``is_satisfied(original_metric, new_metric) -> bool``: whether the quantized model's
  number is close enough to the float model's.

lowbit calls ``eval_model`` on the float model once, then on each candidate it builds,
and never looks inside: what "better" means is ``is_satisfied``'s business. Every call is
guarded, so an evaluator that raises, returns no number, or returns NaN stops the job with
one line naming it, before anything is written.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LowbitError, did_you_mean

PROTOCOL = ("eval_model", "is_satisfied")


class Evaluator:
    """Base class of evaluators: subclass it and implement both methods.

    The example of the seed (a classifier may lose less than one point of top-1)::

        import lowbit

        class Top1(lowbit.Evaluator):
            def __init__(self):
                self.images, self.labels = load_my_validation_set()

            def eval_model(self, model_file, batch_num):
                session = onnxruntime.InferenceSession(model_file)
                logits = session.run(None, {"input": self.images})[0]
                return float((logits.argmax(1) == self.labels).mean())   # top-1 as a fraction

            def is_satisfied(self, original_metric, new_metric):
                return (original_metric - new_metric) * 100 < 1            # less than one point lost

    ``batch_num`` is the ``eval_batch_num`` setting (None when unset: evaluate all your data).
    From the command line the class is named as ``--evaluator my_eval.py:Top1`` and must be
    constructible without arguments; through the API, pass an instance (``evaluator=Top1(...)``).
    """

    def eval_model(self, model_file: str, batch_num: int | None) -> float:
        raise NotImplementedError

    def is_satisfied(self, original_metric: float, new_metric: float) -> bool:
        raise NotImplementedError


def load_evaluator(spec: str) -> Any:
    """An instance of the class ``spec`` names: ``path/to/file.py:ClassName`` or ``module:ClassName``."""
    source, _, class_name = spec.rpartition(":")
    if not source or not class_name:
        raise LowbitError(f"evaluator={spec!r}: expected path/to/file.py:ClassName or module:ClassName")
    module = _import(source, spec)
    cls = getattr(module, class_name, None)
    if cls is None:
        classes = [name for name, value in vars(module).items() if isinstance(value, type)]
        raise LowbitError(f"evaluator={spec!r}: {source} has no class {class_name}" + did_you_mean(class_name, classes))
    if not isinstance(cls, type):
        raise LowbitError(f"evaluator={spec!r}: {class_name} in {source} is not a class")
    check_protocol(cls, spec)
    try:
        return cls()
    except TypeError as exc:
        raise LowbitError(f"evaluator={spec!r}: {class_name}() failed ({exc}); a class named on the command line "
                          "is built without arguments (through the API, pass an instance)") from None
    except Exception as exc:  # the user's constructor: report it, not a traceback into lowbit
        raise LowbitError(f"evaluator={spec!r}: {class_name}() raised {type(exc).__name__}: "
                          f"{_first_line(exc)}") from None


def check_protocol(evaluator: Any, name: str) -> None:
    """Both methods exist, are callable, and a subclass of :class:`Evaluator` overrides them."""
    for method in PROTOCOL:
        found = getattr(evaluator, method, None)
        cls = evaluator if isinstance(evaluator, type) else type(evaluator)
        if not callable(found) or getattr(cls, method, None) is getattr(Evaluator, method):
            raise LowbitError(f"evaluator {name}: does not implement {method}(); an evaluator needs "
                              "eval_model(model_file, batch_num) -> float and "
                              "is_satisfied(original_metric, new_metric) -> bool")


def _import(source: str, spec: str):
    """The module of a file path (``.py`` or with a separator) or of a module name."""
    as_file = source.endswith(".py") or os.sep in source or "/" in source
    try:
        if as_file:
            return _import_file(Path(source), spec)
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules beside the user's shell
        try:
            return importlib.import_module(source)
        finally:
            sys.path.remove(os.getcwd())
    except LowbitError:
        raise
    except ModuleNotFoundError as exc:
        if not as_file and exc.name == source.split(".")[0]:
            raise LowbitError(f"evaluator={spec!r}: no module named {source!r}") from None
        raise LowbitError(f"evaluator={spec!r}: importing {source} failed: ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # the user's module raised while it was imported
        raise LowbitError(f"evaluator={spec!r}: importing {source} failed: "
                          f"{type(exc).__name__}: {_first_line(exc)}") from None


def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise LowbitError(f"evaluator={spec!r}: file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"lowbit_evaluator_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise LowbitError(f"evaluator={spec!r}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Evaluation:
    """One call of ``eval_model``: on what, the number, the verdict, and its time."""

    what: str
    metric: float
    satisfied: bool
    seconds: float


class GuardedEvaluator:
    """Calls the user's evaluator, checks what it returns, and counts the calls against a budget."""

    def __init__(self, evaluator: Any, name: str, batch_num: int | None, budget: int):
        check_protocol(evaluator, name)
        self.evaluator, self.name, self.batch_num, self.budget = evaluator, name, batch_num, budget
        self.original: float | None = None
        self.history: list[Evaluation] = []

    @property
    def left(self) -> int:
        return self.budget - len(self.history)

    def evaluate_float(self, model_file: Path) -> float:
        """The float model's metric, measured once (it counts as one evaluation)."""
        if self.original is None:
            start = time.perf_counter()
            self.original = self._metric(model_file, "the float model")
            self.history.append(Evaluation("float model", self.original, True, time.perf_counter() - start))
        return self.original

    def evaluate(self, model_file: Path, what: str) -> Evaluation:
        if self.left <= 0:
            raise AssertionError("evaluation budget exceeded")  # the searches check left first
        start = time.perf_counter()
        metric = self._metric(model_file, what)
        satisfied = self._satisfied(metric)
        evaluation = Evaluation(what, metric, satisfied, time.perf_counter() - start)
        self.history.append(evaluation)
        return evaluation

    def _metric(self, model_file: Path, what: str) -> float:
        try:
            value = self.evaluator.eval_model(str(model_file), self.batch_num)
        except LowbitError:
            raise
        except Exception as exc:
            raise LowbitError(f"evaluator {self.name}: eval_model raised {type(exc).__name__} on {what}: "
                              f"{_first_line(exc)}") from None
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LowbitError(f"evaluator {self.name}: eval_model returned {_show(value)} on {what}; "
                              "it must return one number")
        if not math.isfinite(float(value)):
            raise LowbitError(f"evaluator {self.name}: eval_model returned {value} on {what}; "
                              "it must return a finite number")
        return float(value)

    def _satisfied(self, metric: float) -> bool:
        try:
            verdict = self.evaluator.is_satisfied(self.original, metric)
        except Exception as exc:
            raise LowbitError(f"evaluator {self.name}: is_satisfied raised {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
        if not isinstance(verdict, (bool, np.bool_)):
            raise LowbitError(f"evaluator {self.name}: is_satisfied returned {_show(verdict)}; "
                              "it must return True or False")
        return bool(verdict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
