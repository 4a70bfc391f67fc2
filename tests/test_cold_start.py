"""A cold start of the default model: rayk's own GGUF parser reads what gguf's reader reads and
rejects malformed files with errors that name the fault, weights for a 16-bit dtype are the
float32 ones rounded, a slow load reports progress on stderr, and starting rayk imports none
of transformers, gguf, Triton or torch._dynamo."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from rayk.model import loader
from rayk.model.gguf_file import GGUFFile
from rayk.model.gguf_loader import gguf_architecture, gguf_weights
from rayk.model.load_progress import LoadProgress

_U32, _STRING, _ARRAY = 4, 8, 9


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _u32_field(key: bytes, value: int) -> bytes:
    return _string(key) + struct.pack("<II", _U32, value)


def _tensor_info(name: bytes, dims: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def _gguf(fields=(), tensors=(), data=b"", magic=b"GGUF", version=3, counts=None) -> bytes:
    """A GGUF file from raw pieces; ``counts`` overrides the declared (tensor, field) counts."""
    tensor_count, field_count = counts or (len(tensors), len(fields))
    head = magic + struct.pack("<IQQ", version, tensor_count, field_count) + b"".join(fields) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


_GOOD_DATA = np.arange(8, dtype=np.float32).tobytes()
_GOOD = dict(fields=[_u32_field(b"n", 7)], tensors=[_tensor_info(b"t", [8])], data=_GOOD_DATA)

BAD_FILES = {
    "wrong magic": (dict(_GOOD, magic=b"GGML"), "it starts with b'GGML', not b'GGUF'"),
    "version 1": (dict(_GOOD, version=1), "GGUF version 1"),
    "absurd tensor count": (dict(_GOOD, counts=(1 << 40, 1)), "it declares 1099511627776 tensors, more than its 128 bytes can hold"),
    "key past the end": (dict(_GOOD, fields=[struct.pack("<Q", 10**9) + b"n"]), r"metadata key 0 needs 1000000000 bytes at offset 32, past the end of the file \(128 bytes\)"),
    "unknown value type": (dict(_GOOD, fields=[_string(b"n") + struct.pack("<II", 99, 0)]), "metadata 'n' has unknown value type 99"),
    "duplicate key": (dict(_GOOD, fields=[_u32_field(b"n", 1), _u32_field(b"n", 2)]), "metadata key 'n' appears twice"),
    "non-UTF-8 key": (dict(_GOOD, fields=[_u32_field(b"\xff\xfe", 1)]), "metadata key 0 is not valid UTF-8"),
    "string array longer than the file": (
        dict(_GOOD, fields=[_string(b"tokens") + struct.pack("<IIQ", _ARRAY, _STRING, 1 << 30) + _string(b"x")]),
        "it declares 1073741824 items in tokens, more than its 128 bytes can hold",
    ),
    "string in an array past the end": (
        dict(fields=[_string(b"tokens") + struct.pack("<IIQ", _ARRAY, _STRING, 2) + _string(b"x") + struct.pack("<Q", 500)], tensors=[]),
        r"tokens\[1\] runs past the end of the file",
    ),
    "bad alignment": (dict(_GOOD, fields=[_u32_field(b"general.alignment", 3)]), "general.alignment is 3, not a positive power of two"),
    "five dimensions": (dict(_GOOD, tensors=[_tensor_info(b"t", [1, 1, 1, 1, 8])]), "tensor t has 5 dimensions"),
    "empty dimension": (dict(_GOOD, tensors=[_tensor_info(b"t", [8, 0])]), r"tensor t has an empty dimension in \[8, 0\]"),
    "duplicate tensor": (dict(_GOOD, tensors=[_tensor_info(b"t", [8]), _tensor_info(b"t", [8], offset=32)], data=_GOOD_DATA * 2), "tensor 't' appears twice"),
    "misaligned offset": (dict(_GOOD, tensors=[_tensor_info(b"t", [4], offset=4)]), "tensor t's offset 4 is not a multiple of the alignment 32"),
    "data past the end": (dict(_GOOD, data=_GOOD_DATA[:20]), r"tensor t's data \(bytes \d+ to \d+\) runs past the end of the file"),
    "rows not whole blocks": (dict(_GOOD, tensors=[_tensor_info(b"t", [8], type_id=2)]), r"tensor t \(Q4_0\) has rows of 8 values, not a multiple of its block of 32"),
}


def test_a_well_formed_file_parses_to_its_fields_and_tensor_bytes(tmp_path):
    (tmp_path / "good.gguf").write_bytes(_gguf(**_GOOD))
    parsed = GGUFFile(tmp_path / "good.gguf")
    assert parsed.fields == {"n": 7}
    [tensor] = parsed.tensors
    assert (tensor.name, tensor.quant, tensor.shape, tensor.nbytes) == ("t", "F32", (8,), 32)
    assert parsed.raw(tensor).tobytes() == _GOOD_DATA


@pytest.mark.parametrize("fault", sorted(BAD_FILES))
def test_a_malformed_file_is_rejected_naming_the_fault(tmp_path, fault):
    pieces, message = BAD_FILES[fault]
    (tmp_path / "bad.gguf").write_bytes(_gguf(**pieces))
    with pytest.raises(ValueError, match="bad.gguf is not a readable GGUF file: " + message):
        GGUFFile(tmp_path / "bad.gguf")


def test_an_empty_file_is_rejected(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf is not a readable GGUF file"):
        GGUFFile(tmp_path / "empty.gguf")


@pytest.fixture(scope="module")
def default_gguf():
    return loader.default_model_path()


def test_the_default_model_parses_exactly_as_ggufs_reader_does(default_gguf):
    import gguf

    reference = gguf.GGUFReader(str(default_gguf))
    ours = GGUFFile(default_gguf)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header
            continue
        value = field.contents()
        assert ours.fields[key] == (value.tolist() if isinstance(value, np.ndarray) else value), key
    assert len(ours.fields) == len(reference.fields) - 3
    assert [(t.name, t.quant, t.shape, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes) for t in reference.tensors
    ]


def test_16_bit_weights_are_the_float32_weights_rounded(default_gguf):
    parsed = GGUFFile(default_gguf)
    arch = gguf_architecture(parsed, default_gguf)
    shapes, layout = loader.expected_tensor_shapes(arch), loader.fused_layout(arch)
    full = gguf_weights(parsed, arch, shapes, layout, torch.float32, default_gguf)
    half = gguf_weights(parsed, arch, shapes, layout, torch.bfloat16, default_gguf)
    assert full.keys() == half.keys() and all(t.dtype == torch.bfloat16 for t in half.values())
    for name in full:
        assert torch.equal(full[name].to(torch.bfloat16), half[name]), name


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wait_for(stream: io.StringIO, text: str, timeout_s: float = 30.0) -> None:
    """Until the progress thread has written ``text`` (it runs on its own schedule)."""
    deadline = time.monotonic() + timeout_s
    while text not in stream.getvalue():
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s: {stream.getvalue()!r}"
        time.sleep(0.01)


def test_a_quick_load_prints_nothing():
    stream = io.StringIO()
    with LoadProgress("model.gguf", stream=stream, delay_s=0.5) as progress:
        progress.stage("dequantizing weights")
    assert stream.getvalue() == ""


def test_a_slow_load_prints_each_stage_then_ready_on_a_log():
    stream = io.StringIO()
    with LoadProgress("model.gguf", stream=stream, delay_s=0.05, interval_s=0.01) as progress:
        progress.stage("reading the GGUF file")
        _wait_for(stream, "reading the GGUF file")
        progress.stage("dequantizing weights")
        _wait_for(stream, "dequantizing weights")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("rayk: loading model.gguf: reading the GGUF file (")
    assert lines[1].startswith("rayk: loading model.gguf: dequantizing weights (")
    assert len(lines) == 3 and lines[2].startswith("rayk: model.gguf ready after ") and lines[2].endswith(" s")


def test_a_slow_load_rewrites_one_line_on_a_terminal_and_says_when_it_failed():
    stream = _Terminal()
    with pytest.raises(RuntimeError), LoadProgress("model.gguf", stream=stream, delay_s=0.05, interval_s=0.02) as progress:
        progress.stage("dequantizing weights")
        deadline = time.monotonic() + 30
        while stream.getvalue().count("dequantizing weights") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the thread has rewritten the line a few times
        raise RuntimeError("disk gone")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended once
    assert text.count("\rrayk: loading model.gguf: dequantizing weights (") >= 3
    assert "\rrayk: model.gguf failed after " in text
    assert not any(t.name == "rayk-load-progress" for t in threading.enumerate())


def test_starting_the_default_model_imports_no_heavy_optional_module():
    script = (
        "import sys, rayk\n"
        "llm = rayk.LLM(conversion_cache_dir=None)\n"
        "print(sorted(m for m in ('transformers', 'gguf', 'triton', 'torch._dynamo') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
