"""Checkpoint selection on validation points: the best step, ties, the start, resume and its checks."""

import json
import os

import numpy as np
import pytest

from ftrl_jax.pipeline.selection import BEST_DIR, VALIDATION_FILE, ValidationSelection


def _selection(workdir, scores, *, every=2, last_step=5, num_envs=8, scored=None, **kwargs):
    """A selection whose params are a float array, scored by `scores[step]`, saved as .npy."""
    scored = [] if scored is None else scored

    def score(step, params):
        scored.append(step)
        return {"solve_f1": scores[step], "seconds": 0.5, "note": "not a number"}

    def save(params, directory):
        os.makedirs(directory)
        np.save(os.path.join(directory, "params.npy"), params)

    def load(directory):
        return np.load(os.path.join(directory, "params.npy"))

    return ValidationSelection(str(workdir), score, save, load, every=every, last_step=last_step, num_envs=num_envs,
                               **kwargs)


def test_scores_the_start_every_n_steps_and_the_last_and_keeps_the_best(tmp_path):
    scores = {0: 0.10, 1: 0.9, 2: 0.30, 3: 0.9, 4: 0.20, 5: 0.25}
    scored = []
    sel = _selection(tmp_path, scores, scored=scored)
    points = [sel.on_step(step, np.full(3, float(step))) for step in range(6)]
    assert scored == [0, 2, 4, 5]  # steps 1 and 3 are not due
    assert points[1] is None and points[2] == {"step": 2, "solve_f1": 0.30, "seconds": 0.5}
    assert sel.best_step == 2 and sel.best_point()["solve_f1"] == 0.30
    np.testing.assert_array_equal(sel.best_params(), np.full(3, 2.0))
    summary = sel.summary()
    assert [p["step"] for p in summary["points"]] == [0, 2, 4, 5] and summary["best_solve_f1"] == 0.30
    assert summary["points"][0] == {"step": 0, "solve_f1": 0.10, "seconds": 0.5}  # non-numbers are dropped
    # Only the best directory stays on disk.
    assert os.listdir(tmp_path / BEST_DIR) == ["step_2"]
    assert json.loads((tmp_path / VALIDATION_FILE).read_text())["best_dir"] == os.path.join(BEST_DIR, "step_2")


def test_ties_keep_the_earliest_step_and_the_start_can_win(tmp_path):
    sel = _selection(tmp_path, {0: 0.4, 2: 0.4, 4: 0.1, 5: 0.4})
    for step in range(6):
        sel.on_step(step, np.full(2, float(step)))
    assert sel.best_step == 0
    np.testing.assert_array_equal(sel.best_params(), np.zeros(2))


def test_a_resumed_selection_keeps_its_points_and_best_and_skips_what_it_scored(tmp_path):
    scores = {0: 0.1, 2: 0.5, 4: 0.2, 5: 0.6}
    first = _selection(tmp_path / "run", scores)
    for step in range(3):
        first.on_step(step, np.full(2, float(step)))
    scored = []
    again = _selection(tmp_path / "run", scores, scored=scored)
    assert again.best_step == 2 and not again.due(2) and again.due(4)
    for step in range(2, 6):
        again.on_step(step, np.full(2, float(step)))
    assert scored == [4, 5] and again.best_step == 5
    np.testing.assert_array_equal(again.best_params(), np.full(2, 5.0))
    # A moved workdir still finds its best policy (the path is stored relative to it).
    os.rename(tmp_path / "run", tmp_path / "moved")
    np.testing.assert_array_equal(_selection(tmp_path / "moved", scores).best_params(), np.full(2, 5.0))


def test_without_keep_best_only_the_step_is_recorded(tmp_path):
    sel = _selection(tmp_path, {0: 0.1, 2: 0.3, 4: 0.2, 5: 0.1}, keep_best=False)
    for step in range(6):
        sel.on_step(step, np.full(1, float(step)))
    assert sel.best_step == 2 and not (tmp_path / BEST_DIR).exists()
    with pytest.raises(RuntimeError, match="keep_best=False"):
        sel.best_params()
    assert _selection(tmp_path, {}, keep_best=False).best_step == 2
    with pytest.raises(ValueError, match="kept no best parameters .*resume it with eval.select=last"):
        _selection(tmp_path, {})  # resumed with keep_best: the best step's parameters were never written


def test_a_step_scored_by_a_killed_run_is_scored_again(tmp_path):
    def boom(params, directory):
        os.makedirs(directory)
        raise KeyboardInterrupt  # killed while writing the best parameters

    sel = _selection(tmp_path, {0: 0.1, 2: 0.3})
    sel.on_step(0, np.zeros(1))
    sel._save = boom
    with pytest.raises(KeyboardInterrupt):
        sel.on_step(2, np.ones(1))
    again = _selection(tmp_path, {0: 0.1, 2: 0.3})
    assert again.due(2) and again.best_step == 0
    again.on_step(2, np.ones(1))
    np.testing.assert_array_equal(again.best_params(), np.ones(1))
    assert os.listdir(tmp_path / BEST_DIR) == ["step_2"]


def test_resuming_with_other_settings_and_bad_arguments_are_refused(tmp_path):
    sel = _selection(tmp_path, {0: 0.1}, fingerprint="abc")
    sel.on_step(0, np.zeros(1))
    with pytest.raises(ValueError, match="every=2, num_envs=8 and validation fingerprint abc.*every=3"):
        _selection(tmp_path, {0: 0.1}, every=3, fingerprint="abc")
    with pytest.raises(ValueError, match="fingerprint abc; this run has .* fingerprint xyz"):
        _selection(tmp_path, {0: 0.1}, fingerprint="xyz")
    (tmp_path / BEST_DIR / "step_0" / "params.npy").unlink()
    (tmp_path / BEST_DIR / "step_0").rmdir()
    with pytest.raises(ValueError, match="step_0 as the best step's policy, but it is missing"):
        _selection(tmp_path, {0: 0.1}, fingerprint="abc")
    with pytest.raises(ValueError, match="every must be at least 1"):
        _selection(tmp_path / "other", {}, every=0)
    with pytest.raises(RuntimeError, match="no validation point yet"):
        _selection(tmp_path / "empty", {}).best_params()
