"""Command-line tests: --help everywhere, a tiny train / evaluate / recommend / prepare round trip,
clear errors for malformed values."""

import json

import pytest

from diffrec_ext import cli
from diffrec_ext.synthetic import write_synthetic

COMMANDS = ["demo", "prepare", "download", "train", "evaluate", "recommend", "serve"]
TINY_FLAGS = ["--dim", "16", "--layers", "1", "--heads", "2", "--max-len", "8", "--num-steps", "20", "--num-samples", "2",
              "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--quiet"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command.split()[0] in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert f"usage: diffrec {command}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    write_synthetic(path, num_users=60, num_items=40, num_clusters=4, min_length=6, max_length=12)
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    code = cli.main(["train", "--data", str(tiny_file), "--out", str(run_dir), "--k-core", "2", *TINY_FLAGS])
    assert code == 0
    return run_dir


def test_train_via_cli_writes_a_run(trained_run, tiny_file, tmp_path, capsys):
    assert (trained_run / "log.jsonl").is_file() and (trained_run / "best.json").is_file()
    lines = (trained_run / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # stats at the start, tables at the end
    code, out, _ = run(capsys, "train", "--data", str(tiny_file), "--out", str(tmp_path / "r2"), "--k-core", "2",
                       "--kind", "sasrec", "--mode", "user", *TINY_FLAGS)
    assert code == 0
    assert "users" in out and "items" in out and "actions" in out
    assert "popularity" in out and "NDCG@10" in out
    # an existing run is not overwritten without --resume; --resume of a finished run just tests it
    code, _, err = run(capsys, "train", "--data", str(tiny_file), "--out", str(tmp_path / "r2"), "--k-core", "2",
                       "--kind", "sasrec", "--mode", "user", *TINY_FLAGS)
    assert code == 2 and "already holds a run" in err
    code, out, _ = run(capsys, "train", "--data", str(tiny_file), "--out", str(tmp_path / "r2"), "--k-core", "2",
                       "--kind", "sasrec", "--mode", "user", "--resume", *TINY_FLAGS)
    assert code == 0 and "resuming" in out


def test_evaluate_via_cli(trained_run, capsys, tmp_path):
    report = tmp_path / "eval.json"
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(trained_run), "--split", "both", "--device", "cpu",
                       "--quiet", "--json", str(report))
    assert code == 0 and "valid split" in out and "test split" in out
    data = json.loads(report.read_text())
    assert set(data) == {"valid", "test"} and "NDCG@10" in data["test"]["diffrec"]
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(trained_run), "--method", "alg2", "--stride", "5",
                       "--num-samples", "1", "--device", "cpu", "--quiet")
    assert code == 0 and "alg2" in out


def test_recommend_via_cli(trained_run, capsys, tmp_path):
    code, out, _ = run(capsys, "recommend", "--checkpoint", str(trained_run), "--user", "1", "-k", "5",
                       "--device", "cpu")
    assert code == 0 and "top-5 for user 1" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].rstrip(".").isdigit()]) == 5
    titles = tmp_path / "items.dat"
    titles.write_bytes("".join(f"{i}::Caf\xe9 film {i} (1999)::Drama\n" for i in range(1, 41)).encode("latin-1"))
    code, out, _ = run(capsys, "recommend", "--checkpoint", str(trained_run), "--history", "3", "7", "11",
                       "-k", "4", "--items", str(titles), "--json", "--device", "cpu")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 4 and all(r["item"] not in (3, 7, 11) for r in rows)
    assert all(r["title"].startswith("Café film") for r in rows)
    code, _, err = run(capsys, "recommend", "--checkpoint", str(trained_run), "--user", "999999")
    assert code == 2 and "not in the dataset" in err
    code, _, err = run(capsys, "recommend", "--checkpoint", str(trained_run))
    assert code == 2 and "exactly one of" in err


def test_prepare_round_trip(tiny_file, tmp_path, capsys):
    out_file = tmp_path / "prepared.txt.gz"
    code, out, _ = run(capsys, "prepare", str(tiny_file), "--k-core", "2", "--out", str(out_file))
    assert code == 0 and "users" in out and out_file.is_file()
    code, again, _ = run(capsys, "prepare", "--data", str(out_file), "--k-core", "2")
    assert code == 0
    assert again.splitlines()[0].split(":", 1)[1] == out.splitlines()[0].split(":", 1)[1]
    code, _, err = run(capsys, "prepare", str(tmp_path / "missing.txt"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "2"], "dropout"),
    (["--dim", "30", "--heads", "4"], "divisible"),
    (["--mode", "user", "--no-causal"], "causal"),
    (["--num-steps", "0"], "num_steps"),
])
def test_malformed_config_values_are_clear_errors(tiny_file, tmp_path, capsys, flags, message):
    code, _, err = run(capsys, "train", "--data", str(tiny_file), "--out", str(tmp_path / "x"), *TINY_FLAGS, *flags)
    assert code == 2 and "invalid config" in err and message in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags", [["--dim", "abc"], ["--kind", "bert4rec"], ["--lr", "fast"]])
def test_unparsable_values_exit_2(tiny_file, tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(tiny_file), "--out", str(tmp_path / "x"), *flags])
    assert exit_info.value.code == 2


def test_config_file(tiny_file, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": 16, "hidden_units": 3}))
    code, _, err = run(capsys, "train", "--data", str(tiny_file), "--out", str(tmp_path / "x"), "--config", str(bad))
    assert code == 2 and "unknown config keys" in err


def test_download_calls_the_downloader(monkeypatch, tmp_path, capsys):
    from diffrec_ext import download

    calls = {}

    def fake(name, dest_dir, base_url=None, *, md5=None, force=False, timeout=60.0):
        calls.update(name=name, dest=dest_dir, base_url=base_url, md5=md5, force=force)
        return tmp_path / "ml-1m" / "ratings.dat"

    monkeypatch.setattr(download, "download", fake)
    code, out, _ = run(capsys, "download", "ml-1m", "--dest", str(tmp_path), "--force")
    assert code == 0 and out.strip().endswith("ratings.dat")
    assert calls["name"] == "ml-1m" and calls["force"] is True


def test_demo_runs_end_to_end_on_tiny_settings(monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEMO_DEFAULTS", {**cli.DEMO_DEFAULTS, "dim": 16, "layers": 1, "num_steps": 20,
                                               "num_samples": 2})
    code, out, _ = run(capsys, "demo", "--epochs", "1", "--quiet", "--device", "cpu")
    assert code == 0
    for name in ("popularity", "SASRec", "DiffRec", "HR@5", "NDCG@20", "x popularity"):
        assert name in out


def test_evaluate_reproduces_a_bf16_runs_test_metrics(tiny_file, tmp_path, capsys):
    """A run trained with --bf16 on evaluated its test split under bf16 autocast; `evaluate` on its
    checkpoint must do the same, not silently rank in float32."""
    from diffrec_ext.checkpoint import load_model
    from diffrec_ext.data import load_dataset
    from diffrec_ext.train import evaluate

    run_dir = tmp_path / "run"
    assert cli.main(["train", "--data", str(tiny_file), "--out", str(run_dir), "--k-core", "2", "--bf16", "on",
                     *TINY_FLAGS]) == 0
    recorded = json.loads((run_dir / "result.json").read_text())["test"]
    report = tmp_path / "eval.json"
    code, out, _ = run(capsys, "evaluate", "--checkpoint", str(run_dir), "--split", "test", "--device", "cpu",
                       "--quiet", "--json", str(report))
    assert code == 0 and "bf16" in out
    assert json.loads(report.read_text())["test"]["diffrec"] == recorded
    # the check has teeth: the same checkpoint ranked in float32 gives other numbers
    model, config = load_model(run_dir)[:2]
    dataset = load_dataset(tiny_file, k_core=2)
    float32 = evaluate(model, dataset, "test", num_samples=config.num_samples, algorithm=config.inference,
                       exclude_seen=config.eval_exclude_seen, seed=config.seed,
                       batch_size=config.eval_batch_size, bf16=False)
    assert float32 != recorded
