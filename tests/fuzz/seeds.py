"""Writes the weights seeds of the fuzz corpus (tests/fuzz/corpus/{pth,npy}) without
PyTorch: the same pickles torch.save writes, through stand-in classes registered under
torch's module names. Run from the repository root: python3 tests/fuzz/seeds.py"""
import collections, io, pickle, struct, sys, types, zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


def _rebuild_tensor_v2(*args):
    raise RuntimeError("never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
for name in ("FloatStorage", "HalfStorage", "LongStorage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))


class Storage:
    def __init__(self, kind, key, values):
        self.kind, self.key, self.values = kind, key, values


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


FMT = {"FloatStorage": "<f", "HalfStorage": "<e", "LongStorage": "<q"}


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", len(obj.values))
        return None


def state():
    w = Storage("FloatStorage", "0", [0.5 * i for i in range(12)])
    h = Storage("HalfStorage", "1", [1.0, -2.0, 0.25])
    n = Storage("LongStorage", "2", [7])
    d = collections.OrderedDict()
    d["conv.weight"] = Tensor(w, 0, (2, 3, 2), (6, 2, 1))
    d["conv.weight_t"] = Tensor(w, 1, (3, 2), (1, 3))
    d["bn.bias"] = Tensor(h, 0, (3,), (1,))
    d["bn.num_batches_tracked"] = Tensor(n, 0, (), ())
    return {"model": d, "epoch": 3}, [w, h, n]


def dumps(obj):
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_zip(path):
    obj, storages = state()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", dumps(obj))
        z.writestr("archive/version", "3\n")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", b"".join(struct.pack(FMT[s.kind], v) for v in s.values))


def write_legacy(path):
    obj, storages = state()
    out = dumps(0x1950A86A20F9469CFC6C) + dumps(1001) + dumps({"little_endian": True})
    out += dumps(obj) + dumps([s.key for s in storages])
    for s in storages:
        out += struct.pack("<q", len(s.values))
        out += b"".join(struct.pack(FMT[s.kind], v) for v in s.values)
    open(path, "wb").write(out)


def write_npy(path, descr, shape, data):
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    open(path, "wb").write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)


write_zip("tests/fuzz/corpus/pth/zip.pth")
write_legacy("tests/fuzz/corpus/pth/legacy.pth")
write_npy("tests/fuzz/corpus/npy/f4.npy", "<f4", "(2, 3)", struct.pack("<6f", *range(6)))
write_npy("tests/fuzz/corpus/npy/i8.npy", "<i8", "(3,)", struct.pack("<3q", 1, -2, 3))
write_npy("tests/fuzz/corpus/npy/f2.npy", "<f2", "()", struct.pack("<e", 1.5))
