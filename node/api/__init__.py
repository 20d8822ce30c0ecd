"""The node's HTTP surface: the OpenAI-compatible API, explanations, admin and internal federation routes.

Laid out as vLLM's `entrypoints/openai/`: `protocol.py` holds the typed requests and responses,
one module per route family holds its routes, and `app.py` assembles them (see its table).
"""

from node.api.app import MAX_BODY_BYTES, create_app, create_serving_app

__all__ = ["MAX_BODY_BYTES", "create_app", "create_serving_app"]
