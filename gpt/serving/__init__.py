"""Serving: the continuous-batching engine (gpt.serving.engine) and its OpenAI-compatible HTTP app (gpt.serving.app).

The engine imports torch and no web framework; the app imports the engine (and FastAPI).
See docs/serving.md.
"""
