"""Run as a script with 8 simulated CPU devices: sharded forward/generate equal the single-device results."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ftrl_jax import models, parallel  # noqa: E402
from ftrl_jax.generate.sampling import generate  # noqa: E402


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    config = models.preset("tiny", vocab_size=256, num_layers=2, model_type=sys.argv[1] if len(sys.argv) > 1 else "qwen2")
    params = models.init_params(config, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 24), 0, config.vocab_size)
    mask = jnp.ones_like(ids).at[1, :5].set(0)
    forward = jax.jit(models.forward, static_argnums=0)
    single = np.asarray(forward(config, params, ids, mask))

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = parallel.shard_params(params, mesh)
    specs = {parallel._path_str(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(parallel.param_shardings(params, mesh))[0]}
    assert specs["layers/mlp/gate_proj/kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), specs
    # A dimension the mesh axis does not divide is replicated rather than rejected.
    assert parallel.partition_spec("lm_head/kernel", (256, 255), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    batch = jax.device_put((ids, mask), parallel.batch_sharding(mesh))
    out = forward(config, sharded_params, *batch)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)

    prompts = [list(range(3, 3 + n)) for n in (4, 9, 2, 7, 5, 3, 8, 6)]
    ref = generate(config, params, prompts, max_new_tokens=10)
    got = generate(config, sharded_params, prompts, max_new_tokens=10, data_sharding=parallel.batch_sharding(mesh))
    assert got.tokens == ref.tokens, (got.tokens, ref.tokens)
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(ref.logprobs), atol=1e-4)

    # Fewer distinct prompts than batch shards (a late rollout round, a small micro-batch): padded, not rejected.
    few = [[5, 6, 7], [5, 6, 7]]
    got = generate(config, sharded_params, few, max_new_tokens=6, data_sharding=parallel.batch_sharding(mesh))
    assert got.tokens == generate(config, params, few, max_new_tokens=6).tokens

    try:
        parallel.make_mesh(data=3)
    except ValueError as e:
        assert "8 are available" in str(e)
    else:
        raise AssertionError("a mesh that does not match the device count must fail")
    print("MESH_OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
