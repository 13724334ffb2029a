"""`nvila-quant eval` end to end through lmms-eval on the built-in local tasks (an MMMU-style multiple choice, a
TextVQA-style open answer, a log-likelihood multiple choice) with a float and an int4 tiny checkpoint: the table holds
the scores lmms-eval computes from the saved answers, the float answers are generate_content's, finished models are
not evaluated again, hub tasks fail at once offline, and `python -m lmms_eval --model nvila_quant` agrees."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from eval_helpers import needs_lmms_eval, small_tiny, small_tiny_rtn
from transformers import GenerationConfig

from nvila_quant.cli import main
from nvila_quant.errors import ConfigError
from nvila_quant.eval import runner as runner_module
from nvila_quant.eval.tasks import BUILTIN_TASKS, builtin_tasks_dir
from nvila_quant.model import NVILAQwen2
from nvila_quant.paths import builtin_eval_dir
from nvila_quant.report.document import round_numbers

pytestmark = needs_lmms_eval

LIMIT = 2
TASKS = ",".join(BUILTIN_TASKS)


def _eval_args(models: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["eval", "--tasks", TASKS, "--tasks-path", "builtin", "--limit", str(LIMIT), "--dtype", "fp32", "--device",
            "cpu", "--bootstrap", "200", "--output", str(out), "--quiet", *extra]
    for m in models:
        args += ["--model", str(m)]
    return args


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return [small_tiny(tmp_path_factory), small_tiny_rtn(tmp_path_factory)]


@pytest.fixture(scope="module")
def evaluated(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(_eval_args(models, out, "--html")) == 0
    return out


def _model_dirs(out: Path) -> list[Path]:
    results = json.loads((out / "results.json").read_text())
    return [out / "models" / m["name"] for m in results["models"]]


def _records(model_dir: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (model_dir / "samples" / f"{task}.jsonl").read_text().splitlines()]


def test_the_table_holds_lmms_evals_scores_of_the_saved_answers(evaluated):
    """lmms-eval itself re-scores the saved answers (a model that replays them) and gets the same scores; the
    per-document VQA accuracy is lmms-eval's TextVQA metric of the saved answer."""
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from nvila_quant.eval.adapter import _pair

    class Replay(lmms):
        def __init__(self, responses: dict) -> None:
            super().__init__()
            self.responses = responses

        def generate_until(self, requests):
            return [self.responses[(r.task_name, r.doc_id)][0] for r in requests]

        def loglikelihood(self, requests):
            return [_pair(*self.responses[(r.task_name, r.doc_id)][r.idx]) for r in requests]

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    table = json.loads((evaluated / "results.json").read_text())
    manager = TaskManager(include_path=str(builtin_tasks_dir()))
    assert len(table["models"]) == 2
    for entry, model_dir in zip(table["models"], _model_dirs(evaluated), strict=True):
        responses = {(t, r["doc_id"]): r["response"] for t in BUILTIN_TASKS for r in _records(model_dir, t)}
        assert len(responses) == LIMIT * len(BUILTIN_TASKS)
        out = simple_evaluate(model=Replay(responses), tasks=list(BUILTIN_TASKS), task_manager=manager, limit=LIMIT,
                              process_docs_parallel=1, bootstrap_iters=0, random_seed=0, log_samples=False)
        scores = json.loads((model_dir / "result.json").read_text())["scores"]
        for task, metric in [("nvq_mc", "mmmu_acc"), ("nvq_vqa", "exact_match"), ("nvq_choice", "acc")]:
            assert scores[task][metric] == out["results"][task][f"{metric},none"], (entry["name"], task)
            assert entry["scores"][task][metric] == round_numbers(scores[task][metric])
        for r in _records(model_dir, "nvq_vqa"):
            assert textvqa_process_results(copy.deepcopy(r["doc"]), [r["answer"]])["exact_match"] == \
                r["items"]["exact_match"]
    assert {d["task"] for d in table["deltas"]} == set(BUILTIN_TASKS)
    assert all(d["ci"] == "paired bootstrap (200)" and d["ci_low"] <= d["delta"] <= d["ci_high"]
               for d in table["deltas"])
    md = (evaluated / "results.md").read_text()
    assert "| `nvq_vqa` | `exact_match` |" in md and (evaluated / "results.html").is_file()


def test_float_answers_are_generate_contents(evaluated, models):
    model = NVILAQwen2.load_pretrained(models[0], torch_dtype="fp32", device="cpu")
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)  # the local tasks' generation settings
    float_dir = _model_dirs(evaluated)[0]
    for task, until in [("nvq_mc", "\n\n"), ("nvq_vqa", "ASSISTANT:")]:  # the tasks' stop strings
        for r in _records(float_dir, task):
            with PIL.Image.open(builtin_eval_dir() / r["doc"]["image"]) as im:
                image = im.convert("RGB")
            expected = model.generate_content([image, r["context"]], greedy).split(until)[0]
            assert r["answer"] == expected, (task, r["doc_id"])


def test_finished_models_are_not_evaluated_again(evaluated, models, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise ConfigError("boom: a model was loaded")

    monkeypatch.setattr(runner_module, "load_responder", no_loading)
    before = json.loads((evaluated / "results.json").read_text())
    # --overwrite: the models in the output are reused (same cache key), nothing is loaded
    assert main(_eval_args(models, evaluated, "--overwrite")) == 0
    after = json.loads((evaluated / "results.json").read_text())
    assert all(m["cached"] for m in after["models"])
    assert [m["scores"] for m in after["models"]] == [m["scores"] for m in before["models"]]
    assert after["deltas"] == before["deltas"]
    # an interrupted run: the finished model is in OUT.work, the other one fails -> no output, the work folder kept
    out = tmp_path / "resumed"
    work = tmp_path / "resumed.work" / "models"
    float_dir, rtn_dir = _model_dirs(evaluated)
    shutil.copytree(float_dir, work / json.loads((float_dir / "result.json").read_text())["key"])
    assert main(_eval_args(models, out)) == 2
    assert "boom" in capsys.readouterr().err and not out.exists() and len(list(work.iterdir())) == 1
    # once the other model is finished too, the run completes without loading any and removes the work folder
    shutil.copytree(rtn_dir, work / json.loads((rtn_dir / "result.json").read_text())["key"])
    assert main(_eval_args(models, out)) == 0
    assert not work.parent.exists()
    assert json.loads((out / "results.json").read_text())["deltas"] == before["deltas"]
    # another limit is another key: the model would be evaluated again
    assert main(_eval_args(models[:1], tmp_path / "other", "--limit", "1")) == 2


def test_hub_tasks_fail_at_once_offline(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_module, "load_responder", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["eval", "--model", str(models[0]), "--tasks", "mmmu_val,nvq_vqa", "--tasks-path", "builtin",
            "--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "set): mmmu_val (lmms-lab-encoder/MMMU). Evaluate local task folders instead: --tasks-path DIR" in err
    assert main(["eval", "--model", str(models[0]), "--tasks", "nvq_vq", "--tasks-path", "builtin",
                 "--output", str(tmp_path / "out")]) == 2
    assert "unknown task 'nvq_vq'; did you mean nvq_vqa" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_python_m_lmms_eval_with_the_entry_point(evaluated, models, tmp_path):
    """The harness's own CLI finds the model through the entry point and the local tasks through --include_path; its
    scores are the in-process ones (answers parsed in one thread, as in process: MMMU's parser picks a seeded random
    letter for an answer it cannot read)."""
    from lmms_eval.models import get_model

    from nvila_quant.eval.adapter import NVILAQuant

    assert get_model("nvila_quant") is NVILAQuant
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "nvila_quant", "--model_args",
           f"pretrained={models[1]},dtype=fp32,device=cpu,quiet=true", "--tasks", TASKS, "--process_docs_parallel", "1",
           "--include_path", str(builtin_tasks_dir()), "--limit", str(LIMIT), "--output_path", str(tmp_path / "logs"),
           "--verbosity", "WARNING"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (found,) = [json.loads(f.read_text()) for f in (tmp_path / "logs").rglob("*results*.json")]
    scores = json.loads((_model_dirs(evaluated)[1] / "result.json").read_text())["scores"]
    for task, metric in [("nvq_mc", "mmmu_acc"), ("nvq_vqa", "exact_match"), ("nvq_choice", "acc")]:
        assert found["results"][task][f"{metric},none"] == scores[task][metric], task
