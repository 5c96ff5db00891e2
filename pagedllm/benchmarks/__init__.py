"""`pagedllm bench`: offline throughput, single-request latency, serving load, and the machine's limits."""
