"""`edgeprune agent` processes on loopback for the pool and matrix tests (`tests/matrixagent.py`: real server, real
sockets, a deterministic latency model), and the devices file that registers them as boards of one kind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Agent:
    """One agent process; `url` once it listens. `die_after`: it exits on its (N+1)-th measurement."""

    def __init__(self, die_after: int | None = None, delay: float = 0.0) -> None:
        cmd = [sys.executable, "-m", "tests.matrixagent", "--port", "0", "--delay", str(delay)]
        if die_after is not None:
            cmd += ["--die-after", str(die_after)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=ROOT)
        self.url = ""

    def ready(self) -> Agent:
        """Wait for its first line: the address it listens on."""
        line = self.proc.stdout.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if m is None:
            self.stop()
            raise RuntimeError(f"the test agent did not start: {line!r}")
        self.url = f"http://{m.group(1)}:{m.group(2)}"
        return self

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_agents(**die_after: int | None) -> dict[str, Agent]:
    """Agents by board name (`name=None`: healthy, `name=N`: dies on its (N+1)-th measurement), started together."""
    agents = {name: Agent(n) for name, n in die_after.items()}
    try:
        return {name: a.ready() for name, a in agents.items()}
    except BaseException:
        for a in agents.values():
            a.stop()
        raise


def devices_toml(path: Path, boards: dict[str, Agent], kind: str = "cpu") -> Path:
    rows = ",\n".join(f'  {{ name = "{name}", agent = "{a.url}", timeout_s = 60 }}' for name, a in boards.items())
    path.write_text(f"[{kind}]\nboards = [\n{rows},\n]\n")
    return path
