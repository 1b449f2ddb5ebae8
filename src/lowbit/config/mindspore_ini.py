"""Reader for MindSpore Lite's post-training quantization config (INI style).

Sections and keys are those of MindSpore Lite's converter (see the table in
:mod:`lowbit.config.fields`). The reader only checks the file's structure: which
sections and keys exist and where each belongs. Parsing and range checks of values
happen in :func:`lowbit.config.model.resolve`, shared with CLI flags and API arguments.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from ..errors import LowbitError, did_you_mean
from .fields import FIELDS_BY_KEY, SECTIONS


def read_ini(path: str | Path) -> list[tuple[dict[str, str], str]]:
    """Read the file into resolve() layers: one (values, origin) pair per section."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"config file not found: {path}")
    parser = configparser.ConfigParser(
        inline_comment_prefixes=("#", ";"), interpolation=None, strict=True, default_section="\0none"
    )
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except UnicodeDecodeError:
        raise LowbitError(f"{path}: not a text config file (it is not UTF-8)") from None
    except configparser.MissingSectionHeaderError as exc:
        raise LowbitError(
            f"{path}, line {exc.lineno}: a key outside any section; "
            f"start with a section such as [{SECTIONS[0]}]") from None
    except configparser.Error as exc:
        raise LowbitError(f"{path}: {exc.message.splitlines()[0]}") from None

    layers = []
    for section in parser.sections():
        if section not in SECTIONS:
            raise LowbitError(
                f"{path}: unknown section [{section}]" + did_you_mean(section, SECTIONS)
                + "; sections: " + ", ".join(f"[{s}]" for s in SECTIONS))
        origin = f"{path} [{section}]"
        values: dict[str, str] = {}
        for key, raw in parser.items(section):
            field = FIELDS_BY_KEY.get(key)
            if field is None:
                in_section = [k for k, f in FIELDS_BY_KEY.items() if f.section == section]
                raise LowbitError(f"{origin}: unknown key '{key}'" + did_you_mean(key, in_section)
                                  + "; keys of this section: " + ", ".join(in_section))
            if field.section != section:
                raise LowbitError(f"{origin}: key '{key}' belongs in [{field.section}]")
            values[key] = raw
        layers.append((values, origin))
    return layers
