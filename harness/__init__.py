"""What tests and benchmarks share (not shipped): real TorchServe, Redis, nginx and Prometheus on
127.0.0.1 (servers.py), archives with the smoke config (archives.py), test files (files.py), and
the one-to-one matching of mask records (agreement.py)."""
