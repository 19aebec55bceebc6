"""Write a few benign and a few malicious model files for `scripts/examples.sh`.

The malicious ones carry harmless payloads: each would only create the file PAYLOAD_RAN next to
them if something unpickled it. safeload must flag them without that file ever appearing.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

MARKER = "PAYLOAD_RAN"


def _text(s: str) -> bytes:
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _call(module: str, name: str, arg: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.MARK + _text(arg) + pickle.TUPLE + pickle.REDUCE


def payload_pickle(marker: Path) -> bytes:
    """os.system('touch <marker>') as a protocol-2 pickle."""
    return pickle.PROTO + b"\x02" + _call("os", "system", f"touch '{marker}'") + pickle.STOP


def hidden_exec_pickle(marker: Path) -> bytes:
    """A benign-looking dict whose value comes from runpy._run_code, a callable denylists miss."""
    code = f"open({str(marker)!r}, 'w').close()"
    body = (
        pickle.EMPTY_DICT
        + _text("weights")
        + pickle.GLOBAL
        + b"runpy\n_run_code\n"
        + pickle.MARK
        + _text(code)
        + pickle.EMPTY_DICT
        + pickle.TUPLE
        + pickle.REDUCE
        + pickle.SETITEM
    )
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    benign = {"epoch": 3, "lr": 0.001, "layers": [64, 64, 10], "name": "tiny-mlp"}
    (out / "benign_config.pkl").write_bytes(pickle.dumps(benign, protocol=4))
    np.save(out / "benign_weights.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    try:
        import torch

        torch.manual_seed(0)
        state = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).state_dict()
        torch.save(state, out / "benign_model.pt")
        # The same archive with its data.pkl swapped for a payload, saved under an innocent name.
        buf = io.BytesIO()
        with zipfile.ZipFile(out / "benign_model.pt") as src, zipfile.ZipFile(buf, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("/data.pkl"):
                    data = payload_pickle(marker)
                dst.writestr(info, data)
        (out / "malicious_checkpoint.bin").write_bytes(buf.getvalue())
    except ImportError:
        print("torch is not installed: skipping the torch examples", file=sys.stderr)
    (out / "malicious_raw.pkl").write_bytes(payload_pickle(marker))
    (out / "malicious_disguised.txt").write_bytes(hidden_exec_pickle(marker))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/files"))
