"""Reference peers for labs, demos and tests: a control plane (``upstream``) and an agent (``agent``).

See README.md in this folder for their command lines and endpoints.
"""
