"""Transport: the master's HTTP API (server) and the worker's HTTP client.
Vectors are opaque bytes here; the algorithm lives in flq.master/flq.worker."""
