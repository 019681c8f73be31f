"""Serving: a real vLLM OpenAI-compatible server with multi-LoRA, behind the S3T gateway.

``VLLMServer`` runs ``python -m vllm.entrypoints.openai.api_server`` on the run's base model, listening on a
Unix socket in a private (0700) directory so that only the serving user reaches it, with runtime LoRA updating, vLLM's dev endpoints (``/collective_rpc``, ``/reset_prefix_cache``) and
our worker extension (``s3t_llm.vllm_ext``) so that adapters can be removed from the ENGINE, not only
from the API front end, and the engine's own adapter list can be read back as proof.

``Gateway`` is the OpenAI-compatible front door users talk to:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``"model": "<run name>"`` is routed to one live
  shard adapter; the policy is deterministic: shard = live_shards[sha256(prompt or messages) mod n_live]
  (the same prompt always goes to the same shard while the set of live shards is unchanged), or the
  shard named in the ``X-S3T-Shard`` header. A served adapter's own name is addressable directly; a name
  that is not served (any more) answers 404. Every response names its adapter (``model`` field and the
  ``X-S3T-Adapter`` header).
- ``GET /s3t/state``: without the token only what names no sample, request id or path (per shard: adapter
  name, depth, health; counts); with ``Authorization: Bearer <token>`` everything (surviving prefixes, engine
  ids, the engine's list and digests as last read by the integrity check, cut and integrity counters,
  deletion request ids). ``GET /health`` (per-shard health from the last integrity check), ``GET /v1/models``.
  Hostile input answers 4xx with a short message: bodies over ``max_body_bytes`` 413, invalid UTF-8 or JSON
  or nesting deeper than 64 400, a malformed ``X-S3T-Shard`` 400; streaming requests that vLLM refuses get
  vLLM's status before any stream starts.
- ``POST /s3t/delete`` ``{"ids": [...], "request_id": optional}`` with ``Authorization: Bearer <token>``.

Switching adapters (``apply_routing``): load the new adapter under a fresh name (vLLM gives it a fresh
integer id; the digest of the tensors the engine holds must equal the digest of the adapter file), switch
the routing table, CUT the requests in flight on the superseded adapters (their relay stops: a non-streaming
request gets 503 ``{"error": {"code": "deletion_in_progress", ...}}``, a stream ends with an SSE event carrying
the same error; nothing is re-run), close their upstream requests (vLLM aborts them) and wait until vLLM's
front end (``s3t_llm.vllm_ext.S3TMiddleware``) tracks none of them, unload the superseded adapters in the front
end, remove them from the engine by id, check the engine's list no longer holds them, reset the prefix
cache (retried; reported truthfully), and check every served adapter's digest. The same integrity check runs
every ``check_interval`` seconds: a mismatch takes the shard out of service, reloads its adapter and is
logged and counted.
"""


import asyncio
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .adapters import check_adapter_name
from .run import DATASET, Run

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SERVE_FILE = "serve.json"
# vLLM's uvicorn closes an idle keep-alive connection after 5 s, httpx's default expiry is also 5 s: a reused
# connection could be reset under our feet ("connection reset by peer" on an admin call). Expire ours first.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)


class ServingError(RuntimeError):
    pass


def wait_for_health(proc: subprocess.Popen, url: str, *, timeout: float, what: str, log=None, progress=None) -> float:
    """Poll ``url/health`` until it answers 200; ServingError if ``proc`` exits first or ``timeout`` passes.
    Returns the seconds waited; ``progress(elapsed)`` is called between polls."""
    t0 = time.time()
    where = f"; see {log}" if log else ""
    while True:
        if proc.poll() is not None:
            raise ServingError(f"{what} exited with code {proc.returncode} during start-up{where}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        if time.time() - t0 > timeout:
            raise ServingError(f"{what} not ready after {timeout:.0f} s{where}")
        if progress:
            progress(time.time() - t0)
        time.sleep(0.5)


def route_shard(prompt, live: list[int]) -> int:
    """The live shard that serves ``prompt`` (a string, token list or chat messages) when no shard is named:
    deterministic while the set of live shards is unchanged."""
    key = json.dumps(prompt, sort_keys=True).encode()
    return live[int(hashlib.sha256(key).hexdigest(), 16) % len(live)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_rank_limit(r: int) -> int:
    for k in VLLM_LORA_RANKS:
        if k >= r:
            return k
    raise ServingError(f"LoRA rank {r} exceeds vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def _die_with_parent() -> None:
    # Linux: vLLM gets SIGTERM if the s3t process dies, even by SIGKILL (no orphaned server on the port).
    # PR_SET_PDEATHSIG fires when the THREAD that forked exits: launch vLLM from a thread that lives as long as
    # the server should (the main thread, or the gateway's supervisor), never from a short-lived helper thread.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """A vLLM OpenAI server subprocess, reachable only by its owner.

    By default vLLM listens on a Unix domain socket (``--uds``) inside a private directory (mode 0700, owned
    by the serving user; ``socket_dir=`` to choose where): vLLM's admin surface (LoRA load/unload,
    ``/collective_rpc``, ``/reset_prefix_cache``, the other dev endpoints) is unreachable by other local
    users, so only this process (the gateway) can change what the engine serves. ``uds=False`` keeps the
    old loopback TCP port (for tools that must talk to vLLM directly; anyone local can then reach it).

    ``ids`` (adapter name -> engine id) changes only after the engine confirmed the operation; ``expected``
    holds, per adapter name, the digest of its LoRA tensors computed from its safetensors file at load time
    (the canonical form of :mod:`s3t_llm.vllm_ext`), which :meth:`digests` reads back from the engine.
    """

    def __init__(self, model_path: str, *, max_loras: int, max_lora_rank: int, port: int | None = None,
                 max_model_len: int = 1024, log_file: str | Path | None = None, extra_args: list[str] | None = None,
                 uds: bool | str | None = None, socket_dir: str | Path | None = None, env: dict | None = None):
        import tempfile

        self.model_path = model_path
        self.max_loras = max_loras
        self.max_lora_rank = lora_rank_limit(max_lora_rank)
        self.max_model_len = max_model_len
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = extra_args or []
        self.env = dict(env or {})  # e.g. CUDA_VISIBLE_DEVICES / VLLM_CPU_OMP_THREADS_BIND of a replica
        self.proc: subprocess.Popen | None = None
        self._socket_dir: Path | None = None
        if uds is None:
            uds = port is None  # an explicit port asks for TCP
        if uds:
            if isinstance(uds, str):
                self.uds = uds
            else:
                if socket_dir:
                    Path(socket_dir).mkdir(parents=True, exist_ok=True)
                self._socket_dir = Path(tempfile.mkdtemp(prefix="s3t-vllm-", dir=socket_dir))
                self.uds = str(self._socket_dir / "vllm.sock")
            d = Path(self.uds).parent
            os.chmod(d, 0o700)
            st = d.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ServingError(f"socket directory {d} must be private to uid {os.getuid()} (mode 0700)")
            self.port = None
            self.url = "http://localhost"  # host is only the Host header: the transport is the socket
            self.client = httpx.Client(base_url=self.url, timeout=120, transport=httpx.HTTPTransport(uds=self.uds,
                                                                                                     limits=LIMITS))
        else:
            self.uds = None
            self.port = port or free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.client = httpx.Client(base_url=self.url, timeout=120, limits=LIMITS)
        self.ids: dict[str, int] = {}  # adapter name -> engine integer id
        self.paths: dict[str, str] = {}  # adapter name -> path it was loaded from
        self.expected: dict[str, str] = {}  # adapter name -> digest of its safetensors file (at load time)
        self.lora_dtype: str | None = None
        self._lock = threading.RLock()

    def async_client(self, **kw) -> httpx.AsyncClient:
        """An AsyncClient to vLLM over the same transport (socket or loopback port)."""
        transport = httpx.AsyncHTTPTransport(uds=self.uds, limits=LIMITS) if self.uds else None
        headers = {"X-S3T-Admin": self.admin_token} if getattr(self, "admin_token", None) else None
        return httpx.AsyncClient(base_url=self.url, transport=transport, limits=LIMITS, headers=headers, **kw)

    @classmethod
    def attach(cls, url: str, model_path: str, *, admin_token: str, max_loras: int, max_lora_rank: int,
               max_model_len: int = 1024) -> "VLLMServer":
        """A vLLM server started elsewhere (``--upstream URL``): no process of ours; every request carries
        the admin secret (``X-S3T-Admin``) that its S3T middleware requires. Call :meth:`check_upstream`."""
        srv = cls(model_path, max_loras=max_loras, max_lora_rank=max_lora_rank, max_model_len=max_model_len,
                  port=1, uds=False)
        srv.url = url.rstrip("/")
        srv.port = None
        srv.admin_token = admin_token
        srv.client.close()
        srv.client = httpx.Client(base_url=srv.url, timeout=120, limits=LIMITS,
                                  headers={"X-S3T-Admin": admin_token})
        return srv

    def check_upstream(self) -> None:
        """Refuse an upstream that does not serve this run's base model, lacks the S3T worker extension or
        middleware, or answers admin paths without the secret."""
        try:
            r = httpx.post(self.url + "/s3t/flights", json={}, timeout=10)
        except httpx.HTTPError as e:
            raise ServingError(f"upstream {self.url} does not answer ({type(e).__name__})") from e
        if r.status_code != 403:
            raise ServingError(f"upstream {self.url} answers its admin paths without the secret (HTTP "
                               f"{r.status_code} on /s3t/flights): start it with S3T_ADMIN_TOKEN set (see the "
                               f"command `s3t serve RUN --print-vllm-command` prints)")
        r = self.client.post("/s3t/flights", json={})
        if r.status_code != 200:
            raise ServingError(f"upstream {self.url} refuses our secret or lacks the S3T middleware "
                               f"(HTTP {r.status_code} on /s3t/flights)")
        models = self.client.get("/v1/models").json().get("data", [])
        roots = {m.get("root") or m.get("id") for m in models if not m.get("parent")}
        if self.model_path not in roots:
            raise ServingError(f"upstream {self.url} serves {sorted(roots)}, not this run's base model {self.model_path}")
        self.engine_loras()  # the worker extension answers (raises otherwise)

    def command(self, host: str | None = None, port: int | None = None) -> list[str]:
        """vLLM's command line; ``host``/``port``: for a server started elsewhere (``--print-vllm-command``)."""
        import torch

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
               "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank),
               "--max-model-len", str(self.max_model_len),
               "--worker-extension-cls", "s3t_llm.vllm_ext.S3TWorkerExtension",
               "--middleware", "s3t_llm.vllm_ext.S3TMiddleware", "--disable-uvicorn-access-log"]
        if host is not None:
            cmd += ["--host", host, "--port", str(port)]
        else:
            cmd += ["--uds", self.uds] if self.uds else ["--host", "127.0.0.1", "--port", str(self.port)]
        if not torch.cuda.is_available():
            cmd += ["--dtype", "bfloat16", "--enforce-eager"]
        return cmd + self.extra_args

    def start(self, timeout: float = 600, progress=None) -> None:
        self.launch()
        self.wait_ready(timeout=timeout, progress=progress)

    def launch(self) -> None:
        """Start the process (from a long-lived thread: see _die_with_parent); :meth:`wait_ready` waits for it."""
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", **self.env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        # Own process group: Ctrl-C in the parent is handled by us, and stop() takes the whole tree down.
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self._launched_at = time.time()

    def wait_ready(self, timeout: float = 600, progress=None) -> None:
        where = f"; see {self.log_file}" if self.log_file else ""
        t0 = getattr(self, "_launched_at", None) or time.time()
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise ServingError(f"vLLM exited with code {self.proc.returncode} during start-up{where}")
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise ServingError(f"vLLM not ready after {timeout:.0f} s{where}")
            if progress:
                progress(time.time() - t0)
            time.sleep(0.5)
        logger.info("vLLM ready at %s after %.1f s", self.uds or self.url, time.time() - t0)

    def restart(self, timeout: float = 600) -> None:
        """Start a fresh process on the same socket after this one died: the engine holds nothing, so the
        bookkeeping is cleared (the gateway reconciles the replica before it gets traffic)."""
        if self.proc and self.proc.poll() is None:
            raise ServingError("vLLM is still running; stop it first")
        with self._lock:
            self.ids.clear()
            self.paths.clear()
            self.expected.clear()
        if self.uds and os.path.exists(self.uds):
            os.unlink(self.uds)
        self.start(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.client.close()
        if self._socket_dir is not None:
            import shutil

            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ----- engine-level LoRA operations -----------------------------------------------------------
    def _rpc(self, method: str, *args: str):
        r = self.client.post("/collective_rpc", json={"method": method, "args": list(args)})
        if r.status_code != 200:
            raise ServingError(f"vLLM collective_rpc {method} failed: {r.status_code} {r.text[:300]}")
        return r.json()["results"]

    def engine_loras(self) -> set[int]:
        """The adapter ids the engine's workers hold (the engine's own list, not the front end's)."""
        results = self._rpc("s3t_list_loras")
        return {int(i) for worker in results for i in worker}

    def digests(self, ids: list[int] | None = None) -> dict[int, str]:
        """{engine id: digest of the LoRA tensors the engine holds for it} (one RPC; every worker must agree,
        a disagreement reads as the digest "inconsistent")."""
        results = self._rpc("s3t_lora_digests", *[str(i) for i in (ids or [])])
        out: dict[int, str] = {}
        for worker in results:
            for k, v in worker.items():
                i = int(k)
                if v.get("dtype") and not self.lora_dtype:
                    self.lora_dtype = v["dtype"]
                out[i] = v["digest"] if out.get(i, v["digest"]) == v["digest"] else "inconsistent"
        return out

    def _digests_of_new(self, known: set[int]) -> dict[int, str | None]:
        """{engine id: digest} where only ids not in ``known`` are hashed (None for the known ones): one RPC."""
        results = self._rpc("s3t_lora_digests_new", *[str(i) for i in sorted(known)])
        out: dict[int, str | None] = {}
        for worker in results:
            for i in worker["ids"]:
                out.setdefault(int(i), None)
            for k, v in worker["digests"].items():
                i = int(k)
                if v.get("dtype") and not self.lora_dtype:
                    self.lora_dtype = v["dtype"]
                out[i] = v["digest"] if out.get(i) in (None, v["digest"]) else "inconsistent"
        return out

    def expected_digest(self, path: str | Path) -> str:
        from .vllm_ext import adapter_file_digest

        return adapter_file_digest(path, self.lora_dtype or "bfloat16")

    def front_end_models(self) -> set[str]:
        r = self.client.get("/v1/models")
        r.raise_for_status()
        return {m["id"] for m in r.json()["data"]}

    def load(self, name: str, path: str) -> int:
        """Load an adapter under a NEW name; returns the engine id vLLM gave it. The digest of the tensors the
        engine now holds must equal the digest of the adapter's file (read here, at load time)."""
        check_adapter_name(name)
        with self._lock:
            if name in self.ids:
                raise ServingError(f"adapter {name} is already loaded; names are never reused")
            r = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            if r.status_code != 200:
                raise ServingError(f"vLLM could not load adapter {name}: {r.status_code} {r.text[:300]}")
            # One RPC: the engine's ids with the digests of their tensors. The new id is the one we do not serve
            # yet whose tensors are those of the file (an id we do not know otherwise is left to check_integrity).
            engine = self._digests_of_new(set(self.ids.values()))
            self.last_engine_ids = sorted(engine)
            want = self.expected_digest(path)
            new = [i for i in sorted(set(engine) - set(self.ids.values())) if engine[i] == want]
            if len(new) != 1:
                unknown = sorted(set(engine) - set(self.ids.values()))
                raise ServingError(f"could not identify the engine id of adapter {name} with the digest of {path} "
                                   f"(engine ids not served: {unknown})")
            lora_id = new[0]
            self.ids[name], self.paths[name], self.expected[name] = lora_id, str(path), want
            return lora_id

    def remove(self, name: str) -> dict:
        """Unload from the front end AND remove from the engine; the bookkeeping forgets the adapter only
        after the engine's own list confirms it is gone."""
        with self._lock:
            lora_id = self.ids[name]
            r = self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            # 404: the front end no longer knows the name (e.g. an earlier attempt got that far).
            if r.status_code not in (200, 404):
                raise ServingError(f"vLLM could not unload {name}: {r.status_code} {r.text[:300]}")
            # vLLM 0.32's unload only forgets the name; the weights stay in the worker until removed here.
            results = self._rpc("s3t_remove_lora", str(lora_id))
            engine = {int(i) for worker in results for i in worker}
            if lora_id in engine:
                raise ServingError(f"engine still holds adapter {name} (id {lora_id}) after removal")
            del self.ids[name]
            self.paths.pop(name, None)
            self.expected.pop(name, None)
            return {"name": name, "engine_id": lora_id, "engine_ids_after": sorted(engine)}

    def remove_engine_id(self, lora_id: int) -> list[int]:
        """Remove an engine id the bookkeeping does not (or no longer) serve; returns the engine's list after."""
        results = self._rpc("s3t_remove_lora", str(lora_id))
        return sorted({int(i) for worker in results for i in worker})

    def reset_prefix_cache(self) -> bool:
        """One attempt; True when vLLM reports success (it refuses while requests hold KV blocks)."""
        r = self.client.post("/reset_prefix_cache")
        if r.status_code != 200:
            raise ServingError(f"vLLM reset_prefix_cache failed: {r.status_code} {r.text[:200]}")
        try:
            return bool(r.json().get("success", False))
        except ValueError:
            return False

    def quiesce(self, flights: list[str], names: list[str], timeout: float = 10.0) -> dict:
        """Mark ``flights`` as cut in vLLM's front end (a late arrival is refused) and wait until none of them
        is inside vLLM and vLLM tracks no request on the adapters ``names``: every abort has then been sent to
        the engine core, ahead of anything sent later. Returns {"ok", "seconds", "polls", ...}."""
        t0 = time.perf_counter()
        polls = 0
        cut = list(flights)
        while True:
            r = self.client.post("/s3t/flights", json={"cut": cut})
            polls += 1
            cut = []
            if r.status_code != 200:
                return {"ok": False, "seconds": round(time.perf_counter() - t0, 4), "polls": polls,
                        "error": f"/s3t/flights answered {r.status_code}"}
            info = r.json()
            active = set(info.get("active") or []) & set(flights)
            lr = info.get("lora_requests")
            busy = {n: lr.get(n, 0) for n in names if lr and lr.get(n, 0)}
            if not active and not busy and lr is not None:
                return {"ok": True, "seconds": round(time.perf_counter() - t0, 4), "polls": polls}
            if lr is None and not active:  # this vLLM does not expose its request tracking: nothing to wait for
                return {"ok": False, "seconds": round(time.perf_counter() - t0, 4), "polls": polls,
                        "error": "vLLM's request tracking is unavailable"}
            if time.perf_counter() - t0 > timeout:
                return {"ok": False, "seconds": round(time.perf_counter() - t0, 4), "polls": polls,
                        "active": sorted(active), "lora_requests": busy,
                        "error": "vLLM's request tracking is unavailable" if lr is None else "timeout"}
            time.sleep(0.01)


class ServiceUnavailable(RuntimeError):
    """A shard (or every live shard) is out of service: 503."""


_END = object()  # end of an upstream stream
_CUT = object()  # wakes a relay that was cut


class _StreamFailed:
    def __init__(self, what: str):
        self.what = what


def _json_depth(obj, limit: int = 64) -> int:
    """Nesting depth of a parsed JSON value, counted iteratively up to ``limit + 1``."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            depth = max(depth, d)
            if depth > limit:
                return depth
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return depth


class _Flight:
    """One request the gateway is relaying; a switch that retires its adapter cuts it (from any thread)."""

    def __init__(self, loop):
        self.id = secrets.token_hex(8)
        self.loop = loop
        self.target: str | None = None
        self.cut_reason: str | None = None
        self.committed = False  # a complete non-streaming answer that is being sent
        self.task = None  # the upstream task (request, first event, or stream producer)
        self.queue = None
        self.replica = None  # the Replica relaying it
        self.shard: int | None = None  # for the metrics (bounded labels: shard and depth, never a name)
        self.depth = 0
        self.stopped = threading.Event()  # set once this relay sends nothing more from its adapter
        self.sent = 0  # events (or one whole answer) handed to the client's connection
        self.last_sent: float | None = None  # wall time of the last of them

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nothing can be sent any more
            self.stopped.set()

    def _wake(self) -> None:
        if self.task is not None and not self.task.done() and not self.committed:
            self.task.cancel()
        if self.queue is not None:
            self.queue.put_nowait(_CUT)


MAX_REPORTED_FLIGHTS = 64  # per cut report: enough to audit a switch, bounded under any load


def _flight_record(f: "_Flight") -> dict:
    """What a cut relay had sent, read after it stopped: the client's count must equal ``events_sent``."""
    return {"request": f.id, "events_sent": f.sent, "last_event_at": f.last_sent, "committed": f.committed}


def _merge_cuts(cuts: list[dict]) -> dict:
    """One cut report over the replicas (a single replica's is returned as is)."""
    if len(cuts) == 1:
        return cuts[0]
    out = {"requests": sum(c["requests"] for c in cuts),
           "relays_stopped_seconds": max(c["relays_stopped_seconds"] for c in cuts),
           "relays_not_confirmed": sum(c["relays_not_confirmed"] for c in cuts),
           "engine_quiesced": all(c["engine_quiesced"] for c in cuts),
           "engine_quiesce_seconds": max((c.get("engine_quiesce_seconds") or 0) for c in cuts),
           "flights": [f for c in cuts for f in c.get("flights", [])][:MAX_REPORTED_FLIGHTS],
           "flights_omitted": sum(len(c.get("flights", [])) + c.get("flights_omitted", 0) for c in cuts)
           - min(MAX_REPORTED_FLIGHTS, sum(len(c.get("flights", [])) for c in cuts))}
    errors = [c["engine_error"] for c in cuts if "engine_error" in c]
    if errors:
        out["engine_error"] = "; ".join(errors)
    return out


class Replica:
    """One vLLM server behind the gateway. ``fenced`` (a reason) means it gets no traffic until it has been
    reconciled to the current routing; ``local`` replicas are processes this gateway started (and restarts)."""

    def __init__(self, index: int, server, *, local: bool = False):
        self.index = index
        self.server = server
        self.local = local
        self.fenced: str | None = None
        self.fenced_at: float | None = None
        self.outstanding = 0  # requests relayed to it now (least-outstanding balancing)
        self.requests = 0  # requests relayed to it since the gateway started
        self.client = None  # the app's AsyncClient to it
        self.restarts = 0
        self.reconciles = 0
        self.fences = 0
        self.last_error: str | None = None
        self.reconcile_lock = threading.Lock()

    def view(self) -> dict:
        return {"replica": self.index, "up": self.fenced is None, "fenced": self.fenced is not None,
                "reason": self.fenced, "outstanding": self.outstanding, "requests": self.requests,
                "restarts": self.restarts,
                "fences": self.fences, "reconciles": self.reconciles, "last_error": self.last_error}


class Gateway:
    """Routing table + in-flight accounting + deletion API in front of one or more ``VLLMServer`` replicas."""

    def __init__(self, run: Run, server, *, token: str | None = None, dead_shard: str = "none",
                 drain_timeout: float = 30.0, retrain: bool = False, local_replicas: bool = False,
                 retrain_ray: dict | None = None):
        if dead_shard not in ("none", "base"):
            raise ValueError(f"dead_shard={dead_shard!r}: use 'none' or 'base'")
        self.run = run
        servers = list(server) if isinstance(server, (list, tuple)) else [server]
        if not servers:
            raise ValueError("a gateway needs at least one vLLM server")
        self.replicas = [Replica(i, s, local=local_replicas) for i, s in enumerate(servers)]
        self.server = servers[0]  # the primary: its base-model path names the base model for clients
        self.replica_timeout = 30.0  # seconds a replica may take for one switch step before it is fenced
        self.reconcile_interval = 2.0  # seconds between attempts to reconcile a fenced replica
        self._supervisor: threading.Thread | None = None
        self.token = token or secrets.token_urlsafe(24)
        self.dead_shard = dead_shard
        self.drain_timeout = drain_timeout
        self.retrain = retrain
        # Background retraining on Ray (``s3t serve --retrain --ray``): train_run_ray's keyword arguments, or None
        # for the serial trainer in this process. Either way this process stays the one writer of the run.
        self.retrain_ray = retrain_ray
        self.routing: dict[int, dict | None] = {}
        self.inflight: dict[str, int] = {}
        self.retired: dict[str, str] = {}  # adapter name -> reason
        self._cond = threading.Condition()
        self.deletions: list[dict] = []
        self.retrain_thread: threading.Thread | None = None
        self.retrain_status: dict = {"state": "idle", "dead_shards": []}
        self._retrain_wakeup = threading.Event()

        # ----- serving guarantees (issue 11) -----
        self._flights: dict[str, "_Flight"] = {}  # flight id -> a request being relayed
        self._switch_lock = threading.RLock()  # one switch or repair at a time
        self.cut_requests = 0  # requests cut because their adapter was retired
        self.relay_stop_timeouts = 0
        self.cut_stop_timeout = 2.0  # seconds a cut relay may take to confirm it stopped
        self.quiesce_timeout = 10.0  # seconds vLLM may take to abort cut requests
        self.max_body_bytes = 1 << 20  # request bodies larger than this answer 413
        self.check_interval = 30.0  # seconds between periodic integrity checks
        self.shard_health: dict[int, dict] = {}  # shard -> {"healthy", "reason"} from the last check
        self.integrity = {"checks": 0, "mismatches": 0, "repairs": 0, "regained_removed": 0, "last_check": None,
                          "last_error": None, "events": []}
        self.engine_view: dict = {"ids": [], "digests": {}, "at": None}  # the engine's list, as last read
        self.prefix_cache: dict = {"pending": False, "last_success": None, "attempts": 0}
        self._quarantined: set[int] = set()
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._checker: threading.Thread | None = None
        self._check_again = False
        from .metrics import GatewayMetrics

        self.metrics = GatewayMetrics(self)  # GET /metrics (Prometheus text format)

    # ----- Backend protocol (used by the deletion module) -----------------------------------------
    def apply_routing(self, routing: dict[int, dict | None], reason: str) -> dict:
        """Serve ``routing``. Requests in flight on a superseded adapter are CUT: their relay stops (the
        client gets a ``deletion_in_progress`` error), their upstream request is closed, which makes vLLM abort
        it, and vLLM confirms it tracks none of them any more; only then is the adapter removed from the engine
        (a running request could otherwise reload it from its path). Returns a truthful report."""
        with self._switch_lock:
            return self._apply_routing_locked(routing, reason)

    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.fenced is None]

    def _fence(self, r: Replica, reason: str) -> None:
        """No traffic to ``r`` until it is reconciled; requests in flight on it are cut (nothing more it
        produces reaches a client). The supervisor reconciles it (and restarts a local process that died)."""
        with self._cond:
            r.fences += 1
            r.fenced, r.fenced_at, r.last_error = reason, time.time(), reason
            victims = [f for f in self._flights.values() if f.replica is r and f.cut_reason is None]
            for f in victims:
                f.cut_reason = f"replica {r.index} fenced: {reason}"
                f.wake()
            self.cut_requests += sum(not f.committed for f in victims)
        logger.error("replica %d fenced: %s", r.index, reason)
        self._event({"replica": r.index, "fenced": reason})

    def _each(self, live: list[Replica], what: str, fn) -> dict[int, object]:
        """Run one switch step ``fn(replica)`` on every replica of ``live`` at once (each replica has its own
        connection and lock). A replica that fails is fenced while another one succeeded; when every one fails
        (always so with a single replica) the step's first error is raised: the switch fails, the deletion
        stays journaled. Returns {replica index: fn's result} for those that succeeded."""
        if len(live) == 1:
            return {live[0].index: fn(live[0])}
        from concurrent.futures import ThreadPoolExecutor, wait

        pool = ThreadPoolExecutor(max_workers=len(live), thread_name_prefix="s3t-replica")
        futs = {r.index: (r, pool.submit(fn, r)) for r in live}
        wait([f for _, f in futs.values()], timeout=self.replica_timeout)
        pool.shutdown(wait=False)  # a replica that hangs is fenced below; its thread ends on its own timeout
        out, errors = {}, []
        for i, (r, fut) in futs.items():
            if not fut.done():
                errors.append((r, TimeoutError(f"no answer within {self.replica_timeout:.0f} s")))
                continue
            e = fut.exception()
            if e is None:
                out[i] = fut.result()
            else:
                errors.append((r, e))
        if errors and not out:
            raise errors[0][1]
        for r, e in errors:
            self._fence(r, f"{what} failed: {type(e).__name__}: {str(e)[:200]}")
        return out

    def _apply_routing_locked(self, routing: dict[int, dict | None], reason: str) -> dict:
        t0 = time.perf_counter()
        old = dict(self.routing)
        new_names = {e["name"] for e in routing.values() if e}
        old_names = {e["name"] for e in old.values() if e}
        live = self.live_replicas()
        if not live:
            raise ServingError("no vLLM replica can receive traffic (every replica is fenced); nothing switched")
        if old == routing and all(set(r.server.ids) == new_names for r in live):
            # Nothing served changes: no engine round trips (they queue behind generation steps under load).
            return {"loaded": [], "removed": [], "engine_ids": sorted(self.server.ids.values()),
                    "switch_seconds": 0.0, "total_seconds": round(time.perf_counter() - t0, 4),
                    "prefix_cache_reset": False, "cut_requests": 0, "replicas": self._replica_report(live, {})}
        per: dict[int, dict] = {r.index: {"loaded": [], "removed": []} for r in live}
        def load_all(r):
            for e in routing.values():
                if e and e["name"] not in r.server.ids:
                    item = {"name": e["name"], "engine_id": r.server.load(e["name"], e["path"])}
                    if len(self.replicas) > 1:
                        item["replica"] = r.index
                    per[r.index]["loaded"].append(item)

        self._each(live, "load", load_all)
        live = self.live_replicas()
        loaded = [x for r in live for x in per[r.index]["loaded"]]
        # Reconcile, not diff: every adapter an engine holds that the new routing does not serve goes (also one
        # whose removal failed in an earlier switch).
        held = set().union(*(set(r.server.ids) for r in live))
        gone = sorted((old_names | held) - new_names)
        with self._cond:
            self.routing = dict(routing)
            for name in gone:
                self.retired[name] = reason
            victims = self._cut_locked(set(gone), f"adapter retired: {reason}")
            # Every relay on a retired adapter must have stopped before the acknowledgement, whoever cut it (a
            # fence during this switch, or an earlier integrity check, may have cut it already).
            gone_set = set(gone)
            # This switch's own victims always (a relay woken by the cut may have stopped already: it is still
            # reported), and earlier cuts' relays that have not stopped yet.
            cut_now = set(map(id, victims))
            pending = [f for f in self._flights.values()
                       if f.target in gone_set and (id(f) in cut_now or not f.stopped.is_set())]
        t_switched = time.perf_counter()
        report = {"loaded": loaded, "removed": [], "cut_requests": len(victims)}
        if gone:
            def cut(r):
                mine = [f for f in pending if f.replica is r or (f.replica is None and r is live[0])]
                return self._await_cut(mine, [n for n in gone if n in r.server.ids or n in old_names], r)

            cuts = self._each(live, "cut", cut)
            for r in live:
                c = cuts.get(r.index)
                if c is None:  # that replica was fenced by the step
                    continue
                per[r.index]["cut"] = c
                if not c["engine_quiesced"] and len(self.live_replicas()) > 1:
                    self._fence(r, f"vLLM did not confirm the abort of cut requests ({c.get('engine_error')})")
            report["cut"] = _merge_cuts([cuts[r.index] for r in live if r.index in cuts])
            # Relays on replicas fenced meanwhile (not waited for above): one shared deadline.
            alive = set(map(id, self.live_replicas()))
            deadline = time.time() + self.cut_stop_timeout
            late = [f for f in pending if (f.replica is None or id(f.replica) not in alive)
                    and not f.stopped.wait(timeout=max(0.0, deadline - time.time()))]
            if late:
                self.relay_stop_timeouts += len(late)
                report["cut"]["relays_not_confirmed"] = report["cut"].get("relays_not_confirmed", 0) + len(late)
        live = self.live_replicas()
        def remove_all(r):
            for name in gone:
                if name in r.server.ids:
                    item = r.server.remove(name)
                    if len(self.replicas) > 1:
                        item = dict(item, replica=r.index)
                    per[r.index]["removed"].append(item)

        self._each(live, "remove", remove_all)
        live = self.live_replicas()
        report["removed"] = [x for r in live for x in per[r.index]["removed"]]
        if not live:
            raise ServingError("every vLLM replica failed the switch; nothing is confirmed")
        if gone:
            done = self._each(live, "prefix cache reset", self._reset_prefix_cache)
            resets = [done[r.index] for r in live if r.index in done]
            report.update(resets[0])
            if len(resets) > 1:
                report["prefix_cache_reset"] = all(x["prefix_cache_reset"] for x in resets)
        else:
            report["prefix_cache_reset"] = False
        # remove() verified each id against the engine's own list (load() read it with the digests): that list
        # is the report's; the digests of every served adapter are checked right after, off the critical path.
        live = self.live_replicas() or live
        for r in live:
            mine = per[r.index]["removed"]
            if mine:
                ids = mine[-1]["engine_ids_after"]
            else:
                ids = getattr(r.server, "last_engine_ids", None) or sorted(r.server.engine_loras())
            per[r.index]["engine_ids"] = sorted(ids)
        engine_ids = per[live[0].index]["engine_ids"]
        self.engine_view.update(ids=sorted(engine_ids), at=time.time())
        report["engine_ids"] = sorted(engine_ids)
        report["replicas"] = self._replica_report(self.replicas, per)
        report["integrity"] = "checked in the background right after the switch (see /health)"
        self._schedule_check()
        report["switch_seconds"] = round(t_switched - t0, 4)
        report["total_seconds"] = round(time.perf_counter() - t0, 4)
        return report

    def _replica_report(self, replicas, per: dict) -> list[dict]:
        out = []
        for r in replicas:
            row = {"replica": r.index, "receives_traffic": r.fenced is None}
            if r.fenced is not None:
                row["fenced"] = r.fenced
            row.update(per.get(r.index, {}))
            out.append(row)
        return out

    def _cut_locked(self, names: set[str], reason: str) -> list:
        """Mark every relayed request on ``names`` as cut and wake its relay (call with ``_cond`` held)."""
        victims = [f for f in self._flights.values() if f.target in names and f.cut_reason is None]
        for f in victims:
            f.cut_reason = reason
            f.wake()
        # A committed flight (a complete answer being sent) is not cut, but the switch waits for its send.
        self.cut_requests += sum(not f.committed for f in victims)
        return victims

    def _await_cut(self, victims: list, names: list[str], replica: Replica | None = None) -> dict:
        t0 = time.perf_counter()
        deadline = time.time() + self.cut_stop_timeout
        late = [f.id for f in victims if not f.stopped.wait(timeout=max(0.0, deadline - time.time()))]
        if late:
            self.relay_stop_timeouts += len(late)
            logger.warning("%d cut relays did not confirm within %.1f s", len(late), self.cut_stop_timeout)
        t_relays = time.perf_counter()
        quiesce = getattr((replica or self.replicas[0]).server, "quiesce", None)
        try:
            q = quiesce([f.id for f in victims], names, timeout=self.quiesce_timeout) if quiesce else {"ok": True}
        except Exception as e:  # noqa: BLE001 - a replica that does not answer
            if len(self.live_replicas()) <= 1:
                raise  # one replica: the switch fails before any removal (the deletion stays journaled)
            q = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        if not q.get("ok"):
            logger.warning("vLLM did not confirm the abort of cut requests on %s: %s", names, q)
        return {"requests": len(victims), "relays_stopped_seconds": round(t_relays - t0, 4),
                "relays_not_confirmed": len(late), "engine_quiesced": bool(q.get("ok")),
                "engine_quiesce_seconds": q.get("seconds"), **({"engine_error": q["error"]} if "error" in q else {}),
                "flights": [_flight_record(f) for f in victims[:MAX_REPORTED_FLIGHTS]],
                "flights_omitted": max(0, len(victims) - MAX_REPORTED_FLIGHTS)}

    def _reset_prefix_cache(self, replica: Replica | None = None, tries: int = 1, gap: float = 0.05) -> dict:
        """vLLM refuses the reset while requests hold KV blocks: retry a few times, then keep retrying in the
        background; the report says which happened (a retired adapter's name is never reused, so its cached
        blocks can never be hit again)."""
        with self._cond:
            busy = sum(self.inflight.values())
        if busy:  # vLLM refuses while requests hold KV blocks: do not spend an engine round trip on the switch
            tries = 0
        srv = (replica or self.replicas[0]).server
        for i in range(1, tries + 1):
            ok = srv.reset_prefix_cache()
            if ok is None or ok:  # None: a backend that does not report
                self.prefix_cache.update(pending=False, last_success=time.time())
                return {"prefix_cache_reset": True, "prefix_cache_attempts": i}
            time.sleep(gap)
        self.prefix_cache["attempts"] += tries
        if not self.prefix_cache["pending"]:
            self.prefix_cache["pending"] = True
            threading.Thread(target=self._reset_prefix_cache_later, args=(srv,), name="s3t-prefix-cache",
                             daemon=True).start()
        why = "vLLM refused while requests run" if tries else f"{busy} requests were running (vLLM refuses then)"
        return {"prefix_cache_reset": False, "prefix_cache_attempts": tries,
                "prefix_cache_note": f"{why}; retrying in the background (see prefix_cache in /s3t/state)"}

    def _reset_prefix_cache_later(self, srv=None, limit: float = 120.0) -> None:
        srv = srv or self.server
        t_end = time.time() + limit
        while time.time() < t_end and not self._monitor_stop.is_set():
            try:
                self.prefix_cache["attempts"] += 1
                if srv.reset_prefix_cache() is not False:
                    self.prefix_cache.update(pending=False, last_success=time.time())
                    return
            except Exception as e:  # noqa: BLE001
                self.prefix_cache["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            time.sleep(0.25)
        self.prefix_cache["pending"] = False
        self.prefix_cache["gave_up_at"] = time.time()
        logger.warning("prefix cache reset still refused after %.0f s", limit)

    # ----- integrity: what the engine holds is what the gateway serves ----------------------------
    def check_integrity(self, repair: bool = True, retired: list[str] | None = None) -> dict:
        """Read each engine's adapter ids and the digests of their LoRA tensors (one RPC per replica) and
        compare them with what the gateway serves: a served adapter missing from the engine, or whose digest
        differs from the digest of its file, is logged and counted; with one replica it takes its shard out of
        service and (``repair``) is reloaded from its file; with several, that replica is fenced and reconciled
        while the others serve. Engine ids the gateway does not serve (e.g. a retired adapter regained) are
        removed."""
        with self._switch_lock:
            live = self.live_replicas()
            if not live:
                return {"ok": False, "error": "no vLLM replica receives traffic", "shards_bad": [],
                        "engine_unknown_ids": []}
            results = []
            for r in live:
                # Decided per replica, now: the last replica that receives traffic is never fenced here.
                several = r.fenced is None and len(self.live_replicas()) > 1
                results.append(self._check_replica(r, repair, several=several))
            if len(results) == 1:
                return results[0]
            merged: dict[int, dict] = {}
            for x in results:
                for sh, h in (x.get("health") or {}).items():
                    if sh not in merged or not h["healthy"]:
                        merged[sh] = h
            if merged:
                self.shard_health = merged
            out = {"ok": all(x["ok"] for x in results), "shards_bad": sorted({s for x in results for s in x.get("shards_bad", [])}),
                   "engine_unknown_ids": sorted({i for x in results for i in x.get("engine_unknown_ids", [])}),
                   "replicas": [dict(x, replica=r.index) for r, x in zip(live, results)]}
            return out

    def _check_replica(self, r: Replica, repair: bool, several: bool) -> dict:
        srv = r.server
        digests_fn = getattr(srv, "digests", None)
        try:
            engine = digests_fn() if digests_fn else {i: None for i in srv.engine_loras()}
            front = srv.front_end_models()
        except Exception as e:  # noqa: BLE001
            self.integrity["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            logger.warning("integrity check of replica %d failed: %s", r.index, self.integrity["last_error"])
            if several:
                self._fence(r, f"integrity check failed: {self.integrity['last_error']}")
            return {"ok": False, "error": self.integrity["last_error"]}
        if r is self.replicas[0] or not several:
            self.engine_view = {"ids": sorted(engine), "digests": dict(engine), "at": time.time()}
        self.integrity["checks"] += 1
        self.integrity["last_check"] = time.time()
        expected = getattr(srv, "expected", {})
        health: dict[int, dict] = {}
        bad: list[tuple[int, dict, str]] = []
        with self._cond:
            routing = dict(self.routing)
        for s, e in sorted(routing.items()):
            if not e:
                health[s] = {"healthy": False, "reason": "no surviving prefix (needs retraining)", "dead": True}
                continue
            lid = srv.ids.get(e["name"])
            problem = None
            if lid is None or lid not in engine:
                problem = "adapter not in the engine's list"
            elif e["name"] not in front:
                problem = "adapter not in vLLM's model list"
            elif engine[lid] is not None and expected.get(e["name"]) and engine[lid] != expected[e["name"]]:
                problem = "digest of the engine's LoRA tensors differs from the adapter file"
            health[s] = {"healthy": problem is None, "reason": problem}
            if problem:
                bad.append((s, e, problem))
        served_ids = set(srv.ids.values())
        strangers = sorted(set(engine) - served_ids)
        result = {"ok": not bad and not strangers, "shards_bad": [s for s, _, _ in bad],
                  "engine_unknown_ids": strangers}
        for s, e, problem in bad:
            self.integrity["mismatches"] += 1
            self._event({"shard": s, "adapter": e["name"], "problem": problem, "replica": r.index})
            logger.error("integrity: replica %d shard %d (%s): %s", r.index, s, e["name"], problem)
        for lid in strangers:
            self.integrity["regained_removed"] += 1
            self._event({"engine_id": lid, "problem": "engine holds an adapter the gateway does not serve",
                         "replica": r.index})
            logger.error("integrity: replica %d holds unknown adapter id %d; removing it", r.index, lid)
        result["health"] = health
        if several:
            # Several replicas: the others serve while this one is fenced and reconciled (strangers removed,
            # the right adapters reloaded and checked) by the supervisor.
            if bad or strangers:
                problems = {p for _, _, p in bad} | ({"engine holds adapters the gateway does not serve"}
                                                     if strangers else set())
                self._fence(r, "integrity: " + "; ".join(sorted(problems)))
                if repair:
                    result["repaired"] = [s for s, _, _ in bad] if self.reconcile_replica(r)["ok"] else []
            return result
        self.shard_health = health
        for s, e, problem in bad:
            with self._cond:
                self._quarantined.add(s)
                self._cut_locked({e["name"]}, f"integrity: {problem}")
        for lid in strangers:
            if repair:
                try:
                    remove = getattr(srv, "remove_engine_id", None)
                    if remove:
                        remove(lid)
                except Exception as ex:  # noqa: BLE001
                    self.integrity["last_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        if repair:
            result["repaired"] = [s for s, e, _ in bad if self._repair(s, e, r)]
        return result

    # ----- replicas: fencing, reconciliation, supervision ------------------------------------------
    def reconcile_replica(self, r: Replica) -> dict:
        """Bring replica ``r`` to the current routing (what the ledger decides is served): every adapter it
        holds that is not routed is removed (front end and engine, also ids the gateway never loaded there),
        every routed adapter is (re)loaded and its digest checked, the prefix cache is reset. Only then is the
        replica unfenced. Returns {"ok", ...}; a failure leaves it fenced.

        The network calls run WITHOUT the switch lock, so a deletion never waits behind a slow replica: the
        replica is fenced throughout (switches skip it, it gets no traffic), and it is unfenced only under the
        switch lock, if the routing it was reconciled to is still the current one; if a switch landed meanwhile,
        it is reconciled again to the new routing."""
        # One reconciliation of a replica at a time (supervisor, add_upstream, integrity checks). A caller that
        # holds the switch lock (an integrity check) must not wait for one in progress: that one waits for the
        # switch lock to finish, so the caller leaves the replica fenced to it.
        owns_switch = getattr(self._switch_lock, "_is_owned", lambda: False)()
        if not r.reconcile_lock.acquire(blocking=not owns_switch):
            return {"ok": False, "error": "being reconciled by another thread"}
        try:
            return self._reconcile(r)
        finally:
            r.reconcile_lock.release()

    def _reconcile(self, r: Replica) -> dict:
        t0 = time.perf_counter()
        if r.fenced is None:
            self._fence(r, "being reconciled")
        fences = r.fences
        for _ in range(5):
            with self._cond:
                routing = dict(self.routing)
            try:
                engine = self._reconcile_to(r, routing)
            except Exception as e:  # noqa: BLE001
                with self._cond:
                    moved = dict(self.routing) != routing
                if moved and r.fences == fences:
                    continue  # a switch retired (and destroyed) an adapter this was loading: to the new routing
                r.last_error = f"reconcile: {type(e).__name__}: {str(e)[:200]}"
                logger.warning("replica %d not reconciled: %s", r.index, r.last_error)
                return {"ok": False, "error": r.last_error}
            with self._switch_lock, self._cond:
                if r.fences != fences:  # fenced again meanwhile (e.g. its process died): not reconciled
                    return {"ok": False, "error": f"fenced again while reconciling: {r.fenced}"}
                if dict(self.routing) != routing:
                    continue  # a switch changed the routing while this ran: reconcile to the new one
                r.fenced = r.fenced_at = None
                break
        else:
            r.last_error = "reconcile: the routing kept changing while reconciling"
            return {"ok": False, "error": r.last_error}
        r.reconciles += 1
        self._event({"replica": r.index, "reconciled": True})
        logger.warning("replica %d reconciled to the current routing in %.2f s", r.index, time.perf_counter() - t0)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 4), "engine_ids": sorted(engine)}

    def _reconcile_to(self, r: Replica, routing: dict) -> dict:
        """The network half of ``reconcile_replica`` (``r`` is fenced): make its adapters exactly ``routing``'s,
        verified from its engine's own list and digests. Returns the engine's {id: digest}; raises otherwise."""
        srv = r.server
        want = {e["name"]: e["path"] for e in routing.values() if e}
        # Requests still relayed to it were cut when it was fenced; wait until vLLM tracks none on it.
        quiesce = getattr(srv, "quiesce", None)
        if quiesce:
            with self._cond:
                mine = [f.id for f in self._flights.values() if f.replica is r]
            q = quiesce(mine, sorted(set(srv.ids) - set(want)), timeout=self.quiesce_timeout)
            if not q.get("ok"):  # a running request could reload a retired adapter: stay fenced
                raise ServingError(f"vLLM did not confirm the abort of its requests ({q.get('error')})")
        front = srv.front_end_models()
        for name in sorted(set(srv.ids) - set(want)):
            srv.remove(name)
        for name in sorted(front - set(srv.ids) - {srv.model_path}):  # loaded behind our back
            srv.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        digests_fn = getattr(srv, "digests", None)
        engine = digests_fn() if digests_fn else {i: None for i in srv.engine_loras()}
        remove_id = getattr(srv, "remove_engine_id", None)
        for lid in sorted(set(engine) - set(srv.ids.values())):
            if remove_id:
                remove_id(lid)
        expected = getattr(srv, "expected", {})
        for name, path in sorted(want.items()):
            lid = srv.ids.get(name)
            if lid is not None and (lid not in engine or
                                    (engine.get(lid) and expected.get(name) and engine[lid] != expected[name])):
                srv.remove(name)  # wrong weights under the name, or the engine lost it: load afresh
            if name not in srv.ids:
                srv.load(name, path)
        engine = digests_fn() if digests_fn else {i: None for i in srv.engine_loras()}
        problems = [n for n in want if srv.ids.get(n) not in engine or
                    (engine.get(srv.ids[n]) and expected.get(n) and engine[srv.ids[n]] != expected[n])]
        strangers = sorted(set(engine) - set(srv.ids.values()))
        if problems or strangers or set(srv.ids) != set(want):
            raise ServingError(f"after reconciling, adapters wrong {problems}, unknown ids {strangers}")
        for _ in range(3):
            if srv.reset_prefix_cache() is not False:
                break
            time.sleep(0.05)
        return engine

    def supervise_once(self) -> None:
        """Restart local replicas whose process died (fenced first) and reconcile fenced replicas."""
        for r in list(self.replicas):
            if self._monitor_stop.is_set():  # shutting down: restart nothing
                return
            proc = getattr(r.server, "proc", None)
            if r.local and proc is not None and proc.poll() is not None:
                if r.fenced is None or not r.fenced.startswith("process exited"):
                    self._fence(r, f"process exited with code {proc.returncode}")
                try:
                    r.server.restart()
                    r.restarts += 1
                except Exception as e:  # noqa: BLE001
                    r.last_error = f"restart: {type(e).__name__}: {str(e)[:200]}"
                    logger.warning("replica %d did not restart: %s", r.index, r.last_error)
                    continue
            if r.fenced is not None:
                self.reconcile_replica(r)

    def start_supervisor(self) -> None:
        if self._supervisor and self._supervisor.is_alive():
            return

        def loop():
            while not self._monitor_stop.wait(self.reconcile_interval):
                try:
                    self.supervise_once()
                except Exception:  # noqa: BLE001
                    logger.exception("replica supervision failed")

        self._supervisor = threading.Thread(target=loop, name="s3t-replicas", daemon=True)
        self._supervisor.start()

    def add_upstream(self, url: str, admin_token: str) -> Replica:
        """Attach a vLLM server started elsewhere: checked (model, S3T extension, admin secret), added fenced,
        then reconciled to the current routing; it receives traffic only once reconciled."""
        ref = self.server
        srv = VLLMServer.attach(url, ref.model_path, admin_token=admin_token, max_loras=getattr(ref, "max_loras", 4),
                                max_lora_rank=getattr(ref, "max_lora_rank", 8),
                                max_model_len=getattr(ref, "max_model_len", 1024))
        srv.check_upstream()
        with self._switch_lock:
            r = Replica(len(self.replicas), srv, local=False)
            r.fenced, r.fenced_at = "attached: being reconciled", time.time()
            r.client = srv.async_client(timeout=httpx.Timeout(600.0))  # before it can be picked
            self.replicas.append(r)
        self.reconcile_replica(r)
        return r

    def replica_states(self) -> list[dict]:
        return [r.view() for r in self.replicas]

    def _schedule_check(self) -> None:
        """Run check_integrity in a background thread now (one at a time; a request made while one runs makes
        it run once more)."""
        with self._cond:
            self._check_again = True
            if self._checker is not None and self._checker.is_alive():
                return

            def work():
                while True:
                    with self._cond:
                        if not self._check_again:
                            self._checker = None
                            return
                        self._check_again = False
                    try:
                        self.check_integrity(repair=True)
                    except Exception:  # noqa: BLE001
                        logger.exception("integrity check after a switch failed")

            self._checker = threading.Thread(target=work, name="s3t-integrity-after-switch", daemon=True)
            self._checker.start()

    def wait_checks(self, timeout: float = 30.0) -> None:
        """Wait for a scheduled integrity check (tests, benchmarks)."""
        t = self._checker
        if t is not None:
            t.join(timeout)

    def _event(self, ev: dict) -> None:
        ev["at"] = time.time()
        self.integrity["events"] = (self.integrity["events"] + [ev])[-50:]

    def _repair(self, shard: int, entry: dict, replica: Replica | None = None) -> bool:
        """Reload a shard's adapter from its file on ``replica`` (the one checked; same name: its cache entries
        are dropped first)."""
        name = entry["name"]
        r = replica or self.replicas[0]
        srv = r.server
        try:
            with self._cond:
                victims = [f for f in self._flights.values() if f.target == name and f.replica in (r, None)]
            self._await_cut(victims, [name], r)
            if name in srv.ids:
                try:
                    srv.remove(name)
                except ServingError:
                    srv.ids.pop(name, None)
                    getattr(srv, "expected", {}).pop(name, None)
            for _ in range(3):  # a reload under the same name must not meet cached blocks of the wrong weights
                if srv.reset_prefix_cache() is not False:
                    break
                time.sleep(0.05)
            srv.load(name, entry["path"])
            with self._cond:
                self._quarantined.discard(shard)
            self.shard_health[shard] = {"healthy": True, "reason": None}
            self.integrity["repairs"] += 1
            self._event({"shard": shard, "adapter": name, "repaired": True})
            logger.warning("integrity: shard %d reloaded %s from %s", shard, name, entry["path"])
            return True
        except Exception as e:  # noqa: BLE001
            self.integrity["last_error"] = f"repair of shard {shard}: {type(e).__name__}: {str(e)[:200]}"
            logger.exception("integrity: could not reload shard %d", shard)
            return False

    def start_monitor(self) -> None:
        if self._monitor and self._monitor.is_alive():
            return
        self._monitor_stop.clear()

        def loop():
            while not self._monitor_stop.wait(self.check_interval):
                try:
                    self.check_integrity(repair=True)
                except Exception:  # noqa: BLE001
                    logger.exception("periodic integrity check failed")

        self._monitor = threading.Thread(target=loop, name="s3t-integrity", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._monitor_stop.set()

    # ----- routing --------------------------------------------------------------------------------
    def live_shards(self) -> list[int]:
        return sorted(s for s, e in self.routing.items() if e and s not in self._quarantined)

    def route(self, model: str, body: dict, shard_header: str | None, flight=None) -> tuple[str, int | None]:
        """Pick the vLLM model name for a request and count it in flight (under the routing lock, so a
        switch cannot retire an adapter between the choice and the count: it sees the request and cuts it);
        the caller must ``_exit``. ``flight`` (the HTTP relay) is registered under the same lock.
        Raises LookupError(msg) for unknown or retired models, ValueError(msg) for a malformed shard header,
        ServiceUnavailable(msg) for a shard taken out of service."""
        with self._cond:
            target, shard = self._route_locked(model, body, shard_header)
            replica = self._pick_replica(target)
            replica.outstanding += 1
            self.inflight[target] = self.inflight.get(target, 0) + 1
            if flight is not None:
                flight.replica = replica
                flight.target = target
                entry = self.routing.get(shard) if shard is not None else None
                flight.shard = shard
                flight.depth = entry["depth"] if entry and entry["name"] == target else 0
                self._flights[flight.id] = flight
            return target, shard

    def _route_locked(self, model: str, body: dict, shard_header: str | None) -> tuple[str, int | None]:
        if model == self.run.config.name:
            live = self.live_shards()
            if shard_header is not None:
                h = shard_header.strip()
                if not (h.isascii() and h.isdigit() and len(h) <= 6):
                    raise ValueError("X-S3T-Shard must be a shard number (a non-negative integer)")
                shard = int(h)
                if shard not in self.routing:
                    raise LookupError(f"shard {shard} does not exist")
                entry = self.routing[shard]
                if entry is None:
                    if self.dead_shard == "base":
                        return self.server.model_path, shard
                    raise LookupError(f"shard {shard} has no surviving prefix (needs retraining)")
                if shard in self._quarantined:
                    raise ServiceUnavailable(f"shard {shard} is out of service (integrity check failed)")
                return entry["name"], shard
            if not live:
                if self.dead_shard == "base":
                    return self.server.model_path, None
                if self._quarantined:
                    raise ServiceUnavailable("every live shard is out of service (integrity check failed)")
                raise LookupError("no shard of this run has a surviving prefix: every shard needs retraining")
            shard = route_shard(body.get("prompt", body.get("messages")), live)
            return self.routing[shard]["name"], shard
        if model == self.server.model_path:  # the base model (no adapter): reference scoring, nothing to delete
            return model, None
        for s, e in self.routing.items():
            if e and e["name"] == model:
                if s in self._quarantined:
                    raise ServiceUnavailable(f"shard {s} is out of service (integrity check failed)")
                return model, s
        shown = model if len(model) <= 80 else model[:80] + "..."
        if model in self.retired:
            raise LookupError(f"adapter {shown} was retired ({self.retired[model]})")
        raise LookupError(f"model {shown!r} is not served; see GET /v1/models")

    def _pick_replica(self, target: str) -> Replica:
        """Least outstanding requests among the replicas that receive traffic and hold ``target`` (the shard
        routing of a prompt never depends on the replicas). Call with ``_cond`` held."""
        base = target == self.server.model_path
        ok = [r for r in self.replicas if r.fenced is None and (base or target in r.server.ids)]
        if not ok:
            raise ServiceUnavailable("no vLLM replica can serve this request now (fenced or being reconciled)")
        self._rr = (getattr(self, "_rr", -1) + 1) % len(self.replicas)  # ties go round-robin
        n = len(self.replicas)
        r = min(ok, key=lambda r: (r.outstanding, (r.index - self._rr) % n))
        r.requests += 1
        return r

    def _exit(self, name: str, flight=None) -> None:
        with self._cond:
            self.inflight[name] -= 1
            if flight is not None:
                self._flights.pop(flight.id, None)
                if flight.replica is not None:
                    flight.replica.outstanding -= 1
            self._cond.notify_all()

    # ----- state ----------------------------------------------------------------------------------
    def state(self, full: bool = True) -> dict:
        """The gateway's state. ``full=False`` (no token): nothing that names samples, request ids or paths:
        per shard its adapter name (public, as in /v1/models), depth and health, and counts. ``full=True``
        (the deletion token): everything, including the engine's adapter list and digests AS LAST READ by the
        integrity check (after every switch and every ``check_interval`` seconds; no engine RPC per call)."""
        with self.run.ledger() as led:
            info = led.dataset(DATASET)
            applied = led.requests(DATASET, status="applied")
            pending = led.pending(DATASET)
        retrain = dict(self.retrain_status) if isinstance(getattr(self, "retrain_status", None), dict) else {}
        retrain["running"] = bool(self.retrain_thread and self.retrain_thread.is_alive())
        with self._cond:
            shards = []
            for s in range(self.run.shards):
                e = self.routing.get(s)
                h = self.shard_health.get(s, {})
                row = {"shard": s, "adapter": e and e["name"], "depth": e["depth"] if e else 0,
                       "needs_retraining": e is None, "in_service": bool(e) and s not in self._quarantined,
                       "healthy": bool(e) and s not in self._quarantined and h.get("healthy", True),
                       "health_reason": h.get("reason")}
                if full:
                    row.update({"prefix": e and e["prefix"], "sequence": e and e["sequence"],
                                "sequence_prefixes": e and e["sequence_prefixes"],
                                "engine_id": e and self.server.ids.get(e["name"])})
                shards.append(row)
            inflight = {k: v for k, v in self.inflight.items() if v}
        public = {"run": self.run.config.name, "samples": info.n_samples, "live_samples": info.n_live,
                  "slices": self.run.config.s3t.slices, "shards": shards,
                  "deletions_applied": len(applied), "deletions_pending": len(pending),
                  "retraining": retrain["running"], "integrity_checked_at": self.integrity["last_check"],
                  "replicas": [{"replica": r.index, "up": r.fenced is None} for r in self.replicas],
                  "detail": "full" if full else "public (send Authorization: Bearer <token> for full detail)"}
        if not full:
            return public
        integ = {k: v for k, v in self.integrity.items()}
        return {**public, "base_model": self.server.model_path, "sequences": self.run.sequences,
                "adapters_loaded": dict(self.server.ids), "engine_adapter_ids": sorted(self.engine_view["ids"]),
                "engine_read_at": self.engine_view["at"],
                "engine_digests_match": {n: (self.engine_view["digests"].get(i) == getattr(self.server, "expected", {}).get(n))
                                         for n, i in self.server.ids.items()},
                "inflight": inflight, "cut_requests": self.cut_requests, "replicas": self.replica_states(),
                "relay_stop_timeouts": self.relay_stop_timeouts, "integrity": integ,
                "prefix_cache": dict(self.prefix_cache), "retrain_status": retrain,
                "deletions_applied": [{"request_id": r.request_id, "n_ids": len(r.sample_ids),
                                       "applied_at": r.applied_at} for r in applied],
                "deletions_pending": [r.request_id for r in pending]}

    # ----- deletion + retraining ------------------------------------------------------------------
    def served(self) -> dict:
        """What is really served (Backend protocol): the routing table and the engine's own adapter list, read
        together (under the switch lock, so never in the middle of a switch)."""
        with self._switch_lock:
            return self._served_locked()

    def _served_locked(self) -> dict:
        """Per replica that receives traffic, its engine's own adapter list; a fenced replica is listed as such
        (it receives no traffic until reconciled). With several replicas, one that cannot answer is fenced
        here; the top-level ``engine_adapters`` is the first live replica's (the certificate checks each)."""
        with self._cond:
            routing = {s: (e["name"] if e else None) for s, e in self.routing.items()}
        views = []
        for r in self.replicas:
            if r.fenced is not None:
                views.append({"replica": r.index, "receives_traffic": False, "fenced": r.fenced})
                continue
            ids = dict(r.server.ids)
            try:
                engine = r.server.engine_loras()
            except Exception as e:  # noqa: BLE001
                if len(self.live_replicas()) <= 1:
                    raise
                self._fence(r, f"engine list unreadable: {type(e).__name__}: {str(e)[:200]}")
                views.append({"replica": r.index, "receives_traffic": False, "fenced": r.fenced})
                continue
            views.append({"replica": r.index, "receives_traffic": True,
                          "engine_adapters": {n: i for n, i in sorted(ids.items()) if i in engine},
                          "engine_unknown_ids": sorted(engine - set(ids.values()))})
        live = [v for v in views if v["receives_traffic"]]
        first = live[0] if live else {"engine_adapters": {}, "engine_unknown_ids": []}
        out = {"backend": "vllm", "url": self.server.url, "routing": routing,
               "engine_adapters": first["engine_adapters"],
               "engine_unknown_ids": sorted({i for v in live for i in v["engine_unknown_ids"]})}
        if len(self.replicas) > 1:
            out["replicas"] = views
        return out

    def delete(self, ids: list[str], request_id: str | None = None) -> dict:
        """Apply one deletion request through this server (the run's one writer), then complete any
        request that an earlier failure left journaled (each reconciles with the ledger as it is now)."""
        from .deletion import apply_deletion, recover

        cert = apply_deletion(self.run, ids, backend=self, request_id=request_id)
        self.deletions.append({"request_id": cert["request_id"], "changes": cert["served_changes"]})
        for c in recover(self.run, backend=self):
            self.deletions.append({"request_id": c["request_id"], "changes": c["served_changes"]})
        if self.retrain and cert["dead_shards"]:
            self.start_retrain()
        return cert

    def refresh(self, reason: str) -> dict:
        """Serve the current best prefixes (after start-up, recovery or retraining); a request that an earlier
        failure left journaled is completed first (it destroys what its samples made stale)."""
        from .deletion import publish, recover

        recover(self.run, backend=self)
        return publish(self.run, self, reason)[1]

    def start_retrain(self) -> None:
        """Retrain dead shards in the background until no shard is dead: shards that die while it runs are
        picked up, a stage made stale by a deletion is discarded and trained again on the new data."""
        if self.retrain_thread and self.retrain_thread.is_alive():
            self._retrain_wakeup.set()
            return

        def work():
            from .training import StaleStageError, train_run

            st = self.retrain_status
            st.update(state="running", rounds=0, restarts=0, last_error=None,
                      scheduler="ray" if self.retrain_ray is not None else "local")
            while True:
                self._retrain_wakeup.clear()
                dead = [s for s, e in self.run.desired_routing().items() if e is None]
                st["dead_shards"] = dead
                if not dead:
                    break
                st["rounds"] += 1
                logger.info("retraining dead shards %s in the background (round %d)", dead, st["rounds"])
                try:
                    if self.retrain_ray is not None:
                        from .distributed import train_run_ray

                        summary = train_run_ray(self.run, shards=dead, progress=False, **self.retrain_ray)
                        st["where"] = [{k: w[k] for k in ("stage", "node", "pid", "attempt")}
                                       for w in summary.get("where", [])]
                        st["stages_discarded"] = st.get("stages_discarded", 0) + summary.get("stages_discarded", 0)
                    else:
                        summary = train_run(self.run, shards=dead, progress=False)
                    st["stages_trained"] = st.get("stages_trained", 0) + summary["stages_trained"]
                    self.refresh("retrained")
                except StaleStageError as e:
                    st["restarts"] += 1
                    logger.warning("a deletion made a retraining stage stale (%s); training it again", e)
                except Exception as e:  # keep the server up; report the failure in /s3t/state
                    st.update(state="failed", last_error=f"{type(e).__name__}: {str(e)[:300]}")
                    logger.exception("background retraining failed")
                    return
            st.update(state="idle", dead_shards=[])

        self.retrain_thread = threading.Thread(target=work, name="s3t-retrain", daemon=True)
        self.retrain_thread.start()

    # ----- HTTP app -------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI(title="s3t gateway")
        for r in self.replicas:
            if hasattr(r.server, "async_client"):
                r.client = r.server.async_client(timeout=httpx.Timeout(600.0))
            else:
                r.client = httpx.AsyncClient(base_url=r.server.url, timeout=httpx.Timeout(600.0))
        limit = self.max_body_bytes

        def err(status: int, message: str, typ: str = "invalid_request_error", code=None, headers=None):
            message = message if len(message) <= 500 else message[:500] + "..."
            return JSONResponse({"error": {"message": message, "type": typ, "code": code or status}},
                                status_code=status, headers=headers)

        def cut_error(flight) -> dict:
            return {"error": {"message": f"request cut: {flight.cut_reason}; the adapter that was generating it "
                                         "is no longer served (nothing it would have produced after the switch "
                                         "is sent); send the request again to be served by the current adapter",
                              "type": "deletion_in_progress", "code": "deletion_in_progress"}}

        class Relayed(JSONResponse):  # runs ``on_done`` once the response is sent (``completed``), or failed to be
            def __init__(self, *a, on_done=None, **kw):
                super().__init__(*a, **kw)
                self.on_done = on_done
                self.completed = False

            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                    self.completed = True
                finally:
                    self.on_done()

        class RelayedStream(StreamingResponse):
            def __init__(self, *a, on_done=None, **kw):
                super().__init__(*a, **kw)
                self.on_done = on_done

            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    self.on_done()

        def bearer(request: Request):
            """None: no bearer credentials; else whether they equal the token (scheme case-insensitive)."""
            auth = request.headers.get("authorization")
            if not auth:
                return None
            scheme, _, cred = auth.strip().partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                return None
            return secrets.compare_digest(cred.strip().encode("latin-1", "replace"), self.token.encode())

        async def read_json(request: Request):
            """(body, None) or (None, error response): size limit (413), UTF-8, JSON, nesting depth."""
            cl = request.headers.get("content-length", "")
            if cl.isdigit() and int(cl) > limit:
                return None, err(413, f"request body exceeds {limit} bytes", code="body_too_large")
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    return None, err(413, f"request body exceeds {limit} bytes", code="body_too_large")
            try:
                text = bytes(buf).decode("utf-8")
            except UnicodeDecodeError as e:
                return None, err(400, f"request body is not valid UTF-8 (byte {e.start})")
            try:
                body = json.loads(text)
            except RecursionError:
                return None, err(400, "request body is nested too deeply")
            except json.JSONDecodeError as e:
                return None, err(400, f"request body is not valid JSON: {e.msg} at position {e.pos}")
            if _json_depth(body) > 64:
                return None, err(400, "request body is nested too deeply (limit 64)")
            return body, None

        async def upstream_error(r, target: str, flight, data: bytes, headers: dict):
            if r.status_code == 404 and target in self.retired:
                return err(503, f"adapter {target} was retired ({self.retired[target]}) while this request was "
                                "in flight; retry with the run name", "deletion_in_progress", "deletion_in_progress",
                           headers=headers)
            if r.status_code == 404 and target not in self.retired and target != self.server.model_path:
                # A replica that lost a served adapter (e.g. restarted by its orchestrator): check now, so that it
                # is fenced and reconciled (several replicas) or the shard repaired (one), not in check_interval.
                self._schedule_check()
            try:
                payload = json.loads(data)
            except ValueError:
                return err(502, f"vLLM answered {r.status_code} with a non-JSON body: "
                                f"{data[:200].decode('utf-8', 'replace')}", "upstream_error", headers=headers)
            if r.status_code == 503 and isinstance(payload, dict) and \
                    (payload.get("error") or {}).get("type") == "deletion_in_progress" and flight.cut_reason:
                return JSONResponse(cut_error(flight), status_code=503, headers=headers)
            return JSONResponse(payload, status_code=r.status_code, headers=headers)

        async def proxy(request: Request, path: str):
            body, bad = await read_json(request)
            if bad is not None:
                return bad
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                return err(400, "request body must be a JSON object with a string 'model'")
            flight = _Flight(asyncio.get_running_loop())
            try:
                target, shard = self.route(body["model"], body, request.headers.get("x-s3t-shard"), flight=flight)
            except ValueError as e:
                return err(400, str(e))
            except ServiceUnavailable as e:
                return err(503, str(e), "shard_out_of_service", "shard_out_of_service")
            except LookupError as e:
                return err(404, str(e).strip("'\""), "NotFoundError")
            self.metrics.request(flight.shard, flight.depth)
            released = []

            def release():  # exactly once, whichever of the paths below gets there first
                if not released:
                    released.append(True)
                    flight.stopped.set()
                    self._exit(target, flight)

            headers = {"X-S3T-Adapter": target, "X-S3T-Shard": "" if shard is None else str(shard),
                       "X-S3T-Request": flight.id}  # names this relay in a switch report's cut flights
            try:
                content = json.dumps(dict(body, model=target)).encode()
            except (RecursionError, ValueError, TypeError):
                release()
                return err(400, "request body cannot be relayed")
            fwd = {"content-type": "application/json", "x-s3t-flight": flight.id}
            handed_off = False
            try:
                if body.get("stream"):
                    resp = await relay_stream(path, content, fwd, flight, target, headers, release)
                    handed_off = isinstance(resp, RelayedStream)
                    return resp
                client = flight.replica.client
                task = asyncio.ensure_future(client.post(path, content=content, headers=fwd))
                flight.task = task
                if flight.cut_reason:
                    task.cancel()
                try:
                    r = await task
                except asyncio.CancelledError:
                    if flight.cut_reason:
                        return JSONResponse(cut_error(flight), status_code=503, headers=headers)
                    raise
                except httpx.HTTPError as e:
                    return err(502, f"vLLM did not answer ({type(e).__name__})", "upstream_error", headers=headers)
                with self._cond:  # either the switch's cut is seen here, or the switch waits for this send
                    cut = flight.cut_reason
                    flight.committed = cut is None
                if cut:
                    return JSONResponse(cut_error(flight), status_code=503, headers=headers)
                if r.status_code != 200:
                    return await upstream_error(r, target, flight, r.content, headers)
                try:
                    payload = r.json()
                except ValueError:
                    return err(502, f"vLLM answered {r.status_code} with a non-JSON body", "upstream_error",
                               headers=headers)
                usage = payload.get("usage") if isinstance(payload, dict) else None
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    self.metrics.generated(flight.shard, flight.depth, usage["completion_tokens"])
                handed_off = True

                def answered():  # after the whole answer was sent (or its send failed: then nothing was given)
                    if resp.completed:
                        flight.sent, flight.last_sent = 1, time.time()
                    release()

                resp = Relayed(payload, status_code=r.status_code, headers=headers, on_done=answered)
                return resp
            finally:
                if not handed_off:
                    release()

        async def sse_events(r):
            buf = b""
            async for chunk in r.aiter_raw():
                buf += chunk
                while True:
                    i = buf.find(b"\n\n")
                    if i < 0:
                        break
                    yield buf[:i + 2]
                    buf = buf[i + 2:]
            if buf:
                yield buf

        async def relay_stream(path, content, fwd, flight, target, headers, release):
            async def open_stream():
                client = flight.replica.client
                return await client.send(client.build_request("POST", path, content=content, headers=fwd),
                                         stream=True)

            task = asyncio.ensure_future(open_stream())
            flight.task = task
            if flight.cut_reason:
                task.cancel()
            try:
                r = await task
            except asyncio.CancelledError:
                if flight.cut_reason:
                    return JSONResponse(cut_error(flight), status_code=503, headers=headers)
                raise
            except httpx.HTTPError as e:
                return err(502, f"vLLM did not answer ({type(e).__name__})", "upstream_error", headers=headers)
            events = sse_events(r)
            if r.status_code != 200:  # the real status, before any stream starts
                try:
                    data = await r.aread()
                finally:
                    await r.aclose()
                return await upstream_error(r, target, flight, data[:65536], headers)
            peek = asyncio.ensure_future(events.__anext__())  # an error in the first event: its status, no stream
            flight.task = peek
            if flight.cut_reason:
                peek.cancel()
            try:
                first = await peek
            except StopAsyncIteration:
                first = b""
            except asyncio.CancelledError:
                await r.aclose()
                if flight.cut_reason:
                    return JSONResponse(cut_error(flight), status_code=503, headers=headers)
                raise
            except httpx.HTTPError as e:
                await r.aclose()
                return err(502, f"vLLM stream failed ({type(e).__name__})", "upstream_error", headers=headers)
            if first.startswith(b"data: {") and b'"error"' in first[:64]:
                try:
                    e = json.loads(first[6:])
                    code = (e.get("error") or {}).get("code")
                    status = code if isinstance(code, int) and 400 <= code < 600 else 400
                    await r.aclose()
                    return JSONResponse(e, status_code=status, headers=headers)
                except (ValueError, AttributeError):
                    pass
            q: asyncio.Queue = asyncio.Queue()

            async def produce():
                try:
                    async for ev in events:
                        q.put_nowait(ev)
                    q.put_nowait(_END)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001
                    q.put_nowait(_StreamFailed(type(e).__name__))
                finally:
                    await r.aclose()

            producer = asyncio.ensure_future(produce())
            flight.queue = q
            flight.task = producer
            if flight.cut_reason:
                producer.cancel()

            async def gen():
                pending = [first] if first else []
                while True:
                    if flight.cut_reason:
                        break
                    item = pending.pop() if pending else await q.get()
                    if flight.cut_reason:
                        break
                    if item is _END:
                        return
                    if isinstance(item, _StreamFailed):
                        yield ("data: " + json.dumps({"error": {"message": f"vLLM stream failed ({item.what})",
                                                                "type": "upstream_error", "code": 502}})
                               + "\n\n").encode()
                        return
                    if item is _CUT:
                        continue
                    if item.startswith(b"data: {") and b'"error"' not in item[:64]:
                        self.metrics.generated(flight.shard, flight.depth, 1)
                    yield item
                    # The send of ``item`` has completed: a switch that reads these after ``stopped`` sees every
                    # event this client was given, none after (the audit of cut streams reads them).
                    flight.sent += 1
                    flight.last_sent = time.time()
                # Cut: everything yielded so far has been handed to the client; nothing more from this adapter.
                flight.stopped.set()
                yield ("data: " + json.dumps(cut_error(flight)) + "\n\n").encode()

            def done():
                if not producer.done():
                    producer.cancel()
                release()

            return RelayedStream(gen(), media_type="text/event-stream", headers=headers, on_done=done)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await proxy(request, "/v1/completions")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await proxy(request, "/v1/chat/completions")

        @app.get("/v1/models")
        async def models():
            with self._cond:
                names = [self.run.config.name] + [e["name"] for s, e in sorted(self.routing.items())
                                                  if e and s not in self._quarantined]
            return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "s3t"} for n in names]}

        @app.get("/health")
        async def health():
            """The gateway's view as of the last integrity check (after every switch, every check_interval s):
            a shard is unhealthy when its adapter is not in the engine's list or vLLM's model list, or the
            digest of the engine's LoRA tensors differs from the adapter file."""
            with self._cond:
                rows = []
                for s, e in sorted(self.routing.items()):
                    h = self.shard_health.get(s, {})
                    ok = bool(e) and s not in self._quarantined and h.get("healthy", True)
                    rows.append({"shard": s, "adapter": e and e["name"], "healthy": ok,
                                 "reason": None if ok else (h.get("reason") or ("out of service" if e else
                                                                                "no surviving prefix"))})
            unhealthy = [r["shard"] for r in rows if r["adapter"] and not r["healthy"]]
            return {"status": "degraded" if unhealthy else "ok", "live_shards": self.live_shards(),
                    "unhealthy_shards": unhealthy, "shards": rows, "checked_at": self.integrity["last_check"]}

        @app.post("/s3t/replicas")
        async def add_replica(request: Request):
            """Attach a vLLM server started elsewhere at run time (token): ``{"url": ..., "admin_token": ...}``.
            It is checked like ``--upstream`` and reconciled to the current routing before its first request."""
            ok = bearer(request)
            if not ok:
                return err(401 if ok is None else 403, "this endpoint needs the deletion token", "Unauthorized")
            body, bad = await read_json(request)
            if bad is not None:
                return bad
            if not isinstance(body, dict) or not isinstance(body.get("url"), str) or \
                    not isinstance(body.get("admin_token"), str) or not body["url"].startswith(("http://", "https://")):
                return err(400, 'body must be {"url": "http://host:port", "admin_token": "..."}')
            try:
                r = await asyncio.to_thread(self.add_upstream, body["url"], body["admin_token"])
            except ServingError as e:
                return err(400, str(e), "UpstreamRefused")
            return {"replica": r.index, "receives_traffic": r.fenced is None, "reason": r.fenced}

        @app.get("/metrics")
        async def metrics():
            """Prometheus text format; no token (counts per shard and depth only: see s3t_llm/metrics.py)."""
            from fastapi.responses import Response

            from .metrics import CONTENT_TYPE

            return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE)

        @app.get("/s3t/state")
        async def state(request: Request):
            ok = bearer(request)
            if ok is False:
                return err(403, "wrong token", "Forbidden")
            return await asyncio.to_thread(self.state, bool(ok))

        @app.get("/s3t/served")
        async def served_now(request: Request):
            """What is really served (routing + the engine's own adapter list): for `s3t verify`. Token only."""
            ok = bearer(request)
            if not ok:
                return err(401 if ok is None else 403, "this endpoint needs the deletion token", "Unauthorized")
            return await asyncio.to_thread(self.served)

        @app.post("/s3t/delete")
        async def delete(request: Request):
            ok = bearer(request)
            if ok is None:
                return err(401, "missing bearer token (Authorization: Bearer <token> from serve.json)", "Unauthorized")
            if not ok:
                return err(403, "wrong token", "Forbidden")
            body, bad = await read_json(request)
            if bad is not None:
                return bad
            if not isinstance(body, dict) or "ids" not in body:
                return err(400, "body must be {\"ids\": [sample ids], \"request_id\": optional}")
            if body.get("request_id") is not None and not isinstance(body["request_id"], str):
                return err(400, "'request_id' must be a string")
            from .ledger import LedgerError
            from .records import RecordError, load_sample_ids

            import uuid

            rid = body.get("request_id") or uuid.uuid4().hex  # chosen before journaling: a failure can be traced

            def journaled() -> bool:
                try:
                    with self.run.ledger() as led:
                        return led.request(rid).status != "applied"
                except LedgerError:
                    return False

            try:
                ids = load_sample_ids(body["ids"]) if isinstance(body["ids"], list) else None
                if ids is None:
                    return err(400, "'ids' must be a list of sample ids")
                cert = await asyncio.to_thread(self.delete, ids, rid)
            except Exception as e:  # noqa: BLE001 - every failure gets a truthful answer
                short = f"{type(e).__name__}: {str(e)[:300]}"
                if await asyncio.to_thread(journaled):
                    self.metrics.deletion("pending")
                    return err(503, f"request {rid} is journaled (its samples are deleted in the ledger) but not yet "
                                    f"applied ({short}); it completes on a retry with the same request_id, with the "
                                    "next deletion, or when the server restarts", "deletion_pending")
                if isinstance(e, (LedgerError, RecordError)):
                    self.metrics.deletion("rejected")
                    return err(400, str(e)[:500], "InvalidDeletion")
                self.metrics.deletion("failed")
                logger.exception("deletion %s failed before it was journaled", rid)
                return err(503, f"deletion failed before it was journaled ({short}); nothing changed", "deletion_failed")
            self.metrics.deletion("noop" if cert["noop"] else "applied",
                                  None if cert["noop"] else cert["deletion_to_effect_seconds"])
            return {"request_id": cert["request_id"], "noop": cert["noop"],
                    "newly_deleted": len(cert["newly_deleted"]), "served_changes": cert["served_changes"],
                    "dead_shards": cert["dead_shards"], "deletion_to_effect_seconds": cert["deletion_to_effect_seconds"],
                    "certificate": str(Path(self.run.dir) / "certificates" / f"{cert['request_id']}.json"),
                    "switch_report": cert["switch_report"], "steps": cert.get("steps"),
                    "acknowledged_at": time.time()}  # no cut relay's last_event_at is later than this

        @app.on_event("startup")
        async def _start():
            self.start_monitor()

        @app.on_event("shutdown")
        async def _close():
            self.stop_monitor()
            for r in self.replicas:
                if r.client is not None:
                    await r.client.aclose()

        return app


def spawn_server(run_dir: str | Path, port: int, *, echo=print, timeout: float = 600, env: dict | None = None,
                 log_name: str = "serve.log"):
    """Start ``s3t serve RUN`` in a subprocess and wait until its gateway answers.

    Returns (process, gateway url, deletion token, vLLM url). Output goes to ``RUN/<log_name>``; ``env`` adds
    environment variables for the server."""
    run_dir = Path(run_dir)
    log = open(run_dir / log_name, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "s3t_llm.cli", "serve", str(run_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    url = f"http://127.0.0.1:{port}"
    last = [0.0]

    def progress(elapsed: float) -> None:
        if elapsed - last[0] >= 15:
            last[0] = elapsed
            echo(f"  waiting for vLLM + gateway ... {elapsed:.0f} s")

    try:
        elapsed = wait_for_health(proc, url, timeout=timeout, what="s3t serve", log=run_dir / log_name,
                                  progress=progress)
    except ServingError:
        proc.kill()
        raise
    info = json.loads((run_dir / SERVE_FILE).read_text())
    echo(f"  gateway ready at {url} after {elapsed:.0f} s")
    return proc, url, info["token"], info["vllm_url"]


def stop_server(proc: subprocess.Popen, timeout: float = 90) -> None:
    """Stop a server started by :func:`spawn_server` as Ctrl-C would (vLLM stops with it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def vllm_command_for(run_dir: str | Path, host: str = "0.0.0.0", port: int = 8001, admin_token: str | None = None) -> str:
    """The command line (with its environment) a vLLM server started elsewhere needs to be attached to this
    run's gateway with ``--upstream``: same base model and LoRA settings, the S3T worker extension and middleware,
    and the admin secret. The run's adapter directory must be mounted at the same path on that machine."""
    import shlex

    run = Run.open(run_dir)
    m = run.shards
    srv = VLLMServer(run.model_path, max_loras=max(2 * m, 2), max_lora_rank=run.config.lora.r,
                     max_model_len=max(512, run.config.data.max_length * 2), port=port, uds=False)
    srv.client.close()
    env = {"S3T_ADMIN_TOKEN": admin_token or "<secret>", "VLLM_SERVER_DEV_MODE": "1",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if "--enforce-eager" in srv.command(host=host, port=port):  # vllm-cpu (no CUDA here): as local replicas run
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = ["python"] + srv.command(host=host, port=port)[1:]
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + " ".join(shlex.quote(c) for c in cmd)


def replica_envs(n: int) -> list[dict]:
    """Per replica: its GPU (``CUDA_VISIBLE_DEVICES``) on a GPU machine with at least ``n`` GPUs, else a disjoint
    set of this process's cores (``VLLM_CPU_OMP_THREADS_BIND``)."""
    if n < 1:
        raise ValueError(f"replicas must be at least 1 (got {n})")
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if n == 1:
        return [{}]  # as before: whatever CUDA_VISIBLE_DEVICES / core mask the user gave
    if gpus:
        if gpus < n:
            raise ServingError(f"{n} replicas need {n} GPUs; this machine has {gpus}")
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        devices = visible[:n] if len(visible) >= n else [str(i) for i in range(n)]
        return [{"CUDA_VISIBLE_DEVICES": d} for d in devices]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        raise ServingError(f"{n} CPU replicas need at least {n} cores; this process may use {len(cpus)}")
    per = len(cpus) // n
    return [{"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus[i * per:(i + 1) * per]))} for i in range(n)]


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, vllm_port: int | None = None,
          dead_shard: str = "none", retrain: bool = False, token: str | None = None,
          ready_callback=None, replicas: int = 1, upstreams: list[str] | None = None,
          admin_token: str | None = None, ray: str | None = None) -> None:
    """``s3t serve``: start vLLM, recover pending deletions, load adapters, run the gateway until Ctrl-C.

    ``ray``: with ``retrain``, retrain dead shards on Ray at this address ("local": a local instance); None: as
    the run's ``ray:`` section says (``ray.enabled``), else in this process."""
    import uvicorn

    from .deletion import recover
    from .locking import acquire

    if vllm_port is not None and replicas != 1:
        raise ServingError("--vllm-port serves one replica on a TCP port; use it with --replicas 1")
    if upstreams:
        if replicas != 1 or vllm_port is not None:
            raise ServingError("--upstream attaches vLLM servers started elsewhere; it does not combine with "
                               "--replicas or --vllm-port")
        admin_token = admin_token or os.environ.get("S3T_ADMIN_TOKEN")
        if not admin_token:
            raise ServingError("--upstream needs the admin secret those vLLM servers were started with "
                               "(--upstream-token or S3T_ADMIN_TOKEN); see --print-vllm-command")
    envs = replica_envs(replicas) if not upstreams else []
    run = Run.open(run_dir)
    retrain_ray = None
    if ray is not None and not retrain:
        raise ServingError("--ray chooses where --retrain trains; give --retrain too")
    if retrain and (ray is not None or run.config.ray.enabled):
        from .distributed import ray_options

        retrain_ray = ray_options(run.config.ray, address=ray)
    # One gateway per run: while this lock is held, `delete --offline`, `train` and `unlearn` refuse.
    run_lock = acquire(run.dir, "serve", url=f"http://{host}:{port}")
    m = run.shards
    if upstreams:
        servers = [VLLMServer.attach(u, run.model_path, admin_token=admin_token, max_loras=max(2 * m, 2),
                                     max_lora_rank=run.config.lora.r,
                                     max_model_len=max(512, run.config.data.max_length * 2)) for u in upstreams]
        try:
            for srv in servers:
                srv.check_upstream()
        except ServingError:
            run_lock.release()
            raise
    else:
        servers = [VLLMServer(run.model_path, max_loras=max(2 * m, 2), max_lora_rank=run.config.lora.r,
                              port=vllm_port, max_model_len=max(512, run.config.data.max_length * 2),
                              log_file=run.dir / ("vllm.log" if replicas == 1 else f"vllm-{i}.log"), env=envs[i])
                   for i in range(replicas)]
    server = servers[0]
    gw = Gateway(run, servers, token=token, dead_shard=dead_shard, retrain=retrain, local_replicas=not upstreams,
                 retrain_ray=retrain_ray)
    serve_file = run.dir / SERVE_FILE
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        if vllm_port is not None:
            print("[s3t] WARNING: --vllm-port puts vLLM's admin surface on a TCP port every local user can reach; "
                  "without it vLLM listens on a private Unix socket", flush=True)
        for i, srv in enumerate(servers):
            bind = " ".join(f"{k}={v}" for k, v in srv.env.items())
            print(f"[s3t] starting vLLM replica {i} on {srv.uds or srv.url} {bind} (log: {srv.log_file})", flush=True)
        last = [0.0]

        def progress(elapsed):
            if elapsed - last[0] >= 10:
                last[0] = elapsed
                print(f"[s3t] waiting for vLLM ... {elapsed:.0f} s", flush=True)

        for srv in servers:  # launched from this (the main) thread: see _die_with_parent
            if not upstreams:
                srv.launch()
        for i, srv in enumerate(servers):  # they boot in parallel
            if not upstreams:
                srv.wait_ready(progress=progress if i == 0 else None)
        # Finish journaled requests before anything is served: each reconciles with the ledger as it is now
        # (a stored plan is never replayed) and certifies what this engine really serves afterwards.
        done = recover(run, backend=gw)
        if done:
            print(f"[s3t] finished {len(done)} interrupted deletion request(s): "
                  f"{[c['request_id'] for c in done]}", flush=True)
        report = gw.refresh("start-up")
        for s, e in sorted(gw.routing.items()):
            print(f"[s3t] shard {s}: " + (f"{e['name']} (blocks 1..{e['depth']}, engine id {server.ids[e['name']]})"
                                          if e else "no surviving prefix: needs retraining"), flush=True)
        if retrain and any(e is None for e in gw.routing.values()):
            gw.start_retrain()
        url = f"http://{host}:{port}"
        tmp = serve_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "token": gw.token, "pid": os.getpid(), "vllm_socket": server.uds,
                       "replicas": [{"replica": i, "vllm_socket": srv.uds, "env": srv.env} for i, srv in enumerate(servers)],
                       "vllm_url": None if server.uds else server.url,
                       "started_at": time.time(), "adapters": report["loaded"]}, f, indent=2)
        os.replace(tmp, serve_file)
        config = uvicorn.Config(gw.app(), host=host, port=port, log_level="warning")
        userver = uvicorn.Server(config)
        print(f"[s3t] ready: gateway {url} (model '{run.config.name}'), deletion token in {serve_file}", flush=True)
        gw.start_supervisor()  # restarts a replica whose process dies, reconciles fenced ones
        if ready_callback:
            ready_callback(gw)
        userver.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        print("[s3t] stopping vLLM", flush=True)
        gw.stop_monitor()
        for srv in servers:
            if upstreams:
                srv.client.close()  # attached: started (and stopped) by its owner
            else:
                srv.stop()
        if serve_file.exists():
            serve_file.unlink()
        run_lock.release()
