"""Disaggregated serving: the wire protocol, the router, prefill and decode workers, KV
transfer between them, and the clients."""
