"""Keys and isolation: a colliding key is never served, salts are bounded and keep tenants apart
on every worker, server-derived salts keep the secret in the deployment, routing predicts hits
from salted keys only, and sha256 keys work through the whole cluster.

Collisions are forced with the weak-keys fault injection of ``rayk.hashing`` (``RAYK_TEST_WEAK_KEYS``:
keys ignore the lowest bit of every token id), so a prompt and its twin with those bits flipped
share every key but not their tokens. Cluster tests run on ``ray.cluster_utils.Cluster`` on
loopback, two nodes, two workers per deployment. The cross-worker half of the salt pairing is
here; tests/test_cluster.py has the same-worker half.
"""

from __future__ import annotations

import secrets

import pytest
import ray

import rayk
from rayk.cluster.tenancy import TENANT_SALTS_NAME, derive_salt
from rayk.cluster.worker import worker_actor_name
from rayk.config import MIN_SECRET_BYTES
from rayk.hashing import MAX_CACHE_SALT_BYTES, WEAK_KEYS_ENV, BlockHasher
from tests.conftest import BLOCK_SIZE, hf_greedy, local_ray_nodes, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
NAMESPACE = "rayk-test-isolation"
SECRET_ENV = "RAYK_TEST_TENANT_SECRET"
SECRET = secrets.token_hex(MIN_SECRET_BYTES)  # 32 characters, new each run
TOO_LONG = "s" * (MAX_CACHE_SALT_BYTES + 1)
TOO_LONG_IN_UTF8 = "é" * (MAX_CACHE_SALT_BYTES // 2 + 1)  # fewer characters than the limit, more bytes


def _colliding_twins(seed: int) -> tuple[list[int], list[int], list[int]]:
    """A 50-token prompt (3 full blocks), its twin with every token's lowest bit flipped, and a
    twin with only the third block's flipped: under weak keys all three share every key."""
    prompt = random_prompts([50], seed=seed)[0]
    flipped = [t ^ 1 for t in prompt]
    third_only = prompt[: 2 * BLOCK_SIZE] + flipped[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] + prompt[3 * BLOCK_SIZE :]
    return prompt, flipped, third_only


def _salt_refusals(api) -> list:
    """Every call of ``api`` (a rayk.LLM or rayk.Cluster) that takes a salt, with a bad one."""
    prompt = random_prompts([20], seed=1300)[0]
    calls = [
        lambda salt: api.generate(prompt, GREEDY, cache_salt=salt),
        lambda salt: api.chat([{"role": "user", "content": "hi"}], GREEDY, cache_salt=salt),
        lambda salt: api.warm(prompt, cache_salt=salt),
        lambda salt: api.block_hashes(prompt, cache_salt=salt),
        lambda salt: api.locate(prompt, cache_salt=salt),
        lambda salt: api.locate(api.block_hashes(prompt), cache_salt=salt),  # keys as the target
        lambda salt: api.evict(prompt, cache_salt=salt),
        lambda salt: api.pin(prompt, cache_salt=salt),
        lambda salt: api.unpin(prompt, cache_salt=salt),
        lambda salt: api.offload(prompt, cache_salt=salt),
        lambda salt: api.prefetch(prompt, cache_salt=salt),
    ]
    if isinstance(api, rayk.Cluster):
        calls += [lambda salt: api.submit(prompt, GREEDY, cache_salt=salt).result(), lambda salt: list(api.stream(prompt, GREEDY, cache_salt=salt))]
    return calls


def _check_salt_limits(api) -> None:
    for call in _salt_refusals(api):
        for salt in (TOO_LONG, TOO_LONG_IN_UTF8, TOO_LONG.encode()):
            with pytest.raises(ValueError, match=rf"cache_salt is \d+ bytes; the limit is {MAX_CACHE_SALT_BYTES} bytes"):
                call(salt)
        for salt in (7, ["a"], 1.5):
            with pytest.raises(TypeError, match="cache_salt must be a str, bytes or None"):
                call(salt)
    at_limit = "s" * MAX_CACHE_SALT_BYTES
    prompt = random_prompts([20], seed=1301)[0]
    [output] = api.generate(prompt, GREEDY, cache_salt=at_limit)
    assert len(output.token_ids) == GREEDY.max_tokens


# -- one engine ---------------------------------------------------------------------------------


def test_llm_refuses_a_salt_of_the_wrong_type_or_over_the_limit(tiny_chat_dir):
    llm = rayk.LLM(str(tiny_chat_dir), block_size=BLOCK_SIZE, num_device_blocks=64, host_blocks=8)
    try:
        _check_salt_limits(llm)
        llm.engine.kv_cache_manager.check_invariants()
        assert llm.stats()["device_pool"]["used_blocks"] == 0
    finally:
        llm.close()


def test_a_colliding_key_is_refused_on_one_engine(monkeypatch, tiny_llama_dir):
    monkeypatch.setenv(WEAK_KEYS_ENV, "1")
    llm = rayk.LLM(str(tiny_llama_dir), block_size=BLOCK_SIZE, num_device_blocks=64)
    try:
        prompt, flipped, third_only = _colliding_twins(seed=1310)
        keys = llm.block_hashes(prompt)
        assert len(keys) == 3 and llm.block_hashes(flipped) == keys and llm.block_hashes(third_only) == keys
        expected = hf_greedy(tiny_llama_dir, [prompt, flipped, third_only], GREEDY.max_tokens)

        outputs = [llm.generate(p, GREEDY)[0] for p in (prompt, flipped, third_only, prompt)]
        assert [o.token_ids for o in outputs] == expected + expected[:1]
        # The flipped twin shares no block with the prompt; the third-block twin shares two.
        assert [o.num_cached_tokens for o in outputs] == [0, 0, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE]
        assert llm.stats()["prefix_cache"]["hit_tokens"] == 5 * BLOCK_SIZE
        llm.engine.kv_cache_manager.check_invariants()
    finally:
        llm.close()


# -- across workers, with colliding keys ----------------------------------------------------------


def test_a_colliding_key_is_refused_when_routed_to_its_holder_and_when_pulled(tiny_llama_dir):
    """Runs its own Ray nodes (the weak keys must be in their environment), so it comes before
    the tests that share ``ray_nodes``."""
    namespace = NAMESPACE + "-collide"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WEAK_KEYS_ENV, "1")  # the driver, and the Ray nodes started below, inherit it
        with local_ray_nodes(namespace, 2, 2), rayk.Cluster(str(tiny_llama_dir), num_workers=2, namespace=namespace, block_size=BLOCK_SIZE) as cluster:
            prompt, flipped, _ = _colliding_twins(seed=1320)
            assert cluster.block_hashes(flipped) == cluster.block_hashes(prompt)
            expected = hf_greedy(tiny_llama_dir, [prompt, flipped], GREEDY.max_tokens)

            [first] = cluster.generate(prompt, GREEDY)
            cluster._control("flush_events", first.worker)
            before = cluster.stats()["routing"]
            [routed] = cluster.generate(flipped, GREEDY)  # the directory says its keys are on first.worker
            after = cluster.stats()["routing"]
            assert routed.worker == first.worker
            assert after["predicted_hit_tokens"] - before["predicted_hit_tokens"] == 3 * BLOCK_SIZE
            assert routed.num_cached_tokens == 0 and routed.token_ids == expected[1]

            other = next(w for w in cluster.workers() if w != first.worker)
            pulled_before = cluster.stats()["workers"][other]["transfers"]["pulled_blocks"]
            [pulled] = cluster.generate(flipped, GREEDY, worker=other, pull="always")
            stats = cluster.stats()
            assert stats["workers"][other]["transfers"]["pulled_blocks"] - pulled_before == 3  # the blocks came, and were refused
            assert pulled.worker == other and pulled.num_cached_tokens == 0 and pulled.token_ids == expected[1]
            assert first.token_ids == expected[0]
            for result in cluster._control("check_invariants", None).values():
                assert result["used_blocks"] == 0


# -- across workers: salts, tenants, routing, sha256 ------------------------------------------------


@pytest.fixture(scope="module")
def ray_nodes():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_ENV, SECRET)  # on every node, as an operator sets it; read by the tenant actor
        with local_ray_nodes(NAMESPACE, 2, 2) as nodes:
            yield nodes


def test_sha256_keys_serve_hits_routing_and_pulls_across_the_cluster(ray_nodes, tiny_llama_dir):
    """Its own deployment, started and stopped here, before the module's other deployments."""
    namespace = NAMESPACE + "-sha256"
    with rayk.Cluster(str(tiny_llama_dir), num_workers=2, namespace=namespace, block_size=BLOCK_SIZE, hash_algorithm="sha256") as cluster:
        assert cluster.hasher.algorithm == "sha256"
        shared = random_prompts([50], seed=1330)[0]
        prompts = [shared + q for q in random_prompts([3, 5, 4], seed=1331)]
        keys = cluster.block_hashes(prompts[0])
        assert len(keys) == 3 and all(len(k) == 32 for k in keys)
        assert keys == BlockHasher(cluster.hasher.fingerprint, BLOCK_SIZE, "sha256").hash_blocks(prompts[0])
        expected = hf_greedy(tiny_llama_dir, prompts, GREEDY.max_tokens)

        [first] = cluster.generate(prompts[0], GREEDY)
        cluster._control("flush_events", first.worker)
        [second] = cluster.generate(prompts[1], GREEDY)  # routed to the prefix's holder
        other = next(w for w in cluster.workers() if w != first.worker)
        [pulled] = cluster.generate(prompts[2], GREEDY, worker=other, pull="always")
        assert [o.token_ids for o in (first, second, pulled)] == expected
        assert second.worker == first.worker and second.num_cached_tokens == 3 * BLOCK_SIZE
        assert pulled.worker == other and pulled.num_cached_tokens == 3 * BLOCK_SIZE
        stats = cluster.stats()
        assert stats["workers"][other]["transfers"]["pulled_blocks"] == 3
        assert stats["routing"]["predicted_hit_tokens"] >= 3 * BLOCK_SIZE
        assert stats["directory"]["blocks"] > 0


@pytest.fixture(scope="module")
def salted(ray_nodes, tiny_chat_dir):
    with rayk.Cluster(str(tiny_chat_dir), num_workers=2, namespace=NAMESPACE, block_size=BLOCK_SIZE, host_blocks=8) as cluster:
        yield cluster


@pytest.fixture()
def fresh(salted):
    salted.reset_prefix_cache()
    return salted


def test_the_cluster_refuses_a_salt_of_the_wrong_type_or_over_the_limit_and_keeps_serving(fresh):
    _check_salt_limits(fresh)
    for result in fresh._control("check_invariants", None).values():
        assert result["used_blocks"] == 0


def test_the_same_salt_hits_on_another_worker_and_another_salt_misses(fresh, tiny_chat_dir):
    prompt = random_prompts([50], seed=1340)[0]
    [expected] = hf_greedy(tiny_chat_dir, [prompt], GREEDY.max_tokens)
    [first] = fresh.generate(prompt, GREEDY, cache_salt="tenant-a")
    fresh._control("flush_events", first.worker)
    other = next(w for w in fresh.workers() if w != first.worker)
    [same] = fresh.generate(prompt, GREEDY, cache_salt="tenant-a", worker=other, pull="always")
    [different] = fresh.generate(prompt, GREEDY, cache_salt="tenant-b", worker=other, pull="always")
    [unsalted] = fresh.generate(prompt, GREEDY, worker=first.worker)
    assert [o.token_ids for o in (first, same, different, unsalted)] == [expected] * 4
    assert same.worker == different.worker == other
    assert (first.num_cached_tokens, same.num_cached_tokens, different.num_cached_tokens, unsalted.num_cached_tokens) == (0, 3 * BLOCK_SIZE, 0, 0)


def test_routing_predicts_no_hit_across_salts_and_sends_a_salted_twin_by_load(fresh, tiny_chat_dir):
    prompt = random_prompts([50], seed=1350)[0]
    [expected] = hf_greedy(tiny_chat_dir, [prompt], GREEDY.max_tokens)
    [unsalted] = fresh.generate(prompt, GREEDY)
    fresh._control("flush_events", unsalted.worker)
    before = fresh.stats()["routing"]
    [salted_twin] = fresh.generate(prompt, GREEDY, cache_salt="tenant-c")
    after = fresh.stats()["routing"]
    assert after["predicted_hit_tokens"] == before["predicted_hit_tokens"]
    assert after["oracle_hit_tokens"] == before["oracle_hit_tokens"]
    assert after["pull_plans"] == before["pull_plans"]
    # No worker holds its keys: it seeds a new prefix on the worker holding fewer, not on the
    # holder of its unsalted twin.
    assert salted_twin.worker != unsalted.worker and salted_twin.num_cached_tokens == 0
    [again] = fresh.generate(prompt, GREEDY)
    assert fresh.stats()["routing"]["predicted_hit_tokens"] - after["predicted_hit_tokens"] == 3 * BLOCK_SIZE
    assert again.worker == unsalted.worker and again.num_cached_tokens == 3 * BLOCK_SIZE
    assert unsalted.token_ids == salted_twin.token_ids == again.token_ids == expected


def test_tenant_needs_a_deployment_with_a_secret(fresh):
    with pytest.raises(ValueError, match="tenant= needs a deployment started with tenant_secret_env="):
        fresh.generate([1, 2, 3], GREEDY, tenant="acme")


@pytest.fixture(scope="module")
def tenanted(ray_nodes, salted, tiny_llama_dir):
    """A second deployment on the same nodes, deriving salts from ``SECRET_ENV``."""
    with rayk.Cluster(str(tiny_llama_dir), num_workers=2, namespace=NAMESPACE + "-tenants", block_size=BLOCK_SIZE, tenant_secret_env=SECRET_ENV) as cluster:
        yield cluster


def test_tenants_never_share_and_the_salt_is_derived_in_the_deployment(tenanted, tiny_llama_dir):
    prompt = random_prompts([50], seed=1360)[0]
    [expected] = hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)
    derived = BlockHasher(tenanted.hasher.fingerprint, BLOCK_SIZE).hash_blocks(prompt, derive_salt(SECRET.encode(), "acme"))
    assert tenanted.block_hashes(prompt, tenant="acme") == derived != tenanted.block_hashes(prompt, tenant="globex")

    [first] = tenanted.generate(prompt, GREEDY, tenant="acme")
    tenanted._control("flush_events", first.worker)
    other = next(w for w in tenanted.workers() if w != first.worker)
    [again] = tenanted.generate(prompt, GREEDY, tenant="acme")
    [pulled] = tenanted.generate(prompt, GREEDY, tenant="acme", worker=other, pull="always")
    [globex] = tenanted.generate(prompt, GREEDY, tenant="globex", worker=first.worker)
    tenanted._control("flush_events", first.worker)
    globex_pulled = tenanted.submit(prompt, GREEDY, tenant="globex", worker=other, pull="always").result()
    [anonymous] = tenanted.generate(prompt, GREEDY, worker=first.worker)
    outputs = (first, again, pulled, globex, globex_pulled, anonymous)
    assert [o.token_ids for o in outputs] == [expected] * 6
    assert [o.num_cached_tokens for o in outputs] == [0, 48, 48, 0, 48, 0]  # globex hits only its own blocks
    assert again.worker == first.worker and pulled.worker == other


def test_a_client_salt_is_refused_where_salts_are_derived(tenanted):
    prompt = random_prompts([20], seed=1370)[0]
    salt = derive_salt(SECRET.encode(), "acme")  # even the right one: only tenant ids are taken
    for call in (
        lambda: tenanted.generate(prompt, GREEDY, cache_salt=salt),
        lambda: tenanted.submit(prompt, GREEDY, cache_salt="acme"),
        lambda: list(tenanted.stream(prompt, GREEDY, cache_salt="acme")),
        lambda: tenanted.locate(prompt, cache_salt="acme"),
        lambda: tenanted.block_hashes(prompt, cache_salt="acme"),
    ):
        with pytest.raises(ValueError, match="derives cache salts from tenant ids"):
            call()
    for tenant, error in (("", ValueError), ("t" * (MAX_CACHE_SALT_BYTES + 1), ValueError), (7, TypeError)):
        with pytest.raises(error, match="tenant must be"):
            tenanted.generate(prompt, GREEDY, tenant=tenant)


def test_the_secret_never_reaches_a_driver(tenanted):
    prompt = random_prompts([20], seed=1380)[0]
    outputs = tenanted.generate(prompt, GREEDY, tenant="acme")
    seen = [
        tenanted.stats(),
        outputs,
        vars(tenanted),
        [ray.get(ray.get_actor(worker_actor_name(w), namespace=tenanted.namespace).info.remote()) for w in tenanted.workers()],
        ray.util.list_named_actors(all_namespaces=True),
    ]
    text = repr(seen)
    assert SECRET not in text and SECRET.encode().hex() not in text
    connected = rayk.connect(namespace=tenanted.namespace)  # another driver, without the secret
    [output] = connected.generate(prompt, GREEDY, tenant="acme")
    assert output.num_cached_tokens == BLOCK_SIZE and output.token_ids == outputs[0].token_ids


def test_a_missing_secret_fails_the_start_naming_the_variable_only(ray_nodes, tenanted, tiny_llama_dir):
    namespace = NAMESPACE + "-nosecret"
    with pytest.raises(ValueError, match="RAYK_TEST_NO_SUCH_SECRET is not set"):
        rayk.Cluster(str(tiny_llama_dir), num_workers=1, namespace=namespace, block_size=BLOCK_SIZE, tenant_secret_env="RAYK_TEST_NO_SUCH_SECRET")
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]
    with pytest.raises(ValueError, match="tenant_secret_env must name an environment variable"):
        rayk.Cluster(str(tiny_llama_dir), namespace=namespace, tenant_secret_env="not a name")
    assert TENANT_SALTS_NAME.startswith("rayk-")
