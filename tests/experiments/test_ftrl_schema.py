"""Built environments written as .parquet have FTRL's schema and load the way verl's RLHFDataset loads them."""

import json
import os

import pytest

pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

from ftrl_jax.envs import samples  # noqa: E402
from ftrl_jax.envs.build import build_environments  # noqa: E402
from ftrl_jax.envs.sandbox import Sandbox  # noqa: E402
from ftrl_jax.envs.stages import SCENARIO_KINDS  # noqa: E402

FTRL_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "benchdata", "ftrl_test.parquet")
needs_ftrl_test = pytest.mark.skipif(not os.path.exists(FTRL_TEST), reason="benchdata ftrl_test.parquet is absent")


@pytest.fixture(scope="module")
def built_parquet(tmp_path_factory):
    """What `experiments.build_envs --output=X.parquet` writes: built environments through write_samples."""
    with Sandbox(num_workers=2) as sandbox:
        envs, _ = build_environments(8, seed=3, kinds=tuple(SCENARIO_KINDS), complexity="low", sandbox=sandbox)
    assert len(envs) == 8
    path = tmp_path_factory.mktemp("built") / "envs.parquet"
    samples.write_samples(path, [env.to_sample("train") for env in envs])
    return path


def _leaves(arrow_type, prefix=""):
    """(path, type) of every nested field, so a mismatch names the exact field that differs."""
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return [(prefix, str(arrow_type.__class__.__name__))] + _leaves(arrow_type.value_type, prefix + "[]")
    if pa.types.is_struct(arrow_type):
        out = [(prefix, "struct")]
        for i in range(arrow_type.num_fields):
            field = arrow_type.field(i)
            out += _leaves(field.type, f"{prefix}.{field.name}")
        return out
    return [(prefix, str(arrow_type))]


@needs_ftrl_test
def test_built_parquet_has_ftrls_schema_field_by_field(built_parquet):
    ftrl, ours = pq.read_schema(FTRL_TEST), pq.read_schema(built_parquet)
    assert ftrl.names == list(samples.FTRL_COLUMNS)
    assert ours.names[: len(ftrl.names)] == ftrl.names  # every FTRL column, in FTRL's order
    for name in ftrl.names:
        theirs, mine = ftrl.field(name), ours.field(name)
        assert _leaves(mine.type, name) == _leaves(theirs.type, name)
        assert mine.type == theirs.type and mine.nullable == theirs.nullable, name
    # Beyond FTRL's columns only the oracle calls, as a JSON string like FTRL's other nested fields.
    assert [(f.name, str(f.type)) for f in ours][len(ftrl.names):] == [(samples.ORACLE_COLUMN, "string")]


@needs_ftrl_test
def test_built_parquet_loads_like_verls_rlhf_dataset(built_parquet, tmp_path):
    # RLHFDataset: datasets.load_dataset("parquet", data_files=...)["train"]; a private cache dir keeps
    # the test out of ~/.cache.
    ours = datasets.load_dataset("parquet", data_files=str(built_parquet), split="train", cache_dir=str(tmp_path))
    ftrl = datasets.load_dataset("parquet", data_files=FTRL_TEST, split="train", cache_dir=str(tmp_path))
    assert len(ours) == 8 and len(ftrl) == 200
    assert {name: ours.features[name] for name in ftrl.features} == dict(ftrl.features)
    row = ours[0]
    assert row["messages"] == [{"content": row["messages"][0]["content"], "role": "user"}]
    assert row["messages"][0]["content"].startswith(samples.FTRL_INSTRUCTION + "Question: ")
    tools, codes, unsolved = json.loads(row["tools"]), json.loads(row["codes"]), json.loads(row["unsolved_set"])
    assert tools and all(tool["type"] == "function" and tool["function"]["name"] in codes for tool in tools)
    assert unsolved and all(isinstance(a, str) for answers in unsolved.values() for a in answers)
    assert isinstance(row["solve_rate"], float) and row["split"] == "train" and isinstance(row["answer"], str)
    assert {r["data_source"] for r in ours} == set(SCENARIO_KINDS.values())
    assert json.loads(row[samples.ORACLE_COLUMN])[0][0]["name"] in codes
    assert samples.decode_sample(row).tool_names == [tool["function"]["name"] for tool in tools]


@needs_ftrl_test
def test_ftrl_test_file_reads_through_our_reader():
    read, errors = samples.read_samples(FTRL_TEST)
    assert errors == [] and len(read) == 200
    rows = pq.read_table(FTRL_TEST).to_pylist()
    assert [samples.encode_sample(s) for s in read] == rows  # every field, byte for byte
