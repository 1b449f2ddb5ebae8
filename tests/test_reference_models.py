"""lowbit writes the same models as the record kept in tests/reference/quantized_models.json.

The record holds, per case, a digest of every initializer of the written model (integer
weights, biases, scales, zero points, float constants) by name, and the node list. A
change meant to keep behaviour (a refactor, a speed-up) must keep them; a change meant to
alter them re-records on purpose:

    python tests/test_reference_models.py --record

and says in its commit which figures moved and why. The cases cover every mode on real
models: the bundled digit example (its INI), EfficientNet-Lite0 with the default full
quantization (search, GPTQ, bias correction), MiniLM dynamic and weight-only (with
data, so bias correction and the output check run), and magika (full, int32 input).

The bits of a calibrated model follow the float and integer kernels ONNX Runtime runs
during calibration, GPTQ and bias correction, and those differ with its version and the
CPU's vector extensions (an AVX2 CPU and an AVX-512 VNNI one write different last bits,
and the search and the rounding then part ways). So the record keeps one set of
fingerprints per :func:`numerics`; on a combination with none the test is skipped and says
how to record it (``--record`` adds it beside the others).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from bench import zoo  # noqa: E402
from bench.run import cpu_flags  # noqa: E402

RECORD = Path(__file__).resolve().parent / "reference" / "quantized_models.json"


def _digits(out: Path):
    return lowbit.quantize(ROOT / "examples/digits/digit_cnn.onnx", out, config=ROOT / "examples/digits/full_quant.cfg",
                           progress=False)


def _efficientnet(out: Path):
    photos = zoo.skimage_photos()
    feeds = [{"input": zoo.efficientnet_input(c)} for n in ("astronaut", "coffee", "motorcycle_left")
             for c in zoo.crops(photos[n], 8, seed=0)]
    return lowbit.quantize(zoo.efficientnet_lite0(), out, data=feeds, progress=False)


def _minilm_feeds(count: int):
    from bench import minilm

    tokenize = minilm.WordPiece()
    return [tokenize([sentence], 32) for sentence in zoo.stdlib_sentences()[:count]]


def _minilm_dynamic(out: Path):
    return lowbit.quantize(zoo.minilm_encoder(), out, quant_type="DYNAMIC_QUANT", progress=False)


def _minilm_weight(out: Path):
    return lowbit.quantize(zoo.minilm_encoder(), out, data=_minilm_feeds(8), quant_type="WEIGHT_QUANT",
                           bit_num=8, progress=False)


def _magika(out: Path):
    """Files of Debian packages (not of the installed Python packages, which change with the environment)."""
    files = sorted(p for p in zoo.opencv_doc_data().iterdir() if p.is_file())
    contents = [p.read_bytes() for p in files if p.suffix not in (".jpg", ".png")][:12] + \
        [p.read_bytes() for p in files if p.suffix in (".jpg", ".png")][::10]
    cookies = zoo.fortunes()
    contents += ["\n%\n".join(cookies[i:i + 8]).encode() for i in range(0, 8 * 8, 8)]
    feeds = [{"bytes": zoo.magika_input(data)} for data in contents]
    return lowbit.quantize(zoo.magika_model(), out, data=feeds, progress=False)


CASES: dict[str, Callable[[Path], object]] = {
    "digits_example": _digits,
    "efficientnet_lite0_default": _efficientnet,
    "minilm_dynamic": _minilm_dynamic,
    "minilm_weight_only_8bit": _minilm_weight,
    "magika_default": _magika,
}


# The CPU features that choose ONNX Runtime's float (FMA, AVX-512) and integer (VNNI, AMX) kernels.
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def numerics() -> str:
    """What decides the last bits of a calibrated model: ONNX Runtime's version and the CPU features its
    kernels are chosen by (``onnxruntime 1.32.0, x86_64 avx2 fma``)."""
    import onnxruntime

    flags = cpu_flags()
    features = [name for name in KERNEL_FEATURES if name in flags]
    return " ".join([f"onnxruntime {onnxruntime.__version__}, {platform.machine()}", *features])


def fingerprint(path: Path) -> dict:
    """Digests of the model's initializers by name, and its nodes (op type and name, in order)."""
    model = onnx.load(str(path))
    tensors = {}
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
        tensors[tensor.name] = f"{array.dtype} {list(array.shape)} {digest}"
    return {"tensors": tensors, "nodes": [f"{n.op_type} {n.name}" for n in model.graph.node]}


def _quantized(case: str, folder: Path) -> dict:
    out = folder / f"{case}.onnx"
    CASES[case](out)
    return fingerprint(out)


@pytest.mark.parametrize("case", list(CASES))
def test_same_model_as_recorded(case, tmp_path):
    records = json.loads(RECORD.read_text())
    if numerics() not in records:
        pytest.skip(f"no record for {numerics()} (recorded: {'; '.join(records)}); "
                    "python tests/test_reference_models.py --record adds one")
    expected = records[numerics()][case]
    got = _quantized(case, tmp_path)
    changed = sorted(name for name in expected["tensors"].keys() | got["tensors"].keys()
                     if expected["tensors"].get(name) != got["tensors"].get(name))
    assert not changed, f"{len(changed)} initializers differ from the record, e.g. {changed[:5]}"
    assert got["nodes"] == expected["nodes"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_reference_models.py --record")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        record = {case: _quantized(case, Path(folder)) for case in CASES}
    records = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    records[numerics()] = record
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    print(f"recorded {', '.join(record)} for {numerics()} in {RECORD}")
