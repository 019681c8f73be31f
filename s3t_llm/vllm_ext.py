"""vLLM-side pieces of the S3T gateway: a worker extension (engine-level LoRA operations and digests over
vLLM's dev RPC endpoint) and an ASGI middleware in vLLM's API server (request flights, for cutting).

Worker extension (``--worker-extension-cls s3t_llm.vllm_ext.S3TWorkerExtension``):
vLLM's ``/v1/unload_lora_adapter`` only forgets the adapter's name in the API front end (vLLM 0.32:
``OpenAIServingModels.unload_lora_adapter`` never calls the engine); the weights stay in the worker's
LoRA cache (vLLM issues 42633, 54839). The deletion module must remove them from the engine itself and
prove it with the engine's own list. ``/collective_rpc`` passes string arguments only, hence these
small wrappers. ``s3t_lora_digests`` reads back the LoRA tensors a worker holds for each adapter id and
digests them in the canonical form of :func:`canonical_digest`, which :func:`adapter_file_digest` computes
from an adapter's safetensors file: the gateway compares the two to detect weights that changed under a
served name.

Middleware (``--middleware s3t_llm.vllm_ext.S3TMiddleware``): the gateway tags every request it relays with
``X-S3T-Flight: <id>``. ``POST /s3t/flights {"cut": [ids]}`` marks flights as cut (a cut flight that arrives
later is refused with 503 before it reaches the engine) and answers which of them are still inside vLLM
(its HTTP handler has not returned) and how many requests per LoRA name vLLM's output processor still
tracks. When both are empty for a retired adapter, vLLM has sent the abort of every request on it to the
engine core, ahead of any later RPC on the same channel: removing the adapter after that point cannot be
undone by a running request reloading it from its path.

A cut does not wait for vLLM to notice that the gateway closed the connection (for a stream, vLLM's server
only notices when it next sends; under load that took up to ~16 s). The middleware acts on the cut itself:
- a request whose response has not started (non-streaming, or a stream not yet begun): the request's
  ``receive`` channel delivers ``http.disconnect`` at once, which is what vLLM's ``with_cancellation`` waits
  for: it cancels its handler, and ``AsyncLLM.generate`` aborts the request in the engine on CancelledError.
  (Cancelling the handler from outside would not do: ``with_cancellation`` runs the real handler in a task of
  its own, which a cancelled wrapper leaves running.)
- a stream in progress: its task is cancelled; the stream's generator gets CancelledError and vLLM aborts.
- either way, nothing more is sent for the flight (``send`` raises OSError, which is how ASGI servers report
  a closed connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time

_LAYER = re.compile(r"layers\.(\d+)\.")
DIGEST_VERSION = "s3t-lora-digest-1"


def _layer(name: str) -> int:
    m = _LAYER.search(name or "")
    return int(m.group(1)) if m else -1


def _tensor_hash(t) -> str:
    import torch

    t = t.detach().to("cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def canonical_digest(items) -> str:
    """Digest of LoRA weights given as (layer index, lora_A [r, in], effective lora_B [out, r]) triples, where
    the effective B already carries the LoRA scaling. Independent of module naming (vLLM packs q/k/v and
    gate/up) and of order; values are hashed as float32 (exact for bf16/fp16 values)."""
    parts = sorted(f"{layer}:{_tensor_hash(a)}:{_tensor_hash(b)}" for layer, a, b in items)
    return hashlib.sha256((DIGEST_VERSION + "\n" + "\n".join(parts)).encode()).hexdigest()


def adapter_file_digest(adapter_dir, dtype: str = "bfloat16") -> str:
    """The digest vLLM's worker will report for the PEFT adapter in ``adapter_dir`` loaded in ``dtype``:
    tensors cast to ``dtype`` as vLLM does, lora_B multiplied by the scaling (alpha/r, or alpha/sqrt(r) with
    rsLoRA) in that dtype, as vLLM's ``LoRALayerWeights.optimize`` does."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    dt = getattr(torch, dtype)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    mods: dict[str, dict] = {}
    for k, t in tensors.items():
        m = re.match(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m:
            mods.setdefault(m.group(1), {})[m.group(2)] = t
    items = []
    for name, ab in mods.items():
        if "A" not in ab or "B" not in ab:
            continue
        a = ab["A"].to(dtype=dt)
        b = ab["B"].to(dtype=dt)
        if scaling != 1:
            b = b * scaling
        items.append((_layer(name), a, b))
    return canonical_digest(items)


class S3TWorkerExtension:
    def s3t_list_loras(self) -> list[int]:
        return sorted(int(i) for i in self.list_loras())

    def s3t_remove_lora(self, lora_id: str) -> list[int]:
        """Remove an adapter from this worker; returns the ids it still holds afterwards (one round trip)."""
        self.remove_lora(int(lora_id))
        return sorted(int(i) for i in self.list_loras())

    def s3t_lora_digests_new(self, *known: str) -> dict:
        """{"ids": every adapter id this worker holds, "digests": the digests of those NOT in ``known``} in one
        round trip: what a load needs to identify the new id without hashing every adapter again."""
        ids = sorted(int(i) for i in self.list_loras())
        skip = {int(i) for i in known}
        new = [str(i) for i in ids if i not in skip]
        return {"ids": ids, "digests": self.s3t_lora_digests(*new) if new else {}}

    def s3t_lora_digests(self, *ids: str) -> dict:
        """{adapter id: {"digest", "dtype", "modules"}} for the adapters this worker holds (or only ``ids``)."""
        mgr = self.model_runner.lora_manager._adapter_manager
        models = mgr.list_adapters()
        want = {int(i) for i in ids} if ids else None
        out = {}
        for lid, model in models.items():
            if want is not None and int(lid) not in want:
                continue
            items, dtype = [], None
            for name, w in model.loras.items():
                la, lb = w.lora_a, w.lora_b
                scal = w.scaling
                if isinstance(la, (list, tuple)):  # packed (qkv_proj, gate_up_proj): one entry per projection
                    subs = zip(la, lb, scal if isinstance(scal, (list, tuple)) else [scal] * len(la))
                else:
                    subs = [(la, lb, scal)]
                for a, b, s in subs:
                    if a is None or b is None:
                        continue
                    dtype = dtype or str(a.dtype).replace("torch.", "")
                    items.append((_layer(name), a, b if s in (None, 1) else b * s))
            out[str(int(lid))] = {"digest": canonical_digest(items), "dtype": dtype, "modules": len(items)}
        return out


# ----- middleware in vLLM's API server --------------------------------------------------------------------
_CUT: dict[str, float] = {}  # flight id -> when it was cut (refused if it arrives later)
_ACTIVE: dict[str, int] = {}  # flight id -> HTTP calls of it still inside vLLM
_LIVE: dict[str, list] = {}  # flight id -> the _Call objects of its HTTP calls inside vLLM
_CUT_TTL = 600.0


def _lora_requests(app) -> dict | None:
    try:
        states = app.state.engine_client.output_processor.request_states
    except AttributeError:
        return None
    counts: dict[str, int] = {}
    for st in list(states.values()):
        name = getattr(st, "lora_name", None)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


async def _json_reply(send, status: int, obj) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_CUT_REPLY = {"error": {"message": "request was cut by the S3T gateway", "type": "deletion_in_progress", "code": 503}}


class _Call:
    """One HTTP call of a flight inside vLLM: its ASGI channels, wrapped so that a cut takes effect at once."""

    def __init__(self, receive, send):
        self._receive, self._send = receive, send
        self.task = None
        self.started = False  # the response has started (a stream in progress)
        self.is_cut = False
        self._cut = asyncio.Event()

    def cut(self) -> None:
        self.is_cut = True
        self._cut.set()  # a pending receive() answers http.disconnect (vLLM's with_cancellation aborts)
        if self.started and self.task is not None and not self.task.done():
            self.task.cancel()  # a stream in progress: its generator gets CancelledError, vLLM aborts

    async def receive(self):
        if self.is_cut:
            return {"type": "http.disconnect"}
        recv = asyncio.ensure_future(self._receive())
        stop = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            recv.cancel()  # this receive was itself cancelled (e.g. by with_cancellation): leave no task behind
            raise
        finally:
            stop.cancel()
        if recv in done:
            return recv.result()
        recv.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if self.is_cut:
            raise OSError("request was cut by the S3T gateway")
        if message.get("type") == "http.response.start":
            self.started = True
        await self._send(message)


ADMIN_HEADER = b"x-s3t-admin"
ADMIN_ENV = "S3T_ADMIN_TOKEN"


class S3TMiddleware:
    """See the module docstring. With ``S3T_ADMIN_TOKEN`` set in vLLM's environment (a vLLM reachable over
    TCP, attached with ``s3t serve --upstream``), every path but ``/health`` needs the header
    ``X-S3T-Admin: <token>``: vLLM's own ``--api-key`` guards only ``/v1``-style paths, not the LoRA
    load/unload endpoints' siblings ``/collective_rpc``, ``/reset_prefix_cache`` or the dev endpoints."""

    def __init__(self, app):
        import os

        self.app = app
        tok = os.environ.get(ADMIN_ENV)
        self.admin = tok.encode() if tok else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.admin is not None and scope["path"] != "/health":
            import hmac

            got = next((v for k, v in scope.get("headers", []) if k == ADMIN_HEADER), b"")
            if not hmac.compare_digest(got, self.admin):
                return await _json_reply(send, 403, {"error": {"message": "this vLLM serves an S3T gateway only "
                                                                          "(X-S3T-Admin header missing or wrong)",
                                                               "type": "Forbidden", "code": 403}})
        if scope["path"] == "/s3t/flights":
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            now = time.time()
            try:
                cut = json.loads(body or b"{}").get("cut", [])
            except (ValueError, AttributeError):
                cut = []
            for fid in cut:
                _CUT[str(fid)] = now
                for call in list(_LIVE.get(str(fid), ())):
                    call.cut()
            for fid, t in list(_CUT.items()):
                if now - t > _CUT_TTL:
                    _CUT.pop(fid, None)
            app = scope.get("app")
            return await _json_reply(send, 200, {"active": sorted(f for f, n in _ACTIVE.items() if n > 0),
                                                 "lora_requests": _lora_requests(app) if app is not None else None})
        fid = None
        for k, v in scope.get("headers", []):
            if k == b"x-s3t-flight":
                fid = v.decode("latin-1")
                break
        if fid is None:
            return await self.app(scope, receive, send)
        if fid in _CUT:
            return await _json_reply(send, 503, _CUT_REPLY)
        _ACTIVE[fid] = _ACTIVE.get(fid, 0) + 1
        call = _Call(receive, send)
        call.task = asyncio.ensure_future(self.app(scope, call.receive, call.send))
        _LIVE.setdefault(fid, []).append(call)
        try:
            return await call.task
        except (asyncio.CancelledError, Exception):
            me = asyncio.current_task()
            if not call.is_cut or (me is not None and me.cancelling()):
                raise  # not our cut: a real error, or the server itself is cancelling this request
            if not call.started:
                try:
                    await _json_reply(send, 503, _CUT_REPLY)
                except OSError:  # the gateway has closed the connection already
                    pass
            # A cut stream simply ends here: the gateway has stopped relaying it already.
        finally:
            calls = _LIVE.get(fid)
            if calls is not None:
                calls.remove(call)
                if not calls:
                    del _LIVE[fid]
            _ACTIVE[fid] -= 1
            if _ACTIVE[fid] <= 0:
                del _ACTIVE[fid]
