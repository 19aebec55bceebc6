"""BLAKE2b for keys into safeload's own stores (audit runs, the install's fingerprint).

Taken from CPython's _blake2 module, which is what hashlib.blake2b is: importing hashlib loads
OpenSSL's bindings as well, a tenth of a replayed audit that needs no other hash. SHA-256, where a
digest must match what someone else computed (a file's identity, a policy file's), stays hashlib's.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:  # another Python: hashlib's is the same function
    from hashlib import blake2b

__all__ = ["blake2b", "digest"]


def digest(data: bytes) -> str:
    """32 hex digits: a key, not a file's identity."""
    return blake2b(data, digest_size=16).hexdigest()
