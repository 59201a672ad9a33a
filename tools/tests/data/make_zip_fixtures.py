"""Writes the zip-layout `.pth` fixtures of tools/tests/pth_import.rs without PyTorch.

Run from the repository root with any Python 3.8+:

    python3 tools/tests/data/make_zip_fixtures.py

It writes two files next to this script:

- `espnet_p_2_q_8_zip.pth`: models/espnet/espnet_p_2_q_8.pth (legacy layout) re-saved in the
  zip layout of `torch.save` (PyTorch 1.6 and later). The legacy file is read with Python's
  `pickle` module and the state dict is pickled again with protocol 2, the way `torch.save`
  does: the same `collections.OrderedDict` with its `_metadata` attribute, tensors as
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`,
  storages as persistent ids `('storage', torch.FloatStorage, key, 'cpu', numel)` and stored
  uncompressed under `archive/data/<key>`.
- `views_zip.pth`: four float32 tensors that share one storage with offsets and
  non-contiguous strides, plus an int64 scalar.

Differences to a file written by PyTorch itself: the zip entries are not aligned to 64
bytes, and the `archive/.data/serialization_id` entry is missing. Neither affects readers.
"""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

# Stand-ins for the few `torch` globals a state dict pickle references, registered as the
# modules `torch` and `torch._utils` so that `pickle` writes and resolves them by name.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils

ELEMENT_SIZE = {"FloatStorage": 4, "LongStorage": 8}


def storage_class(name):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch, name, cls)
    return cls


FloatStorage = storage_class("FloatStorage")
LongStorage = storage_class("LongStorage")


class Storage:
    def __init__(self, storage_type, numel):
        self.storage_type = storage_type
        self.numel = numel
        self.data = None


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_):
    return Tensor(storage, storage_offset, size, stride)


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2


class LegacyUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in ELEMENT_SIZE:
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        tag, storage_type, key, location, numel, view_metadata = pid
        assert tag == "storage", pid
        assert view_metadata is None, pid
        return self.storages.setdefault(key, Storage(storage_type, numel))


def load_legacy(path):
    storages = {}
    with open(path, "rb") as f:
        assert pickle.load(f) == LEGACY_MAGIC_NUMBER
        assert pickle.load(f) == 1001
        sys_info = pickle.load(f)
        assert sys_info["little_endian"], sys_info
        state_dict = LegacyUnpickler(f, storages).load()
        for key in pickle.load(f):
            storage = storages[key]
            (count,) = struct.unpack("<Q", f.read(8))
            assert count == storage.numel, (key, count, storage.numel)
            storage.data = f.read(count * ELEMENT_SIZE[storage.storage_type.__name__])
        assert f.read() == b"", "trailing bytes after the last storage"
    return state_dict


class ZipPickler(pickle.Pickler):
    """Pickles storages as persistent ids with keys numbered in order of first use."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.keys = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key = self.keys.setdefault(id(obj), (str(len(self.keys)), obj))[0]
        return ("storage", obj.storage_type, key, "cpu", obj.numel)


def write_entry(archive, name, data):
    # A fixed timestamp keeps the fixture byte-identical across runs.
    archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def save_zip(state_dict, path):
    buffer = io.BytesIO()
    pickler = ZipPickler(buffer)
    pickler.dump(state_dict)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        write_entry(archive, "archive/data.pkl", buffer.getvalue())
        write_entry(archive, "archive/byteorder", "little")
        for key, storage in sorted(pickler.keys.values(), key=lambda item: int(item[0])):
            write_entry(archive, f"archive/data/{key}", storage.data)
        write_entry(archive, "archive/version", "3\n")
        write_entry(archive, "archive/.data/version", "3\n")


def views_state_dict():
    base = Storage(FloatStorage, 12)
    base.data = struct.pack("<12f", *range(12))
    steps = Storage(LongStorage, 1)
    steps.data = struct.pack("<q", 7)
    state_dict = collections.OrderedDict()
    state_dict["base"] = Tensor(base, 0, (3, 4), (4, 1))
    state_dict["transposed"] = Tensor(base, 0, (4, 3), (1, 4))
    state_dict["row"] = Tensor(base, 4, (4,), (1,))
    state_dict["column"] = Tensor(base, 2, (3,), (4,))
    state_dict["steps"] = Tensor(steps, 0, (), ())
    return state_dict


if __name__ == "__main__":
    espnet = load_legacy(ROOT / "models/espnet/espnet_p_2_q_8.pth")
    save_zip(espnet, HERE / "espnet_p_2_q_8_zip.pth")
    save_zip(views_state_dict(), HERE / "views_zip.pth")
    print(f"wrote {len(espnet)} tensors to {HERE / 'espnet_p_2_q_8_zip.pth'}")
