"""Reading a GGUF file's container: its metadata and where each tensor's bytes lie.

The file is untrusted input. Every count, length, offset, type and shape is checked against the
bytes that are actually there before it is used, and a bad one raises ``ValueError`` naming the
file, the field or tensor and what was wrong. Tensor bytes are not copied: ``raw`` returns a
uint8 view of a private (copy-on-write) memory map of the file, so a 100 MB file opens in
milliseconds. Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count
u64, metadata count u64, the metadata (key string, type u32, value), the tensor infos (name,
dims u32, each dim u64 innermost first, type u32, offset u64 from the data section), then the
data section at the next multiple of ``general.alignment`` (32 by default).

Metadata values become plain Python values (str, int, float, bool, lists of those).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 4
_DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> (name, struct format of one scalar, or None for string/array).
_VALUE_TYPES = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<B"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8"}

# ggml tensor types rayk can size and decode: id -> (name, values per block, bytes per block).
TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description. ``shape`` is row-major (Hugging Face order, ggml's dims
    reversed); ``offset`` is absolute in the file, in bytes. ``nbytes`` is None only for a type
    rayk cannot size (``quant`` then names it, for the error the loader raises)."""

    name: str
    quant: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int | None


class GGUFFile:
    """An open GGUF file: ``fields`` (metadata key -> value) and ``tensors`` (in file order)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
            raise ValueError(f"{self.path.name} is not a readable GGUF file ({type(error).__name__}: {error})") from None
        self.version, self.fields, self.tensors, self.data_offset = _Parser(memoryview(self._map), self.path.name).parse()

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a writable uint8 array over the map (writes never reach the file)."""
        assert tensor.nbytes is not None, f"{tensor.name}: unsized type {tensor.quant}"
        return np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)


class _Parser:
    def __init__(self, buffer: memoryview, name: str):
        self.buffer = buffer
        self.size = len(buffer)
        self.name = name
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.name} is not a readable GGUF file: {what}")

    def take(self, count: int, what: str) -> memoryview:
        if count < 0 or self.pos + count > self.size:
            raise self.fail(f"{what} needs {count} bytes at offset {self.pos}, past the end of the file ({self.size} bytes); is the file truncated?")
        view = self.buffer[self.pos : self.pos + count]
        self.pos += count
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"the length of {what}")
        data = self.take(length, what)
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def parse(self):
        magic = bytes(self.take(4, "the magic"))
        if magic != _MAGIC:
            raise self.fail(f"it starts with {magic!r}, not {_MAGIC!r}")
        version = self.scalar("<I", "the version")
        if version not in _VERSIONS:
            raise self.fail(f"GGUF version {version} (rayk reads versions {_VERSIONS}, little-endian)")
        tensor_count = self.scalar("<Q", "the tensor count")
        field_count = self.scalar("<Q", "the metadata count")
        # Each metadata entry takes at least 12 bytes (key length + type) and each tensor info 20.
        self.check_count(field_count, 12, "metadata entries")
        self.check_count(tensor_count, 20, "tensors")
        fields = {}
        for index in range(field_count):
            key = self.string(f"metadata key {index}")
            if key in fields:
                raise self.fail(f"metadata key {key!r} appears twice")
            fields[key] = self.value(self.scalar("<I", f"the type of {key}"), key, 0)
        alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment is {alignment!r}, not a positive power of two")
        infos = [self.tensor_info(index) for index in range(tensor_count)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors, names = [], set()
        for name, type_id, dims, relative in infos:
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            tensors.append(self.checked_tensor(name, type_id, dims, relative, data_offset, alignment))
        return version, fields, tensors, data_offset

    def check_count(self, count: int, min_bytes_each: int, what: str) -> None:
        if count > (self.size - self.pos) // min_bytes_each:
            raise self.fail(f"it declares {count} {what}, more than its {self.size} bytes can hold")

    def value(self, type_id: int, key: str, depth: int):
        if type_id not in _VALUE_TYPES:
            raise self.fail(f"metadata {key!r} has unknown value type {type_id}")
        if type_id == _STRING:
            return self.string(f"the value of {key}")
        if type_id == _ARRAY:
            return self.array(key, depth)
        value = self.scalar(_VALUE_TYPES[type_id][1], f"the value of {key}")
        return bool(value) if type_id == _BOOL else value

    def array(self, key: str, depth: int) -> list:
        if depth >= _MAX_ARRAY_NESTING:
            raise self.fail(f"metadata {key!r} nests arrays deeper than {_MAX_ARRAY_NESTING}")
        item_type = self.scalar("<I", f"the item type of {key}")
        count = self.scalar("<Q", f"the length of {key}")
        if item_type in _NUMPY_TYPES:
            itemsize = np.dtype(_NUMPY_TYPES[item_type]).itemsize
            self.check_count(count, itemsize, f"items in {key}")
            data = self.take(count * itemsize, f"the items of {key}")
            return np.frombuffer(data, dtype=_NUMPY_TYPES[item_type]).tolist()
        if item_type == _BOOL:
            self.check_count(count, 1, f"items in {key}")
            return [bool(b) for b in self.take(count, f"the items of {key}")]
        if item_type == _STRING:
            self.check_count(count, 8, f"items in {key}")
            return self.string_array(key, count)
        if item_type == _ARRAY:
            self.check_count(count, 12, f"items in {key}")
            return [self.array(key, depth + 1) for _ in range(count)]
        raise self.fail(f"metadata {key!r} is an array of unknown value type {item_type}")

    def string_array(self, key: str, count: int) -> list[str]:
        """Inlined ``string`` in a loop: vocabularies hold ~10^5 strings, and this is the hot spot."""
        buffer, size, pos, out = self.buffer, self.size, self.pos, []
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"{key}[{index}] starts past the end of the file; is the file truncated?")
            end = pos + 8 + int.from_bytes(buffer[pos : pos + 8], "little")
            if end > size:
                self.pos = pos
                raise self.fail(f"{key}[{index}] runs past the end of the file; is the file truncated?")
            try:
                out.append(str(buffer[pos + 8 : end], "utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"{key}[{index}] is not valid UTF-8") from None
            pos = end
        self.pos = pos
        return out

    def tensor_info(self, index: int) -> tuple[str, int, list[int], int]:
        name = self.string(f"the name of tensor {index}")
        n_dims = self.scalar("<I", f"the rank of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = list(struct.unpack(f"<{n_dims}Q", self.take(8 * n_dims, f"the shape of {name}")))
        type_id = self.scalar("<I", f"the type of {name}")
        relative = self.scalar("<Q", f"the offset of {name}")
        return name, type_id, dims, relative

    def checked_tensor(self, name: str, type_id: int, dims: list[int], relative: int, data_offset: int, alignment: int) -> GGUFTensor:
        if any(d == 0 for d in dims):
            raise self.fail(f"tensor {name} has an empty dimension in {dims}")
        if relative % alignment:
            raise self.fail(f"tensor {name}'s offset {relative} is not a multiple of the alignment {alignment}")
        offset = data_offset + relative
        if offset > self.size:
            raise self.fail(f"tensor {name} starts at byte {offset}, past the end of the file ({self.size} bytes); is the file truncated?")
        shape = tuple(reversed(dims))
        if type_id not in TENSOR_TYPES:
            return GGUFTensor(name, _unknown_type_name(type_id), type_id, shape, offset, None)
        quant, block_values, block_bytes = TENSOR_TYPES[type_id]
        if dims[0] % block_values:
            raise self.fail(f"tensor {name} ({quant}) has rows of {dims[0]} values, not a multiple of its block of {block_values}")
        count = 1
        for d in dims:
            count *= d  # Python ints: no overflow, and the size check below bounds the result
        nbytes = count // block_values * block_bytes
        if offset + nbytes > self.size:
            raise self.fail(
                f"tensor {name}'s data (bytes {offset} to {offset + nbytes}) runs past the end of the file ({self.size} bytes); is the file truncated?"
            )
        return GGUFTensor(name, quant, type_id, shape, offset, nbytes)


def _unknown_type_name(type_id: int) -> str:
    """The ggml name of a type rayk does not decode (gguf's enum knows them all), for errors only."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown ggml type {type_id}"
