"""Checks for a lent GPU that the CPU suite cannot make: hf-cb's sampling under captured CUDA graphs, and its cost.

``sampling_under_graphs`` checks that a seeded request on ``hf-cb`` with CUDA graphs gives the same text alone as
inside a batch of greedy, seeded, top-k and top-p requests. ``chain_cost`` and ``attention_cost`` time each sampling
chain and each way of masked grouped-query attention (split keys included) on the 1B model's decode shapes, eager and
captured in a CUDA graph. ``scripts/gpu.sh`` runs them first; what they found is in docs/BENCHMARKS.md (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import threading

import torch

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
os.environ.setdefault("TRIPOD_MODEL", "tiny")

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def text_of(model, **params) -> str:
    return model.generate(MESSAGES, max_tokens=24, **params)["choices"][0]["message"]["content"]


def sampling_under_graphs() -> dict:
    import django

    django.setup()
    from tripod.engines import get_chat_model

    model = get_chat_model("tiny", "hf-cb")
    greedy = text_of(model, temperature=0)
    seeded = text_of(model, temperature=1.0, seed=7)
    kinds = [
        ({"temperature": 0}, greedy),
        ({"temperature": 1.0, "seed": 7}, seeded),
        ({"temperature": 1.5, "top_k": 1, "seed": 11}, greedy),
        ({"temperature": 0.7, "top_p": 1e-6, "seed": 12}, greedy),
    ]
    results = [""] * 12
    barrier = threading.Barrier(len(results))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = text_of(model, **kinds[i % len(kinds)][0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mismatches = [i for i, text in enumerate(results) if text != kinds[i % len(kinds)][1]]
    io = model.manager.batch_processor.inputs_and_outputs
    graphs = getattr(io, "graphs", None)
    return {
        "device": model.device,
        "keyed_graphs": model.manager.logit_processor.keyed_graphs,
        "seeded_differs_from_greedy": seeded != greedy,
        "mixed_batch_mismatches": mismatches,
        "graph_keys": sorted(str(key) for key in getattr(graphs, "_storage", {})),
    }


def captured(run):
    """``run`` captured in a CUDA graph, after a warm-up off the capture: the graph's replay."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def median_ms(run, repeats: int) -> float:
    """The median time of ``repeats`` calls of ``run`` on the device, in milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[len(times) // 2], 4)


def chain_cost(rows: int = 64, vocab: int = 128256, repeats: int = 50) -> dict:
    """Milliseconds per replay of each chain, captured alone in a CUDA graph, on ``rows`` rows of logits."""
    from tripod.engines.hf_cb_sampling import RequestSampling

    sampling = RequestSampling(vocab, captured=True)
    scores = torch.randn(rows, vocab, device="cuda")
    args = torch.zeros((len(sampling.processors), rows), dtype=torch.int32, device="cuda")
    sampling.fill_defaults(args)  # neutral arguments on every row, as for a greedy batch
    costs = {}
    for chain in [(), (3,), (0, 3), (0, 2, 3), (0, 1, 2, 3)]:
        sampling.chain = chain
        costs[str(chain)] = median_ms(captured(lambda: sampling(None, scores, args).argmax(-1)), repeats)
    return {"rows": rows, "vocab": vocab, "median_ms_per_step": costs}


def attention_ways(query, key, value, mask, groups: int) -> dict:
    """Ways to compute masked grouped-query attention; each returns [1, heads, q, dim]."""
    from tripod.patches.grouped_attention import packed_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    _, heads, q, dim = query.shape
    kv_heads = key.shape[1]

    def repeated():  # transformers' way with a mask on CUDA
        return sdpa(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask)

    def enable_gqa():  # TRANSFORMERS_SDPA_FORCE_GQA=1; with a mask on CUDA transformers avoids it (math kernel)
        return sdpa(query, key, value, attn_mask=mask, enable_gqa=True)

    def packed_queries():  # the engine's way (TRIPOD_CB_PACKED_GQA): query heads stacked, the mask repeated
        return packed_attention(query, key, value, mask, None)

    def heads_as_batch():  # the query heads of a group as a batch; keys and values broadcast over it, not copied
        stacked = query.reshape(kv_heads, groups, q, dim).transpose(0, 1)
        out = sdpa(stacked, key.expand(groups, -1, -1, -1), value.expand(groups, -1, -1, -1), attn_mask=mask)
        return out.transpose(0, 1).reshape(1, heads, q, dim)

    def split_keys(chunk: int):  # packed, and the keys cut into chunks run as one batch (TRIPOD_CB_SPLIT_KEYS)
        return lambda: packed_attention(query, key, value, mask, None, chunk)

    return {
        "repeat_kv": repeated,
        "enable_gqa": enable_gqa,
        "packed_queries": packed_queries,
        "heads_as_batch": heads_as_batch,
        **{f"split_keys_{chunk}": split_keys(chunk) for chunk in (512, 1024, 1664)},
    }


def attention_cost(repeats: int = 50) -> dict:
    """Milliseconds per call of one layer's masked attention, each way, at one stream's and 64 streams' sizes,
    eager and replayed from a CUDA graph."""
    heads, kv_heads, dim, q = 32, 8, 64, 64
    results = {}
    for name, kv in (("1 stream", 1024 + 64), ("64 streams", 13312 + 64)):
        generator = torch.Generator(device="cuda").manual_seed(0)
        query = torch.randn(1, heads, q, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        key = torch.randn(1, kv_heads, kv, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        value = torch.randn(1, kv_heads, kv, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        # Block-diagonal: each query token sees one contiguous range of keys, as transformers builds it.
        mask = torch.full((1, 1, q, kv), torch.finfo(torch.bfloat16).min, device="cuda", dtype=torch.bfloat16)
        per_row = kv // q
        for row in range(q):
            mask[..., row, row * per_row : (row + 1) * per_row] = 0
        ways = attention_ways(query, key, value, mask, heads // kv_heads)
        reference = ways["repeat_kv"]().float()
        row = {}
        for way, run in ways.items():
            try:
                difference = (run().float() - reference).abs().max().item()
                # Eager, and replayed from a CUDA graph as the engine runs a step (no launch costs).
                row[way] = {"median_ms": median_ms(run, repeats), "max_difference": difference}
                row[way]["graph_median_ms"] = median_ms(captured(run), repeats)
            except Exception as error:  # noqa: BLE001 - a way a kernel refuses is a result too
                row[way] = {"error": repr(error)}
        results[f"{name} (q {q}, kv {kv})"] = row
    return results


CHECKS = (sampling_under_graphs, chain_cost, attention_cost)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Where to write the report and which checks to run; an unknown check name is an error, not skipped."""
    parser = argparse.ArgumentParser(
        prog="python -m tripod.bench.gpu_checks",
        description="Run the GPU checks (about a minute for all) and print their JSON report.",
    )
    parser.add_argument("out", nargs="?", help="also write the JSON report to this file")
    names = [check.__name__ for check in CHECKS]
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"of {', '.join(names)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks) - set(names))
    if unknown:
        parser.error(f"unknown check {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen checks, each failure reported in its place, and print (and write) the JSON."""
    args = parse_args(argv)
    report: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    chosen = set(args.checks) or {check.__name__ for check in CHECKS}
    for check in (check for check in CHECKS if check.__name__ in chosen):
        name = check.__name__
        try:
            report[name] = check()
        except Exception as error:  # noqa: BLE001 - a check that fails is reported, and the next one still runs
            report[name] = {"error": repr(error)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
