"""Schemathesis hooks for the property-based run in test_openai_surface (loaded via SCHEMATHESIS_HOOKS).

Generated requests that are valid would otherwise ask for thousands of tokens each; the run is about inputs,
not about generation length, so valid token limits are capped (invalid ones are left for the router to reject).
"""

import schemathesis

GENERATING_PATHS = {"/v1/chat/completions", "/v1/completions"}
TOKEN_CAP = 8


@schemathesis.hook
def map_body(context, body):
    if context.operation.path in GENERATING_PATHS and isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is None or (type(value) is int and value > TOKEN_CAP):
                body[key] = TOKEN_CAP
    return body
