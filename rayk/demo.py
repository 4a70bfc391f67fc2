"""``rayk demo``: a shared-prefix chat workload on a small cluster, with what the cache did.

Several users sit behind a few system prompts (help desks). Their questions go to the cluster a
round at a time, every desk's next user at once, as users arrive. The router sends each to the
worker holding its desk's system prompt, so each prompt is computed once per cluster. At the
end: a per-worker table (requests, prompt tokens served from each tier, device blocks cached), the
router's hits against the oracle (every token some worker held), and a few answers.
"""

from __future__ import annotations

import concurrent.futures
import sys
import textwrap
import time
from collections.abc import Callable

from rayk.client import Cluster
from rayk.sampling_params import SamplingParams
from rayk.stats_table import format_table, routing_line

DESKS = {
    "library": (
        "You are the help desk of Northwind Library. Answer in one short sentence using these facts. "
        "Open Monday to Friday 9:00 to 20:00, Saturday 10:00 to 16:00, closed on Sunday. Members borrow "
        "up to 12 books for 3 weeks and renew them twice online. Colour printing costs 50 cents a page, "
        "black and white 10 cents. The reading room on the second floor is quiet and has 40 seats.",
        ["When are you open on Saturday?", "How many books can I borrow?", "What does colour printing cost?",
         "Can I renew a book online?", "Where can I read quietly?", "Are you open on Sunday?"],
    ),
    "bakery": (
        "You are the counter of Riverside Bakery. Answer in one short sentence using these facts. Open "
        "every day 7:00 to 18:00. A sourdough loaf costs 4 euros, a croissant 1.50 euros, a slice of "
        "apple cake 3 euros. Cakes are ordered two days ahead. Everything is baked on site before dawn, "
        "and the rye bread has no wheat in it.",
        ["What does a croissant cost?", "When do you open?", "How early must I order a cake?",
         "Is the rye bread wheat-free?", "Where is the bread baked?", "How much is apple cake?"],
    ),
    "bikes": (
        "You are the workshop of Harbour Bikes. Answer in one short sentence using these facts. A tyre "
        "change costs 15 euros and takes an hour. A full service costs 60 euros and takes two days. "
        "Rental bikes cost 20 euros a day with a helmet included. The workshop is closed on Mondays "
        "and opens at 8:00 on the other days.",
        ["How much is a tyre change?", "How long does a service take?", "Is a helmet included?",
         "Are you open on Monday?", "What does a rental cost?", "When does the workshop open?"],
    ),
}


def run_demo(
    model: str,
    *,
    num_workers: int = 2,
    users_per_desk: int = 4,
    max_tokens: int = 24,
    namespace: str = "rayk-demo",
    out: Callable[[str], None] = print,
    **options,
) -> dict:
    """Runs the workload on a new deployment and prints what happened; returns the numbers
    printed (``per_worker``: requests, prompt tokens and hit tokens by tier; ``hit_tokens``,
    ``oracle_hit_tokens``)."""
    if isinstance(users_per_desk, bool) or not isinstance(users_per_desk, int) or not 1 <= users_per_desk <= 6:
        raise ValueError(f"users_per_desk must be an int from 1 to 6, got {users_per_desk!r}")
    out(f"starting {num_workers} workers on {model} (embedded Ray on 127.0.0.1) ...")
    started = time.monotonic()
    with Cluster(model, num_workers=num_workers, namespace=namespace, **options) as cluster:
        out(f"ready in {time.monotonic() - started:.1f} s: {', '.join(cluster.workers())}")
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        rounds = [[(desk, system, questions[user]) for desk, (system, questions) in DESKS.items()] for user in range(users_per_desk)]
        total = sum(len(r) for r in rounds)
        progress = _Progress(total)
        answered = []
        for round_ in rounds:
            futures = {}
            for desk, system, question in round_:
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                futures[cluster.submit(_render(cluster, messages), params)] = (desk, question)
            for future in concurrent.futures.as_completed(futures):
                answered.append((*futures[future], future.result()))
                progress.advance()
        progress.finish()
        stats = cluster.stats()
    return _report(answered, stats, out)


def _render(cluster: Cluster, messages: list[dict]) -> list[int]:
    if cluster.tokenizer is None or cluster.tokenizer.chat_template is None:
        raise ValueError("the demo needs a model with a tokenizer and a chat template")
    return cluster.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, max_tokens=cluster.max_model_len)


def _report(answered: list[tuple], stats: dict, out: Callable[[str], None]) -> dict:
    per_worker: dict[str, dict] = {}
    for _, _, output in answered:
        row = per_worker.setdefault(output.worker, {"requests": 0, "prompt": 0, "tiers": {}})
        row["requests"] += 1
        row["prompt"] += len(output.prompt_token_ids)
        for tier, tokens in output.cached_tokens_by_tier.items():
            row["tiers"][tier] = row["tiers"].get(tier, 0) + tokens
    rows = []
    for worker_id in sorted(stats["workers"]):
        row = per_worker.get(worker_id, {"requests": 0, "prompt": 0, "tiers": {}})
        tiers = row["tiers"]
        pool = stats["workers"][worker_id]["device_pool"]
        rows.append((worker_id, row["requests"], row["prompt"], tiers.get("device", 0), tiers.get("host", 0), tiers.get("disk", 0), tiers.get("remote", 0), f"{pool['cached_blocks']}/{pool['num_blocks']}"))
    out("")
    out(format_table(("worker", "requests", "prompt tokens", "hit device", "hit host", "hit disk", "hit remote", "blocks cached"), rows))
    out("")
    out(routing_line(stats["routing"]))
    out("")
    for desk, question, output in answered[:: max(1, len(answered) // 3)][:3]:
        out(f"[{desk}] Q: {question}")
        out(textwrap.fill(f"A: {(output.text or '').strip()}", width=100, initial_indent="  ", subsequent_indent="     "))
        ttft = f", TTFT {output.ttft_s * 1000:.0f} ms" if output.ttft_s is not None else ""
        out(f"     {output.worker}: prompt {len(output.prompt_token_ids)} tokens, {output.num_cached_tokens} from cache{ttft}")
    return {"per_worker": per_worker, "hit_tokens": stats["routing"]["actual_hit_tokens"], "oracle_hit_tokens": stats["routing"]["oracle_hit_tokens"]}


class _Progress:
    """A bar on stderr, redrawn in place on a terminal; elsewhere one line when done."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width = total, 0, width
        self.started = time.monotonic()
        self.live = sys.stderr.isatty()
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\n")
        else:
            sys.stderr.write(self._line() + "\n")
        sys.stderr.flush()

    def _line(self) -> str:
        filled = self.width * self.done // self.total
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} requests, {time.monotonic() - self.started:.1f} s"

    def _draw(self) -> None:
        if self.live:
            sys.stderr.write("\r" + self._line())
            sys.stderr.flush()
