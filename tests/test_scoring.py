"""Batch scoring (diffrec_ext.scoring, `diffrec score`): the rows equal the engine's own answers
for the same users and seeds, in every input and output format; a SIGKILLed run resumes to each
user exactly once; two torchrun processes (Gloo) write the rows of one; bad inputs and reruns
with other options are refused with the file and line named."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, run_torchrun

pa = pytest.importorskip("pyarrow", reason="scoring writes with pyarrow (the parquet extra)")
import pyarrow.parquet as pq  # noqa: E402

from diffrec_ext import checkpoint as ckpt  # noqa: E402
from diffrec_ext import scoring  # noqa: E402
from diffrec_ext.data import DataFormatError  # noqa: E402
from diffrec_ext.engine import InferenceEngine  # noqa: E402
from diffrec_ext.inference import batch_seed  # noqa: E402
from diffrec_ext.synthetic import synthetic_dataset  # noqa: E402
from diffrec_ext.train import TrainConfig, build_model  # noqa: E402

NUM_ITEMS = 40
ITEM_IDS = [f"item-{100 + i}" for i in range(NUM_ITEMS)]  # original ids differ from dense ids
CONFIG = TrainConfig(dim=16, layers=2, heads=2, max_len=9, num_steps=20, dropout=0.0, num_samples=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_checkpoint(directory, item_ids, seed=3, config=CONFIG):
    torch.manual_seed(seed)
    return ckpt.save_model(directory, build_model(config, len(item_ids)), config.to_dict(), item_ids)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), ITEM_IDS)


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return InferenceEngine.from_checkpoint(checkpoint_dir, device="cpu", batch_size=16)


def random_histories(count, seed=0, longest=15):
    """{user: history} with histories of 1 to `longest` original item ids (some longer than the
    model's window of 8, some with repeats)."""
    rng = np.random.default_rng(seed)
    return {1000 + u: [ITEM_IDS[i] for i in rng.integers(0, NUM_ITEMS, int(rng.integers(1, longest + 1)))]
            for u in range(count)}


def write_histories(path: Path, histories: dict) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        text = "".join(json.dumps({"user": user, "history": history}) + "\n" for user, history in histories.items())
        path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    elif name.endswith(".csv"):
        lines = ["user,history"] + [f"{user},{' '.join(history)}" for user, history in histories.items()]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table({"user": list(histories), "history": list(histories.values())}), path,
                       row_group_size=37)  # row groups that do not line up with the chunks
    return path


def read_scores(out: Path) -> pd.DataFrame:
    """Every part in chunk order (so rows in input order), as one table."""
    parts = sorted(out.glob("part-*"))
    if parts[0].suffix == ".csv":
        return pd.concat([pd.read_csv(part) for part in parts], ignore_index=True)
    return pd.read_parquet(out)


def expected_rows(engine, histories: dict, k, chunk, seed=None, exclude_seen=True) -> pd.DataFrame:
    """What the engine itself answers, chunk by chunk, with each chunk's seed (by default the
    checkpoint's seed, which `diffrec score` uses without --seed)."""
    seed = engine.config.seed if seed is None else seed
    users, frames = list(histories), []
    for index, start in enumerate(range(0, len(users), chunk)):
        block = users[start:start + chunk]
        top = engine.recommend([histories[u] for u in block], k=k, exclude_seen=exclude_seen,
                               seed=batch_seed(seed, index))
        frames.append(pd.DataFrame({"user": np.repeat(block, k), "rank": np.tile(np.arange(1, k + 1), len(block)),
                                    "item": [item for row in top.items for item in row],
                                    "score": top.scores.reshape(-1).numpy()}))
    return pd.concat(frames, ignore_index=True)


def assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame):
    assert list(got.columns) == ["user", "rank", "item", "score"]
    assert got["user"].tolist() == expected["user"].tolist()
    assert got["rank"].tolist() == expected["rank"].tolist()
    assert got["item"].tolist() == expected["item"].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("input_name, output_format", [
    ("histories.jsonl", "parquet"), ("histories.csv", "csv"), ("histories.parquet", "parquet"),
    ("histories.jsonl.gz", "csv"),
])
def test_rows_equal_the_engine_for_the_same_users_and_seeds(tmp_path, engine, input_name, output_format):
    histories = random_histories(150)
    source = scoring.HistoryFile(write_histories(tmp_path / input_name, histories))
    report = scoring.score(engine, source, tmp_path / "out", k=6, chunk_users=40, seed=7,
                           output_format=output_format, progress=False)
    assert (report.users, report.scored, report.resumed, report.rows, report.parts) == (150, 150, 0, 900, 4)
    got = read_scores(tmp_path / "out")
    assert_same_rows(got, expected_rows(engine, histories, k=6, chunk=40, seed=7))
    for user, rows in got.groupby("user"):  # seen items excluded by default
        assert not set(rows["item"]) & set(histories[user])
    manifest = json.loads((tmp_path / "out" / scoring.MANIFEST).read_text())
    assert manifest["complete"] and manifest["users"] == 150 and len(manifest["parts"]) == 4


def test_options_reach_the_engine(tmp_path, engine):
    histories = random_histories(30, seed=1)
    source = scoring.HistoryFile(write_histories(tmp_path / "h.jsonl", histories))
    scoring.score(engine, source, tmp_path / "out", k=4, chunk_users=30, exclude_seen=False, num_samples=2,
                  algorithm="alg2", stride=5, progress=False)
    got = read_scores(tmp_path / "out")
    top = engine.recommend(list(histories.values()), k=4, exclude_seen=False, num_samples=2, algorithm="alg2", stride=5,
                           seed=batch_seed(0, 0))
    assert got["item"].tolist() == [item for row in top.items for item in row]
    np.testing.assert_allclose(got["score"].to_numpy(), top.scores.reshape(-1).numpy(), rtol=1e-6)


def test_string_user_ids_are_kept(tmp_path, engine):
    histories = {f"u-{u}": history for u, history in random_histories(20, seed=2).items()}
    source = scoring.HistoryFile(write_histories(tmp_path / "h.jsonl", histories))
    scoring.score(engine, source, tmp_path / "out", k=3, chunk_users=8, progress=False)
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("user").type == pa.string() and table.schema.field("item").type == pa.string()
    assert table.column("user").to_pylist()[::3] == list(histories)


def test_every_user_of_a_dataset_through_the_command(tmp_path):
    """`diffrec score --data synthetic` (the built-in default, 2,500 users): one row per (user, rank)
    in original ids, each user's own history excluded."""
    dataset = synthetic_dataset(seed=0)
    config = TrainConfig(dim=16, layers=1, heads=2, max_len=20, num_steps=20, dropout=0.0, num_samples=2)
    checkpoint = save_checkpoint(tmp_path / "ckpt", list(dataset.item_original_ids[1:]), config=config)
    result = subprocess.run([sys.executable, "-m", "diffrec_ext", "score", "--checkpoint", str(checkpoint), "--data",
                             "synthetic", "--out", str(tmp_path / "recs.parquet"), "-k", "5", "--threads", "1",
                             "--chunk-users", "1000", "--quiet"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "scored 2,500 users" in result.stdout and "users/s" in result.stdout
    got = read_scores(tmp_path / "recs.parquet")
    assert len(got) == 2500 * 5 and not got.duplicated(["user", "rank"]).any()
    assert got["user"].tolist() == np.repeat(dataset.user_original_ids, 5).tolist()
    assert (got.groupby("user")["rank"].apply(list) == [[1, 2, 3, 4, 5]] * 2500).all()
    originals = dataset.item_original_ids
    for user in range(0, 2500, 97):
        seen = set(originals[dataset.sequence(user)].tolist())
        assert not seen & set(got["item"][got["user"] == dataset.user_original_ids[user]])


def test_dataset_users_equal_the_engine(tmp_path, engine):
    from conftest import tiny_dataset

    dataset = tiny_dataset(users=70, items=NUM_ITEMS)
    source = scoring.DatasetUsers(dataset, {"data": "tiny"})
    scoring.score(engine, source, tmp_path / "out", k=5, chunk_users=32, progress=False)  # seed 0
    got = read_scores(tmp_path / "out")
    histories = {int(dataset.user_original_ids[u]): [ITEM_IDS[i - 1] for i in dataset.sequence(u)] for u in range(70)}
    assert_same_rows(got, expected_rows(engine, histories, k=5, chunk=32, seed=0))


# ------------------------------------------------------------------------------------------ resuming
def score_command(checkpoint, histories_path, out, *extra):
    return [sys.executable, "-m", "diffrec_ext", "score", "--checkpoint", str(checkpoint), "--histories",
            str(histories_path), "--out", str(out), "-k", "5", "--chunk-users", "20", "--threads", "1", "--quiet",
            *map(str, extra)]


def test_a_sigkilled_run_resumes_to_each_user_exactly_once(tmp_path, checkpoint_dir, engine):
    histories = random_histories(3000, seed=3)
    path = write_histories(tmp_path / "h.jsonl", histories)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(score_command(checkpoint_dir, path, out), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(out.glob("part-*"))) < 3 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = json.loads((out / scoring.MANIFEST).read_text())
    written = len(list(out.glob("part-*")))
    assert not manifest["complete"] and 3 <= written < 150, "the kill did not land in the middle of the run"
    result = subprocess.run(score_command(checkpoint_dir, path, out), cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert f"{written * 20:,} done by an earlier run" in result.stdout
    assert not list(out.glob(".*"))  # no temporary file left
    got = read_scores(out)
    assert len(got) == 3000 * 5 and not got.duplicated(["user", "rank"]).any()
    assert set(got["user"]) == set(histories)
    assert_same_rows(got, expected_rows(engine, histories, k=5, chunk=20))  # as if never interrupted


def test_reruns_with_other_options_are_refused_and_complete_runs_skipped(tmp_path, engine):
    path = write_histories(tmp_path / "h.jsonl", random_histories(30))
    out = tmp_path / "out"
    scoring.score(engine, scoring.HistoryFile(path), out, k=3, chunk_users=10, progress=False)
    again = scoring.score(engine, scoring.HistoryFile(path), out, k=3, chunk_users=10, progress=False)
    assert again.already_complete and again.scored == 0 and again.rows == 90
    with pytest.raises(scoring.ScoringError, match=r"other options \(k: 3 then, 4 now\)"):
        scoring.score(engine, scoring.HistoryFile(path), out, k=4, chunk_users=10, progress=False)
    write_histories(path, random_histories(30, seed=9))  # the same name, other content
    with pytest.raises(scoring.ScoringError, match="other options .*input"):
        scoring.score(engine, scoring.HistoryFile(path), out, k=3, chunk_users=10, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(scoring.ScoringError, match="is not empty and holds no _manifest.json"):
        scoring.score(engine, scoring.HistoryFile(path), tmp_path / "other", k=3, progress=False)


# ------------------------------------------------------------------------------------------ processes
def test_two_torchrun_processes_write_the_rows_of_one(tmp_path, checkpoint_dir, engine):
    histories = random_histories(130, seed=4)
    path = write_histories(tmp_path / "h.parquet", histories)
    run = run_torchrun(["-m", "diffrec_ext", "score", "--checkpoint", checkpoint_dir, "--histories", path, "--out",
                        tmp_path / "two", "-k", "5", "--chunk-users", "20", "--device", "cpu", "--quiet"], 2)
    assert "scored 130 users" in run.stdout and "2 processes" in run.stdout
    scoring.score(engine, scoring.HistoryFile(path), tmp_path / "one", k=5, chunk_users=20, progress=False,
                  seed=engine.config.seed)  # the command's default: the checkpoint's seed
    two, one = read_scores(tmp_path / "two"), read_scores(tmp_path / "one")
    assert_same_rows(two, one)
    assert sorted(p.name for p in (tmp_path / "two").glob("part-*")) == [f"part-{i:06d}.parquet" for i in range(7)]
    manifest = json.loads((tmp_path / "two" / scoring.MANIFEST).read_text())
    assert manifest["complete"] and manifest["last_run"]["processes"] == 2


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name, content, message", [
    ("h.jsonl", '{"user": 1, "history": ["item-100"]}\n{"user": 2, "history": ["item-101"\n', "line 2: malformed JSON"),
    ("h.jsonl", '{"user": 1, "history": ["item-100"]}\n[1, 2]\n', "line 2: expected a JSON object"),
    ("h.jsonl", '{"user": 1, "history": ["item-100"]}\n{"user": 2}\n', "line 2: no field 'history'"),
    ("h.jsonl", '{"user": 1, "history": "item-100"}\n', "line 1: 'history' must be a list of item ids"),
    ("h.jsonl", '{"user": 1, "history": ["item-100"]}\n\n{"user": 2, "history": []}\n', "line 3: the history is empty"),
    ("h.jsonl", '{"user": 1, "history": ["item-100", 1.5]}\n', "line 1: item 1.5 is not an item id"),
    ("h.jsonl", '{"user": 1, "history": ["item-100", "item-999", "x"]}\n',
     "line 1: 2 item id(s) the model does not know: 'item-999', 'x'"),
    ("h.jsonl", '{"user": 1, "history": ["item-100"]}\n{"user": "b", "history": ["item-100"]}\n',
     "line 2: user 'b' is a string but the file's first user is an integer"),
    ("h.jsonl", '{"user": [1], "history": ["item-100"]}\n', "line 1: the user id must be an integer or a string"),
    ("h.jsonl", "\n\n", "no histories in the file"),
    ("h.csv", "user,items\n1,item-100\n", "line 1: the header has no column 'history'"),
    ("h.csv", "user,history\n1,item-100\n2,item-100,extra\n", "line 3: 3 fields where the header has 2"),
    ("h.csv", "user,history\n1,item-100\nabc,item-101\n", "line 3: user 'abc' is a string"),
    ("h.txt", "1 2 3\n", "cannot tell the format of"),
])
def test_bad_history_files_name_the_line(tmp_path, engine, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises((DataFormatError, scoring.ScoringError)) as error:
        scoring.score(engine, scoring.HistoryFile(path), tmp_path / "out", k=3, chunk_users=1, progress=False)
    assert message in str(error.value)


def test_bad_parquet_columns_and_k_above_what_is_left(tmp_path, engine):
    path = tmp_path / "h.parquet"
    pq.write_table(pa.table({"user": [1.5], "history": [["item-100"]]}), path)
    with pytest.raises(DataFormatError, match="column 'user' must hold integers or strings, got double"):
        scoring.HistoryFile(path)
    pq.write_table(pa.table({"user": [1], "history": ["item-100"]}), path)
    with pytest.raises(DataFormatError, match="column 'history' must hold lists of item ids"):
        scoring.HistoryFile(path)
    pq.write_table(pa.table({"user": [1, 2], "history": [["item-100"], None]}), path)
    with pytest.raises(DataFormatError, match="row 2: the history .* is null"):
        scoring.score(engine, scoring.HistoryFile(path), tmp_path / "a", k=3, progress=False)
    pq.write_table(pa.table({"user": [1, 2], "history": [["item-100"], ITEM_IDS[:38]]}), path)
    with pytest.raises(scoring.ScoringError, match=r"row 2: k = 3 exceeds the 2 items left"):
        scoring.score(engine, scoring.HistoryFile(path), tmp_path / "b", k=3, progress=False)
    with pytest.raises(scoring.ScoringError, match=r"k must be an int in \[1, 40\]"):
        scoring.score(engine, scoring.HistoryFile(path), tmp_path / "c", k=41, progress=False)


def test_command_line_errors(tmp_path, checkpoint_dir):
    path = write_histories(tmp_path / "h.jsonl", random_histories(5))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for extra, message in ((["--data", "synthetic"], "give --data or --histories, not both"),
                           (["-k", "0"], "argument -k/--k: must be a positive integer")):
        result = subprocess.run(score_command(checkpoint_dir, path, tmp_path / "out", *extra), cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ benchmark
def test_scoring_benchmark_runs(tmp_path):
    report_path = tmp_path / "scoring.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_scoring.py"), "--users", "300", "600",
                    "--dim", "16", "--no-dataset-run", "--json", str(report_path)], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    report = json.loads(report_path.read_text())
    assert [run["users"] for run in report["runs"]] == [300, 600]
    assert all(run["rows"] == run["users"] * report["k"] and run["peak_rss_mib"] > 0 for run in report["runs"])
