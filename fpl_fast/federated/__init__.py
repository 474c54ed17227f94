"""fpl_fast.federated: the roles of a federation and the in-process driver.

client.py   the clients' private state (local prompt, optimiser state, batch sampler, secret noise, privacy ledger)
            and the math of one local step, for a batch of clients at once;
server.py   the global prompt G, its SGD, the server's noise, client sampling and aggregation;
optim.py    SGD with momentum on stacked per-client rows;
engine.py   drives clients and server in one process (every client a row of one batched group);
metrics.py  local and neighbour accuracy, the one implementation every method reports.
A multi-machine runtime (fpl_fast.flower) drives the same client and server objects; a whole DP-FPL job over the
engine is fpl_fast.methods.dpfpl.
"""
