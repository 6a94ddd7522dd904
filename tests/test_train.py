"""The training leg end to end: train the real tiny model until it has memorised a few answers, then serve it.

Each trained model is served by a real daphne (``TRIPOD_MODEL=<output_dir>``, or ``TRIPOD_ADAPTER`` for a
LoRA adapter) and asked every question through the official ``openai`` client at temperature 0: the answers
must come back word for word, ending at the model's end-of-turn token (``finish_reason == "stop"``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import openai
import pytest
import torch
import yaml
from django.core.management import call_command

from tests.processes import LiveServer
from tripod.conf import config as tripod_config
from tripod.engines import ChatModel
from tripod.training.config import TrainConfig, load_config
from tripod.training.errors import TrainingError
from tripod.training.losslog import LOG_NAME, PLOT_NAME, loss_figure, read_loss_log
from tripod.training.models import TrainingRun
from tripod.training.trainer import train

SYSTEM = "Answer in one short sentence."
# (history, question, answer): one conversation has a system prompt, one has an earlier exchange.
CONVERSATIONS = [
    ([], "What is the capital of France?", "Paris is the capital of France."),
    ([], "Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ([{"role": "system", "content": SYSTEM}], "What colour is a clear sky?", "A clear sky is blue."),
    ([], "How many legs does a spider have?", "A spider has eight legs."),
    (
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, ask me anything."}],
        "What do bees make?",
        "Bees make honey.",
    ),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Train on one thread: a model this small is no faster on two, and two spinning threads on a busy
    two-core machine ran ten times slower here (59 s against 5 s for the example config)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def messages_of(history: list[dict], question: str) -> list[dict]:
    return [*history, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train-data") / "qa.jsonl"
    with path.open("w") as out:
        for history, question, answer in CONVERSATIONS:
            messages = [*messages_of(history, question), {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def configured(values: dict) -> TrainConfig:
    """A validated config from ``key=value`` overrides alone, as the command line gives them."""
    return load_config(None, [f"{key}={value}" for key, value in values.items()])


def full_config(dataset: Path, output_dir: Path, **extra) -> dict:
    return {
        "model_name_or_path": "tiny",
        "finetuning_type": "full",
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 5,
        "max_steps": 80,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 10,
        "save_steps": 40,
        **extra,
    }


def lora_config(dataset: Path, output_dir: Path, **extra) -> dict:
    return {
        **full_config(dataset, output_dir),
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "max_steps": 150,
        "learning_rate": 5e-3,
        "save_steps": 0,
        **extra,
    }


def assert_answers_word_for_word(env: dict[str, str]) -> None:
    """Serve with ``env`` on a real daphne; every question's greedy answer is the trained one, then EOS."""
    server = LiveServer({"TRIPOD_SERVED_MODEL_NAME": "trained", **env})
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [model.id for model in client.models.list()] == ["trained"]
        for history, question, answer in CONVERSATIONS:
            reply = client.chat.completions.create(
                model="trained", messages=messages_of(history, question), temperature=0, max_tokens=48
            )
            assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (answer, "stop")
    finally:
        server.stop()


def smoothed_line(entries: list[dict]) -> list[float]:
    """The values of the plot's line labelled "smoothed", as ``training_loss.png`` draws it."""
    (line,) = [line for line in loss_figure(entries, "run").axes[0].get_lines() if line.get_label() == "smoothed"]
    return [float(value) for value in line.get_ydata()]


def noisy_log(steps: range, trend, noise: float) -> tuple[list[dict], list[float]]:
    """Log entries around ``trend(step)``, each off by a seeded random factor; and the trend itself."""
    rng = random.Random(19)
    truth = [trend(step) for step in steps]
    return [{"step": s, "loss": t * math.exp(rng.gauss(0, noise))} for s, t in zip(steps, truth, strict=True)], truth


def test_the_smoothed_loss_follows_the_loss_to_its_end():
    # A short log like the LoRA example's: fifteen points falling from 8 to 0.02 (a moving average ended at 0.8).
    entries, truth = noisy_log(range(10, 160, 10), lambda step: 8 * math.exp(-0.042 * (step - 10)) + 0.01, 0.2)
    line = smoothed_line(entries)
    assert line[-1] == pytest.approx(truth[-1], rel=0.3), (line, truth)
    assert line[0] == pytest.approx(truth[0], rel=0.3), (line, truth)

    # A long, noisy log: the line is nearer the trend than the losses are, and ends on it.
    entries, truth = noisy_log(range(1, 1001), lambda step: 3 * math.exp(-step / 200) + 0.5, 0.3)
    line = smoothed_line(entries)

    def error(values):
        return math.sqrt(sum((math.log(v / t)) ** 2 for v, t in zip(values, truth, strict=True)) / len(truth))

    assert error(line) < error([entry["loss"] for entry in entries]) / 3
    assert line[-1] == pytest.approx(truth[-1], rel=0.1) and line[0] == pytest.approx(truth[0], rel=0.1)


@pytest.mark.django_db
def test_full_fine_tuning_memorises_and_the_server_serves_it(dataset, tmp_path):
    out = tmp_path / "full"
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(full_config(dataset, tmp_path / "elsewhere")))
    # The command line overrides the file.
    call_command("run_train", "--config", str(path), "--no-progress", f"output_dir={out}")

    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.SUCCEEDED
    assert run.output_dir == str(out)
    assert run.config["output_dir"] == str(out) and run.config["dataset_format"] == "messages"
    assert run.global_step == run.max_steps == 80
    assert run.finished_at > run.started_at and run.error == ""
    log = read_loss_log(out / LOG_NAME)
    assert [entry["step"] for entry in log] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert run.final_loss == log[-1]["loss"] < 0.05 < log[0]["loss"]
    assert (out / PLOT_NAME).read_bytes().startswith(PNG_MAGIC)
    assert (out / "checkpoint-40" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert yaml.safe_load((out / "train_config.yaml").read_text())["learning_rate"] == 3e-3
    assert not (tmp_path / "elsewhere").exists()

    assert_answers_word_for_word({"TRIPOD_MODEL": str(out)})


@pytest.mark.django_db
def test_lora_adapter_memorises_and_the_server_serves_it_with_tripod_adapter(dataset, tmp_path):
    out = tmp_path / "lora"
    result = train(configured(lora_config(dataset, out)), progress=False)

    assert result.adapter and result.global_step == 150
    assert TrainingRun.objects.get(pk=result.run_id).status == TrainingRun.Status.SUCCEEDED
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny"
    assert adapter_config["r"] == 16
    assert not (out / "model.safetensors").exists(), "an adapter, not a model"
    assert not list(out.glob("checkpoint-*")), "save_steps: 0 keeps only the final adapter"
    log = read_loss_log(out / LOG_NAME)
    assert len(log) == 15 and smoothed_line(log)[-1] == pytest.approx(log[-1]["loss"], rel=0.5), log

    assert_answers_word_for_word({"TRIPOD_MODEL": "tiny", "TRIPOD_ADAPTER": str(out)})


@pytest.mark.django_db
def test_merged_lora_is_a_plain_model_directory(dataset, tmp_path):
    out = tmp_path / "merged"
    assert not train(configured(lora_config(dataset, out, merge_lora=True)), progress=False).adapter
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    # The engine the server runs, in process: the merged directory loads with no adapter and answers.
    model = ChatModel(engine="hf", model_name="merged", path=str(out), cache_dir=tripod_config().cache_dir)
    model.load()
    for history, question, answer in CONVERSATIONS:
        reply = model.generate(messages_of(history, question), temperature=0, max_tokens=48)
        assert (reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]) == (answer, "stop")


@pytest.mark.django_db
def test_resume_from_checkpoint_continues_where_the_run_stopped(dataset, tmp_path):
    settings = full_config(dataset, tmp_path / "whole", max_steps=8, save_steps=4, logging_steps=1)
    whole = read_loss_log(train(configured(settings), progress=False).output_dir / LOG_NAME)

    # A run that "crashed" after its step-4 checkpoint: the log holds entries past it, the later checkpoint is gone.
    out = tmp_path / "resumed"
    train(configured({**settings, "output_dir": out}), progress=False)
    shutil.rmtree(out / "checkpoint-8")
    result = train(configured({**settings, "output_dir": out, "resume_from_checkpoint": True}), progress=False)

    log = read_loss_log(out / LOG_NAME)
    assert [entry["step"] for entry in log] == list(range(1, 9)), "no step is lost or logged twice"
    assert result.global_step == 8
    assert [e["loss"] for e in log] == pytest.approx([e["loss"] for e in whole], rel=1e-4), "resume is exact"
    assert TrainingRun.objects.filter(status=TrainingRun.Status.SUCCEEDED).count() == 3


@pytest.mark.django_db
def test_a_run_that_fails_after_starting_is_recorded_as_failed(dataset, tmp_path):
    config = configured({"dataset": dataset, "output_dir": tmp_path / "out", "lora_target": "[q_proj, nope]"})
    with pytest.raises(TrainingError, match="lora_target: the model has no nope; its linear layers: .*q_proj"):
        train(config, progress=False)
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.FAILED
    assert "nope" in run.error and run.finished_at is not None


@pytest.mark.django_db
def test_runs_are_listed_in_the_admin(admin_client):
    TrainingRun.objects.create(config={"model_name_or_path": "tiny", "finetuning_type": "lora"}, output_dir="/x/lora")
    TrainingRun.objects.create(
        config={"model_name_or_path": "tiny", "finetuning_type": "full"},
        output_dir="/x/full",
        status=TrainingRun.Status.FAILED,
        error="boom",
        global_step=3,
        max_steps=8,
    )
    page = admin_client.get("/admin/training/trainingrun/").content.decode()
    for field, value in [("output_dir", "/x/lora"), ("finetuning_type", "lora"), ("status", "Running")]:
        assert f'class="field-{field}">{value}<' in page
    for field, value in [("output_dir", "/x/full"), ("model_name", "tiny"), ("status", "Failed"), ("steps", "3/8")]:
        assert f'class="field-{field}">{value}<' in page
    assert admin_client.get("/admin/training/trainingrun/add/").status_code == 403, "runs come from run_train"
