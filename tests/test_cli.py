"""The ``lkpatch`` command and checkpoint handling: outputs, files, and every error path."""
import os
import subprocess
import sys
import time

import pytest
import torch
import timm
import torch.nn as nn

from lkpatch import checkpoint as ckpt_io
from lkpatch.checkpoint import CheckpointError
from conftest import digest, run_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


run = run_cli


@pytest.fixture(scope="module")
def reference():
    from conftest import shared_data_dir
    path = shared_data_dir() / "replknet_tiny_reference.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found (the official code's reference outputs)")
    return torch.load(path, weights_only=True)


def tiny_args(reference):
    cfg = reference["config"]
    args = []
    for key in ("large_kernel_sizes", "layers", "channels", "num_classes"):
        args += ["--model-arg", f"{key}={cfg[key]}"]
    return ["--model", "replknet_31b", *args, "--input-size", "64"]


# --- checkpoint module ------------------------------------------------------------------------

def test_state_dicts_are_found_in_wrappers_and_prefixes_restored():
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    assert [(e.key, e.prefix) for e in ckpt_io.state_dicts(sd)] == [(None, "")]
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "model_ema": sd, "epoch": 3}
    entries = ckpt_io.state_dicts(wrapped)
    assert [(e.key, e.prefix) for e in entries] == [("model", "module."), ("model_ema", "")]
    assert entries[0].state_dict.keys() == sd.keys()
    back = ckpt_io.replace_state_dicts(wrapped, entries)
    assert back.keys() == wrapped.keys() and back["epoch"] == 3
    assert back["model"].keys() == wrapped["model"].keys()
    with pytest.raises(CheckpointError, match="no state_dict found"):
        ckpt_io.state_dicts({"epoch": 3, "optimizer": {}})
    with pytest.raises(CheckpointError, match="no state_dict found"):
        ckpt_io.state_dicts([1, 2])


def test_atomic_save_never_clobbers_and_never_leaves_half_files(tmp_path):
    target = tmp_path / "out.pth"
    ckpt_io.save_atomic({"w": torch.ones(3)}, str(target))
    first = digest(target)
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        ckpt_io.save_atomic({"w": torch.zeros(3)}, str(target))
    assert digest(target) == first
    with pytest.raises(Exception):  # a lambda cannot be pickled: the save fails midway
        ckpt_io.save_atomic({"w": torch.zeros(3), "f": lambda: 0}, str(target), overwrite=True)
    assert digest(target) == first  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]  # no temporary left behind
    ckpt_io.save_atomic({"w": torch.zeros(3)}, str(target), overwrite=True)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(3))
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.save_atomic({}, str(tmp_path / "missing" / "x.pth"))


def test_a_failed_commit_drops_its_signal_and_other_threads_do_not_defer(tmp_path, monkeypatch):
    """A signal during a commit that then fails: the error is raised, and no stale signal is left
    for the next write. A commit in another thread leaves the main thread's signals alone."""
    import errno
    import signal
    import threading

    def link_then_fail(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "link", link_then_fail)
    with ckpt_io.signals_raise():
        with pytest.raises(ckpt_io.CheckpointError, match="nothing was written"):
            ckpt_io.save_atomic({"w": torch.ones(1)}, str(tmp_path / "a.pth"))
    monkeypatch.undo()
    ckpt_io.save_atomic({"w": torch.ones(1)}, str(tmp_path / "b.pth"))  # no stale Interrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pth"]

    started, release = threading.Event(), threading.Event()
    real_link = os.link

    def slow_link(*args):
        started.set()
        release.wait(10)
        return real_link(*args)
    monkeypatch.setattr(os, "link", slow_link)
    writer = threading.Thread(target=ckpt_io.save_atomic, args=({"w": torch.ones(1)}, str(tmp_path / "c.pth")))
    with ckpt_io.signals_raise():
        writer.start()
        assert started.wait(10)
        try:
            with pytest.raises(ckpt_io.Interrupted):  # the main thread is interrupted at once
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    time.sleep(0.01)
        finally:
            release.set()
            writer.join(10)
    assert (tmp_path / "c.pth").is_file()


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.load(str(tmp_path / "none.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        ckpt_io.load(str(tmp_path / "text.pth"))
    torch.save({"w": torch.randn(100, 100)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        ckpt_io.load(str(tmp_path / "cut.pth"))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match="unsafe-load-pickle-runs-code"):
        ckpt_io.load(str(tmp_path / "module.pth"))
    assert isinstance(ckpt_io.load(str(tmp_path / "module.pth"), allow_pickled_code=True), nn.Linear)


# --- lkpatch convert --------------------------------------------------------------------------

def test_convert_keeps_the_wrapper_and_never_touches_the_input(capsys, tmp_path, reference):
    src = tmp_path / "train.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference["state_dict"].items()}, "epoch": 7,
                "model_ema": {k: v.half() if v.is_floating_point() else v for k, v in reference["state_dict"].items()}},
               src)
    before = digest(src)
    code, out, err = run(capsys, "convert", src, *tiny_args(reference), "-o", tmp_path / "train.lkpatch.pth")
    assert code == 0, err
    assert digest(src) == before
    assert "15 of 15 depthwise convolutions converted" in out
    assert "stages.0.blocks.0.large_kernel.lkb_origin.conv" in out and "converted" in out
    assert "max relative error" in out
    written = torch.load(tmp_path / "train.lkpatch.pth", weights_only=True)
    assert written.keys() == {"model", "epoch", "model_ema"} and written["epoch"] == 7
    assert written["model"].keys() == {f"module.{k}" for k in reference["state_dict"]}
    for k, v in reference["state_dict"].items():
        assert torch.equal(written["model"][f"module.{k}"], v)
        assert written["model_ema"][k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)


def test_convert_reparam_writes_the_official_deploy_layout(capsys, tmp_path, reference):
    src = tmp_path / "train.pth"
    torch.save({"state_dict": reference["state_dict"]}, src)
    code, out, err = run(capsys, "convert", src, *tiny_args(reference), "--reparam", "-o", tmp_path / "deploy.pth")
    assert code == 0, err
    assert "re-parameterized" in out
    written = torch.load(tmp_path / "deploy.pth", weights_only=True)["state_dict"]
    assert written.keys() == reference["deploy_state_dict"].keys()
    for k, v in reference["deploy_state_dict"].items():
        assert (written[k] - v).abs().max().item() <= 1e-5, k
    # a deploy checkpoint is recognised as such and converts again
    code, out, err = run(capsys, "convert", tmp_path / "deploy.pth", *tiny_args(reference), "-o", tmp_path / "d2.pth")
    assert code == 0, err


def test_convert_refuses_to_overwrite_without_force(capsys, tmp_path, reference):
    src = tmp_path / "sd.pth"
    torch.save(reference["state_dict"], src)
    out_file = tmp_path / "out.pth"
    out_file.write_bytes(b"precious")
    code, _, err = run(capsys, "convert", src, *tiny_args(reference), "-o", out_file)
    assert code == 1 and "exists; pass --force" in err and err.count("\n") == 1
    assert out_file.read_bytes() == b"precious"
    code, _, err = run(capsys, "convert", src, *tiny_args(reference), "-o", out_file, "--force")
    assert code == 0, err
    assert torch.load(out_file, weights_only=True).keys() == reference["state_dict"].keys()
    before = digest(src)
    code, _, err = run(capsys, "convert", src, *tiny_args(reference), "-o", src, "--force")
    assert code == 1 and "never modifies its input" in err
    assert digest(src) == before


def test_convert_torchvision_model_with_bn_folding(capsys, tmp_path):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    torch.save(model.state_dict(), tmp_path / "mnv3.pth")
    code, out, err = run(capsys, "convert", tmp_path / "mnv3.pth", "--model", "torchvision:mobilenet_v3_small",
                         "--model-arg", "num_classes=10", "--reparam", "--input-size", "64")
    assert code == 0, err
    assert "11 BatchNorm(s) folded" in out
    written = torch.load(tmp_path / "mnv3.deploy.pth", weights_only=True)
    assert len(written) < len(model.state_dict())


def test_classifier_size_is_taken_from_the_checkpoint(capsys, tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("convnext_atto", num_classes=3).state_dict()
    torch.save({"model": sd}, tmp_path / "ft.pth")
    code, out, err = run(capsys, "convert", tmp_path / "ft.pth", "--model", "convnext_atto", "--input-size", "64")
    assert code == 0, err
    assert "num_classes=3" in out


@pytest.mark.parametrize("make,argv,message", [
    (None, ["--model", "convnext_atto"], "does not exist"),
    ("text", ["--model", "convnext_atto"], "not a PyTorch checkpoint"),
    ("module", ["--model", "convnext_atto"], "--unsafe-load-pickle-runs-code"),
    ("nosd", ["--model", "convnext_atto"], "no state_dict found"),
    ("sd", ["--model", "no_such_model_xyz"], "unknown model"),
    ("sd", ["--model", "torchvision:no_such_model"], "unknown torchvision model"),
    ("sd", ["--model", "convnext_atto"], "2 unexpected (w, b)"),
    ("ints", ["--model", "convnext_atto"], "not floating point where the model's are (stem.0.weight int64"),
    ("sd", ["--model", "convnext_atto", "--model-arg", "oops"], "KEY=VALUE"),
    ("sd", ["--model", "convnext_atto", "--model-arg", "no_such_arg=1"], "cannot build"),
    ("sd", [], "--model NAME is required"),
])
def test_convert_errors_are_one_line(capsys, tmp_path, make, argv, message):
    path = tmp_path / "in.pth"
    if make == "text":
        path.write_text("hello")
    elif make == "module":
        torch.save(nn.Linear(2, 2), path)
    elif make == "nosd":
        torch.save({"epoch": 1}, path)
    elif make == "sd":
        torch.save({"w": torch.ones(2), "b": torch.ones(1)}, path)
    elif make == "ints":  # would load, cast to float, without a word
        sd = timm.create_model("convnext_atto").state_dict()
        torch.save({k: v.to(torch.int64) for k, v in sd.items()}, path)
    code, _, err = run(capsys, "convert", path, *argv)
    assert code == 1
    assert message in err and err.startswith("lkpatch: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not any(p.name.endswith(".lkpatch.pth") for p in tmp_path.iterdir())


def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "convert", tmp_path / "none.pth", "--model", "convnext_atto", "--verbose")
    assert code == 1 and "Traceback" in err and "does not exist" in err


def test_bad_options_exit_2_with_one_line(capsys):
    code, _, err = run(capsys, "convert", "x.pth", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err and err.count("\n") == 1
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_version(capsys):
    import lkpatch

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"lkpatch {lkpatch.__version__}\n"


def test_pickled_module_converts_with_the_opt_in_flag(capsys, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto")
    torch.save(model, tmp_path / "whole.pth")
    code, out, err = run(capsys, "convert", tmp_path / "whole.pth", "--model", "convnext_atto",
                         "--unsafe-load-pickle-runs-code", "--input-size", "64", "-o", tmp_path / "whole.lkpatch.pth")
    assert code == 0, err
    written = torch.load(tmp_path / "whole.lkpatch.pth", weights_only=True)
    assert written.keys() == model.state_dict().keys()


# --- info, build, bench, demo -----------------------------------------------------------------

def test_info_lists_versions_and_paths(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert torch.__version__ in out and "path float32" in out and "path float64" in out and "nvcc" in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in out


def test_build_error_is_one_line(capsys, monkeypatch):
    from lkpatch import build

    def fail(**kwargs):
        raise build.BuildError("nvcc not found.\nSet CUDA_HOME to the toolkit folder.")
    monkeypatch.setattr(build, "build", fail)
    code, _, err = run(capsys, "build")
    assert code == 1 and err == "lkpatch: error: nvcc not found. Set CUDA_HOME to the toolkit folder.\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_gpu_says_so(capsys):
    code, _, err = run(capsys, "bench")
    assert code == 1 and "needs a CUDA GPU" in err
    code, _, err = run(capsys, "-v", "bench")  # lkpatch's own --verbose before the command
    assert code == 1 and "needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--batch", "--size"])
def test_demo_sizes_must_be_positive(capsys, option):
    code, _, err = run(capsys, "demo", "--device", "cpu", option, "0")
    assert code == 2 and "must be at least 1" in err


@pytest.mark.slow
def test_demo_runs_end_to_end_as_a_command():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "lkpatch", "demo", "--device", "cpu"], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "53 of 53 depthwise convolutions converted" in proc.stdout
    assert "reloaded checkpoint" in proc.stdout and "demo finished" in proc.stdout
