"""Guest networking: persisted address leases and per-guest network namespaces."""
