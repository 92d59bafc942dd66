"""The service of this working tree against the service of an earlier git revision, side by side.

Both serve the same model on this machine, one at a time, in alternating rounds (old, new, old,
new, ...), each loaded by the same ``transfiner bench`` closed loop, so slow drifts of a shared
machine hit both alike. Prints images/s per round, the medians and their ratio.

    python -m scripts.bench_against_revision 054c9aa --rounds 2 --out bench-results/vs-054c9aa

A setting against the default, on the same code: ``HEAD --new-env TRANSFINER_WORKER_PROCESS=true``.
Uploads of a given size: ``--images DIR`` (every server gets the same files); ``--env`` sets a
variable for both servers. The table also gives, per request, the server's mean decode time and
the CPU time and page faults of the server's process (its worker processes not counted).

Each tree's own ``transfiner`` serves (and, for the working tree, loads): ``transfiner.cli.main``
where ``[tool.setuptools] package-dir`` maps ``transfiner.model`` and the rest onto the tree's
folders, ``transfiner/cli.py`` before that, ``model/cli.py`` before that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from scripts.results import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 4  # unmeasured requests before each load step

# Imports each package of the tree's package-dir from the tree's own folder, ahead of whatever is
# installed (the installed transfiner maps transfiner.model onto the working tree's model/).
TREE_FINDER = """
import importlib.util, sys
from pathlib import Path

class TreeFinder:
    folders = {folders!r}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in cls.folders:
            folder = Path(cls.folders[name])
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        return None

sys.meta_path.insert(0, TreeFinder)
"""


def package_folders(tree: Path) -> dict[str, str]:
    """Import name -> folder of the tree's ``[tool.setuptools] package-dir``; empty where it has none."""
    import tomllib  # Python 3.11+: imported here, as ruff's target (3.10) would sort it as third-party

    pyproject = tree / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    package_dir = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: str(tree / folder) for name, folder in package_dir.items() if name}


def command(tree: Path) -> list[str]:
    """``transfiner`` as the tree runs it, from the tree's own files whatever is installed.

    - ``transfiner/cli/main.py``: the packages mapped onto the tree's folders by its package-dir.
    - ``transfiner/cli.py`` or ``model/cli.py`` (older trees): top-level packages, found on the
      PYTHONPATH that ``one_round`` sets to the tree.
    """
    if (tree / "transfiner" / "cli" / "main.py").is_file():
        prelude, module = TREE_FINDER.format(folders=package_folders(tree)), "transfiner.cli.main"
    else:
        prelude, module = "", "transfiner.cli" if (tree / "transfiner" / "cli.py").is_file() else "model.cli"
    return [sys.executable, "-c", f"{prelude}\nimport sys\nfrom {module} import main\nsys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while starting, 503 while loading
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not become ready (exit status {server.poll()})")


def process_usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of one process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def one_round(tree: Path, args: argparse.Namespace, out: Path, extra_env: dict[str, str]) -> dict[str, dict]:
    """Serve from ``tree`` (with ``extra_env``), load it at each concurrency, stop it; -> per
    concurrency: images/s, the server's mean decode seconds an upload, and its process's CPU
    milliseconds and page faults per answered request (worker processes not counted)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree), **extra_env)
    server = subprocess.Popen(
        [
            *command(tree),
            "serve",
            "--model",
            args.model,
            "--device",
            "cpu",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    steps = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        for concurrency in args.concurrency:
            before = process_usage(server.pid)
            subprocess.run(
                [
                    *command(ROOT),
                    "bench",
                    "--url",
                    f"http://127.0.0.1:{port}",
                    "--concurrency",
                    str(concurrency),
                    "--requests",
                    str(args.requests),
                    "--warmup",
                    str(WARMUP),
                    *(["--images", args.images] if args.images else ["--num-images", "8"]),
                    "--out",
                    str(out / f"c{concurrency}"),
                ],
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                check=True,
                capture_output=True,
                timeout=900,
            )
            step = json.loads((out / f"c{concurrency}" / "report.json").read_text())["steps"][0]
            after, answered = process_usage(server.pid), args.requests + WARMUP
            steps[str(concurrency)] = {
                "images_per_s": step["images_per_s"],
                "decode_s": ((step.get("server") or {}).get("decode") or {}).get("mean_s"),
                "server_cpu_ms": 1000 * (after[0] - before[0]) / answered,
                "page_faults": (after[1] - before[1]) / answered,
            }
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_against_revision", description=__doc__.splitlines()[0]
    )
    parser.add_argument("revision", help="the git revision to compare with, e.g. a commit of main")
    parser.add_argument(
        "--new", default=None, metavar="REVISION", help="compare this revision instead of the working tree"
    )
    parser.add_argument(
        "--new-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the new server only (repeatable)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for both servers (repeatable)",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--images", default=None, help="a folder of images to send (default: 8 generated)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench-results/vs-revision")
    args = parser.parse_args()

    both_env = dict(item.split("=", 1) for item in args.env)
    new_env = dict(item.split("=", 1) for item in args.new_env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"old": Path(scratch) / "old", "new": Path(scratch) / "new" if args.new else ROOT}
        for name, revision in (("old", args.revision), ("new", args.new)):
            if revision:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees[name]), revision],
                    check=True,
                    capture_output=True,
                )
        try:
            rounds = []
            for index in range(args.rounds):
                for name, tree in trees.items():
                    extra_env = {**both_env, **(new_env if name == "new" else {})}
                    steps = one_round(tree, args, Path(scratch) / f"{name}-{index}", extra_env)
                    rounds.append({"round": index, "tree": name, "steps": steps})
                    print(
                        f"round {index} {name}: "
                        + ", ".join(
                            f"c={c} {step['images_per_s']:.2f} img/s, server {step['server_cpu_ms']:.1f} ms CPU and "
                            f"{step['page_faults']:.0f} page faults a request"
                            for c, step in steps.items()
                        ),
                        flush=True,
                    )
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)

    setting = "".join(f" with {item}" for item in args.new_env)
    both = "".join(f", {item}" for item in args.env)
    summary = {}

    def median(tree: str, c: str, key: str) -> float | None:
        values = [r["steps"][c][key] for r in rounds if r["tree"] == tree and r["steps"][c][key] is not None]
        return statistics.median(values) if values else None

    def pair(c: str, key: str, scale: float, digits: int) -> str:
        values = [median(tree, c, key) for tree in ("old", "new")]
        return ", ".join("-" if v is None else f"{scale * v:.{digits}f}" for v in values)

    rows = []
    for c in map(str, args.concurrency):
        old, new = median("old", c, "images_per_s"), median("new", c, "images_per_s")
        summary[c] = {
            "old": old,
            "new": new,
            "ratio": new / old,
            **{
                f"{key}_{tree}": median(tree, c, key)
                for key in ("decode_s", "server_cpu_ms", "page_faults")
                for tree in ("old", "new")
            },
        }
        rows.append(
            [
                c,
                f"{old:.2f}",
                f"{new:.2f}",
                f"{new / old:.2f}x",
                pair(c, "decode_s", 1000, 1),
                pair(c, "server_cpu_ms", 1, 1),
                pair(c, "page_faults", 1, 0),
            ]
        )
    lines = [
        f"# Service throughput: {args.new or 'working tree'}{setting} vs {args.revision} "
        f"(model {args.model}{both}, CPU)",
        "",
        *markdown_table(
            [
                "clients",
                "old img/s (median)",
                "new img/s (median)",
                "new / old",
                "decode ms (old, new)",
                "server CPU ms a request (old, new)",
                "page faults a request (old, new)",
            ],
            rows,
            align="rrrrrrr",
        ),
    ]
    report = {
        "revision": args.revision,
        "env": both_env,
        "new_env": new_env,
        "model": args.model,
        "images": args.images,
        "rounds": rounds,
        "summary": summary,
    }
    write_report(out, "bench_against_revision", report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
