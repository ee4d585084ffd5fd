"""Bad sampler settings through the real CLI: one line, exit 2, nothing written (issue 27)."""
from __future__ import annotations

import pytest
from badinputs import check_one_line


@pytest.fixture
def churn_config(tmp_path):
    path = tmp_path / "ipndm-churn.yaml"
    path.write_text("generate:\n  sampler: ipndm\n  churn: 5.0\n")
    return path


@pytest.mark.parametrize("argv, fragment", [
    ("generate --dry-run --sampler unipc --root {ws}", "key 'generate.sampler' must be one of"),
    ("generate --dry-run --sampler dpm-solver-3m --steps 2 --root {ws}", "at least 3 for dpm-solver-3m (got 2)"),
    ("bench sampler --fidelity --images 0 --root {ws}", "bench --images 0"),
])
def test_bad_sampler_input_gets_one_line(cli, bad, tmp_path, argv, fragment):
    check_one_line(cli, bad, tmp_path, argv, 2, fragment)


def test_churn_with_a_multistep_solver_gets_one_line(cli, bad, tmp_path, churn_config):
    argv = ["generate", "--dry-run", "--config", str(churn_config), "--root", "{ws}"]
    check_one_line(cli, bad, tmp_path, argv, 2, "set generate.churn: 0 for ipndm")
