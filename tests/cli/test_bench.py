"""`herd bench`: runs each engine in its own process and prints a table (never asserts a speed)."""

import json

from herd.cli.bench import physical_cores
from herd.cli.main import main


def test_bench_json_on_the_demo(capsys):
    assert main(["bench", "-p", "8", "-n", "4", "-t", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    herd = result["herd"]
    assert set(herd) == {"load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mib", "runs"} and herd["runs"] == 1
    assert all(v > 0 for v in herd.values())


def test_bench_table_and_errors(capsys):
    assert main(["bench", "-p", "4", "-n", "2", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "| prefill tok/s |" in out and "| decode tok/s |" in out and "| peak RSS MiB |" in out
    assert main(["bench", "-p", "0"]) == 1
    assert main(["bench", "-r", "0"]) == 1


def test_bench_repeat_keeps_each_engines_best(capsys):
    from herd.cli.bench import best_of

    assert main(["bench", "-p", "4", "-n", "2", "-t", "1", "-r", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["herd"]["runs"] == 2
    runs = [{"prefill_tok_s": 10, "decode_tok_s": 3, "load_s": 2, "peak_rss_mib": 100},
            {"prefill_tok_s": 8, "decode_tok_s": 5, "load_s": 1, "peak_rss_mib": 120}, {"error": "x"}]
    assert best_of(runs) == {"prefill_tok_s": 10, "decode_tok_s": 5, "load_s": 1, "peak_rss_mib": 120, "runs": 2}
    assert best_of([{"error": "x"}]) == {"error": "x"}
    assert 1 <= physical_cores()


def test_bench_compile_reports_the_first_step(capsys):
    """--compile reaches the child: herd decodes through the compiled step and reports its compile time;
    the table shows it without a ratio (llama.cpp has no such step)."""
    from argparse import Namespace

    from herd.cli.bench import table

    assert main(["bench", "-p", "4", "-n", "3", "-t", "1", "--compile", "--json"]) == 0
    herd = json.loads(capsys.readouterr().out)["herd"]
    assert herd["compile_s"] > 0 and herd["decode_tok_s"] > 0
    results = {"herd": dict(herd), "llama.cpp": {k: v for k, v in herd.items() if k != "compile_s"}}
    text = table(results, Namespace(model="m.gguf", n_prompt=4, n_gen=3, threads=1))
    assert "| compile s (first step) |" in text and text.splitlines()[-1].endswith(" - | - |")
