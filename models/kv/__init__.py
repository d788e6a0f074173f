"""KV stores: where attention keys and values live between forward passes (see store.py)."""
