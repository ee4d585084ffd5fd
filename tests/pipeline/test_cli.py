import sys

import pytest
import yaml

from pipeline.cli.main import app


def command_names():
    import typer.main
    return sorted(typer.main.get_command(app).commands)


def leaf_commands():
    """Every runnable command as its argv prefix, e.g. ['model', 'info']."""
    import typer.main
    out = []
    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, prefix + [name])
            else:
                out.append(prefix + [name])
    walk(typer.main.get_command(app), [])
    return out


def test_help_lists_every_command_with_purpose(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for name in command_names():
        assert name in out
    assert "import" in command_names() and "verify" in command_names()


def test_every_command_takes_config_and_root(cli):
    for argv in leaf_commands():
        code, out, _ = cli(*argv, "--help")
        assert code == 0 and "--config" in out and "--root" in out, argv


def test_config_prints_resolved_values_with_overrides(cli, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("train:\n  epochs: 3\n")
    code, out, _ = cli("config", "--root", tmp_path / "elsewhere")
    assert code == 0
    resolved = yaml.safe_load(out.split("\n", 1)[1])
    assert resolved["train"]["epochs"] == 3 and resolved["root"] == str(tmp_path / "elsewhere")
    assert resolved["features"]["timesteps"] == [100]


def test_bad_config_key_exit_2_one_line(cli, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("train:\n  epoch: 3\n")
    code, _, err = cli("ls")
    assert code == 2 and "unknown key 'train.epoch'" in err and "pipeline.yaml" in err and err.count("\n") == 1


def test_run_imports_and_lists_then_reuses(cli, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("run:\n  stages: [import]\n")
    code, out, _ = cli("run", "--root", tmp_path / "ws")
    assert code == 0 and "imported digits-train" in out and "complete" in out
    code, out, _ = cli("run", "--root", tmp_path / "ws")
    assert code == 0 and "already imported: digits-train" in out


def test_ls_shows_partial_sets(cli, tmp_path):
    cli("import", "digits", "--shard-size", "400")
    from stores.images import ImageSet
    from stores.manifest import write_manifest
    s = ImageSet.open(tmp_path / "dra-data", "digits-train")
    write_manifest(s.path, {i: r for i, r in s.records.items() if i != 1})
    code, out, _ = cli("ls")
    assert code == 0
    row = next(line for line in out.splitlines() if "digits-train" in line)
    assert "partial 3/4" in row and "1,038/1,438" in row
    code, out, _ = cli("verify", "digits-train")
    assert code == 1 and "digits-train: shard 1 missing" in out


def test_verify_unknown_set(cli):
    code, _, err = cli("verify", "nope")
    assert code == 2 and "no image or feature set named 'nope'" in err


def test_run_rejects_unknown_stage(cli, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("run:\n  stages: [import, deploy]\n")
    code, _, err = cli("run")
    assert code == 2 and "'deploy' is not one of import" in err


@pytest.mark.parametrize("seeds, needle", [("0,x", "--seeds must be comma-separated integers"),
                                           ("1,1", "run.seeds must list distinct seeds"),
                                           ("0,-1", "key 'run.seeds' items must be >= 0")])
def test_run_rejects_bad_seeds_before_any_stage(cli, tmp_path, seeds, needle):
    (tmp_path / "pipeline.yaml").write_text("run:\n  stages: [import]\n")
    code, out, err = cli("run", "--seeds", seeds)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "dra-data").exists()


def test_run_trains_each_setting_once_per_seed(tmp_path):
    from pipeline.config import load_config
    from pipeline.run import train_variants
    (tmp_path / "pipeline.yaml").write_text("{}\n")
    cfg = load_config(tmp_path / "pipeline.yaml", {"run.seeds": [3, 5]})
    assert [(v.train.dra, v.train.seed) for v in train_variants(cfg)] == [(False, 3), (False, 5), (True, 3), (True, 5)]
    one = load_config(tmp_path / "pipeline.yaml", {"run.compare_dra": False, "train.seed": 7})
    assert [(v.train.dra, v.train.seed) for v in train_variants(one)] == [(True, 7)]


def test_run_name_prefixes_every_run_and_none_keeps_the_default(tmp_path):
    from pipeline.config import load_config
    from pipeline.run import run_name, train_variants
    (tmp_path / "pipeline.yaml").write_text("{}\n")
    named = load_config(tmp_path / "pipeline.yaml", {"run.seeds": [3], "run.name": "v2"})
    assert [run_name(v) for v in train_variants(named)] == ["v2-small-cnn-nodra-3", "v2-small-cnn-dra-3"]
    zero = load_config(tmp_path / "pipeline.yaml", {"run.name": "z", "train.dra_lambda": 0.0, "run.compare_dra": False})
    assert [run_name(v) for v in train_variants(zero)] == ["z-small-cnn-nodra-0"]      # lambda 0 is DRA off
    plain = load_config(tmp_path / "pipeline.yaml")
    assert [run_name(v) for v in train_variants(plain)] == [None, None]


def test_run_rejects_a_bad_name_before_any_stage(cli, tmp_path):
    (tmp_path / "pipeline.yaml").write_text("run:\n  stages: [import]\n")
    code, _, err = cli("run", "--name", "a/b")
    assert code == 2 and "a/b" in err and err.count("\n") == 1
    assert not (tmp_path / "dra-data").exists()


def test_run_without_pyautoattack_stops_before_the_first_stage(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.evaluate.autoattack_available", lambda: False)
    code, _, err = cli("run")
    assert code == 2 and "pyautoattack is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "dra-data").exists()
    (tmp_path / "pipeline.yaml").write_text("run:\n  stages: [import]\n")          # no eval stage: no need
    assert cli("run")[0] == 0


def test_ctrl_c_in_a_command_without_its_own_handler_is_one_line(tmp_path):
    """Typer turns Ctrl-C into a silent exit 130: the user must still read what is kept and how to resume."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    np.savez(tmp_path / "many.npz", image=np.zeros((20_000, 8, 8, 1), np.uint8), label=np.arange(20_000) % 10)
    script = "import sys; from pipeline.cli.main import main; sys.argv = ['dra-pipe', *sys.argv[1:]]; main()"
    proc = subprocess.Popen([sys.executable, "-c", script, "import", "npz", "--from", str(tmp_path / "many.npz"),
                             "--root", str(tmp_path / "ws"), "--shard-size", "64"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "ws").glob("images/*/*.tar")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["interrupted: finished shards and checkpoints are kept; "
                                        "rerun the same command to resume"], err[-2000:]


@pytest.mark.parametrize("kind", ["shard", "worker", "job"])
def test_a_failed_shard_worker_or_job_is_one_line_and_exit_1(monkeypatch, capsys, kind):
    """The runner's and run.parallel's failures reach the user as one line (exit 1), never as a traceback."""
    import click

    from pipeline.cli import main as cli_main
    from pipeline.parallel import JobFailed
    from pipeline.shards.runner import ShardFailed, WorkerStartError
    error = {"shard": ShardFailed(3, 3, "ValueError: boom"), "worker": WorkerStartError("w0 did not start"),
             "job": JobFailed("job x failed: ValueError: boom")}[kind]

    @click.command()
    def broken():
        raise error
    monkeypatch.setattr(cli_main.typer.main, "get_command", lambda app: broken)
    monkeypatch.setattr(sys, "argv", ["dra-pipe"])
    with pytest.raises(SystemExit) as info:
        cli_main.main()
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and str(error) in err and "rerun the same command" in err


def test_every_flag_that_stands_for_a_key_names_its_default():
    """`[config KEY]` in an option's help gets the key's built-in default; a help naming a key the schema lacks
    fails here rather than when a user asks for help."""
    import re

    import typer

    from pipeline.cli.main import _prepare_help, app
    from pipeline.config import key_spec
    command = typer.main.get_command(app)
    _prepare_help(command)
    seen = []

    def walk(cmd):
        for param in cmd.params:
            for key in re.findall(r"\[config ([a-z_]+\.[a-z_]+)", getattr(param, "help", None) or ""):
                seen.append(key)
                default = key_spec(key).default
                assert f"[config {key}, built-in default {'null' if default is None else default}" in param.help
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
    walk(command)
    assert len(seen) > 30 and "generate.n" in seen and "train.dra_lambda" in seen
