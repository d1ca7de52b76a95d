"""benchmarks/reproduce.py (issue 6): the main table on a tiny synthetic dataset, its JSON and
Markdown structure, the time budget, and the analysis plots."""

import importlib.util
import json
import sys
import time

import pytest

from conftest import REPO_ROOT

SPEC = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(SPEC)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up
SPEC.loader.exec_module(reproduce)

TINY = "synthetic:num_users=150,num_items=60,min_length=6,max_length=14"
TINY_ARGS = ["--data", TINY, "--epochs", "1", "--dim", "8", "--max-len", "8", "--eval-seeds", "2",
             "--device", "cpu", "--quiet"]


def test_main_writes_json_and_markdown(tmp_path):
    assert reproduce.main(TINY_ARGS + ["--seeds", "0", "1", "--input-scale", "1.0", "0.5",
                                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "reproduce_synthetic.json").read_text())
    assert report["dataset"]["name"] == "synthetic" and report["seeds"] == [0, 1]
    assert report["label"].startswith("CPU (") and "preset" in report["label"]  # the machine and the preset
    for name in ("SASRec-CE", "DiffRec"):
        runs = report["runs"][name]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["epochs_run"] == 1 and r["best_epoch"] == 1 for r in runs)
        for metric in reproduce.METRICS:
            summary = report["summary"][name][metric]
            assert summary["n"] == 2 and summary["values"] == [r["test"][metric] for r in runs]
            assert 0.0 <= summary["mean"] <= 1.0 and summary["std"] >= 0.0
    assert set(report["popularity"]["test"]) == set(reproduce.METRICS)
    # the test split both ways: the user's earlier items excluded from the ranking, and not
    assert all(r["test_seen_excluded"] == r["test"] for r in report["runs"]["DiffRec"])
    assert set(report["summary_seen_included"]["DiffRec"]) == set(reproduce.METRICS)
    # the input scale is chosen on the validation split, and the chosen run is seed 0's DiffRec run
    selection = report["selection"]
    best = max(selection["candidates"], key=lambda c: c["valid_NDCG@10"])
    assert selection["chosen"] == best["input_scale"] and selection["on"] == "validation NDCG@10"
    assert all(r["config"]["input_scale"] == selection["chosen"] for r in report["runs"]["DiffRec"])
    assert set(report["verdict"]["diffrec_beats_sasrec"]) == set(reproduce.METRICS)
    assert report["settings"]["training_sequences"].startswith("window mode")  # the default construction
    text = (tmp_path / "reproduce_synthetic.md").read_text()
    for needle in ("| popularity |", "| SASRec-CE |", "| DiffRec |", "±", "Verdict", "Command:", "NDCG@10"):
        assert needle in text


def test_budget_stops_training(tmp_path):
    budget = reproduce.Budget(0.0)
    record = {"epoch": 1, "valid": {"NDCG@10": 0.1, "HR@10": 0.2}, "loss": 1.0, "seconds": 0.5, "item_emb_cos": 0.0}
    assert budget(record) is True and budget.stopped
    assert reproduce.Budget(None)(record) is False
    planner = reproduce.Planner(100.0, 30.0, [2.0, 1.0, 1.0])
    assert planner.next_budget() == pytest.approx(30.0, abs=0.5)  # min(per-run cap, 50 s share)
    planner = reproduce.Planner(100.0, None, [2.0, 1.0, 1.0])
    assert planner.next_budget() == pytest.approx(50.0, abs=0.5)
    # a run with a tiny budget stops after its first epoch although more were allowed
    assert reproduce.main(TINY_ARGS + ["--epochs", "5", "--seeds", "0", "--input-scale", "1.0",
                                            "--max-minutes", "0.0001", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "reproduce_synthetic.json").read_text())
    for name in ("SASRec-CE", "DiffRec"):
        assert report["runs"][name][0]["epochs_run"] == 1 and report["runs"][name][0]["stopped_by_budget"]
    assert "selection" not in report  # one candidate: nothing was chosen


def _variant(label, value, **config):
    metrics = {m: value for m in reproduce.METRICS}
    return {"label": label, "valid": metrics, "test": metrics, "config": {"num_steps": 1000, **config}}


def test_plot_functions_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    common = {"dataset": {"name": "synthetic"}, "label": "test"}
    reports = [
        {"analysis": "schedule", **common, "variants": [_variant(s, 0.1 + i / 100) for i, s in
                                                          enumerate(("sqrt", "cosine", "linear"))]},
        {"analysis": "steps", **common, "variants": [_variant(f"N={n}", 0.1, num_steps=n) for n in (10, 1000)]},
        {"analysis": "seeds", **common, "splits": ["test"],
         "rows": [{"S": s, "test": {m: 0.1 * s for m in reproduce.METRICS}} for s in (1, 2, 5)]},
        {"analysis": "figure6", **common, "user": 1, "history_tail": [
            {"dense": 1, "title": "Toy Story (1995)", "genres": "Animation|Comedy"}],
         "ground_truth": {"dense": 2, "title": "Heat (1995)", "genres": "Action"},
         "per_seed": [{"seed": 1, "target_rank": 0, "top": [{"dense": 2, "title": "Heat (1995)", "genres": "Action"}]}],
         "average": {"S": 10, "target_rank": 0, "top": [{"dense": 2, "title": "Heat (1995)", "genres": "Action"}]}},
    ]
    for report in reports:
        png = reproduce.plot_analysis(report, tmp_path / f"analysis_{report['analysis']}.png")
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --replot redraws from the JSON files
    (tmp_path / "analysis_seeds.json").write_text(json.dumps(reports[2]))
    before = time.time()
    assert reproduce.main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "analysis_seeds.png").stat().st_mtime >= before - 1
