"""The council's weight files: council.pt, which torch loads (training, notebooks), and beside
it council.npz, which numpy loads, so that a decision never imports torch.

`write` makes both from one state dict, and the .npz records the digest of the .pt it was
written with; `read` uses the .npz only when that digest matches, and otherwise reads the .pt
through torch (weights trained before the .npz existed, or a .pt replaced on its own).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Header = dict[str, Any]  # spec, temperature, vote_weights and meta: the .pt less its state
State = dict[str, NDArray[Any]]
_EPOCH = (1980, 1, 1, 0, 0, 0)  # a fixed time in the zip entries: the same weights, the same bytes


def arrays_path(pt: Path) -> Path:
    return pt.with_suffix(".npz")


def write(pt: Path, blob: Mapping[str, Any]) -> None:
    """`blob`: spec, state (a torch state dict), temperature, vote_weights, meta, and band
    where the council learned one."""
    import torch

    torch.save(blob, pt)
    header = {k: v for k, v in blob.items() if k != "state"} | {"pt_sha256": _digest(pt)}
    entries = {
        "header": np.array(json.dumps(header)),
        **{f"state/{k}": v.cpu().numpy() for k, v in blob["state"].items()},
    }
    write_arrays(arrays_path(pt), entries)


def write_arrays(path: Path, entries: Mapping[str, NDArray[Any]]) -> None:
    """An .npz that `np.load` reads without pickles; the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for name, array in entries.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), buf.getvalue())


def read(pt: Path) -> tuple[Header, State, str]:
    """The header, the state as numpy arrays, and the .pt's sha256 (hex)."""
    digest = _digest(pt)
    if arrays_path(pt).exists():
        with np.load(arrays_path(pt), allow_pickle=False) as z:
            header: Header = json.loads(str(z["header"]))
            if header.pop("pt_sha256") == digest:
                return (
                    header,
                    {k.removeprefix("state/"): z[k] for k in z.files if k.startswith("state/")},
                    digest,
                )
    import torch

    blob = torch.load(pt, weights_only=True)
    state = {k: v.numpy() for k, v in blob.pop("state").items()}
    return blob, state, digest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
