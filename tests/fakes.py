"""Test doubles that stand in for a vLLM server (and nothing else): the real Gateway and the real deletion
module run against them. Keep the interface in step with ``s3t_llm.serving.VLLMServer`` (whatever
``Gateway`` calls on its server must exist here too)."""

from __future__ import annotations

import threading
from pathlib import Path


class BackendFault(RuntimeError):
    """An injected failure of the fake engine (stands for a transient vLLM error)."""


class FakeVLLM:
    """An in-memory engine: adapters loaded by path (their bytes read at load time, like vLLM does),
    integer ids never reused, and fault injection per operation (``fail_next = {"load": 1}``)."""

    def __init__(self, model_path: str = "/fake/base"):
        self.model_path = model_path
        self.url = "http://127.0.0.1:1"
        self.ids: dict[str, int] = {}
        self.engine: dict[int, dict] = {}  # engine id -> {"name", "path", "files"}
        self._next = 1
        self.fail_next: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.prefix_cache_resets = 0
        self._lock = threading.Lock()

    def _maybe_fail(self, op: str) -> None:
        if self.fail_next.get(op, 0) > 0:
            self.fail_next[op] -= 1
            raise BackendFault(f"injected {op} failure")

    # ----- the VLLMServer interface ----------------------------------------------------------------
    def engine_loras(self) -> set[int]:
        return set(self.engine)

    def front_end_models(self) -> set[str]:
        return set(self.ids)

    def load(self, name: str, path: str) -> int:
        with self._lock:
            self.calls.append(("load", name))
            self._maybe_fail("load")
            if name in self.ids:
                raise RuntimeError(f"adapter {name} is already loaded")
            p = Path(path)
            files = {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}
            i = self._next
            self._next += 1
            self.engine[i] = {"name": name, "path": str(p), "files": files}
            self.ids[name] = i
            return i

    def remove(self, name: str) -> dict:
        with self._lock:
            self.calls.append(("remove", name))
            self._maybe_fail("remove")
            i = self.ids[name]
            self.engine.pop(i, None)
            del self.ids[name]
            return {"name": name, "engine_id": i, "engine_ids_after": sorted(self.engine)}

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", ""))
        self._maybe_fail("reset_prefix_cache")
        self.prefix_cache_resets += 1

    def stop(self) -> None:
        pass
