"""The main job: environments, warm start, evaluation, RL, evaluation, export, stage by stage and resumable."""
