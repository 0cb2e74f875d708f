"""Run metrics: one JSON line per record in `WORKDIR/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def _scalar(value: Any) -> float | None:
    try:
        value = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return value


class MetricsLogger:
    """Appends `{"phase", "step", "time", **metrics}` lines and mirrors scalars to TensorBoard (`WORKDIR/tb`)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only runs that log need it

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

    def log(self, phase: str, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"phase": phase, "step": int(step), "time": time.time(),
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{phase}/{name}", value, int(step))
        return scalars

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
