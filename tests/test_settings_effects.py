"""Settings that change nothing in a run are named in a warning, with the reason: none is ignored silently."""

import warnings

import numpy as np
import pytest
from conftest import conv_relu_pool_model, random_feeds, save, write_npy_folder

import lowbit


def quantize_warnings(tmp_path, data=None, **settings):
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(src, tmp_path / "q.onnx", data=random_feeds(16) if data is None else data, progress=False,
                        **settings)
    return [str(w.message) for w in caught if issubclass(w.category, lowbit.LowbitWarning)]


@pytest.mark.parametrize("key, value, why", [
    ("num_bin", 2048, "only KL and AUTO_TUNE read it"),
    ("max_num_bin", 4096, "MAX_MIN keeps no histogram"),
    ("max_percentile", 0.99, "only REMOVAL_OUTLIER reads it"),
    ("tune_num", 20, "only AUTO_TUNE reads it"),
    ("search_metric", "mse", "there is one candidate and no search"),
    ("search_samples", 4, "there is one candidate and no search"),
])
def test_range_keys_that_max_min_does_not_read(tmp_path, key, value, why):
    messages = quantize_warnings(tmp_path, activation_quant_method="MAX_MIN", **{key: value})
    assert [m for m in messages if m.startswith(f"{key} (argument {key}=) has no effect: {why}")], messages


def test_range_keys_that_the_methods_read_are_not_warned(tmp_path):
    messages = quantize_warnings(tmp_path, activation_quant_method="KL,REMOVAL_OUTLIER", num_bin=2048,
                                 max_percentile=0.999, search_metric="mse", search_samples=2)
    assert not [m for m in messages if "has no effect" in m], messages


def test_image_and_bin_keys_without_such_files(tmp_path):
    folder = write_npy_folder(tmp_path / "npy", random_feeds(8))
    messages = quantize_warnings(tmp_path, data=folder, activation_quant_method="MAX_MIN",
                                 normalize_mean=[0.5], normalize_std=[0.2], resize_width=8, resize_height=8,
                                 input_data_format="NCHW", input_shape="input:1,3,8,8")
    for key in ("normalize_mean", "normalize_std", "resize_width", "resize_height"):
        assert any(m.startswith(f"{key} ") and "it preprocesses images, and the calibration files are NPY" in m
                   for m in messages), key
    for key in ("input_data_format", "input_shape"):
        assert any(m.startswith(f"{key} ") and "it is read with .bin files" in m for m in messages), key
    # arrays given in memory are neither images nor .bin files
    messages = quantize_warnings(tmp_path, activation_quant_method="MAX_MIN", image_to_format="RGB")
    assert any("image_to_format" in m and "arrays given in memory" in m for m in messages)


def test_input_shape_naming_an_input_that_does_not_exist(tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    for i in range(8):
        np.zeros((1, 8, 8, 3), np.float32).tofile(folder / f"{i}.bin")
    messages = quantize_warnings(tmp_path, data=folder, activation_quant_method="MAX_MIN",
                                 input_shape="inputs:1,3,8,8")
    assert any("input_shape names 'inputs', which is not an input of the model" in m and "closest inputs: input" in m
               for m in messages), messages


def test_a_default_run_warns_of_nothing(tmp_path):
    assert quantize_warnings(tmp_path) == []
