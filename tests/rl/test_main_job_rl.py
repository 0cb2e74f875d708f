"""The main job's RL sampling and scoring without a model: a truncated turn gets in RL the reward evaluation
gives it (both RL modes), dynamic sampling's rounds, and the objective each `rl.algorithm` selects."""

import numpy as np
import pytest

from configs import qwen
from ftrl_jax.envs.samples import decode_sample
from ftrl_jax.envs.sandbox import Sandbox
from ftrl_jax.pipeline import main_job
from ftrl_jax.rollout.episodes import GeneratedTurn
from ftrl_jax.rollout.evaluation import evaluate
from tests.envs.test_rewards import calls, make_sample

SOLVING_CALL = calls(("lake_finder", {"shape": "crescent"}), end="")


class ScriptedPolicy:
    """Greedy stand-in for `LocalPolicy`: every conversation gets the same turn."""

    temperature = 0.0

    def __init__(self, text, truncated):
        self.text, self.truncated = text, truncated

    def __call__(self, conversations):
        return [GeneratedTurn(self.text, [1, 2], [3], [-0.5], self.truncated) for _ in conversations]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout=5.0) as box:
        yield box


def _config(**rl):
    config = qwen.get_config(qwen.TINY_INSTRUCT)
    config.rl.num_rollouts = 2
    config.rl.prompts_per_step = 2
    config.rollout.max_turns = 1
    for key, value in rl.items():
        config.rl[key] = value
    return config


@pytest.mark.parametrize("truncated", [False, True])
def test_step_mode_scores_a_truncated_turn_as_evaluation_plays_it(sandbox, truncated):
    sample = decode_sample(make_sample())
    policy = ScriptedPolicy(SOLVING_CALL, truncated)
    _, scores = main_job._sample_step_groups(_config(), policy, [sample], sandbox)
    episode = evaluate(policy, [sample], max_turns=1, sandbox=sandbox).episodes[0]
    if truncated:
        # Evaluation ran no call (Solve-F1 0); the step reward is the no-call rule's, not the call's 1.0.
        assert episode["num_calls"] == 0 and episode["end_reason"] == "truncated"
        np.testing.assert_allclose(scores, [-0.3, -0.3])
    else:
        assert episode["num_calls"] == 1 and episode["num_solved"] == 1
        np.testing.assert_allclose(scores, [1.0, 1.0])


@pytest.mark.parametrize("truncated", [False, True])
def test_trajectory_mode_reward_is_the_evaluation_solve_f1(sandbox, truncated):
    sample = decode_sample(make_sample())
    policy = ScriptedPolicy(SOLVING_CALL, truncated)
    episodes, scores = main_job._sample_trajectory_groups(_config(mode="trajectory"), policy, [sample], sandbox)
    evaluated = evaluate(policy, [sample], max_turns=1, sandbox=sandbox).episodes[0]
    assert len(episodes) == 2
    np.testing.assert_allclose(scores, [evaluated["solve_f1"]] * 2)
    # 4 answers expected; the whole call solves one: 2 * 1 / (1 + 4). Cut, it is not a call made: 0.
    assert evaluated["solve_f1"] == pytest.approx(0.0 if truncated else 2 / 5)


def _draws(rounds):
    """`draw(round)` returning scripted group-major rewards, and the rounds it was asked for."""
    asked = []

    def draw(round_index):
        asked.append(round_index)
        scores = np.asarray(rounds[round_index], np.float32)
        return [f"r{round_index}i{i}" for i in range(scores.size)], scores

    return draw, asked


def test_without_dynamic_sampling_one_round_is_the_batch():
    draw, asked = _draws([[0.0, 0.0, 1.0, 1.0]])
    items, scores, stats = main_job._collect_groups(_config(), draw)
    assert asked == [0] and stats == {} and items == ["r0i0", "r0i1", "r0i2", "r0i3"]


def test_dynamic_sampling_draws_rounds_until_the_batch_is_full():
    rounds = [[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.5], [0.0, 1.0, 0.0, 1.0]]
    draw, asked = _draws(rounds)
    items, scores, stats = main_job._collect_groups(_config(dynamic_sampling=True), draw)
    assert asked == [0, 1, 2]
    assert items == ["r0i2", "r0i3", "r2i0", "r2i1"]
    assert (stats["groups_drawn"], stats["groups_kept"], stats["groups_filler"]) == (6, 2, 0)
    # Out of rounds: rejected groups fill the batch, so its shape never changes.
    draw, asked = _draws(rounds)
    items, _, stats = main_job._collect_groups(
        _config(dynamic_sampling=True, dynamic_sampling_require_success=True, max_sampling_rounds=2), draw)
    assert asked == [0, 1] and items == ["r0i2", "r0i3", "r0i0", "r0i1"] and stats["groups_filler"] == 1


def test_rft_selects_the_supervised_loss_without_kl_or_entropy():
    rft = main_job._loss_config(_config(algorithm="rft"))
    assert (rft.policy_loss, rft.kl_coef, rft.entropy_coef) == ("nll", 0.0, 0.0)
    grpo = main_job._loss_config(_config())
    assert (grpo.policy_loss, grpo.kl_coef, grpo.entropy_coef) == ("ppo_clip", 0.01, 0.001)
    assert grpo.norm_length == 96  # Dr. GRPO's constant: the step-mode generation budget


def test_check_config_rejects_bad_new_options():
    for key, value, message in (("max_sampling_rounds", 0, "max_sampling_rounds=0"),
                                ("trainable", "[", "config.rl.trainable='\\['"),
                                ("aggregation", "seq-sum", "config.rl.aggregation='seq-sum'"),
                                ("kl_estimator", "bogus", "kl_estimator='bogus' is unknown"),
                                ("clip_low", -0.1, "clip_low")):
        config = _config(**{key: value})
        with pytest.raises(main_job.TrainingError, match=message):
            main_job.check_config(config)


@pytest.mark.parametrize("preset", [qwen.TINY_INSTRUCT, "qwen2.5-7b"])
def test_new_options_default_to_the_previous_behaviour(preset):
    # The options are off wherever a preset does not choose them: the earlier default and FTRL's settings.
    rc = qwen.get_config(preset).rl
    assert (rc.algorithm, rc.reward_kind, rc.aggregation, rc.trainable) == ("grpo", "f1", "seq-mean-token-mean", "all")
    assert rc.dynamic_sampling is False and rc.dynamic_sampling_require_success is False
    assert rc.prompt_filter == "none" and rc.prompt_source == "policy"


def test_greedy_solved_marks_prompts_whose_greedy_turn_succeeds(sandbox):
    sample = decode_sample(make_sample())
    solved = main_job.greedy_solved(_config(), ScriptedPolicy(SOLVING_CALL, False), [sample, sample], sandbox)
    np.testing.assert_array_equal(solved, [True, True])
    wrong = calls(("lake_finder", {"shape": "square"}), end="")
    assert not main_job.greedy_solved(_config(), ScriptedPolicy(wrong, False), [sample], sandbox).any()
    # A cut turn runs no call, as in evaluation: not a success.
    assert not main_job.greedy_solved(_config(), ScriptedPolicy(SOLVING_CALL, True), [sample], sandbox).any()


def test_prompt_filter_keeps_only_eligible_groups():
    rounds = [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]

    def draw(round_index):
        scores = np.asarray(rounds[round_index], np.float32)
        # The first prompt of every round has a greedy turn that already succeeds.
        return [f"r{round_index}i{i}" for i in range(scores.size)], scores, np.array([False, True])

    items, _, stats = main_job._collect_groups(
        _config(dynamic_sampling=True, prompt_filter="greedy_fails", max_sampling_rounds=2), draw)
    # The one eligible mixed group, then filler: the group rejected for its rewards before an ineligible one.
    assert items == ["r0i2", "r0i3", "r1i2", "r1i3"]
    assert (stats["groups_ineligible"], stats["groups_kept"], stats["groups_filler"]) == (2, 1, 1)
    assert stats["groups_filler_ineligible"] == 0


def test_greedy_check_runs_only_where_the_rewards_would_keep_the_group(sandbox):
    sample = decode_sample(make_sample())
    asked = []

    class Recording(ScriptedPolicy):
        def __call__(self, conversations):
            asked.append(len(conversations))
            return super().__call__(conversations)

    config = _config(dynamic_sampling=True, prompt_filter="greedy_fails", dynamic_sampling_require_success=True)
    scores = np.asarray([0.0, 0.0, 0.0, 1.0, -0.3, 0.0], np.float32)  # groups: none, a success, failures only
    eligible = main_job._eligible_groups(config, Recording(SOLVING_CALL, False), [sample] * 3, scores, sandbox)
    assert asked == [1] and eligible.tolist() == [True, False, True]
    asked.clear()
    assert main_job._eligible_groups(config, Recording(SOLVING_CALL, False), [sample] * 3, np.zeros(6),
                                     sandbox).all() and asked == []


def test_prompt_filter_needs_step_mode_with_dynamic_sampling():
    for rl, message in (({"prompt_filter": "greedy"}, "prompt_filter='greedy'; use one of"),
                        ({"prompt_filter": "greedy_fails"}, "--config.rl.dynamic_sampling=True"),
                        ({"prompt_filter": "greedy_fails", "dynamic_sampling": True, "mode": "trajectory"},
                         "--config.rl.mode=step")):
        with pytest.raises(main_job.TrainingError, match=message):
            main_job.check_config(_config(**rl))
    main_job.check_config(_config(prompt_filter="greedy_fails", dynamic_sampling=True))
