"""Schemathesis hooks for the property-based run in test_openai_surface (loaded via SCHEMATHESIS_HOOKS).

- Generated model names are random strings, which would stop almost every request at the router's 404; where the
  generated `model` is a string, it becomes one of the served models (RAYROUTE_FUZZ_CHAT_MODELS for the generating
  routes, RAYROUTE_FUZZ_EMBEDDING_MODELS for embeddings), so the rest of the body reaches vLLM.
- Generated requests that are valid would ask for thousands of tokens each; the run is about inputs, not about
  generation length, so valid token limits are capped (invalid ones are left for the router to reject).
"""

import os
import zlib

import schemathesis

# The generating routes and the fields that bound their output.
TOKEN_LIMITS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"), "/v1/completions": ("max_tokens",),
                "/v1/responses": ("max_output_tokens",)}
TOKEN_CAP = 8


def _models(variable: str) -> list[str]:
    return [name for name in os.environ.get(variable, "").split(",") if name]


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    path = context.operation.path
    models = _models("RAYROUTE_FUZZ_EMBEDDING_MODELS" if path == "/v1/embeddings" else "RAYROUTE_FUZZ_CHAT_MODELS")
    if models and isinstance(body.get("model"), str):
        body["model"] = models[zlib.crc32(body["model"].encode()) % len(models)]
    if path in TOKEN_LIMITS:
        for key in TOKEN_LIMITS[path]:
            value = body.get(key)
            if value is None or (type(value) is int and value > TOKEN_CAP):
                body[key] = TOKEN_CAP
    return body


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    models = _models("RAYROUTE_FUZZ_CHAT_MODELS")
    if models and path_parameters and isinstance(path_parameters.get("model_id"), str):
        path_parameters["model_id"] = models[zlib.crc32(path_parameters["model_id"].encode()) % len(models)]
    return path_parameters
