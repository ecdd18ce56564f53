"""launch.sh: help, argument errors, local runs and TPU-pod runs, against fake `python` and `gcloud` executables.

Each test builds a throw-away repository root (`EEJAX_ROOT`) holding one paper, `demo`, so the tests do not depend
on which papers exist. The fakes record their argv as JSON lines; the pod's remote commands are then executed by
bash with a fake `python3`, which checks the quoting the way the remote shell will see it.
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch.sh"
URL = "https://example.com/eejax.git"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                                reason="needs bash and git")


def _fake(path: pathlib.Path, log: pathlib.Path) -> pathlib.Path:
    """An executable that appends `{"argv": [...], "cwd": ..., "cache": ...}` to `log` and exits 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "                        'cache': os.environ.get('JAX_COMPILATION_CACHE_DIR')}) + '\\n')\n")
    path.chmod(0o755)
    return path


def _calls(log: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _git(root, *args) -> str:
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def root(tmp_path):
    """A repository root with paper `demo`, a shared config piece `_base`, and one commit."""
    root = tmp_path / "repo"
    for rel in ("configs/demo.py", "configs/_base.py", "experiments/demo.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "init")
    return root


def _launch(args, root, tmp_path, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("EEJAX_PYTHON", "EEJAX_REPO_URL", "JAX_COMPILATION_CACHE_DIR")}
    base.update(EEJAX_ROOT=str(root), HOME=str(tmp_path / "home"), **env)
    return subprocess.run(["bash", str(LAUNCH), *args], env=base, capture_output=True, text=True, timeout=60)


def test_help(root, tmp_path):
    r = _launch(["--help"], root, tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("--tpu", "--zone", "--project", "--branch", "--dry-run", "test", "jax.distributed.initialize"):
        assert word in r.stdout


def test_unknown_option_exits_2(root, tmp_path):
    r = _launch(["--no-such-flag", "demo"], root, tmp_path)
    assert r.returncode == 2
    assert "--no-such-flag" in r.stderr and "--help" in r.stderr


def test_unknown_paper_lists_papers(root, tmp_path):
    (root / "configs/other.py").write_text("")  # a config without an experiment script is not runnable
    r = _launch(["nope:smoke"], root, tmp_path, EEJAX_PYTHON="/nonexistent")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "nope" in r.stderr and "available: demo other" in r.stderr and "_base" not in r.stderr
    r = _launch(["other"], root, tmp_path, EEJAX_PYTHON="/nonexistent")
    assert r.returncode != 0 and "experiments/other.py" in r.stderr


def test_local_run(root, tmp_path):
    log = tmp_path / "python.log"
    py = _fake(tmp_path / "bin/python", log)
    r = _launch(["demo:smoke", "--config.a=1", "--workdir", "w d"], root, tmp_path, EEJAX_PYTHON=str(py))
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["argv"] == ["-m", "experiments.demo", "--config", "configs/demo.py:smoke", "--config.a=1",
                            "--workdir", "w d"]
    assert call["cwd"] == str(root)
    assert call["cache"] == str(tmp_path / "home/.cache/eejax-jax")


def test_local_run_without_arg_uses_venv_python(root, tmp_path):
    log = tmp_path / "python.log"
    _fake(root / ".venv/bin/python", log)  # no EEJAX_PYTHON: .venv/bin/python is next in line
    r = _launch(["demo"], root, tmp_path, JAX_COMPILATION_CACHE_DIR="/my/cache")
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["argv"] == ["-m", "experiments.demo", "--config", "configs/demo.py"]
    assert call["cache"] == "/my/cache"  # a user's setting wins


def test_test_command_runs_pytest(root, tmp_path):
    log = tmp_path / "python.log"
    py = _fake(tmp_path / "bin/python", log)
    r = _launch(["test", "-x", "-k", "a and b"], root, tmp_path, EEJAX_PYTHON=str(py))
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["argv"] == ["-m", "pytest", "-x", "-k", "a and b"] and call["cwd"] == str(root)


def _pod(root, tmp_path, *extra, dry_run=False, url=URL):
    bin_dir = tmp_path / "fakebin"
    log = tmp_path / "gcloud.log"
    _fake(bin_dir / "gcloud", log)
    args = (["--dry-run"] if dry_run else []) + [
        "--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "proj", *extra,
        "demo:smoke", "--config.x=a b", "--config.y='q'", "--workdir", "$HOME/not expanded"]
    r = _launch(args, root, tmp_path, EEJAX_REPO_URL=url, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    return r, _calls(log)


def _run_remote(command: str, tmp_path, clone=True) -> list[list[str]]:
    """Runs `command` as the worker's shell would, with a fake python3 (and ~/eejax if `clone`); returns its argvs."""
    home = tmp_path / "worker"
    (home / "eejax" if clone else home).mkdir(parents=True, exist_ok=True)
    log = tmp_path / "python3.log"
    log.unlink(missing_ok=True)
    bin_dir = tmp_path / "workerbin"
    _fake(bin_dir / "python3", log)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}
    subprocess.run(["bash", "-c", command], cwd=home, env=env, check=True, timeout=60)
    return [c["argv"] for c in _calls(log)]


def test_tpu_pod_run(root, tmp_path):
    head = _git(root, "rev-parse", "HEAD")
    _, calls = _pod(root, tmp_path)
    assert len(calls) == 2
    prefix = ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--project", "proj",
              "--worker=all", "--command"]
    for call in calls:
        assert call["argv"][:-1] == prefix
    install, run = (call["argv"][-1] for call in calls)

    words = shlex.split(install.replace(";", " ; "))
    assert ["git", "clone", "--quiet", URL, "eejax"] == words[words.index("clone") - 1:words.index("clone") + 4]
    assert head in words and "checkout" in words
    assert "pip" in words and "install" in words and ".[tfds]" in words and "jax[tpu]" in words

    (argv,) = _run_remote(run, tmp_path)
    assert argv == ["-m", "experiments.demo", "--config", "configs/demo.py:smoke", "--config.x=a b",
                    "--config.y='q'", "--workdir", "$HOME/not expanded"]


def test_tpu_install_clones_then_updates(root, tmp_path):
    """The install command, run for real against a local clone URL: first a clone, then an update to a branch."""
    _, calls = _pod(root, tmp_path, url=str(root))
    argvs = _run_remote(calls[0]["argv"][-1], tmp_path, clone=False)
    assert argvs[-1] == ["-m", "pip", "install", "--quiet", "-e", ".[tfds]", "jax[tpu]"]
    worker_repo = tmp_path / "worker/eejax"
    assert _git(worker_repo, "rev-parse", "HEAD") == _git(root, "rev-parse", "HEAD")

    _git(root, "checkout", "-q", "-b", "exp")
    (root / "configs/demo.py").write_text("# changed\n")
    _git(root, "commit", "-q", "-am", "change")
    (tmp_path / "gcloud.log").unlink()
    _, calls = _pod(root, tmp_path, "--branch", "exp", url=str(root))
    _run_remote(calls[0]["argv"][-1], tmp_path, clone=False)
    assert _git(worker_repo, "rev-parse", "HEAD") == _git(root, "rev-parse", "exp")


def test_tpu_dry_run_prints_and_does_not_call_gcloud(root, tmp_path):
    r, calls = _pod(root, tmp_path, dry_run=True)
    assert calls == []
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        words = shlex.split(line)  # the printed commands are copy-pasteable
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert "--worker=all" in words
    (argv,) = _run_remote(shlex.split(lines[1])[-1], tmp_path)
    assert argv[-3:] == ["--config.y='q'", "--workdir", "$HOME/not expanded"]


def test_tpu_needs_zone_and_repo_url(root, tmp_path):
    r = _launch(["--tpu", "t", "demo"], root, tmp_path)
    assert r.returncode == 2 and "--zone" in r.stderr
    r = _launch(["--tpu", "t", "--zone", "z", "demo"], root, tmp_path)  # the temp repo has no remote
    assert r.returncode != 0 and "EEJAX_REPO_URL" in r.stderr
