"""The bench's and the tests' data must not depend on what the process imported before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_DIGEST = ("import hashlib, sys; sys.path.insert(0, {root!r}); {imports}from bench import zoo; "
           "print(hashlib.sha256('\\n'.join(zoo.stdlib_sentences()).encode()).hexdigest())")


def _sentences_digest(imports: str) -> str:
    code = _DIGEST.format(root=str(ROOT), imports=imports)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_stdlib_sentences_are_the_same_whatever_the_process_imported():
    # logging.handlers and email.mime.text are submodules of two of the packages whose members the sentences come
    # from: collected in the process itself, importing them first added their docstrings and moved the split
    # between calibration and held-out text
    plain = _sentences_digest("")
    assert plain == _sentences_digest("import logging.handlers, email.mime.text, unittest.mock; ")
