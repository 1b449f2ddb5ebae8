"""The MindSpore-style INI reader, the resolved configuration and `lowbit config show`."""

import pytest

from lowbit import LowbitError, load_config
from lowbit.cli import main

FULL_QUANT_CFG = """\
[common_quant_param]
# Supports WEIGHT_QUANT or FULL_QUANT
quant_type=FULL_QUANT
bit_num=8
skip_quant_node=conv2d_1,add_8

[data_preprocess_param]
calibrate_path=input:/data/calib
calibrate_size=100
input_type=NPY

[full_quant_param]
activation_quant_method=MAX_MIN
bias_correction=false
per_channel=false
"""


def write(tmp_path, text, name="q.cfg"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_every_section(tmp_path):
    config = load_config(write(tmp_path, FULL_QUANT_CFG))
    assert config.quant_type == "FULL_QUANT"
    assert config.skip_quant_node == ("conv2d_1", "add_8")
    assert config.calibrate_size == 100
    assert config.calibrate_path[0].input_name == "input"
    assert str(config.calibrate_path[0].folder) == "/data/calib"
    assert config.per_channel == (False,)
    assert config.source("per_channel").endswith("[full_quant_param]")


def test_defaults_follow_mindspore_and_target():
    config = load_config()
    assert (config.quant_type, config.bit_num) == ("FULL_QUANT", 8)
    assert config.activation_quant_method is None  # no method: search MAX_MIN, REMOVAL_OUTLIER, KL, MSE
    assert config.per_channel == (True,) and config.target == "CPU"
    # MindSpore applies min_quant_weight_channel only to weight quantization
    assert config.min_quant_weight_channel == 0 and config.source("min_quant_weight_channel") == "default for FULL_QUANT"
    assert config.bias_correction is True  # MindSpore's default
    dsp = load_config(overrides={"target_device": "DSP"})
    assert dsp.per_channel == (False,) and dsp.source("per_channel") == "default for target_device=DSP"
    # per-tensor weights round with larger errors, whose mean shifts the correction takes out: on by default too
    assert dsp.bias_correction is True and dsp.source("bias_correction") == "default"


def test_overrides_win_over_the_file(tmp_path):
    config = load_config(write(tmp_path, FULL_QUANT_CFG), {"per_channel": "true"})
    assert config.per_channel == (True,) and config.source("per_channel") == "argument per_channel"


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "[full_quant_param]\nactivation_quant_mehtod=KL\n")
    with pytest.raises(LowbitError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "activation_quant_mehtod" in message
    assert "did you mean 'activation_quant_method'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(LowbitError, match=r"unknown section \[full_quant_params\].*did you mean 'full_quant_param'"):
        load_config(write(tmp_path, "[full_quant_params]\nper_channel=true\n"))


def test_key_in_the_wrong_section(tmp_path):
    with pytest.raises(LowbitError, match=r"'per_channel' belongs in \[full_quant_param\]"):
        load_config(write(tmp_path, "[common_quant_param]\nper_channel=true\n"))


@pytest.mark.parametrize("line, allowed", [
    ("min_quant_weight_size=70000", r"\[0, 65535\]"),
    ("bit_num=17", r"\[0, 16\]"),
    ("min_quant_weight_channel=-1", r"\[0, 65535\]"),
    ("quant_type=HALF_QUANT", "WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT"),
    ("bit_num=eight", "integer"),
])
def test_out_of_range_values_name_the_allowed_values(tmp_path, line, allowed):
    with pytest.raises(LowbitError, match=allowed) as err:
        load_config(write(tmp_path, f"[common_quant_param]\n{line}\n"))
    assert line.split("=")[0] in str(err.value)


def test_full_quant_is_8_bit(tmp_path):
    with pytest.raises(LowbitError, match="FULL_QUANT supports bit_num=8"):
        load_config(write(tmp_path, "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=4\n"))


def test_debug_info_save_path_is_read_and_refused_for_dynamic(tmp_path):
    config = load_config(write(tmp_path, "[common_quant_param]\ndebug_info_save_path=/tmp/debug\n"))
    assert config.debug_info_save_path == "/tmp/debug"
    with pytest.raises(LowbitError, match="debug_info_save_path applies to FULL_QUANT and WEIGHT_QUANT"):
        load_config(write(tmp_path, "[common_quant_param]\nquant_type=DYNAMIC_QUANT\n"
                                    "debug_info_save_path=/tmp/debug\n"))


def test_mindspore_mixed_bit_weight_quant_file(tmp_path):
    """MindSpore's mixed_bit_weight_quant.cfg, as its documentation gives it."""
    config = load_config(write(tmp_path, "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\n"
                                         "min_quant_weight_size=5000\nmin_quant_weight_channel=5\n"
                                         "[mixed_bit_weight_quant_param]\ninit_scale=0.05\nauto_tune=false\n"))
    assert (config.quant_type, config.bit_num, config.init_scale, config.auto_tune) == ("WEIGHT_QUANT", 0, 0.05, False)
    assert config.min_quant_weight_channel == 5 and config.bias_correction  # applied when data is given
    with pytest.raises(LowbitError, match="init_scale applies to quant_type=WEIGHT_QUANT only"):
        load_config(write(tmp_path, "[mixed_bit_weight_quant_param]\ninit_scale=0.05\n"))


def test_lowbit_extension_keys(tmp_path):
    config = load_config(write(tmp_path, "[data_preprocess_param]\ninput_shape=ids:1,128;mask:1,128\n"
                                         "input_data_format=NCHW\ncalibrate_batch_size=2\n"))
    assert config.input_shape == {"ids": (1, 128), "mask": (1, 128)}
    assert config.input_data_format == "NCHW" and config.calibrate_batch_size == 2
    with pytest.raises(LowbitError, match="must be positive"):
        load_config(write(tmp_path, "[data_preprocess_param]\ninput_shape=ids:1,0\n"))


def test_dsp_refuses_per_channel(tmp_path):
    with pytest.raises(LowbitError, match="DSP quantizes weights per tensor"):
        load_config(write(tmp_path, "[full_quant_param]\ntarget_device=DSP\nper_channel=true\n"))


def test_duplicate_key_is_an_error(tmp_path):
    with pytest.raises(LowbitError, match="per_channel"):
        load_config(write(tmp_path, "[full_quant_param]\nper_channel=true\nper_channel=false\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(LowbitError, match="config file not found"):
        load_config(tmp_path / "nope.cfg")


def test_config_show_prints_values_and_sources(tmp_path, capsys):
    path = write(tmp_path, FULL_QUANT_CFG)
    assert main(["config", "show", str(path), "--target-device", "NVGPU"]) == 0
    out = capsys.readouterr().out
    assert "[full_quant_param]" in out
    assert "per_channel" in out and f"{path} [full_quant_param]" in out
    assert "NVGPU" in out and "--target-device" in out
    assert "default" in out


def test_config_show_bad_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, "[full_quant_param]\nper_chanel=true\n")
    assert main(["config", "show", str(path)]) == 2
    assert "did you mean 'per_channel'" in capsys.readouterr().err
