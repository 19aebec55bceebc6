"""Check the built-in policies in rules/ against the libraries installed here.

    python scripts/check_rules.py

- strict must equal what torch.load(weights_only=True) accepts by default in the installed torch;
- every allowed name of every built-in policy must exist (imported here, in this script: safeload
  itself never imports a name from a policy). Pack names whose library is not installed are listed
  as unchecked, not failed.

Exit status 0 when everything checked is consistent, 1 otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

from safeload.policy import builtin_policy_names, load_policy


def resolve(qualname: str) -> object:
    """The object `qualname` names: the longest importable module prefix, then attributes."""
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no importable module in {qualname}")


def torch_weights_only_globals() -> set[str] | None:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:
        return None
    return set(_get_allowed_globals())


def main() -> int:
    warnings.simplefilter("ignore")
    problems = 0
    expected = torch_weights_only_globals()
    strict = load_policy("strict")
    if expected is None:
        print("torch not installed: strict not compared")
    else:
        for name in sorted(expected - strict.allowed):
            print(f"strict lacks {name} (torch.load(weights_only=True) accepts it)")
            problems += 1
        for name in sorted(strict.allowed - expected):
            print(f"strict has {name} (torch.load(weights_only=True) refuses it)")
            problems += 1
    for policy_name in builtin_policy_names():
        policy = load_policy(policy_name)
        unchecked: set[str] = set()
        for name in sorted(policy.allowed):
            top = name.split(".")[0]
            if importlib.util.find_spec(top) is None:
                unchecked.add(top)
                continue
            try:
                resolve(name)
            except (ImportError, AttributeError) as exc:
                print(f"{policy_name}: {name} does not exist here ({exc})")
                problems += 1
        if unchecked:
            print(f"{policy_name}: not installed, names not checked: {', '.join(sorted(unchecked))}")
    print("ok" if problems == 0 else f"{problems} problem(s)")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
