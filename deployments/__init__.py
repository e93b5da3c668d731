"""Serving layers: the OpenAI-compatible HTTP app (`openai_api.build_app`) and its Ray Serve wrappers."""
