"""The service of this working tree against the service of an earlier git revision, side by side.

Both serve the same model on this machine, one at a time, in alternating rounds (old, new, old,
new, ...), each loaded by the same ``transfiner bench`` closed loop, so slow drifts of a shared
machine hit both alike. Prints images/s per round, the medians and their ratio.

    .venv/bin/python scripts/bench_against_revision.py 054c9aa --rounds 2 --out bench-results/vs-054c9aa

A setting against the default, on the same code: ``HEAD --new-env TRANSFINER_WORKER_PROCESS=true``.
Uploads of a given size: ``--images DIR`` (every server gets the same files); ``--env`` sets a
variable for both servers. The table also gives the servers' mean decode time an upload.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(tree: Path) -> list[str]:
    """``transfiner`` as the tree runs it, installed or not (older trees kept it in ``model.cli``)."""
    module = "transfiner.cli" if (tree / "transfiner" / "cli.py").is_file() else "model.cli"
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(tree: Path, args: argparse.Namespace, out: Path, extra_env: dict[str, str]) -> tuple[dict, dict]:
    """Serve from ``tree`` (with ``extra_env``), load it, stop it; -> ({concurrency: images/s},
    {concurrency: the server's mean decode seconds an upload})."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree), **extra_env)
    server = subprocess.Popen(
        [*command(tree), "serve", "--model", args.model, "--device", "cpu", "--port", str(port),
         "--log-level", "warning"],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [*command(ROOT), "bench", "--url", f"http://127.0.0.1:{port}", "--wait-ready", "120",
             "--concurrency", *map(str, args.concurrency), "--requests", str(args.requests),
             *(["--images", args.images] if args.images else ["--num-images", "8"]), "--out", str(out)],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, capture_output=True, timeout=900,
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    decode = {str(s["concurrency"]): ((s.get("server") or {}).get("decode") or {}).get("mean_s") for s in steps}
    return {str(step["concurrency"]): step["images_per_s"] for step in steps}, decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare with, e.g. a commit of main")
    parser.add_argument("--new", default=None, metavar="REVISION",
                        help="compare this revision instead of the working tree")
    parser.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the new server only (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for both servers (repeatable)")
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
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees[name]), revision],
                               check=True, capture_output=True)
        try:
            rounds = []
            for index in range(args.rounds):
                for name, tree in trees.items():
                    extra_env = {**both_env, **(new_env if name == "new" else {})}
                    result, decode = one_round(tree, args, Path(scratch) / f"{name}-{index}", extra_env)
                    rounds.append({"round": index, "tree": name, "images_per_s": result, "decode_s": decode})
                    print(f"round {index} {name}: " + ", ".join(f"c={c} {v:.2f} img/s" for c, v in result.items()),
                          flush=True)
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)

    setting = "".join(f" with {item}" for item in args.new_env)
    both = "".join(f", {item}" for item in args.env)
    lines = [f"# Service throughput: {args.new or 'working tree'}{setting} vs {args.revision} "
             f"(model {args.model}{both}, CPU)",
             "",
             "| clients | old img/s (median) | new img/s (median) | new / old | old decode ms | new decode ms |",
             "|---:|---:|---:|---:|---:|---:|"]
    summary = {}

    def decode_ms(tree: str, c: str) -> str:
        values = [r["decode_s"][c] for r in rounds if r["tree"] == tree and r["decode_s"].get(c) is not None]
        return f"{1000 * statistics.median(values):.1f}" if values else "-"

    for c in map(str, args.concurrency):
        old = statistics.median(r["images_per_s"][c] for r in rounds if r["tree"] == "old")
        new = statistics.median(r["images_per_s"][c] for r in rounds if r["tree"] == "new")
        summary[c] = {"old": old, "new": new, "ratio": new / old}
        lines.append(f"| {c} | {old:.2f} | {new:.2f} | {new / old:.2f}x | {decode_ms('old', c)} | {decode_ms('new', c)} |")
    (out / "bench_against_revision.json").write_text(json.dumps(
        {"revision": args.revision, "env": both_env, "new_env": new_env, "model": args.model, "images": args.images,
         "rounds": rounds, "summary": summary},
        indent=2))
    (out / "bench_against_revision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
