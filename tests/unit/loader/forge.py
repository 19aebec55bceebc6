"""Hand-forged torch checkpoints: data.pkl written opcode by opcode, storages as raw bytes.

What torch.save writes for a tensor, with every number (offset, sizes, strides, numel) chosen by the
test, so tampered metadata can be tried without a real writer.
"""

from __future__ import annotations

from safeload.formats.base import Container, PersistentScheme, PickleStream, StorageEntry, StreamRole
from safeload.policy import load_policy
from tests import pickle_builder as pb
from tests.unit.loader import handmade


def ints(values: tuple[object, ...]) -> bytes:
    items = []
    for v in values:
        if isinstance(v, bool):
            items.append(pb.pickle.NEWTRUE if v else pb.pickle.NEWFALSE)
        elif isinstance(v, int) and -(1 << 31) <= v < (1 << 31):
            items.append(pb.binint(v))
        elif isinstance(v, int):
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            items.append(pb.pickle.LONG1 + bytes([len(raw)]) + raw)
        else:
            items.append(pb.pickle.BINFLOAT + __import__("struct").pack(">d", v))
    return pb.tup(*items)


def pid(key: str, numel: object, storage_type: str = "FloatStorage", location: str = "cpu") -> bytes:
    return (
        pb.tup(
            pb.unicode("storage"),
            pb.glob("torch", storage_type),
            pb.unicode(key),
            pb.unicode(location),
            ints((numel,))[1:-1],
        )
        + pb.pickle.BINPERSID
    )


def hooks() -> bytes:
    return pb.call(pb.glob("collections", "OrderedDict"))


def tensor_v2(
    key: str,
    numel: object,
    offset: object,
    size: tuple[object, ...],
    stride: tuple[object, ...],
    storage_type: str = "FloatStorage",
    hook_ops: bytes | None = None,
) -> bytes:
    return pb.call(
        pb.glob("torch._utils", "_rebuild_tensor_v2"),
        pid(key, numel, storage_type),
        ints((offset,))[1:-1],
        ints(size),
        ints(stride),
        pb.pickle.NEWFALSE,
        hooks() if hook_ops is None else hook_ops,
    )


def checkpoint(body: bytes, storages: dict[str, bytes], policy: str = "strict") -> handmade.Analysis:
    """An analysis of a torch zip whose data.pkl is `body` (wrapped in PROTO 2 ... STOP)."""
    pkl = pb.wrap(body, 2)
    stream = PickleStream(
        member="archive/data.pkl",
        data=memoryview(pkl),
        file_offset=None,
        role=StreamRole.TORCH_ZIP_DATA,
        persistent_scheme=PersistentScheme.TORCH_ZIP,
        multi=False,
        loadable=True,
    )
    container = Container(
        formats=["torch-zip"],
        streams=[stream],
        storages={k: StorageEntry(k, memoryview(bytearray(v)), None) for k, v in storages.items()},
        meta={"byteorder": "little", "version": 3, "loadable": {"format": "torch-zip", "member": stream.member}},
    )
    return handmade.Analysis(
        handmade.Report("<forged>"),
        handmade.Source(memoryview(pkl)),
        container,
        load_policy(policy),
        [handmade.Stream(stream, handmade.pickle_globals(pkl))],
    )
