"""``python -m tripod.bench.constrained``: what grammar-constrained decoding costs on ``hf-cb``, in this process.

Three loads of ``--streams`` concurrent streams on the in-process engine, each run ``--runs`` times (median kept):
plain sampled requests; the same with a ``json_schema`` response_format; and the plain streams again beside one
constrained batch-mate (requests back to back for as long as they run), which says what a constrained request costs
the plain ones that share its batch (their rows are never adjusted, but the step waits for its mask). Metrics are
``tripod.bench.metrics``' (vLLM's names); constrained replies are also checked against the schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

from tripod.bench.direct import load_engine, time_generation
from tripod.bench.metrics import RequestResult, summarize
from tripod.bench.prompts import build_prompts
from tripod.protocol import ResponseFormat, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "in_stock": {"type": "boolean"},
    },
    "required": ["name", "price", "in_stock"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = ResponseFormat("json_schema", json.dumps(SCHEMA), name="product")


def run_load(chat_model, prompts: list[str], params: list[SamplingParams], mate: SamplingParams | None = None):
    """Every prompt at once, one thread each; with ``mate``, constrained requests back to back beside them."""
    outcomes: list[tuple[RequestResult, str] | None] = [None] * len(prompts)
    done = threading.Event()
    mate_texts: list[str] = []

    def run(i: int) -> None:
        outcomes[i] = time_generation(chat_model, prompts[i], params[i])

    def keep_a_mate() -> None:
        while not done.is_set():
            mate_texts.append(time_generation(chat_model, prompts[0], mate)[1])

    mate_thread = threading.Thread(target=keep_a_mate, daemon=True) if mate is not None else None
    if mate_thread is not None:
        mate_thread.start()
        time.sleep(0.05)  # in the batch before the measured streams arrive
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - started
    done.set()
    if mate_thread is not None:
        mate_thread.join()
    return [outcome for outcome in outcomes if outcome is not None], duration, mate_texts


def schema_valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "mean_output_tokens")
    return {key: statistics.median(run[key] for run in runs if run[key] is not None) for key in keys}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    chat_model = load_engine(args.model, "hf-cb")
    prompts = build_prompts(args.streams, args.prompt_len, args.seed, chat_model.tokenizer, chat_model.model_name)
    prompts = prompts.prompts

    def params(constrained: bool, index: int, run: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=args.output_len,
            temperature=1.0,
            seed=args.seed + 1000 * run + index,
            ignore_eos=not constrained,  # a constrained reply ends when its JSON does
            response_format=RESPONSE_FORMAT if constrained else None,
        )

    mate = SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=args.seed, response_format=RESPONSE_FORMAT)
    run_load(chat_model, prompts, [params(True, i, -1) for i in range(len(prompts))])  # warm up: compile, caches
    loads = {"plain": (False, None), "json_schema": (True, None), "plain_beside_a_constrained_mate": (False, mate)}
    report: dict[str, Any] = {"engine": chat_model.engine, "model": chat_model.model_name, "streams": args.streams}
    report.update(prompt_len=args.prompt_len, output_len=args.output_len, runs=args.runs)
    for name, (constrained, batch_mate) in loads.items():
        summaries, valid, replies, mates = [], 0, 0, 0
        for run in range(args.runs):
            load = [params(constrained, i, run) for i in range(len(prompts))]
            outcomes, duration, mate_texts = run_load(chat_model, prompts, load, batch_mate)
            summaries.append(summarize([result for result, _ in outcomes], duration))
            if constrained:
                valid += sum(schema_valid(text) for _, text in outcomes)
                replies += len(outcomes)
            mates += len(mate_texts)
        report[name] = median_summary(summaries)
        if constrained:
            report[name]["schema_valid"] = f"{valid}/{replies}"
        if batch_mate is not None:
            report[name]["constrained_mates_run"] = mates
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tripod.bench.constrained", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: TRIPOD_MODEL")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    json.dump(benchmark(parser.parse_args(argv)), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
