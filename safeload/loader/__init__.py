"""The second gate: rebuild the object from the bytes the scan judged SAFE, under the same policy.

``unpickle(analysis, ...)`` is called by ``safeload.api`` only on a SAFE verdict. It picks the
stream the file's real loader would unpickle (the container reader marked it), rebuilds it with
the restricted unpickler, and takes storages from the container's index of the same buffer:
nothing is opened, read or imported that the scan and the policy did not cover.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from safeload.errors import LoadError, SafeloadError, UnsafeModelError, UnsupportedFormatError
from safeload.formats.base import NEST_SEP, PickleStream, StreamRole
from safeload.loader import numpy_formats, torch_backend
from safeload.loader.numpy_backend import NumpyBackend
from safeload.loader.resolve import Resolver
from safeload.loader.storages import Where
from safeload.loader.unpickler import Gate, PersistentLoad, run

if TYPE_CHECKING:
    from safeload.api import Analysis, StreamAnalysis
    from safeload.loader.torch_backend import TorchBackend

__all__ = ["unpickle"]

FRAMEWORKS = ("auto", "torch", "numpy")
# torch.load decodes Python 2 byte strings as utf-8 unless told otherwise; numpy and joblib use
# pickle's own default.
_TORCH_ENCODING = "utf-8"
# The zip format versions torch's reader accepts (caffe2 inline_container: kMin/kMaxSupportedFileFormatVersion).
MIN_ZIP_VERSION, MAX_ZIP_VERSION = 1, 10
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def unpickle(
    analysis: Analysis,
    *,
    map_location: Any = None,
    mmap: bool = False,
    framework: str = "auto",
    **pickle_load_args: Any,
) -> object:
    """Rebuild the object a SAFE-scanned file holds. Raises only SafeloadError subclasses for the file."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")
    try:
        return _Load(analysis, map_location, mmap, framework, pickle_load_args).run()
    except SafeloadError as exc:
        # A refusal at load time carries the scan's report like a refusal at scan time does.
        if getattr(exc, "report", None) is None:
            exc.report = analysis.report  # type: ignore[attr-defined]
            if isinstance(exc, UnsafeModelError):
                exc.findings = list(analysis.report.findings)
        raise


class _Load:
    def __init__(
        self,
        analysis: Analysis,
        map_location: Any,
        mmap: bool,
        framework: str,
        pickle_args: dict[str, Any],
    ) -> None:
        self.analysis = analysis
        self.container = analysis.container
        self.path = analysis.report.path
        self.map_location = map_location
        self.mmap = mmap
        self.framework = framework
        self.pickle_args = pickle_args

    # -- dispatch ---------------------------------------------------------------------------------

    def run(self) -> object:
        loadable = self.container.meta.get("loadable")
        fmt = loadable.get("format") if isinstance(loadable, dict) else None
        handlers: dict[str, Callable[[], object]] = {
            "torch-zip": self._torch_zip,
            "torchscript": self._torchscript,
            "torch-legacy": self._legacy,
            "npy": self._numpy_file,
            "npz": self._numpy_file,
            "joblib": self._joblib,
            "pickle": self._raw,
        }
        top = self._top_level_formats()
        # numpy.load opens the file itself as npy, or any zip as an npz: not a tar holding them.
        if fmt is None and (
            {"npy", "npz"} & top or ("zip" in top and {"npy", "npz"} & set(self.container.formats))
        ):
            return self._numpy_file()
        if fmt in handlers:
            return handlers[fmt]()
        formats = ", ".join(self.container.formats) or "none recognized"
        if "torch-legacy-tar" in self.container.formats:
            why = "loading the legacy torch tar format is not supported (torch.load refuses it with weights_only=True too)"
        elif "safetensors" in self.container.formats:
            why = "a safetensors file holds no pickle: load it with the safetensors library"
        elif members := self._archive_members():
            # A model.tar.gz: torch.load cannot open it either; its members are files of their own.
            shown = ", ".join(repr(m) for m in members[:3]) + (", ..." if len(members) > 3 else "")
            raise UnsupportedFormatError(
                f"cannot load: an archive ({formats}); its pickles are in its "
                f"member{'s' if len(members) > 1 else ''} {shown}",
                path=self.path,
                remedy="extract the member you want and load that file",
            )
        else:
            why = f"nothing in this file is an object safeload can load (formats: {formats})"
        raise UnsupportedFormatError(f"cannot load: {why}", path=self.path)

    def _top_level_formats(self) -> set[str]:
        """Formats of the file itself, not of members inside it (an npz in a tar is no npz file)."""
        views = self.container.meta.get("views")
        if not isinstance(views, list):
            return set(self.container.formats)
        return {v["format"] for v in views if isinstance(v, dict) and v.get("member") is None}

    def _archive_members(self) -> list[str]:
        """The archive members (tar, zip, 7z) that hold the file's pickles, outermost names only."""
        if not {"tar", "zip", "7z"} & set(self.container.formats):
            return []
        members: dict[str, None] = {}
        for stream in self.container.streams:
            # Leading <gzip>-style parts are wrappers the member sits behind, not members.
            parts = [p for p in (stream.member or "").split(NEST_SEP) if not p.startswith("<")]
            if parts:
                members[parts[0]] = None
        return list(members)

    # -- helpers ----------------------------------------------------------------------------------

    def _loadable(self) -> StreamAnalysis:
        chosen = [sa for sa in self.analysis.streams if sa.stream.loadable]
        if len(chosen) != 1:
            raise UnsupportedFormatError(
                f"cannot load: expected one loadable pickle stream, found {len(chosen)}", path=self.path
            )
        return chosen[0]

    def _where(self, stream: PickleStream) -> Where:
        return Where(self.path, stream.member)

    def _args(self, default_encoding: str | None) -> dict[str, Any]:
        args = dict(self.pickle_args)
        if default_encoding is not None:
            args.setdefault("encoding", default_encoding)
        return args

    def _gate(self, sa: StreamAnalysis, resolver: Resolver) -> Gate:
        return Gate(resolver=resolver, scanned=sa.names, where=self._where(sa.stream))

    def _unpickle(
        self,
        sa: StreamAnalysis,
        *,
        substitutes: Mapping[str, object],
        persistent: PersistentLoad | None,
        default_encoding: str | None,
        backend: TorchBackend | NumpyBackend | None = None,
        unpickler: Callable[..., Any] | None = None,
    ) -> object:
        unavailable = backend.unavailable if isinstance(backend, NumpyBackend) else None
        resolver = Resolver(self.analysis.policy, substitutes, path=self.path, unavailable=unavailable)
        gate = self._gate(sa, resolver)
        if backend is not None:
            backend.bind(gate)
        previous = backend.begin() if backend is not None else None
        try:
            return run(
                io.BytesIO(sa.stream.data),
                gate=gate,
                persistent=persistent,
                pickle_args=self._args(default_encoding),
                unpickler=unpickler,  # type: ignore[arg-type]
            )
        finally:
            if backend is not None:
                backend.end(previous)

    def _tensor_backend(self, where: Where, byteorder: str) -> TorchBackend | NumpyBackend:
        use_numpy = self.framework == "numpy" or (self.framework == "auto" and not torch_backend.available())
        if use_numpy:
            return NumpyBackend(where, mmap=self.mmap, byteorder=byteorder)
        if not torch_backend.available():
            raise LoadError(
                "framework='torch' but torch is not importable",
                path=self.path,
                remedy="install torch (pip install 'safeload[torch]'), or load with framework='numpy'",
            )
        return torch_backend.TorchBackend(
            where, map_location=self.map_location, mmap=self.mmap, byteorder=byteorder
        )

    # -- formats ----------------------------------------------------------------------------------

    def _torchscript(self) -> object:
        # Reached only when a policy waives SL312 for this file: the scan passed, the program stays.
        raise UnsupportedFormatError(
            "cannot load: a TorchScript archive is a program, which torch.jit.load compiles and runs; "
            "safeload loads no program (torch.load refuses it with weights_only=True too)",
            path=self.path,
            remedy="load it with torch.jit.load only if you trust its source, or ask for a state_dict "
            "checkpoint or safetensors",
        )

    def _torch_zip(self) -> object:
        meta = self.container.meta
        refused = meta.get("torch_refuses")
        if isinstance(refused, dict):
            raise LoadError(
                f"torch.load refuses this archive, and so does safeload: {refused.get('why')}",
                path=self.path,
                file_offset=refused.get("file_offset"),
                remedy="ask its source for a checkpoint torch.load opens (torch.save writes one); "
                "safeload scanned every pickle in it either way",
            )
        version = meta.get("version")
        if not isinstance(version, int) or not MIN_ZIP_VERSION <= version <= MAX_ZIP_VERSION:
            shown = "missing or not a number" if not isinstance(version, int) else f"{version}"
            raise LoadError(
                f"the archive's version record is {shown}; torch.load reads versions "
                f"{MIN_ZIP_VERSION} to {MAX_ZIP_VERSION} only and refuses this file too",
                path=self.path,
            )
        sa = self._loadable()
        byteorder = str(meta.get("byteorder") or "little")
        backend = self._tensor_backend(self._where(sa.stream), byteorder)
        return self._unpickle(
            sa,
            substitutes=backend.substitutes(),
            persistent=backend.zip_persistent_load(self.container.storages),
            default_encoding=_TORCH_ENCODING,
            backend=backend,
        )

    def _legacy(self) -> object:
        if self.mmap:
            raise LoadError(
                "mmap=True needs a checkpoint saved in torch's zip format, as with torch.load",
                path=self.path,
                remedy="load without mmap, or re-save the checkpoint with torch.save's default format",
            )
        obj_sa = self._loadable()
        if obj_sa.stream.role is not StreamRole.LEGACY_OBJECT:
            raise UnsupportedFormatError(
                "cannot load: the legacy object pickle is not loadable", path=self.path
            )
        member = obj_sa.stream.member
        by_role = {sa.stream.role: sa for sa in self.analysis.streams if sa.stream.member == member}
        # torch.load unpickles the magic number, protocol version and sys_info first, and checks them.
        for role, expected in (
            (StreamRole.LEGACY_MAGIC, _LEGACY_MAGIC),
            (StreamRole.LEGACY_PROTOCOL, _LEGACY_PROTOCOL),
            (StreamRole.LEGACY_SYS_INFO, None),
        ):
            sa = by_role.get(role)
            if sa is None:
                raise UnsupportedFormatError(
                    f"cannot load: the legacy {role.value} pickle is missing", path=self.path
                )
            value = self._unpickle(sa, substitutes={}, persistent=None, default_encoding=_TORCH_ENCODING)
            if expected is not None and value != expected:
                raise LoadError(f"legacy {role.value} pickle holds {value!r}, not {expected}", path=self.path)
        backend = self._tensor_backend(self._where(obj_sa.stream), "little")
        return self._unpickle(
            obj_sa,
            substitutes=backend.substitutes(),
            persistent=backend.legacy_persistent_load(self.container.storages),
            default_encoding=_TORCH_ENCODING,
            backend=backend,
        )

    def _raw(self) -> object:
        sa = self._loadable()
        names = sa.names
        backend = None
        substitutes: dict[str, object] = {}
        if any(n.startswith("torch.") for n in names):
            backend = self._tensor_backend(self._where(sa.stream), "little")
            substitutes = backend.substitutes()
        # A plain pickle has no storage scheme: persistent ids are refused.
        return self._unpickle(
            sa, substitutes=substitutes, persistent=None, default_encoding=None, backend=backend
        )

    def _joblib(self) -> object:
        sa = self._loadable()
        factory = numpy_formats.joblib_factory(sa.stream.data, mmap=self.mmap)
        return self._unpickle(
            sa,
            substitutes=numpy_formats.joblib_substitutes(),
            persistent=None,
            default_encoding=None,
            unpickler=factory,
        )

    def _numpy_file(self) -> object:
        meta, storages = self.container.meta, self.container.storages
        arrays = meta.get("npy_arrays")
        if not isinstance(arrays, dict):
            meta, storages = _reread_numpy(self.analysis)
            arrays = meta.get("npy_arrays")
        if not isinstance(arrays, dict) or not arrays:
            raise UnsupportedFormatError(
                "cannot load: no numpy array was indexed in this file", path=self.path
            )
        by_member = {
            sa.stream.member: sa for sa in self.analysis.streams if sa.stream.role is StreamRole.NPY_OBJECT
        }
        members, others = meta.get("npz_members"), meta.get("npz_other_members")
        if not isinstance(members, list) or not isinstance(others, dict):
            if list(arrays) != ["npy"]:
                raise LoadError("npy index does not hold one array", path=self.path)
            return self._npy_member(arrays["npy"], by_member, storages)
        # numpy.load's NpzFile: every member, in archive order, named without the .npy suffix; an
        # array for .npy bytes, the member's bytes for anything else.
        out: dict[str, object] = {}
        for name in members:
            if name in arrays:
                value = self._npy_member(arrays[name], by_member, storages)
            elif name in others:
                value = numpy_formats.member_bytes(others[name], storages, Where(self.path, name))
            else:
                raise LoadError("npz member was not indexed", path=self.path, member=name)
            out[name[:-4] if name.endswith(".npy") else name] = value
        return out

    def _npy_member(
        self, info: dict[str, Any], by_member: dict[str | None, StreamAnalysis], storages: dict[str, Any]
    ) -> object:
        member = info.get("member")
        if info.get("has_object"):
            sa = by_member.get(member)
            if sa is None:
                raise LoadError("object array pickle was not scanned", path=self.path, member=member)
            return self._unpickle(sa, substitutes={}, persistent=None, default_encoding=None)
        entry = storages.get(info.get("storage"))
        if entry is None:
            raise LoadError("array bytes were not indexed", path=self.path, member=member)
        return numpy_formats.npy_array(info, entry, Where(self.path, member), mmap=self.mmap)


def _reread_numpy(analysis: Analysis) -> tuple[dict[str, object], dict[str, Any]]:
    """The numpy reader's index of the same buffer, for files with no pickle (no loadable stream).

    Re-reading the scanned buffer with the same reader gives the same index: nothing new is read.
    """
    from safeload.formats import numpy_fmt
    from safeload.formats.base import Budget, ReadContext

    limits = analysis.policy.limits
    ctx = ReadContext(
        path=analysis.report.path,
        member=None,
        file_offset=0,
        depth=0,
        limits=limits,
        budget=Budget(limits.max_decompressed_bytes),
    )
    buffer = analysis.source.buffer
    # numpy.load opens any zip as an npz, whatever its first member (detection calls one an npz
    # only when its first member is an .npy, and reads the others as a plain zip's members).
    if not numpy_fmt.sniff(buffer) and bytes(buffer[:4]) not in (b"PK\x03\x04", b"PK\x05\x06"):
        return {}, {}
    result = numpy_fmt.read(buffer, ctx)
    return result.meta, result.storages
