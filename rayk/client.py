"""The driver API: ``rayk.Cluster`` starts a deployment, ``rayk.connect`` attaches to one.

A deployment is a coordinator actor (``rayk-coordinator``) and cache workers (``rayk-worker-0``,
…), all named and detached in one Ray namespace. The driver tokenizes and hashes every prompt
itself, with the hasher of the workers' model, asks the coordinator where to send it (block keys
only), then calls that worker directly: tokens and KV never pass through the coordinator.

A route may come with a fetch plan: the worker pulls the planned blocks from a peer (through
Ray's object store) before it serves the request. ``pull`` ("auto", "always", "never") is set per
cluster and may be overridden per request.

A request whose worker dies is routed again (twice at most) to a live worker (``generate``,
``submit`` and ``chat``; not a ``stream``, which may have yielded part of its output already).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ray

from rayk.cluster.coordinator import COORDINATOR_NAME, MIN_LIVENESS_TIMEOUT_S, Coordinator
from rayk.cluster.reporting import HEARTBEAT_S
from rayk.cluster.routing import RouteDecision, Router, check_pull
from rayk.cluster.tenancy import check_secret_env, find_tenant_salts, request_salt, start_tenant_salts
from rayk.cluster.worker import WORKER_NAME_PREFIX, CacheWorker, worker_actor_name
from rayk.cache.memory_controller import check_num_bytes
from rayk.config import EngineConfig
from rayk.engine.llm_engine import prompt_token_ids, request_token_ids
from rayk.hashing import BlockHash, BlockHasher, check_cache_salt
from rayk.llm import as_prompt_batch, render_conversations, sampling_params_for, target_keys
from rayk.model.loader import DEFAULT_MODEL
from rayk.outputs import ClusterRequestOutput, CompletionDelta, RequestOutput
from rayk.overload import check_max_queued_requests
from rayk.profile_report import render_report
from rayk.sampling_params import SamplingParams

# Numeric stats leaves that describe a worker rather than count something: not summed (strings never are).
_PER_WORKER_CONSTANTS = {"block_size", "bytes_per_token", "bytes_per_block", "epoch"}
_RETRIES = 2
COORDINATOR_RESTART_WAIT_S = 30.0
"""How long a request waits for a restarting coordinator before its error reaches the caller."""
WORKER_MAX_RESTARTS = 3
"""Ray restarts a worker that crashed this many times at most; each incarnation has a new epoch."""


@dataclass
class _Request:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    keys: list[BlockHash]
    worker: str | None
    routing: str | None
    pull: str | None


class Cluster:
    """A rayk deployment: one coordinator and ``num_workers`` cache workers.

    With no ``address``, when this process is not connected to Ray yet, it starts an embedded Ray
    of its own bound to 127.0.0.1 (not one already running on the machine: ``address="auto"``
    joins that); with an ``address`` it joins that Ray cluster; when this process is already
    connected to Ray it uses that.
    ``num_workers`` defaults to the cluster's GPUs (one worker each), or 2 in CPU mode.
    ``options`` are ``rayk.LLM``'s (``block_size``, ``num_device_blocks``, ``host_blocks``,
    ``host_bytes``, ``disk_dir`` — each worker gets its own subdirectory —, …); ``eviction_policy`` defaults to
    ``cluster_aware`` here: a block another worker also holds is evicted before a last copy.
    ``pull`` ("auto", "always", "never") says whether routes may come with fetch plans;
    ``pull_timeout_s`` bounds one pull (after it the request computes those tokens).
    ``tenant_secret_env`` names an environment variable holding a cluster secret on every node:
    then requests carry ``tenant="..."`` and the deployment derives each tenant's cache salt from
    it (HMAC-SHA256, ``rayk.cluster.tenancy``); a caller's ``cache_salt`` is refused there.
    ``max_queued_requests`` bounds the requests in flight (routed and not finished) across the
    whole deployment, from every driver: past it ``generate``, ``submit``, ``chat`` and ``stream``
    raise ``rayk.Overloaded`` and queue nothing (None: no bound). Leaving the
    ``with`` block shuts down what it started.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        num_workers: int | None = None,
        routing: str = "prefix",
        pull: str = "auto",
        address: str | None = None,
        namespace: str = "rayk",
        device: str = "auto",
        liveness_timeout_s: float = 3.0,
        pull_timeout_s: float = 10.0,
        tenant_secret_env: str | None = None,
        max_queued_requests: int | None = None,
        **options,
    ):
        if routing not in Router.POLICIES:
            raise ValueError(f"routing must be one of {Router.POLICIES}, got {routing!r}")
        check_pull(pull)
        if tenant_secret_env is not None:
            check_secret_env(tenant_secret_env)
        check_max_queued_requests(max_queued_requests)
        if isinstance(pull_timeout_s, bool) or not isinstance(pull_timeout_s, (int, float)) or not pull_timeout_s > 0:
            raise ValueError(f"pull_timeout_s must be a number of seconds > 0, got {pull_timeout_s!r}")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers must be an int >= 1 or None, got {num_workers!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (each worker gets one GPU), got {device!r}")
        if isinstance(liveness_timeout_s, bool) or not isinstance(liveness_timeout_s, (int, float)) or not liveness_timeout_s >= MIN_LIVENESS_TIMEOUT_S:
            raise ValueError(
                f"liveness_timeout_s must be a number of seconds >= {MIN_LIVENESS_TIMEOUT_S} (twice the workers' "
                f"{HEARTBEAT_S} s heartbeat), got {liveness_timeout_s!r}"
            )
        options.setdefault("eviction_policy", "cluster_aware")
        config = EngineConfig.from_options(model, device=device, **options)
        self._started_ray = _init_ray(address, namespace)
        self.namespace = namespace
        if _find_actor(COORDINATOR_NAME, namespace) is not None:
            if self._started_ray:
                ray.shutdown()
            raise ValueError(f"a rayk deployment is already running in namespace {namespace!r}: use rayk.connect(namespace={namespace!r})")
        created = False
        try:
            coordinator = Coordinator.options(
                name=COORDINATOR_NAME, namespace=namespace, lifetime="detached", max_restarts=-1, num_cpus=0
            ).remote(config.cache.block_size, routing, float(liveness_timeout_s), pull, max_queued_requests)
            created = True  # from here on the namespace's actors are this call's own
            if tenant_secret_env is not None:
                start_tenant_salts(namespace, tenant_secret_env)  # a missing secret fails here, before models load
            workers = self._start_workers(config, num_workers, device, float(pull_timeout_s))
            ray.get(coordinator.config.remote())  # its start overlapped the workers'
            started = _wait_until_loaded(workers)
            self._owns_deployment = True
            self._attach(started)
        except BaseException:
            if created:
                _kill_deployment(namespace)
            if self._started_ray:
                ray.shutdown()
            raise

    def _start_workers(self, config: EngineConfig, num_workers: int | None, device: str, pull_timeout_s: float) -> list:
        """Starts the workers (their handles, in id order); each loads its model meanwhile."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "cuda" and gpus == 0:
            raise ValueError("device='cuda', but the Ray cluster has no GPU")
        use_gpu = device != "cpu" and gpus > 0
        num_workers = num_workers or (gpus if use_gpu else 2)
        if use_gpu and num_workers > gpus:
            raise ValueError(f"num_workers={num_workers}, but the Ray cluster has {gpus} GPU(s): one worker per GPU (device='cpu' runs more on the CPUs)")
        if use_gpu:
            placement, num_threads = {"num_gpus": 1, "num_cpus": 1}, 1
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device="cuda"))
        else:
            # Each worker reserves its share of the CPUs, at most one (so that workers outnumbering
            # the cores still place), and torch gets one thread per whole core of its share.
            share = resources.get("CPU", 1) / num_workers
            placement, num_threads = {"num_cpus": min(1.0, share)}, max(1, int(share))
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device="cpu"))
        workers = []
        for i in range(num_workers):
            worker_id = f"worker-{i}"
            worker_config = config
            if config.cache.disk_dir is not None:
                disk_dir = os.path.join(config.cache.disk_dir, worker_id)
                worker_config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, disk_dir=disk_dir))
            workers.append(
                CacheWorker.options(
                    name=worker_actor_name(worker_id),
                    namespace=self.namespace,
                    lifetime="detached",
                    scheduling_strategy="SPREAD",
                    max_restarts=WORKER_MAX_RESTARTS,
                    **placement,
                ).remote(worker_id, worker_config, COORDINATOR_NAME, self.namespace, num_threads, pull_timeout_s=pull_timeout_s)
            )
        return workers

    @classmethod
    def _connect(cls, namespace: str, address: str | None) -> Cluster:
        self = cls.__new__(cls)
        if not ray.is_initialized():
            try:
                # No address: RAY_ADDRESS, or the Ray cluster running on this machine.
                ray.init(address=address or "auto", namespace=namespace)
            except ConnectionError as error:
                raise ValueError(f"no Ray cluster to attach to at address={address or 'auto'!r}: {error}") from None
        self._started_ray = False
        self.namespace = namespace
        if _find_actor(COORDINATOR_NAME, namespace) is None:
            if self._started_ray:
                ray.shutdown()
            raise ValueError(f"no rayk deployment is running in namespace {namespace!r} (no actor named {COORDINATOR_NAME!r})")
        self._owns_deployment = False
        self._attach()
        return self

    def _attach(self, expected: Sequence[str] = ()) -> None:
        self._coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self.namespace)
        self._workers: dict[str, ray.actor.ActorHandle] = {}
        self._lock = threading.Lock()
        self._retry_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayk-retry")
        worker_ids = self._wait_for_workers(expected)
        info = ray.get(self._worker(worker_ids[0]).info.remote())
        self.hasher = BlockHasher(info["fingerprint"], info["block_size"], info["hash_algorithm"])
        self.tokenizer = info["tokenizer"]
        self.vocab_size = info["vocab_size"]
        self.max_model_len = info["max_model_len"]
        self._tenant_salts = find_tenant_salts(self.namespace)
        self._closed = False

    def _wait_for_workers(self, expected: Sequence[str], timeout_s: float = 30.0) -> list[str]:
        """The live workers, once the coordinator has heard from every ``expected`` one (from at
        least one, when none is expected)."""
        deadline = time.monotonic() + timeout_s
        while True:
            worker_ids = ray.get(self._coordinator.workers.remote())
            if worker_ids and set(expected) <= set(worker_ids):
                return worker_ids
            if time.monotonic() > deadline:
                missing = sorted(set(expected) - set(worker_ids)) or "any worker"
                raise RuntimeError(f"the coordinator heard from {worker_ids} but not {missing} within {timeout_s} s")
            time.sleep(0.05)

    def _worker(self, worker_id: str):
        with self._lock:
            handle = self._workers.get(worker_id)
            if handle is None:
                handle = self._workers[worker_id] = ray.get_actor(worker_actor_name(worker_id), namespace=self.namespace)
            return handle

    def workers(self) -> list[str]:
        """The ids of the live workers, as the coordinator sees them."""
        return ray.get(self._coordinator.workers.remote())

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
        tenant: str | None = None,
        worker: str | None = None,
        routing: str | None = None,
        pull: str | None = None,
    ) -> list[ClusterRequestOutput]:
        """Generates for every prompt across the cluster; outputs in prompt order. Every prompt
        is checked before any is sent: one bad prompt raises and none runs.

        ``cache_salt`` (str or bytes, at most ``rayk.hashing.MAX_CACHE_SALT_BYTES`` = 256 bytes, a
        str counted in UTF-8; else a TypeError or ValueError) isolates tenants: the same salt
        hits on any worker, another salt never shares, and routing predicts hits from the salted
        keys only. On a ``tenant_secret_env`` deployment pass ``tenant`` instead (the salt is
        derived there; a ``cache_salt`` is refused). ``submit``, ``stream``, ``chat``, ``warm``
        and the memory controls take both the same way."""
        requests = self._prepare(prompts, sampling_params, self._salt(cache_salt, tenant), worker, routing, pull)
        futures = [concurrent.futures.Future() for _ in requests]
        self._dispatch(requests, futures, _RETRIES)
        return [f.result() for f in futures]

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        cache_salt: str | None = None,
        tenant: str | None = None,
        worker: str | None = None,
        routing: str | None = None,
        pull: str | None = None,
    ) -> concurrent.futures.Future:
        """Sends one prompt; returns a future of its ``ClusterRequestOutput``. Cancelling the
        future aborts the request on its worker."""
        requests = self._prepare([prompt], sampling_params, self._salt(cache_salt, tenant), worker, routing, pull)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._dispatch(requests, [future], _RETRIES)
        return future

    def stream(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        cache_salt: str | None = None,
        tenant: str | None = None,
        worker: str | None = None,
        routing: str | None = None,
        pull: str | None = None,
    ) -> Iterator[CompletionDelta]:
        """Yields the prompt's deltas as its worker produces them; the last carries the output.
        Unlike ``generate``, a stream is not sent again when its worker dies (part of it has been
        yielded already): the error reaches the caller. A caller that stops reading early cancels
        the request on the worker."""
        [request] = self._prepare([prompt], sampling_params, self._salt(cache_salt, tenant), worker, routing, pull)
        [decision] = self._route([request])
        if isinstance(decision, Exception):
            raise decision
        hit = generator = None
        try:
            generator = self._worker(decision.worker_id).stream.remote(request.token_ids, request.params, request.cache_salt, request.request_id, decision.plan)
            for ref in generator:
                delta = ray.get(ref)
                if delta.finished:
                    hit = delta.output.num_cached_tokens
                    delta = dataclasses.replace(delta, output=_cluster_output(delta.output, decision.worker_id))
                yield delta
        finally:
            if hit is None and generator is not None:
                _cancel_quietly(generator)  # the worker aborts the request
            self._coordinator.complete.remote([(request.request_id, hit)])

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
        tenant: str | None = None,
        worker: str | None = None,
        routing: str | None = None,
        pull: str | None = None,
    ) -> list[ClusterRequestOutput]:
        """Replies to one conversation or a list of them (see ``rayk.LLM.chat``)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template; pass token ids to generate()")
        prompts = render_conversations(self.tokenizer, messages, add_generation_prompt, self.max_model_len)
        return self.generate(prompts, sampling_params, cache_salt=cache_salt, tenant=tenant, worker=worker, routing=routing, pull=pull)

    def _prepare(self, prompts, sampling_params, cache_salt, worker, routing, pull=None) -> list[_Request]:
        self._check_open()
        if routing is not None and routing not in Router.POLICIES:
            raise ValueError(f"routing must be one of {Router.POLICIES}, got {routing!r}")
        if pull is not None:
            check_pull(pull)
        if worker is not None and not isinstance(worker, str):
            raise TypeError(f"worker must be a worker id string such as 'worker-0', got {type(worker).__name__}")
        batch = as_prompt_batch(prompts)
        params = sampling_params_for(batch, sampling_params)
        requests = []
        for i, (prompt, sp) in enumerate(zip(batch, params)):
            where = "prompt" if len(batch) == 1 else f"prompts[{i}]"
            token_ids = request_token_ids(prompt, sp, self.tokenizer, self.vocab_size, self.max_model_len, where, cache_salt)
            keys = self.hasher.hash_blocks(token_ids, cache_salt)
            requests.append(_Request(uuid.uuid4().hex, token_ids, sp, cache_salt, keys, worker, routing, pull))
        return requests

    def _route(self, requests: list[_Request]) -> list[RouteDecision | Exception]:
        """The coordinator's decisions; while it restarts (its node left, it crashed) the call is
        tried again for up to ``COORDINATOR_RESTART_WAIT_S``."""
        batch = [(r.request_id, r.keys, len(r.token_ids), r.routing, r.worker, r.pull) for r in requests]
        deadline = time.monotonic() + COORDINATOR_RESTART_WAIT_S
        while True:
            try:
                return ray.get(self._coordinator.route_many.remote(batch))
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _dispatch(self, requests: list[_Request], futures: list[concurrent.futures.Future], retries: int) -> None:
        """Routes the requests and sends each to its worker; each future gets its output or error."""
        decisions = self._route(requests)
        errors = [d for d in decisions if isinstance(d, Exception)]
        if errors:
            # Nothing is sent when any request cannot be routed (an unknown worker, no workers).
            self._coordinator.complete.remote([(d.request_id, None) for d in decisions if not isinstance(d, Exception)])
            raise errors[0]
        for sent, (request, future, decision) in enumerate(zip(requests, futures, decisions)):
            try:
                handle = self._worker(decision.worker_id)
                ref = handle.generate.remote(request.token_ids, request.params, request.cache_salt, request.request_id, decision.plan)
            except BaseException:
                # The rest were routed but will never run: the coordinator must not wait for them.
                self._coordinator.complete.remote([(d.request_id, None) for d in decisions[sent:]])
                raise
            ref.future().add_done_callback(
                lambda done, request=request, future=future, decision=decision: self._finish(done, request, future, decision, retries)
            )
            # A caller that cancels its future cancels the request on its worker (which aborts it).
            future.add_done_callback(lambda f, ref=ref: _cancel_quietly(ref) if f.cancelled() else None)

    def _finish(self, done: concurrent.futures.Future, request: _Request, future: concurrent.futures.Future, decision: RouteDecision, retries: int) -> None:
        if future.cancelled():  # by the caller: nothing to deliver, nothing to retry
            self._coordinator.complete.remote([(request.request_id, None)])
            return
        try:
            output: RequestOutput = done.result()
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as error:
            # Unavailable: its process died and Ray restarts it (a new, empty incarnation).
            self._coordinator.complete.remote([(request.request_id, None)])
            self._coordinator.remove_worker.remote(decision.worker_id)
            failure = RuntimeError(f"worker {decision.worker_id} died serving the request: {error}")
            if retries and request.worker is None:
                request.request_id = uuid.uuid4().hex
                try:
                    self._retry_pool.submit(self._retry, request, future, retries - 1)
                except RuntimeError:  # this handle is shutting down: no retry
                    future.set_exception(failure)
            else:
                future.set_exception(failure)
            return
        except BaseException as error:
            self._coordinator.complete.remote([(request.request_id, None)])
            future.set_exception(error)
            return
        self._coordinator.complete.remote([(request.request_id, output.num_cached_tokens)])
        future.set_result(_cluster_output(output, decision.worker_id))

    def _retry(self, request: _Request, future: concurrent.futures.Future, retries: int) -> None:
        try:
            self._dispatch([request], [future], retries)
        except BaseException as error:
            future.set_exception(error)

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Cluster-wide statistics as a plain dict.

        ``workers``: per worker id, its engine's stats plus ``node_id``, ``actor_name``,
        ``epoch``, ``load``, ``reporter``, ``transfers`` (blocks and bytes pulled from and served
        to peers, the measured pull and prefill rates, failed pulls by reason) and
        ``replicated_blocks`` (its blocks another worker holds too); ``unavailable_workers``: the
        live workers that did not answer (restarting), with the error; ``cluster``: the same keys
        summed over the workers (rates recomputed; empty while the coordinator knows no worker, as
        right after it restarted);
        ``directory``: ``blocks``, the distinct keys the coordinator's directory holds, ``workers``,
        the keys per worker (a block cached on two workers counts on both, so these may add up
        to more than ``blocks``), and ``prefixes``, the distinct prefixes per worker; ``routing``:
        the router's decisions, predicted against actual hits, hits against the oracle, and
        pending claims; ``liveness``: the live workers, dead ones counted, inventories loaded.
        """
        self._check_open()
        worker_ids = self.workers()
        refs = [self._worker(w).stats.remote() for w in worker_ids]
        per_worker, unavailable = {}, {}
        for worker_id, ref in zip(worker_ids, refs):
            try:
                per_worker[worker_id] = ray.get(ref)
            except ray.exceptions.RayActorError as error:  # dead or restarting: the others still count
                unavailable[worker_id] = str(error).splitlines()[0]
        coordinator = ray.get(self._coordinator.stats.remote())
        return {
            "workers": per_worker,
            "unavailable_workers": unavailable,
            "cluster": _sum_stats(list(per_worker.values())) if per_worker else {},
            "directory": coordinator["directory"],
            "routing": coordinator["routing"],
            "liveness": coordinator["liveness"],
        }

    # -- manual memory control: one worker (worker=) or every worker --------------------------

    def warm(self, prompts, *, workers: int | Sequence[str] | None = None, cache_salt: str | None = None, tenant: str | None = None) -> list[ClusterRequestOutput]:
        """Puts the prompts' KV on ``workers`` ahead of traffic: every worker (None), that many
        (an int), or the workers named (a list). For each prompt one worker computes it, or
        already holds it; the others pull it from there rather than compute it again.
        Returns every output, the first worker's first."""
        live = self.workers()
        if workers is None:
            named, count = None, len(live)
        elif isinstance(workers, int) and not isinstance(workers, bool):
            if not 1 <= workers <= len(live):
                raise ValueError(f"workers must be between 1 and the {len(live)} live workers, got {workers}")
            named, count = None, workers
        elif isinstance(workers, Sequence) and not isinstance(workers, str) and workers:
            unknown = [w for w in workers if w not in live]
            if unknown or len(set(workers)) != len(workers):
                raise ValueError(f"workers must name distinct live workers {live}, got {list(workers)!r}")
            named, count = list(workers), len(workers)
        else:
            raise ValueError(f"workers must be None, an int or a list of worker ids, got {workers!r}")
        params = SamplingParams(temperature=0, max_tokens=1)
        outputs = []
        for prompt in as_prompt_batch(prompts):
            first_worker = named[0] if named else None
            [first] = self.generate(prompt, params, cache_salt=cache_salt, tenant=tenant, worker=first_worker, pull="always" if named else None)
            outputs.append(first)
            others = [w for w in (named or live) if w != first.worker][: count - 1]
            if others:
                self._control("flush_events", first.worker)  # the directory shows what it now holds
                futures = [self.submit(prompt, params, cache_salt=cache_salt, tenant=tenant, worker=w, pull="always") for w in others]
                outputs.extend(f.result() for f in futures)
        return outputs

    def locate(self, target, *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        """How many of the target's blocks each tier of ``worker`` (or of every worker) holds."""
        return self._control("locate", worker, self._keys(target, cache_salt, tenant))

    def evict(self, target, *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        return self._control("evict", worker, self._keys(target, cache_salt, tenant))

    def pin(self, target, *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        return self._control("pin", worker, self._keys(target, cache_salt, tenant))

    def unpin(self, target, *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        return self._control("unpin", worker, self._keys(target, cache_salt, tenant))

    def offload(self, target, tier: str = "host", *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        return self._control("offload", worker, self._keys(target, cache_salt, tenant), tier)

    def prefetch(self, target, tier: str = "device", *, cache_salt: str | None = None, tenant: str | None = None, worker: str | None = None):
        return self._control("prefetch", worker, self._keys(target, cache_salt, tenant), tier)

    def set_budget(self, tier: str, num_bytes: int, *, worker: str | None = None):
        check_num_bytes(num_bytes)  # refused here, before any worker is asked
        return self._control("set_budget", worker, tier, num_bytes)

    def set_eviction_policy(self, policy, *, worker: str | None = None):
        return self._control("set_eviction_policy", worker, policy)

    def reset_prefix_cache(self, tiers: Sequence[str] = ("device", "host", "disk"), *, worker: str | None = None):
        return self._control("reset_prefix_cache", worker, list(tiers) if not isinstance(tiers, str) else tiers)

    def export_profile(self, path: str | os.PathLike, *, seconds: float = 5.0, worker: str | None = None) -> dict:
        """Records ``worker`` (or every worker) for ``seconds`` while traffic runs, then writes
        one self-contained HTML page to ``path``: a summary table per worker and tier, and per
        worker its charts (see ``rayk.profile_report``); ``seconds=0`` records nothing and writes
        the memory profiles and tables only. Returns ``{"path", "seconds", "workers"}``, the last
        the page's data: per worker id, ``memory_profile`` and ``recording`` (None if not recorded)."""
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"path must be a file path (str or os.PathLike), got {path!r}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"path {os.fspath(path)!r} is in a directory that does not exist")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise ValueError(f"seconds must be a finite number of seconds >= 0, got {seconds!r}")
        if worker is not None and not isinstance(worker, str):
            raise ValueError(f"worker must be None (every worker) or a worker id such as 'worker-0', got {worker!r}")
        try:
            if seconds > 0:
                self._control("start_profile", worker)
                time.sleep(seconds)
        finally:
            # Taken even when interrupted: a profiler left running would record until the next start.
            taken = self._control("take_profile", worker)
        profiles = {worker: taken} if worker is not None else taken
        with open(path, "w", encoding="utf-8") as page:
            page.write(render_report("rayk cluster KV cache profile", profiles))
        return {"path": os.fspath(path), "seconds": float(seconds), "workers": profiles}

    def block_hashes(self, prompt: str | Sequence[int], *, cache_salt: str | None = None, tenant: str | None = None) -> list[BlockHash]:
        """The keys of a prompt's full blocks, as every worker names them."""
        return self._hash_prompt(prompt, self._salt(cache_salt, tenant))

    def _hash_prompt(self, prompt: str | Sequence[int], salt: str | bytes | None) -> list[BlockHash]:
        return self.hasher.hash_blocks(prompt_token_ids(prompt, self.tokenizer, self.vocab_size, "prompt", salt), salt)

    def _keys(self, target, cache_salt, tenant) -> list[BlockHash]:
        salt = self._salt(cache_salt, tenant)
        check_cache_salt(salt)  # refused even where the target is keys, which need no salt
        return target_keys(target, lambda prompt: self._hash_prompt(prompt, salt))

    def _salt(self, cache_salt, tenant) -> str | bytes | None:
        """The salt a request carries: ``cache_salt`` (at most ``MAX_CACHE_SALT_BYTES``, checked
        where it is used), or on a ``tenant_secret_env`` deployment the salt derived from ``tenant``."""
        return request_salt(self._tenant_salts, cache_salt, tenant)

    def _control(self, name: str, worker: str | None, *args):
        """The control's result on ``worker``, or a dict of results per worker id."""
        self._check_open()
        known = self.workers()
        if worker is not None:
            if worker not in known:
                raise ValueError(f"unknown worker {worker!r}; live workers: {known}")
            return ray.get(self._worker(worker).control.remote(name, *args))
        return dict(zip(known, ray.get([self._worker(w).control.remote(name, *args) for w in known])))

    # -- lifetime -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops the deployment: every worker (spilling to its disk tier) and the coordinator;
        and the embedded Ray, when this object started it. Calling it twice is a no-op."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._retry_pool.shutdown(wait=False)
        _kill_deployment(self.namespace)
        if self._started_ray:
            ray.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this rayk cluster handle is shut down")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        if self._owns_deployment:
            self.shutdown()


def connect(namespace: str = "rayk", address: str | None = None) -> Cluster:
    """Attaches to the rayk deployment running in ``namespace`` of the Ray cluster at ``address``
    (None: ``RAY_ADDRESS``, or the cluster running on this machine); a ValueError if none is."""
    return Cluster._connect(namespace, address)


def _init_ray(address: str | None, namespace: str) -> bool:
    """Makes sure this process is connected to Ray; True when it started an embedded Ray (no
    ``address``: a new one, never a cluster that happens to run on this machine)."""
    if ray.is_initialized():
        return False
    if address is None:
        # A new local Ray ("local": never one that happens to run here), bound to loopback:
        # nothing is reachable from other machines.
        ray.init(address="local", namespace=namespace, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        return True
    ray.init(address=address, namespace=namespace)
    return False


def _wait_until_loaded(workers: list) -> list[str]:
    """The workers' ids, once each has loaded its model; the first failure names its worker."""
    for i, ref in enumerate([w.info.remote() for w in workers]):
        try:
            ray.get(ref)
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"worker-{i} failed to start: {remote_error_message(error)}") from error
    return [f"worker-{i}" for i in range(len(workers))]


def remote_error_message(error: ray.exceptions.RayError) -> str:
    """The line that names what went wrong in a remote error: Ray's message ends with the remote
    exception's own ``Type: message`` line, after the traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _find_actor(name: str, namespace: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _kill_deployment(namespace: str) -> None:
    """Shuts down and kills every rayk actor in the namespace: workers first, then the coordinator."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]
    workers = [n for n in names if n.startswith(WORKER_NAME_PREFIX) and n != COORDINATOR_NAME]
    handles = [h for h in (_find_actor(n, namespace) for n in workers) if h is not None]
    try:
        ray.get([h.shutdown.remote() for h in handles], timeout=60)
    except ray.exceptions.RayError:
        pass  # a dead or stuck worker is killed below all the same
    for handle in handles:
        ray.kill(handle, no_restart=True)
    coordinator = _find_actor(COORDINATOR_NAME, namespace)
    if coordinator is not None:
        ray.kill(coordinator, no_restart=True)


def _cancel_quietly(ref) -> None:
    """Cancels a worker call (an ObjectRef or a stream's generator) that may have ended."""
    try:
        ray.cancel(ref)
    except ray.exceptions.RayError:
        pass  # it ended meanwhile


def _cluster_output(output: RequestOutput, worker_id: str) -> ClusterRequestOutput:
    return ClusterRequestOutput(**{f.name: getattr(output, f.name) for f in dataclasses.fields(RequestOutput)}, worker=worker_id)


def _sum_stats(per_worker: list[dict]) -> dict:
    """The workers' stats summed leaf by leaf (constants kept, rates recomputed from the sums)."""
    total = _sum_tree(per_worker)
    prefix = total.get("prefix_cache")
    if prefix:
        prefix["hit_rate"] = prefix["hit_tokens"] / prefix["query_tokens"] if prefix["query_tokens"] else 0.0
    pool = total.get("device_pool")
    if pool:
        allocated = pool["used_blocks"] * pool["block_size"]
        pool["internal_fragmentation"] = pool["unused_slots"] / allocated if allocated else 0.0
    transfers = total.get("transfers")
    if transfers and pool:  # the cluster's average pull rate (prefill rates add up: capacity)
        seconds = transfers["pull_seconds"]
        transfers["pull_bytes_per_s"] = transfers["pulled_bytes"] / seconds if seconds else 0.0
        transfers["pull_tokens_per_s"] = transfers["pulled_blocks"] * pool["block_size"] / seconds if seconds else 0.0
    return total


def _sum_tree(values: list):
    first = values[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
        return {k: (_constant([v.get(k) for v in values]) if k in _PER_WORKER_CONSTANTS else _sum_tree([v.get(k) for v in values if v.get(k) is not None] or [None])) for k in keys}
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return _constant(values)
    if isinstance(first, (int, float)):
        return sum(values)
    return _constant(values)


def _constant(values: list):
    """The value all workers share, or the sorted list of their different values."""
    distinct = {repr(v): v for v in values}
    return next(iter(distinct.values())) if len(distinct) == 1 else sorted(distinct.values(), key=repr)
