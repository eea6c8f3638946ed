"""The repository as a new user gets it: scripts/test is safe to run, nothing points outside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "test"
#: spelled in pieces so that this file does not match itself
OUTSIDE = ("TECH" + "-NOTES", "OIDL" + "_SHARED", "../" + "shared", "shared/" + "openimages", "/work" + "/")


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _run_script_sandboxed(tmp_path: Path, policy: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a copy of scripts/test as if as root on Debian, with every system command faked.

    PATH holds only fakes (apt-get, systemctl, service, pkill, killall, id) that log their
    arguments, plus the few real tools the script needs: nothing on this machine can be
    installed, started, stopped or killed. The fake apt-get asks policy-rc.d what Debian's
    maintainer scripts would ask when a package with a service is installed.
    """
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "test")
    log = tmp_path / "calls.log"
    log.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _fake(venv_bin, "python", f'echo "python $*" >>{log}')
    _fake(bin_dir, "id", "echo 0")
    _fake(
        bin_dir,
        "apt-get",
        f'echo "apt-get $*" >>{log}\n'
        f'case "$*" in *install*) if [ -x {policy} ]; then {policy} nginx start; echo "policy-rc.d says $?" >>{log};'
        f' else echo "no policy-rc.d" >>{log}; fi;; esac',
    )
    for name in ("systemctl", "service", "invoke-rc.d", "pkill", "killall"):
        _fake(bin_dir, name, f'echo "{name} $*" >>{log}')
    for tool in ("dirname", "chmod", "rm", "cat"):
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "OIDL_POLICY_RC_D": str(policy)}
    bash = shutil.which("bash")
    assert bash
    p = subprocess.run([bash, str(repo / "scripts" / "test"), "-k", "nothing"], env=env, capture_output=True,
                       text=True, timeout=60)
    return p, log.read_text().splitlines()


def test_scripts_test_never_kills_by_name() -> None:
    text = SCRIPT.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for word in ("pkill", "killall", "kill ", "systemctl stop", "service "):
        assert word not in code, f"scripts/test must not run {word.strip()!r}"


def test_scripts_test_installs_without_starting_or_stopping_services(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    p, calls = _run_script_sandboxed(tmp_path, policy)
    assert p.returncode == 0, p.stderr
    installs = [c for c in calls if c.startswith("apt-get") and " install " in c]
    # chromium and tmux are not on the sandbox's PATH, so the script installs at least those
    assert len(installs) == 1 and "chromium" in installs[0] and "tmux" in installs[0], calls
    assert calls[calls.index(installs[0]) + 1] == "policy-rc.d says 101", "Debian was allowed to start services"
    assert not policy.exists(), "the temporary policy-rc.d was left behind"
    assert not [c for c in calls if c.split()[0] in ("systemctl", "service", "invoke-rc.d", "pkill", "killall")], calls
    assert calls[-1] == "python -m pytest -q -k nothing"


def test_scripts_test_leaves_an_existing_policy_alone(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    admin = "#!/bin/sh\n# the administrator's own policy\nexit 0\n"
    policy.write_text(admin)
    policy.chmod(0o755)
    p, calls = _run_script_sandboxed(tmp_path, policy)
    assert p.returncode == 0, p.stderr
    assert policy.read_text() == admin
    assert "policy-rc.d says 0" in calls  # the administrator's choice stands
    assert not [c for c in calls if c.split()[0] in ("systemctl", "service", "pkill", "killall")], calls


@pytest.mark.parametrize("where", ["engine", "bench", "tests", "scripts", "grafana", "README.md", "pyproject.toml"])
def test_nothing_points_outside_the_repository(where: str) -> None:
    """Comments, tests and docs stand on their own: a clone has nothing beside it to point at."""
    root = REPO / where
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    hits = []
    for path in files:
        if "__pycache__" in path.parts or path.suffix in (".gz", ".pyc", ".png", ".jpg"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in OUTSIDE):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_test_data_is_documented() -> None:
    data = REPO / "tests" / "data"
    readme = (data / "README.md").read_text()
    for archive in sorted(data.glob("*.tar.gz")):
        assert archive.name in readme, archive.name
    assert "CC BY 4.0" in readme and "storage.googleapis.com/openimages" in readme
    assert re.search(r"loopback", readme)
    assert os.path.getsize(data / "test_images_2017_11.tar.gz") < 1_000_000
