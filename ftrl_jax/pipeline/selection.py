"""Checkpoint selection on a validation split: which of RL's policies the main job evaluates and exports.

A run's held-out score moves by several points between checkpoints a few dozen steps apart, so the last step
is a noisy choice. `ValidationSelection` scores the policy at step 0 and every `every` RL steps (and the last)
by greedy Solve-F1 on validation environments: training-side questions (`envs/splits.py`) that RL never draws,
so choosing never looks at the held-out set. The best step's parameters (the earliest among ties, step 0
included: RL that only hurts on validation exports the start) are kept on disk, so a killed run resumes with
its points and its best policy:

  WORKDIR/validation.json     {"every", "num_envs", "fingerprint", "points": [{"step", "solve_f1", ...}],
                              "best_step", "best_dir" (relative to WORKDIR)}, written atomically after the best
                              parameters are on disk
  WORKDIR/validation_best/step_<N>/   the best step's parameters (a Hugging Face directory)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

VALIDATION_FILE = "validation.json"
BEST_DIR = "validation_best"
SELECT_CHOICES = ("last", "validation")


class ValidationSelection:
    """Scores policies on the validation split and keeps the best one's parameters.

    Args:
      workdir: the run's directory; `validation.json` and `validation_best/` live there.
      score_fn: (step, params) -> {"solve_f1": float in [0, 1], ...}: greedy figures on the validation
        environments (the headline average over scenario types); other float or int entries are kept with the
        point (for example its wall time, "seconds").
      save_fn: (params, directory) -> None, writes a policy; load_fn: directory -> params, reads it back.
      every: score after every `every` RL steps (> 0); last_step: RL's final step, always scored.
      num_envs: the number of validation environments (recorded with the points).
      fingerprint: identifies the validation environments (for example a hash of their keys); a resumed run
        must score the same ones.
      keep_best: write the best step's parameters (False: only record which step was best, e.g. when the last
        step's policy is exported anyway and a copy of a large model is not worth the disk).

    Raises:
      ValueError: on `every` < 1; when `validation.json` belongs to another setting (`every`, `num_envs`,
        `fingerprint`), since a resumed run must keep them; when its best parameters are missing from disk.
    """

    def __init__(self, workdir: str, score_fn: Callable[[int, Any], Mapping[str, Any]],
                 save_fn: Callable[[Any, str], None], load_fn: Callable[[str], Any], *, every: int, last_step: int,
                 num_envs: int, fingerprint: str = "", keep_best: bool = True):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.workdir = workdir
        self.path = os.path.join(workdir, VALIDATION_FILE)
        self._score, self._save, self._load = score_fn, save_fn, load_fn
        self.every, self.last_step, self.num_envs = int(every), int(last_step), int(num_envs)
        self.fingerprint, self.keep_best = str(fingerprint), bool(keep_best)
        self.points: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_dir: str | None = None
        if os.path.isfile(self.path):
            self._resume()

    def _resume(self) -> None:
        with open(self.path) as f:
            saved = json.load(f)
        mine = (self.every, self.num_envs, self.fingerprint)
        theirs = (saved.get("every"), saved.get("num_envs"), saved.get("fingerprint", ""))
        if theirs != mine:
            raise ValueError(f"{self.path} was written with every={theirs[0]}, num_envs={theirs[1]} and validation "
                             f"fingerprint {theirs[2] or '(none)'}; this run has every={mine[0]}, num_envs={mine[1]} "
                             f"and fingerprint {mine[2] or '(none)'} (a hash of the validation environments and "
                             "settings): resume with the run's own eval.validation_* settings and validation "
                             "environments")
        self.points = list(saved["points"])
        self.best_step = saved.get("best_step")
        if self.keep_best and self.best_step is not None and not saved.get("best_dir"):
            raise ValueError(f"{self.path} comes from a run that kept no best parameters (eval.select=last): resume "
                             f"it with eval.select=last, or delete {self.path} to score its steps again from where "
                             "it resumes")
        if saved.get("best_dir"):
            self.best_dir = os.path.join(self.workdir, saved["best_dir"])
            if self.keep_best and not os.path.isdir(self.best_dir):
                raise ValueError(f"{self.path} names {self.best_dir} as the best step's policy, but it is missing; "
                                 f"delete {self.path} to score the run's steps again from where it resumes")

    def due(self, step: int) -> bool:
        """True when `step` (RL steps done; 0 = the start) is scored and has not been yet."""
        wanted = step == 0 or step % self.every == 0 or step == self.last_step
        return wanted and all(p["step"] != step for p in self.points)

    def on_step(self, step: int, params) -> dict[str, Any] | None:
        """Scores `params` at `step` when due and returns the new point (None when not due). A new best (a
        strictly higher Solve-F1) is written to disk before `validation.json` records it."""
        if not self.due(step):
            return None
        figures = self._score(int(step), params)
        point = {"step": int(step), **{k: v for k, v in figures.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        best = self.best_point()
        if best is None or point["solve_f1"] > best["solve_f1"]:
            directory = None
            if self.keep_best:
                directory = os.path.join(self.workdir, BEST_DIR, f"step_{step}")
                if os.path.isdir(directory):  # written by a run killed before it recorded the point
                    shutil.rmtree(directory)
                self._save(params, directory)
            self.best_step, self.best_dir = int(step), directory
        self.points.append(point)
        self._write()
        return point

    def best_point(self) -> dict[str, Any] | None:
        return next((p for p in self.points if p["step"] == self.best_step), None)

    def best_params(self):
        """The best step's parameters, read back from disk. Raises RuntimeError before any point, or when the
        selection does not keep them (`keep_best=False`)."""
        if not self.keep_best:
            raise RuntimeError("this selection records the best step but keeps no parameters (keep_best=False)")
        if self.best_dir is None:
            raise RuntimeError("no validation point yet: call on_step(0, params) before RL")
        return self._load(self.best_dir)

    def summary(self) -> dict[str, Any]:
        """What summary.json records: the points in step order and the best step."""
        best = self.best_point()
        return {"every": self.every, "num_envs": self.num_envs,
                "points": sorted(self.points, key=lambda p: p["step"]), "best_step": self.best_step,
                "best_solve_f1": None if best is None else best["solve_f1"]}

    def _write(self) -> None:
        state = {"every": self.every, "num_envs": self.num_envs, "fingerprint": self.fingerprint,
                 "points": self.points,
                 "best_step": self.best_step,
                 "best_dir": None if self.best_dir is None else os.path.relpath(self.best_dir, self.workdir)}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, self.path)
        # Only the recorded best directory is kept (an older best, or one a killed run wrote and never recorded).
        root = os.path.join(self.workdir, BEST_DIR)
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if os.path.join(root, name) != self.best_dir:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
