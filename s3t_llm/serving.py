"""Serving: a real vLLM OpenAI-compatible server with multi-LoRA, behind the S3T gateway.

``VLLMServer`` runs ``python -m vllm.entrypoints.openai.api_server`` on the run's base model (loopback
only) with runtime LoRA updating, vLLM's dev endpoints (``/collective_rpc``, ``/reset_prefix_cache``) and
our worker extension (``s3t_llm.vllm_ext``) so that adapters can be removed from the ENGINE, not only
from the API front end, and the engine's own adapter list can be read back as proof.

``Gateway`` is the OpenAI-compatible front door users talk to:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``"model": "<run name>"`` is routed to one live
  shard adapter; the policy is deterministic: shard = live_shards[sha256(prompt or messages) mod n_live]
  (the same prompt always goes to the same shard while the set of live shards is unchanged), or the
  shard named in the ``X-S3T-Shard`` header. A served adapter's own name is addressable directly; a name
  that is not served (any more) answers 404. Every response names its adapter (``model`` field and the
  ``X-S3T-Adapter`` header).
- ``GET /s3t/state``: shards, surviving prefixes, adapters served (with engine ids, and the engine's own
  list), deletions applied. ``GET /health``, ``GET /v1/models``.
- ``POST /s3t/delete`` ``{"ids": [...], "request_id": optional}`` with ``Authorization: Bearer <token>``.

Switching adapters (``apply_routing``): load the new adapter under a fresh name (vLLM gives it a fresh
integer id), switch the routing table, wait until requests in flight on the superseded adapters finish
(bounded by ``drain_timeout``), unload them in the front end, remove them from the engine by id, check
the engine's list no longer holds them, reset the prefix cache.
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
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """A vLLM OpenAI server subprocess on loopback."""

    def __init__(self, model_path: str, *, max_loras: int, max_lora_rank: int, port: int | None = None,
                 max_model_len: int = 1024, log_file: str | Path | None = None, extra_args: list[str] | None = None):
        self.model_path = model_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_loras = max_loras
        self.max_lora_rank = lora_rank_limit(max_lora_rank)
        self.max_model_len = max_model_len
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self.ids: dict[str, int] = {}  # adapter name -> engine integer id
        self._lock = threading.Lock()

    def command(self) -> list[str]:
        import torch

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
               "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank),
               "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(self.max_model_len),
               "--worker-extension-cls", "s3t_llm.vllm_ext.S3TWorkerExtension", "--disable-uvicorn-access-log"]
        if not torch.cuda.is_available():
            cmd += ["--dtype", "bfloat16", "--enforce-eager"]
        return cmd + self.extra_args

    def start(self, timeout: float = 600, progress=None) -> None:
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        # Own process group: Ctrl-C in the parent is handled by us, and stop() takes the whole tree down.
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        try:
            elapsed = wait_for_health(self.proc, self.url, timeout=timeout, what="vLLM", log=self.log_file,
                                      progress=progress)
        except ServingError:
            self.stop()
            raise
        logger.info("vLLM ready at %s after %.1f s", self.url, elapsed)

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

    def front_end_models(self) -> set[str]:
        r = self.client.get("/v1/models")
        r.raise_for_status()
        return {m["id"] for m in r.json()["data"]}

    def load(self, name: str, path: str) -> int:
        """Load an adapter under a NEW name; returns the engine id vLLM gave it."""
        check_adapter_name(name)
        with self._lock:
            if name in self.ids:
                raise ServingError(f"adapter {name} is already loaded; names are never reused")
            before = self.engine_loras()
            r = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            if r.status_code != 200:
                raise ServingError(f"vLLM could not load adapter {name}: {r.status_code} {r.text[:300]}")
            new = self.engine_loras() - before
            if len(new) != 1:
                raise ServingError(f"could not identify the engine id of adapter {name} (new ids: {sorted(new)})")
            self.ids[name] = new.pop()
            return self.ids[name]

    def remove(self, name: str) -> dict:
        """Unload from the front end AND remove from the engine; verify the engine no longer holds it."""
        with self._lock:
            lora_id = self.ids.pop(name)
            r = self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code != 200:
                raise ServingError(f"vLLM could not unload {name}: {r.status_code} {r.text[:300]}")
            # vLLM 0.32's unload only forgets the name; the weights stay in the worker until removed here.
            self._rpc("s3t_remove_lora", str(lora_id))
            engine = self.engine_loras()
            if lora_id in engine:
                raise ServingError(f"engine still holds adapter {name} (id {lora_id}) after removal")
            return {"name": name, "engine_id": lora_id, "engine_ids_after": sorted(engine)}

    def reset_prefix_cache(self) -> None:
        r = self.client.post("/reset_prefix_cache")
        if r.status_code != 200:
            raise ServingError(f"vLLM reset_prefix_cache failed: {r.status_code} {r.text[:200]}")


class Gateway:
    """Routing table + in-flight accounting + deletion API in front of a ``VLLMServer``."""

    def __init__(self, run: Run, server: VLLMServer, *, token: str | None = None, dead_shard: str = "none",
                 drain_timeout: float = 30.0, retrain: bool = False):
        if dead_shard not in ("none", "base"):
            raise ValueError(f"dead_shard={dead_shard!r}: use 'none' or 'base'")
        self.run = run
        self.server = server
        self.token = token or secrets.token_urlsafe(24)
        self.dead_shard = dead_shard
        self.drain_timeout = drain_timeout
        self.retrain = retrain
        self.routing: dict[int, dict | None] = {}
        self.inflight: dict[str, int] = {}
        self.retired: dict[str, str] = {}  # adapter name -> reason
        self._cond = threading.Condition()
        self._deletion_lock = threading.Lock()
        self.deletions: list[dict] = []
        self.retrain_thread: threading.Thread | None = None

    # ----- Backend protocol (used by the deletion module) -----------------------------------------
    def apply_routing(self, routing: dict[int, dict | None], reason: str) -> dict:
        t0 = time.perf_counter()
        old = dict(self.routing)
        new_names = {e["name"] for e in routing.values() if e}
        old_names = {e["name"] for e in old.values() if e}
        if old == routing and all(n in self.server.ids for n in new_names):
            # Nothing served changes: no engine round trips (they queue behind generation steps under load).
            return {"loaded": [], "removed": [], "engine_ids": sorted(self.server.ids.values()),
                    "switch_seconds": 0.0, "total_seconds": round(time.perf_counter() - t0, 4),
                    "prefix_cache_reset": False}
        loaded = []
        for e in routing.values():
            if e and e["name"] not in self.server.ids:
                loaded.append({"name": e["name"], "engine_id": self.server.load(e["name"], e["path"])})
        with self._cond:
            self.routing = dict(routing)
            for name in old_names - new_names:
                self.retired[name] = reason
        t_switched = time.perf_counter()
        removed = []
        for name in sorted(old_names - new_names):
            self._drain(name)
            removed.append(self.server.remove(name))
        if removed:
            self.server.reset_prefix_cache()
        # remove() verified each id against the engine's own list; report the engine's list once.
        engine = removed[-1]["engine_ids_after"] if removed else sorted(self.server.engine_loras())
        return {"loaded": loaded, "removed": removed, "engine_ids": sorted(engine),
                "switch_seconds": round(t_switched - t0, 4), "total_seconds": round(time.perf_counter() - t0, 4),
                "prefix_cache_reset": bool(removed)}

    def _drain(self, name: str) -> None:
        deadline = time.time() + self.drain_timeout
        with self._cond:
            while self.inflight.get(name, 0) > 0 and time.time() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.time()))
            if self.inflight.get(name, 0) > 0:
                logger.warning("%d requests still in flight on %s after %.0f s: they will fail",
                               self.inflight[name], name, self.drain_timeout)

    # ----- routing --------------------------------------------------------------------------------
    def live_shards(self) -> list[int]:
        return sorted(s for s, e in self.routing.items() if e)

    def route(self, model: str, body: dict, shard_header: str | None) -> tuple[str, int | None]:
        """Pick the vLLM model name for a request and count it in flight (under the routing lock, so a
        switch can never drain an adapter between the choice and the count); the caller must ``_exit``.
        Raises LookupError(msg) for unknown or retired models."""
        with self._cond:
            target, shard = self._route_locked(model, body, shard_header)
            self.inflight[target] = self.inflight.get(target, 0) + 1
            return target, shard

    def _route_locked(self, model: str, body: dict, shard_header: str | None) -> tuple[str, int | None]:
        if model == self.run.config.name:
            live = self.live_shards()
            if shard_header is not None:
                try:
                    shard = int(shard_header)
                except ValueError:
                    raise LookupError(f"X-S3T-Shard {shard_header!r} is not an integer") from None
                if shard not in self.routing:
                    raise LookupError(f"shard {shard} does not exist")
                entry = self.routing[shard]
                if entry is None:
                    if self.dead_shard == "base":
                        return self.server.model_path, shard
                    raise LookupError(f"shard {shard} has no surviving prefix (needs retraining)")
                return entry["name"], shard
            if not live:
                if self.dead_shard == "base":
                    return self.server.model_path, None
                raise LookupError("no shard of this run has a surviving prefix: every shard needs retraining")
            shard = route_shard(body.get("prompt", body.get("messages")), live)
            return self.routing[shard]["name"], shard
        for s, e in self.routing.items():
            if e and e["name"] == model:
                return model, s
        if model in self.retired:
            raise LookupError(f"adapter {model} was retired ({self.retired[model]})")
        raise LookupError(f"model {model!r} is not served; see GET /v1/models")

    def _exit(self, name: str) -> None:
        with self._cond:
            self.inflight[name] -= 1
            self._cond.notify_all()

    # ----- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        with self.run.ledger() as led:
            info = led.dataset(DATASET)
            applied = led.requests(DATASET, status="applied")
            pending = led.pending(DATASET)
        with self._cond:
            shards = []
            for s in range(self.run.shards):
                e = self.routing.get(s)
                shards.append({"shard": s, "adapter": e and e["name"], "prefix": e and e["prefix"],
                               "depth": e["depth"] if e else 0, "sequence": e and e["sequence"],
                               "sequence_prefixes": e and e["sequence_prefixes"], "needs_retraining": e is None,
                               "engine_id": e and self.server.ids.get(e["name"])})
            inflight = {k: v for k, v in self.inflight.items() if v}
        return {"run": self.run.config.name, "base_model": self.server.model_path, "samples": info.n_samples,
                "live_samples": info.n_live, "slices": self.run.config.s3t.slices, "sequences": self.run.sequences,
                "shards": shards, "adapters_loaded": dict(self.server.ids),
                "engine_adapter_ids": sorted(self.server.engine_loras()), "inflight": inflight,
                "deletions_applied": [{"request_id": r.request_id, "n_ids": len(r.sample_ids),
                                       "applied_at": r.applied_at} for r in applied],
                "deletions_pending": [r.request_id for r in pending],
                "retraining": bool(self.retrain_thread and self.retrain_thread.is_alive())}

    # ----- deletion + retraining ------------------------------------------------------------------
    def delete(self, ids: list[str], request_id: str | None = None) -> dict:
        from .deletion import apply_deletion

        with self._deletion_lock:
            cert = apply_deletion(self.run, ids, backend=self, request_id=request_id)
        self.deletions.append({"request_id": cert["request_id"], "changes": cert["served_changes"]})
        if self.retrain and cert["dead_shards"]:
            self.start_retrain()
        return cert

    def refresh(self, reason: str) -> dict:
        """Serve the current best prefixes (after start-up, recovery or retraining)."""
        from .deletion import publish

        with self._deletion_lock:
            return publish(self.run, self, reason)[1]

    def start_retrain(self) -> None:
        if self.retrain_thread and self.retrain_thread.is_alive():
            return

        def work():
            from .training import StaleStageError, train_run

            dead = [s for s, e in self.routing.items() if e is None]
            logger.info("retraining dead shards %s in the background", dead)
            try:
                train_run(self.run, shards=dead, progress=False)
                self.refresh("retrained")
            except StaleStageError as e:
                logger.warning("retraining interrupted by a deletion (%s); it will restart", e)
            except Exception:
                logger.exception("background retraining failed")

        self.retrain_thread = threading.Thread(target=work, name="s3t-retrain", daemon=True)
        self.retrain_thread.start()

    # ----- HTTP app -------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.background import BackgroundTask

        app = FastAPI(title="s3t gateway")
        client = httpx.AsyncClient(base_url=self.server.url, timeout=httpx.Timeout(600.0))

        def err(status: int, message: str, typ: str = "invalid_request_error"):
            return JSONResponse({"error": {"message": message, "type": typ, "code": status}}, status_code=status)

        async def proxy(request: Request, path: str):
            try:
                body = await request.json()
            except json.JSONDecodeError as e:
                return err(400, f"request body is not valid JSON: {e}")
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                return err(400, "request body must be a JSON object with a string 'model'")
            try:
                target, shard = self.route(body["model"], body, request.headers.get("x-s3t-shard"))
            except LookupError as e:
                return err(404, str(e).strip("'\""), "NotFoundError")
            body = dict(body, model=target)
            headers = {"X-S3T-Adapter": target, "X-S3T-Shard": "" if shard is None else str(shard)}
            released = []

            def release():  # exactly once, whichever of the paths below gets there first
                if not released:
                    released.append(True)
                    self._exit(target)

            if body.get("stream"):
                async def gen():
                    try:
                        async with client.stream("POST", path, json=body) as r:
                            async for chunk in r.aiter_raw():
                                yield chunk
                    finally:
                        release()
                # The background task also runs when the client goes away before the body starts.
                return StreamingResponse(gen(), media_type="text/event-stream", headers=headers,
                                         background=BackgroundTask(release))
            try:
                r = await client.post(path, json=body)
            except httpx.HTTPError as e:
                return err(502, f"vLLM did not answer: {e}", "upstream_error")
            finally:
                release()
            if r.status_code == 404 and target in self.retired:
                return err(503, f"adapter {target} was retired ({self.retired[target]}) while this request was "
                                "in flight; retry with the run name", "AdapterRetired")
            try:
                payload = r.json()
            except ValueError:
                return err(502, f"vLLM answered {r.status_code} with a non-JSON body: {r.text[:300]}", "upstream_error")
            return JSONResponse(payload, status_code=r.status_code, headers=headers)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await proxy(request, "/v1/completions")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await proxy(request, "/v1/chat/completions")

        @app.get("/v1/models")
        async def models():
            with self._cond:
                names = [self.run.config.name] + [e["name"] for _, e in sorted(self.routing.items()) if e]
            return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "s3t"} for n in names]}

        @app.get("/health")
        async def health():
            return {"status": "ok", "live_shards": self.live_shards()}

        @app.get("/s3t/state")
        async def state():
            return await asyncio.to_thread(self.state)

        @app.post("/s3t/delete")
        async def delete(request: Request):
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return err(401, "missing bearer token (Authorization: Bearer <token> from serve.json)", "Unauthorized")
            if not secrets.compare_digest(auth[7:], self.token):
                return err(403, "wrong token", "Forbidden")
            try:
                body = await request.json()
            except json.JSONDecodeError as e:
                return err(400, f"request body is not valid JSON: {e}")
            if not isinstance(body, dict) or "ids" not in body:
                return err(400, "body must be {\"ids\": [sample ids], \"request_id\": optional}")
            from .ledger import LedgerError
            from .records import RecordError, load_sample_ids

            try:
                ids = load_sample_ids(body["ids"]) if isinstance(body["ids"], list) else None
                if ids is None:
                    return err(400, "'ids' must be a list of sample ids")
                cert = await asyncio.to_thread(self.delete, ids, body.get("request_id"))
            except (LedgerError, RecordError) as e:
                return err(400, str(e), "InvalidDeletion")
            return {"request_id": cert["request_id"], "noop": cert["noop"],
                    "newly_deleted": len(cert["newly_deleted"]), "served_changes": cert["served_changes"],
                    "dead_shards": cert["dead_shards"], "deletion_to_effect_seconds": cert["deletion_to_effect_seconds"],
                    "certificate": str(Path(self.run.dir) / "certificates" / f"{cert['request_id']}.json"),
                    "switch_report": cert["switch_report"]}

        @app.on_event("shutdown")
        async def _close():
            await client.aclose()

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


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, vllm_port: int | None = None,
          dead_shard: str = "none", retrain: bool = False, token: str | None = None,
          ready_callback=None) -> None:
    """``s3t serve``: start vLLM, recover pending deletions, load adapters, run the gateway until Ctrl-C."""
    import uvicorn

    from .deletion import recover

    run = Run.open(run_dir)
    m = run.shards
    server = VLLMServer(run.model_path, max_loras=max(2 * m, 2), max_lora_rank=run.config.lora.r,
                        port=vllm_port, max_model_len=max(512, run.config.data.max_length * 2),
                        log_file=run.dir / "vllm.log")
    gw = Gateway(run, server, token=token, dead_shard=dead_shard, retrain=retrain)
    serve_file = run.dir / SERVE_FILE
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"[s3t] starting vLLM on {server.url} (log: {server.log_file})", flush=True)
        last = [0.0]

        def progress(elapsed):
            if elapsed - last[0] >= 10:
                last[0] = elapsed
                print(f"[s3t] waiting for vLLM ... {elapsed:.0f} s", flush=True)

        server.start(progress=progress)
        done = recover(run, backend=None)  # finish journaled requests before anything is served
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
            json.dump({"url": url, "token": gw.token, "pid": os.getpid(), "vllm_url": server.url,
                       "started_at": time.time(), "adapters": report["loaded"]}, f, indent=2)
        os.replace(tmp, serve_file)
        config = uvicorn.Config(gw.app(), host=host, port=port, log_level="warning")
        userver = uvicorn.Server(config)
        print(f"[s3t] ready: gateway {url} (model '{run.config.name}'), deletion token in {serve_file}", flush=True)
        if ready_callback:
            ready_callback(gw)
        userver.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        print("[s3t] stopping vLLM", flush=True)
        server.stop()
        if serve_file.exists():
            serve_file.unlink()
