"""Wire protocol, KV transfer, router and client for disaggregated serving."""
