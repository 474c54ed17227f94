"""fpl_fast.federated: the roles of a federation and the in-process driver.

client.py   the clients' private state (local prompt, optimiser state, batch sampler, secret noise, privacy ledger)
            and the math of one local step, for a batch of clients at once;
server.py   the global prompt G, its SGD, the server's noise, client sampling and aggregation;
text.py     class prompts around a context -> text features -> cosine logits (one encoder call for all clients);
simulation.py  drives clients and server in one process (every client a row of one batched group);
runner.py   a whole job over the simulation: noise plan, rounds, evaluation, checkpoints, results.
A multi-machine runtime drives the same client and server objects.
"""
