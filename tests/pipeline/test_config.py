import pytest

from pipeline.config import defaults, load_config, parse_count
from stores.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_repo_default_config_is_valid_and_documented():
    from conftest import REPO
    cfg = load_config(REPO / "pipeline.yaml")
    assert cfg.data.importer == "digits"
    text = (REPO / "pipeline.yaml").read_text()
    for section in ("root", "data", "model", "generate", "features", "train", "eval", "analyze", "ray"):
        assert f"\n{section}:" in "\n" + text


def test_file_values_and_flag_overrides(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 64\n  lr: 1\n")
    cfg = load_config(p, {"train.batch_size": 32, "root": "/x"})
    assert cfg.train.batch_size == 32 and cfg.root == "/x"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.generate.steps == defaults()["generate"]["steps"]


@pytest.mark.parametrize("text, needle", [
    ("train:\n  batchsize: 3\n", "unknown key 'train.batchsize'"),
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("train:\n  batch_size: many\n", "'train.batch_size' must be integer"),
    ("train:\n  unsup_fraction: 1.0\n", "'train.unsup_fraction' must be < 1.0"),
    ("train:\n  batch_size: 0\n", "'train.batch_size' must be >= 1"),
    ("features:\n  pool: 3\n", "'features.pool' must be one of"),
    ("features:\n  timesteps: [1, x]\n", "'features.timesteps' must be a list of integer"),
    ("train:\n  dra: 1\n", "'train.dra' must be true/false"),
    ("train: 5\n", "section 'train' must be a mapping"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_keys_rejected_with_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_config(p)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
    if "YAML" not in needle:
        assert str(p) in str(err.value)


def test_bad_override_rejected():
    with pytest.raises(UserError, match="command line: key 'data.shard_size' must be >= 1"):
        load_config(None, {"data.shard_size": 0})


def test_missing_explicit_config_rejected(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, value", [("20M", 20_000_000), ("1.5k", 1500), ("1e6", 1_000_000), ("50000", 50000),
                                         (7, 7)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "3x", "1.5", "", "inf", "nan"])
def test_parse_count_rejects(text):
    with pytest.raises(UserError):
        parse_count(text)
