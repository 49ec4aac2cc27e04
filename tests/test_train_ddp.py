"""The same loop under torchrun: DistributedDataParallel over gloo on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.test_train_resume import DRIVER, driver_env, metrics


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")


def torchrun(args: list[str], **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                            + args, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


@needs_gloo
def test_two_rank_gloo_run_matches_one_process(tmp_path):
    args = lambda name: [str(DRIVER), "--model", "mlp", "--out", str(tmp_path / name),  # noqa: E731
                         "--final", str(tmp_path / f"{name}.pt")]
    single = subprocess.Popen([sys.executable] + args("single"), env=driver_env(), stdout=subprocess.DEVNULL)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                         + args("ddp"), env=driver_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert single.wait() == 0
    # fit() destroys the group it made, gloo's threads with it, while the interpreter is alive:
    # a group outliving it is torn down at interpreter exit, where gloo can abort the process.
    left = [line for line in ddp.stderr.splitlines() if "threads after fit:" in line]
    if sys.platform.startswith("linux"):
        assert len(left) == 2 and not any("gloo" in line for line in left), left

    rank0, rank1 = torch.load(tmp_path / "ddp.rank0.pt"), torch.load(tmp_path / "ddp.rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Each rank trains on half of every global batch (with the same augmentation draws):
    # the all-reduced mean gradient is the one-process gradient up to summation order.
    reference = torch.load(tmp_path / "single.pt")
    for k in reference:
        torch.testing.assert_close(rank0[k], reference[k], rtol=0, atol=1e-5)
    assert ddp.stdout.count("step 40\n") == 1  # only rank 0 reports
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 40
    assert [r["step"] for r in metrics(tmp_path / "ddp")] == [r["step"] for r in metrics(tmp_path / "single")]


@needs_gloo
def test_two_rank_run_crashed_then_resumed_is_bit_identical(tmp_path):
    # The conv model has dropout: each rank draws its own masks from its own generator,
    # so the resumed ranks must each get their own generator state back, not rank 0's.
    args = lambda name: [str(DRIVER), "--model", "conv", "--epochs", "2",  # noqa: E731
                         "--out", str(tmp_path / name), "--final", str(tmp_path / f"{name}.pt")]
    def launch(name: str, *extra: str, ok: bool = True) -> str:  # one torchrun at a time
        proc = torchrun(args(name) + list(extra))
        out, err = proc.communicate(timeout=300)
        assert (proc.returncode == 0) == ok, err[-3000:]
        return out

    launch("reference")
    out = launch("victim", "--crash-after", "13", ok=False)  # the last checkpoint is step 12's
    assert "step 13\n" in out and "step 14\n" not in out and not list(tmp_path.glob("victim.rank*.pt"))
    launch("victim", "--resume")

    for rank in (0, 1):
        expected, got = (torch.load(tmp_path / f"{n}.rank{rank}.pt") for n in ("reference", "victim"))
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"rank {rank}: {different} differ"
    assert metrics(tmp_path / "victim") == metrics(tmp_path / "reference")
