"""The recipe of a tiny instruct policy: supervised training on oracle trajectories from random init (or, with
`init`, continued from a policy directory).

`pretrain(config)` (config: `configs/tiny.py`) runs

  environments  `envs.num` procedural environments of the training side of the question partition
                (`envs.splits`), build seed `envs.seed`, world `envs.world`   -> WORKDIR/envs/pretrain.jsonl
  held-out      `eval.num_envs` held-out environments built as the main job builds them for seed 0
                (`main_job.build_split("eval", ...)`, build seed `eval.seed`)  -> WORKDIR/envs/held_out.jsonl
  tokenizer     the embedded byte-level BPE learned on the supervised environments' text -> WORKDIR/tokenizer/
                (with `init`: the starting policy's tokenizer files, weights and architecture; `model.preset`,
                `model.overrides` and `tokenizer.*` are then not used, and `model.template` must be the
                chat format it was trained with)
  training      cross-entropy on the assistant tokens of each environment's oracle conversation (calls,
                then the final answer), AdamW + cosine schedule; resumable from WORKDIR/checkpoints/pretrain/;
                greedy held-out Solve-F1 on the first `eval.curve_envs` environments every `eval.every` steps
  export        bfloat16 safetensors, config.json, tokenizer with its chat template, recipe.json and a model
                card (README.md) with the command, data, steps, wall time and held-out scores -> `output`
  evaluation    the exported directory, reloaded, played greedily on the held-out environments (the scores in
                the card are those of the bytes that ship)

Everything is deterministic in the config; the wall time is measured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax

from ftrl_jax import models, parallel, policies
from ftrl_jax.envs.samples import read_samples, write_samples
from ftrl_jax.envs.world import TINY_WORLD
from ftrl_jax.envs.stages import SCENARIO_KINDS
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.pipeline import main_job
from ftrl_jax.rollout.evaluation import evaluate
from ftrl_jax.rollout.policy import LocalPolicy
from ftrl_jax.text.tokenizer import PRETOKENIZE_PATTERNS, load_tokenizer
from ftrl_jax.training import warmstart
from ftrl_jax.training.metrics import MetricsLogger

log = logging.getLogger(__name__)
PHASE, CURVE_PHASE = "pretrain", "pretrain_eval"
EVAL_KEYS = main_job.EVAL_KEYS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


class PretrainError(main_job.TrainingError):
    """A recipe that cannot run; the message says what to change."""


def _kinds(config) -> list[str]:
    return [k.strip() for k in config.envs.scenarios.split(",") if k.strip()]


def check_config(config) -> None:
    tc, ec = config.train, config.eval
    for name, value in (("envs.num", config.envs.num), ("train.num_steps", tc.num_steps),
                        ("train.batch_size", tc.batch_size), ("eval.num_envs", ec.num_envs)):
        if value < 1:
            raise PretrainError(f"config.{name}={value}; use a positive number")
    for name, value in (("eval.every", ec.every), ("eval.curve_envs", ec.curve_envs)):
        if value < 0:
            raise PretrainError(f"config.{name}={value}; use 0 (off) or a positive number")
    if config.init:
        _check_init(config)
    if config.checkpoint.every < 1:
        raise PretrainError(f"config.checkpoint.every={config.checkpoint.every}; use a positive number of steps")
    unknown = [k for k in _kinds(config) if k not in SCENARIO_KINDS]
    if unknown or not _kinds(config):
        raise PretrainError(f"config.envs.scenarios={config.envs.scenarios!r}: unknown scenario types {unknown}; "
                            f"use some of {', '.join(SCENARIO_KINDS)}")
    if not 0 <= tc.warmup_steps < tc.num_steps:
        raise PretrainError(f"config.train.warmup_steps={tc.warmup_steps} must be in [0, train.num_steps="
                            f"{tc.num_steps})")
    if config.model.template not in main_job.TEMPLATES:
        raise PretrainError(f"config.model.template={config.model.template!r}; use one of "
                            f"{sorted(main_job.TEMPLATES)}")
    if config.tokenizer.pretokenizer not in PRETOKENIZE_PATTERNS:
        raise PretrainError(f"config.tokenizer.pretokenizer={config.tokenizer.pretokenizer!r}; use one of "
                            f"{sorted(PRETOKENIZE_PATTERNS)}")
    if jax.device_count() > 1 and tc.batch_size % jax.device_count():
        raise PretrainError(f"config.train.batch_size={tc.batch_size} must be a multiple of the "
                            f"{jax.device_count()} devices")


def _data_settings(config) -> dict[str, Any]:
    """The settings the workdir's environments and tokenizer were made with (checked on every rerun)."""
    return {"envs": json.loads(config.envs.to_json()), "eval_num_envs": config.eval.num_envs,
            "eval_seed": config.eval.seed, "vocab_size": config.tokenizer.vocab_size, "template": config.model.template,
            "pretokenizer": config.tokenizer.pretokenizer, "init": _init_label(config)}


def _check_data_settings(config, workdir: str) -> None:
    path = os.path.join(workdir, "data_settings.json")
    settings = _data_settings(config)
    if os.path.isfile(path):
        with open(path) as f:
            made_with = json.load(f)
        made_with.setdefault("pretokenizer", "qwen2")  # workdirs made before these settings existed
        made_with.setdefault("init", "")
        if made_with != settings:
            changed = sorted(k for k in settings if settings[k] != made_with.get(k))
            raise PretrainError(f"{workdir} holds environments and a tokenizer made with other settings ({', '.join(changed)}"
                                f"): made with {json.dumps({k: made_with.get(k) for k in changed})}; use another "
                                "--config.workdir, or the settings it was made with")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)


def _environments(config, workdir: str, sandbox: Sandbox):
    env_dir = os.path.join(workdir, "envs")
    os.makedirs(env_dir, exist_ok=True)
    paths = {"pretrain": os.path.join(env_dir, "pretrain.jsonl"), "held_out": os.path.join(env_dir, "held_out.jsonl")}
    common = dict(kinds=_kinds(config), complexity=config.envs.complexity, world=config.envs.world or None,
                  sandbox=sandbox)
    if not os.path.exists(paths["pretrain"]):
        write_samples(paths["pretrain"], main_job.build_split("train", config.envs.num, config.envs.seed, **common))
    if not os.path.exists(paths["held_out"]):
        write_samples(paths["held_out"], main_job.build_split("eval", config.eval.num_envs, config.eval.seed,
                                                              **common))
    out = []
    for name in ("pretrain", "held_out"):
        samples, errors = read_samples(paths[name])
        if errors or not samples:
            what = f"unreadable rows ({errors[:2]})" if errors else "no environments"
            raise PretrainError(f"{paths[name]} has {what}; delete it to rebuild it")
        out.append(samples)
    return out


def _init_dir(config) -> str:
    """The absolute directory `config.init` names (a path or a shipped policy's name); '' for random init."""
    return os.path.abspath(policies.resolve(config.init)) if config.init else ""


def _init_label(config) -> str:
    """How the card, recipe.json and the workdir's settings name the start: a shipped policy by its name (the same in
    every checkout), any other directory by its absolute path; '' for random init."""
    return config.init if config.init in policies.SHIPPED else _init_dir(config)


def _check_init(config) -> None:
    """Refuses an `init` that is not a policy directory whose weights, tokenizer and chat format this recipe can
    continue."""
    init = _init_dir(config)
    what = (f"config.init={config.init!r}: use a Hugging Face policy directory (such as WORKDIR/policy of an earlier "
            "run of this recipe) or a shipped policy's name (tiny-instruct), or '' for random initialisation")
    if not os.path.isdir(init):
        raise PretrainError(f"{init} is not a directory; {what}")
    if os.path.isdir(os.path.join(init, "checkpoints")) or os.path.isfile(os.path.join(init, "data_settings.json")):
        raise PretrainError(f"{init} is a run directory of this recipe, not a policy; use "
                            f"{os.path.join(init, 'policy')} ({what})")
    weights = ("model.safetensors", "model.safetensors.index.json")
    tokenizer = ("tokenizer.json", "tokenizer_config.json")
    for need, names in (("config.json", ("config.json",)), ("weights (model.safetensors)", weights),
                        ("tokenizer (tokenizer.json)", tokenizer)):
        if not any(os.path.isfile(os.path.join(init, name)) for name in names):
            raise PretrainError(f"{init} has no {need}; {what}")
    trained = (_read_json(os.path.join(init, main_job.RECIPE_FILE), None) or {}).get("config", {})
    template = trained.get("model", {}).get("template")
    if template and template != config.model.template:
        raise PretrainError(f"config.model.template={config.model.template!r}, but {init} was trained with the "
                            f"{template!r} chat format (its recipe.json); pass --config.model.template={template}")
    output = os.path.abspath(config.output or os.path.join(config.workdir, "policy"))
    if output == init:
        raise PretrainError(f"the output {output} is the starting policy config.init; choose another --output")


def _tokenizer(config, workdir: str, train):
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.isdir(tok_dir):
        return load_tokenizer(tok_dir)
    if config.init:
        # The files themselves: loaded from a directory with a qwen2 config.json, transformers rebuilds the
        # pre-tokenizer as Qwen2's split, and saving that would replace the starting policy's own.
        init, partial = _init_dir(config), tok_dir + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(init, name)):
                shutil.copy(os.path.join(init, name), partial)
        try:
            load_tokenizer(partial)
        except ValueError as err:
            raise PretrainError(f"the starting policy's tokenizer does not load ({err})") from err
        os.replace(partial, tok_dir)
        return load_tokenizer(tok_dir)
    tokenizer = main_job.embedded_tokenizer(train, config.model.template, config.tokenizer.vocab_size,
                                            config.tokenizer.pretokenizer)
    tokenizer.save_pretrained(tok_dir)
    return tokenizer


def _model(config, tokenizer):
    if config.init:  # float32 master weights from the (possibly bfloat16) export
        return models.load_pretrained(_init_dir(config), dtype="float32", compute_dtype="float32")
    return main_job.random_model(config.model.preset, config.model.overrides, tokenizer, param_dtype="float32",
                                 dtype="float32", seed=config.seed)


def greedy_eval(config, model_config, params, tokenizer, samples, sandbox) -> dict[str, Any]:
    """Greedy held-out Solve-P/R/F1 (the average over scenario types, in [0, 1]), per scenario type, seconds."""
    policy = LocalPolicy(model_config, params, tokenizer, template=config.model.template,
                         max_new_tokens=config.eval.max_new_tokens, temperature=0.0, seed=0)
    report = evaluate(policy, samples, max_turns=config.eval.max_turns, sandbox=sandbox)
    return main_job._greedy_figures(report)


def _card(config, recipe: dict[str, Any]) -> str:
    ev, tc = recipe["held_out"], config.train
    ends = ", ".join(f"{reason} {count}" for reason, count in sorted(ev["end_reasons"].items(), key=lambda kv: -kv[1]))
    own = "its own recipe is `init_recipe` in recipe.json; " if recipe.get("init_recipe") else ""
    start = (f"continued from `{_init_label(config)}` (its weights, architecture and tokenizer; {own}batch order "
             f"seed {config.seed})" if config.init else f"random initialisation (seed {config.seed})")
    tokenizer = (f"the starting policy's ({recipe['model']['vocab_size']} tokens)" if config.init else
                 f"byte-level BPE, {recipe['model']['vocab_size']} tokens, learned on the same environments' text "
                 f"(pre-tokenizer `{config.tokenizer.pretokenizer}`)")
    # RL from this policy: the `tiny-instruct` preset (its world is the recipe's default), in the recipe's world.
    world_flag = "" if config.envs.world == TINY_WORLD else f" --config.envs.world={config.envs.world}"
    rl_command = ("python -m experiments.train --config=configs/qwen.py:tiny-instruct"
                  f"{world_flag} --config.model.path=DIR")
    rows = "\n".join(f"| {kind.split('/')[-1]} | {100 * m['solve_precision']:.2f} | {100 * m['solve_rate']:.2f} | "
                     f"{100 * m['solve_f1']:.2f} |" for kind, m in sorted(ev["by_scenario"].items()))
    return f"""---
license: apache-2.0
library_name: transformers
tags: [tool-use, ftrl_jax]
---
# ftrl_jax tiny instruct policy

A {recipe['model_params'] / 1e6:.2f}M-parameter {recipe['model']['model_type']} model (hidden size
{recipe['model']['hidden_size']}, layers: {recipe['model']['num_layers']}, heads: {recipe['model']['num_heads']}, kv heads:
{recipe['model']['num_kv_heads']}, vocabulary {recipe['model']['vocab_size']}) trained to call tools in the {config.model.template}
format (`<tool_call>` JSON) in the procedural world `{config.envs.world}` of ftrl_jax: a starting point for RL, as instruction-tuned models are
FTRL's (`{rl_command}`). It knows no facts: it is
trained to pick a tool, copy names from the question and from tool results into arguments, chain hops and state
the answer; the held-out scores below say how far it got.

## How it was made
`{recipe['command']}` ({recipe['wall_seconds'] / 60:.1f} min on {recipe['machine']}{recipe.get('wall_note', '')}).

- Data: one oracle conversation (calls, tool results, final answer) per environment for {recipe['num_envs']}
  procedural environments (build seed {config.envs.seed}; {', '.join(_kinds(config))}; complexity
  {config.envs.complexity}), questions from the training side of the fixed question partition only
  (`ftrl_jax/envs/splits.py`); {recipe['dropped_too_long']} longer than {tc.max_len} tokens left out.
- Training: {start}, {tc.num_steps} steps of {tc.batch_size} conversations
  (about {recipe['epochs']:.1f} epochs), cross-entropy on assistant tokens only, AdamW lr {tc.learning_rate:g}
  (cosine, {tc.warmup_steps} warm-up steps), weight decay {tc.weight_decay:g}, gradient norm clip
  {tc.max_grad_norm:g}, float32; exported in bfloat16.
- Tokenizer: {tokenizer}; the {config.model.template} chat template with tools.

## Held-out scores (greedy, this bfloat16 export)
{ev['num_episodes']} held-out environments built as the main job builds its held-out set (build seed
{config.eval.seed}; the `tiny-instruct` preset's seed 0 uses build seed 2 and these 256 environments),
balanced over scenario types, questions never in the training data; at most {config.eval.max_turns} turns of
{config.eval.max_new_tokens} new tokens; Solve-P/R/F1 in % (FTRL's metrics, averaged over scenario types). An
episode without any tool call scores Solve-P 100 and Solve-R 0. How the episodes ended: {ends}.

| scenario | Solve-P | Solve-R | Solve-F1 |
|---|---|---|---|
{rows}
| **average** | **{100 * ev['solve_precision']:.2f}** | **{100 * ev['solve_rate']:.2f}** | **{100 * ev['solve_f1']:.2f}** |

The full figures, the configuration and the training curve's points are in `{main_job.RECIPE_FILE}`.
"""


def pretrain(config, *, command: str = "python -m experiments.pretrain --config=configs/tiny.py") -> dict[str, Any]:
    """Runs the recipe (module docstring); returns the recipe record written to `output/recipe.json`."""
    check_config(config)
    workdir = os.path.abspath(config.workdir)
    output = os.path.abspath(config.output or os.path.join(workdir, "policy"))
    ckpt_dir = os.path.join(workdir, "checkpoints", PHASE)
    if not config.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):  # a step was saved
        raise PretrainError(f"{workdir} already holds a pretraining run's checkpoints: pass --config.resume=True to "
                            "continue it, or choose another --config.workdir")
    _check_output(output, workdir)
    os.makedirs(workdir, exist_ok=True)
    _check_data_settings(config, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    started = time.perf_counter()
    timing_file = os.path.join(workdir, "train_seconds.json")
    earlier = _read_json(timing_file, {"train_seconds": 0.0})["train_seconds"]  # invocations before a resume
    mesh = parallel.make_mesh(jax.device_count(), 1, 1)
    logger = MetricsLogger(workdir)
    tc = config.train
    with Sandbox() as sandbox:
        train, held_out = _environments(config, workdir, sandbox)
        tokenizer = _tokenizer(config, workdir, train)
        model_config, params = _model(config, tokenizer)
        log.info("pretraining a %.2fM-parameter model on %d environments; %d held-out", model_config.num_params / 1e6,
                 len(train), len(held_out))
        curve_envs = held_out[:config.eval.curve_envs]
        encoded: dict[str, Any] = {}

        def examples():
            conversations = warmstart.oracle_conversations(train, sandbox)
            encoded["examples"] = warmstart.encode_conversations(
                conversations, train, tokenizer, template=config.model.template, enable_thinking=False,
                max_len=tc.max_len)
            return encoded["examples"]

        def on_step(step, step_params):
            if step % config.checkpoint.every == 0:  # the time up to the checkpoint a resume continues from
                _write_json(timing_file, {"train_seconds": earlier + time.perf_counter() - started, "step": step})
            if config.eval.every > 0 and curve_envs and (step % config.eval.every == 0 or step == tc.num_steps):
                figures = greedy_eval(config, model_config, step_params, tokenizer, curve_envs, sandbox)
                logger.log(CURVE_PHASE, step, {**{k: figures[k] for k in EVAL_KEYS}, "seconds": figures["seconds"],
                                              "num_envs": len(curve_envs)})
                log.info("step %d: held-out greedy Solve-F1 %.2f%% on %d environments", step,
                         100 * figures["solve_f1"], len(curve_envs))

        params = main_job.train_supervised(
            model_config, params, examples, mesh, logger, phase=PHASE, checkpoint_dir=ckpt_dir,
            num_steps=tc.num_steps, batch_size=tc.batch_size, learning_rate=tc.learning_rate,
            max_grad_norm=tc.max_grad_norm, seed=config.seed, pad_id=main_job._pad_id(tokenizer), remat=False,
            chunk_size=tc.chunk_size, checkpoint_every=config.checkpoint.every, max_len=tc.max_len,
            weight_decay=tc.weight_decay, warmup_steps=tc.warmup_steps, on_step=on_step,
            lr_knob="train.learning_rate", max_len_knob="train.max_len")
        train_seconds = earlier + time.perf_counter() - started
        _write_json(timing_file, {"train_seconds": train_seconds, "step": tc.num_steps})
        if "examples" not in encoded:  # resumed after the last step: count the data for the card
            examples()

        # Written next to the output, then renamed into place: a killed run leaves no half-written policy.
        partial = output + ".partial"
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        models.save_pretrained(model_config, params, partial, dtype="bfloat16")
        tokenizer.save_pretrained(partial)
        exported_config, exported = models.load_pretrained(partial, dtype="float32", compute_dtype="float32")
        held = greedy_eval(config, exported_config, exported, load_tokenizer(partial), held_out, sandbox)

    # One point per step: steps replayed after a resume were logged twice; the later record is the replay's.
    points = {r["step"]: r for r in _read_records(os.path.join(workdir, "metrics.jsonl"))
              if r.get("phase") == CURVE_PHASE and r["step"] <= tc.num_steps}
    curve = [{"step": step, **{k: points[step][k] for k in EVAL_KEYS}} for step in sorted(points)]
    ex = encoded["examples"]
    recipe = {
        "command": command, "world": config.envs.world, "config": json.loads(config.to_json_best_effort()),
        "model": {k: getattr(model_config, k) for k in ("model_type", "vocab_size", "hidden_size",
                                                         "intermediate_size", "num_layers", "num_heads",
                                                         "num_kv_heads", "head_dim")},
        "model_params": model_config.num_params, "num_envs": len(train), "num_examples": len(ex),
        "dropped_too_long": ex.dropped_too_long, "epochs": tc.num_steps * tc.batch_size / max(1, len(ex)),
        "train_tokens": int(sum(len(i) for i in ex.ids)), "train_seconds": train_seconds,
        "wall_seconds": earlier + time.perf_counter() - started,
        "machine": _machine(),
        "held_out": {k: v for k, v in held.items() if k != "episodes"}, "curve": curve,
    }
    if config.init:
        recipe["init"] = _init_label(config)
        recipe["init_recipe"] = _read_json(os.path.join(_init_dir(config), main_job.RECIPE_FILE), None)
    _write_json(os.path.join(partial, main_job.RECIPE_FILE), recipe)
    with open(os.path.join(partial, "README.md"), "w") as f:
        f.write(_card(config, recipe))
    if os.path.isdir(output):
        shutil.rmtree(output)  # a policy directory this recipe wrote before (checked by _check_output)
    os.replace(partial, output)
    logger.close()
    return recipe


def _check_output(output: str, workdir: str) -> None:
    """Refuses an output that would overwrite something other than a policy this recipe wrote."""
    if output == workdir or workdir.startswith(output.rstrip(os.sep) + os.sep):
        raise PretrainError(f"--output={output} is or contains the run directory {workdir}; choose a new directory")
    if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, main_job.RECIPE_FILE)):
        raise PretrainError(f"--output={output} is a non-empty directory that holds no {main_job.RECIPE_FILE} (not a "
                            "policy written by this recipe); choose a new or empty directory")
    if os.path.exists(output) and not os.path.isdir(output):
        raise PretrainError(f"--output={output} is a file; choose a directory")


def _read_json(path: str, default: Any) -> Any:
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _machine() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{os.cpu_count()} CPU cores"
    return f"{jax.device_count()} x {device.device_kind}"


__all__ = ["PretrainError", "check_config", "greedy_eval", "pretrain"]
