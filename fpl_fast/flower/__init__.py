"""DP-FPL on Flower (flwr): real multi-machine federations over the same client and server objects.

- :mod:`.protocol`: what each message carries (down: G and a header; up: the client's private release and its
  ledger), the header's version and config-hash checks, and the one-line setup errors.
- :mod:`.node`: one client on its node (its partition or its own data folder, a ``Clients`` group of one, its
  state in ``context.state`` mirrored to a node-local folder keyed by the run name).
- :mod:`.client_app` / :mod:`.server_app`: the ClientApp handlers and the ServerApp (DP-FPL on the method skeleton,
  so results.json, rounds.csv, the plot, checkpoints and resume are the in-process runner's).
- :mod:`.strategy`: the strategy that samples clients by partition id with the server's generator and averages
  only the global prompt (uniform mean).
- :mod:`.simulation`: ``--engine flower-sim``, Flower's simulation runtime in one process.
- :mod:`.deploy` / :mod:`.credentials`: the app folder ``flwr run`` ships, and a secure deployment's credentials
  (a CA and the SuperLink's TLS certificate, each SuperNode's authentication key).

Needs ``pip install .[flower]`` (flwr is imported only here).
"""
