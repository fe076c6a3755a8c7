"""``lkpatch bench --plot``: plotting saved results, on the CPU."""
import json
import struct

import pytest

from lkpatch import bench
from lkpatch.cli import main


def op_row(shape, dtype, layout, pytorch_ms, lkpatch_ms):
    """One op row as ``lkpatch bench --passes --json`` writes it."""
    row = {"shape": list(shape), "dtype": dtype, "layout": layout, "effective_gflop_fwd_bwd": 1.0}
    for side, ms in (("pytorch", pytorch_ms), ("lkpatch", lkpatch_ms)):
        for metric, share in (("fwd_ms", 0.3), ("fwd_bwd_ms", 1.0), ("fwd_bwd_gpu_ms", 0.9), ("input_grad_ms", 0.3),
                              ("weight_grad_ms", 0.3), ("bias_grad_ms", 0.05)):
            row[bench.result_key(side, metric)] = ms * share
    return row


def model_row(name, amp, layout, pytorch_ips, lkpatch_ips, queue=3):
    """One model row as ``lkpatch bench --model NAME --json`` writes it."""
    row = {"model": name, "batch": 64, "size": 224, "amp": amp, "queue": queue, "layout": layout}
    for side, ips in (("pytorch", pytorch_ips), ("lkpatch", lkpatch_ips)):
        for kind in ("", "queued_") if queue else ("",):
            row[bench.result_key(side, f"{kind}img_per_s")] = ips
            row[bench.result_key(side, f"{kind}step_ms")] = 64 / ips * 1e3
    return row


STAMP = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "commit": "abc1234"}
ROWS = [op_row((64, 384, 64, 64, 31, 31), "float32", "nchw", 200.7, 13.5),
        op_row((64, 1024, 7, 7, 13, 13), "bfloat16", "channels_last", 2.19, 0.218),
        op_row((64, 96, 56, 56, 7, 7), "float32", "nchw", 2.80, 0.603)]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


def test_synthetic_rows_are_in_the_format_bench_prints():
    assert "31x31" in bench.format_table(ROWS, peak_tflops=50.0)  # bench's own reader takes them
    assert "weight_grad" in bench.format_passes(ROWS)


def test_plot_from_saved_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ops = tmp_path / "op.json"
    ops.write_text(json.dumps({**STAMP, "fp32_tflops_sgemm": 50.0, "rows": ROWS}))
    models = tmp_path / "model.json"
    models.write_text(json.dumps({**STAMP, "models": [model_row("replknet_31b", "bfloat16", "nchw", 133, 626),
                                                      model_row("convnext_tiny", "float32", "nchw", 1610, 1636, 0)]}))

    only_ops = tmp_path / "ops.png"
    assert main(["bench", "--plot", str(only_ops), "--from", str(ops)]) == 0
    assert f"wrote {only_ops}" in capsys.readouterr().out
    both = tmp_path / "both.png"
    assert main(["bench", "--plot", str(both), "--from", str(ops), str(models)]) == 0
    only_models = tmp_path / "models.png"
    assert main(["bench", "--plot", str(only_models), "--from", str(models)]) == 0
    for path in (only_ops, both, only_models):
        assert path.stat().st_size > 10_000  # an image with bars and labels, not a blank canvas
    # the per-model panel comes below the per-layer one
    assert png_size(both)[1] > png_size(only_ops)[1] and png_size(both)[1] > png_size(only_models)[1]


def test_plot_stamps_and_merges(tmp_path):
    other = {**STAMP, "device": "NVIDIA H200"}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**STAMP, "rows": ROWS[:1]}))
    b.write_text(json.dumps({**other, "rows": ROWS[1:], "models": [model_row("resnet18", "bfloat16", "nchw", 1, 2)]}))
    merged = bench.load_results([str(a), str(b), str(a)])
    assert merged["rows"] == ROWS + ROWS[:1] and len(merged["models"]) == 1
    assert merged["stamps"] == ["NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, lkpatch abc1234",
                                "NVIDIA H200, torch 2.11.0+cu130, lkpatch abc1234"]


def test_plot_errors_say_what_is_wrong(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**STAMP, "rows": []}))
    out = tmp_path / "x.png"
    assert main(["bench", "--plot", str(out), "--from", str(empty)]) == 1
    assert "no `lkpatch bench --json` results" in capsys.readouterr().err
    assert main(["bench", "--plot", str(out), "--from", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["bench", "--from", str(empty)]) == 2
    assert "--from needs --plot" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**STAMP, "rows": ROWS}))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # as if not installed
    assert main(["bench", "--plot", str(out), "--from", str(good)]) == 1
    assert "pip install 'lkpatch[plot]'" in capsys.readouterr().err
    assert not out.exists()


def test_plot_of_foreign_rows_and_unusable_paths_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**STAMP, "rows": ROWS}))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"rows": [{"lkpatch_fwd_bwd_ms": 1.0, "shape": [1, 2, 3, 4, 5, 6]}]}))
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({**STAMP, "rows": [{**ROWS[0], "lkpatch_fwd_bwd_ms": 0.0}]}))
    for files, out, message in (([foreign], tmp_path / "a.png", "KeyError"),
                                ([good, zero], tmp_path / "b.png", "ZeroDivisionError"),
                                ([good], tmp_path / "nodir" / "c.png", "output folder"),
                                ([good], tmp_path / "d.png", "is a directory")):
        if out.name == "d.png":
            out.mkdir()
        assert main(["bench", "--plot", str(out), "--from", *map(str, files)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"lkpatch: error: cannot plot {files[0]}") and message in err and err.count("\n") == 1
        assert out.is_dir() or not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "foreign.json", "good.json", "zero.json"]  # no temporary file
    # a name without an extension gets .png, and the message names that file
    assert main(["bench", "--plot", str(tmp_path / "plain"), "--from", str(good)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'plain.png'}\n" and (tmp_path / "plain.png").exists()


def test_results_name_the_commit_of_a_checkout():
    import subprocess
    from pathlib import Path

    repo = Path(bench.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("lkpatch is not running from a git checkout")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("git is not usable here")
    commit = bench._git_commit()
    assert commit is not None and commit.replace("+dirty", "").endswith(head.stdout.strip())


def test_unusable_result_paths_are_named_before_any_timing(tmp_path, capsys):
    """--json and --plot paths are checked first: a bench run never ends in a file it cannot write."""
    for flag, path in (("--json", tmp_path / "nodir" / "r.json"), ("--plot", tmp_path / "nodir" / "r.png")):
        if flag == "--plot":
            pytest.importorskip("matplotlib")
        assert main(["bench", flag, str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("lkpatch: error: output folder") and "nodir" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
