"""`python -m experiments.build_envs`: deterministic files, the small-world option, and argument errors."""

from experiments import build_envs
from ftrl_jax.envs import samples
from ftrl_jax.envs.stages import SCENARIO_KINDS

SMALL_WORLD = "pool=32,relations=12,fixed_names=1"


def test_cli_is_deterministic_byte_for_byte(tmp_path, capsys):
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in paths:
        argv = ["build_envs", "--num=24", "--seed=5", f"--output={path}", "--complexity=low,te=1", "--workers=2",
                "--noprogress"]
        assert build_envs.main(argv) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    printed = capsys.readouterr().out
    assert "validated envs/min" in printed and "wrote 24 environments" in printed
    rows, errors = samples.read_samples(paths[0])
    assert errors == [] and len(rows) == 24
    assert {r.data_source for r in rows} == set(SCENARIO_KINDS.values())
    assert all(r.oracle_calls for r in rows)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    out = f"--output={tmp_path / 'x.jsonl'}"
    assert build_envs.main(["build_envs", "--num=2", out, "--scenarios=quiz"]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "--complexity=pe=9"]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "--author=llm"]) == 2
    err = capsys.readouterr().err
    assert "error: --scenarios: unknown kinds ['quiz']" in err and "error: --complexity" in err
    assert "error: --author=llm needs --base_url" in err
    # Flag errors (missing, out of range, not a choice, unknown, positional): one `error:` line each, code 2.
    assert build_envs.main(["build_envs", out]) == 2
    assert build_envs.main(["build_envs", "--num=0", out]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "--author=human"]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "--no_progress"]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "stray"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert err[0] == "error: --num is required (see --help)"
    assert "--num=0" in err[1] and "procedural|llm" in err[2]
    assert "'no_progress'" in err[3] and "stray" in err[4]
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_world_is_deterministic_and_validated(tmp_path, capsys):
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in paths:
        argv = ["build_envs", "--num=24", "--seed=5", f"--output={path}", "--complexity=low", "--workers=2",
                "--noprogress", f"--world={SMALL_WORLD}"]
        assert build_envs.main(argv) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert f"world {SMALL_WORLD}" in capsys.readouterr().out
    rows, errors = samples.read_samples(paths[0])
    assert errors == [] and len(rows) == 24
    out = f"--out={tmp_path / 'x.jsonl'}"  # the old spelling of --output, an alias
    assert build_envs.main(["build_envs", "--num=2", out, "--world=pool=1"]) == 2
    assert build_envs.main(["build_envs", "--num=2", out, "--world=relations=capital", "--scenarios=multi_hop"]) == 2
    err = capsys.readouterr().err
    assert "--world: " in err and "entity_pool must be an integer >= 2" in err
    assert "'multi_hop' needs chains of 3 hops" in err and "allows at most 1" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_rejects_an_output_it_cannot_write_before_building(tmp_path, capsys, monkeypatch):
    # A bad --output is a usage error at once, not a traceback after every environment was built.
    built = []
    monkeypatch.setattr(build_envs, "build_environments", lambda *a, **k: built.append(1))
    not_saved = tmp_path / "plain_dir"
    not_saved.mkdir()
    for output in (tmp_path / "x.csv", "", not_saved):
        assert build_envs.main(["build_envs", "--num=2", f"--output={output}", "--noprogress"]) == 2, output
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: --output: ") for line in err), err
    assert "'.csv'" in err[0] and "empty" in err[1] and "not a datasets save_to_disk directory" in err[2]
    assert not built
