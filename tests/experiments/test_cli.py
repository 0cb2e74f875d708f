"""One command-line style for every entry point (`experiments.cli`): all of them import into one process,
`--help` lists every flag with its default, usage errors are one `error:` line and exit code 2, and the same
thing has the same flag name in every command."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import cli

ROOT = Path(__file__).resolve().parents[2]
ALIAS_HELP = re.compile(r"Alias for --(\w+)\.")

# Spellings of the common names (--model, --data, --output, --workdir, --seed) that may exist only as aliases.
SYNONYMS = {
    "out": "output", "output_file": "output", "output_dir": "output", "out_dir": "output", "dest": "output",
    "policy": "model", "policy_dir": "model", "checkpoint": "model", "ckpt": "model", "model_dir": "model",
    "input": "data", "input_file": "data", "data_file": "data", "dataset": "data",
    "work_dir": "workdir", "run_dir": "workdir", "rundir": "workdir",
    "random_seed": "seed", "rng_seed": "seed",
}
# Where a command reads or writes one of those things, it does under the common name.
EXPECTED_COMMON = {
    "experiments.train": {"config", "workdir"},
    "experiments.pretrain": {"config", "workdir", "output"},
    "experiments.sample": {"config", "workdir", "model", "output"},
    "experiments.build_envs": {"seed", "output"},
    "experiments.evaluate": {"model", "data", "output"},
    "experiments.serve": {"model"},
    "analysis.layer_deltas": {"output"},
    "analysis.attribution": {"data", "output"},
    "analysis.copy_probe": {"model", "data", "output"},
    "benchmarks.bench_sandbox": {"data"},
    "benchmarks.bench_build_envs": {"seed"},
}


def entry_points() -> list[str]:
    """Every module under experiments/, analysis/ and benchmarks/ that runs as `python -m`."""
    names = []
    for package in ("experiments", "analysis", "benchmarks"):
        for path in sorted((ROOT / package).glob("*.py")):
            if re.search(r"^if __name__ == \"__main__\":", path.read_text(), re.MULTILINE):
                names.append(f"{package}.{path.stem}")
    return names


ENTRY_POINTS = entry_points()
MODULES = {name: importlib.import_module(name) for name in ENTRY_POINTS}  # all in this one process


def config_of(module) -> str | None:
    return getattr(module, "CONFIG", None)


def flags_of(name: str) -> dict:
    """flag name -> absl Flag, for every flag the command defines."""
    module = MODULES[name]
    flag_values = cli.flag_values(module.define_flags, [name], config_of(module))
    return {flag_name: flag_values[flag_name] for flag_name in flag_values}


def help_blocks(text: str) -> dict[str, str]:
    """flag name -> its block in absl's help listing (the `--name:` line and the indented lines under it)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (?:-\w,)?--(?:\[no\])?([\w.-]+):", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += "\n" + line
        else:
            current = None
    return blocks


def test_entry_points_are_found_and_follow_the_convention():
    assert {"experiments.train", "experiments.sample", "experiments.build_envs", "experiments.evaluate",
            "analysis.layer_deltas", "analysis.attribution", "benchmarks.bench_sampler"} <= set(ENTRY_POINTS)
    for name, module in MODULES.items():
        assert callable(getattr(module, "define_flags", None)) and callable(module.main), name
        source = Path(module.__file__).read_text()
        assert "cli.run(main)" in source and "argparse" not in source, name
        assert "flags.FLAGS" not in source, f"{name} defines flags on absl's global FlagValues"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_every_flag_with_its_default(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        MODULES[name].main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(MODULES[name].__doc__.strip().splitlines()[0])
    blocks = help_blocks(out)
    for flag_name, flag in flags_of(name).items():
        assert flag_name in blocks, f"{name} --help does not list --{flag_name}"
        assert flag.help and flag.help.strip(), f"{name} --{flag_name} has no help text"
        alias = ALIAS_HELP.fullmatch(flag.help)
        if alias:
            continue  # an old spelling: its default is the flag it stands for
        if flag.default is None:  # no default: absl refuses the command line without it, and the help says so
            assert flag.validators and "required" in flag.help, f"{name} --{flag_name}"
        else:  # absl wraps long lines, inside words too
            unwrapped = {blocks[flag_name].replace("\n    ", sep) for sep in ("", " ")}
            assert any(f"(default: {flag.default_as_str})" in text for text in unwrapped), f"{name} --{flag_name}"


def test_python_dash_m_runs_main_through_absl():
    """The `__main__` wiring (`cli.run`, absl's app.run) on a command that imports little: help exits 0,
    a bad value exits 2 with one `error:` line and none of absl's own usage text."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    commands = {"help": ["--help"], "mistake": ["--seq_len=8k"]}
    procs = {key: subprocess.Popen([sys.executable, "-m", "benchmarks.bench_attention", *args], cwd=ROOT, env=env,
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for key, args in commands.items()}
    results = {key: (proc.wait(timeout=120), *proc.communicate()) for key, proc in procs.items()}
    code, out, err = results["help"]
    assert code == 0, err
    assert set(help_blocks(out)) == set(flags_of("benchmarks.bench_attention")) and "(default: '8192')" in out
    code, out, err = results["mistake"]
    assert code == 2 and out == ""
    assert err == "error: flag --seq_len=['8k']: --seq_len takes positive integers, e.g. --seq_len=2048,4096,8192\n"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_common_things_have_common_names(name):
    flag_values = flags_of(name)
    for flag_name, flag in flag_values.items():
        if flag_name in SYNONYMS:
            alias = ALIAS_HELP.fullmatch(flag.help)
            assert alias and alias.group(1) == SYNONYMS[flag_name], \
                f"{name} --{flag_name}: call it --{SYNONYMS[flag_name]} (the old name may stay as an alias)"
    for flag_name in EXPECTED_COMMON.get(name, ()):
        assert flag_name in flag_values and not ALIAS_HELP.fullmatch(flag_values[flag_name].help), \
            f"{name} has no --{flag_name}"


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("mistake", ["--no_such_flag=1", "stray_argument", "required"])
def test_usage_errors_are_one_line_and_exit_code_2(name, mistake, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    required = [flag_name for flag_name, flag in flags_of(name).items()
                if flag.default is None and not ALIAS_HELP.fullmatch(flag.help)]
    given = [f"--{flag_name}=1" for flag_name in required]  # every required flag is a string or an integer
    if mistake == "required":
        if not required:
            return
        given, mistake = given[1:], f"--{required[0]}"
    else:
        given.append(mistake)
    assert MODULES[name].main([name, *given]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert mistake.lstrip("-").split("=")[0] in err, err


def test_each_parse_starts_from_the_defaults(monkeypatch):
    from experiments import sample

    monkeypatch.chdir(ROOT)
    first = cli.parse(["sample", "--output=a.jsonl", "--num_envs=3", "--greedy", "--config.seed=7",
                       "--config.rl.num_steps=2"], sample.define_flags, sample.__doc__, config=sample.CONFIG)
    assert (first.num_envs, first.greedy, first.config.seed, first.config.rl.num_steps) == (3, True, 7, 2)
    second = cli.parse(["sample", "--out=b.jsonl", "--policy=dir"], sample.define_flags, sample.__doc__,
                       config=sample.CONFIG)
    assert (second.output, second.model, second.num_envs, second.greedy, second.config.seed) == \
        ("b.jsonl", "dir", 0, False, 0)
    preset = cli.parse(["sample", "--output=c.jsonl", "--config=configs/qwen.py:qwen2.5-7b"], sample.define_flags,
                       sample.__doc__, config=sample.CONFIG)
    assert preset.config.rl.learning_rate == 1e-6 and first.config.rl.num_steps == 2  # the first parse's config is its own


def test_config_mistakes_are_usage_errors(monkeypatch, capsys):
    from experiments import train

    monkeypatch.chdir(ROOT)
    for argv, words in [(["train", "--config=configs/qwen.py:no-such-preset"], "no-such-preset"),
                        (["train", "--config=configs/missing.py"], "--config"),
                        (["train", "--config.rl.no_such_field=1"], "no_such_field"),
                        (["train", "--config.seed=zero"], "config.seed")]:
        assert train.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, (argv, err)


def test_help_lists_the_config_and_wins_over_other_flags(monkeypatch, capsys):
    from experiments import train

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["train", "--config.seed=3", "--no_such_flag", "--help"])
    assert exit_info.value.code == 0
    blocks = help_blocks(capsys.readouterr().out)
    assert "(default: 'configs/qwen.py')" in blocks["config"] and "(default: '')" in blocks["workdir"]


def test_config_mistakes_read_as_one_line(monkeypatch, capsys):
    from experiments import train

    monkeypatch.chdir(ROOT)
    assert train.main(["train", "--config.rl.num_stepz=1"]) == 2
    assert train.main(["train", "--config=configs/missing.py"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("error: --config: the config has no field 'num_stepz';") and "\\" not in err[0]
    assert "num_steps" in err[0]  # ml_collections' suggestion is kept
    assert err[1].startswith("error: --config=configs/missing.py: ") and "No such file" in err[1]


def test_sample_rejects_an_output_it_cannot_write_before_sampling(tmp_path, monkeypatch, capsys):
    from experiments import sample

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sample, "sample_rl_prompts", lambda *a, **k: pytest.fail("sampled before checking --output"))
    assert sample.main(["sample", f"--output={tmp_path / 'prompts.csv'}", f"--workdir={tmp_path}"]) == 2
    assert sample.main(["sample", "--output=", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: --output: ") for line in err), err


def test_a_misspelt_boolean_negation_names_absls_spelling(monkeypatch, capsys):
    from experiments import build_envs

    for spelling in ("--no_progress", "--no-progress"):
        assert build_envs.main(["build_envs", "--num=1", "--output=x.jsonl", spelling]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("--noprogress" in line and line.startswith("error: ") for line in err), err


@pytest.mark.parametrize("name, mistake", [("benchmarks.bench_sampler", "--presets=tiny,no-such-preset"),
                                           ("benchmarks.bench_train_step", "--presets=no-such-preset"),
                                           ("benchmarks.bench_attention", "--presets=no-such-preset"),
                                           ("benchmarks.bench_attention", "--impls=dense,no-such-impl"),
                                           ("benchmarks.bench_attention", "--max_rss_gb=-1"),
                                           ("benchmarks.bench_train_step", "--kinds=")])
def test_benchmark_choices_are_checked_before_any_run(name, mistake, capsys):
    module = importlib.import_module(name)
    assert module.main([name, mistake]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: flag {mistake.split('=')[0]}="), err


def test_output_file_problem_names_what_cannot_be_written(tmp_path):
    assert cli.output_file_problem("") is None
    assert cli.output_file_problem(str(tmp_path / "out.json")) is None
    assert "is a directory" in cli.output_file_problem(str(tmp_path))
    missing = cli.output_file_problem(str(tmp_path / "missing" / "out.json"), flag="report")
    assert missing.startswith("--report=") and "not a writable directory" in missing
