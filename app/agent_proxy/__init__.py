"""agent-proxy: a stateless, signing relay between a control plane and its agents."""

__version__ = "0.1.0"
