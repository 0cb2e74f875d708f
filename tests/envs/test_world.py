"""The synthetic world: consistent facts, valid chains, names fit for questions and answers."""

import random
import re

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


# --- world spec: entity pools, relation subsets ------------------------------------------

def test_world_spec_parses_its_text_form_and_names_bad_parts():
    spec = world_lib.WorldSpec.parse("pool=40, relations=12, fixed_names=1")
    assert spec == world_lib.WorldSpec(entity_pool=40, relations=12, fixed_tool_names=True)
    assert world_lib.WorldSpec.parse(str(spec)) == spec
    keyed = world_lib.WorldSpec.parse("relations=capital+birth_city,seed=3,pool=8")
    assert keyed.relations == ("capital", "birth_city") and keyed.seed == 3
    assert world_lib.WorldSpec.parse(str(keyed)) == keyed
    for text in ("", "full", "default"):
        assert world_lib.WorldSpec.parse(text) == world_lib.WorldSpec()
    assert str(world_lib.WorldSpec()) == "full"
    bad = {"size=3": "cannot read world spec part 'size=3'", "pool=x": "pool='x'",
           "pool=1": "entity_pool must be an integer >= 2", "relations=0": "relations must be a count in 1..",
           "relations=capital+moon": "unknown: ['moon']", "fixed_names=maybe": "fixed_names='maybe'"}
    for text, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            world_lib.WorldSpec.parse(text)


def test_entity_pools_are_seeded_and_distinct_across_types():
    pools = world_lib.entity_pools(24, seed=0)
    assert set(pools) == set(world_lib.ENTITY_TYPES)
    assert all(len(pool) == 24 for pool in pools.values())
    assert pools == world_lib.entity_pools(24, seed=0)
    assert pools != world_lib.entity_pools(24, seed=1)
    names = [n.lower() for pool in pools.values() for n in pool]
    # No name equals or hides inside another, of any type, so matching a name cannot hit a wrong one.
    for i, name in enumerate(names):
        assert not any(name in other for other in names[:i] + names[i + 1:]), name


def test_pooled_world_draws_names_from_its_pool_and_keeps_facts_pure():
    spec = world_lib.WorldSpec(entity_pool=8)
    world, again = world_lib.World(3, spec), world_lib.World(3, spec)
    rng = random.Random(0)
    drawn = [world.entity("city", rng) for _ in range(200)]
    assert set(drawn) == set(world.pools["city"])  # 200 draws from 8 names: each recurs
    for relation in ("birth_city", "capital", "mayor", "city_population"):
        for subject in world.pools[world_lib.RELATIONS[relation].subject]:
            assert world.fact(relation, subject) == again.fact(relation, subject)
            if world_lib.RELATIONS[relation].chains:
                assert world.fact(relation, subject) in world.pools[world_lib.RELATIONS[relation].target]
    # Same pool, another fact seed: names are shared, facts are not.
    other = world_lib.World(4, spec)
    assert other.pools == world.pools
    assert [other.fact("capital", c) for c in world.pools["country"]] != \
        [world.fact("capital", c) for c in world.pools["country"]]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 12, 30])
def test_relation_subsets_are_seeded_connected_and_keep_multi_hop_chains(count):
    keys = world_lib.choose_relations(count, seed=0)
    assert len(keys) == count == len(set(keys)) and set(keys) <= set(world_lib.RELATIONS)
    assert keys == world_lib.choose_relations(count, seed=0)
    assert any(world_lib.choose_relations(count, seed=s) != keys for s in (1, 2, 3))
    world = world_lib.World(0, world_lib.WorldSpec(relations=count))
    assert tuple(world.relations) == keys
    # Chain-friendly relations come first: a spine of min(count // 2, 4) chaining hops plus a value.
    assert world.longest_chain() >= min(count // 2, 4) + (count >= 2)
    rng = random.Random(count)
    for hops in range(1, world.longest_chain() + 1):
        for _ in range(40):
            chain = world.sample_chain(rng, hops)
            assert len(chain) == hops and all(r.key in keys for r in chain)
            for left, right in zip(chain, chain[1:]):
                assert left.chains and left.target == right.subject


def test_small_world_refuses_chains_longer_than_its_relations_allow():
    world = world_lib.World(0, world_lib.WorldSpec(relations=("capital", "city_population")))
    assert world.longest_chain() == 2
    assert world.reach()["country"] == 2 and world.reach()["city"] == 1 and world.reach()["person"] == 0
    assert [r.key for r in world.sample_chain(random.Random(0), 2)] == ["capital", "city_population"]
    with pytest.raises(ValueError, match="allows chains of at most 2 hops, not 3"):
        world.sample_chain(random.Random(0), 3)


def test_full_world_spec_keeps_the_schema_tables():
    world = world_lib.World(0)
    assert world.relations is world_lib.RELATIONS and world.pools is None
    assert world.relations_by_subject is world_lib.RELATIONS_BY_SUBJECT
    rng_a, rng_b = random.Random(5), random.Random(5)
    chains = [world.sample_chain(rng_a, 3) for _ in range(20)]
    assert chains == [world_lib.sample_chain(rng_b, 3) for _ in range(20)]
    assert world.longest_chain() >= 8
