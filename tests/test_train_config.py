"""The training config: every unknown key and bad value is named at once, before any work starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command

from tests.processes import ROOT
from tripod.training.config import DEFAULTS, KEYS, REQUIRED, TrainConfig, load_config
from tripod.training.errors import ConfigError
from tripod.training.models import TrainingRun


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}\n')
    return path


def config_file(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """Each reported problem by the key it names."""
    return {line.split(":", 1)[0]: line for line in excinfo.value.errors}


BAD = {
    "learnin_rate": 1e-4,
    "finetuning_type": "qlora",
    "lora_rank": 0,
    "lora_dropout": 1.5,
    "lora_target": 3,
    "dataset_format": "csv",
    "cutoff_len": "long",
    "num_train_epochs": -1,
    "max_steps": 0,
    "learning_rate": "fast",
    "lr_scheduler_type": "cosin",
    "warmup_ratio": 1,
    "per_device_train_batch_size": 2.5,
    "logging_steps": 0,
    "bf16": "maybe",
    "seed": -3,
    "resume_from_checkpoint": "no/such/checkpoint",
}


def test_every_unknown_key_and_bad_value_is_named_at_once(tmp_path):
    path = config_file(tmp_path / "bad.yaml", dataset=str(tmp_path / "missing.jsonl"), **BAD)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["output_dir=" + str(tmp_path / "out"), "save_steps=-1", "typo_key=1"])
    found = problems(excinfo)
    assert set(found) == set(BAD) | {"dataset", "save_steps", "typo_key"}
    assert found["learnin_rate"] == "learnin_rate: unknown key (did you mean 'learning_rate'?)"
    assert found["dataset"] == f"dataset: no such file: {tmp_path / 'missing.jsonl'}"
    assert "must be one of full, lora; got 'qlora'" in found["finetuning_type"]
    assert "must be one of linear, cosine," in found["lr_scheduler_type"]
    assert found["lora_rank"] == "lora_rank: must be at least 1, got 0"
    assert found["max_steps"] == "max_steps: must be at least 1 (or -1), got 0"
    assert found["warmup_ratio"] == "warmup_ratio: must be in [0, 1), got 1"
    assert found["per_device_train_batch_size"] == "per_device_train_batch_size: expected an integer, got 2.5"
    assert found["bf16"] == "bf16: expected true or false, got 'maybe'"
    assert "no/such/checkpoint is not a checkpoint directory" in found["resume_from_checkpoint"]
    message = str(excinfo.value)
    assert message.startswith(f"The training config has {len(found)} problems:\n  - ")
    assert not (tmp_path / "out").exists(), "nothing is written before the config is valid"


def test_required_keys_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file(tmp_path / "empty.yaml"))
    assert excinfo.value.errors == ["dataset: required", "output_dir: required"]

    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere\.yaml"):
        load_config(tmp_path / "nowhere.yaml")
    (tmp_path / "broken.yaml").write_text("dataset: [a, b\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line 2, column \d+\)"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- dataset\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys to values at the top level, got list"):
        load_config(tmp_path / "list.yaml")


def test_a_key_given_twice_is_reported(tmp_path, dataset):
    path = tmp_path / "twice.yaml"
    path.write_text(f"dataset: {dataset}\noutput_dir: {tmp_path / 'out'}\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.errors == ["seed: given twice (lines 3 and 4)"]


def test_overrides_are_typed_by_the_schema_and_win_over_the_file(tmp_path, dataset):
    path = config_file(tmp_path / "c.yaml", dataset=str(dataset), output_dir=str(tmp_path / "out"), seed=1)
    config = load_config(
        path,
        [
            "learning_rate=1e-3",  # YAML 1.1 reads this as a string; the schema makes it a float
            "seed=7",
            "bf16=false",
            "lora_target=q_proj,v_proj",
            "max_samples=",
            "num_train_epochs=2",
            "max_steps=1e2",
            "dataset_format=messages",
        ],
    )
    assert config.learning_rate == 1e-3 and config.seed == 7 and config.bf16 is False
    assert config.lora_target == ("q_proj", "v_proj")
    assert config.max_samples is None and config.num_train_epochs == 2.0 and config.max_steps == 100
    assert config.effective_lora_alpha == 16.0, "lora_alpha defaults to twice the rank"
    assert load_config(path, ["lora_target=[k_proj, o_proj]"]).lora_target == ("k_proj", "o_proj")
    assert Path(config.output_dir).is_absolute() and config.dataset == str(dataset)

    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["seed", "=3", "lora_target=[all, q_proj]"])
    assert excinfo.value.errors == [
        "override 'seed': expected key=value",
        "override '=3': expected key=value",
        "lora_target: 'all' cannot be combined with module names",
    ]


def test_output_dir_model_and_lora_combinations(tmp_path, dataset):
    base = [f"dataset={dataset}"]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="output_dir: .*used is not empty; set overwrite_output_dir: true"):
        load_config(None, [*base, f"output_dir={tmp_path / 'used'}"])
    assert load_config(None, [*base, f"output_dir={tmp_path / 'used'}", "overwrite_output_dir=true"])
    with pytest.raises(ConfigError, match="resume_from_checkpoint: true, but .* has no checkpoint-"):
        load_config(None, [*base, f"output_dir={tmp_path / 'used'}", "resume_from_checkpoint=true"])
    with pytest.raises(ConfigError, match="merge_lora: only applies to finetuning_type: lora"):
        load_config(None, [*base, f"output_dir={tmp_path / 'o'}", "finetuning_type=full", "merge_lora=true"])
    with pytest.raises(ConfigError, match="model_name_or_path: no such model directory: .*nowhere"):
        load_config(None, [*base, f"output_dir={tmp_path / 'o'}", "model_name_or_path=./nowhere"])
    with pytest.raises(ConfigError, match="is not a model directory \\(it has no config.json\\)"):
        load_config(None, [*base, f"output_dir={tmp_path / 'o'}", f"model_name_or_path={tmp_path}"])
    hub = load_config(None, [*base, f"output_dir={tmp_path / 'o'}", "model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])
    assert hub.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct", "a hub id is left to from_pretrained"


def test_the_example_configs_are_valid(tmp_path):
    for name in ("tiny_full.yaml", "tiny_lora.yaml"):
        config = load_config(ROOT / "examples" / "train" / name, [f"output_dir={tmp_path / name}"])
        assert config.model_name_or_path == "tiny"
        assert Path(config.dataset) == ROOT / "examples" / "train" / "tripod_faq.jsonl"


def test_the_docs_list_every_key_with_its_default():
    """docs/training.md has a row per key: ``| `key` | `default` | ... |`` (or "required", or a parenthesis)."""
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", (ROOT / "docs" / "training.md").read_text(), re.M))
    assert set(rows) >= set(KEYS), f"undocumented: {sorted(set(KEYS) - set(rows))}"
    for key in KEYS:
        cell, default = rows[key].strip(), DEFAULTS[key]
        if default is REQUIRED:
            assert cell == "required", key
        elif default is None:
            assert cell.startswith("("), key
        else:
            assert yaml.safe_load(cell.strip("`")) == (list(default) if isinstance(default, tuple) else default), key
    assert TrainConfig().finetuning_type == DEFAULTS["finetuning_type"]


@pytest.mark.django_db
def test_the_command_refuses_a_bad_config_before_recording_a_run(tmp_path):
    path = config_file(tmp_path / "bad.yaml", dataset=str(tmp_path / "nope.jsonl"), output_dir=str(tmp_path / "o"))
    with pytest.raises(CommandError) as excinfo:
        call_command("run_train", "--config", str(path), "lora_rank=x", "color=blue")
    message = str(excinfo.value)
    assert "The training config has 3 problems:" in message
    for line in ("dataset: no such file", "lora_rank: expected an integer, got 'x'", "color: unknown key"):
        assert line in message
    assert not TrainingRun.objects.exists()
    assert not (tmp_path / "o").exists()


def test_check_validates_the_config_and_the_dataset_without_training(tmp_path, dataset, capsys):
    call_command("run_train", f"dataset={dataset}", f"output_dir={tmp_path / 'o'}", "--check")
    output = capsys.readouterr().out
    assert "# dataset: 1 conversation, messages format. The config is valid." in output
    assert yaml.safe_load(output)["learning_rate"] == 5e-5
    assert not (tmp_path / "o").exists()


def test_run_train_py_reports_every_problem_and_exits_1(tmp_path):
    """The seed's entry point, as a user runs it: the problems on stderr, no traceback, exit status 1."""
    path = config_file(tmp_path / "bad.yaml", dataset="missing.jsonl", output_dir=str(tmp_path / "o"), lora_rnk=4)
    result = subprocess.run(
        [sys.executable, "run_train.py", "--config", str(path), "learning_rate=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "The training config has 3 problems:" in result.stderr
    assert f"dataset: no such file: {ROOT / 'missing.jsonl'}" in result.stderr
    assert "lora_rnk: unknown key (did you mean 'lora_rank'?)" in result.stderr
    assert "learning_rate: must be greater than 0, got -1" in result.stderr
