"""The synthetic world: consistent facts, valid chains, names fit for questions and answers."""

import random

import pytest

from ftrl_jax.envs import world as world_lib


def test_facts_are_a_pure_function_of_seed_relation_and_subject():
    a, b = world_lib.World(seed=7), world_lib.World(seed=7)
    for relation in world_lib.RELATIONS:
        assert a.fact(relation, "Kelvora") == b.fact(relation, "Kelvora")
    other = world_lib.World(seed=8)
    differing = sum(a.fact(r, "Kelvora") != other.fact(r, "Kelvora") for r in world_lib.RELATIONS)
    assert differing > 0.8 * len(world_lib.RELATIONS)


def test_facts_have_the_target_type_of_their_relation():
    world = world_lib.World(0)
    capital = world.fact("capital", "Lodrania")
    assert capital and capital != world.fact("capital", "Mirrowland")
    assert world.fact("birth_year", "Ada Quill").isdigit()
    assert world.fact("mountain_height", "Mount Sorin").endswith(" meters")
    date = world.fact("birth_date", "Ada Quill")
    assert len(date.split("-")) == 3


def test_follow_chains_answers_into_the_next_subject():
    world = world_lib.World(3)
    answers = world.follow("Ada Quill", ["birth_city", "city_country", "capital"])
    assert answers[0] == world.fact("birth_city", "Ada Quill")
    assert answers[1] == world.fact("city_country", answers[0])
    assert answers[2] == world.fact("capital", answers[1])


def test_schema_is_rich_enough():
    assert len(world_lib.ENTITY_TYPES) >= 20
    assert len(world_lib.RELATIONS) >= 80
    assert len({r.target for r in world_lib.RELATIONS.values() if not r.chains}) >= 20  # attribute kinds
    for type_key, relations in world_lib.RELATIONS_BY_SUBJECT.items():
        assert relations, f"entity type {type_key} has no relation"
    params = [t.param for t in world_lib.ENTITY_TYPES.values()]
    assert len(params) == len(set(params))
    # Field labels repeat across types ("founding_year") but map back to one relation per type.
    assert len(world_lib.RELATION_BY_FIELD) == len(world_lib.RELATIONS)
    assert world_lib.RELATION_BY_FIELD[("city", "founding_year")].key == "city_founded"
    assert world_lib.RELATION_BY_FIELD[("company", "founding_year")].key == "company_founded"


def test_names_never_contain_the_parallel_answer_separator():
    rng = random.Random(0)
    world = world_lib.World(0)
    for type_key in world_lib.ENTITY_TYPES:
        for _ in range(50):
            name = world.entity(type_key, rng)
            assert ", " not in name and name.strip() == name and name
    for relation in world_lib.RELATIONS:
        assert ", " not in world.fact(relation, "Kelvora")


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_sample_chain_links_types_without_repeats(hops):
    rng = random.Random(hops)
    for _ in range(200):
        chain = world_lib.sample_chain(rng, hops)
        assert len(chain) == hops
        for left, right in zip(chain, chain[1:]):
            assert left.chains and left.target == right.subject
        visited = [chain[0].subject] + [r.target for r in chain if r.chains]
        assert len(visited) == len(set(visited))


def test_sample_chain_respects_avoided_types_and_rejects_bad_lengths():
    rng = random.Random(1)
    avoid = {"person", "city"}
    for _ in range(100):
        chain = world_lib.sample_chain(rng, 2, avoid_types=avoid)
        assert not {chain[0].subject} & avoid
        assert not {r.target for r in chain if r.chains} & avoid
    with pytest.raises(ValueError, match="hops must be at least 1"):
        world_lib.sample_chain(rng, 0)
    with pytest.raises(ValueError, match="no chain of 40 hops"):
        world_lib.sample_chain(rng, 40)


def test_relation_phrases_read_as_noun_phrases():
    for relation in world_lib.RELATIONS.values():
        for phrase in relation.phrases:
            assert phrase.startswith("the "), (relation.key, phrase)
            assert phrase.count("{x}") == 1
