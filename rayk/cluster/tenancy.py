"""Server-derived cache salts: tenants kept apart by a secret that no driver holds.

A deployment started with ``rayk.Cluster(..., tenant_secret_env="NAME")`` runs one more named,
detached actor, ``rayk-tenant-salts``. It reads the cluster secret from the environment variable
NAME in its own process (set it on every node, as the Ray token is set; at least
``rayk.config.MIN_SECRET_BYTES`` bytes) and answers one question: the cache salt of a tenant id,
``HMAC-SHA256(secret, "rayk-tenant-salt-v1\\0" || tenant id)``, 32 bytes.

Why this shape. Routing needs a request's salted block keys, and the driver hashes prompts (the
coordinator only ever sees keys). So the driver asks the actor for the tenant's salt, hashes the
prompt with it, and sends it with the request like any ``cache_salt``: the router and the
workers see only that tenant's keys. What the driver holds is an HMAC output: it reveals
neither the secret nor any other tenant's salt. On such a deployment a caller-chosen
``cache_salt`` is refused, so the only way to a tenant's cached blocks is its tenant id, which
the application in front of rayk authenticates; without the secret nobody can compute a
tenant's salt, and no API accepts one.

Invariants: the secret is read in the actor's process and never leaves it (no method returns
it; nothing in ``stats()`` or in an output names it; errors name the variable, never its value).
Requests without a tenant carry no salt and share the unsalted cache, as on any deployment.
Whoever can call the Ray cluster's actors directly is trusted, as everywhere in rayk.
"""

from __future__ import annotations

import hashlib
import hmac
import ray

from rayk.config import check_env_name, secret_from_env
from rayk.hashing import MAX_CACHE_SALT_BYTES

TENANT_SALTS_NAME = "rayk-tenant-salts"
"""The actor's name: with the ``rayk-`` prefix it is shut down and killed with the deployment."""
MAX_TENANT_BYTES = MAX_CACHE_SALT_BYTES
"""The longest tenant id, in UTF-8 bytes."""
_DOMAIN = b"rayk-tenant-salt-v1\0"


def check_secret_env(name) -> None:
    """A ValueError unless ``name`` can name an environment variable."""
    check_env_name("tenant_secret_env", name)


def check_tenant(tenant) -> str:
    """``tenant`` if it is a non-empty str of at most ``MAX_TENANT_BYTES`` UTF-8 bytes; else a
    TypeError or ValueError naming it."""
    if not isinstance(tenant, str):
        raise TypeError(f"tenant must be a str (a tenant id), got {type(tenant).__name__}")
    if not tenant or len(tenant.encode("utf-8")) > MAX_TENANT_BYTES:
        raise ValueError(f"tenant must be 1 to {MAX_TENANT_BYTES} bytes in UTF-8, got {len(tenant.encode('utf-8'))}")
    return tenant


def derive_salt(secret: bytes, tenant: str) -> bytes:
    """The 32-byte cache salt of ``tenant`` under ``secret``."""
    return hmac.new(secret, _DOMAIN + tenant.encode("utf-8"), hashlib.sha256).digest()


@ray.remote
class TenantSalts:
    """Holds the cluster secret and derives tenants' salts (see the module docstring)."""

    def __init__(self, secret_env: str):
        self._secret = secret_from_env("tenant_secret_env", secret_env, f"on the node running {TENANT_SALTS_NAME}")

    def ready(self) -> bool:
        return True

    def salts(self, tenants: list[str]) -> list[bytes]:
        return [derive_salt(self._secret, check_tenant(t)) for t in tenants]

    def shutdown(self) -> None:
        """Nothing to persist: present because the deployment's teardown asks every rayk- actor."""


def start_tenant_salts(namespace: str, secret_env: str):
    """Starts the deployment's ``TenantSalts`` actor; a ValueError (naming the variable, never its
    value) when the secret is missing on its node."""
    handle = TenantSalts.options(name=TENANT_SALTS_NAME, namespace=namespace, lifetime="detached", max_restarts=-1, num_cpus=0).remote(secret_env)
    try:
        ray.get(handle.ready.remote())
    except ray.exceptions.RayActorError as error:
        lines = [line.strip() for line in str(error).splitlines() if "tenant_secret_env" in line]
        raise ValueError(lines[-1] if lines else f"{TENANT_SALTS_NAME} failed to start") from None
    return handle


def find_tenant_salts(namespace: str):
    """The deployment's ``TenantSalts`` actor, or None when it derives no salts."""
    try:
        return ray.get_actor(TENANT_SALTS_NAME, namespace=namespace)
    except ValueError:
        return None


def request_salt(tenant_salts, cache_salt, tenant) -> str | bytes | None:
    """The cache salt a request carries. Without a ``TenantSalts`` actor: the caller's
    ``cache_salt`` (``tenant`` is refused). With one: the salt derived from ``tenant`` (None
    without one), and a caller's ``cache_salt`` is refused."""
    if tenant_salts is None:
        if tenant is not None:
            raise ValueError("tenant= needs a deployment started with tenant_secret_env=; this one takes cache_salt")
        return cache_salt
    if cache_salt is not None:
        raise ValueError("this deployment derives cache salts from tenant ids (tenant_secret_env): pass tenant=, a cache_salt is refused")
    if tenant is None:
        return None
    [salt] = ray.get(tenant_salts.salts.remote([check_tenant(tenant)]))
    return salt
