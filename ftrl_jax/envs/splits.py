"""A fixed partition of the question space into held-out and training questions.

Every procedural build (the shipped policy's supervised data, the main job's RL environments, the main job's
held-out evaluation, any seed) assigns a question to a side by a salted SHA-256 of its text, so a held-out
question can never occur in anything a policy trained on, whatever the seeds: facts are drawn per build, but
with a small world (recurring names, few relations) the same question text recurs across builds.
"""

from __future__ import annotations

import hashlib

# One question in HELD_OUT_BUCKETS is held out. Changing the salt or the count moves questions across the
# partition and invalidates every shipped policy's "never seen" guarantee.
HELD_OUT_BUCKETS = 4
_SALT = b"ftrl_jax held-out questions v1\x00"


def is_held_out(question: str) -> bool:
    """True when `question` (an environment's question text, surrounding whitespace ignored) is held out."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    digest = hashlib.sha256(_SALT + question.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def is_training(question: str) -> bool:
    """True when `question` may be used for training (the complement of `is_held_out`)."""
    return not is_held_out(question)
