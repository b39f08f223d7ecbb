"""Evaluation stages: `python -m eval {parity,hybrid,baselines,latency,demo}`."""
