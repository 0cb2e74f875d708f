"""Dynamic sampling (DAPO sec. 3.2): the group filter and the batch filled over sampling rounds."""

import numpy as np
import pytest

from ftrl_jax.rl.dynamic_sampling import GroupCollector, informative_groups

# Groups of 3: all equal, mixed among failures, mixed with a success, all successes.
REWARDS = [0.0, 0.0, 0.0, -0.3, 0.0, 0.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0]


def test_keeps_groups_whose_rewards_differ():
    np.testing.assert_array_equal(informative_groups(REWARDS, 3), [False, True, True, False])


def test_require_success_also_needs_a_reward_at_the_threshold():
    np.testing.assert_array_equal(informative_groups(REWARDS, 3, require_success=True), [False, False, True, False])
    np.testing.assert_array_equal(
        informative_groups(REWARDS, 3, require_success=True, success_threshold=0.0), [False, True, True, False])


def test_groups_of_one_are_kept_unless_a_success_is_required():
    np.testing.assert_array_equal(informative_groups([0.0, 1.0, 0.2], 1), [True, True, True])
    np.testing.assert_array_equal(informative_groups([0.0, 1.0, 0.2], 1, require_success=True), [False, True, False])


def test_rewards_that_do_not_split_into_groups_are_an_error():
    with pytest.raises(ValueError, match="group-major"):
        informative_groups(REWARDS, 5)


def _round(tag, rewards, group_size=3):
    return [f"{tag}{i}" for i in range(len(rewards))], rewards


def test_collector_fills_the_batch_with_informative_groups_in_the_order_drawn():
    collector = GroupCollector(num_groups=2, group_size=3)
    assert not collector.add(*_round("a", REWARDS[:6]))  # one informative group (the second)
    assert collector.add(*_round("b", REWARDS[6:] + [0.0, 2.0, 0.0]))  # two more: full
    items, scores = collector.batch()
    assert items == ["a3", "a4", "a5", "b0", "b1", "b2"]
    np.testing.assert_array_equal(scores, np.asarray(REWARDS[3:9], np.float32))
    assert collector.stats() == {"groups_drawn": 5.0, "groups_kept": 3.0, "groups_ineligible": 0.0,
                                 "groups_filler": 0.0, "groups_filler_ineligible": 0.0, "sampling_rounds": 2.0,
                                 "reward_mean_drawn": pytest.approx(float(np.mean(REWARDS + [0.0, 2.0, 0.0])))}


def test_collector_fills_with_rejected_groups_when_the_rounds_run_out():
    collector = GroupCollector(num_groups=3, group_size=3, require_success=True)
    collector.add(*_round("a", REWARDS))  # only the third group holds a success
    items, scores = collector.batch()
    assert items == ["a6", "a7", "a8", "a0", "a1", "a2", "a3", "a4", "a5"]
    assert scores.shape == (9,)
    assert collector.stats()["groups_kept"] == 1.0 and collector.stats()["groups_filler"] == 2.0


def test_collector_errors():
    with pytest.raises(ValueError, match="num_groups >= 1"):
        GroupCollector(num_groups=0, group_size=2)
    collector = GroupCollector(num_groups=3, group_size=2)
    with pytest.raises(ValueError, match="3 items for 4 rewards"):
        collector.add(["x"] * 3, [0.0, 1.0, 0.0, 1.0])
    collector.add(["x"] * 2, [0.0, 1.0])
    with pytest.raises(ValueError, match="only 1 groups were drawn for a batch of 3"):
        collector.batch()


def test_ineligible_groups_are_rejected_whatever_their_rewards_and_fill_last():
    collector = GroupCollector(num_groups=3, group_size=3)
    # Groups 1 and 2 differ; group 2 (with a success) is ineligible (say, its greedy turn already succeeds).
    assert not collector.add(*_round("a", REWARDS), eligible=[True, True, False, True])
    items, _ = collector.batch()
    # The kept group, then groups rejected for their rewards; the ineligible group only if nothing else is left.
    assert items == ["a3", "a4", "a5", "a0", "a1", "a2", "a9", "a10", "a11"]
    assert collector.stats()["groups_ineligible"] == 1.0 and collector.stats()["groups_filler_ineligible"] == 0.0
    short = GroupCollector(num_groups=4, group_size=3)
    short.add(*_round("a", REWARDS), eligible=[True, True, False, True])
    assert short.batch()[0][-3:] == ["a6", "a7", "a8"] and short.stats()["groups_filler_ineligible"] == 1.0
    with pytest.raises(ValueError, match="eligibility for 2 groups, rewards for 4"):
        collector.add(*_round("b", REWARDS), eligible=[True, True])
