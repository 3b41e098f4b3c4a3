"""Throughput and latency of the relay paths, measured side by side on one machine.

``python -m bench`` (see bench/README.md) starts an nginx origin, HAProxy alone, one
worker, the full node (HAProxy front with TLS and two workers) and the southbound path
through a full node inside network namespaces, then measures them in alternation with
wrk and writes bench/results/.
"""
