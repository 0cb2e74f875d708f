"""The main job: environments -> tokenizer and model -> [warm start] -> eval -> RL -> eval -> export.

`train_and_evaluate(config)` runs it. The model is `model.path` (a checkpoint directory, or a shipped policy's name:
the default's is `tiny-pool8`, the `tiny-instruct` preset's `tiny-instruct`, `ftrl_jax/policies/`) with its
tokenizer; with `warmup.num_steps > 0` the tiny presets instead train a random `model.preset` with the embedded
tokenizer from scratch, warm-started on oracle trajectories (`model_path`). Training
environments hold only training-side questions and held-out ones only held-out questions of the fixed partition
(`envs/splits.py`), so a policy made by `experiments.pretrain` (same partition) never saw a held-out question.
Every stage leaves its result in the workdir so a killed run resumes where it stopped (`config.resume=True`):

  WORKDIR/envs/{train,eval}.jsonl   built environments (sample format, with oracle calls)
  WORKDIR/envs/validation.jsonl     validation environments (with eval.validation_envs > 0)
  WORKDIR/tokenizer/                the tokenizer (the starting checkpoint's, or the embedded one from scratch)
  WORKDIR/checkpoints/warmup/       orbax checkpoints of the supervised warm start (when there is one)
  WORKDIR/warmstart/                the policy RL starts from (HF format): RL's reference and the analysis base
  WORKDIR/eval_before.json          held-out evaluation before RL
  WORKDIR/checkpoints/rl/           orbax checkpoints of RL (params, optimizer, step, prompt pool)
  WORKDIR/validation.json, validation_best/   validation points and the best one's policy (pipeline/selection.py)
  WORKDIR/export/                   the final policy in HF format with its tokenizer (with eval.select=validation,
                                    the best validation step's)
  WORKDIR/metrics.jsonl, tb/        metrics; WORKDIR/summary.json: eval_before / eval_after, paired_delta
  WORKDIR/report.md                 before/after tables with intervals, linking learning_curves.png and
                                    scenario_bars.png

All randomness is derived from (config.seed, phase, step), so resuming gives the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ftrl_jax import models, parallel, policies
from ftrl_jax.envs import rewards, splits
from ftrl_jax.text.chat import TEMPLATES, render_conversation
from ftrl_jax.training.checkpointing import Checkpointer
from ftrl_jax.envs import build as env_build
from ftrl_jax.envs.samples import (Sample, decode_sample, encode_sample, environment_key, read_samples, user_prompt,
                                   write_samples)
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.rollout.evaluation import SCENARIO_TYPES, evaluate, evaluate_sampled, summarize
from ftrl_jax.reporting import plots, report as run_report, stats
from ftrl_jax.pipeline.selection import SELECT_CHOICES, ValidationSelection
from ftrl_jax.training.metrics import MetricsLogger
from ftrl_jax.training.optim import (SCHEDULES, TRAINABLE_ALL, TRAINABLE_PRESETS, make_optimizer, make_schedule,
                                    num_trainable)
from ftrl_jax.rl import batch as rl_batch
from ftrl_jax.rl.advantages import (RFT_ESTIMATOR, compute_advantages, estimator_needs_groups, group_signal,
                                    registered_advantage_estimators)
from ftrl_jax.rl.dynamic_sampling import GroupCollector, informative_groups
from ftrl_jax.rl.losses import LossConfig, registered_aggregations
from ftrl_jax.rl import shared_prompt
from ftrl_jax.rl.update import make_logprob_fn, make_rl_step, make_shared_prompt_logprob_fn, response_mask
from ftrl_jax.rollout.episodes import play_episodes, rl_prompts_from_conversation, rl_prompts_from_episode
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.training.sft import make_sft_step
from ftrl_jax.text.tokenizer import PRETOKENIZE_PATTERNS, build_default_tokenizer, load_tokenizer
from ftrl_jax.training.train_state import create_train_state, shard_state
from ftrl_jax.training import warmstart

log = logging.getLogger(__name__)
EVAL_KEYS = ("solve_precision", "solve_rate", "solve_f1")
# The sampled held-out evaluation's seed (plus config.seed): the same before and after RL, apart from RL's
# rollout seeds (config.seed * 1_000_003 + step).
SAMPLED_EVAL_SEED = 7_777_777
LEARNING_CURVES, SCENARIO_BARS, REPORT = "learning_curves.png", "scenario_bars.png", "report.md"


class TrainingError(RuntimeError):
    """A run that cannot go on (bad config, NaN loss, ...); the message says what to do."""


# ------------------------------------------------------------------------------------------- config

def check_config(config) -> None:
    """Fails fast, before anything heavy, on settings that cannot work."""
    if config.preset != "tiny" and not config.model.path:
        raise TrainingError(f"preset {config.preset!r} trains a real checkpoint: pass --config.model.path=DIR "
                            "(a local Hugging Face directory with config.json and *.safetensors)")
    path = model_path(config)
    if config.preset == "tiny" and not path and config.warmup.num_steps <= 0:
        raise TrainingError("config.model.path is empty and config.warmup.num_steps=0: RL would start from a random "
                            "model; leave model.path at the preset's shipped policy "
                            f"({policies.TINY_DEFAULT!r} on the default), pass a checkpoint directory, or train from "
                            "scratch with --config.warmup.num_steps=N")
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainingError(f"--config.model.path={config.model.path!r} has no config.json (a Hugging Face "
                            f"checkpoint directory, or a shipped policy: {', '.join(sorted(policies.SHIPPED))})")
    if config.model.template not in TEMPLATES:
        raise TrainingError(f"config.model.template={config.model.template!r}; use one of {sorted(TEMPLATES)}")
    if config.tokenizer.pretokenizer not in PRETOKENIZE_PATTERNS:
        raise TrainingError(f"config.tokenizer.pretokenizer={config.tokenizer.pretokenizer!r}; use one of "
                            f"{sorted(PRETOKENIZE_PATTERNS)}")
    if config.rl.algorithm not in registered_advantage_estimators():
        raise TrainingError(f"config.rl.algorithm={config.rl.algorithm!r}; registered: "
                            f"{', '.join(registered_advantage_estimators())}")
    if config.rl.num_rollouts < 1 or config.rl.prompts_per_step < 1:
        raise TrainingError(f"config.rl.num_rollouts={config.rl.num_rollouts} and config.rl.prompts_per_step="
                            f"{config.rl.prompts_per_step} must both be at least 1")
    if config.rl.num_rollouts == 1 and estimator_needs_groups(config.rl.algorithm):
        groupless = [n for n in registered_advantage_estimators() if not estimator_needs_groups(n)]
        raise TrainingError(f"config.rl.algorithm={config.rl.algorithm!r} takes its baseline from the other rollouts "
                            "of a prompt, so with config.rl.num_rollouts=1 every advantage is 0 and RL learns "
                            "nothing: set --config.rl.num_rollouts=N with N >= 2 (FTRL: 8), or use an estimator "
                            f"without groups ({', '.join(groupless)})")
    if config.rl.algorithm == "reinforce_pp" and config.rl.num_rollouts * config.rl.prompts_per_step == 1:
        # Whitening one sequence's returns (all its reward, gamma 1) over the batch leaves 0 everywhere.
        raise TrainingError("config.rl.algorithm='reinforce_pp' whitens returns over the step's batch, so a batch of "
                            "one sequence (config.rl.prompts_per_step=1, config.rl.num_rollouts=1) gets advantage 0 "
                            "up to float rounding and RL learns nothing: raise either to 2 or more")
    if config.rl.reward_kind not in rewards.REWARD_KINDS:
        raise TrainingError(f"config.rl.reward_kind={config.rl.reward_kind!r}; use one of {sorted(rewards.REWARD_KINDS)}")
    if config.rl.reward_semantics not in rewards.REWARD_SEMANTICS:
        raise TrainingError(f"config.rl.reward_semantics={config.rl.reward_semantics!r}; use one of "
                            f"{sorted(rewards.REWARD_SEMANTICS)}")
    if config.rl.mode not in ("step", "trajectory"):
        raise TrainingError(f"config.rl.mode={config.rl.mode!r}; use 'step' (FTRL) or 'trajectory'")
    if config.rl.mode == "trajectory" and config.model.template != "qwen2.5":
        raise TrainingError("config.rl.mode='trajectory' needs config.model.template='qwen2.5' (the Qwen3 template "
                            "rewrites earlier turns, so a trajectory is not one token sequence)")
    if config.rl.prompt_source not in PROMPT_SOURCES:
        raise TrainingError(f"config.rl.prompt_source={config.rl.prompt_source!r}; use one of {list(PROMPT_SOURCES)}")
    if config.rl.prompt_filter not in PROMPT_FILTERS:
        raise TrainingError(f"config.rl.prompt_filter={config.rl.prompt_filter!r}; use one of {list(PROMPT_FILTERS)}")
    if config.rl.prompt_filter != "none" and (config.rl.mode != "step" or not config.rl.dynamic_sampling):
        raise TrainingError(f"config.rl.prompt_filter={config.rl.prompt_filter!r} rejects step-mode prompt groups "
                            "and lets dynamic sampling draw more: use it with --config.rl.mode=step "
                            "--config.rl.dynamic_sampling=True")
    if config.rl.prompt_source != "policy" and config.rl.mode != "step":
        raise TrainingError(f"config.rl.prompt_source={config.rl.prompt_source!r} chooses step mode's prompts; "
                            "config.rl.mode='trajectory' plays whole episodes: use --config.rl.prompt_source=policy")
    if config.rl.aggregation not in registered_aggregations():
        raise TrainingError(f"config.rl.aggregation={config.rl.aggregation!r}; use one of "
                            f"{', '.join(registered_aggregations())}")
    if config.rl.lr_schedule not in SCHEDULES:
        raise TrainingError(f"config.rl.lr_schedule={config.rl.lr_schedule!r}; use one of {list(SCHEDULES)}")
    if not 0 <= config.rl.lr_warmup_steps < _rl_updates(config):
        raise TrainingError(f"config.rl.lr_warmup_steps={config.rl.lr_warmup_steps} must be at least 0 and fewer "
                            f"than RL's {_rl_updates(config)} optimizer updates (rl.num_steps x rl.num_minibatches)")
    if config.rl.max_sampling_rounds < 1:
        raise TrainingError(f"config.rl.max_sampling_rounds={config.rl.max_sampling_rounds}; dynamic sampling needs "
                            "at least 1 round")
    if config.rl.trainable != TRAINABLE_ALL and config.rl.trainable not in TRAINABLE_PRESETS:
        try:
            re.compile(config.rl.trainable)
        except re.error as err:
            raise TrainingError(f"config.rl.trainable={config.rl.trainable!r} is neither {TRAINABLE_ALL}, a preset "
                                f"({', '.join(TRAINABLE_PRESETS)}) nor a regular expression ({err})") from None
    try:
        _loss_config(config)  # clip, KL estimator, aggregation: refused now, not after the warm start
    except ValueError as err:
        raise TrainingError(f"config.rl: {err}") from None
    ec = config.eval
    for key in ("num_samples", "sampled_envs", "num_train_envs", "curve_every", "curve_envs", "validation_envs",
                "validation_every"):
        if ec[key] < 0:
            raise TrainingError(f"config.eval.{key}={ec[key]}; use 0 (off, or all for sampled_envs) or a positive "
                                "number")
    if ec.select not in SELECT_CHOICES:
        raise TrainingError(f"config.eval.select={ec.select!r}; use one of {list(SELECT_CHOICES)}")
    if ec.select == "validation" and (ec.validation_envs <= 0 or ec.validation_every <= 0):
        unset = " and ".join(f"eval.{k}={ec[k]}" for k in ("validation_envs", "validation_every") if ec[k] <= 0)
        raise TrainingError("config.eval.select='validation' picks the policy by its score on validation "
                            f"environments, but {unset}: set it above 0 (for example "
                            "--config.eval.validation_envs=128 --config.eval.validation_every=10)")
    if ec.validation_envs > 0 and ec.validation_every <= 0:
        raise TrainingError(f"config.eval.validation_envs={ec.validation_envs} validation environments would never "
                            "be scored with eval.validation_every=0: set eval.validation_every above 0, or "
                            "eval.validation_envs=0")
    if config.envs.validation_file and ec.validation_envs <= 0:
        raise TrainingError(f"config.envs.validation_file={config.envs.validation_file!r} is read only with "
                            "eval.validation_envs > 0 (how many of its environments to score): set "
                            "--config.eval.validation_envs=N, or leave envs.validation_file empty")
    if config.envs.validation_file and not os.path.exists(config.envs.validation_file):
        raise TrainingError(f"environment file {config.envs.validation_file!r} does not exist; pass a sample-format "
                            ".jsonl file, .parquet file or datasets save_to_disk directory, or leave "
                            "config.envs.validation_file empty to build validation environments")
    if ec.num_samples > 0 and config.rollout.temperature <= 0:
        raise TrainingError("config.eval.num_samples > 0 samples at config.rollout.temperature, which is "
                            f"{config.rollout.temperature}; set a temperature above 0 or eval.num_samples=0")
    if ec.bootstrap_resamples < 1 or not 0.0 < ec.confidence < 1.0:
        raise TrainingError(f"config.eval.bootstrap_resamples={ec.bootstrap_resamples} must be >= 1 and "
                            f"config.eval.confidence={ec.confidence} in (0, 1)")
    mesh_size = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
    if mesh_size != jax.device_count():
        raise TrainingError(
            f"mesh data={config.mesh.data} x fsdp={config.mesh.fsdp} x tensor={config.mesh.tensor} = {mesh_size} "
            f"devices, but {jax.device_count()} {jax.devices()[0].platform} devices are available; set "
            f"--config.mesh.data/fsdp/tensor so the product is {jax.device_count()}")
    rows_per_shard = config.mesh.data * config.mesh.fsdp
    if _shared_prompt(config):  # the batch's leading axis is one group (prompt) per row
        rl_what, rl_rows = ("rl.prompts_per_step (rl.shared_prompt groups; --config.rl.shared_prompt=False splits "
                            "rl.prompts_per_step x rl.num_rollouts rows instead)", config.rl.prompts_per_step)
    else:
        rl_what, rl_rows = "rl.prompts_per_step x rl.num_rollouts", config.rl.prompts_per_step * config.rl.num_rollouts
    for what, rows, split in ((rl_what, rl_rows,
                               config.rl.num_minibatches * config.rl.num_microbatches * rows_per_shard),
                              ("warmup.batch_size", config.warmup.batch_size, rows_per_shard)):
        if rows % split:
            raise TrainingError(f"{what} = {rows} must be a multiple of {split} (mini-batches x micro-batches x "
                                "mesh data x fsdp)")


def _shared_prompt(config) -> bool:
    return bool(config.rl.get("shared_prompt", True))


# ------------------------------------------------------------------------------------------- stages

def _kinds(config) -> list[str]:
    return [k.strip() for k in config.envs.scenarios.split(",") if k.strip()]


def prepare_environments(config, workdir: str, sandbox: Sandbox) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out environments (held-out questions never appear in training)."""
    env_dir = os.path.join(workdir, "envs")
    train_file, eval_file = os.path.join(env_dir, "train.jsonl"), os.path.join(env_dir, "eval.jsonl")
    if config.envs.train_file:
        train_file = config.envs.train_file
    if config.envs.eval_file:
        eval_file = config.envs.eval_file
    for given, path in ((config.envs.train_file, train_file), (config.envs.eval_file, eval_file)):
        if given and not os.path.exists(path):
            raise TrainingError(f"environment file {path!r} does not exist; pass a sample-format .jsonl file, "
                                ".parquet file or datasets save_to_disk directory, or leave the setting empty "
                                "to build environments")
    # exists, not isfile: a save_to_disk directory is an environment file too.
    if not (os.path.exists(train_file) and os.path.exists(eval_file)):
        # Build what is missing; a file the config names is read, never overwritten.
        os.makedirs(env_dir, exist_ok=True)
        started = time.perf_counter()
        built = {}
        for split, num, offset in (("train", config.envs.num_train, 1), ("eval", config.envs.num_eval, 2)):
            path = train_file if split == "train" else eval_file
            if os.path.exists(path):
                built[split] = _read_split(path)
                continue
            seed = config.seed * 1000 + offset
            built[split] = build_split(split, num, seed, kinds=_kinds(config), complexity=config.envs.complexity,
                                       world=config.envs.world or None, sandbox=sandbox,
                                       exclude=[s.messages[0]["content"] for s in built.get("train", [])])
            write_samples(path, built[split])
        log.info("environments ready in %.1fs", time.perf_counter() - started)
    return _read_split(train_file), _read_split(eval_file)


def _held_out_side(sample: Sample) -> bool:
    """True for a procedurally built environment (data source `self/...`) whose question is on the held-out side
    of `envs.splits`; the partition says nothing about other sources' questions."""
    if not sample.data_source.startswith(PROCEDURAL_SOURCE_PREFIX):
        return False
    return splits.is_held_out(sample.messages[0]["content"].rsplit("Question: ", 1)[-1])


PROCEDURAL_SOURCE_PREFIX = "self/"  # data_source of procedurally built environments (envs.stages.SCENARIO_KINDS)


def policy_training_prompts(config, sandbox: Sandbox | None = None) -> set[str]:
    """The prompts a starting policy made by `experiments.pretrain` was trained on, rebuilt from its
    `recipe.json`, and for a policy continued from another (`--config.init`) from the `init_recipe` it keeps,
    and so on; empty when the job trains from scratch or the policy has no recipe. Raises TrainingError when a
    recipe lacks the fields that say how its environments were built."""
    path = model_path(config)
    recipe = read_recipe(path) if path else None
    prompts: set[str] = set()
    while recipe:
        try:
            envs, world = recipe["config"]["envs"], recipe["world"]
            samples = build_split("train", int(envs["num"]), int(envs["seed"]),
                                  kinds=[k for k in envs["scenarios"].split(",") if k], complexity=envs["complexity"],
                                  world=world or None, sandbox=sandbox)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TrainingError(f"the recipe.json of {path} (or one it continues) does not say how its environments "
                                f"were built ({err!r}); it cannot be used to keep validation questions unseen: pass "
                                "--config.envs.validation_file") from None
        prompts |= {s.messages[0]["content"] for s in samples}
        recipe = recipe.get("init_recipe")
    return prompts


def prepare_validation(config, workdir: str, train: Sequence[Sample], held_out: Sequence[Sample],
                       sandbox: Sandbox) -> list[Sample]:
    """The `eval.validation_envs` validation environments (none when 0), balanced over the scenario types.

    Built: training-side environments (build seed `1000 * seed + 3`, `build_split("validation")`) whose prompt
    is none of the training or held-out environments' nor one the starting policy was trained on
    (`policy_training_prompts`), saved as WORKDIR/envs/validation.jsonl. Given (`envs.validation_file`):
    its environments, where any with a prompt of the training or held-out environments, or a procedural one
    (`self/...`) with a held-out-side question, is reported and skipped; TrainingError when none is left."""
    num = config.eval.validation_envs
    if num <= 0:
        return []
    path = config.envs.validation_file or os.path.join(workdir, "envs", "validation.jsonl")
    prompts = {s.messages[0]["content"] for s in (*train, *held_out)}
    if not os.path.exists(path):
        started = time.perf_counter()
        seen = prompts | policy_training_prompts(config, sandbox)
        built = build_split("validation", num, config.seed * 1000 + 3, kinds=_kinds(config),
                            complexity=config.envs.complexity, world=config.envs.world or None, sandbox=sandbox,
                            exclude=sorted(seen))
        write_samples(path, built)
        log.info("validation environments ready in %.1fs (%d prompts excluded)", time.perf_counter() - started,
                 len(seen))
    samples = _read_split(path)
    usable = [s for s in samples if s.messages[0]["content"] not in prompts and not _held_out_side(s)]
    if len(usable) < len(samples):
        log.warning("skipping %d of the %d validation environments in %s: their question is held out, or a "
                    "training or held-out environment's; validation must be training-side and disjoint from both",
                    len(samples) - len(usable), len(samples), path)
    samples = _balanced(usable, num)
    if not samples:
        raise TrainingError(f"no validation environment in {path} is training-side and disjoint from the training "
                            "and held-out environments")
    if len(samples) < num:
        log.warning("%s holds %d usable validation environments, fewer than eval.validation_envs=%d", path,
                    len(samples), num)
    return samples


SPLITS = ("train", "eval", "validation")


def build_split(split: str, num: int, seed: int, *, kinds: Sequence[str], complexity: str, world: str | None,
                sandbox: Sandbox, exclude: Sequence[str] = ()) -> list[Sample]:
    """`num` procedural environments of one side of the question partition (`envs.splits`), as samples.

    split "train": questions on the training side, in build order. split "eval": held-out questions only.
    split "validation": training-side questions, for choosing among checkpoints without touching the held-out
    set. "eval" and "validation" drop any question whose prompt is in `exclude` (the training environments'
    prompts) and are balanced over the scenario types (`_balanced`); twice as many are built as asked, so the
    balance holds. All are deterministic in (seed, world, kinds, complexity).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    balanced = split != "train"
    side = splits.is_held_out if split == "eval" else splits.is_training
    seen = set(exclude) if balanced else set()
    keep = lambda env: side(env.question) and user_prompt(env.question) not in seen  # noqa: E731
    want = 2 * num + 8 if balanced else num
    envs, report = env_build.build_environments(want, seed=seed, kinds=kinds, complexity=complexity, sandbox=sandbox,
                                                world=world, keep=keep)
    samples = [e.to_sample(split) for e in envs]
    kept = _balanced(samples, num) if balanced else samples
    balance = f", {len(kept)} of them kept, balanced over scenario types" if balanced else ""
    log.info("%s environments: %d built from %d attempts%s (dropped while building: %s)", split, len(envs),
             report.attempted, balance, dict(report.dropped) or "none")
    return kept


RECIPE_FILE = "recipe.json"


def read_recipe(path: str) -> dict[str, Any] | None:
    """The `recipe.json` that `experiments.pretrain` leaves in a policy directory (world, data, steps, held-out
    scores), or None when `path` has none."""
    file = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _read_split(path: str) -> list[Sample]:
    """The samples of an environment file; bad rows are reported and skipped, an empty file is an error."""
    samples, errors = read_samples(path)
    for err in errors:
        log.warning("skipping %s", err)
    if not samples:
        raise TrainingError(f"no usable environments in {path}")
    return samples


def _balanced(samples: Sequence[Sample], num: int) -> list[Sample]:
    """The first `num` samples taking scenario types in turn, so each type is equally represented."""
    by_kind: dict[str, list[Sample]] = {}
    for s in samples:
        by_kind.setdefault(s.data_source, []).append(s)
    out: list[Sample] = []
    while len(out) < num and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(out) < num:
                out.append(by_kind[kind].pop(0))
    return out


def prepare_tokenizer(config, workdir: str, train: Sequence[Sample]):
    tok_dir = os.path.join(workdir, "tokenizer")
    path = model_path(config)
    if os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
        if path and tokenizer.get_vocab() != load_tokenizer(path).get_vocab():
            raise TrainingError(f"{tok_dir} is another model's tokenizer than {path}'s (a run resumed with another "
                                "model.path or warmup setting); use a new --config.workdir")
        return tokenizer
    if path:
        tokenizer = load_tokenizer(path)
    else:
        tokenizer = embedded_tokenizer(train, config.model.template, config.tokenizer.vocab_size,
                                       config.tokenizer.pretokenizer)
    tokenizer.save_pretrained(tok_dir)
    return tokenizer


def embedded_tokenizer(samples: Sequence[Sample], template: str, vocab_size: int, pretokenizer: str = "qwen2"):
    """The embedded BPE tokenizer learned on the samples' own text, rendered with the chat template so the
    template's fixed text becomes a few tokens too (plus oracle calls and sub-answers); `pretokenizer` as in
    `text.tokenizer.build_default_tokenizer`."""
    texts = [text for s in samples for text in _sample_texts(s, template)]
    return build_default_tokenizer(texts, vocab_size=vocab_size, pretokenizer=pretokenizer)


def _sample_texts(sample: Sample, template: str) -> list[str]:
    texts = [render_conversation(sample.messages, sample.tools, template=template)]
    for turn in sample.oracle_calls or []:
        texts.extend(json.dumps(call, ensure_ascii=False) for call in turn)
    texts.extend(a for answers in sample.unsolved_set.values() for a in answers)
    return texts


def model_path(config) -> str:
    """The checkpoint directory the job starts from, "" for a randomly initialised `model.preset`.

    `model.path` is a directory or a shipped policy's name (`ftrl_jax.policies`). On the tiny preset, a shipped
    policy's name (`tiny-pool8`, the default's, or `tiny-instruct`) with `warmup.num_steps > 0` means training from
    scratch: random initialisation, the embedded tokenizer, then the warm start (to warm-start a shipped policy
    itself, pass its directory, `ftrl_jax.policies.path(name)`).
    """
    path = config.model.path
    if config.preset == "tiny" and path in policies.SHIPPED and config.warmup.num_steps > 0:
        return ""
    return policies.resolve(path)


def prepare_model(config, tokenizer, mesh) -> tuple[models.ModelConfig, Any]:
    path = model_path(config)
    log.info("starting from %s", path if path else f"a random {config.model.preset!r} model (trained from scratch: "
             f"{config.warmup.num_steps} warm-start steps)")
    if path:
        recipe = read_recipe(path)
        if recipe and recipe.get("world") != (config.envs.world or ""):
            log.warning("%s was trained in the world %r, but config.envs.world=%r: its skills may not transfer",
                        path, recipe.get("world"), config.envs.world)
        model_config, params = models.load_pretrained(
            path, dtype=config.model.param_dtype, compute_dtype=config.model.dtype,
            shardings=parallel.checkpoint_sharding_fn(mesh))
        return model_config, params
    model_config, params = random_model(config.model.preset, config.model.get("overrides", ""), tokenizer,
                                        param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                                        seed=config.seed)
    return model_config, parallel.shard_params(params, mesh)


def random_model(preset: str, overrides: Any, tokenizer, *, param_dtype: str, dtype: str, seed: int
                 ) -> tuple[models.ModelConfig, Any]:
    """A randomly initialised `preset` sized to the embedded tokenizer (its vocabulary, `<|im_end|>` as EOS,
    `<|endoftext|>` as padding), with ModelConfig `overrides` ("num_layers=2,..."); a bad field name is a
    TrainingError."""
    special = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    fields = dict(vocab_size=len(tokenizer), param_dtype=param_dtype, dtype=dtype, eos_token_id=special[0],
                  pad_token_id=special[1])
    fields.update(parse_overrides(overrides))
    try:
        model_config = models.preset(preset, **fields)
    except TypeError as err:
        raise TrainingError(f"config.model.overrides: {err}; use ModelConfig field names") from None
    return model_config, models.init_params(model_config, jax.random.PRNGKey(seed))


def parse_overrides(spec: Any) -> dict[str, Any]:
    """'num_layers=2,hidden_size=128' (or a mapping) -> {'num_layers': 2, 'hidden_size': 128}."""
    if not spec:
        return {}
    if hasattr(spec, "items"):
        return dict(spec.items())
    out: dict[str, Any] = {}
    for item in str(spec).split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrainingError(f"config.model.overrides item {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _policy(config, model_config, params, tokenizer, mesh, *, greedy: bool, seed: int, max_new_tokens: int):
    rollout = config.rollout
    return LocalPolicy(model_config, params, tokenizer, template=config.model.template,
                       enable_thinking=config.model.enable_thinking, max_new_tokens=max_new_tokens,
                       max_prompt_tokens=rollout.max_prompt_tokens, temperature=0.0 if greedy else rollout.temperature,
                       top_p=rollout.top_p, top_k=rollout.top_k, data_sharding=parallel.batch_sharding(mesh)
                       if mesh.size > 1 else None, seed=seed)


def _greedy_figures(report) -> dict[str, Any]:
    # Headline figures as in the paper's table: the average over scenario types of per-type means.
    headline = report.scenario_average or {k: 0.0 for k in EVAL_KEYS}
    return {**{k: float(headline[k]) for k in EVAL_KEYS}, "by_scenario": report.per_source,
            "num_episodes": report.num_episodes, "end_reasons": report.end_reasons,
            "episodes_per_minute": report.episodes_per_minute, "seconds": report.seconds}


def run_evaluation(config, model_config, params, tokenizer, mesh, samples, sandbox,
                   train_samples: Sequence[Sample] = ()) -> dict[str, Any]:
    """One policy's evaluation: held-out greedy figures, and the sampled and training-subset ones when configured.

    Greedy Solve-P/R/F1 in [0, 1] averaged over scenario types (the paper's headline), `by_scenario`, and
    `episodes`: one row per held-out environment in `samples` order (data_source, env_key, end_reason,
    num_turns, Solve-P/R/F1) for paired before/after comparisons. `sampled` (when `eval.num_samples` = k > 0): k
    episodes per environment (the first `eval.sampled_envs` of `samples`, balanced over types as they are; 0:
    all) at the rollout temperature, all played as one batch with seed `SAMPLED_EVAL_SEED + config.seed` (the
    same before and after RL); its `solve_f1` is the mean over samples, `best_solve_f1` the
    best of k, `environments` the per-environment values. `train_subset` (when `train_samples` is given): the
    greedy figures on those environments. Every part carries its wall time in `seconds`.
    """
    ec = config.eval
    policy = _policy(config, model_config, params, tokenizer, mesh, greedy=True, seed=0,
                     max_new_tokens=ec.max_new_tokens)
    report = evaluate(policy, samples, max_turns=ec.max_turns, sandbox=sandbox)
    result = {**_greedy_figures(report),
              "episodes": [{k: row[k] for k in ("data_source", "env_key", "end_reason", "num_turns", *EVAL_KEYS)}
                           for row in report.episodes]}
    if ec.num_samples > 0:
        sampler = _policy(config, model_config, params, tokenizer, mesh, greedy=False,
                          seed=SAMPLED_EVAL_SEED + config.seed, max_new_tokens=ec.max_new_tokens)
        subset = samples[:ec.sampled_envs] if ec.sampled_envs > 0 else samples
        sampled = evaluate_sampled(sampler, subset, num_samples=ec.num_samples, max_turns=ec.max_turns,
                                   sandbox=sandbox)
        average = sampled.scenario_average
        result["sampled"] = {"num_samples": sampled.num_samples, "temperature": float(config.rollout.temperature),
                             "num_envs": len(subset),
                             **{k: float(average.get(k, 0.0)) for k in (*EVAL_KEYS, "best_solve_f1")},
                             "by_scenario": sampled.per_source, "num_episodes": sampled.num_episodes,
                             "end_reasons": sampled.end_reasons, "seconds": sampled.seconds,
                             "environments": sampled.environments}
    if train_samples:
        result["train_subset"] = _greedy_figures(evaluate(policy, train_samples, max_turns=ec.max_turns,
                                                          sandbox=sandbox))
    return result


def _logged_figures(result: dict[str, Any]) -> dict[str, float]:
    """The scalars of an evaluation that go to metrics.jsonl and TensorBoard."""
    scalars = {k: result[k] for k in EVAL_KEYS}
    if "sampled" in result:
        scalars.update(sampled_solve_f1=result["sampled"]["solve_f1"],
                       sampled_best_solve_f1=result["sampled"]["best_solve_f1"])
    if "train_subset" in result:
        scalars["train_solve_f1"] = result["train_subset"]["solve_f1"]
    return scalars


def _curve_point(logger, step: int, result: dict[str, Any], num_envs: int) -> None:
    """Logs the learning curve's point at `step` from a full held-out evaluation's first `num_envs` episodes.

    Greedy tokens do not depend on how conversations are batched, so these episodes score as a run on the
    curve subset alone would; the point costs nothing.
    """
    rows = result.get("episodes") or []
    if num_envs and len(rows) >= num_envs:
        _, average, _ = summarize(rows[:num_envs])
        logger.log(plots.CURVE_PHASE, step, {**{k: average.get(k, 0.0) for k in EVAL_KEYS}, "num_envs": num_envs})


def _greedy_headline(config, model_config, params, tokenizer, mesh, envs, sandbox) -> dict[str, float]:
    """Greedy Solve-P/R/F1 on `envs` averaged over scenario types, in [0, 1], with the wall time in `seconds`."""
    policy = _policy(config, model_config, params, tokenizer, mesh, greedy=True, seed=0,
                     max_new_tokens=config.eval.max_new_tokens)
    report = evaluate(policy, envs, max_turns=config.eval.max_turns, sandbox=sandbox)
    return {**{k: float(report.scenario_average.get(k, 0.0)) for k in EVAL_KEYS}, "seconds": report.seconds}


def _curve_hook(config, model_config, tokenizer, mesh, envs, sandbox, logger):
    """`on_step(step, params)` for `rl_train`: greedy held-out Solve-P/R/F1 on `envs` after every
    `eval.curve_every` RL steps, logged as "eval_curve" records with their wall time; None when disabled.
    The last step is left to the final evaluation (`_curve_point`)."""
    every = config.eval.curve_every
    if every <= 0 or not envs:
        return None

    def on_step(step: int, params) -> None:
        if step % every or step >= config.rl.num_steps:
            return
        figures = _greedy_headline(config, model_config, params, tokenizer, mesh, envs, sandbox)
        logger.log(plots.CURVE_PHASE, step, {**figures, "num_envs": len(envs)})

    return on_step


def _validation_selection(config, workdir, model_config, tokenizer, mesh, envs, sandbox, logger):
    """`ValidationSelection` scoring greedy Solve-P/R/F1 on `envs` (None without validation environments), and
    `on_step(step, params)` that runs it and logs each new point as a "validation" record (after
    validation.json holds it, so a replayed step logs nothing twice). The best step's parameters are kept only
    with `eval.select=validation`."""
    if not envs:
        return None, None
    ec = config.eval

    def score(step: int, params) -> dict[str, float]:
        return _greedy_headline(config, model_config, params, tokenizer, mesh, envs, sandbox)

    def save(params, directory: str) -> None:
        models.save_pretrained(model_config, params, directory)

    def load(directory: str):
        return models.load_pretrained(directory, dtype=config.model.param_dtype, compute_dtype=config.model.dtype,
                                      shardings=parallel.checkpoint_sharding_fn(mesh))[1]

    # The environments and the number asked for: a resumed run that asks for more is refused, not cut short.
    keys = f"{ec.validation_envs}:" + "".join(environment_key(s) for s in envs)
    fingerprint = hashlib.sha256(keys.encode()).hexdigest()[:16]
    try:
        selection = ValidationSelection(workdir, score, save, load, every=ec.validation_every,
                                        last_step=config.rl.num_steps, num_envs=len(envs), fingerprint=fingerprint,
                                        keep_best=ec.select == "validation")
    except ValueError as err:
        raise TrainingError(str(err)) from None

    def on_step(step: int, params) -> None:
        point = selection.on_step(step, params)
        if point is not None:
            logger.log(plots.VALIDATION_PHASE, step, {**point, "num_envs": len(envs)})

    return selection, on_step


def _hooks(*hooks):
    """One `on_step(step, params)` calling each hook that is not None in turn; None when all are."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def on_step(step: int, params) -> None:
        for hook in hooks:
            hook(step, params)

    return on_step


def paired_deltas(config, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Paired bootstrap intervals of after - before on the same held-out environments (`stats.paired_bootstrap`).

    `greedy_solve_f1`: per-environment greedy Solve-F1; `sampled_solve_f1`: per-environment mean sampled
    Solve-F1 (when both evaluations sampled). Environments are resampled within their scenario type (the
    headline's strata; sources outside FTRL's four types are left out when those types are present) with
    `eval.bootstrap_resamples` resamples, seed `eval.bootstrap_seed`, a `eval.confidence` interval. Without
    matching per-environment rows (an `eval_before.json` from an older run) a `note` says so instead.
    """
    ec = config.eval
    out: dict[str, Any] = {}
    for name, rows_before, rows_after in (
            ("greedy_solve_f1", before.get("episodes"), after.get("episodes")),
            ("sampled_solve_f1", (before.get("sampled") or {}).get("environments"),
             (after.get("sampled") or {}).get("environments"))):
        if not rows_before or not rows_after:
            continue
        try:
            out[name] = stats.paired_rows_bootstrap(rows_before, rows_after, headline_sources=SCENARIO_TYPES,
                                                    num_resamples=ec.bootstrap_resamples, confidence=ec.confidence,
                                                    seed=ec.bootstrap_seed)
        except stats.UnpairedRowsError as err:
            out["note"] = f"{name}: {err}"
    if "greedy_solve_f1" not in out and "note" not in out:
        out["note"] = "the evaluations carry no per-environment rows (an eval_before.json from an older run)"
    return out


def _after_label(summary: dict[str, Any]) -> str:
    """"after RL", naming the step when the evaluated policy is not the last step's (checkpoint selection)."""
    selected, last = summary.get("selected_step"), summary.get("rl_steps")
    return "after RL" if selected is None or selected == last else f"after RL (step {selected} of {last})"


def write_figures_and_report(workdir: str, summary: dict[str, Any]) -> dict[str, str]:
    """Draws WORKDIR/learning_curves.png (from metrics.jsonl) and WORKDIR/scenario_bars.png, writes
    WORKDIR/report.md linking both; returns {name: file name in workdir}."""
    records = plots.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    plots.plot_learning_curves(records, os.path.join(workdir, LEARNING_CURVES),
                               title=f"{summary['preset']} {summary['algorithm']}, seed {summary['seed']}")
    bars = {label: {"per_source": summary[key]["by_scenario"],
                    "scenario_average": {k: summary[key][k] for k in EVAL_KEYS}}
            for label, key in (("before RL", "eval_before"), (_after_label(summary), "eval_after"))}
    plots.plot_scenario_bars(bars, os.path.join(workdir, SCENARIO_BARS),
                             title=f"held-out greedy evaluation, {summary['num_eval_envs']} environments")
    run_report.write_report(summary, os.path.join(workdir, REPORT),
                            {"RL learning curves": LEARNING_CURVES,
                             "held-out Solve-P/R/F1 per scenario type, before and after RL": SCENARIO_BARS})
    return {"learning_curves": LEARNING_CURVES, "scenario_bars": SCENARIO_BARS, "report": REPORT}


def _finite_loss(metrics, phase: str, step: int, checkpoint_dir: str, knob: str) -> float:
    """The step's loss; a NaN/inf loss stops the run before the bad state can be checkpointed."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise TrainingError(f"{phase} loss is {loss} at step {step}; the last good checkpoint is kept in "
                            f"{checkpoint_dir}; lower {knob} and resume")
    return loss


def split_train_environments(config, train: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(warm-start environments, RL environments in the order RL visits them).

    The warm start imitates oracle trajectories of the first `warmup.fraction_of_envs` of the training
    environments; RL starts on the others. Prompts from environments the warm start memorised would mostly
    reward recall of those trajectories, while the held-out evaluation asks for the skill on new ones.
    The warm-start environments come last in RL's order, so long runs still visit every environment.
    """
    if config.warmup.num_steps <= 0:
        return [], list(train)
    n = max(1, int(len(train) * config.warmup.fraction_of_envs))
    seen, unseen = list(train[:n]), list(train[n:])
    return seen, unseen + seen


def warm_start(config, workdir, model_config, params, tokenizer, mesh, train, sandbox, logger) -> Any:
    """Supervised phase on oracle trajectories; returns the warm-started params (resumable)."""
    wc = config.warmup
    if wc.num_steps <= 0:
        return params

    def examples():
        subset, _ = split_train_environments(config, train)
        conversations = warmstart.oracle_conversations(subset, sandbox)
        return warmstart.encode_conversations(conversations, subset, tokenizer, template=config.model.template,
                                              enable_thinking=config.model.enable_thinking, max_len=wc.max_len)

    return train_supervised(model_config, params, examples, mesh, logger, phase="warmup",
                            checkpoint_dir=os.path.join(workdir, "checkpoints", "warmup"),
                            num_steps=wc.num_steps, batch_size=wc.batch_size, learning_rate=wc.learning_rate,
                            max_grad_norm=config.rl.max_grad_norm, seed=config.seed, pad_id=_pad_id(tokenizer),
                            remat=config.model.remat, chunk_size=config.rl.chunk_size,
                            checkpoint_every=config.checkpoint.every, max_len=wc.max_len)


def train_supervised(model_config, params, examples, mesh, logger, *, phase: str, checkpoint_dir: str,
                     num_steps: int, batch_size: int, learning_rate: float, max_grad_norm: float | None, seed: int,
                     pad_id: int, remat: bool, chunk_size: int, checkpoint_every: int, max_len: int,
                     weight_decay: float = 0.0, warmup_steps: int | None = None, on_step=None,
                     lr_knob: str = "warmup.learning_rate", max_len_knob: str = "warmup.max_len") -> Any:
    """Cross-entropy on the loss-masked tokens of `examples()` (a `warmstart.SupervisedExamples`, built only when
    steps remain), AdamW with a cosine schedule, orbax checkpoints every `checkpoint_every` steps in
    `checkpoint_dir`; a killed run resumes at its last checkpoint with the same batches. Logs `phase` records
    (loss, grad_norm, step_time, tokens_per_sec); `on_step(step, params)` runs after each step. A NaN loss stops
    the run, naming `lr_knob` as the setting to lower; no example within `max_len` tokens names `max_len_knob`.
    Returns the trained params.
    """
    label = "warm start" if phase == "warmup" else phase
    warmup_steps = min(20, num_steps // 10) if warmup_steps is None else warmup_steps
    optimizer = make_optimizer(learning_rate, warmup_steps=warmup_steps, schedule="cosine", total_steps=num_steps,
                               max_grad_norm=max_grad_norm, weight_decay=weight_decay)
    state = shard_state(create_train_state(params, optimizer), mesh)
    ckpt = Checkpointer(checkpoint_dir, max_to_keep=1)
    start = 0
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(target_state=state)
        start = int(ckpt.latest_step())
        log.info("%s resumes at step %d", label, start)
    if start < num_steps:
        data_examples = examples()
        log.info("%s on %d oracle trajectories (%d longer than %d tokens left out)", label, len(data_examples),
                 data_examples.dropped_too_long, max_len)
        if not len(data_examples):
            raise TrainingError(f"no {label} example fits in {max_len} tokens ({data_examples.dropped_too_long} "
                                f"longer); raise {max_len_knob}")
        step_fn = make_sft_step(model_config, optimizer, mesh, remat=remat, chunk_size=chunk_size)
        data = warmstart.batches(data_examples, batch_size, seed=seed, start_step=start, pad_id=pad_id)
        bar = tqdm(range(start, num_steps), desc=label, initial=start, total=num_steps)
        for step in bar:
            t0 = time.perf_counter()
            batch = next(data)
            batch_tokens = int(batch["attention_mask"].sum())
            state, metrics = step_fn(state, batch)
            loss = _finite_loss(metrics, label.replace("warm start", "warm-start"), step, ckpt.directory, lr_knob)
            dt = time.perf_counter() - t0
            logger.log(phase, step + 1, {**metrics, "step_time": dt, "tokens_per_sec": float(batch_tokens) / dt})
            bar.set_postfix(loss=f"{loss:.3f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == num_steps:
                ckpt.save(step + 1, state, {"phase": phase})
            if on_step is not None:
                on_step(step + 1, state.params)
    ckpt.close()
    return state.params


def _pool_from_episodes(episodes) -> list[Sample]:
    pool = []
    for episode in episodes:
        pool.extend(rl_prompts_from_episode(episode, include_initial=True))
    return pool


# Where step-mode RL prompts come from (`rl.prompt_source`).
PROMPT_SOURCES = ("policy", "oracle", "initial")
# Which drawn step-mode prompts may train (`rl.prompt_filter`): all, or those whose greedy turn does not succeed.
PROMPT_FILTERS = ("none", "greedy_fails")


def check_oracle_plans(envs: Sequence[Sample]) -> None:
    """`rl.prompt_source='oracle'` needs every RL environment to carry an oracle plan; TrainingError otherwise."""
    missing = [i for i, env in enumerate(envs) if not env.oracle_calls]
    if missing:
        raise TrainingError(f"config.rl.prompt_source='oracle' needs environments with an oracle plan, and "
                            f"{len(missing)} of {len(envs)} have none (the first: #{missing[0]}); built environments "
                            "have one, sample-format files such as FTRL's rows do not: use "
                            "--config.rl.prompt_source=policy")


def collect_prompt_pool(config, model_config, params, tokenizer, mesh, train, cursor, sandbox, seed):
    """The next RL prompts from `prompts_per_step * refresh_every / 2` training environments (policy, oracle),
    shuffled, with the advanced cursor and the episodes played (none for the oracle and initial sources).

    `rl.prompt_source="policy"` is FTRL's data: the current policy plays the environments, and every state after
    a tool-calling turn (and each fresh question) becomes an RL prompt, so an episode that keeps failing gives
    a prompt per failed turn. `"oracle"`: the states along each environment's oracle plan instead (the fresh
    question, then each state after an oracle turn and its tool responses), where the next turn can still
    succeed. `"initial"`: only the fresh questions (each environment's first turn), one prompt per environment,
    from `prompts_per_step * refresh_every * sampling rounds` environments, so the steps until the next
    collection draw each prompt at most once; TrainingError when there are fewer training environments.
    """
    rc = config.rl
    initial = rc.prompt_source == "initial"
    num_envs = (rc.prompts_per_step * rc.refresh_every * _sampling_rounds(config) if initial
                else max(1, rc.prompts_per_step * rc.refresh_every // 2))
    if initial and num_envs > len(train):
        raise TrainingError(f"config.rl.prompt_source='initial' draws {num_envs} distinct fresh questions per "
                            f"collection (prompts_per_step x refresh_every x sampling rounds) but there are "
                            f"{len(train)} training environments: raise --config.envs.num_train or lower "
                            "rl.prompts_per_step / rl.refresh_every / rl.max_sampling_rounds")
    envs = [train[(cursor + i) % len(train)] for i in range(num_envs)]
    if initial:
        pool = [decode_sample(env) for env in envs]
        episodes = []
    elif rc.prompt_source == "oracle":
        check_oracle_plans(envs)
        conversations = warmstart.oracle_conversations(envs, sandbox)
        pool = [state for env, conversation in zip(envs, conversations)
                for state in rl_prompts_from_conversation(env, conversation)]
        episodes = []
    else:
        policy = _policy(config, model_config, params, tokenizer, mesh, greedy=False, seed=seed,
                         max_new_tokens=config.rollout.max_new_tokens)
        episodes = play_episodes(policy, envs, max_turns=config.rollout.max_turns, sandbox=sandbox)
        pool = _pool_from_episodes(episodes)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order], (cursor + num_envs) % len(train), episodes


def _policy_dir(config, policy_dir: str | None) -> str:
    """The checkpoint to sample from: the given one (a directory or a shipped policy's name), else the config's
    model when it names one explicitly (a shipped policy's name is the preset's start, not an explicit choice),
    else this workdir's trained policy (export, then warmstart), else the config's shipped starting policy."""
    workdir = os.path.abspath(config.workdir)
    trained = [os.path.join(workdir, "export"), os.path.join(workdir, "warmstart")]
    start = model_path(config)
    if policy_dir:
        candidates = [policies.resolve(policy_dir)]
    elif start and config.model.path not in policies.SHIPPED:
        candidates = [start]
    else:
        candidates = trained + ([start] if start else [])
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise TrainingError(f"no policy to sample from in {candidates}: run the main job first (it writes "
                        "WORKDIR/warmstart and WORKDIR/export) or pass a Hugging Face checkpoint directory")


def sample_rl_prompts(config, out_path: str, *, policy_dir: str | None = None, num_envs: int | None = None,
                      greedy: bool = False) -> dict[str, Any]:
    """FTRL's RL data as a file: the policy plays the training environments multi-turn, and every state after
    a tool-calling turn (with its reduced unsolved set and solve rate), plus each fresh question, is written
    to `out_path` in the sample format (.jsonl or .parquet). Returns counts and the episodes' mean Solve-F1."""
    check_config(config)
    path = _policy_dir(config, policy_dir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    with Sandbox() as sandbox:
        train, _ = prepare_environments(config, os.path.abspath(config.workdir), sandbox)
        tokenizer = load_tokenizer(path)
        model_config, params = models.load_pretrained(path, dtype=config.model.param_dtype,
                                                      compute_dtype=config.model.dtype,
                                                      shardings=parallel.checkpoint_sharding_fn(mesh))
        envs = train[:num_envs] if num_envs else train
        policy = _policy(config, model_config, params, tokenizer, mesh, greedy=greedy, seed=config.seed,
                         max_new_tokens=config.rollout.max_new_tokens)
        episodes = play_episodes(policy, envs, max_turns=config.rollout.max_turns, sandbox=sandbox)
    prompts = _pool_from_episodes(episodes)
    write_samples(out_path, prompts)
    return {"policy": path, "episodes": len(episodes), "prompts": len(prompts),
            "after_tool_calls": len(prompts) - len(episodes),  # one fresh question per episode
            "episode_solve_f1": float(np.mean([ep.metrics["solve_f1"] for ep in episodes]))}


def _sample_step_groups(config, policy, prompts, sandbox) -> tuple[list[Any], np.ndarray]:
    """n sampled turns per prompt, group-major, and their verifiable step rewards `[len(prompts) * n]` float32.

    A turn cut at max_new_tokens is scored as evaluation treats it: its calls are not run (`truncated=`).
    """
    rc = config.rl
    return scored_turns(policy, prompts, rc.num_rollouts, sandbox, reward_kind=rc.reward_kind,
                        semantics=rc.reward_semantics)


def scored_turns(policy, prompts, repeats: int, sandbox, *, reward_kind: str = "f1",
                 semantics: str = "ftrl") -> tuple[list[Any], np.ndarray]:
    """`repeats` turns of `policy` (a `TurnGenerator`) per prompt, prompt-major, and their step rewards
    `[len(prompts) * repeats]` float32, scored as RL scores them (`rewards.step_rewards`; a turn cut at the token
    limit does not run its calls)."""
    repeated = [p for p in prompts for _ in range(repeats)]
    turns = policy([(p.messages, p.tools) for p in repeated])
    scores = rewards.step_rewards([t.text for t in turns], repeated, reward_kind, sandbox=sandbox,
                                  semantics=semantics, truncated=[t.truncated for t in turns])
    return turns, np.asarray(scores, np.float32)


def greedy_solved(config, greedy_policy, prompts, sandbox) -> np.ndarray:
    """Bool `[len(prompts)]`: the prompt's greedy turn (`greedy_policy`, temperature 0) earns at least
    `rl.success_threshold` of RL's step reward, so a successful sample there only confirms what greedy
    decoding already writes (`rl.prompt_filter="greedy_fails"`; `analysis.headroom` measures how often)."""
    rc = config.rl
    _, scores = scored_turns(greedy_policy, prompts, 1, sandbox, reward_kind=rc.reward_kind,
                             semantics=rc.reward_semantics)
    return scores >= rc.success_threshold


def _eligible_groups(config, greedy_policy, prompts, scores, sandbox) -> np.ndarray:
    """`rl.prompt_filter="greedy_fails"`: bool per group, False where the group would be kept for its rewards
    but its prompt's greedy turn already succeeds (the greedy turn is generated for those prompts only)."""
    rc = config.rl
    informative = informative_groups(scores, rc.num_rollouts, require_success=rc.dynamic_sampling_require_success,
                                     success_threshold=rc.success_threshold)
    eligible = np.ones(len(prompts), bool)
    candidates = np.flatnonzero(informative)
    if candidates.size:
        eligible[candidates] = ~greedy_solved(config, greedy_policy, [prompts[i] for i in candidates], sandbox)
    return eligible


def _reward_stats(config, scores: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """A batch's logged reward statistics: mean, spread, group signal over groups of `rl.num_rollouts`
    (advantages divided by the group's std when `rl.algorithm` is GRPO, as GRPO's are) and mean response
    length (tokens)."""
    return {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
            **group_signal(scores, config.rl.num_rollouts, scale_by_std=config.rl.algorithm == "grpo"),
            "response_length": float(np.mean(lengths))}


def _step_arrays(config, turns, scores, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The update's arrays for group-major sampled turns, and the batch's reward statistics."""
    n = config.rl.num_rollouts
    if _shared_prompt(config):
        # Prompts in steps of 256 tokens: a step's prompts (350-700 tokens in the tiny world, fewer in the
        # default's pool-8 world) then take one or two shapes, and each new shape's compile costs more than the
        # padding. Responses in steps of 32: their n rows per prompt make them most of the update's tokens (a step
        # whose longest turn has 65-96 tokens runs 96, not 128).
        arrays = shared_prompt.step_batch(turns, n, _pad_id(tokenizer), multiple=32, prompt_multiple=256)
        lengths = arrays["response_mask"].sum(axis=-1)
    else:
        arrays = rl_batch.pad_rows(rl_batch.step_rows(turns), _pad_id(tokenizer))
        lengths = rl_batch.response_lengths(arrays)
    stats = {**_reward_stats(config, scores, lengths),
             "truncated_fraction": float(np.mean([t.truncated for t in turns]))}
    return arrays, stats


def _rl_step_batch(config, model_config, state_params, tokenizer, mesh, prompts, sandbox, seed):
    """Samples n rollouts per prompt, scores them with the verifiable reward, returns (batch arrays, scores, stats)."""
    policy = _policy(config, model_config, state_params, tokenizer, mesh, greedy=False, seed=seed,
                     max_new_tokens=config.rollout.max_new_tokens)
    turns, scores = _sample_step_groups(config, policy, prompts, sandbox)
    arrays, stats = _step_arrays(config, turns, scores, tokenizer)
    return arrays, scores, stats


def _sample_trajectory_groups(config, policy, envs, sandbox) -> tuple[list[Any], np.ndarray]:
    """n episodes per environment, group-major, and their rewards: each episode's Solve-F1, the metric
    evaluation reports (so a truncated turn's calls, not run, do not count there either)."""
    n = config.rl.num_rollouts
    episodes = play_episodes(policy, [e for e in envs for _ in range(n)], max_turns=config.rollout.max_turns,
                             sandbox=sandbox)
    return episodes, np.asarray([ep.metrics["solve_f1"] for ep in episodes], np.float32)


def _trajectory_arrays(config, episodes, scores, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The update's arrays for group-major whole episodes (with `rl.shared_prompt`, each environment's first
    prompt stored once: `shared_prompt.trajectory_batch`), and the batch's reward statistics."""
    rows = rl_batch.trajectory_rows(episodes, tokenizer, config.model.template)
    if _shared_prompt(config):
        arrays = shared_prompt.trajectory_batch(rows, config.rl.num_rollouts, _pad_id(tokenizer), prompt_multiple=256)
        lengths = arrays[shared_prompt.RESPONSE_LOSS_MASK].sum(axis=-1)
    else:
        arrays = rl_batch.pad_rows(rows, _pad_id(tokenizer))
        lengths = rl_batch.response_lengths(arrays)
    return arrays, _reward_stats(config, scores, lengths)


def _sampling_rounds(config) -> int:
    return config.rl.max_sampling_rounds if config.rl.dynamic_sampling else 1


def _collect_groups(config, draw) -> tuple[list[Any], np.ndarray, dict[str, float]]:
    """One step's `prompts_per_step` groups from `draw(round) -> (group-major items, rewards[, eligible])`
    (`eligible`: bool per group, only with dynamic sampling; `GroupCollector.add`).

    Without `rl.dynamic_sampling`: one round, as drawn. With it (DAPO, sec. 3.2): rounds of fresh prompts until
    `prompts_per_step` groups whose rewards differ (and, with `rl.dynamic_sampling_require_success`, that hold a
    success) are found or `rl.max_sampling_rounds` are spent; rejected groups fill what is left. The stats then
    count the groups drawn and kept (`rl.dynamic_sampling.GroupCollector.stats`).
    """
    rc = config.rl
    if not rc.dynamic_sampling:
        items, scores = draw(0)
        return items, scores, {}
    collector = GroupCollector(rc.prompts_per_step, rc.num_rollouts,
                               require_success=rc.dynamic_sampling_require_success,
                               success_threshold=rc.success_threshold)
    for round_index in range(rc.max_sampling_rounds):
        if collector.add(*draw(round_index)):
            break
    items, scores = collector.batch()
    return items, scores, collector.stats()


def _loss_config(config) -> LossConfig:
    """The objective of `rl.algorithm`: PPO-clip with KL and entropy, or for RFT the supervised `nll` loss
    without ratio, clip, KL or entropy."""
    rc = config.rl
    rft = rc.algorithm == RFT_ESTIMATOR
    # seq-mean-token-sum-norm's constant: the generation budget of one response (Dr. GRPO's max length).
    budget = config.rollout.max_new_tokens * (config.rollout.max_turns if rc.mode == "trajectory" else 1)
    return LossConfig(clip_low=rc.clip_low, clip_high=rc.clip_high, dual_clip=rc.dual_clip,
                      kl_coef=0.0 if rft else rc.kl_coef, kl_estimator=rc.kl_estimator,
                      entropy_coef=0.0 if rft else rc.entropy_coef, aggregation=rc.aggregation,
                      policy_loss="nll" if rft else "ppo_clip", norm_length=budget)


def _rl_updates(config) -> int:
    """RL's optimizer updates, the length of its learning-rate schedule: one per mini-batch per step (at least 1,
    so that a configuration without RL steps still describes a valid schedule)."""
    return max(config.rl.num_steps * config.rl.num_minibatches, 1)


def rl_train(config, workdir, model_config, params, tokenizer, mesh, train, sandbox, logger, on_step=None) -> Any:
    """RL on the verifiable reward with fresh samples from the current policy: GRPO, Dr. GRPO, RLOO,
    Reinforce++ (`rl.algorithm`, an advantage estimator) or the RFT baseline (`rl.algorithm="rft"`).
    `on_step(step, params)`, if given, runs after every step with the steps done so far and the new params, before
    that step's checkpoint is saved (a run killed inside it replays the step on resume)."""
    rc = config.rl
    try:
        trainable = num_trainable(params, rc.trainable)
    except ValueError as err:
        raise TrainingError(f"config.rl.trainable: {err}") from None
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log.info("RL trains %d of %d parameters (rl.trainable=%r)", trainable, total, rc.trainable)
    logger.log("rl_setup", 0, {"trainable_params": trainable, "trainable_fraction": trainable / max(total, 1)})
    if rc.algorithm == "dr_grpo" and rc.aggregation != "seq-mean-token-sum-norm":
        log.warning("rl.algorithm='dr_grpo' with rl.aggregation=%r: Dr. GRPO's loss is "
                    "--config.rl.aggregation=seq-mean-token-sum-norm", rc.aggregation)
    optimizer = make_optimizer(rc.learning_rate, weight_decay=rc.weight_decay, max_grad_norm=rc.max_grad_norm,
                               trainable=rc.trainable, schedule=rc.lr_schedule, warmup_steps=rc.lr_warmup_steps,
                               total_steps=_rl_updates(config))
    lr_at = make_schedule(rc.learning_rate, warmup_steps=rc.lr_warmup_steps, schedule=rc.lr_schedule,
                          total_steps=_rl_updates(config))
    ref_params = jax.tree.map(jnp.copy, params)  # frozen reference policy (the one RL starts from)
    state = shard_state(create_train_state(params, optimizer), mesh)
    loss_cfg = _loss_config(config)
    step_fn = make_rl_step(model_config, optimizer, mesh, loss_cfg, num_minibatches=rc.num_minibatches,
                           num_microbatches=rc.num_microbatches, chunk_size=rc.chunk_size, remat=config.model.remat,
                           temperature=config.rollout.temperature)
    if _shared_prompt(config):
        shared_fn = make_shared_prompt_logprob_fn(model_config, mesh, chunk_size=rc.chunk_size,
                                                  temperature=config.rollout.temperature)
        logprob_fn = lambda p, b: shared_fn(p, *(b[k] for k in shared_prompt.SHARED_PROMPT_KEYS))  # noqa: E731
    else:
        flat_fn = make_logprob_fn(model_config, mesh, chunk_size=rc.chunk_size, temperature=config.rollout.temperature)
        logprob_fn = lambda p, b: flat_fn(p, b["tokens"], b["attention_mask"])  # noqa: E731
    estimator_kw = {"success_threshold": rc.success_threshold} if rc.algorithm == RFT_ESTIMATOR else {}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "rl"), max_to_keep=config.checkpoint.max_to_keep)
    start, cursor, pool = 0, 0, []
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(target_state=state)
        start, cursor = int(extra["rl_step"]), int(extra["cursor"])
        pool = [decode_sample(row) for row in extra["pool"]]
        log.info("RL resumes at step %d", start)
    bar = tqdm(range(start, rc.num_steps), desc=f"RL ({rc.algorithm})", initial=start, total=rc.num_steps)
    rounds = _sampling_rounds(config)
    for step in bar:
        t0 = time.perf_counter()
        seed = config.seed * 1_000_003 + step
        if rc.mode == "step" and (step % rc.refresh_every == 0 or not pool):
            pool, cursor, episodes = collect_prompt_pool(config, model_config, state.params, tokenizer, mesh,
                                                         train, cursor, sandbox, seed)
            collected = {"pool_size": len(pool)}
            if episodes:
                collected["episode_solve_f1"] = float(np.mean([ep.metrics["solve_f1"] for ep in episodes]))
            logger.log("collect", step, collected)
        # One policy per step: each sampling round's call draws a fresh key from the step's seed.
        policy = _policy(config, model_config, state.params, tokenizer, mesh, greedy=False, seed=seed,
                         max_new_tokens=config.rollout.max_new_tokens)
        greedy = (_policy(config, model_config, state.params, tokenizer, mesh, greedy=True, seed=0,
                          max_new_tokens=config.rollout.max_new_tokens) if rc.prompt_filter == "greedy_fails" else None)
        if rc.mode == "trajectory":
            def draw(round_index, first=cursor):
                envs = [train[(first + round_index * rc.prompts_per_step + i) % len(train)]
                        for i in range(rc.prompts_per_step)]
                return _sample_trajectory_groups(config, policy, envs, sandbox)

            episodes, scores, sampling = _collect_groups(config, draw)
            cursor = (cursor + int(sampling.get("sampling_rounds", 1)) * rc.prompts_per_step) % len(train)
            arrays, stats = _trajectory_arrays(config, episodes, scores, tokenizer)
        else:
            k = step % rc.refresh_every

            def draw(round_index):
                first = (k * rounds + round_index) * rc.prompts_per_step
                prompts = [pool[(first + i) % len(pool)] for i in range(rc.prompts_per_step)]
                turns, scores = _sample_step_groups(config, policy, prompts, sandbox)
                if greedy is None:
                    return turns, scores
                return turns, scores, _eligible_groups(config, greedy, prompts, scores, sandbox)

            turns, scores, sampling = _collect_groups(config, draw)
            arrays, stats = _step_arrays(config, turns, scores, tokenizer)
        stats.update(sampling)
        t_sample = time.perf_counter() - t0
        batch = {k: jnp.asarray(v) for k, v in arrays.items()}
        t_passes = time.perf_counter()
        if rc.num_minibatches > 1:
            # With one mini-batch the update is on-policy and takes its own log-probs as the old ones.
            batch["old_logprobs"] = logprob_fn(state.params, batch)
        if loss_cfg.kl_coef:
            batch["ref_logprobs"] = logprob_fn(ref_params, batch)
        jax.block_until_ready(batch)
        t_logprob = time.perf_counter() - t_passes  # the log-prob passes: the reference, and old ones off-policy
        mask = response_mask(batch)
        advantages = compute_advantages(rc.algorithm, jnp.asarray(scores), mask.reshape(len(scores), -1),
                                        group_size=rc.num_rollouts, **estimator_kw)
        batch["advantages"] = advantages.reshape(mask.shape)
        state, metrics = step_fn(state, batch)
        _finite_loss(metrics, "RL", step, ckpt.directory, "rl.learning_rate")
        dt = time.perf_counter() - t0
        # Tokens the model ran (a shared prompt counts once), and with their padding (the arrays' size).
        tokens = float(sum(arrays[k].sum() for k in ("attention_mask", "prompt_mask", "response_mask") if k in arrays))
        stats["padded_tokens"] = float(sum(arrays[k].size for k in ("tokens", "prompt_tokens", "response_tokens")
                                           if k in arrays))
        # The rate of this step's last update (state.step counts updates done).
        logger.log("rl", step + 1, {**metrics, **stats, "step_time": dt, "sample_time": t_sample,
                                    "logprob_time": t_logprob, "tokens_per_sec": tokens / dt,
                                    "learning_rate": float(lr_at(int(state.step) - 1))})
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{float(metrics.get('kl', 0.0)):.4f}")
        # Hooks first: a run killed inside one has no checkpoint of this step yet, so it replays the step.
        if on_step is not None:
            on_step(step + 1, state.params)
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == rc.num_steps:
            ckpt.save(step + 1, state, {"rl_step": step + 1, "cursor": cursor,
                                        "pool": [encode_sample(p) for p in pool]})
    ckpt.close()
    return state.params


# ------------------------------------------------------------------------------------------- main

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train_and_evaluate(config) -> dict[str, Any]:
    """Runs the main job described in the module docstring; returns the summary written to summary.json."""
    check_config(config)
    if config.mesh.distributed:
        parallel.initialize_distributed()
    workdir = os.path.abspath(config.workdir)
    if not config.resume and os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise TrainingError(f"{workdir} already holds a run's checkpoints: pass --config.resume=True to continue "
                            "it, or choose another --config.workdir")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    started = time.perf_counter()
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    logger = MetricsLogger(workdir)
    with Sandbox() as sandbox:
        train, held_out = prepare_environments(config, workdir, sandbox)
        if config.rl.prompt_source == "oracle":
            check_oracle_plans(train)  # before anything heavy
        tokenizer = prepare_tokenizer(config, workdir, train)
        model_config, params = prepare_model(config, tokenizer, mesh)
        log.info("model: %s, %.2fM parameters; %d train / %d held-out environments", model_config.model_type,
                 model_config.num_params / 1e6, len(train), len(held_out))

        warm_dir = os.path.join(workdir, "warmstart")
        if os.path.isfile(os.path.join(warm_dir, "config.json")):
            _, params = models.load_pretrained(warm_dir, dtype=config.model.param_dtype,
                                               compute_dtype=config.model.dtype,
                                               shardings=parallel.checkpoint_sharding_fn(mesh))
        else:
            params = warm_start(config, workdir, model_config, params, tokenizer, mesh, train, sandbox, logger)
            models.save_pretrained(model_config, params, warm_dir)
            tokenizer.save_pretrained(warm_dir)

        validation = prepare_validation(config, workdir, train, held_out, sandbox)
        _, rl_envs = split_train_environments(config, train)
        # Training-set figures come from the environments RL visits first (its prompts are drawn from them).
        train_subset = rl_envs[:max(0, config.eval.num_train_envs)]
        curve_envs = held_out[:max(0, config.eval.curve_envs)] if config.eval.curve_every > 0 else []
        # Before the first evaluation: a resumed run whose validation settings changed is refused at once.
        selection, validation_hook = _validation_selection(config, workdir, model_config, tokenizer, mesh,
                                                           validation, sandbox, logger)
        before_file = os.path.join(workdir, "eval_before.json")
        if os.path.isfile(before_file):
            eval_before = _read_json(before_file)
        else:
            eval_before = run_evaluation(config, model_config, params, tokenizer, mesh, held_out, sandbox,
                                         train_subset)
            _write_json(before_file, eval_before)
        logger.log("eval_before", 0, _logged_figures(eval_before))
        _curve_point(logger, 0, eval_before, len(curve_envs))
        print("eval before RL: " + ", ".join(f"{k}={eval_before[k]:.4f}" for k in EVAL_KEYS), flush=True)

        if validation_hook is not None:
            validation_hook(0, params)
        params = rl_train(config, workdir, model_config, params, tokenizer, mesh, rl_envs, sandbox, logger,
                          on_step=_hooks(_curve_hook(config, model_config, tokenizer, mesh, curve_envs, sandbox,
                                                     logger), validation_hook))
        selected = config.rl.num_steps
        if selection is not None and config.eval.select == "validation":
            selected = selection.best_step
            if selected != config.rl.num_steps:
                params = selection.best_params()
            log.info("evaluating and exporting the policy of RL step %d of %d (best validation Solve-F1 %.4f)",
                     selected, config.rl.num_steps, selection.best_point()["solve_f1"])

        eval_after = run_evaluation(config, model_config, params, tokenizer, mesh, held_out, sandbox, train_subset)
        logger.log("eval_after", config.rl.num_steps, {**_logged_figures(eval_after), "selected_step": selected})
        if selected == config.rl.num_steps:  # the curve's steps are RL's; an earlier policy's score is not its last
            _curve_point(logger, config.rl.num_steps, eval_after, len(curve_envs))
        print("eval after RL:  " + ", ".join(f"{k}={eval_after[k]:.4f}" for k in EVAL_KEYS)
              + (f" (the policy of step {selected})" if selected != config.rl.num_steps else ""), flush=True)

    export_dir = os.path.join(workdir, "export")
    models.save_pretrained(model_config, params, export_dir)
    tokenizer.save_pretrained(export_dir)
    summary = {"preset": config.preset, "seed": config.seed, "algorithm": config.rl.algorithm,
               "rl_steps": config.rl.num_steps, "eval_before": eval_before, "eval_after": eval_after,
               "num_train_envs": len(train), "num_eval_envs": len(held_out),
               "model_params": model_config.num_params, "wall_seconds": time.perf_counter() - started,
               "select": config.eval.select, "selected_step": selected}
    if selection is not None:
        summary["validation"] = selection.summary()
    summary["paired_delta"] = paired_deltas(config, eval_before, eval_after)
    summary["eval_seconds"] = _eval_seconds(workdir, eval_before, eval_after)
    if selection is not None:
        summary["eval_seconds"]["validation"] = float(sum(p.get("seconds", 0.0) for p in selection.points))
    drawn = time.perf_counter()
    summary["files"] = write_figures_and_report(workdir, summary)
    summary["report_seconds"] = time.perf_counter() - drawn
    _write_json(os.path.join(workdir, "summary.json"), summary)
    logger.close()
    print(run_report.console_table(summary), flush=True)
    print(f"report: {os.path.join(workdir, REPORT)}", flush=True)
    return summary


def _eval_seconds(workdir: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Wall time of each kind of evaluation, before and after RL together, and of the learning curve's points."""
    out = {"greedy": before.get("seconds", 0.0) + after.get("seconds", 0.0)}
    for part in ("sampled", "train_subset"):
        if part in before or part in after:
            out[part] = (before.get(part) or {}).get("seconds", 0.0) + (after.get(part) or {}).get("seconds", 0.0)
    _, curve = plots.series(plots.read_metrics(os.path.join(workdir, "metrics.jsonl")), plots.CURVE_PHASE, "seconds")
    if curve.size:
        out["curve"] = float(curve.sum())
    return out
