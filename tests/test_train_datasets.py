"""Dataset files to conversations, and conversations to labelled tokens with the tiny model's chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tripod.conf import config as tripod_config
from tripod.engines.tiny import EOS_TOKEN, ensure_tiny_model
from tripod.training.datasets import load_conversations
from tripod.training.errors import DatasetError, TrainingError
from tripod.training.formatting import IGNORE_INDEX, PaddingCollator, build_examples, encode_conversation

EXPECTED = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who wrote Hamlet?\nAnswer with a name."},
        {"role": "assistant", "content": "Shakespeare."},
    ],
]
MESSAGES = [{"messages": conversation} for conversation in EXPECTED]
ALPACA = [
    {"instruction": "Capital of France?", "output": "Paris.", "system": "Be brief."},
    {
        "instruction": "Who wrote Hamlet?",
        "input": "Answer with a name.",
        "output": "Shakespeare.",
        "history": [["Hi", "Hello."]],
    },
]
SHAREGPT = [
    {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}],
    },
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Who wrote Hamlet?\nAnswer with a name."},
            {"from": "gpt", "value": "Shakespeare."},
        ]
    },
]


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_tiny_model(tripod_config().cache_dir))


@pytest.mark.parametrize(("name", "records"), [("messages", MESSAGES), ("alpaca", ALPACA), ("sharegpt", SHAREGPT)])
def test_each_format_is_detected_and_read_into_the_same_conversations(tmp_path, name, records):
    assert load_conversations(jsonl(tmp_path / "d.jsonl", records)) == (EXPECTED, name)
    assert load_conversations(jsonl(tmp_path / "d.jsonl", records), name) == (EXPECTED, name)
    (tmp_path / "d.json").write_text(json.dumps(records))
    assert load_conversations(tmp_path / "d.json") == (EXPECTED, name), "a .json file holds a list of records"
    assert load_conversations(tmp_path / "d.json", max_samples=1) == (EXPECTED[:1], name)


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MESSAGES[0]) + "\n\n" + '{"messages": [}\n' + json.dumps(MESSAGES[1]) + "\n")
    with pytest.raises(DatasetError) as excinfo:
        load_conversations(path)
    assert str(excinfo.value) == f"{path}:3: not valid JSON: Expecting value (column 15)"


def test_records_that_do_not_fit_the_format_are_each_named_by_line(tmp_path):
    records = [
        MESSAGES[0],
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        ["not", "an", "object"],
        {"messages": [{"role": "assistant", "content": 3}]},
    ]
    path = jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(DatasetError) as excinfo:
        load_conversations(path)
    assert str(excinfo.value).splitlines() == [
        f"4 bad record(s) in {path}:",
        f"  - {path}:2: messages record has no assistant turn to learn from",
        f"  - {path}:3: messages record: messages[0].role must be one of system, user, assistant, got 'robot'",
        f"  - {path}:4: expected a JSON object, got list",
        f"  - {path}:5: messages record: messages[0].content must be a string, got int",
    ]


def test_unknown_shapes_empty_and_missing_files(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DatasetError, match=r"odd\.jsonl:1: cannot tell the dataset format from this record \(answer, question\)"
    ):
        load_conversations(path)
    with pytest.raises(DatasetError, match=r"sharegpt record: 'conversations' must be a non-empty list"):
        load_conversations(jsonl(tmp_path / "a.jsonl", ALPACA), "sharegpt")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match=r"dataset file not found: .*missing\.jsonl"):
        load_conversations(tmp_path / "missing.jsonl")


def decoded_labels(tokenizer, labels: list[int]) -> list[str]:
    """The labelled (trained-on) stretches of an example, each decoded."""
    stretches, current = [], []
    for token in [*labels, IGNORE_INDEX]:
        if token == IGNORE_INDEX:
            if current:
                stretches.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return stretches


def test_loss_is_on_every_assistant_turn_and_its_end_token_only(tokenizer):
    rows = build_examples(tokenizer, EXPECTED, cutoff_len=512).rows
    assert decoded_labels(tokenizer, rows[0]["labels"]) == [f"Paris.{EOS_TOKEN}"]
    assert decoded_labels(tokenizer, rows[1]["labels"]) == [f"Hello.{EOS_TOKEN}", f"Shakespeare.{EOS_TOKEN}"]
    # The prompt part is tokenized exactly as the server tokenizes a request (template + generation prompt).
    prompt = tokenizer.apply_chat_template(EXPECTED[0][:2], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert rows[0]["input_ids"][: len(prompt_ids)] == prompt_ids
    assert rows[0]["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)


def test_templates_without_generation_markers_locate_assistant_turns_by_rendering(tokenizer):
    plain = AutoTokenizer.from_pretrained(ensure_tiny_model(tripod_config().cache_dir))
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask = encode_conversation(plain, EXPECTED[1])
    marked_ids, marked_mask = encode_conversation(tokenizer, EXPECTED[1])
    assert ids == marked_ids
    # Rendering up to the end of a turn takes the template's newline after the end token with it.
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    assert decoded_labels(plain, labels) == [f"Hello.{EOS_TOKEN}\n", f"Shakespeare.{EOS_TOKEN}\n"]
    assert sum(mask) == sum(marked_mask) + 2


WORDS = st.from_regex(r"[A-Za-z0-9,.!?']{1,8}( [A-Za-z0-9,.!?']{1,8}){0,6}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=3), system=st.none() | WORDS)
def test_labels_are_exactly_the_assistant_replies_for_any_conversation(tokenizer, turns, system):
    conversation = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    (row,) = build_examples(tokenizer, [conversation], cutoff_len=4096).rows
    assert decoded_labels(tokenizer, row["labels"]) == [f"{answer}{EOS_TOKEN}" for _, answer in turns]


def test_cutoff_truncates_and_drops_examples_left_without_an_answer(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    examples = build_examples(tokenizer, [EXPECTED[0], long_prompt], cutoff_len=64)
    assert (len(examples.rows), examples.truncated, examples.dropped) == (1, 1, 1)
    assert all(len(row["input_ids"]) <= 64 for row in examples.rows)
    with pytest.raises(TrainingError, match="No example has an assistant token within cutoff_len=8"):
        build_examples(tokenizer, EXPECTED, cutoff_len=8)


def test_the_collator_pads_inputs_labels_and_attention():
    batch = PaddingCollator(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
