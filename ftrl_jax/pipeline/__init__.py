"""The main job: environments, starting policy (or a warm start from scratch), evaluation, RL, evaluation, export,
stage by stage and resumable; and the recipe of a tiny instruct policy (`pretrain`)."""
