"""How a cell record keeps a guest's output: its size, sha256 and a readable head (model and hw cells alike)."""

from __future__ import annotations

import hashlib


def blob(data: bytes, head: int = 2048) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "head": data[:head].decode("utf-8", "replace")}
