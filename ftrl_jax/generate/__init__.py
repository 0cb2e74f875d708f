"""Generation: the jit KV-cache sampler (bucketed prefill, `while_loop` decode, shared prompt caches)."""
