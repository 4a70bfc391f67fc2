"""Nothing rayk reads from disk or from a peer is unpickled or evaluated.

The first tests scan the package's source (``ast``) for the calls that run code from data:
pickle-family loads, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with
``allow_pickle=True``, ``yaml.load`` without a safe loader, ``marshal`` loads, ``eval`` and
``exec``; the scanner itself is checked on planted source, so a scan that went blind would fail.
The others plant a live malicious pickle (one that creates a marker file when unpickled) in the
disk tier's directory and hand it to a worker's pull path as a peer's payload: it is refused
and counted, the marker never appears, and serving goes on with the reference tokens.
"""

from __future__ import annotations

import ast
import asyncio
import pathlib
import pickle

import numpy as np
import pytest

import rayk
from rayk.cache import block_codec
from rayk.cluster.routing import FetchPlan
from rayk.cluster.transfer import PeerPuller
from tests.conftest import BLOCK_SIZE, hf_greedy, random_prompts

PACKAGE = pathlib.Path(rayk.__file__).parent
GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

# Dotted names whose every use turns bytes into running code.
_ALWAYS_UNSAFE = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "cloudpickle", "ray.cloudpickle", "dill", "joblib")
    for name in ("load", "loads", "Unpickler")
} | {"marshal.load", "marshal.loads", "shelve.open", "jsonpickle.decode", "yaml.unsafe_load", "yaml.full_load", "pandas.read_pickle", "eval", "exec"}
_TORCH_LOADS = {"torch.load", "torch.serialization.load"}
_NUMPY_LOADS = {"numpy.load"}
_SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, for every import in the module."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The resolved dotted name of a Name or a chain of Attributes on one, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every unsafe deserialization or evaluation in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and _dotted(node, aliases) in _ALWAYS_UNSAFE - {"eval", "exec"}:
            found.append(f"{filename}:{node.lineno}: {_dotted(node, aliases)}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name in ("eval", "exec") and isinstance(node.func, ast.Name):
            found.append(f"{filename}:{node.lineno}: {name}()")
        elif name in _TORCH_LOADS and not _is_constant(_keyword(node, "weights_only"), True):
            found.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
        elif name in _NUMPY_LOADS and _keyword(node, "allow_pickle") is not None and not _is_constant(_keyword(node, "allow_pickle"), False):
            found.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
        elif name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, aliases) not in _SAFE_YAML_LOADERS:
                found.append(f"{filename}:{node.lineno}: yaml.load without a safe Loader")
    return sorted(set(found))


def test_the_package_never_unpickles_evaluates_or_torch_loads_unsafely():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the whole package is scanned, not an empty directory
    found = [hit for path in files for hit in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]
    assert found == [], "unsafe deserialization or evaluation:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.load(open('f', 'rb'))",
        "from pickle import loads\nloads(b'')",
        "from pickle import Unpickler\nclass U(Unpickler): pass",
        "import cloudpickle\ncloudpickle.loads(b'')",
        "from ray import cloudpickle\ncloudpickle.loads(b'')",
        "import dill\ndill.load(f)",
        "import marshal\nmarshal.loads(b'')",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "from torch import load\nload('x.pt')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "eval('1 + 1')",
        "exec('x = 1')",
    ],
)
def test_the_scanner_finds_each_unsafe_form(source):
    assert len(unsafe_calls(source)) == 1, source


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "import numpy as np\nnp.load('x.npy')\nnp.load('y.npy', allow_pickle=False)",
        "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import msgpack\nmsgpack.unpackb(b'', raw=False)",
        "model = object()\nmodel.eval()",
        "import pickle\npickle.dumps(1)",
    ],
)
def test_the_scanner_passes_safe_forms(source):
    assert unsafe_calls(source) == [], source


class _Planted:
    """Unpickling this creates ``marker``: the payload an attacker would plant."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _malicious_pickle(marker: pathlib.Path) -> bytes:
    return pickle.dumps(_Planted(marker))


def test_the_planted_pickle_is_live(tmp_path):
    """The payload below really runs code when unpickled, so its refusal elsewhere means something."""
    control = tmp_path / "control-marker"
    pickle.loads(_malicious_pickle(control))  # noqa: S301 - the test's own planted payload
    assert control.exists()


def test_a_pickle_planted_in_the_disk_tier_is_refused_and_never_runs(tmp_path, tiny_llama_dir):
    disk_dir, marker = tmp_path / "disk", tmp_path / "marker"
    prompt = random_prompts([40], seed=1400)[0]
    [expected] = hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)
    first = rayk.LLM(str(tiny_llama_dir), block_size=BLOCK_SIZE, num_device_blocks=32, disk_dir=str(disk_dir))
    first.generate(prompt, GREEDY)
    segment_dir = first.engine.disk.segment_dir
    first.close()  # persists the prompt's blocks as segment files
    segments = sorted(segment_dir.glob("*.kvb"))
    assert segments
    payload = _malicious_pickle(marker)
    for segment in segments:
        segment.write_bytes(payload)  # a pickle under a real segment's name
    (segment_dir / "planted.kvb").write_bytes(payload)  # and as a new segment file

    second = rayk.LLM(str(tiny_llama_dir), block_size=BLOCK_SIZE, num_device_blocks=32, disk_dir=str(disk_dir))
    try:
        disk = second.stats()["disk_tier"]
        assert disk["rejected"] == len(segments) + 1 and disk["cached_blocks"] == 0
        assert sorted(segment_dir.glob("*.kvb")) == []  # refused files in rayk's own directory are deleted
        [output] = second.generate(prompt, GREEDY)
        assert output.token_ids == expected and output.num_cached_tokens == 0
    finally:
        second.close()
    assert not marker.exists()


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "behind-a-batch-prefix"])
def test_a_pickle_sent_as_a_peer_payload_is_refused_and_never_runs(tmp_path, tiny_llama_dir, wrapped):
    """The worker's pull path (``PeerPuller.pull``, then ``block_codec.decode``) gets a pickle where
    a block batch belongs: it is counted as a bad batch, the request computes its tokens."""
    marker = tmp_path / "marker"
    payload = _malicious_pickle(marker)
    if wrapped:  # a valid magic and length, with the pickle where the msgpack header belongs
        payload = block_codec.MAGIC + len(payload).to_bytes(4, "little") + payload
    llm = rayk.LLM(str(tiny_llama_dir), block_size=BLOCK_SIZE, num_device_blocks=32)
    try:
        engine = llm.engine

        async def fetch(source, keys):
            return np.frombuffer(payload, dtype=np.uint8)

        prompt = random_prompts([40], seed=1401)[0]
        plan = FetchPlan("worker-1", tuple(llm.block_hashes(prompt)))
        puller = PeerPuller(fetch, engine.kv_cache_manager.hasher, engine.kv_cache.layout)
        assert asyncio.run(puller.pull(plan)) is None
        assert puller.stats()["failed_pulls"] == {"bad_batch": 1} and puller.stats()["pulled_blocks"] == 0
        with pytest.raises(block_codec.BlockBatchError):
            block_codec.decode(payload, engine.fingerprint, engine.kv_cache.layout)
        [output] = llm.generate(prompt, GREEDY)
        assert output.token_ids == hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)[0]
    finally:
        llm.close()
    assert not marker.exists()
