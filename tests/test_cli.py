"""The command line: python -m fastbn [report|bench], --help, --version, errors."""
import subprocess
import sys

import fastbn

from conftest import subprocess_env


def _run(*args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastbn", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"fastbn {fastbn.__version__} ")


def test_help_names_the_commands_in_plain_text():
    r = _run("--help")
    assert r.returncode == 0
    assert "report" in r.stdout and "bench" in r.stdout and "``" not in r.stdout


def test_an_unknown_command_is_an_error_naming_the_choices():
    r = _run("bogus")
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr and "bench" in r.stderr


def test_bench_without_pytorch_says_so_in_one_line():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastbn import benchmark\n"
            "sys.exit(benchmark.main(['--rows', 'nc-32x16', '--threads', '1', '--ops', 'fwd-eval',"
            " '--repeat', '1', '--sample-ms', '1']))\n")
    r = _run(code=code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("PyTorch is not installed") == 1
    assert "speed-up vs PyTorch" not in r.stdout


def test_the_main_job_report_runs_and_passes_its_checks():
    r = _run()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Self-check against the float64 reference" in r.stdout
    assert "FAIL" not in r.stdout and "MISMATCH" not in r.stdout
