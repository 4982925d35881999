"""Multi-process training: torchrun + gloo on CPU, sharded validation, rank-0-only files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint
from training.data import make_synthetic_dataset
from training.distributed import (
    all_gather_objects,
    any_flag,
    gather_in_order,
    launched_by_torchrun,
    setup_distributed,
    shard,
    unwrap,
)
from training.train_state import load_train_state

FAST = ["--attribute", "race", "--classes", "background,rim,cup", "--image-size", "32",
        "--batch-size", "4", "--lr", "3e-3", "--seed", "1",
        "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}']


def _torchrun(args: list[str], nproc: int = 2, module: str | None = "training.fit",
              timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc)]
    cmd += ["-m", module, *args] if module else args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=40, seed=3)


@pytest.fixture(scope="module")
def ddp_one_epoch(fundus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp1")
    proc = _torchrun(["--data", str(fundus), "--epochs", "1", "--out", str(out), *FAST])
    return out, proc


# -- helpers in one process ------------------------------------------------------------------
def test_single_process_helpers_are_identities():
    import torch

    assert not launched_by_torchrun({})
    info = setup_distributed(torch.device("cpu"), env={})
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert any_flag(True, False) == (True, False)
    assert gather_in_order(["x", "y"], 2) == ["x", "y"]
    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net


def test_shard_and_gather_restore_order():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert shard(items[:1], 1, 2) == []  # more ranks than items: an empty share
    with pytest.raises(ValueError, match="rank 3 outside"):
        shard(items, 3, 3)


def test_inconsistent_torchrun_environment_is_refused():
    import torch

    env = {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        setup_distributed(torch.device("cpu"), env=env)
    with pytest.raises(ValueError, match="not an integer"):
        setup_distributed(torch.device("cpu"), env={**env, "RANK": "one"})


# -- real process groups ------------------------------------------------------------------------
def test_gloo_collectives_in_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from pathlib import Path
        from training.distributed import (any_flag, gather_in_order, setup_distributed, shard,
                                          sum_floats, teardown_distributed)
        info = setup_distributed(torch.device("cpu"))
        items = [f"case{i}" for i in range(7)]
        mine = [s.upper() for s in shard(items)]
        result = {"rank": info.rank, "world": info.world_size, "backend": info.backend,
                  "gathered": gather_in_order(mine, len(items)),
                  "flags": any_flag(info.rank == 1, False), "sum": sum_floats(info.rank + 1.5)}
        # one file per rank: two ranks printing to one pipe can interleave their lines
        Path(sys.argv[0]).with_name(f"result{info.rank}.json").write_text(json.dumps(result))
        teardown_distributed()
    """))
    _torchrun([str(script)], module=None)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["backend"] == "gloo"
        assert r["gathered"] == [f"CASE{i}" for i in range(7)]
        assert r["flags"] == [True, False] and r["sum"] == [4.0]


_GROUP_LOSS_WORKER = """
    import json, sys, torch
    from pathlib import Path
    from training.distributed import setup_distributed, teardown_distributed
    from training.losses import build_loss
    info = setup_distributed(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    B, K = 8, 3  # global batch; rank r takes samples r::world
    x = torch.randn(B, 2, 6, 6, generator=gen)
    y = torch.randint(0, K, (B, 6, 6), generator=gen)
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 0, 1])  # rank 0 of 2 sees no group 2
    sl = slice(info.rank, None, info.world_size)
    out = {}
    for name, kw in [("febs", {}), ("febs", {"missing": "present"}), ("groupdro", {"eta": 0.5}),
                     ("dicece", {"dice": "reference"})]:
        torch.manual_seed(1)
        net = torch.nn.Conv2d(2, K, 3, padding=1)
        model = torch.nn.parallel.DistributedDataParallel(net) if info.distributed else net
        loss_fn = build_loss(name, num_classes=K, num_groups=3, **kw).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        values = []
        for _ in range(3):
            loss = loss_fn(model(x[sl]), y[sl], groups[sl])
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(loss.item())
        key = name + "".join(f"_{v}" for v in kw.values())
        out[key] = {"values": values, "weight": net.weight.flatten().tolist(),
                    "q": loss_fn.q.tolist() if hasattr(loss_fn, "q") else None}
    Path(sys.argv[0]).with_name(f"{sys.argv[1]}{info.rank}.json").write_text(json.dumps(out))
    teardown_distributed()
"""


@pytest.mark.slow
def test_group_losses_two_processes_equal_one_process(tmp_path):
    """FEBS (both missing-group modes), GroupDRO (and its q) and the batch-pooled reference
    Dice: 2 gloo ranks with half the batch each train exactly like 1 process with all of it."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_GROUP_LOSS_WORKER))
    _torchrun([str(script), "ddp"], module=None)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, str(script), "single"], check=True, env=env, timeout=300)
    single = json.loads((tmp_path / "single0.json").read_text())
    ranks = [json.loads((tmp_path / f"ddp{rank}.json").read_text()) for rank in (0, 1)]
    for key, one in single.items():
        # CE is a per-rank mean (DDP averages it); the pooled terms are global on every rank
        mean = [(a + b) / 2 for a, b in zip(ranks[0][key]["values"], ranks[1][key]["values"])]
        assert mean == pytest.approx(one["values"], rel=1e-5, abs=1e-7), key
    for ddp in ranks:
        assert set(ddp) == set(single) == {"febs", "febs_present", "groupdro_0.5",
                                           "dicece_reference"}
        for key, one in single.items():
            assert ddp[key]["weight"] == pytest.approx(one["weight"], rel=1e-4, abs=1e-6), key
            if one["q"] is not None:
                assert ddp[key]["q"] == pytest.approx(one["q"], rel=1e-5), key
    # the losses did train (a test that can fail): the weights moved from their init
    assert single["febs"]["values"][0] != single["febs"]["values"][-1]


def test_two_process_fit_writes_loadable_checkpoint_once(ddp_one_epoch):
    out, proc = ddp_one_epoch
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors",
                 "config.yaml", "history.csv"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    model, meta = load_checkpoint(out / "last.safetensors")
    assert meta["provenance"]["epochs"] == 1
    assert not any(k.startswith("module.") for k in model.state_dict())
    # rank 0 alone logs: one summary line per epoch, not one per process
    assert proc.stdout.count("epoch 1: loss") == 1
    assert "processes: 2 (gloo)" in proc.stdout
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    state = load_train_state(out / "last.state.safetensors")
    assert state.world_size == 2 and len(state.rng["ranks"]) == 2
    assert state.epoch == 1


def test_gathered_validation_equals_one_process_evaluation(ddp_one_epoch, fundus):
    from training.data import read_case
    from training.engine import evaluate_cases
    from training.fit import FitConfig, prepare_data
    from training.inference import Segmenter

    out, _ = ddp_one_epoch
    _, meta = load_checkpoint(out / "best.safetensors")
    gathered = meta["provenance"]["validation"]
    config = FitConfig(data=str(fundus), attribute="race", classes=["background", "rim", "cup"],
                       image_size=32, seed=1)
    _, cases, *_ = prepare_data(config)
    val = []
    for c in cases:
        if c.split == "val":
            image, label, _ = read_case(c, spatial_dims=2)
            val.append((c.id, image, label, c.attributes.get("race", "")))
    single = evaluate_cases(Segmenter.from_checkpoint(out / "best.safetensors", "cpu"), val,
                            "race").summary()
    assert sum(g["n"] for g in gathered["mean"]["groups"].values()) == len(val) > 2
    for key in ("dice", "es_dice", "iou", "es_iou"):
        assert gathered["mean"][key] == pytest.approx(single["mean"][key], abs=1e-9)
        for name in ("rim", "cup"):
            assert gathered["classes"][name][key] == pytest.approx(
                single["classes"][name][key], abs=1e-9)
    assert list(gathered["mean"]["groups"]) == list(single["mean"]["groups"])
    for group, stats in single["mean"]["groups"].items():
        assert gathered["mean"]["groups"][group] == pytest.approx(stats, abs=1e-9)


def test_two_process_resume_continues_exactly(ddp_one_epoch, fundus, tmp_path):
    out, _ = ddp_one_epoch
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    _torchrun(["--data", str(fundus), "--epochs", "2", "--resume", "--out", str(resumed),
               *FAST])
    straight = tmp_path / "straight"
    _torchrun(["--data", str(fundus), "--epochs", "2", "--out", str(straight), *FAST])
    a = list(csv.DictReader(open(resumed / "history.csv")))
    b = list(csv.DictReader(open(straight / "history.csv")))
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2"]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_dice", "val_es_dice", "lr"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-4), key



def _two_vs_one_process(folder, worker: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Run ``worker`` as 2 gloo ranks (the environment torchrun would give them) and,
    meanwhile, alone in this process.

    The worker writes ``{argv[1]}{rank}.json`` next to itself; returns
    ``(single-process result, [rank 0 result, rank 1 result])``.
    """
    import runpy

    import torch

    script = folder / "worker.py"
    root = Path(__file__).resolve().parents[2]  # the ranks run outside the repository
    script.write_text(f"import sys\nsys.path.insert(0, {str(root)!r})\n" + textwrap.dedent(worker))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the variables torchrun sets, without its launcher process (one torch import fewer)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, str(script), "ddp"], text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        # one thread like the ranks: with two, sums run in another order and the rounding
        # differences grow over the steps past the test's tolerance (measured: 4e-4 at step 4)
        argv, sys.argv = sys.argv, [str(script), "single"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
            torch.set_num_threads(threads)
        logs = [proc.communicate(timeout=timeout)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(ranks, logs):
        assert proc.returncode == 0, log[-4000:]
    one = json.loads((folder / "single0.json").read_text())
    return one, [json.loads((folder / f"ddp{rank}.json").read_text()) for rank in (0, 1)]


# One worker, launched once, checks every method whose DDP path has its own code: ADV (the
# discriminator outside DDP, hand-averaged), separate (backbones unused on a rank), and the
# group losses GroupDRO/FEBS (global sums). Global batch of 8; rank r of 2 takes r::2.
_PARITY_WORKER = """
    import json, sys, torch
    from pathlib import Path
    from training.adversarial import bottleneck_channels
    from training.distributed import setup_distributed, teardown_distributed
    from training.losses import build_loss
    from training.networks import create_model
    info = setup_distributed(torch.device("cpu"))
    DDP = torch.nn.parallel.DistributedDataParallel
    gen = torch.Generator().manual_seed(0)
    B, K = 8, 3
    x = torch.randn(B, 1, 32, 32, generator=gen)
    y = torch.randint(0, K, (B, 32, 32), generator=gen)
    sl = slice(info.rank, None, info.world_size)
    SMALL = dict(img_size=32, embed_dim=16, depth=1, num_heads=2, norm="instance",
                 decoder_head_channels=16, decoder_channels=(8, 8, 8, 8))

    def flat(params):
        return torch.cat([p.detach().flatten() for p in params]).tolist()

    def train(model, loss_fn, params, batches, record=None):
        opt = torch.optim.SGD(params, lr=0.1)
        values = []
        for groups in batches:
            loss = loss_fn(model(x[sl], groups[sl]), y[sl], groups[sl])
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(record() if record else loss.item())
        return values

    out = {}
    # ADV: ranks see different group mixes; at step 2 rank 0 of 2 sees only unknown samples
    adv_batches = [torch.tensor([0, 0, 0, 0, 1, 2, 0, 1]),
                   torch.tensor([-1, 0, -1, 1, -1, 2, -1, 0])] * 2
    for counts in (None, [5.0, 2.0, 1.0]):  # balance on the batch / on training counts
        torch.manual_seed(1)
        net = create_model("transunet", preset="tiny", in_channels=1, out_channels=K,
                           moe="none", **SMALL)
        loss_fn = build_loss("adv", num_classes=K, num_groups=3, weight=0.5,
                             in_features=bottleneck_channels(net), group_counts=counts)
        loss_fn.attach(net).train()  # before DDP, as training.fit does
        params = torch.nn.ModuleList([net, loss_fn]).parameters()
        model = DDP(net) if info.distributed else net
        values = train(model, loss_fn, params, adv_batches,
                       record=lambda: loss_fn.last_attribute_loss)
        out[f"adv {counts}"] = {"values": values, "model": flat(net.parameters()),
                                "disc": flat(loss_fn.discriminator.parameters())}
    # separate: rank 0 of 2 has no group 2 (step 1), nobody has group 2 (step 2),
    # rank 1 has only unknown samples (every backbone) while rank 0 has none (step 3)
    torch.manual_seed(1)
    sep = create_model("separate", preset="tiny", in_channels=1, out_channels=K, moe="none",
                       num_attributes=3, backbone_kwargs=SMALL)
    model = DDP(sep, find_unused_parameters=True) if info.distributed else sep
    values = train(model, build_loss("dicece", num_classes=K, num_groups=3), sep.parameters(),
                   [torch.tensor([0, 0, 0, 0, 1, 2, 0, 1]), torch.tensor([0, 1, 0, 1, 1, 0, 1, 1]),
                    torch.tensor([0, -1, 1, -1, 2, -1, 0, -1])])
    out["separate"] = {"values": values, "model": flat(sep.parameters()),
                       "per_group": [flat(b.parameters())[:50] for b in sep.backbones]}
    # group losses on a 1-layer net (rank 0 of 2 sees no group 2)
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 0, 1])
    for name, kw in [("groupdro", {"eta": 0.5}), ("febs", {}), ("febs", {"missing": "present"}),
                     ("dicece", {"dice": "reference"})]:
        torch.manual_seed(1)
        conv = torch.nn.Conv2d(1, K, 3, padding=1)
        model = DDP(conv) if info.distributed else conv
        loss_fn = build_loss(name, num_classes=K, num_groups=3, **kw).train()
        values = train(lambda x, a: model(x), loss_fn, conv.parameters(), [groups] * 3)
        key = name + "".join(f" {v}" for v in kw.values())
        out[key] = {"values": values, "model": flat(conv.parameters()),
                    "q": loss_fn.q.tolist() if hasattr(loss_fn, "q") else None}
    Path(sys.argv[0]).with_name(f"{sys.argv[1]}{info.rank}.json").write_text(json.dumps(out))
    teardown_distributed()
    if info.distributed:  # a rank process: skip the interpreter's shutdown (~9 s measured)
        import os
        os._exit(0)
"""


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """(1-process result, [2-process rank results]) of :data:`_PARITY_WORKER`."""
    return _two_vs_one_process(tmp_path_factory.mktemp("parity"), _PARITY_WORKER)


def _same(a, b, key):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key


def test_adv_two_processes_equal_one_process(parity):
    """--loss adv: 2 ranks with half the batch each (different group mixes, one rank with
    only unknown samples: no collective mismatch) train the network and the discriminator
    exactly as 1 process with all of it, for batch and training-count balancing."""
    single, ranks = parity
    for key in ("adv None", "adv [5.0, 2.0, 1.0]"):
        one = single[key]
        assert one["values"][0] != one["values"][-1]  # the discriminator trained
        for ddp in ranks:
            _same(ddp[key]["values"], one["values"], key)  # the global-batch attribute CE
            _same(ddp[key]["disc"], one["disc"], key)
            _same(ddp[key]["model"], one["model"], key)


def test_separate_two_processes_with_absent_groups_equal_one_process(parity):
    """--arch separate under DDP (find_unused_parameters): a group missing from one rank's
    batch, or from every rank's, neither hangs nor errors, and training equals 1 process."""
    single, ranks = parity
    one = single["separate"]
    assert one["values"][0] != one["values"][-1]
    for ddp in ranks:
        _same(ddp["separate"]["model"], one["model"], "separate")
        for g, params in enumerate(one["per_group"]):
            _same(ddp["separate"]["per_group"][g], params, f"separate backbone {g}")
    # CE/Dice are per-rank means: the ranks' mean loss is the 1-process loss
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["separate"]["values"],
                                        ranks[1]["separate"]["values"])]
    _same(mean, one["values"], "separate loss")


def test_group_losses_two_processes_equal_one_process_fast(parity):
    """GroupDRO (and its q), FEBS (both missing-group modes) and the batch-pooled reference
    Dice with a group absent from one rank: 2 ranks train as 1 process."""
    single, ranks = parity
    for key in ("groupdro 0.5", "febs", "febs present", "dicece reference"):
        assert single[key]["values"][0] != single[key]["values"][-1]
        for ddp in ranks:
            _same(ddp[key]["model"], single[key]["model"], key)
            if single[key]["q"] is not None:
                _same(ddp[key]["q"], single[key]["q"], key)


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--arch", "separate", "--moe", "none"],
                                    ["--loss", "adv", "--moe", "none", "--protocol", "paper",
                                     "--dice", "monai", "--center-crop", "64"]],
                         ids=["separate", "adv"])
def test_two_process_fit_separate_and_adv_run_through(method, tmp_path):
    """training.fit under 2 ranks for the two methods with their own DDP code paths. With
    2 samples per rank and 3 groups, every rank's every batch lacks a group (separate: a
    backbone unused on that rank; the trainer's find_unused_parameters must handle it)."""
    data = make_synthetic_dataset("fundus", tmp_path / "data", n=14, seed=3)
    out = tmp_path / "run"
    fast = [a if a != "4" else "2" for a in FAST]  # --batch-size 2
    proc = _torchrun(["--data", str(data), "--epochs", "2", "--out", str(out), *method, *fast],
                     timeout=180)
    assert proc.stdout.count("epoch 2: loss") == 1
    model, meta = load_checkpoint(out / "last.safetensors")
    assert meta["provenance"]["epochs"] == 2
    if "separate" in method:
        assert model.model_name == "separate" and len(model.backbones) == 3
    else:  # rank 0 logs what --protocol applied and which explicit flags overrode it
        assert proc.stdout.count("--protocol paper: applied intensity='scale255'") == 1
        assert ("explicit flags override it: --dice 'monai' (protocol: 'reference'), "
                "--center-crop 64 (protocol: 512)") in proc.stdout
