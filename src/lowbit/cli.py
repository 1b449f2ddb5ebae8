"""The ``lowbit`` command.

    lowbit quantize MODEL -o OUT [--config FILE.cfg|FILE.json] [--data FOLDER] [--report REPORT.html] [--KEY VALUE ...]
    lowbit analyze FLOAT QUANTIZED --data FOLDER [--report REPORT.html] [--samples N] [--workers N] [--config FILE]
    lowbit inspect MODEL
    lowbit config show [FILE] [--KEY VALUE ...]

Every configuration key is also a flag (``per_channel`` -> ``--per-channel`` /
``--no-per-channel``), generated from the key table so the two never drift apart.
Errors in the user's input print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import FIELDS, Kind, load_config
from .config.model import CalibrationSource, QuantConfig, format_shapes, format_sources
from .config.precision import NodePrecision
from .config.precision import describe as describe_precisions
from .errors import LowbitError

EXIT_USAGE = 2
SHORT_FLAGS = {"calibrate_path": "--data", "accuracy_target": "--target"}  # the flag a user types for these keys


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration keys (override the config file)")
    for field in FIELDS:
        flags = [_flag(field.key)]
        if field.key in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[field.key])
        help_text = f"[{field.section}] {field.help}"
        if field.kind is Kind.BOOL:
            group.add_argument(*flags, dest=field.key, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(*flags, dest=field.key, default=None, metavar=field.kind.name, help=help_text)


def _overrides(args: argparse.Namespace) -> dict:
    return {f.key: getattr(args, f.key) for f in FIELDS if getattr(args, f.key) is not None}


def _describe_flag(key: str) -> str:
    return SHORT_FLAGS.get(key, _flag(key))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization of ONNX models.")
    commands = parser.add_subparsers(dest="command", required=True)

    quantize = commands.add_parser("quantize", help="quantize a float32 ONNX model",
                                   description="Quantize a float32 ONNX model into an int8 QDQ model.")
    quantize.add_argument("model", help="float32 ONNX model")
    quantize.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    quantize.add_argument("--config", help="MindSpore-style INI config file, or Horizon's quant_config (*.json)")
    quantize.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    _add_config_flags(quantize)

    inspect = commands.add_parser("inspect", help="show how a quantized ONNX model is quantized",
                                  description="Per quantized tensor: reading node, kind, integer type, bits used, "
                                              "scheme and scale shape; and the file size against float32.")
    inspect.add_argument("model", help="quantized ONNX model (lowbit's or another tool's)")

    analyze = commands.add_parser(
        "analyze", help="where a quantized model loses accuracy, and which nodes to leave float",
        description="Per quantized node: the output error with only it quantized and with only it left float; "
                    "per tensor: the quantized model against the float one (cosine, SQNR), histograms, ranges "
                    "and clip rates; and the nodes to leave float, as a skip_quant_node line and a Horizon "
                    "node_config snippet. The report is one self-contained HTML page and a JSON file beside it.")
    analyze.add_argument("float_model", help="the float32 ONNX model")
    analyze.add_argument("quantized_model", help="its quantized QDQ form (lowbit's, or another tool's)")
    analyze.add_argument("--data", help="samples: a folder of .npy/.npz/.bin/image files (as for quantize)")
    analyze.add_argument("--config", help="MindSpore-style INI: [data_preprocess_param] for images, "
                                          "calibrate_path or data_list")
    analyze.add_argument("--report", help="write REPORT.html (and REPORT.json beside it)")
    analyze.add_argument("--samples", type=int, default=32, help="samples to analyse (default 32)")
    analyze.add_argument("--workers", type=int, help="measure the per-node figures on a local Ray with this many "
                                                     "worker CPUs (needs lowbit[ray])")
    analyze.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved configuration and where each value came from")
    show.add_argument("config", nargs="?", help="MindSpore-style INI config file, or Horizon's quant_config (*.json)")
    _add_config_flags(show)
    return parser


def format_config(config: QuantConfig) -> str:
    lines = []
    section = None
    width = max(len(f.key) for f in FIELDS)
    for field, setting in config.items():
        if field.section != section:
            section = field.section
            lines.append(f"[{section}]")
        origin = setting.source + (" (a lowbit key, not MindSpore's)" if field.extension else "")
        lines.append(f"{field.key:<{width}} = {_show_value(setting.value):<24} # {origin}")
    return "\n".join(lines)


def _show_value(value) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict) and all(isinstance(v, NodePrecision) for v in value.values()):
        return describe_precisions(value)
    if isinstance(value, dict):
        return format_shapes(value)
    if isinstance(value, tuple) and all(isinstance(v, bool) for v in value):
        return ",".join(str(v).lower() for v in value)
    if isinstance(value, tuple) and value and all(isinstance(v, CalibrationSource) for v in value):
        return format_sources(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(none)"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            from .reports.inspect import format_inspection, inspect_model

            print(format_inspection(inspect_model(args.model)))
            return 0
        if args.command == "analyze":
            return _analyze(args)
        config = load_config(getattr(args, "config", None), _overrides(args), describe=_describe_flag)
        if args.command == "config":
            print(format_config(config))
            return 0
        from .api import run

        result = run(args.model, args.output, config, progress=not args.quiet,
                     warn=lambda message: print(f"lowbit: warning: {message}", file=sys.stderr))
        if not args.quiet:
            print(result.summary())
        return 0
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def _analyze(args: argparse.Namespace) -> int:
    from .api import analyze
    from .reports.analysis import format_analysis, report_paths

    analysis = analyze(args.float_model, args.quantized_model, args.data, args.config, samples=args.samples,
                       workers=args.workers, report=args.report, progress=None if args.quiet else _progress_bar,
                       warn=lambda message: print(f"lowbit: warning: {message}", file=sys.stderr))
    if not args.quiet:
        print(format_analysis(analysis))
        if args.report is not None:
            print("wrote {} and {}".format(*report_paths(args.report)))
    return 0


def _progress_bar(label: str, total: int):
    """A tqdm bar for one stage of the analysis; returns the function that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="step", leave=False)

    def step() -> None:
        bar.update()
        if bar.n >= total:
            bar.close()
    return step


if __name__ == "__main__":
    sys.exit(main())
