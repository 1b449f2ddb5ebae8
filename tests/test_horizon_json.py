"""Horizon's quant_config JSON: its template loads, each key maps to lowbit's, errors name the JSON path."""

import json

import pytest

from lowbit import LowbitError
from lowbit.cli import main
from lowbit.config import load_config
from lowbit.config.horizon_json import strip_comments

METRICS = ("cosine-similarity", "mse", "mae", "mre", "sqnr", "chebyshev")

# Horizon's documented template, one alternative of each "a"/"b" written out, with its // comments.
COMMENTED_TEMPLATE = """\
{
    // 配置模型层面的参数
    "model_config": {
        // 一次性配置所有节点的输入数据类型
        "all_node_type": "int16",
        // 配置模型输出的数据类型
        "model_output_type": "int8",
        // 激活校准参数配置
        "activation": {
            // 设置激活校准方法,可配置类型:String/List[String]
            "calibration_type": ["max", "kl"],
            // 设置kl校准参数,可配置类型:Int/List[Int]
            "num_bin": [1024, 2048],
            // 设置kl校准参数,可配置类型:Int
            "max_num_bin": 16384,
            // 设置max校准参数,可配置类型:Float/List[Float]
            "max_percentile": [0.99995, 1.0],
            // 设置per-channel量化开启与否,可配置类型: Bool/List[Bool]
            "per_channel": true,
            // 设置asymmetric量化开启与否,可配置类型: Bool/List[Bool]
            "asymmetric": false
        },
        // 权重校准参数配置
        "weight": {
            // 设置偏差校正
            "bias_correction": {
                // 设置偏差校正的样本数量,可配置类型: Int
                "num_sample": 1,
                // 设置偏差校正的模型误差度量方法,可配置类型: String
                "metric": "mse"
            }
        },
        // modelwise搜索配置,若配置多个校准方法会启动modelwise搜索,从多个校准模型中选择最优
        "modelwise_search": {
            // 设置modelwise搜索的模型误差度量方法,可配置类型: String
            "metric": "sqnr"
        },
        // layerwise搜索配置,若配置layerwise参数则会启动layerwise搜索,逐层搜索最优量化参数
        "layerwise_search": {
            // 设置layerwise搜索的模型误差度量方法,可配置类型: String
            "metric": "chebyshev"
        }
    },
    // 配置某一类型节点的参数,将op_name修改为节点类型名,例如"Conv","Add","Softmax"...
    "op_config": {
        // 配置某一类型节点的输入数据类型
        "Conv": {"qtype": "int8"},
        "Softmax": {"qtype": "float16"}
    },
    // 配置某个节点的参数,,将node_name修改为节点名称,例如"Conv_0","Add_1"...
    "node_config": {
        // 配置某个节点的输入数据类型
        "conv1": {"qtype": "int16"},
        "matmul_1": {"input1": "ec"}
    }
}
"""


def template(**activation):
    """Horizon's template as a dict, the first alternative of each key; ``activation`` keys replace its own."""
    return {
        "model_config": {
            "all_node_type": "int16",
            "model_output_type": "int8",
            "activation": {"calibration_type": "max", "num_bin": 1024, "max_num_bin": 16384,
                           "max_percentile": 0.99995, "per_channel": True, "asymmetric": True, **activation},
            "weight": {"bias_correction": {"num_sample": 1, "metric": "cosine-similarity"}},
            "modelwise_search": {"metric": "cosine-similarity"},
            "layerwise_search": {"metric": "cosine-similarity"},
        },
        "op_config": {"op_name1": {"qtype": "int8"}, "op_name2": {"qtype": "int16"}},
        "node_config": {"node_name1": {"qtype": "int8"}, "node_name2": {"qtype": "float16"}},
    }


def write(tmp_path, document, name="q.json"):
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document, indent=4), encoding="utf-8")
    return path


def error_of(tmp_path, document) -> str:
    with pytest.raises(LowbitError) as info:
        load_config(write(tmp_path, document))
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the template, each alternative written out ---


@pytest.mark.parametrize("key, value", [
    ("all_node_type", "int16"), ("all_node_type", "float16"),
    ("model_output_type", "int8"), ("model_output_type", "int16"),
])
def test_template_model_types_load(tmp_path, key, value):
    document = template()
    document["model_config"][key] = value
    assert getattr(load_config(write(tmp_path, document)), key) == value


@pytest.mark.parametrize("activation", [
    {"calibration_type": "max"}, {"calibration_type": "kl"}, {"calibration_type": ["max", "kl"]},
    {"num_bin": 1024}, {"num_bin": 2048}, {"num_bin": [1024, 2048]},
    {"max_percentile": 0.99995}, {"max_percentile": 1.0}, {"max_percentile": [0.99995, 1.0]},
    {"per_channel": True}, {"per_channel": False}, {"per_channel": [True]}, {"per_channel": [True, False]},
    {"asymmetric": True}, {"asymmetric": False}, {"asymmetric": [False]}, {"asymmetric": [True, False]},
])
def test_template_activation_alternatives_load(tmp_path, activation):
    config = load_config(write(tmp_path, template(**activation)))
    assert config.max_num_bin == 16384
    assert config.activation_quant_method


@pytest.mark.parametrize("metric", METRICS)
def test_template_metrics_load(tmp_path, metric):
    document = template()
    document["model_config"]["weight"]["bias_correction"]["metric"] = metric
    document["model_config"]["modelwise_search"]["metric"] = metric
    document["model_config"]["layerwise_search"]["metric"] = metric
    config = load_config(write(tmp_path, document))
    assert config.bias_correction_metric == config.search_metric == config.layerwise_metric == metric


def test_template_op_and_node_config_load(tmp_path):
    config = load_config(write(tmp_path, template()))
    assert config.op_config["op_name2"].qtype == "int16"
    assert config.node_config["node_name2"].qtype == "float16"


def test_commented_template_loads(tmp_path):
    config = load_config(write(tmp_path, COMMENTED_TEMPLATE))
    assert config.all_node_type == "int16" and config.model_output_type == "int8"
    assert config.activation_quant_method == ("MAX_MIN", "REMOVAL_OUTLIER", "KL")
    assert config.num_bin == (1024, 2048) and config.max_percentile == (0.99995,)
    assert config.per_channel == (True,) and config.asymmetric == (False,)
    assert config.bias_correction is True and config.bias_correction_samples == 1
    assert config.bias_correction_metric == "mse" and config.search_metric == "sqnr"
    assert config.layerwise_search is True and config.layerwise_metric == "chebyshev"
    assert config.op_config["Softmax"].qtype == "float16"
    assert config.node_config["conv1"].qtype == "int16"
    assert config.node_config["matmul_1"].for_input(1) == "ec"
    assert config.source("num_bin").endswith("q.json: model_config.activation.num_bin")


def test_comments_inside_strings_are_kept():
    text = '{"a": "x//y", "b": "q\\"//r"} // gone\n// gone too\n'
    assert json.loads(strip_comments(text)) == {"a": "x//y", "b": 'q"//r'}


def test_lowbit_section_is_in_a_url_like_string(tmp_path):
    config = load_config(write(tmp_path, '{"lowbit": {"calibrate_path": "calib//x"}} // a comment'))
    assert str(config.calibrate_path[0].folder) == "calib/x"  # Path normalizes the double slash


# --- each key and the lowbit value it maps to ---


@pytest.mark.parametrize("model_config, key, expected", [
    ({"all_node_type": "float16"}, "all_node_type", "float16"),
    ({"model_output_type": "int16"}, "model_output_type", "int16"),
    ({"activation": {"calibration_type": "kl"}}, "activation_quant_method", ("KL",)),
    ({"activation": {"calibration_type": "KL"}}, "activation_quant_method", ("KL",)),
    ({"activation": {"calibration_type": "max"}}, "activation_quant_method", ("MAX_MIN",)),
    ({"activation": {"calibration_type": ["kl", "max", "kl"]}}, "activation_quant_method", ("KL", "MAX_MIN")),
    ({"activation": {"calibration_type": "max", "max_percentile": 0.99995}},
     "activation_quant_method", ("REMOVAL_OUTLIER",)),
    ({"activation": {"calibration_type": "max", "max_percentile": 1.0}}, "activation_quant_method", ("MAX_MIN",)),
    ({"activation": {"calibration_type": "max", "max_percentile": [0.99995, 1.0]}},
     "activation_quant_method", ("MAX_MIN", "REMOVAL_OUTLIER")),
    ({"activation": {"calibration_type": ["kl", "max"], "max_percentile": [0.999, 0.9999]}},
     "activation_quant_method", ("KL", "REMOVAL_OUTLIER")),
    ({"activation": {"num_bin": 2048}}, "num_bin", (2048,)),
    ({"activation": {"num_bin": [1024, 2048]}}, "num_bin", (1024, 2048)),
    ({"activation": {"max_num_bin": 8192}}, "max_num_bin", 8192),
    ({"activation": {"max_percentile": 0.999}}, "max_percentile", (0.999,)),
    ({"activation": {"max_percentile": [0.999, 1.0, 0.9999]}}, "max_percentile", (0.999, 0.9999)),
    ({"activation": {"per_channel": False}}, "per_channel", (False,)),
    ({"activation": {"per_channel": [False]}}, "per_channel", (False,)),
    ({"activation": {"per_channel": [True, False]}}, "per_channel", (True, False)),  # search candidates
    ({"activation": {"asymmetric": True}}, "asymmetric", (True,)),
    ({"activation": {"asymmetric": [True, True]}}, "asymmetric", (True,)),
    ({"activation": {"asymmetric": [False, True]}}, "asymmetric", (False, True)),
    ({"weight": {"bias_correction": {}}}, "bias_correction", True),
    ({"weight": {"bias_correction": {"num_sample": 8}}}, "bias_correction_samples", 8),
    ({"weight": {"bias_correction": {"metric": "sqnr"}}}, "bias_correction_metric", "sqnr"),
    ({"modelwise_search": {"metric": "mae"}}, "search_metric", "mae"),
    ({"layerwise_search": {}}, "layerwise_search", True),
    ({"layerwise_search": {"metric": "mre"}}, "layerwise_metric", "mre"),
])
def test_each_key_maps(tmp_path, model_config, key, expected):
    config = load_config(write(tmp_path, {"model_config": model_config}))
    assert getattr(config, key) == expected
    assert config.source(key).startswith(f"{tmp_path / 'q.json'}: model_config.")


def test_max_percentile_of_one_only_leaves_the_default(tmp_path):
    config = load_config(write(tmp_path, {"model_config": {"activation": {"max_percentile": 1.0}}}))
    assert config.is_default("max_percentile")


def test_no_calibration_type_keeps_the_search(tmp_path):
    """Unlike a MindSpore INI, a JSON without calibration_type does not mean MAX_MIN."""
    config = load_config(write(tmp_path, {"model_config": {"all_node_type": "int16"}}))
    assert config.activation_quant_method is None and config.is_default("activation_quant_method")
    assert load_config(write(tmp_path, {}, name="EMPTY.JSON")).activation_quant_method is None


def test_op_and_node_config_map(tmp_path):
    config = load_config(write(tmp_path, {
        "op_config": {"Conv": {"qtype": "int16"}},
        "node_config": {"conv1": {"qtype": "float16", "input1": "ec"}},
    }))
    assert config.op_config["Conv"].qtype == "int16"
    assert config.node_config["conv1"].qtype == "float16"
    assert config.node_config["conv1"].for_input(1) == "ec"
    assert config.source("node_config").endswith("q.json: node_config")


def test_lowbit_section(tmp_path):
    config = load_config(write(tmp_path, {"lowbit": {"target_device": "NVGPU", "calibrate_path": "calib/"},
                                          "model_config": {"activation": {"calibration_type": "kl"}}}))
    assert config.target_device == "NVGPU"
    assert str(config.calibrate_path[0].folder) == "calib"
    assert config.source("target_device").endswith("q.json: lowbit.target_device")


def test_overrides_win_over_the_json(tmp_path):
    path = write(tmp_path, {"model_config": {"activation": {"per_channel": True}}})
    assert load_config(path, {"per_channel": False}).per_channel == (False,)


# --- errors ---


@pytest.mark.parametrize("document, parts", [
    ({"model_confg": {}}, ["model_confg", "did you mean 'model_config'", "model_config, op_config"]),
    ({"model_config": {"activaton": {}}}, ["model_config.activaton", "did you mean 'activation'"]),
    ({"model_config": {"activation": {"num_bins": 1024}}},
     ["model_config.activation.num_bins", "did you mean 'num_bin'", "max_num_bin"]),
    ({"model_config": {"weight": {"bias_correction": {"num_samples": 2}}}},
     ["model_config.weight.bias_correction.num_samples", "did you mean 'num_sample'"]),
    ({"node_config": {"conv1": {"qtpye": "int8"}}}, ["node_config.conv1", "did you mean 'qtype'"]),
    ({"op_config": {"Conv": {"input0": "int8"}}}, ["op_config.Conv", "input0/input1 are node_config keys"]),
    ({"lowbit": {"target_devce": "CPU"}}, ["lowbit.target_devce", "did you mean 'target_device'"]),
])
def test_unknown_keys(tmp_path, document, parts):
    message = error_of(tmp_path, document)
    assert str(tmp_path / "q.json") in message
    for part in parts:
        assert part in message


@pytest.mark.parametrize("document, parts", [
    ([1, 2], ["top level must be a JSON object"]),
    ({"model_config": []}, ["model_config: expected an object"]),
    ({"model_config": {"activation": "kl"}}, ["model_config.activation: expected an object"]),
    ({"model_config": {"weight": {"bias_correction": True}}}, ["model_config.weight.bias_correction: expected an object"]),
    ({"node_config": ["conv1"]}, ["node_config: expected an object"]),
    ({"model_config": {"all_node_type": 16}}, ["model_config.all_node_type: expected a string"]),
    ({"model_config": {"activation": {"num_bin": "1024"}}}, ["model_config.activation.num_bin: expected an integer"]),
    ({"model_config": {"activation": {"num_bin": True}}}, ["model_config.activation.num_bin: expected an integer"]),
    ({"model_config": {"activation": {"num_bin": []}}}, ["model_config.activation.num_bin: empty list"]),
    ({"model_config": {"activation": {"max_num_bin": [16384]}}},
     ["model_config.activation.max_num_bin: expected an integer, one value, not a list"]),
    ({"model_config": {"activation": {"max_num_bin": 16384.5}}}, ["max_num_bin: expected an integer"]),
    ({"model_config": {"activation": {"max_percentile": "0.99"}}}, ["max_percentile: expected a number"]),
    ({"model_config": {"activation": {"per_channel": "true"}}}, ["per_channel: expected true or false"]),
    ({"model_config": {"activation": {"per_channel": []}}}, ["model_config.activation.per_channel", "empty list"]),
    ({"model_config": {"activation": {"calibration_type": "kll"}}},
     ["model_config.activation.calibration_type", "did you mean 'kl'", "allowed: max, kl"]),
    ({"model_config": {"activation": {"calibration_type": ["max", "mse"]}}},
     ["model_config.activation.calibration_type", "unknown value 'mse'"]),
    ({"model_config": {"weight": {"bias_correction": {"num_sample": False}}}}, ["num_sample: expected an integer"]),
    ({"model_config": {"modelwise_search": {"metric": ["mse", "mae"]}}},
     ["model_config.modelwise_search.metric: expected a string, one value, not a list"]),
    ({"model_config": {"all_node_type": "int16"}, "lowbit": {"all_node_type": "int8"}},
     ["lowbit.all_node_type", "model_config.all_node_type already sets"]),
])
def test_wrong_types(tmp_path, document, parts):
    message = error_of(tmp_path, document)
    for part in parts:
        assert part in message


@pytest.mark.parametrize("document, parts", [
    ({"model_config": {"activation": {"num_bin": 100}}}, ["q.json: model_config.activation.num_bin", "out of range"]),
    ({"model_config": {"activation": {"num_bin": [1024, 100]}}}, ["model_config.activation.num_bin", "out of range"]),
    ({"model_config": {"activation": {"max_percentile": 0.3}}}, ["model_config.activation.max_percentile"]),
    ({"model_config": {"activation": {"max_percentile": 1.5}}}, ["model_config.activation.max_percentile"]),
    ({"model_config": {"activation": {"num_bin": 4096, "max_num_bin": 2048}}},
     ["model_config.activation.max_num_bin", "below num_bin"]),
    ({"model_config": {"weight": {"bias_correction": {"num_sample": 0}}}},
     ["model_config.weight.bias_correction.num_sample", "out of range"]),
    ({"model_config": {"all_node_type": "int4"}}, ["model_config.all_node_type", "int16"]),
    ({"model_config": {"layerwise_search": {"metric": "cosine-similarty"}}},
     ["model_config.layerwise_search.metric", "did you mean 'cosine-similarity'"]),
    ({"lowbit": {"target_device": "TPU"}}, ["lowbit.target_device", "NVGPU"]),
])
def test_out_of_range(tmp_path, document, parts):
    message = error_of(tmp_path, document)
    for part in parts:
        assert part in message


def test_invalid_json_names_line_and_column(tmp_path):
    message = error_of(tmp_path, '{\n  // a comment\n  "model_config": {"all_node_type": "int16",}\n}\n')
    assert "q.json, line 3, column" in message and "invalid JSON" in message


def test_template_alternatives_as_written_are_invalid_json(tmp_path):
    """Horizon's template writes alternatives as "a"/"b": the user must pick one."""
    message = error_of(tmp_path, '{"model_config": {"all_node_type": "int16"/"float16"}}')
    assert "line 1, column 43" in message


def test_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="config file not found"):
        load_config(tmp_path / "absent.json")


def test_not_utf8(tmp_path):
    path = tmp_path / "q.json"
    path.write_bytes(b'{"lowbit": {"calibrate_path": "\xff"}}')
    with pytest.raises(LowbitError, match="not UTF-8"):
        load_config(path)


def test_cli_reports_one_line_error(tmp_path, capsys):
    path = write(tmp_path, {"model_config": {"activation": {"num_bin": 100}}})
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and err.count("\n") == 1
    assert "model_config.activation.num_bin" in err


def test_cli_shows_mapped_values(tmp_path, capsys):
    path = write(tmp_path, COMMENTED_TEMPLATE)
    assert main(["config", "show", str(path)]) == 0
    out = capsys.readouterr().out
    num_bin = next(line for line in out.splitlines() if line.startswith("num_bin "))
    assert "1024,2048" in num_bin and "model_config.activation.num_bin" in num_bin
    method = next(line for line in out.splitlines() if line.startswith("activation_quant_method "))
    assert "MAX_MIN,REMOVAL_OUTLIER,KL" in method
    assert "conv1:int16" in out
