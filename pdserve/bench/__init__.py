"""Load generation and latency reporting against any OpenAI-compatible endpoint."""
