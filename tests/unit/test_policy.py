"""Policies as data: loading, extends, validation messages, the floor, remedies, hashes, waivers."""

from __future__ import annotations

import pickletools
import textwrap
from datetime import date
from pathlib import Path

import pytest

from safeload.errors import PolicyError
from safeload.limits import Limits
from safeload.policy import (
    Decision,
    Policy,
    builtin_policy_names,
    floor,
    load_policy,
    policy_to_toml,
)
from tests.pickle_builder import call, stack_global, unicode, wrap

SHA = "ab" * 32


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def user_policy(tmp_path: Path, body: str, name: str = "mine.toml") -> Path:
    head = 'schema_version = 1\nname = "mine"\nextends = ["default"]\n'
    return write(tmp_path / name, head + textwrap.dedent(body))


def policy_error(spec: object, allow: tuple[str, ...] = ()) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(spec, allow=allow)  # type: ignore[arg-type]
    text = str(info.value)
    # Messages come from our fields, never a raw pydantic dump.
    assert "pydantic" not in text and "validation error for" not in text and "Traceback" not in text
    assert isinstance(info.value, ValueError)
    return text


# -- built-ins ---------------------------------------------------------------------------------------


def test_builtin_names() -> None:
    names = builtin_policy_names()
    assert {"strict", "default", "pack-sklearn", "pack-transformers", "pack-lightning"} <= set(names)
    assert "floor" not in names


@pytest.mark.parametrize("name", builtin_policy_names())
def test_every_builtin_loads(name: str) -> None:
    policy = load_policy(name)
    assert policy.name == name
    assert policy.allowed
    assert all(policy.reasons[n].strip() for n in policy.allowed)
    assert policy.sources[-1] == f"{name}.toml"
    assert not policy.wildcards
    # Cached: policies are immutable, so the same object comes back.
    assert load_policy(name) is policy


def test_default_extends_strict() -> None:
    strict, default = load_policy("strict"), load_policy("default")
    assert strict.allowed < default.allowed
    assert default.sources == ("strict.toml", "default.toml")
    assert default.decide("collections.OrderedDict") == Decision(
        True, False, strict.reasons["collections.OrderedDict"], "strict.toml"
    )
    assert default.decide("numpy.dtype").source == "default.toml"
    assert not strict.decide("numpy.dtype").allowed
    for pack in ("pack-sklearn", "pack-transformers", "pack-lightning"):
        assert default.allowed < load_policy(pack).allowed


def test_load_policy_spec_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_policy().name == "default"
    default = load_policy("default")
    assert load_policy(default) is default
    # A built-in name wins over a file of the same name in the working directory.
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "default", "not toml at all [[[")
    assert load_policy("default") is default
    path = user_policy(tmp_path, '[[allow]]\nglobal = "mypkg.Net"\nreason = "ours"\n')
    assert load_policy(path).decide("mypkg.Net").allowed
    assert load_policy(str(path)).decide("mypkg.Net").allowed
    assert load_policy("mine.toml").decide("mypkg.Net").allowed  # relative, ends in .toml


def test_unknown_policy_lists_builtins() -> None:
    text = policy_error("defualt")
    assert "defualt" in text
    for name in builtin_policy_names():
        assert name in text
    assert "missing.toml" in policy_error("missing.toml")
    policy_error(42)


# -- the floor -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "os.path.join",
        "posix.system",
        "nt.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.__import__",
        "builtins.open",
        "runpy._run_code",
        "pkgutil.resolve_name",
        "pip.main",
        "ensurepip._run_pip",
        "importlib.import_module",
        "pickle.loads",
        "_pickle.loads",
        "marshal.loads",
        "torch.load",
        "torch.serialization.load",
        "torch.storage._load_from_bytes",
        "torch.utils.collect_env.run",
        "numpy.load",
        "numpy.lib.npyio.load",
        "numpy.f2py.crackfortran.myeval",
        "numpy.testing._private.utils.runstring",
        "joblib.load",
        "joblib.numpy_pickle.load",
        "operator.attrgetter",
        "functools.partial",
        "types.CodeType",
        "uuid._get_command_stdout",
        "cProfile.run",
        "timeit.timeit",
        "pydoc.locate",
        "__builtin__.eval",
        "copy_reg._reconstructor",
        "_io.FileIO",
        "torch.fx.graph_module.reduce_graph_module",
        "builtins.eval.__call__",  # attributes below a floor name are the floor too
    ],
)
def test_floor_names(name: str) -> None:
    for policy_name in builtin_policy_names():
        decision = load_policy(policy_name).decide(name)
        assert decision.on_floor and not decision.allowed, (policy_name, name)
        assert decision.source == "floor.toml"
    assert floor().covers(name)


@pytest.mark.parametrize(
    "name",
    [
        "torch.serialization.os.system",
        "collections.os.system",
        "torch.serialization.pickle.loads",
        "numpy.core.multiarray.sys.modules",
        "__main__.__builtins__.eval",
        "collections.OrderedDict.__init__.__globals__",
        "torch.nn.Module.__subclasses__",
        "mypkg.builtins.getattr",
    ],
)
def test_dotted_attribute_path_through_floor_module_is_floor(name: str) -> None:
    decision = load_policy("default").decide(name)
    assert decision.on_floor and not decision.allowed
    assert "floor" in decision.reason


def test_floor_does_not_catch_innocent_lookalikes() -> None:
    fl = floor()
    for name in (
        "numpy.random._pickle.__randomstate_ctor",  # a module named _pickle inside numpy
        "osx.thing",  # prefix match is per dotted segment
        "mypkg.system",
        "torch.profiler.profile",
        "collections.OrderedDict",
    ):
        assert not fl.covers(name), name


def test_floor_entries_are_well_formed() -> None:
    fl = floor()
    assert {"os", "sys", "subprocess", "posix", "nt", "runpy", "pickle"} <= set(fl.modules)
    assert {"builtins.eval", "builtins.exec", "builtins.getattr", "joblib.load", "torch.load"} <= set(
        fl.names
    )
    for entry in [*fl.modules, *fl.names]:
        assert all(part.isidentifier() for part in entry.split(".")), entry
    for attr in fl.attributes:
        assert attr.isidentifier()
    for reason in [*fl.modules.values(), *fl.names.values(), *fl.attributes.values()]:
        assert reason.strip()


@pytest.mark.parametrize(
    "name", ["os.system", "builtins.eval", "torch.serialization.os.system", "subprocess.run"]
)
def test_allow_cannot_lift_floor(name: str) -> None:
    text = policy_error("default", allow=(name,))
    assert "floor" in text and name in text


def test_user_file_cannot_lift_floor(tmp_path: Path) -> None:
    path = user_policy(tmp_path, '[[allow]]\nglobal = "os.system"\nreason = "I insist"\n')
    text = policy_error(path)
    assert str(path) in text and "allow[0].global" in text and "floor" in text


@pytest.mark.parametrize("wildcard", ["os.*", "os.path.*", "builtins.*", "torch.*", "numpy.*", "joblib.*"])
def test_wildcard_cannot_cover_floor(tmp_path: Path, wildcard: str) -> None:
    path = user_policy(tmp_path, f'[[allow]]\nglobal = "{wildcard}"\nreason = "x"\nunsafe_wildcard = true\n')
    text = policy_error(path)
    assert "allow[0].global" in text and "floor" in text and str(path) in text


def test_wildcard_allowed_with_flag_but_floor_still_wins(tmp_path: Path) -> None:
    path = user_policy(
        tmp_path, '[[allow]]\nglobal = "mypkg.*"\nreason = "all of mine"\nunsafe_wildcard = true\n'
    )
    policy = load_policy(path)
    assert policy.wildcards == frozenset({"mypkg.*"})
    decision = policy.decide("mypkg.layers.Scale")
    assert decision.allowed and decision.reason == "all of mine" and decision.source == str(path.resolve())
    assert not policy.decide("mypkgx.Net").allowed
    assert policy.decide("mypkg.os.system").on_floor
    assert not policy.decide("mypkg.os.system").allowed


def test_waivers_cannot_touch_floor(tmp_path: Path) -> None:
    floor_code = user_policy(
        tmp_path,
        f'[[waive]]\nsha256 = "{SHA}"\ncode = "SL100"\nreason = "no"\nexpires = 2099-01-01\n',
        "a.toml",
    )
    text = policy_error(floor_code)
    assert "waive[0].code" in text and str(floor_code) in text
    floor_global = user_policy(
        tmp_path,
        f'[[waive]]\nsha256 = "{SHA}"\ncode = "SL101"\nglobal = "os.system"\nreason = "no"\nexpires = 2099-01-01\n',
        "b.toml",
    )
    text = policy_error(floor_global)
    assert "waive[0].global" in text and "floor" in text


def test_malicious_dotted_stack_global_is_refused_as_floor(marker: Path) -> None:
    """A protocol-4 pickle reaching os.system through torch.serialization: decided by name, never run."""
    payload = wrap(call(stack_global("torch.serialization", "os.system"), unicode(f"touch {marker}")), 4)
    names = [
        f"{mod}.{name}"
        for mod, name in zip(
            *[iter(arg for op, arg, _ in pickletools.genops(payload) if op.name == "SHORT_BINUNICODE")] * 2,
            strict=False,
        )
    ]
    assert names[0] == "torch.serialization.os.system"
    decision = load_policy("default").decide(names[0])
    assert decision.on_floor and not decision.allowed
    assert "none:" in load_policy("default").remedy(names[0])
    assert not marker.exists()


# -- user files and extends -------------------------------------------------------------------------------


def test_user_file_extends_builtin_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "team" / "base.toml",
        """\
        schema_version = 1
        name = "team-base"
        extends = ["strict"]
        [limits]
        max_opcodes = 1000
        max_memo = 50
        [[allow]]
        global = "team.layers.Scale"
        reason = "our layer"
        """,
    )
    child = write(
        tmp_path / "team" / "projects" / "child.toml",
        """\
        schema_version = 1
        description = "child policy"
        extends = ["default", "../base.toml"]
        [limits]
        max_memo = 70
        [[allow]]
        global = "team.heads.Head"
        reason = "our head"
        """,
    )
    monkeypatch.chdir(tmp_path)  # relative extends resolve from the file, not the working directory
    policy = load_policy(child)
    assert policy.name == "child"  # defaults to the file's stem
    assert policy.description == "child policy"
    assert {
        "team.layers.Scale",
        "team.heads.Head",
        "numpy.dtype",
        "collections.OrderedDict",
    } <= policy.allowed
    assert policy.limits.max_opcodes == 1000  # from the parent
    assert policy.limits.max_memo == 70  # the child's own value wins
    assert policy.limits.max_streams == Limits().max_streams
    assert policy.decide("team.layers.Scale").source == str((tmp_path / "team" / "base.toml").resolve())
    assert policy.sources[:3] == (
        "strict.toml",
        "default.toml",
        str((tmp_path / "team" / "base.toml").resolve()),
    )
    assert policy.sources[-1] == str(child.resolve())


def test_extends_cycle(tmp_path: Path) -> None:
    write(
        tmp_path / "a.toml",
        'schema_version = 1\nextends = ["b.toml"]\n[[allow]]\nglobal = "m.A"\nreason = "a"\n',
    )
    write(
        tmp_path / "b.toml",
        'schema_version = 1\nextends = ["a.toml"]\n[[allow]]\nglobal = "m.B"\nreason = "b"\n',
    )
    text = policy_error(tmp_path / "a.toml")
    assert "cycle" in text and "a.toml" in text and "b.toml" in text


def test_diamond_extends_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'schema_version = 1\n[[allow]]\nglobal = "m.Base"\nreason = "b"\n')
    write(
        tmp_path / "l.toml",
        'schema_version = 1\nextends = ["base.toml"]\n[[allow]]\nglobal = "m.L"\nreason = "l"\n',
    )
    write(
        tmp_path / "r.toml",
        'schema_version = 1\nextends = ["base.toml"]\n[[allow]]\nglobal = "m.R"\nreason = "r"\n',
    )
    top = write(tmp_path / "top.toml", 'schema_version = 1\nextends = ["l.toml", "r.toml"]\n')
    assert load_policy(top).allowed == {"m.Base", "m.L", "m.R"}


# -- validation messages name the file and the field --------------------------------------------------------

CASES = {
    "bad-toml": ('schema_version = 1\n[[allow]\nglobal = "x"\n', "not valid TOML"),
    "unknown-top-field": (
        'schema_version = 1\nallowed = ["a.b"]\n[[allow]]\nglobal = "m.A"\nreason = "r"\n',
        "allowed",
    ),
    "unknown-entry-field": ('schema_version = 1\n[[allow]]\nglobal = "m.A"\nreasn = "r"\n', "allow[0].reasn"),
    "missing-reason": ('schema_version = 1\n[[allow]]\nglobal = "m.A"\n', "allow[0].reason"),
    "empty-reason": ('schema_version = 1\n[[allow]]\nglobal = "m.A"\nreason = "  "\n', "allow[0].reason"),
    "missing-schema": ('[[allow]]\nglobal = "m.A"\nreason = "r"\n', "schema_version"),
    "future-schema": ('schema_version = 2\n[[allow]]\nglobal = "m.A"\nreason = "r"\n', "schema_version"),
    "wildcard-no-flag": ('schema_version = 1\n[[allow]]\nglobal = "m.*"\nreason = "r"\n', "allow[0].global"),
    "flag-no-wildcard": (
        'schema_version = 1\n[[allow]]\nglobal = "m.A"\nreason = "r"\nunsafe_wildcard = true\n',
        "allow[0].unsafe_wildcard",
    ),
    "star-inside": ('schema_version = 1\n[[allow]]\nglobal = "m.*.A"\nreason = "r"\n', "allow[0].global"),
    "not-a-name": ('schema_version = 1\n[[allow]]\nglobal = "m.A B"\nreason = "r"\n', "allow[0].global"),
    "module-only": ('schema_version = 1\n[[allow]]\nglobal = "mypkg"\nreason = "r"\n', "allow[0].global"),
    "wrong-type": ('schema_version = 1\n[[allow]]\nglobal = 3\nreason = "r"\n', "allow[0].global"),
    "empty-policy": ("schema_version = 1\n", "allows nothing"),
    "unknown-extends": ('schema_version = 1\nextends = ["defualt"]\n', "extends[0]"),
    "missing-extends-file": ('schema_version = 1\nextends = ["nope.toml"]\n', "nope.toml"),
    "limits-unknown": (
        'schema_version = 1\nextends = ["strict"]\n[limits]\nmax_opcodez = 3\n',
        "limits.max_opcodez",
    ),
    "limits-type": (
        'schema_version = 1\nextends = ["strict"]\n[limits]\nmax_opcodes = "3"\n',
        "limits.max_opcodes",
    ),
    "limits-range": (
        'schema_version = 1\nextends = ["strict"]\n[limits]\nmax_opcodes = 0\n',
        "limits.max_opcodes",
    ),
    "bad-sha": (
        'schema_version = 1\nextends = ["strict"]\n[[waive]]\nsha256 = "xyz"\ncode = "SL101"\nreason = "r"\n'
        "expires = 2030-01-01\n",
        "waive[0].sha256",
    ),
    "bad-code": (
        f'schema_version = 1\nextends = ["strict"]\n[[waive]]\nsha256 = "{SHA}"\ncode = "SL999"\nreason = "r"\n'
        "expires = 2030-01-01\n",
        "waive[0].code",
    ),
    "bad-expiry": (
        f'schema_version = 1\nextends = ["strict"]\n[[waive]]\nsha256 = "{SHA}"\ncode = "SL101"\nreason = "r"\n'
        'expires = "soon"\n',
        "waive[0].expires",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_name_file_and_field(tmp_path: Path, case: str) -> None:
    text, field = CASES[case]
    path = write(tmp_path / f"{case}.toml", text)
    message = policy_error(path)
    assert str(path.resolve()) in message
    assert field in message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin.toml"
    bad.write_bytes(b'schema_version = 1\nname = "\xff"\n')
    assert "UTF-8" in policy_error(bad)
    assert "cannot read" in policy_error(tmp_path / "absent.toml")


def test_allow_names_are_exact(tmp_path: Path) -> None:
    assert "wildcard" in policy_error("default", allow=("mypkg.*",))
    assert "qualified name" in policy_error("default", allow=("mypkg",))
    assert "qualified name" in policy_error("default", allow=("my pkg.Net",))
    with pytest.raises(PolicyError):
        load_policy("default", allow="mypkg.Net")  # one string, not a list of names
    with pytest.raises(PolicyError):
        load_policy("default").with_allowed([3])  # type: ignore[list-item]


def test_allow_adds_names() -> None:
    default = load_policy("default")
    policy = load_policy("default", allow=["mypkg.layers.Scale", "collections.OrderedDict"])
    assert policy.name == "default+allow"
    assert policy.allowed == default.allowed | {"mypkg.layers.Scale"}
    decision = policy.decide("mypkg.layers.Scale")
    assert decision.allowed and decision.source == "allow="
    # An already allowed name keeps its reason and source.
    assert policy.decide("collections.OrderedDict").source == "strict.toml"
    assert not default.decide("mypkg.layers.Scale").allowed  # the original is untouched
    assert policy.with_allowed([]) is policy


# -- remedy ------------------------------------------------------------------------------------------------


def test_remedy_block_parses_back_and_allows(tmp_path: Path) -> None:
    policy = load_policy("default")
    name = "mypkg.layers.Net"
    assert not policy.decide(name).allowed
    remedy = policy.remedy(name)
    block = '[[allow]]\nglobal = "mypkg.layers.Net"\nreason = '
    assert block in remedy
    assert "if you trust this file's source" in remedy
    assert f"--allow {name}" in remedy and f'allow=["{name}"]' in remedy
    assert "top-level code" in remedy and "__setstate__" in remedy
    start = remedy.index("[[allow]]")
    end = remedy.index("\n", remedy.index("reason = ", start))
    path = write(
        tmp_path / "fixed.toml", 'schema_version = 1\nextends = ["default"]\n' + remedy[start:end] + "\n"
    )
    fixed = load_policy(path)
    assert fixed.decide(name).allowed
    assert fixed.allowed == policy.allowed | {name}


def test_remedy_refuses_floor_and_junk_names() -> None:
    policy = load_policy("default")
    for name in ("os.system", "torch.serialization.os.system"):
        text = policy.remedy(name)
        assert text.startswith("none:") and "[[allow]]" not in text and "malicious" in text
    junk = 'x"\n[[allow]]\nglobal = "evil.*'
    text = policy.remedy(junk)
    assert text.startswith("none:") and "not a Python qualified name" in text
    assert "\n" not in text  # attacker text is escaped: no line of it can be pasted as TOML


# -- hash, equality, immutability ----------------------------------------------------------------------------


def test_hash_stable_and_content_sensitive(tmp_path: Path) -> None:
    body = '[[allow]]\nglobal = "mypkg.Net"\nreason = "ours"\n'
    a = load_policy(user_policy(tmp_path / "a", body))
    b = load_policy(user_policy(tmp_path / "b", body))
    assert a.hash == b.hash and a == b and len({a, b}) == 1  # the path is not content
    assert len(a.hash) == 64 and int(a.hash, 16) >= 0
    changed = [
        user_policy(tmp_path / "c", body.replace("ours", "ours, really")),
        user_policy(tmp_path / "d", body + '[[allow]]\nglobal = "mypkg.Head"\nreason = "x"\n'),
        user_policy(tmp_path / "e", body + "[limits]\nmax_opcodes = 10\n"),
        user_policy(
            tmp_path / "f",
            body + f'[[waive]]\nsha256 = "{SHA}"\ncode = "SL101"\nreason = "r"\nexpires = 2030-01-01\n',
        ),
    ]
    hashes = {a.hash} | {load_policy(p).hash for p in changed}
    assert len(hashes) == 1 + len(changed)
    assert a.with_allowed(["mypkg.Other"]).hash != a.hash
    assert load_policy("strict").hash != load_policy("default").hash


def test_policy_is_immutable() -> None:
    policy = load_policy("default")
    with pytest.raises(AttributeError):
        policy.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.reasons["os.system"] = "please"  # type: ignore[index]
    assert isinstance(policy.allowed, frozenset)
    assert isinstance(policy, Policy)


@pytest.mark.parametrize("name", builtin_policy_names())
def test_policy_to_toml_round_trips(tmp_path: Path, name: str) -> None:
    policy = load_policy(name)
    text = policy_to_toml(policy)
    path = tmp_path / "resolved.toml"
    path.write_text(text, encoding="utf-8")
    again = load_policy(path)
    assert again.allowed == policy.allowed
    assert again.limits == policy.limits
    assert again.hash == policy.hash


def test_policy_to_toml_keeps_wildcards_and_waivers(tmp_path: Path) -> None:
    path = user_policy(
        tmp_path,
        f"""\
        [[allow]]
        global = "mypkg.*"
        reason = "all \\"mine\\""
        unsafe_wildcard = true
        [[waive]]
        sha256 = "{SHA.upper()}"
        code = "SL101"
        global = "weird.Name"
        reason = "reviewed"
        expires = 2030-01-01
        """,
    )
    policy = load_policy(path)
    out = tmp_path / "out" / "resolved.toml"
    write(out, policy_to_toml(policy))
    again = load_policy(out)
    assert again.hash == policy.hash
    assert again.wildcards == {"mypkg.*"} and again.reasons["mypkg.*"] == 'all "mine"'
    assert again.waivers == policy.waivers


# -- waivers ---------------------------------------------------------------------------------------------------


def test_waiver_for(tmp_path: Path) -> None:
    path = user_policy(
        tmp_path,
        f"""\
        [[waive]]
        sha256 = "{SHA.upper()}"
        code = "SL101"
        global = "mypkg.Net"
        reason = "reviewed by the team"
        expires = 2030-01-01
        [[waive]]
        sha256 = "{SHA}"
        code = "SL201"
        reason = "trailing padding is ours"
        expires = 2030-01-01
        """,
    )
    policy = load_policy(path)
    day = date(2029, 6, 1)
    waiver = policy.waiver_for(SHA, "SL101", "mypkg.Net", today=day)
    assert waiver is not None and waiver.reason == "reviewed by the team" and waiver.sha256 == SHA
    assert policy.waiver_for(SHA.upper(), "SL101", "mypkg.Net", today=day) == waiver
    assert policy.waiver_for(SHA, "SL101", "mypkg.Other", today=day) is None
    assert policy.waiver_for("cd" * 32, "SL101", "mypkg.Net", today=day) is None
    assert policy.waiver_for(SHA, "SL101", "mypkg.Net", today=date(2030, 1, 2)) is None  # expired
    assert policy.waiver_for(SHA, "SL101", "mypkg.Net", today=date(2030, 1, 1)) is not None  # last day
    any_global = policy.waiver_for(SHA, "SL201", None, today=day)
    assert any_global is not None and any_global.global_name is None
    assert policy.waiver_for(SHA, "SL100", "os.system", today=day) is None
    assert policy.waiver_for(SHA, "SL201", "os.system", today=day) is None
