"""The built-in ``tiny`` model: a real Hugging Face model directory built locally, no hub needed.

A Llama-shaped model with random weights from a fixed seed and a byte-level BPE tokenizer trained on a
shipped text, with a ChatML chat template that takes tools the way Qwen 2.5's does (so its replies parse with the
``hermes`` tool-call format). It loads through ``from_pretrained`` like any hub model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TINY_NAME = "tiny"
# Bump when the recipe changes, so that cached copies are rebuilt.
TINY_VERSION = 2
SEED = 1234
VOCAB_SIZE = 2048
CONTEXT_LENGTH = 2048
CORPUS = Path(__file__).with_name("tiny_corpus.txt")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]  # added, not special: decoding keeps them for the parser

# ChatML, with tools in the Qwen 2.5 style: the tools' JSON in the system prompt, calls in <tool_call> blocks, tool
# results in <tool_response> blocks inside a user turn. Without tools it renders as plain ChatML. Arguments arrive
# as OpenAI sends them, a JSON string, and are written as they are. The {% generation %} markers let training mask
# everything but the assistant's tokens.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOL_CALL_PROMPT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ " + repr(TOOLS_PROMPT) + " }}"
    "{%- for tool in tools -%}{{ '\\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ " + repr(TOOL_CALL_PROMPT) + " }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "{%- if message['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{%- if call['arguments'] is string -%}{{ call['arguments'] }}{%- else -%}{{ call['arguments'] | tojson }}"
    "{%- endif -%}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tiny_model(out: Path) -> Path:
    """Write the tiny model directory to ``out`` (which must not exist yet) and return it."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    bpe.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=CONTEXT_LENGTH
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in TOOL_CALL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_once(cache_dir: Path, name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``cache_dir/name``, made by ``build(directory)`` the first time only (safe across processes).

    The build writes into a staging directory that is renamed into place, so a reader never sees half of it.
    """
    target = cache_dir / name
    if (target / marker).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / marker).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=cache_dir))
        try:
            build(staging / "out")
            os.replace(staging / "out", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return the cached tiny model directory, building it once (safe across processes)."""
    return build_once(cache_dir, f"tiny-v{TINY_VERSION}", "config.json", build_tiny_model)


def resolve_model_path(model: str, cache_dir: Path) -> str:
    """``tiny`` becomes the built directory; hub ids and local paths go to ``from_pretrained`` as given."""
    if model == TINY_NAME:
        return str(ensure_tiny_model(cache_dir))
    return model
