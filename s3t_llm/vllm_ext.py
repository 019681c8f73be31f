"""A vLLM worker extension: engine-level LoRA bookkeeping reachable over vLLM's dev RPC endpoint.

vLLM's ``/v1/unload_lora_adapter`` only forgets the adapter's name in the API front end (vLLM 0.32:
``OpenAIServingModels.unload_lora_adapter`` never calls the engine); the weights stay in the worker's
LoRA cache (vLLM issues 42633, 54839). The deletion module must remove them from the engine itself and
prove it with the engine's own list. ``/collective_rpc`` passes string arguments only, hence these
small wrappers. Loaded with ``--worker-extension-cls s3t_llm.vllm_ext.S3TWorkerExtension``.
"""


class S3TWorkerExtension:
    def s3t_list_loras(self) -> list[int]:
        return sorted(int(i) for i in self.list_loras())

    def s3t_remove_lora(self, lora_id: str) -> bool:
        return bool(self.remove_lora(int(lora_id)))
