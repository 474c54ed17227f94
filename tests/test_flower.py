"""fpl_fast.flower: the ServerApp's method and the ClientApp's handlers against the in-process simulation.

Most tests run the real ServerApp method (:class:`FlowerDPFPL`) and the real ClientApp handlers in this process over
:class:`LocalGrid`, a Grid that hands each message to the addressed node's ClientApp with that node's Context (what
a SuperNode does, without processes or sockets), so every message and every reply can be inspected. The Flower
runtimes themselves run in ``test_flower_runtimes.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")  # the [flower] extra (CI installs it)

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fpl_fast import outputs  # noqa: E402
from fpl_fast.config import RunConfig  # noqa: E402
from fpl_fast.flower import protocol  # noqa: E402
from fpl_fast.flower.client_app import make_client_app  # noqa: E402
from fpl_fast.flower.protocol import REPLY_KEYS, AppSettings, FederationError, from_run_config  # noqa: E402
from fpl_fast.flower.server_app import FlowerDPFPL  # noqa: E402
from fpl_fast.job import train  # noqa: E402
from fpl_fast.methods.skeleton import run_method  # noqa: E402

CFG = RunConfig(num_users=3, rounds=2, noise_seed=7, seed=3)
CEILING = 100.0  # a public max-update-norm for the malicious-node test, far above an honest client's update here


@pytest.fixture(autouse=True)
def _task_identity():
    """A message is stamped with the sending task's identity (set by Flower's runtimes; here by hand)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid:
    """A Grid whose nodes are ClientApps in this process: node ``100 + k`` holds partition k (its node config),
    each with its own Context (``context.state`` persists across messages, as on a SuperNode)."""

    def __init__(self, apps: list[Any], node_configs: list[dict[str, Any]]) -> None:
        self.apps = apps
        self.contexts = [
            Context(run_id=1, node_id=100 + i, node_config=nc, state=RecordDict(), run_config={})
            for i, nc in enumerate(node_configs)
        ]
        self.index = {100 + i: i for i in range(len(node_configs))}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return [c.node_id for c in self.contexts]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for msg in messages:
            i = self.index[msg.metadata.dst_node_id]
            self.sent.append(msg)
            reply = self.apps[i](msg, self.contexts[i])
            self.replies.append(reply)
            out.append(reply)
        return out

    def restart(self, i: int) -> None:
        """Node i's SuperNode restarts: it registers under a new node id, with an empty context.state."""
        old = self.contexts[i]
        del self.index[old.node_id]
        self.contexts[i] = Context(
            run_id=1, node_id=old.node_id + 1000, node_config=old.node_config, state=RecordDict(), run_config={}
        )
        self.index[old.node_id + 1000] = i

    def join(self, app: Any, node_config: dict[str, Any]) -> int:
        """A new SuperNode joins (an enrolled one: the grid lists it); returns its node id."""
        i = len(self.contexts)
        node_id = 2000 + i
        self.apps.append(app)
        self.contexts.append(
            Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})
        )
        self.index[node_id] = i
        return node_id

    def forget_state(self) -> None:
        """What a new ``flwr run`` (new run id) or restarted SuperNodes see: empty context.state."""
        for c in self.contexts:
            c.state = RecordDict()


def _grid(cfg: RunConfig, tmp_path: Path, *, app_cfg: RunConfig | None = None, n: int | None = None) -> LocalGrid:
    n = cfg.num_users if n is None else n
    apps = [make_client_app(app_cfg or cfg, state_dir=tmp_path / "nodes") for _ in range(n)]
    return LocalGrid(apps, [{"partition-id": k, "num-partitions": cfg.num_users} for k in range(n)])


def _run(grid: Any, cfg: RunConfig, out: Path, **kwargs: Any) -> dict[str, Any]:
    settings = AppSettings(
        run_name="t",
        out=str(out),
        node_timeout=kwargs.pop("node_timeout", 5.0),
        progress=False,
        max_update_norm=kwargs.pop("max_update_norm", math.inf),
    )
    return run_method(FlowerDPFPL(grid, settings), cfg, out=out, progress=False, **kwargs)


def _in_process(cfg: RunConfig, out: Path, backbone: Any) -> tuple[dict[str, Any], Any]:
    r = train(cfg, settings={"out": str(out), "progress": False}, backbone=backbone)
    return {"method": r.method, "rounds": r.rounds, "final": r.final}, r.federation


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"sync": "round", "client_fraction": 0.34},
        {"clip_mode": "output"},
        {"factorization": "promptfl", "clip_mode": "batch", "clip_uv": "separate", "promptfl_client_noise": True},
        {"norm_thresh": "adaptive", "clip_init": 1.0},
        {"client_drop_rate": 0.34},
    ],
    ids=[
        "step",
        "round-one-client-a-round",
        "output",
        "authors-promptfl-client-noise",
        "adaptive-clipping",
        "drop-out",
    ],
)
def test_the_flower_apps_give_the_in_process_federation(
    tmp_path: Path, changes: dict[str, Any], embedded_job: Any
) -> None:
    """Same G, per-client accuracies up to float tolerance; the same steps and epsilons exactly (fixed noise seeds).
    The clients that are sampled are the server generator's, so a client that missed rounds is accounted for the
    steps it took."""
    cfg = CFG.replace(**changes)
    ip, fed = _in_process(cfg, tmp_path / "ip", embedded_job(cfg)[0])
    fl = _run(_grid(cfg, tmp_path), cfg, tmp_path / "fl")
    a, b = ip["final"], fl["final"]
    assert b["steps_per_client"] == a["steps_per_client"]
    for key in ("epsilon_local_per_client", "epsilon_global_per_client", "epsilon_total_per_client"):
        assert b[key] == a[key], key
    assert b["epsilon_total"] == a["epsilon_total"]
    assert b["clients_dropped_per_round"] == a["clients_dropped_per_round"]
    assert [r["dropped"] for r in fl["rounds"]] == [r["dropped"] for r in ip["rounds"]]
    np.testing.assert_allclose(b["local_acc_per_client"], a["local_acc_per_client"], atol=0.02)
    np.testing.assert_allclose(b["neighbor_acc_per_client"], a["neighbor_acc_per_client"], atol=0.02)
    g_flower = outputs.load_checkpoint(tmp_path / "fl")["server"]["g"][0]
    torch.testing.assert_close(g_flower, fed.server.global_ctx, atol=1e-4, rtol=1e-4)
    if changes.get("client_fraction"):
        assert 0 in a["steps_per_client"]  # one client a round for 2 rounds: a client took no step, and is not charged
        assert b["epsilon_total_per_client"][a["steps_per_client"].index(0)] == 0.0
    assert [r["round"] for r in fl["rounds"]] == [r["round"] for r in ip["rounds"]]
    assert b["acc_mean_last5_rounds"] == a["acc_mean_last5_rounds"] == [1, 2]
    assert b["local_acc_mean_last5"] == pytest.approx(np.mean([r["local_acc"] for r in fl["rounds"]]), abs=1e-12)
    assert b["local_acc_mean_last5"] == pytest.approx(a["local_acc_mean_last5"], abs=0.02)
    for k, steps in enumerate(a["steps_per_client"]):  # each node's own accountant agrees with the server's report
        ledger = tmp_path / "nodes" / "t" / f"client-{k}" / "ledger.json"
        if steps:
            assert json.loads(ledger.read_text())["epsilon_total"] == a["epsilon_total_per_client"][k]
    assert fl["final"]["engine"] == "flower" and fl["method"] == ip["method"]
    # Each client's clip norms reach the server's record as the in-process run has them (adaptive: they moved).
    np.testing.assert_allclose(fl["rounds"][-1]["clip_norms"], ip["rounds"][-1]["clip_norms"], rtol=1e-6)
    moved = ip["rounds"][-1]["clip_norms"] != [[cfg.clip_norm] * len(row) for row in ip["rounds"][-1]["clip_norms"]]
    assert moved == cfg.adaptive_clip


def test_a_dropped_client_is_sent_nothing_and_a_round_without_replies_leaves_g(tmp_path: Path, monkeypatch) -> None:
    """Drop-out: the server sends the round's training messages to the clients that report only (1 of 3 drops out
    each round), and only they are charged; a round whose replies all go missing (here round 2's) takes the
    drop-out path: G stays, nobody's ledger moves, the run goes on."""
    from fpl_fast.flower import strategy

    real = strategy.GlobalPromptStrategy.aggregate_train
    g_seen = []

    def lose_every_reply_of_round_2(self, server_round, replies):
        replies = list(replies)
        if server_round == 2:
            g_seen.append(self.server.global_ctx.clone())
            replies = []  # all timed out
        return real(self, server_round, replies)

    monkeypatch.setattr(strategy.GlobalPromptStrategy, "aggregate_train", lose_every_reply_of_round_2)
    cfg = CFG.replace(sync="round", client_drop_rate=0.34, rounds=2)
    grid = _grid(cfg, tmp_path)
    res = _run(grid, cfg, tmp_path / "a")
    dropped = res["final"]["clients_dropped_per_round"]
    assert [len(d) for d in dropped] == [1, 1]
    trained = [m.metadata.dst_node_id - 100 for m in grid.sent if m.metadata.message_type == "train"]
    assert trained == [k for d in dropped for k in range(3) if k not in d]
    steps = res["final"]["steps_per_client"]  # as the replies of round 1 report them
    assert steps[dropped[0][0]] == 0 and all(steps[k] > 0 for k in range(3) if k not in dropped[0])
    assert torch.equal(outputs.load_checkpoint(tmp_path / "a")["server"]["g"][0], g_seen[0])


def test_only_the_listed_releases_leave_a_client(tmp_path: Path) -> None:
    """Every reply holds only the records and keys of protocol.REPLY_KEYS; its one array is (n_ctx, d) and equals
    none of the client's local parameters; no bytes leave (the state blob stays in context.state)."""
    cfg = CFG.replace(sync="round")
    grid = _grid(cfg, tmp_path)
    _run(grid, cfg, tmp_path / "fl")
    assert {m.metadata.message_type for m in grid.replies} == {"query.info", "train", "evaluate"}
    local = [
        t
        for k in range(cfg.num_users)
        for t in torch.load(
            sorted((tmp_path / "nodes" / "t" / f"client-{k}").glob("state-*.pt"))[-1], weights_only=False
        )["clients"]["learner"]["local"].values()
    ]
    assert local
    for reply in grid.replies:
        allowed = REPLY_KEYS[reply.metadata.message_type]
        content = reply.content
        assert set(content.keys()) <= set(allowed), content.keys()
        for name, rec in content.items():
            assert set(rec.keys()) <= allowed[name], (name, rec.keys())
            if isinstance(rec, ArrayRecord):
                (arr,) = rec.to_torch_state_dict().values()
                assert arr.shape == (cfg.n_ctx, 64)  # the tiny CLIP's token width
                assert not any(t[0].shape == arr.shape and torch.allclose(t[0], arr) for t in local)
            else:
                assert isinstance(rec, (ConfigRecord, MetricRecord))
                assert not any(isinstance(v, bytes) for v in rec.values())


@pytest.mark.slow
def test_a_resumed_server_and_restarted_nodes_continue_the_run(tmp_path: Path, monkeypatch) -> None:
    """The server dies in round 2 after the clients trained (their tag-2 state is on disk, the server's checkpoint
    is of round 1); a new run of the same name resumes: the nodes (empty context.state, as after a new flwr run)
    roll back to round 1 from their folders and the run ends exactly as an uninterrupted one."""
    cfg = CFG.replace(sync="round", rounds=3)
    whole = _run(_grid(cfg, tmp_path / "a"), cfg, tmp_path / "a" / "out")

    from fpl_fast.flower import strategy

    calls = {"n": 0}
    real = strategy.GlobalPromptStrategy.aggregate_train

    def dies_in_round_2(self, server_round, replies):
        calls["n"] += 1
        if server_round == 2:
            list(replies)  # the clients ran round 2 and saved its state
            raise KeyboardInterrupt("server killed")
        return real(self, server_round, replies)

    grid = _grid(cfg, tmp_path / "b")
    out = tmp_path / "b" / "out"
    monkeypatch.setattr(strategy.GlobalPromptStrategy, "aggregate_train", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        _run(grid, cfg, out)
    assert outputs.load_checkpoint(out)["next_round"] == 1
    assert (tmp_path / "b" / "nodes" / "t" / "client-0" / "state-2.pt").is_file()
    monkeypatch.setattr(strategy.GlobalPromptStrategy, "aggregate_train", real)
    grid.forget_state()
    resumed = _run(grid, cfg, out, resume=True)
    for key in ("local_acc_per_client", "epsilon_total_per_client", "steps_per_client"):
        assert resumed["final"][key] == whole["final"][key], key
    g_whole = outputs.load_checkpoint(tmp_path / "a" / "out")["server"]["g"]
    assert torch.equal(outputs.load_checkpoint(out)["server"]["g"], g_whole)


@pytest.mark.slow
def test_a_restarted_supernode_rejoins_under_its_new_node_id(tmp_path: Path, monkeypatch) -> None:
    """Client 1's SuperNode restarts after round 1 (new node id, empty context.state): the server maps partition 1
    to the new node and the client continues from its node-local state; the run ends as an uninterrupted one."""
    cfg = CFG.replace(sync="round", rounds=2)
    whole = _run(_grid(cfg, tmp_path / "a"), cfg, tmp_path / "a" / "out")
    grid = _grid(cfg, tmp_path / "b")
    real = FlowerDPFPL.round

    def restart_after_round_1(self, st, rnd):
        if rnd == 2:
            grid.restart(1)
        return real(self, st, rnd)

    monkeypatch.setattr(FlowerDPFPL, "round", restart_after_round_1)
    res = _run(grid, cfg, tmp_path / "b" / "out")
    assert 1100 + 1 in {m.metadata.dst_node_id for m in grid.sent}  # round 2 went to the new node
    for key in ("local_acc_per_client", "epsilon_total_per_client", "steps_per_client"):
        assert res["final"][key] == whole["final"][key], key


@pytest.mark.slow
def test_a_newcomer_claiming_the_partition_of_a_connected_node_is_refused(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Mid-run, an enrolled node joins claiming partition 1 while client 1's node is still connected: it is refused
    (one log line), asked nothing more and sent no G; the run goes on with the node that held the partition."""
    cfg = CFG.replace(sync="round", rounds=2)
    grid = _grid(cfg, tmp_path)
    real = FlowerDPFPL.round
    joined: list[int] = []

    def intruder_joins_before_round_2(self, st, rnd):
        if rnd == 2:
            app = make_client_app(cfg, state_dir=tmp_path / "intruder")
            joined.append(grid.join(app, {"partition-id": 1, "num-partitions": cfg.num_users}))
        return real(self, st, rnd)

    monkeypatch.setattr(FlowerDPFPL, "round", intruder_joins_before_round_2)
    with caplog.at_level("WARNING", logger="fpl_fast.flower"):
        res = _run(grid, cfg, tmp_path / "out")
    (intruder,) = joined
    assert f"refused node {intruder}: partition-id 1 is held by node 101, which is still connected" in caplog.messages
    assert [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == intruder] == ["query.info"]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert sum(m.metadata.dst_node_id == 101 and m.metadata.message_type == "train" for m in grid.sent) == 2


def test_a_second_process_on_a_node_encodes_no_image(tmp_path: Path) -> None:
    """Every message may start a fresh ClientApp process: the node's disk cache serves its image features."""
    from fpl_fast.flower import node as node_mod

    settings = node_mod.NodeSettings(0, CFG.num_users, state_dir=tmp_path)
    node_mod._PREPARED.clear()
    first, _, _ = node_mod.prepared_data(CFG, settings)
    assert first.feature_cache.encoded_images > 0
    node_mod._PREPARED.clear()  # what a new process starts with
    second, _, data = node_mod.prepared_data(CFG, settings)
    assert second is not first and second.feature_cache.encoded_images == 0
    assert len(data.train_idx) == CFG.num_users
    node_mod._PREPARED.clear()


# ------------------------------------------------------------------------------------------
# Bad setups: one line each
# ------------------------------------------------------------------------------------------
def test_a_supernode_without_its_partition_is_named(tmp_path: Path) -> None:
    grid = _grid(CFG, tmp_path)
    grid.contexts[1].node_config = {}
    with pytest.raises(FederationError, match=r"node 101: this SuperNode has no partition-id: start it with"):
        _run(grid, CFG, tmp_path / "out")


def test_another_fpl_fast_version_or_config_is_refused(tmp_path: Path, monkeypatch) -> None:
    grid = _grid(CFG, tmp_path, app_cfg=CFG.replace(rank=4))
    with pytest.raises(FederationError, match=r"configuration differs: the ServerApp's hash is \w+, this ClientApp's"):
        _run(grid, CFG, tmp_path / "a")
    from fpl_fast.flower import server_app

    other = lambda *a, **k: {**protocol.header(*a, **k), "version": "0.0.1-other"}  # noqa: E731
    monkeypatch.setattr(server_app, "header", other)  # the ServerApp's side only
    with pytest.raises(FederationError, match=r"fpl_fast version differs: the ServerApp runs 0.0.1-other"):
        _run(_grid(CFG, tmp_path), CFG, tmp_path / "b")


def test_too_few_supernodes_time_out_with_one_line(tmp_path: Path) -> None:
    grid = _grid(CFG, tmp_path, n=2)
    with pytest.raises(FederationError, match=r"only 2 of 3 SuperNodes connected within 0.3 s \(num_users=3\)"):
        _run(grid, CFG, tmp_path / "out", node_timeout=0.3)


def test_wrong_num_partitions_and_duplicate_partitions_are_named(tmp_path: Path) -> None:
    grid = _grid(CFG, tmp_path)
    grid.contexts[2].node_config = {"partition-id": 2, "num-partitions": 5}
    with pytest.raises(FederationError, match=r"num-partitions=5 but the run has num_users=3"):
        _run(grid, CFG, tmp_path / "a")
    grid = _grid(CFG, tmp_path)
    grid.contexts[2].node_config = {"partition-id": 1, "num-partitions": 3}
    with pytest.raises(FederationError, match=r"nodes 101 and 102 both hold partition-id 1"):
        _run(grid, CFG, tmp_path / "b")


def test_run_config_keys_map_to_the_settings() -> None:
    cfg, app = from_run_config(
        {"num-users": 2, "rounds": 1, "sync": "round", "run-name": "x", "noise-seed": "none", "tensorboard": "tb"}
    )
    assert (cfg.num_users, cfg.rounds, cfg.sync, cfg.noise_seed, app.run_name) == (2, 1, "round", None, "x")
    assert app.tensorboard == "tb"
    with pytest.raises(ValueError, match=r"unknown run config key 'rnds'; allowed: .*rounds"):
        from_run_config({"rnds": 1})
    assert from_run_config({"max-update-norm": 5})[1].max_update_norm == 5
    assert from_run_config({})[1].max_update_norm == math.inf  # no ceiling unless the run sets one
    with pytest.raises(ValueError, match=r"^max-update-norm must be a number > 0 \(inf: no ceiling\), got 0$"):
        from_run_config({"max-update-norm": 0})


def test_a_node_with_its_own_data_folder_reports_no_neighbour_accuracy(tmp_path: Path) -> None:
    """data-dir: the node's whole dataset is its client's; neighbour accuracy is not faked (None, and said why).
    (digits has no folder, so every node's "own folder" is all of digits here: the whole-dataset path is tested.)"""
    cfg = CFG.replace(sync="round", rounds=1)
    grid = _grid(cfg, tmp_path)
    for k, c in enumerate(grid.contexts):
        c.node_config = {"partition-id": k, "num-partitions": 3, "data-dir": "data"}
    res = _run(grid, cfg, tmp_path / "out")["final"]
    assert res["neighbor_acc"] is None and res["neighbor_acc_per_client"] is None
    assert res["neighbor_acc_mean_last5"] is None and res["neighbor_acc_mean_last10"] is None
    assert res["local_acc_mean_last5"] == res["local_acc"]  # one round: the mean of one
    assert "not available" in res["neighbor_note"]
    assert math.isfinite(res["local_acc"])
    assert res["sample_rate_per_client"] == [8 / 600] * 3  # each node's client holds all 600 training images


def test_the_python_api_runs_the_flower_engine_on_the_nodes_own_data_only(tmp_path: Path) -> None:
    import fpl_fast

    with pytest.raises(ValueError, match=r"engine='flower-sim' prepares its data on each node: leave out classnames"):
        fpl_fast.train(CFG, settings={"engine": "flower-sim", "out": str(tmp_path)}, classnames=["a"])
    assert not any(tmp_path.iterdir())  # refused before anything ran


# ------------------------------------------------------------------------------------------
# A malicious enrolled node: the replies the strategy rejects
# ------------------------------------------------------------------------------------------
def _ledger(k: int = 1, **changes: Any) -> dict[str, Any]:
    return {"partition-id": k, "steps": 3, "clip-norm-global": 1.0, "clip-norms": [1.0], **changes}


def _train_reply(arr: torch.Tensor, ledger: dict[str, Any], **extra: Any) -> Message:
    """A reply to a train message sent to node 101 (Flower stamps the reply's source node from the message)."""
    sent = Message(
        RecordDict({"global": ArrayRecord({"global": torch.zeros(4, 8)})}), dst_node_id=101, message_type="train"
    )
    records: dict[str, Any] = {"global": ArrayRecord({"global": arr}), "ledger": MetricRecord(ledger), **extra}
    return Message(RecordDict(records), reply_to=sent)


_G = torch.zeros(4, 8)
_OK = torch.full((4, 8), 0.01)


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (lambda: _train_reply(_OK, _ledger()), None),  # the control: an honest reply passes
        (lambda: _train_reply(_OK, _ledger(loss=0.3)), r"record 'ledger' has keys \[.*'loss'.*\], expected"),
        (
            lambda: _train_reply(_OK, _ledger(), private=ConfigRecord({"x": 1})),
            r"records \['global', 'ledger', 'private'\]",
        ),
        (lambda: _train_reply(torch.zeros(5, 8), _ledger()), r"array of shape \(5, 8\), expected \(4, 8\)"),
        (lambda: _train_reply(_OK.double(), _ledger()), r"array of dtype torch.float64, expected torch.float32"),
        (lambda: _train_reply(_OK.clone().index_fill_(0, torch.tensor([0]), math.nan), _ledger()), "NaN or inf"),
        (lambda: _train_reply(_OK.clone().index_fill_(1, torch.tensor([2]), math.inf), _ledger()), "NaN or inf"),
        (lambda: _train_reply(_OK * 1e4, _ledger()), r"update norm 565\.7 above the ceiling max-update-norm=10$"),
        (lambda: _train_reply(_OK, _ledger(k=0)), r"partition-id 0 is held by node 100, not by the replying node"),
        (lambda: _train_reply(_OK, _ledger(k=7)), r"partition-id 7 was not asked for"),
        (lambda: _train_reply(_OK, _ledger(steps=-1)), r"steps must be an integer >= 0, got -1"),
        (lambda: _train_reply(_OK, _ledger(**{"clip-norms": [math.inf]})), r"clip-norms must be 1 finite numbers > 0"),
    ],
    ids=[
        "honest",
        "unexpected-key",
        "unexpected-record",
        "wrong-shape",
        "wrong-dtype",
        "nan",
        "inf",
        "norm",
        "other-partition",
        "unasked-partition",
        "negative-steps",
        "inf-clip-norm",
    ],
)
def test_the_strategy_names_what_is_wrong_with_a_reply(reply: Any, problem: str | None) -> None:
    from fpl_fast.flower.strategy import reply_problem

    found = reply_problem(
        reply(), "train", partitions=[0, 1], node_of={0: 100, 1: 101}, sent=_G, delta=True, max_update_norm=10.0
    )
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found


@pytest.mark.slow
def test_a_malicious_nodes_bad_replies_are_rejected_and_logged_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Client 1's node sends NaN and an accuracy of 1.5, client 2's an update 1e4 times its own (above the ceiling
    that the run's max-update-norm sets, far above an honest client's): each reply is rejected with one log line,
    and the round goes on with the honest client, whose copy G becomes."""
    cfg = CFG.replace(sync="round", rounds=1)
    grid = _grid(cfg, tmp_path)
    honest_apps = list(grid.apps)

    def malicious(i: int) -> Any:
        def app(msg: Message, context: Context) -> Message:
            reply = honest_apps[i](msg, context)
            if msg.metadata.message_type == "evaluate" and i == 1:
                acc = dict(reply.content["accuracy"])
                return Message(RecordDict({"accuracy": MetricRecord({**acc, "local-acc": 1.5})}), reply_to=msg)
            if msg.metadata.message_type != "train":
                return reply
            sent, arr = protocol.prompt_of(msg.content), protocol.prompt_of(reply.content)
            bad = arr.clone().fill_(math.nan) if i == 1 else sent + 1e4 * (arr - sent)
            records = {"global": ArrayRecord({"global": bad}), "ledger": reply.content["ledger"]}
            return Message(RecordDict(records), reply_to=msg)

        return app

    grid.apps[1], grid.apps[2] = malicious(1), malicious(2)
    with caplog.at_level("INFO", logger="fpl_fast.flower"):
        res = _run(grid, cfg, tmp_path / "out", max_update_norm=CEILING)
    rejected = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected"))
    assert len(rejected) == 3, rejected
    assert (
        rejected[0]
        == "rejected the evaluate reply of node 101: local-acc must be in [0, 1], got 1.5; going on without it"
    )
    assert rejected[1] == "rejected the train reply of node 101: array with NaN or inf values; going on without it"
    assert re.fullmatch(
        r"rejected the train reply of node 102: update norm [\d.e+]+ above the ceiling max-update-norm=100; going on "
        r"without it",
        rejected[2],
    ), rejected
    assert [r["round"] for r in res["rounds"]] == [1]
    # G is the honest client's copy; its update was far below the ceiling.
    (honest,) = [m for m in grid.replies if m.metadata.message_type == "train" and m.metadata.src_node_id == 100]
    sent = protocol.prompt_of([m for m in grid.sent if m.metadata.message_type == "train"][-1].content)
    honest_norm = float((protocol.prompt_of(honest.content) - sent).double().norm())
    assert honest_norm < CEILING / 10
    assert f"round 1: largest accepted update norm {honest_norm:.4g} (max-update-norm=100)" in caplog.messages
    g = outputs.load_checkpoint(tmp_path / "out")["server"]["g"][0]
    torch.testing.assert_close(g, protocol.prompt_of(honest.content))
    assert res["final"]["steps_per_client"][1:] == [0, 0]  # the server counts only steps it accepted a release for
    assert math.isnan(res["final"]["local_acc_per_client"][1])
    assert not math.isnan(res["final"]["local_acc_per_client"][2])
