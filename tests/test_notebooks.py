"""Executes the notebooks top to bottom on CPU with tiny sizes, so they never rot.

Sizes are injected papermill-style: a cell assigning new values goes right after the cell tagged
`parameters`. The quickstart trains into a temporary workdir and layer_analysis analyses that run.
"""

import json
import os
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

QUICKSTART_SIZES = {
    # WARMUP_STEPS 0: the notebook's default path, RL from the shipped tiny-instruct policy (training from scratch
    # is tested in tests/pipeline/test_main_job.py).
    "NUM_TRAIN_ENVS": 16, "NUM_EVAL_ENVS": 4, "WARMUP_STEPS": 0, "RL_STEPS": 2, "PROMPTS_PER_STEP": 2,
    "NUM_ROLLOUTS": 2, "MAX_TURNS": 3, "MAX_NEW_TOKENS": 24,
}


def with_parameters(notebook, values):
    """A copy of the notebook with a cell assigning `values` after its `parameters` cell."""
    notebook = nbformat.from_dict(json.loads(json.dumps(notebook)))
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    cell.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(tagged[0] + 1, cell)
    return notebook


def execute(name, values):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    notebook = with_parameters(notebook, values)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs(notebook, cell_id):
    return next(cell.outputs for cell in notebook.cells if cell.get("id") == cell_id)


def text_of(cell_outputs):
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell_outputs)


def images_in(cell_outputs):
    return [o for o in cell_outputs if "image/png" in o.get("data", {})]


@pytest.fixture(scope="module")
def kernel_env():
    """The kernel imports this checkout (not an installed copy) and runs on CPU."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "JAX_PLATFORMS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["JAX_PLATFORMS"] = "cpu"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_notebooks_are_valid_and_explained():
    for name in ("quickstart.ipynb", "layer_analysis.ipynb"):
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        kinds = [cell.cell_type for cell in notebook.cells]
        assert kinds[0] == "markdown" and kinds.count("markdown") >= 4, name
        assert all(not cell.get("outputs") for cell in notebook.cells), f"{name} is stored with outputs"
    quickstart = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    install = next(cell.source for cell in quickstart.cells if cell.get("id") == "install")
    assert "%pip install -q -e .." in install and 'find_spec("ftrl_jax") is None' in install
    assert sum("USE_REAL_MODEL = False" in cell.source for cell in quickstart.cells) == 1


def test_quickstart_then_layer_analysis(tmp_path, kernel_env):
    workdir = tmp_path / "run"
    quickstart = execute("quickstart.ipynb", {"WORKDIR": str(workdir), **QUICKSTART_SIZES})
    assert "1 CPU device(s)" in text_of(outputs(quickstart, "device"))
    assert "kept 4 of" in text_of(outputs(quickstart, "envs"))
    results = text_of(outputs(quickstart, "results"))
    assert "before RL" in results and "after RL" in results and "self/multi_hop" in results
    assert len(images_in(outputs(quickstart, "results"))) == 1 and len(images_in(outputs(quickstart, "curve"))) == 1
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["rl_steps"] == 2 and summary["num_eval_envs"] == 4
    assert summary["model_params"] == 4_598_784  # the shipped tiny-instruct
    for directory in ("warmstart", "export"):
        assert (workdir / directory / "model.safetensors").is_file()

    out = tmp_path / "analysis"
    analysis = execute("layer_analysis.ipynb", {"WORKDIR": str(workdir), "OUT": str(out), "GROUPS": "mlp_lower,attention_all"})
    assert len(images_in(outputs(analysis, "deltas-plots"))) == 2
    assert len(images_in(outputs(analysis, "attribution-plot"))) == 1
    for file in ("layer_deltas/layer_deltas.csv", "layer_deltas/heatmap.png", "attribution/attribution.csv",
                 "attribution/attribution.png"):
        assert (out / file).is_file(), file
    # The analysis evaluated what the run evaluated: same held-out set and settings, same scores.
    record = json.loads((out / "attribution" / "attribution.json").read_text())
    variants = {v["variant"]: v for v in record["variants"]}
    assert set(variants) == {"base", "tuned", "restore:mlp_lower", "graft:mlp_lower", "restore:attention_all",
                             "graft:attention_all"}
    assert record["settings"]["max_turns"] == 3 and record["settings"]["max_new_tokens"] == 24
    for metric in ("solve_precision", "solve_rate", "solve_f1"):
        assert variants["base"]["metrics"][metric] == pytest.approx(summary["eval_before"][metric], abs=1e-12)
        assert variants["tuned"]["metrics"][metric] == pytest.approx(summary["eval_after"][metric], abs=1e-12)
    verdict = text_of(outputs(analysis, "verdict"))
    assert "mlp_lower" in verdict and "the run's own evaluation" in verdict
