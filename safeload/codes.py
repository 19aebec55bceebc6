"""The rule catalogue: every finding carries one of these codes.

`effect` is how a finding of that code moves the verdict: ``unsafe`` makes the file UNSAFE,
``incomplete`` makes it UNSCANNABLE (unless something else made it UNSAFE), ``none`` is reported
but does not block.
"""

from __future__ import annotations

from enum import Enum

import msgspec


class Severity(str, Enum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    INFO = "info"


class Effect(str, Enum):
    UNSAFE = "unsafe"
    INCOMPLETE = "incomplete"
    NONE = "none"


class Rule(msgspec.Struct, frozen=True):
    code: str
    name: str
    title: str
    severity: Severity
    effect: Effect
    help: str
    cwe: str = "CWE-502"


_RULES = [
    # -- policy decisions -------------------------------------------------------------------------
    Rule("SL100", "floor-global", "Global on the floor (never allowed)", Severity.CRITICAL, Effect.UNSAFE,
         "The pickle imports a callable that runs code, touches the OS or deserializes again. No policy "
         "can allow it; the file is very likely malicious."),
    Rule("SL101", "disallowed-global", "Global not allowed by the policy", Severity.HIGH, Effect.UNSAFE,
         "The pickle imports a name the policy does not list. Unpickling it would import that module "
         "and may call it. Allow it only if you trust the file's source and know the object."),
    Rule("SL102", "dynamic-global", "STACK_GLOBAL with operands that are not constant strings",
         Severity.CRITICAL, Effect.UNSAFE,
         "The module or name of an import is computed, so no static reader can tell what it is. "
         "Real serializers never do this."),
    Rule("SL103", "extension-code", "Global named through the copyreg extension registry (EXT1/2/4)",
         Severity.CRITICAL, Effect.UNSAFE,
         "EXT opcodes name a global by a number registered in the loading process; its meaning depends "
         "on that process, not the file."),
    Rule("SL104", "dunder-build", "BUILD sets a dunder attribute", Severity.CRITICAL, Effect.UNSAFE,
         "A BUILD state that sets __setstate__, __reduce__, __class__ or another dunder on an object "
         "makes a later BUILD or call run a function of the attacker's choosing."),
    Rule("SL105", "parser-differential", "The real unpickler sees different imports than the scanner",
         Severity.CRITICAL, Effect.UNSAFE,
         "CPython's unpickler, replayed on the same bytes with inert stubs, imported something other than "
         "what the static walk saw. The stream is crafted to mislead scanners."),
    Rule("SL106", "bad-persistent-id", "Persistent id the container format does not define",
         Severity.HIGH, Effect.UNSAFE,
         "The loader resolves persistent ids itself; an id outside the format's storage scheme is "
         "either corrupt or an attempt to reach loader internals."),
    Rule("SL107", "frame-mismatch", "FRAME length does not end on an opcode boundary",
         Severity.CRITICAL, Effect.UNSAFE,
         "CPython reads a lying FRAME differently depending on the file object; the same bytes can "
         "import different names through open() and io.BytesIO."),
    Rule("SL108", "numpy-state-reuse", "BUILD gives a numpy dtype or array a state numpy applies unchecked",
         Severity.HIGH, Effect.UNSAFE,
         "numpy's dtype and array __setstate__ change the object in place, under whatever already uses "
         "it: a dtype given object fields after an array of raw bytes was made with it reads those bytes "
         "as object pointers (memory corruption in pickle.load or numpy.load); numpy also takes a "
         "subarray state on a datetime dtype, fields outside their record, item sizes and flags that "
         "contradict the dtype's fields, and reads as many items as an object array's shape holds from "
         "a shorter list, and crashes. numpy's own pickles give each dtype and array one state, right after "
         "making a private copy, and before anything holds it."),
    # -- parsing and completeness -----------------------------------------------------------------
    Rule("SL200", "malformed-pickle", "Pickle stream could not be parsed to its end", Severity.HIGH,
         Effect.INCOMPLETE,
         "Truncated stream, unknown opcode, stack or memo misuse. Imports seen before the break are still "
         "checked: a loader runs them before it fails."),
    Rule("SL201", "trailing-data", "Bytes after the end of the last pickle", Severity.MEDIUM,
         Effect.INCOMPLETE,
         "Data after STOP that is not a complete pickle. A loader that reads on would parse it."),
    Rule("SL202", "multiple-pickles", "Several pickles back to back", Severity.LOW, Effect.NONE,
         "A later pickle runs only if the loader reads on; every one was checked against the policy."),
    Rule("SL203", "limit-exceeded", "A resource limit was hit", Severity.HIGH, Effect.INCOMPLETE,
         "The file exceeds a size, opcode, memo, nesting or decompression limit; it was not fully read. "
         "Raise the limit in a policy file only for files you have reason to trust."),
    Rule("SL204", "unsupported-format", "No known format", Severity.MEDIUM, Effect.INCOMPLETE,
         "safeload found no pickle-bearing format it can read. It cannot tell whether a loader would run "
         "code from this file."),
    Rule("SL205", "container-unreadable", "Container or member could not be fully read", Severity.HIGH,
         Effect.INCOMPLETE,
         "An archive, compressed stream or member could not be opened or decompressed to its end."),
    Rule("SL206", "read-error", "The file could not be read", Severity.HIGH, Effect.INCOMPLETE,
         "An operating-system error stopped the read."),
    Rule("SL207", "internal-error", "safeload failed while analysing this input", Severity.HIGH,
         Effect.INCOMPLETE,
         "A bug in safeload stopped the analysis. The file was not judged; please report it with the "
         "file's sha256 (see SECURITY.md)."),
    Rule("SL208", "reader-missing", "A package needed to read this file is not installed", Severity.HIGH,
         Effect.INCOMPLETE,
         "safeload reads 7z archives, zstd and lz4 streams with optional packages (py7zr, zstandard, lz4). "
         "Install safeload[formats] and scan again. Such results are never cached: they describe this "
         "installation, not the file."),
    # -- container anomalies (what real writers never produce) --------------------------------------
    Rule("SL300", "zip-crc-mismatch", "Zip member CRC does not match", Severity.HIGH, Effect.UNSAFE,
         "Python's zipfile refuses the member but torch's reader loads it: a known scanner evasion."),
    Rule("SL301", "zip-flag-bits", "Zip member uses encryption or unusual flag bits", Severity.HIGH,
         Effect.UNSAFE, "Flag bits that make other tools refuse the member while torch reads it."),
    Rule("SL302", "zip-name-mismatch", "Local header name differs from the central directory",
         Severity.HIGH, Effect.UNSAFE, "Two readers of the same archive see different member names."),
    Rule("SL303", "zip-duplicate-name", "Duplicate member names", Severity.HIGH, Effect.UNSAFE,
         "Which of the duplicates a reader takes differs between readers."),
    Rule("SL304", "zip-overlap", "Zip entries overlap", Severity.HIGH, Effect.UNSAFE,
         "Overlapping entries are a zip-bomb and scanner-evasion technique."),
    Rule("SL305", "zip-extra-data", "Data before or after the archive", Severity.MEDIUM, Effect.NONE,
         "Bytes outside the archive; they were scanned as their own format where one was recognized."),
    Rule("SL306", "zip64-oddity", "ZIP64 records that disagree with the central directory",
         Severity.HIGH, Effect.UNSAFE, "Readers that trust different records see different archives."),
    Rule("SL307", "unexpected-pickle-member", "A pickle in an archive member the loader does not name",
         Severity.MEDIUM, Effect.NONE,
         "A member other than the loader's own holds a pickle; it was scanned against the policy too."),
    Rule("SL308", "polyglot", "The file is valid as several formats", Severity.MEDIUM, Effect.NONE,
         "Every view was scanned; which one a loader takes depends on the loader."),
    Rule("SL309", "compression-bomb", "Decompression ratio above the limit", Severity.HIGH, Effect.INCOMPLETE,
         "A member decompresses to far more than its size; reading was stopped."),
    Rule("SL310", "archive-special-member", "Archive member is a link, device or other non-file entry",
         Severity.LOW, Effect.NONE,
         "The entry carries no bytes of its own and was not read; a link's target inside the archive "
         "is scanned as its own member. Real model archives rarely hold such entries."),
    Rule("SL311", "zip-name-alias", "A member torch reads is spelled differently from what torch writes",
         Severity.HIGH, Effect.UNSAFE,
         "torch's reader finds members case-insensitively, so ARCHIVE/DATA.PKL is loaded as data.pkl; tools "
         "that look for the exact name miss it. torch.save never writes such a name."),
    Rule("SL312", "torchscript-program", "A TorchScript archive: a program torch.jit.load compiles and runs",
         Severity.HIGH, Effect.UNSAFE,
         "torch.load hands an archive that holds constants.pkl to torch.jit.load, which compiles the "
         "TorchScript source in its code/ folder and runs it: class __setstate__ methods while the archive "
         "loads, forward when the model is called. TorchScript calls torch operators, and some of them "
         "read and write files (torch.from_file creates one). safeload scans the archive's pickles (their "
         "own reader resolves the program's classes and imports no Python), but it cannot vouch for a "
         "program and never loads one; torch.load(weights_only=True) refuses TorchScript archives too."),
    Rule("SL313", "torch-package", "A torch.package archive: Python modules imported from the archive itself",
         Severity.HIGH, Effect.UNSAFE,
         "torch.package.PackageImporter opens an archive that holds .data/extern_modules. It imports every "
         "module that file does not list as external from the archive's own source files, and runs them: "
         "a pickle in it that names an allowed global (collections.OrderedDict) runs whatever the archive's "
         "collections.py holds. Its pickles also call functions named in their persistent ids "
         "(reduce_package). safeload scans the archive's pickles but cannot vouch for its code and never "
         "loads a package."),
    # -- information ------------------------------------------------------------------------------
    Rule("SL400", "no-pickle", "No pickle in this format", Severity.INFO, Effect.NONE,
         "The format (for example safetensors) carries no pickle; loading it runs no code."),
    Rule("SL401", "waived", "Finding waived by policy", Severity.INFO, Effect.NONE,
         "A policy waiver for this file's sha256 covers the finding; it stays visible."),
]

RULES: dict[str, Rule] = {r.code: r for r in _RULES}
BY_NAME: dict[str, Rule] = {r.name: r for r in _RULES}


def rule(code_or_name: str) -> Rule:
    if code_or_name in RULES:
        return RULES[code_or_name]
    return BY_NAME[code_or_name]
