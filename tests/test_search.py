"""Metrics, candidate lists, the model-wise and layer-wise searches and AUTO_TUNE, on small graphs."""

import math

import numpy as np
import onnx
import pytest
from conftest import conv_relu_pool_model, random_feeds, run, save

import lowbit
from lowbit import LowbitError, TensorReport, load_config
from lowbit.cli import main
from lowbit.search.metrics import METRICS, PairStats, compare
from lowbit.search.modelwise import SearchRow, candidates, choose_candidate

# -- metrics ----------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    a = np.array([1.0, 2.0, 2.0])
    b = np.array([1.0, 2.0, 4.0])
    assert compare(a, b, "cosine-similarity") == pytest.approx(13 / math.sqrt(9 * 21))
    assert compare(a, b, "mse") == pytest.approx(4 / 3)
    assert compare(a, b, "mae") == pytest.approx(2 / 3)
    assert compare(a, b, "mre") == pytest.approx(2 / 7)
    assert compare(a, b, "sqnr") == pytest.approx(10 * math.log10(21 / 4))
    assert compare(a, b, "chebyshev") == 2.0
    assert compare(b, b, "sqnr") == math.inf and compare(b, b, "cosine-similarity") == pytest.approx(1.0)


def test_metric_sums_stream_and_merge():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=100), rng.normal(size=100)
    whole = PairStats()
    whole.update(a, b)
    first, second = PairStats(), PairStats()
    first.update(a[:30], b[:30])
    second.update(a[30:], b[30:])
    first.add(second)
    for name, metric in METRICS.items():
        assert metric.value(first) == pytest.approx(metric.value(whole)), name


def test_metric_direction():
    assert METRICS["cosine-similarity"].best([0.9, 0.99, 0.95]) == 1
    assert METRICS["mse"].best([0.3, 0.1, 0.2]) == 1
    assert METRICS["sqnr"].better(30.0, 20.0) and not METRICS["sqnr"].better(float("nan"), 20.0)


# -- configuration -------------------------------------------------------------------------------


def test_candidate_lists_from_ini_flags_and_api(tmp_path):
    ini = tmp_path / "q.cfg"
    ini.write_text("[full_quant_param]\nactivation_quant_method=KL,REMOVAL_OUTLIER\nnum_bin=1024,2048\n"
                   "max_percentile=0.999,0.9999\n")
    config = load_config(ini)
    found = [c.label for c in candidates(config.activation_quant_method, config.num_bin, config.max_percentile)]
    assert found == ["KL num_bin=1024", "KL num_bin=2048", "REMOVAL_OUTLIER max_percentile=0.999",
                     "REMOVAL_OUTLIER max_percentile=0.9999"]
    assert load_config(overrides={"activation_quant_method": ["mse", "aciq"]}).activation_quant_method == ("MSE", "ACIQ")
    default = candidates(None, (1024,), (0.9999,))
    assert [c.method for c in default] == ["MAX_MIN", "REMOVAL_OUTLIER", "KL", "MSE"]


def test_an_ini_without_the_method_keeps_mindspore_max_min(tmp_path):
    ini = tmp_path / "q.cfg"
    ini.write_text("[full_quant_param]\nbias_correction=true\n")
    config = load_config(ini)
    assert config.activation_quant_method == ("MAX_MIN",) and config.source("activation_quant_method").startswith("default")
    assert load_config().activation_quant_method is None  # no INI: lowbit's default search


@pytest.mark.parametrize("overrides, message", [
    ({"num_bin": "128"}, "num_bin"),
    ({"max_percentile": "0.4"}, "max_percentile"),
    ({"num_bin": "4096", "max_num_bin": "2048"}, "max_num_bin=2048 is below num_bin=4096"),
    ({"activation_quant_method": "KLD"}, "did you mean"),
    ({"search_metric": "cosine"}, "cosine-similarity"),
    ({"quant_type": "DYNAMIC_QUANT", "activation_quant_method": "KL", "bias_correction": "false"},
     "applies to quant_type=FULL_QUANT only"),
])
def test_bad_search_settings(overrides, message):
    with pytest.raises(LowbitError, match=message):
        load_config(overrides=overrides)


# -- the searches on a small model ------------------------------------------------------------------


def outlier_feeds(n, seed=0, spikes=True):
    """Small inputs; in calibration, every 8th has a large spike (noisy data): MAX_MIN spends its levels on it."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = rng.laplace(scale=0.3, size=(1, 3, 8, 8)).astype(np.float32)
        if spikes and i % 8 == 0:
            x[0, 0, 0, 0] = 40.0
        feeds.append({"input": x})
    return feeds


def output_error(src, out, feeds):
    return float(np.mean([np.mean((run(src, f)[0] - run(out, f)[0]) ** 2) for f in feeds]))


def test_modelwise_search_reports_every_candidate_and_keeps_the_best(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=outlier_feeds(40), progress=False, bias_correction=False,
                             search_metric="mse")
    search = result.search
    assert [row.label for row in search.rows] == ["MAX_MIN", "REMOVAL_OUTLIER max_percentile=0.9999",
                                                  "KL num_bin=1024", "MSE"]
    assert search.samples == 5 and result.calibration_samples == 35
    scores = [row.score for row in search.rows]
    assert search.chosen == search.rows[int(np.argmin(scores))].label
    assert search.chosen != "MAX_MIN"  # the spike makes MAX_MIN the worst choice here
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    # the kept model is the one that scored best: it beats MAX_MIN on fresh data too
    max_min = lowbit.quantize(src, tmp_path / "mm.onnx", data=outlier_feeds(40), progress=False,
                              bias_correction=False, activation_quant_method="MAX_MIN")
    assert max_min.search.rows == []
    fresh = outlier_feeds(20, seed=7, spikes=False)
    assert output_error(src, tmp_path / "q.onnx", fresh) < output_error(src, tmp_path / "mm.onnx", fresh)
    # and the summary shows the table
    assert "search" in result.summary() and "MAX_MIN" in result.summary()


def test_layerwise_search_and_auto_tune(tmp_path):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    feeds = outlier_feeds(40)
    layerwise = lowbit.quantize(src, tmp_path / "l.onnx", data=feeds, progress=False, bias_correction=False,
                                activation_quant_method="MAX_MIN,KL", layerwise_search=True)
    assert [row.label for row in layerwise.search.rows] == ["MAX_MIN", "KL num_bin=1024", "layerwise"]
    assert layerwise.search.tuned_tensors >= 1
    tuned = lowbit.quantize(src, tmp_path / "t.onnx", data=feeds, progress=False, bias_correction=False,
                            activation_quant_method="AUTO_TUNE", tune_num=5)
    kl = lowbit.quantize(src, tmp_path / "k.onnx", data=feeds, progress=False, bias_correction=False,
                         activation_quant_method="KL")
    for name, report in tuned.tensors.items():  # tuning only moves ranges from KL towards the seen range
        assert report.range_max >= kl.tensors[name].range_max - 1e-6
        assert report.range_max <= report.max + 1e-6
    for path in ("l.onnx", "t.onnx"):
        onnx.checker.check_model(str(tmp_path / path), full_check=True)
        feed = random_feeds(1, seed=3)[0]
        assert np.isfinite(run(tmp_path / path, feed)[0]).all()


def _fake_quant_uint8(x, lo, hi):
    """CPU activations: asymmetric uint8 over [min(lo, 0), max(hi, 0)], round half to even (as computed by hand)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def _round_weight(w):
    """Per output channel, symmetric int8 over [-127, 127]."""
    scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127).astype(np.float32).reshape(-1, 1, 1, 1)
    return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)


def _conv_cosine(inputs, weight, bias, reference, attributes):
    """Cosine over all samples between Conv(inputs, weight) and the float op's outputs."""
    from conftest import float_input, make_model
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w", "b"] if bias is not None else ["x", "w"], ["y"], **attributes)]
    inits = [("w", weight)] + ([("b", bias)] if bias is not None else [])
    model = make_model(nodes, [float_input("x", ["N", "C", "H", "W"])], [float_input("y", ["N", "K", "H2", "W2"])],
                       inits)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    stats = PairStats()
    for x, y in zip(inputs, reference):
        stats.update(session.run(None, {"x": x})[0], y)
    return METRICS["cosine-similarity"].value(stats)


def test_layerwise_choice_beats_each_candidate_on_the_scored_ops(tmp_path):
    """Per op, the layer-wise range gives an op output at least as close to float (cosine, the default
    metric) as each candidate's range, computed here by hand: the op alone, its input fake-quantized
    with the range, its weight rounded, on the tuning samples."""
    import onnxruntime as ort

    model = conv_relu_pool_model()
    src = save(model, tmp_path / "m.onnx")
    feeds = outlier_feeds(40)
    settings = dict(progress=False, bias_correction=False, weight_rounding="NEAREST")
    layerwise = lowbit.quantize(src, tmp_path / "l.onnx", data=feeds, activation_quant_method="MAX_MIN,KL",
                                layerwise_search=True, **settings)
    statistics = [f for i, f in enumerate(feeds) if i % 8 != 7]  # every 8th was held back
    tuning = statistics[:32]
    singles = {method: lowbit.quantize(src, tmp_path / f"{method}.onnx", data=statistics,
                                       activation_quant_method=method, **settings).tensors
               for method in ("MAX_MIN", "KL")}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in ("c1", "p1", "output"):
        if name != "output":
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    c1, p1, out = zip(*(session.run(["c1", "p1", "output"], f) for f in tuning))
    ops = {  # tensor -> (its float values, the op's weight, bias, attributes, the op's float output)
        "input": ([f["input"] for f in tuning], inits["w1"], inits["b1"], {"pads": [1, 1, 1, 1]}, c1),
        "p1": (p1, inits["w2"], None, {}, out),
    }
    scored = 0
    for tensor, (values, weight, bias, attributes, reference) in ops.items():
        def score(report):
            inputs = [_fake_quant_uint8(v, report.range_min, report.range_max) for v in values]
            return _conv_cosine(inputs, _round_weight(weight), bias, reference, attributes)

        candidates = {method: score(tensors[tensor]) for method, tensors in singles.items()}
        if tensor not in layerwise.search.layerwise_ranges:  # one distinct range: nothing to choose
            assert len({(t[tensor].range_min, t[tensor].range_max) for t in singles.values()}) == 1
            continue
        lo, hi = layerwise.search.layerwise_ranges[tensor]  # the layer-wise candidate's choice (it may not win)
        chosen = score(TensorReport(tensor, 0, 0, lo, hi, 0, 0, ""))
        assert all(chosen >= value - 1e-9 for value in candidates.values()), (tensor, chosen, candidates)
        scored += len(set(candidates.values())) > 1  # the candidates differ here: a real choice was made
    assert scored >= 1


def test_too_few_samples_fall_back_to_max_min(tmp_path, capsys):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    with pytest.warns(lowbit.LowbitWarning, match="using MAX_MIN"):
        result = lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(4), progress=False)
    assert result.calibration_samples == 4 and result.search.chosen == "MAX_MIN"
    # an explicit list is an order, not a preference: too few samples is an error, before anything is written
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", random_feeds(1)[0]["input"])
    code = main(["quantize", str(src), "-o", str(tmp_path / "x.onnx"), "--data", str(folder),
                 "--activation-quant-method", "KL,MSE"])
    assert code == 2 and "fewer than 8 samples" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_the_split_does_not_depend_on_knowing_the_number_of_samples(tmp_path, kind):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")

    def data(n):
        feeds = random_feeds(n)
        return feeds if kind == "list" else (feed for feed in feeds)

    # 60 samples: every 8th is held back (7 of them), the other 53 feed the statistics
    result = lowbit.quantize(src, tmp_path / "q.onnx", data=data(60), progress=False)
    assert result.search.samples == 7 and result.calibration_samples == 53
    # fewer than 8: nothing to hold back, so the default search falls back to MAX_MIN, warned
    with pytest.warns(lowbit.LowbitWarning, match="using MAX_MIN"):
        result = lowbit.quantize(src, tmp_path / "q.onnx", data=data(5), progress=False)
    assert result.calibration_samples == 5 and result.search.chosen == "MAX_MIN"


def _rows(*candidates):
    return [SearchRow(label, score, 0.0, tuple(per_sample)) for label, score, per_sample in candidates]


# 32 held-back samples. SKEWED scores best over all samples (0.91) thanks to three easy samples in eight. STEADY
# is 0.90 on every sample: against SKEWED its paired difference is -0.1 on 3 samples and +0.05 on 5, mean -0.00625,
# standard deviation 0.0738, standard error 0.0130: within 2 standard errors (0.026), a tie. WORSE loses 0.3 on 3
# samples and gains 0.02 on 5: mean -0.1, standard deviation 0.157, standard error 0.0278, 3.6 standard errors away.
SKEWED = [1.0, 1.0, 1.0, 0.85, 0.85, 0.85, 0.85, 0.85] * 4
STEADY = [0.90] * 32
WORSE = [0.70, 0.70, 0.70, 0.87, 0.87, 0.87, 0.87, 0.87] * 4
OUTLIER = "REMOVAL_OUTLIER max_percentile=0.9999"


def test_mse_within_noise_of_the_best_is_kept_and_otherwise_the_best_score():
    cosine = METRICS["cosine-similarity"]
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED), ("MSE", 0.90, STEADY)), cosine) == 1
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED), ("MSE", 0.80, WORSE)), cosine) == 0  # a real loss
    assert choose_candidate(_rows(("MSE", 0.91, SKEWED), ("KL num_bin=1024", 0.90, STEADY)), cosine) == 0
    # a tie without MSE: the best score
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED), ("KL num_bin=1024", 0.90, STEADY)), cosine) == 0
    # two MSE candidates (symmetric and asymmetric) both tied: the better scoring one
    tied = [v - 0.001 for v in STEADY]
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED), ("MSE asymmetric", 0.899, tied),
                                  ("MSE", 0.90, STEADY)), cosine) == 2


def test_for_an_error_metric_lower_is_better_on_every_sample_too():
    def as_error(label, score, per_sample):
        return label, 1 - score, [1 - v for v in per_sample]

    mse = METRICS["mse"]
    assert choose_candidate(_rows(as_error(OUTLIER, 0.91, SKEWED), as_error("MSE", 0.90, STEADY)), mse) == 1
    assert choose_candidate(_rows(as_error(OUTLIER, 0.91, SKEWED), as_error("MSE", 0.80, WORSE)), mse) == 0


def test_few_samples_or_no_per_sample_scores_keep_the_best_score():
    cosine = METRICS["cosine-similarity"]
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED[:15]), ("MSE", 0.90, STEADY[:15])), cosine) == 0
    assert choose_candidate([SearchRow(OUTLIER, 0.5, 0.0), SearchRow("MSE", 0.6, 0.0)], cosine) == 1
    assert choose_candidate(_rows((OUTLIER, 0.91, SKEWED), ("MSE", 0.90, [float("nan")] + STEADY[1:])), cosine) == 0
