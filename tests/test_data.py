"""Calibration data: image preprocessing against numpy references, .bin buffers, lists, batching, errors."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import conv_relu_pool_model, float_input, make_model, random_feeds, save
from onnx import helper
from PIL import Image

import lowbit
from lowbit.cli import main
from lowbit.data.feeds import InputSpec, batched
from lowbit.data.images import ImagePreprocess
from lowbit.data.sources import DataOptions, read_bin, read_image

SKIMAGE = Path(importlib.util.find_spec("skimage").origin).parent / "data"
SKLEARN = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"


# -- numpy references of OpenCV's rules ------------------------------------------------

def ref_gray(rgb):
    """OpenCV's BGR2GRAY on uint8: fixed-point 0.299 R + 0.587 G + 0.114 B, rounded."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)[..., None]


def _linear_taps(n_out, n_in):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.floor(src).astype(int)
    weight = (src - i0).astype(np.float32)
    return np.minimum(i0, n_in - 1), np.minimum(i0 + 1, n_in - 1), weight


def _cubic_taps(n_out, n_in, a=-0.75):
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(int)
    t = src - i0
    w = np.stack([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                  ((a + 2) * t - (a + 3)) * t * t + 1,
                  ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1], axis=1)
    w = np.concatenate([w, 1 - w.sum(axis=1, keepdims=True)], axis=1)
    idx = np.clip(i0[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
    return idx, w


def ref_resize(x, width, height, method):
    """HxWxC float32 resized as OpenCV does (half-pixel centres; NEAREST: floor(dst * scale))."""
    h, w = x.shape[:2]
    if method == "NEAREST":
        ys = np.minimum(np.floor(np.arange(height) * (h / height)).astype(int), h - 1)
        xs = np.minimum(np.floor(np.arange(width) * (w / width)).astype(int), w - 1)
        return x[ys][:, xs]
    if method == "LINEAR":
        y0, y1, wy = _linear_taps(height, h)
        x0, x1, wx = _linear_taps(width, w)
        rows = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
        return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    yi, wy = _cubic_taps(height, h)
    xi, wx = _cubic_taps(width, w)
    rows = np.einsum("ok,okwc->owc", wy, x[yi])
    return np.einsum("ok,hokc->hoc", wx, rows[:, xi])


def ref_pipeline(rgb, fmt, size, method, crop, mean, std, layout):
    """format -> resize -> centre crop -> normalize -> layout, in plain numpy."""
    x = {"RGB": rgb, "BGR": rgb[..., ::-1], "GRAY": ref_gray(rgb)}[fmt].astype(np.float32)
    x = ref_resize(x, *size, method)
    cw, ch = crop
    top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
    x = (x[top:top + ch, left:left + cw] - np.float32(mean)) / np.float32(std)
    return (x.transpose(2, 0, 1) if layout == "NCHW" else x)[None]


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory):
    """A lossless copy of a scikit-image photo and of a scikit-learn photo (decoders agree exactly on PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    for name, source in (("chelsea", SKIMAGE / "chelsea.png"), ("china", SKLEARN / "china.jpg")):
        Image.open(source).convert("RGB").save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("fmt", ["RGB", "BGR", "GRAY"])
@pytest.mark.parametrize("method", ["LINEAR", "NEAREST", "CUBIC"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_preprocessing_matches_numpy_reference(photo_png, fmt, method, layout):
    channels = 1 if fmt == "GRAY" else 3
    mean, std = ((110.0,), (60.0,)) if fmt == "GRAY" else ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
    steps = ImagePreprocess(to_format=fmt, resize=(160, 120), resize_method=method, center_crop=(96, 100),
                            mean=mean, std=std)
    shape = (None, channels, 100, 96) if layout == "NCHW" else (None, 100, 96, channels)
    spec = InputSpec("image", np.dtype(np.float32), shape)
    for path in sorted(photo_png.glob("*.png")):
        got = read_image(path, spec, DataOptions(images=steps))
        rgb = np.asarray(Image.open(path).convert("RGB"))
        expected = ref_pipeline(rgb, fmt, (160, 120), method, (96, 100), mean, std, layout)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)


def test_every_image_format_decodes(tmp_path):
    rgb = np.asarray(Image.open(SKIMAGE / "astronaut.png").convert("RGB"))[:64, :64]
    spec = InputSpec("image", np.dtype(np.float32), (None, 3, 64, 64))
    for suffix in ("png", "bmp", "webp", "jpg"):
        Image.fromarray(rgb).save(tmp_path / f"a.{suffix}", quality=95) if suffix != "png" else \
            Image.fromarray(rgb).save(tmp_path / "a.png")
        got = read_image(tmp_path / f"a.{suffix}", spec, DataOptions(images=ImagePreprocess(to_format="RGB")))
        tolerance = 0 if suffix in ("png", "bmp") else 12  # lossy formats: decoders may differ a little
        assert np.abs(got[0].transpose(1, 2, 0) - rgb).mean() <= tolerance / 4 + 1e-6


def test_integer_image_input_keeps_pixels(photo_png):
    spec = InputSpec("image", np.dtype(np.uint8), (1, 224, 224, 3))
    got = read_image(photo_png / "chelsea.png", spec,
                     DataOptions(images=ImagePreprocess(to_format="RGB", resize=(224, 224))))
    assert got.dtype == np.uint8 and got.shape == (1, 224, 224, 3)


# -- .bin buffers -------------------------------------------------------------------------

def test_bin_round_trip_nhwc_default_and_nchw(tmp_path):
    x = np.random.default_rng(0).normal(size=(1, 3, 4, 5)).astype(np.float32)  # the model input, NCHW
    spec = InputSpec("input", np.dtype(np.float32), (None, 3, 4, 5))
    x.transpose(0, 2, 3, 1).tofile(tmp_path / "nhwc.bin")  # MindSpore's default buffer layout
    x.tofile(tmp_path / "nchw.bin")
    np.testing.assert_array_equal(read_bin(tmp_path / "nhwc.bin", spec, DataOptions()), x)
    np.testing.assert_array_equal(read_bin(tmp_path / "nchw.bin", spec, DataOptions(bin_layout="NCHW")), x)


def test_bin_of_the_wrong_size_names_expected_and_actual(tmp_path):
    spec = InputSpec("input", np.dtype(np.float32), (None, 3, 4, 5))
    np.zeros(59, np.float32).tofile(tmp_path / "short.bin")
    with pytest.raises(lowbit.LowbitError) as err:
        read_bin(tmp_path / "short.bin", spec, DataOptions())
    message = str(err.value)
    assert "short.bin" in message and "236 bytes" in message and "240 bytes" in message and "1x4x5x3" in message


def test_bin_with_free_dims_needs_input_shape(tmp_path):
    spec = InputSpec("tokens", np.dtype(np.int64), (None, None))
    np.arange(6, dtype=np.int64).tofile(tmp_path / "t.bin")
    with pytest.raises(lowbit.LowbitError, match="input_shape tokens:"):
        read_bin(tmp_path / "t.bin", spec, DataOptions())
    got = read_bin(tmp_path / "t.bin", spec, DataOptions(shapes={"tokens": (2, 3)}))
    assert got.dtype == np.int64 and got.tolist() == [[0, 1, 2], [3, 4, 5]]


# -- sources through lowbit.quantize ------------------------------------------------------

def two_input_model():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["a", "w"], ["ca"], name="conv_a"),
             helper.make_node("Conv", ["b", "w"], ["cb"], name="conv_b"),
             helper.make_node("Add", ["ca", "cb"], ["output"], name="add")]
    return make_model(nodes, [float_input("a", ["N", 3, 8, 8]), float_input("b", ["N", 3, 8, 8])],
                      [float_input("output", ["N", 4, 8, 8])], [("w", rng.normal(size=(4, 3, 1, 1)).astype(np.float32))])


def test_input_folders_npz_and_data_list_give_the_same_ranges(tmp_path):
    model = save(two_input_model(), tmp_path / "two.onnx")
    rng = np.random.default_rng(2)
    samples = [{k: rng.normal(size=(1, 3, 8, 8)).astype(np.float32) for k in "ab"} for _ in range(5)]
    for name in "ab":
        (tmp_path / name).mkdir()
    (tmp_path / "npz").mkdir()
    lines = []
    for i, s in enumerate(samples):
        np.save(tmp_path / "a" / f"{i}.npy", s["a"])
        s["b"].tofile(tmp_path / "b" / f"{i}.bin")  # 4-D .bin: NHWC by default, so write NCHW and say so
        np.savez(tmp_path / "npz" / f"{i}.npz", **s)
        lines.append(f"a/{i}.npy,b/{i}.bin")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    by_folders = lowbit.quantize(model, tmp_path / "q1.onnx", calibrate_path=f"a:{tmp_path / 'a'},b:{tmp_path / 'b'}",
                                 input_data_format="NCHW", progress=False)
    by_npz = lowbit.quantize(model, tmp_path / "q2.onnx", data=tmp_path / "npz", progress=False)
    by_list = lowbit.quantize(model, tmp_path / "q3.onnx", data_list=str(tmp_path / "list.txt"),
                              input_data_format="NCHW", progress=False)
    for result in (by_folders, by_npz, by_list):
        assert result.calibration_samples == 5
    for name in ("a", "b"):
        assert by_folders.tensors[name] == by_npz.tensors[name] == by_list.tensors[name]


def test_batching_only_for_free_batch_dims():
    free = [InputSpec("x", np.dtype(np.float32), (None, 2))]
    fixed = [InputSpec("x", np.dtype(np.float32), (1, 2))]
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(5)]
    assert [b["x"].shape[0] for b in batched(feeds, free, 2)] == [2, 2, 1]
    assert [b["x"].shape[0] for b in batched(feeds, fixed, 2)] == [1, 1, 1, 1, 1]
    mixed = [{"x": np.zeros((1, 2), np.float32)}, {"x": np.zeros((1, 3), np.float32)}]
    assert [b["x"].shape for b in batched(mixed, free, 4)] == [(1, 2), (1, 3)]


def test_image_folder_end_to_end_from_an_ini(tmp_path, photo_png):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    cfg = tmp_path / "image.cfg"
    cfg.write_text(f"""[common_quant_param]
quant_type=FULL_QUANT

[data_preprocess_param]
calibrate_path=input:{photo_png}
calibrate_size=2
input_type=IMAGE
image_to_format=RGB
normalize_mean=[127.5, 127.5, 127.5]
normalize_std=[127.5, 127.5, 127.5]
resize_width=8
resize_height=8
resize_method=LINEAR
""")
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--config", str(cfg), "-q"]) == 0
    result = lowbit.quantize(model, tmp_path / "q2.onnx", config=cfg, progress=False)
    assert -1.0 <= result.tensors["input"].min < 0 < result.tensors["input"].max <= 1.0


# -- errors -------------------------------------------------------------------------------

def cli(capsys, *args):
    code = main(["quantize", *map(str, args), "-q"])
    return code, capsys.readouterr().err


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys, photo_png):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in photo_png.glob("*.png"):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = [model, "-o", tmp_path / "q.onnx", "--data", folder, "--resize-width", "8", "--resize-height", "8"]
    code, err = cli(capsys, *args)
    assert code == 2 and "broken.jpg" in err and not (tmp_path / "q.onnx").exists()
    code, err = cli(capsys, *args, "--skip-bad-samples")
    assert code == 0 and "warning" in err and "broken.jpg" in err


def test_data_for_an_input_the_model_lacks(tmp_path, capsys):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    folder = tmp_path / "x"
    folder.mkdir()
    np.save(folder / "0.npy", random_feeds(1)[0]["input"])
    code, err = cli(capsys, model, "-o", tmp_path / "q.onnx", "--calibrate-path", f"image:{folder}")
    assert code == 2 and "'image'" in err and "model inputs: input" in err


def test_half_a_resize_is_an_error(tmp_path, capsys, photo_png):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    code, err = cli(capsys, model, "-o", tmp_path / "q.onnx", "--data", photo_png, "--resize-width", "8")
    assert code == 2 and "resize_width needs resize_width and resize_height together" in err


def test_image_of_the_wrong_size_without_resize(tmp_path, capsys, photo_png):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    code, err = cli(capsys, model, "-o", tmp_path / "q.onnx", "--data", photo_png)
    assert code == 2 and "chelsea.png" in err and "?x3x8x8" in err


def test_data_list_with_a_missing_file(tmp_path, capsys):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    (tmp_path / "list.txt").write_text("missing.npy\n")
    code, err = cli(capsys, model, "-o", tmp_path / "q.onnx", "--data-list", tmp_path / "list.txt")
    assert code == 2 and "list.txt, line 1" in err and "missing.npy" in err


@pytest.mark.parametrize("kind", ["NPY", "NPZ", "BIN"])
def test_each_input_type_from_an_ini(tmp_path, kind):
    model = save(conv_relu_pool_model(), tmp_path / "m.onnx")
    folder = tmp_path / kind.lower()
    folder.mkdir()
    for i, feed in enumerate(random_feeds(4)):
        x = feed["input"]
        if kind == "NPY":
            np.save(folder / f"{i}.npy", x)
        elif kind == "NPZ":
            np.savez(folder / f"{i}.npz", input=x)
        else:
            x.transpose(0, 2, 3, 1).tofile(folder / f"{i}.bin")  # NHWC, MindSpore's default for .bin
    cfg = tmp_path / "q.cfg"
    path_line = f"calibrate_path={folder}" if kind == "NPZ" else f"calibrate_path=input:{folder}"
    cfg.write_text(f"[common_quant_param]\nquant_type=FULL_QUANT\n\n[data_preprocess_param]\n{path_line}\n"
                   f"calibrate_size=4\ninput_type={kind}\n")
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--config", str(cfg), "-q"]) == 0
    result = lowbit.quantize(model, tmp_path / "q2.onnx", config=cfg, progress=False)
    lo = min(float(f["input"].min()) for f in random_feeds(4))
    assert result.calibration_samples == 4 and result.tensors["input"].min == pytest.approx(lo)
