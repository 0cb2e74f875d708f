"""Training configs: `--config=configs/qwen.py[:PRESET]`.

No preset means `tiny`, the embedded default that runs end to end on a CPU in about 15 minutes: procedural
environments in the pool-8 world (8 recurring names per type), and RL from the shipped `tiny-pool8` policy
(`ftrl_jax/policies/tiny_pool8`, the tiny model warm-started on oracle conversations of that world) with its own
tokenizer, as FTRL starts from instruction-tuned models: 32 steps on each environment's first turn, trained on
groups whose prompt's greedy turn fails while a sample succeeds. `--config.warmup.num_steps=N` trains the `tiny`
model from scratch instead (random initialisation, the embedded tokenizer, N warm-start steps on oracle
trajectories). `tiny-pool8` is the same recipe for 64 steps (28-34 minutes a seed on 2 CPU cores), the one the
README's three-seed table ran. `tiny-instruct` is the earlier default: RL from the shipped `tiny-instruct` policy
in the tiny world (256 names per type) on the policy's own episodes, all parameters. The other presets carry the
FTRL paper's settings and need `--config.model.path=DIR` (a local Hugging Face checkpoint directory). Every
field can be overridden on the command line, e.g. `--config.rl.num_steps=4 --config.mesh.data=2`.
"""

from __future__ import annotations

import ml_collections

from ftrl_jax import policies
from ftrl_jax.envs.world import TINY_WORLD

# Paper presets: (model preset whose shape the checkpoint must have, chat template, thinking mode).
PAPER_PRESETS = {
    "qwen2.5-7b": ("qwen2.5-7b", "qwen2.5", False),
    "qwen2.5-14b": ("qwen2.5-14b", "qwen2.5", False),
    "qwen3-8b": ("qwen3-8b", "qwen3", False),
    "qwen3-8b-thinking": ("qwen3-8b", "qwen3", True),
    "qwen3-14b": ("qwen3-14b", "qwen3", False),
}
# The tiny model in the pool-8 world, from the shipped `tiny-pool8` policy, with RL on first turns where greedy fails:
# the default (`tiny`, 32 steps) and the 64-step preset.
TINY_POOL8 = policies.TINY_POOL8
POOL8_WORLD = "pool=8,relations=12,fixed_names=1"
# The earlier default: RL from the shipped `tiny-instruct` policy in the tiny world.
TINY_INSTRUCT = policies.TINY_INSTRUCT
PRESETS = ("tiny", TINY_POOL8, TINY_INSTRUCT) + tuple(PAPER_PRESETS)


def _base() -> ml_collections.ConfigDict:
    """Every setting, with the values every preset starts from: as a whole, the `tiny-instruct` preset (whose
    workdir is `runs/tiny-instruct`)."""
    c = ml_collections.ConfigDict()
    c.preset = "tiny"
    c.workdir = "runs/tiny"
    c.seed = 0
    c.resume = False

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"        # architecture when no checkpoint path is given
    # ModelConfig fields replaced on the preset, e.g. "num_layers=2,hidden_size=128". Full multi-head attention
    # (4 kv heads) copies arguments from the question better than the preset's single kv head.
    c.model.overrides = "num_kv_heads=4"
    # A local Hugging Face checkpoint directory, or a shipped policy's name (ftrl_jax/policies). With
    # warmup.num_steps > 0 the tiny presets ignore the shipped start and train model.preset from scratch.
    c.model.path = policies.TINY_INSTRUCT
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"      # compute dtype; bfloat16 on accelerators
    c.model.template = "qwen2.5"   # chat template: qwen2.5 | qwen3
    c.model.enable_thinking = False
    c.model.remat = False          # recompute activations in backward (on for large models)

    c.tokenizer = ml_collections.ConfigDict()
    # The embedded tokenizer (training from scratch only; a checkpoint brings its own), as the shipped policy's.
    c.tokenizer.vocab_size = 8192
    c.tokenizer.pretokenizer = "stable_names"  # qwen2 | stable_names (text/tokenizer.py)

    c.envs = ml_collections.ConfigDict()
    c.envs.author = "procedural"
    c.envs.num_train = 512
    c.envs.num_eval = 256            # held-out, balanced over the four scenario types
    c.envs.scenarios = "single_hop,parallel_single_hop,multi_hop,parallel_multi_hop"
    c.envs.complexity = "low"
    # The shipped policy's world (256 recurring names per type, 12 relations, one tool name per relation), which a
    # 5M-parameter model learns to copy names in; "" is the full world (FTRL-like variety).
    c.envs.world = TINY_WORLD
    c.envs.train_file = ""         # optional sample-format file instead of building
    c.envs.eval_file = ""
    c.envs.validation_file = ""    # optional sample-format file of validation environments (eval.validation_envs)

    c.warmup = ml_collections.ConfigDict()
    c.warmup.num_steps = 0         # N > 0: train the tiny model from scratch, N supervised steps, then RL
    c.warmup.batch_size = 8
    c.warmup.learning_rate = 3e-3
    c.warmup.max_len = 768
    c.warmup.fraction_of_envs = 0.5  # oracle trajectories of this share of train envs (leaves room for RL)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_turns = 6          # low-complexity plans need at most 3 turns; the paper presets use 20
    c.rollout.max_new_tokens = 96
    c.rollout.max_prompt_tokens = 1024
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0

    c.rl = ml_collections.ConfigDict()
    # advantage estimator: grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | any registered name;
    # rft: rejection-sampling fine-tuning (cross-entropy on the successful samples; no ratio, clip, KL)
    c.rl.algorithm = "grpo"
    c.rl.mode = "step"             # step: FTRL's per-turn prompts; trajectory: whole multi-turn episodes
    # tiny-instruct: 10 steps of 16 prompts x 8 rollouts, 13-46 s a step on 2 CPU cores (a prompt collection
    # included), the whole job with its two 256-environment evaluations 7.7 minutes (15.5 on a slower machine).
    c.rl.num_steps = 10
    c.rl.prompts_per_step = 16
    c.rl.num_rollouts = 8          # group size n
    c.rl.refresh_every = 4         # collect fresh RL prompts every k steps
    # Step mode's prompts: policy (FTRL's: states of episodes the current policy plays) | oracle (states along
    # each environment's oracle plan, where the next turn can still succeed) | initial (each environment's fresh
    # question only, every prompt drawn at most once per collection)
    c.rl.prompt_source = "policy"
    # Step mode with dynamic sampling: none | greedy_fails (groups kept for their rewards are rejected when their
    # prompt's greedy turn already earns success_threshold; with dynamic_sampling_require_success the batch then
    # holds groups where greedy fails and a sample succeeds, and filler when too few are found; the greedy turns
    # run on a second decode copy of the weights)
    c.rl.prompt_filter = "none"
    # The n turns of a step-mode prompt, or the n episodes of a trajectory-mode environment, share one copy of the
    # prompt (the episode's first prompt) in the log-prob passes and the update (the same update as n full rows,
    # for a fraction of the tokens); prompts_per_step must then divide into mini-batches x micro-batches x mesh rows.
    c.rl.shared_prompt = True
    c.rl.reward_kind = "f1"        # f1 | precision | rate | pr | f1_no_format_penalty | f1_half_format_penalty
    # ftrl: FTRL's reward exactly (ftrl_jax/envs/ftrl_reward.py); strict: its flaws fixed; lenient: this
    # project's earlier reward (the product parser)
    c.rl.reward_semantics = "ftrl"
    c.rl.learning_rate = 5e-5
    # Over RL's num_steps x num_minibatches optimizer updates: constant | cosine (decays towards 0, which it would
    # reach one update after the last), after lr_warmup_steps updates of linear warmup from 0 (the first at rate 0)
    c.rl.lr_schedule = "constant"
    c.rl.lr_warmup_steps = 0
    c.rl.weight_decay = 0.0
    c.rl.max_grad_norm = 1.0
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.2
    c.rl.dual_clip = 3.0
    c.rl.kl_coef = 0.01           # the paper's 0.001 let the tiny policy drift into answering without tools
    c.rl.kl_estimator = "low_var_kl"
    c.rl.entropy_coef = 0.001
    # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm (Dr. GRPO's)
    c.rl.aggregation = "seq-mean-token-mean"
    # DAPO's dynamic sampling: sample more prompts until prompts_per_step groups have differing rewards (and, with
    # require_success, a success), at most max_sampling_rounds rounds of prompts_per_step prompts per step.
    c.rl.dynamic_sampling = False
    c.rl.dynamic_sampling_require_success = False
    c.rl.max_sampling_rounds = 4
    c.rl.success_threshold = 1.0   # a success: reward >= this (RFT's filter, dynamic sampling's require_success)
    # Parameters that train: all | mlp | lower_mlp (MLPs of the lower third of the layers) | attention | a regex
    # over per-layer paths such as layers/0/mlp/down_proj/kernel (training/optim.py)
    c.rl.trainable = "all"
    c.rl.num_minibatches = 1
    c.rl.num_microbatches = 1
    c.rl.chunk_size = 128

    c.eval = ml_collections.ConfigDict()
    c.eval.max_turns = 6
    c.eval.max_new_tokens = 96
    # Besides the greedy headline (every held-out environment once), before and after RL; 0 turns a part off.
    c.eval.num_samples = 2         # k episodes per held-out environment at the rollout temperature: mean, best of k
    c.eval.sampled_envs = 32       # ... on the first n held-out environments (balanced over types; 0: all of them)
    c.eval.num_train_envs = 4      # greedy Solve-F1 on the first n RL training environments (train/held-out gap)
    c.eval.curve_every = 5         # held-out greedy Solve-F1 every n RL steps for learning_curves.png
    c.eval.curve_envs = 16         # ... on the first n held-out environments (a fixed subset)
    # Checkpoint selection without the held-out set: greedy Solve-F1 on validation_envs training-side environments
    # RL never draws (WORKDIR/envs/validation.jsonl, balanced over types), before RL, every validation_every RL
    # steps and after the last. select: last (the last step's policy is evaluated and exported) | validation (the
    # best validation step's, the earliest of ties, the start included; pipeline/selection.py).
    c.eval.validation_envs = 0
    c.eval.validation_every = 10
    c.eval.select = "last"
    # Paired percentile bootstrap of after - before per held-out environment, within scenario types.
    c.eval.bootstrap_resamples = 10_000
    c.eval.bootstrap_seed = 0
    c.eval.confidence = 0.95

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.distributed = False     # call jax.distributed.initialize() first (multi-host)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 3
    return c


def _tiny() -> ml_collections.ConfigDict:
    """`tiny`, the embedded default: the shipped `tiny-pool8` policy in its world of 8 names per type
    (ftrl_jax/policies/tiny_pool8/README.md), 32 RL steps on each environment's first turn, training only on
    groups whose prompt's greedy turn fails and a sample succeeds (the greedy-fails filter with dynamic sampling;
    filler groups when fewer are found), at temperature 0.7, lr 2e-4, the lower third's MLPs only. The README's
    "Status of the main job" gives its three seeds."""
    c = _base()
    c.model.path = policies.TINY_DEFAULT
    c.envs.world = POOL8_WORLD
    c.rollout.temperature = 0.7
    c.rl.num_steps = 32
    c.rl.learning_rate = 2e-4
    c.rl.trainable = "lower_mlp"
    c.rl.prompt_source = "initial"
    c.rl.dynamic_sampling = True
    c.rl.dynamic_sampling_require_success = True
    c.rl.prompt_filter = "greedy_fails"
    c.rl.max_sampling_rounds = 4
    # Held-out greedy Solve-F1 on the first 32 held-out environments after step 16 (the curve's middle point),
    # and the sampled evaluation on the first 16 (2 samples each): the job then fits 15 minutes on 2 CPU cores.
    c.eval.curve_every = 16
    c.eval.curve_envs = 32
    c.eval.sampled_envs = 16
    return c


def _tiny_pool8() -> ml_collections.ConfigDict:
    """`tiny-pool8`: the default's recipe for 64 steps, with one 256-environment held-out evaluation after step 32
    for the curve, and the sampled and training-set evaluations off. The README's "RL on first turns where greedy
    fails" gives its three seeds (28-34 minutes each on 2 CPU cores)."""
    c = _tiny()
    c.workdir = f"runs/{TINY_POOL8}"
    c.rl.num_steps = 64
    c.eval.num_samples = 0
    c.eval.num_train_envs = 0
    c.eval.curve_every = 32
    c.eval.curve_envs = 256
    c.eval.sampled_envs = 32     # unused with num_samples=0; the value of the runs the README reports
    return c


def _tiny_instruct() -> ml_collections.ConfigDict:
    """`tiny-instruct`, the earlier default: the shipped `tiny-instruct` policy in the tiny world (256 names per
    type), 10 GRPO steps of 16 prompts x 8 rollouts on states of the policy's own episodes, all parameters,
    temperature 1, lr 5e-5 (held-out greedy Solve-F1 did not move; README, "The earlier default
    (`tiny-instruct`), by seed")."""
    c = _base()
    c.workdir = f"runs/{TINY_INSTRUCT}"
    return c


def _paper(name: str) -> ml_collections.ConfigDict:
    """The FTRL paper's RL settings (Sec. 4 / appendix): 512 prompts x 16 rollouts, lr 1e-6."""
    arch, template, thinking = PAPER_PRESETS[name]
    c = _base()
    c.preset = name
    c.workdir = f"runs/{name}"
    c.model.preset = arch
    c.model.path = ""  # required: --config.model.path=/path/to/hf/checkpoint
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.template = template
    c.model.enable_thinking = thinking
    c.model.remat = True
    c.model.overrides = ""
    c.envs.num_train = 2048
    c.envs.num_eval = 200
    c.envs.complexity = "high"
    c.envs.world = ""
    c.warmup.num_steps = 0  # real instruction-tuned checkpoints already call tools
    c.rollout.max_new_tokens = 8192 if thinking else 1024
    c.rollout.max_prompt_tokens = 8192
    c.rl.num_steps = 200
    c.rl.prompts_per_step = 512
    c.rl.num_rollouts = 16
    c.rl.refresh_every = 1
    c.rl.learning_rate = 1e-6
    c.rl.kl_coef = 0.001
    c.rl.entropy_coef = 0.001
    c.rl.num_minibatches = 4
    c.rl.num_microbatches = 16
    c.eval.max_new_tokens = c.rollout.max_new_tokens
    c.eval.sampled_envs = 0        # every held-out environment
    c.eval.num_train_envs = 16
    c.eval.curve_every = 10
    c.rollout.max_turns = 20
    c.eval.max_turns = 20
    c.checkpoint.every = 20
    return c


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """`tiny` (default), `tiny-pool8`, `tiny-instruct` or one of the paper presets; an unknown name is an error
    listing them."""
    name = (preset or "tiny").strip()
    if name == "tiny":
        return _tiny()
    if name == TINY_POOL8:
        return _tiny_pool8()
    if name == TINY_INSTRUCT:
        return _tiny_instruct()
    if name not in PAPER_PRESETS:
        raise ValueError(f"unknown config preset {name!r}; available: {', '.join(PRESETS)}")
    return _paper(name)
