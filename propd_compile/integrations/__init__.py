"""ProPD inside other inference engines (vLLM), reusing the drafters, acceptance and latency models."""
