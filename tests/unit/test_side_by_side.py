"""tools/side-by-side: the commands run at once, each line whole and named, every ending told."""

from __future__ import annotations

import subprocess

from kit import REPO

TOOL = REPO / "tools" / "side-by-side"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True, timeout=30)


def test_lines_come_whole_and_named_and_a_failure_does_not_stop_the_other():
    done = run("a", "printf 'half'; sleep 1; echo ' line'; exit 3", "b", "echo first; sleep 2; echo second")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert "a | half line" in lines and "b | first" in lines and "b | second" in lines
    assert lines.index("b | first") < lines.index("a | half line") < lines.index("b | second")
    assert "side-by-side: a: FAILED (exit 3)" in lines and "side-by-side: b: passed" in lines
    assert done.stderr.strip() == "side-by-side: failed: a"


def test_each_command_reads_an_empty_stdin_of_its_own(tmp_path):
    # Were stdin shared, a command that makes it non-blocking would make it so for the other.
    done = subprocess.run([str(TOOL), "a", "cat; echo a-read-eof", "b", "cat; echo b-read-eof"], input="from the caller\n",
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "a | a-read-eof" in done.stdout.splitlines() and "b | b-read-eof" in done.stdout.splitlines()
    assert "from the caller" not in done.stdout


def test_all_passed_is_exit_0():
    done = run("one", "true", "two", "echo out; echo err >&2")
    assert done.returncode == 0 and "two | out" in done.stdout and "two | err" in done.stdout


def test_bad_arguments_are_one_line_and_exit_2():
    for args in [(), ("lonely",), ("a/b", "true"), ("ok", "echo started", "a b", "true")]:
        done = run(*args)
        assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, (args, done)


def test_a_failed_commands_last_lines_come_again_at_the_end():
    # A CI log shows its tail: a failure's cause must be there, not above the other's output.
    numbered = "for i in $(seq 1 30); do echo line-$i; done"
    done = run("a", f"{numbered}; exit 2", "b", "sleep 1; echo b-done")
    lines = done.stdout.splitlines()
    again = lines.index("side-by-side: a FAILED; its last 20 lines again:")
    assert lines[again + 1:] == [f"a | line-{i}" for i in range(11, 31)]
    assert lines.index("b | b-done") < again
    assert "again" not in run("a", numbered, "b", "true").stdout
