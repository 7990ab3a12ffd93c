"""Distributed training: 2 DDP processes (gloo, loopback) reach the single-process parameters.

``examples/distributed/train_ddp.py`` is launched with ``python -m torch.distributed.run
--nproc_per_node=2`` on this machine and once more with ``--single`` (one process, each step on the
two ranks' shards concatenated). With equal shards and a mean loss, DDP's averaged gradient is the
full-batch gradient, so the float64 parameters after a few SGD steps must agree to rounding.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distributed" / "train_ddp.py"
STEPS = 5
TIMEOUT_S = 150  # per subprocess; a hang (e.g. a rank that never joins) fails instead of blocking

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    # 2 ranks on 2 cores: one thread each, or the ranks oversubscribe the machine.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    return env


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere). torchrun starts its workers in
    sessions of their own, so killing torchrun's process group does not reach them."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _run(cmd: list[str], log: Path) -> str:
    # Output goes to a file, not a pipe: a worker that outlives torchrun cannot block the read.
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            workers = _children(proc.pid)
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pid in workers:  # whatever of ours is left
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(cmd)}\n"
                        f"{log.read_text()[-4000:]}")
    out = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-4000:]}"
    return out


def _torchrun(out: Path, log: Path) -> str:
    common = [str(SCRIPT), "--out", str(out), "--steps", str(STEPS), "--timeout", "90"]
    for attempt in range(2):  # the free port may be taken between probing and binding it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               *common]
        try:
            return _run(cmd, log)
        except AssertionError as err:
            if attempt == 1 or "address already in use" not in str(err).lower():
                raise
    raise AssertionError("unreachable")


def test_ddp_two_processes_match_single_process(tmp_path):
    ddp_out, single_out = tmp_path / "ddp.pt", tmp_path / "single.pt"
    log = _torchrun(ddp_out, tmp_path / "ddp.log")
    assert f"step {STEPS}/{STEPS}" in log
    _run([sys.executable, str(SCRIPT), "--single", "--world-size", "2", "--out",
          str(single_out), "--steps", str(STEPS)], tmp_path / "single.log")

    ddp = torch.load(ddp_out, weights_only=True)
    single = torch.load(single_out, weights_only=True)
    assert ddp["mode"] == "ddp-gloo" and single["mode"] == "single"
    assert ddp["world_size"] == single["world_size"] == 2
    assert ddp["params"].keys() == single["params"].keys() == {"predict.weight", "predict.bias"}
    diffs = {}
    for name, p in ddp["params"].items():
        q = single["params"][name]
        assert p.dtype == q.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)
        diffs[name] = float((p - q).abs().max())
        # training did move the parameters (the comparison is not trivially of two inits)
        assert float((p - ddp["initial"][name]).abs().max()) > 1e-2
    torch.testing.assert_close(ddp["losses"], single["losses"], rtol=0, atol=1e-9)
    assert len(ddp["losses"]) == STEPS
    print(f"max |DDP - single| per parameter after {STEPS} steps: {diffs}")
