"""Every place that opens an environment file takes each sample-file form: .jsonl, .parquet, and a
datasets save_to_disk directory (`--config.envs.train_file/eval_file`, `experiments.evaluate --data`)."""

import json

import pytest

from configs import qwen
from experiments import evaluate
from ftrl_jax.envs.samples import read_samples, sample_file_form, write_samples
from ftrl_jax.pipeline.main_job import TrainingError, prepare_environments
from ftrl_jax.rollout import harness
from tests.rollout.test_episodes import OracleGenerator, toy_sample


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


FORMS = {"jsonl": "envs.jsonl", "parquet": "envs.parquet", "save_to_disk": "envs_dataset"}


def toy_samples(split):
    solved = toy_sample()
    solved.oracle_calls = [[{"name": "double", "arguments": {"x": 7}}],
                           [{"name": "greet", "arguments": {"name": "Ada"}}]]
    solved.split = split
    greet = toy_sample(unsolved={"greet": ["Hello, Ada"]})
    greet.messages[0]["content"] += " Greet first."
    greet.oracle_calls = [[{"name": "greet", "arguments": {"name": "Ada"}}]]
    greet.split = split
    return [solved, greet]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_config_train_and_eval_files_take_every_form(form, tmp_path):
    train_path, eval_path = tmp_path / ("train_" + FORMS[form]), tmp_path / ("eval_" + FORMS[form])
    write_samples(train_path, toy_samples("train"))
    write_samples(eval_path, toy_samples("eval")[:1])
    assert sample_file_form(train_path) == form
    config = qwen.get_config()
    config.envs.train_file, config.envs.eval_file = str(train_path), str(eval_path)
    # Both files are given, so nothing is built and no sandbox is needed.
    train, held_out = prepare_environments(config, str(tmp_path / "work"), sandbox=None)
    assert train == toy_samples("train") and held_out == toy_samples("eval")[:1]
    assert read_samples(train_path)[0] == train  # read, never overwritten


def test_config_names_a_missing_environment_file(tmp_path):
    config = qwen.get_config()
    config.envs.train_file = str(tmp_path / "absent_dataset")
    config.envs.eval_file = str(tmp_path / "absent.parquet")
    with pytest.raises(TrainingError, match="absent_dataset' does not exist; .*save_to_disk directory"):
        prepare_environments(config, str(tmp_path / "work"), sandbox=None)


def run_evaluate(*flags):
    return evaluate.main(["evaluate", *flags])


@pytest.mark.parametrize("form", sorted(FORMS))
def test_evaluate_data_takes_every_form(form, tmp_path, monkeypatch):
    samples = toy_samples("test")
    data, output = str(tmp_path / FORMS[form]), str(tmp_path / "out.jsonl")
    write_samples(data, samples)
    kind, tasks, errors = harness.load_tasks(data)
    assert (kind, errors, [t.key for t in tasks]) == ("samples", [], ["0/solve", "1/solve"])
    assert [t.sample for t in tasks] == samples

    # The openai backend's generator is replaced by one that plays the oracle calls, so the whole
    # command runs (read --data, play in the sandbox, score, summarize) without a server.
    _, play = evaluate.BACKENDS["openai"]
    monkeypatch.setitem(evaluate.BACKENDS, "openai", (lambda args: OracleGenerator(samples), play))
    assert run_evaluate(f"--data={data}", "--backend=openai", "--base_url=http://127.0.0.1:9", "--model_name=m",
                        f"--output={output}", "--noprogress", "--sandbox_workers=1") == 0
    records = {r["key"]: r for r in read_lines(output)}
    assert set(records) == {"0/solve", "1/solve"}
    assert all(r["status"] == "ok" and r["metrics"]["solve_f1"] == 1.0 for r in records.values())
    summary = json.load(open(str(tmp_path / "out.summary.json")))
    assert summary["episodes"]["finished"] == 2 and summary["episodes"]["failed"] == 0


def test_evaluate_reports_an_unusable_data_path(tmp_path, capsys):
    output = f"--output={tmp_path / 'o.jsonl'}"
    assert run_evaluate(f"--data={tmp_path / 'absent_dataset'}", "--model=x", output) == 2
    assert "absent_dataset' does not exist" in capsys.readouterr().err
    (tmp_path / "not_a_dataset").mkdir()
    assert run_evaluate(f"--data={tmp_path / 'not_a_dataset'}", "--model=x", output) == 2
    assert "not a datasets save_to_disk directory" in capsys.readouterr().err
