"""The launch examples (examples/launch/) parse, pass only flags the trainer and torchrun know, and
hand a pre-emption signal to the trainers."""

import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import yaml

from helpers import ROOT
from megatron_hypenet.arguments import build_parser

LAUNCH = os.path.join(ROOT, "examples", "launch")
TORCHRUN_SH = os.path.join(LAUNCH, "torchrun_multinode.sh")
SBATCH = os.path.join(LAUNCH, "halo.sbatch")
ENV = dict(MASTER_ADDR="node0", TEACHER_HF="/models/Qwen3-8B", DATA="/data/corpus", NNODES="2", NODE_RANK="0")


def _dry_run(**env):
    out = subprocess.run(["bash", TORCHRUN_SH], env={**os.environ, **ENV, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_shell_scripts_parse():
    for path in (TORCHRUN_SH, SBATCH):
        subprocess.run(["bash", "-n", path], check=True)


def test_every_flag_exists_in_the_trainer_and_torchrun(tmp_path):
    from torch.distributed.run import get_args_parser

    commands = _dry_run(WORK=str(tmp_path))
    stages = [c for c in commands if c[0] == "torchrun"]
    assert [c[c.index("--stage") + 1] for c in stages] == ["align", "select", "distill", "finetune"]
    parser, unknown = build_parser(), set()
    for cmd in stages:
        script = next(i for i, a in enumerate(cmd) if a.endswith("pretrain_hypenet.py"))
        torchrun = get_args_parser().parse_args(cmd[1:script + 1])
        assert (torchrun.nnodes, torchrun.node_rank, torchrun.nproc_per_node) == ("2", 0, "8")
        _, rest = parser.parse_known_args(cmd[script + 1:])
        unknown |= {a for a in rest if a.startswith("--")}
    assert not unknown, f"flags pretrain_hypenet.py does not know: {sorted(unknown)}"
    layout = stages[2]  # distill: the documented Qwen3-8B layout
    assert layout[layout.index("--tensor-model-parallel-size") + 1] == "4"
    assert layout[layout.index("--pipeline-model-parallel-size") + 1] == "2"


def test_sbatch_runs_one_torchrun_per_node_and_requeues_on_preemption():
    text = open(SBATCH).read()
    directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--signal=USR1@120" in directives and "--requeue" in directives and "--ntasks-per-node=1" in directives
    assert "srun" in text and "examples/launch/torchrun_multinode.sh" in text
    assert "scontrol requeue" in text and "143" in text
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in text and var in open(TORCHRUN_SH).read()


def test_pytorchjob_manifest():
    job = yaml.safe_load(open(os.path.join(LAUNCH, "pytorchjob.yaml")))
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for spec in specs.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items() <= env.items()
        script = container["args"][0].split("exec bash ")[1].strip()
        assert os.path.exists(os.path.join(ROOT, script)), script
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert any(env["WORK"].startswith(m + "/") for m in mounts), "checkpoints must be on the shared volume"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"]) == int(job["spec"]["nprocPerNode"])


FAKE_TORCHRUN = """#!{python}
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(os.path.join(os.environ["WORK"], "ready"), "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
open(os.path.join(os.environ["WORK"], "saved" if got else "timeout"), "w").close()
"""


def test_a_signal_reaches_the_trainers_and_stops_the_stages(tmp_path):
    """SIGTERM (Kubernetes) to the script: the trainer gets SIGUSR1, the script exits 143, no next stage."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    (work / "checkpoints" / "teacher").mkdir(parents=True)
    (work / "checkpoints" / "teacher" / "latest_checkpointed_iteration.txt").write_text("0")
    fake = bin_dir / "torchrun"
    fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **ENV, "WORK": str(work), "STAGES": "align distill",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", TORCHRUN_SH], env=env)
    deadline = time.time() + 30
    while not (work / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert (work / "saved").exists()


def test_dockerfile_uses_an_ngc_base_and_installs_the_package():
    import re

    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    tag = re.search(r"^ARG NGC_TAG=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag)
    assert "FROM nvcr.io/nvidia/pytorch:${NGC_TAG}" in text
    for var in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert var in text
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert os.path.exists(os.path.join(ROOT, path)), f"COPY {path}: not in the repository"
    extras = re.search(r'-e "\.\[([^\]]+)\]"', text).group(1).split(",")
    import tomllib

    declared = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert set(extras) <= set(declared) and {"fla", "deepspeed"} <= set(extras)
    assert re.search(r"^ENTRYPOINT \[", text, re.M) and re.search(r"^CMD \[", text, re.M)
