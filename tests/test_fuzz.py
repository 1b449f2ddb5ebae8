"""Fuzzing what a user can hand lowbit: config files, flag values and corrupted models.

Whatever hypothesis generates, lowbit either does the job or stops with a LowbitError
(exit code 2 from the CLI, one line, no output file): never another exception. The
number of examples is bounded so that CI stays fast; derandomized, so a failure repeats.
"""

import string

import numpy as np
import pytest
from conftest import conv_relu_pool_model, random_feeds, save, write_npy_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.cli import main
from lowbit.config.fields import FIELDS, SECTIONS

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# values of the kinds a config holds, and the usual ways to get them wrong
VALUES = st.one_of(
    st.integers(-70000, 70000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "MAX_MIN", "KL,MSE", "NVGPU", "DSP", "[0.5, 0.5]", "[]", "input:1,3,8,8",
                     "input:", ":", ",", ";", "input:0,3", "x:y", "RGB", "CUBIC", "AUTO_TUNE", "cosine-similarity",
                     "0", "1", "-1", "8", "16", "0.0", "1e309", "nan", "", " ", "\u00e9\u00e8", "a,b,,c"]),
    st.text(alphabet=string.printable, max_size=12),
)
KEYS = st.sampled_from([f.key for f in FIELDS] + ["per_chanel", "quant-type", "", "bit_num "])


def _ini(sections):
    lines = []
    for section, pairs in sections:
        lines.append(f"[{section}]")
        lines += [f"{key}={value}".replace("\n", " ").replace("\r", " ") for key, value in pairs]
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([*SECTIONS, "full_quant_params", "DEFAULT"]),
                          st.lists(st.tuples(KEYS, VALUES), max_size=5)), max_size=4))
def test_config_files(tmp_path, sections):
    path = tmp_path / "fuzz.cfg"
    path.write_text(_ini(sections), encoding="utf-8")
    try:
        lowbit.load_config(path)
    except lowbit.LowbitError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([f for f in FIELDS if f.key not in ("calibrate_path", "data_list")]),
                          VALUES), min_size=1, max_size=3))
def test_flag_values(tmp_path, capsys, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)  # a path-valued flag (calibration_table_out=0) writes here, not in the checkout
    model = tmp_path / "m.onnx"
    if not model.exists():
        save(conv_relu_pool_model(), model)
        write_npy_folder(tmp_path / "calib", random_feeds(8))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    args = ["quantize", str(model), "-o", str(out), "--data", str(tmp_path / "calib"), "--quiet"]
    for field, value in flags:
        flag = "--" + field.key.replace("_", "-")
        if value.lower() in ("true", "false") and field.kind.name == "BOOL":
            args.append(flag if value.lower() == "true" else "--no-" + flag[2:])
        elif field.kind.name != "BOOL":
            args.append(f"{flag}={value}")
    code = main(args)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("lowbit: error: ") and "Traceback" not in err
        assert not out.exists() and not list(out.parent.iterdir())
    else:
        out.unlink()


@FUZZ
@given(st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                                        max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
))
def test_corrupted_models(tmp_path, corruption):
    data = bytearray(conv_relu_pool_model().SerializeToString())
    kind, how = corruption
    if kind == "flip":
        for position, mask in how:
            data[position % len(data)] ^= mask
    else:
        data = data[:int(len(data) * how)]
    src = tmp_path / "broken.onnx"
    src.write_bytes(bytes(data))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    try:
        lowbit.quantize(src, out, data=random_feeds(8), progress=False)
    except lowbit.LowbitError:
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name != "q.onnx"]
    if out.exists():
        out.unlink()


@pytest.mark.parametrize("seed", range(3))
def test_corrupted_calibration_files(tmp_path, seed):
    """Flipped bytes in .npy files: a readable sample of another shape/dtype, or a named bad file."""
    src = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    folder = write_npy_folder(tmp_path / "calib", random_feeds(8))
    rng = np.random.default_rng(seed)
    for path in sorted(folder.iterdir())[:3]:
        data = bytearray(path.read_bytes())
        for position in rng.integers(0, len(data), 4):
            data[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
    try:
        lowbit.quantize(src, tmp_path / "q.onnx", data=folder, progress=False)
    except lowbit.LowbitError:
        assert not (tmp_path / "q.onnx").exists()
