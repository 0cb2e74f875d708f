"""Training checkpoints with orbax: the `TrainState` plus JSON metadata, saved atomically, restored sharded.

Layout: `<directory>/<step>/{state, extra}`, one step directory per checkpoint, at most
`max_to_keep` kept. Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp-<n>/`, writes
`commit_success.txt` into it last, and only then renames it to `<step>/`. So:

- a run killed mid-write leaves a temporary directory, which is never taken for a checkpoint
  (and is deleted, with a warning, when the next `Checkpointer` opens the directory);
- a step directory without the commit marker (a partial copy, a write on a file system without
  atomic rename that was cut off) is not complete either: `all_steps`/`latest_step` skip it, and
  opening a `Checkpointer` renames it to `<step>.incomplete-<time>` with a warning, because
  orbax would otherwise count it as the latest step and refuse every later save.

The state is saved whole: with low-precision params that includes the float32 master weights and
float32 optimizer moments (`train_state.TrainState.master_params`), so a resume continues from the
exact master copy, not from its bfloat16 rounding.

`extra` is JSON metadata saved in the same atomic step (data position, PRNG key via
`prng_key_to_json`, config): a checkpoint's state and metadata always belong together.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

COMMIT_MARKER = "commit_success.txt"  # written by orbax as the last file of a checkpoint
TEMPORARY_SUFFIX = ".orbax-checkpoint-tmp"
STEP_NAME = re.compile(r"^\d+$")
STATE_ITEM, EXTRA_ITEM = "state", "extra"


def prng_key_to_json(key: jax.Array) -> list[int]:
    """A PRNG key (raw uint32 or typed) as a list of ints for `extra`."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(x) for x in np.asarray(key).reshape(-1)]


def prng_key_from_json(data: list[int]) -> jax.Array:
    """The raw uint32 key `prng_key_to_json` wrote (as `jax.random.PRNGKey` makes them)."""
    return jax.numpy.asarray(np.asarray(data, dtype=np.uint32))


def _check_json(extra: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise TypeError(f"checkpoint extra must be a dict of JSON values; got {type(extra).__name__}")
    for key, value in extra.items():
        try:
            json.dumps({key: value}, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint extra[{key!r}] = {value!r:.80} is not JSON ({e}); convert it first, e.g. "
                "arrays with .tolist() and PRNG keys with prng_key_to_json"
            ) from None
    return extra


def complete_steps(directory: str) -> list[int]:
    """Steps under `directory` whose checkpoint finished writing (step directory with the commit marker)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name) for name in os.listdir(directory)
        if STEP_NAME.match(name) and os.path.isfile(os.path.join(directory, name, COMMIT_MARKER))
    )


def incomplete_entries(directory: str) -> tuple[list[str], list[str]]:
    """(orbax temporary directories, step directories without the commit marker) under `directory`."""
    if not os.path.isdir(directory):
        return [], []
    names = sorted(os.listdir(directory))
    temporary = [n for n in names if TEMPORARY_SUFFIX in n]
    unfinished = [
        n for n in names if STEP_NAME.match(n) and not os.path.isfile(os.path.join(directory, n, COMMIT_MARKER))
    ]
    return temporary, unfinished


def _set_aside_incomplete(directory: str) -> None:
    temporary, unfinished = incomplete_entries(directory)
    if temporary:
        logging.warning("checkpoint directory %s: removing unfinished temporary checkpoint(s) %s (a run stopped "
                        "while writing them)", directory, temporary)
    for name in temporary:
        shutil.rmtree(os.path.join(directory, name))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in unfinished:
        target = os.path.join(directory, f"{name}.incomplete-{stamp}")
        logging.warning("checkpoint directory %s: step %s has no %s, so it is not a complete checkpoint; "
                        "moved to %s", directory, name, COMMIT_MARKER, target)
        os.rename(os.path.join(directory, name), target)


def _abstract_like(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Checkpointer:
    """Saves and restores (state, extra) by step under `directory`; keeps the newest `max_to_keep`.

    Saves are asynchronous: `save` returns once the arrays are copied off the devices (so the
    state may be donated to the next step right away) and the files are written in the background;
    `wait` blocks until they are on disk. Call `close` (or use it as a context manager) at the end.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, *, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep every checkpoint)")
        self.directory = os.path.abspath(os.fspath(directory))
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            _set_aside_incomplete(self.directory)
        ocp.multihost.sync_global_processes("ftrl_jax_checkpointer_open")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> bool:
        """Starts saving `state` and `extra` as checkpoint `step`; False (with a warning) if it was not saved.

        A step that is not after the newest checkpoint is not saved (orbax keeps steps increasing).
        """
        extra = _check_json(dict(extra or {}))
        step = int(step)
        known = self._manager.all_steps()
        if known and step <= max(known):
            logging.warning("checkpoint step %d not saved in %s: it is not after the newest step %d; remove the "
                            "newer step directories to go back", step, self.directory, max(known))
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)}
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending (a save still being written is not one)."""
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, target_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, extra) of checkpoint `step` (default: the newest), laid out like `target_state`.

        `target_state` gives the tree structure, shapes, dtypes and shardings: a real state (for
        example a freshly initialised and sharded one) or its `jax.ShapeDtypeStruct`s with shardings.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}; nothing to restore")
            step = steps[-1]
        elif int(step) not in steps:
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory}; "
                                    f"complete steps: {steps}")
        abstract = jax.tree.map(_abstract_like, target_state)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract), EXTRA_ITEM: ocp.args.JsonRestore()}
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored[STATE_ITEM], dict(restored[EXTRA_ITEM] or {})

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
