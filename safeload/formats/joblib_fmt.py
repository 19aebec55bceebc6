"""joblib.dump output: one pickle with raw numpy array bytes written between its opcodes.

joblib's NumpyPickler pickles a ``joblib.numpy_pickle.NumpyArrayWrapper`` in place of each array and
then writes the array's bytes straight into the file (after a padding-length byte and padding, or,
for object arrays, as a nested protocol-5 pickle); NumpyArrayWrapper.read consumes them when the
unpickler BUILDs the wrapper. A plain pickle reader parses those bytes as opcodes and fails, so the
stream is handed on with ``joblib_arrays=True`` for the walker to skip them the way joblib does.

Compressed joblib files (zlib, gzip, bz2, xz, lzma, lz4) are compression wrappers first: compressed.py
hands the decompressed bytes back and this reader claims them by content like an uncompressed file.

Sniff: the first pickle imports NumpyArrayWrapper. A cheap substring test rejects most buffers; then
the opcodes of the first pickle are walked (``pickletools.genops``: it decodes, never runs) within
a bounded window until a GLOBAL/INST/STACK_GLOBAL names the wrapper, the pickle stops, or the window
or opcode budget is spent. A joblib file whose first array comes later than the window is not
claimed here: the raw reader's stream then breaks on the array bytes right after the wrapper was
imported, and the scan reads that stream again the joblib way (api._joblib_after_all).
A raw-pickle reader also claims joblib files: detection should prefer this reader for the same buffer.
"""

from __future__ import annotations

import io
import pickletools

import msgspec

from safeload.formats.base import PickleStream, ReadContext, ReadResult, StreamRole
from safeload.formats.raw import is_opcode, scan_pickle

NAME = "joblib"

WRAPPER_MODULE = "joblib.numpy_pickle"
WRAPPER_NAME = "NumpyArrayWrapper"
SNIFF_WINDOW = 4 << 20
SNIFF_OPCODES = 500_000
_QUICK_OPS = 64
_QUICK_BOUND = 1 << 16
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_PERSID_OPCODES = frozenset(b"PQ")  # PERSID, BINPERSID
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
# Opcodes that push nothing, so they do not disturb "the two values STACK_GLOBAL pops".
_SILENT_OPS = {"PROTO", "FRAME", "MEMOIZE", *_PUT_OPS}


class WrapperSite(msgspec.Struct, frozen=True):
    offset: int  # of the GLOBAL / INST / STACK_GLOBAL opcode
    opcode: str
    protocol: int | None


def find_wrapper(buf: memoryview) -> WrapperSite | None:
    """Where the first pickle first imports NumpyArrayWrapper, within the sniff bounds."""
    # joblib.load unpickles without persistent_load: a stream that opens with a persistent id (as
    # a zip's "PK" reads) fails before it can import anything, so it is no joblib view. Checking
    # the first byte spares copying the window of every archive and checkpoint.
    if not buf or not is_opcode(buf[0]) or buf[0] in _PERSID_OPCODES:
        return None
    end = SNIFF_WINDOW
    if len(buf) > _QUICK_BOUND:
        # A first pickle that ends within a few opcodes (torch's legacy magic number) bounds the
        # search: searching megabytes of storage bytes for the name costs more than the rest of
        # such a scan. (Small buffers are searched whole: cheaper than the opcode scan.)
        head = scan_pickle(buf, 0, max_ops=_QUICK_OPS)
        if head.end is not None:
            end = min(head.end, SNIFF_WINDOW)
    window = bytes(buf[:end])
    if WRAPPER_NAME.encode() not in window:
        return None
    memo: dict[int, object] = {}
    recent: list[object] = []  # values pushed lately; only strings matter
    protocol: int | None = None
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(io.BytesIO(window))):
            if count >= SNIFF_OPCODES:
                return None
            name = op.name
            if name == "PROTO":
                protocol = int(arg)
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if (module, attr) == (WRAPPER_MODULE, WRAPPER_NAME):
                    return WrapperSite(int(pos or 0), name, protocol)
            elif name == "STACK_GLOBAL":
                if recent[-2:] == [WRAPPER_MODULE, WRAPPER_NAME]:
                    return WrapperSite(int(pos or 0), name, protocol)
            elif name == "STOP":
                return None
            if name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in _PUT_OPS:
                memo[int(arg)] = recent[-1] if recent else None
            elif name in _GET_OPS:
                recent.append(memo.get(int(arg)))
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
            elif name not in _SILENT_OPS:
                recent.append(None)
            del recent[:-2]
    except Exception:  # noqa: BLE001 - genops raises ValueError mostly, but the bytes are hostile
        # The window ended mid-opcode, or the bytes are not a pickle.
        return None
    return None


def sniff(buf: memoryview) -> bool:
    return find_wrapper(buf) is not None


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    site = find_wrapper(buf)
    meta: dict[str, object] = {"compression": ctx.encoding[-1] if ctx.encoding else None}
    if site is not None:
        meta.update(wrapper_offset=site.offset, wrapper_opcode=site.opcode, protocol=site.protocol)
    stream = PickleStream(
        member=ctx.member,
        data=buf,
        file_offset=ctx.file_offset,
        role=StreamRole.JOBLIB,
        # joblib.load unpickles one object and ignores what follows it.
        multi=False,
        joblib_arrays=True,
        loadable=True,
        encoding=ctx.encoding,
    )
    return ReadResult(format=NAME, streams=[stream, plain_reading(stream)], meta={"joblib": meta})


def plain_reading(stream: PickleStream) -> PickleStream:
    """The same bytes as pickle.load (or torch.load) reads them: one pickle, array bytes taken for
    opcodes. It breaks at the first array; whatever it would import before that is judged too, so
    array bytes crafted as opcodes cannot hide a payload from a plain loader."""
    return msgspec.structs.replace(
        stream, role=StreamRole.RAW, joblib_arrays=False, multi=False, loadable=False, secondary=True
    )
