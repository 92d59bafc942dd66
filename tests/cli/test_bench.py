"""``transfiner bench``'s command line: flags that do not go together, and the command line it
records, which never shows the API key. Runs against a live server are in
tests/service/loadtest/test_loadtest.py."""

from __future__ import annotations

import pytest

from transfiner.cli.bench import command_line
from transfiner.cli.main import build_parser, main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "1", "--rate", "2"], "not allowed with argument --concurrency"),
        (["--requests", "3", "--duration", "2"], "not allowed with argument --requests"),
    ],
)
def test_conflicting_flags_exit_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--url", "http://127.0.0.1:9", *flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_command_line_never_shows_the_api_key():
    args = build_parser().parse_args(
        [
            "bench",
            "--url",
            "http://h:1",
            "--rate",
            "1.5",
            "--api-key",
            "s3cret",
            "--param",
            "refine=false",
            "--out",
            "o",
        ]
    )
    line = command_line(args)
    assert "s3cret" not in line and "--api-key '***'" in line and "--rate 1.5" in line
