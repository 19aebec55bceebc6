"""Hand-built runs for renderer tests: every verdict, a waiver, an explanation and hostile strings."""

from __future__ import annotations

from safeload.audit_model import AuditRun, AuditStats, BaselineInfo, BlockedFile, GlobalCount, PolicyCheck
from safeload.model import GlobalUse, ScanReport, ScanRun, StreamReport, Use, Verdict, decide, make_finding

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_GLOBAL = f"{HOSTILE}.run"
CONTROL = "evil\x1b[31mred\nnext"  # an ANSI escape and a newline from a file name
PIPE_LINK = "a|b [click](https://evil.example/x) `tick` ```fence"
SHA_UNSAFE = "a" * 64
SHA_SAFE = "b" * 64
SHA_WAIVED = "c" * 64


def unsafe_report(path: str = "models/evil.pt") -> ScanReport:
    findings = (
        make_finding(
            "SL100",
            "builtins.exec is on the floor",
            member="archive/data.pkl",
            offset=17,
            file_offset=1041,
            global_name="builtins.exec",
            uses=(Use.CALLED,),
        ),
        make_finding(
            "SL101",
            f"{HOSTILE_GLOBAL} is not allowed by policy default",
            member=f"archive/{CONTROL}",
            offset=40,
            global_name=HOSTILE_GLOBAL,
            uses=(Use.CALLED,),
            remedy=f'if you trust this file\'s source, add [[allow]] global = "{HOSTILE_GLOBAL}"',
        ),
        make_finding("SL202", "2 pickles back to back", member="archive/data.pkl"),
    )
    stream = StreamReport(
        member="archive/data.pkl",
        file_offset=1024,
        length=120,
        protocol=2,
        opcodes=12,
        globals=(
            GlobalUse(
                name="builtins.exec", member="archive/data.pkl", offset=17, opcode="GLOBAL", allowed=False
            ),
            GlobalUse(
                name=HOSTILE_GLOBAL, member="archive/data.pkl", offset=40, opcode="GLOBAL", allowed=False
            ),
            GlobalUse(
                name="collections.OrderedDict",
                member="archive/data.pkl",
                offset=60,
                opcode="GLOBAL",
                allowed=True,
            ),
        ),
        explanation=f"from builtins import exec\n_var0 = exec('print(1)  ``` {HOSTILE} </pre><b>x')\nresult = _var0",
    )
    return ScanReport(
        path=path,
        sha256=SHA_UNSAFE,
        size=4096,
        formats=("torch-zip",),
        streams=(stream,),
        findings=findings,
        verdict=decide(findings),
        policy="default",
        policy_hash="p" * 16,
    )


def safe_report(path: str = "models/good.pt") -> ScanReport:
    stream = StreamReport(
        member="archive/data.pkl",
        file_offset=64,
        length=80,
        protocol=2,
        opcodes=9,
        globals=(
            GlobalUse(
                name="collections.OrderedDict",
                member="archive/data.pkl",
                offset=2,
                opcode="GLOBAL",
                allowed=True,
            ),
        ),
    )
    return ScanReport(
        path=path,
        sha256=SHA_SAFE,
        size=2048,
        formats=("torch-zip",),
        streams=(stream,),
        findings=(),
        verdict=Verdict.SAFE,
        policy="default",
        policy_hash="p" * 16,
    )


def unscannable_report(path: str = f"models/{CONTROL}.bin") -> ScanReport:
    findings = (make_finding("SL206", "cannot open: Permission denied"),)
    return ScanReport(
        path=path,
        sha256=None,
        size=0,
        findings=findings,
        verdict=decide(findings),
        policy="default",
        policy_hash="p" * 16,
    )


def waived_report(path: str = f"models/{PIPE_LINK}.pkl") -> ScanReport:
    finding = make_finding(
        "SL101",
        "mypkg.layers.Scale is not allowed by policy default",
        offset=3,
        file_offset=3,
        global_name="mypkg.layers.Scale",
        uses=(Use.CALLED,),
        waived=True,
        waiver_reason="reviewed by the model team",
    )
    return ScanReport(
        path=path,
        sha256=SHA_WAIVED,
        size=100,
        formats=("pickle",),
        streams=(
            StreamReport(
                member=None,
                file_offset=0,
                length=100,
                protocol=2,
                opcodes=5,
                globals=(GlobalUse(name="mypkg.layers.Scale", offset=3, opcode="GLOBAL", allowed=False),),
            ),
        ),
        findings=(finding,),
        verdict=decide((finding,)),
        policy="default",
        policy_hash="p" * 16,
    )


def scan_run() -> ScanRun:
    return ScanRun(
        version="0.1.0",
        policy="default",
        reports=(unsafe_report(), safe_report(), unscannable_report(), waived_report()),
        skipped=("models/README.md",),
        exit_code=1,
    )


def audit_run() -> AuditRun:
    base = scan_run()
    reports = (*base.reports, safe_report("models/copy-of-good.pt"))
    return AuditRun(
        version=base.version,
        policy=base.policy,
        reports=reports,
        skipped=base.skipped,
        exit_code=1,
        roots=("models",),
        stats=AuditStats(paths=5, files=4),
        inventory=(
            GlobalCount(name="builtins.exec", files=1, paths=1, allowed=False),
            GlobalCount(name=HOSTILE_GLOBAL, files=1, paths=1, allowed=False),
            GlobalCount(
                name="collections.OrderedDict",
                files=2,
                paths=3,
                allowed=True,
                allowed_by=("default", "strict"),
            ),
        ),
        policy_checks=(
            PolicyCheck(
                policy="default",
                policy_hash="p" * 16,
                blocked=(
                    BlockedFile(
                        sha256=SHA_UNSAFE,
                        paths=("models/evil.pt",),
                        globals=("builtins.exec", HOSTILE_GLOBAL),
                    ),
                ),
            ),
            PolicyCheck(policy="strict", policy_hash="s" * 16, blocked=()),
        ),
        baseline=BaselineInfo(path="old.json", known=3, suppressed=1, unchanged_files=1),
    )
