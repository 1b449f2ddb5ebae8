"""int8 speed on architectures with no pretrained weights in a PyPI package: latency only.

Reports from held-out models said lowbit's int8 model was not faster than float on an
MTCNN-like model and on ResNet-50 at batch 8. Neither ships pretrained in a package this
bench may install, and latency does not depend on the weights' values, so both are built
here in torch with random weights (BatchNorm statistics randomised, so that folding is not
trivial), exported, quantized by lowbit's default and by onnxruntime MinMax on 32 random
samples, and timed beside float32. No accuracy is reported for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import zoo

SHAPES = {"ResNet-50 (random weights)": ("resnet50", (3, 224, 224)),
          "MTCNN P-Net (random weights)": ("pnet", (3, 240, 320))}


def _resnet50():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                      nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                      nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None if cin == cout and stride == 1 else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers, cin = [], 64
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, mid * 4, stride if i == 0 else 1))
            cin = mid * 4
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def _pnet():
    from torch import nn

    class PNet(nn.Module):  # MTCNN's proposal network: PReLU between small convolutions, two heads
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
                                      nn.Conv2d(10, 16, 3), nn.PReLU(16), nn.Conv2d(16, 32, 3), nn.PReLU(32))
            self.boxes = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            return self.boxes(self.body(x))

    return PNet()


def model(key: str, shape: tuple[int, ...]) -> Path:
    path = zoo.cache_dir("models") / f"{key}_random.onnx"
    if not path.exists():
        import torch
        from torch import nn

        torch.manual_seed(0)
        network = _resnet50() if key == "resnet50" else _pnet()
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        zoo._export(network.eval(), torch.randn(1, *shape), path, "torchscript")
    return path


def section(work: Path, quantize_in_child, compare_latency, runs: int) -> list[dict]:
    cases = []
    for name, (key, shape) in SHAPES.items():
        source = model(key, shape)
        calib = work / key / "calib"
        calib.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(32):
            np.save(calib / f"{i:03d}.npy", rng.uniform(-1, 1, (1, *shape)).astype(np.float32))
        paths = {"float32": source}
        for tool in ("lowbit", "ort-minmax"):
            output = work / key / f"{tool}.onnx"
            if quantize_in_child(tool, source, calib, output).error is None:
                paths[tool] = output
        sample = rng.uniform(-1, 1, (1, *shape)).astype(np.float32)
        b1 = compare_latency(paths, {"input": sample}, max(5, runs // 5))
        b8 = compare_latency(paths, {"input": np.repeat(sample, 8, axis=0)}, 3)
        cases.append({"name": name, "latency_b1_ms": b1, "latency_b8_ms": b8})
    return cases


def markdown(cases: list[dict]) -> list[str]:
    lines = ["## int8 speed on ResNet-50 and MTCNN P-Net shapes (random weights, latency only)", "",
             "Built in torch with random weights (no pretrained copy ships in a package); quantized on 32 random "
             "samples. Latency in ms, batch 1 / batch 8.", "",
             "| model | float32 | lowbit int8 | onnxruntime MinMax int8 | lowbit speed-up b1 / b8 |",
             "|---|---|---|---|---|"]
    for case in cases:
        b1, b8 = case["latency_b1_ms"], case["latency_b8_ms"]

        def cell(tool):
            return f"{b1[tool]:.2f} / {b8[tool]:.2f}" if tool in b1 else "failed"

        speedup = (f"{b1['float32'] / b1['lowbit']:.2f}x / {b8['float32'] / b8['lowbit']:.2f}x"
                   if "lowbit" in b1 else "-")
        lines.append(f"| {case['name']} | {cell('float32')} | {cell('lowbit')} | {cell('ort-minmax')} | {speedup} |")
    return lines + [""]
