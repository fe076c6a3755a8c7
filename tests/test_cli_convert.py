"""``lkpatch convert``: the check of the written file, safe writes (modes, signals, write errors),
problems reported before any work, checkpoint formats and wrappers, and what is written when."""
import argparse
import errno
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lkpatch
from lkpatch import checkpoint as ckpt_io
from lkpatch import cli
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")

NAME = "mobilenetv3_small_050"  # timm; depthwise convs followed by BatchNorms, 0.3 M parameters
ARGS = ["--model", NAME, "--model-arg", "num_classes=10", "--input-size", "32", "--batch", "1"]


run = run_cli


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def _model():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10)
    for m in model.modules():  # statistics unlike a fresh BatchNorm's, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def sd():
    return _model().state_dict()


@pytest.fixture
def ckpt(tmp_path, sd):
    path = tmp_path / "in.pth"
    torch.save(sd, path)
    return path


@functools.lru_cache(maxsize=None)
def _fused_keys():
    """The state_dict keys of the deploy structure (BatchNorms folded)."""
    model = _model()
    lkpatch.reparameterize(model)
    return set(model.state_dict())


def _written_error(out: str) -> float:
    match = re.search(r"written file \(.*\) vs original: max relative error (\S+) \(ok", out)
    assert match, out
    return float(match.group(1))


# --- the check verifies the written bytes ---------------------------------------------------------

def test_a_file_whose_bytes_differ_is_not_kept(capsys, tmp_path, ckpt, monkeypatch):
    out_file = tmp_path / "out.pth"
    out_file.write_bytes(b"old")
    serialize = ckpt_io._serialize

    def corrupting(obj, fmt, fh, metadata):  # the bytes written differ from the model that was checked
        obj = dict(obj)
        obj["conv_stem.weight"] = obj["conv_stem.weight"] * 1.5
        serialize(obj, fmt, fh, metadata)
    monkeypatch.setattr(ckpt_io, "_serialize", corrupting)
    code, out, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", out_file, "--force")
    assert code == 1 and "written file (float32 weights) vs original" in err and "nothing written" in err, err
    assert re.search(r"re-parameterized the state_dict vs original: .* \(ok", out)  # in memory all was well
    assert out_file.read_bytes() == b"old" and files(tmp_path) == ["in.pth", "out.pth"]


def test_bf16_reparam_reports_the_error_of_the_file_it_writes(capsys, tmp_path, sd):
    src = tmp_path / "bf16.pth"
    torch.save({"model": {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}}, src)
    code, out, err = run(capsys, "convert", src, *ARGS, "--reparam")
    assert code == 0, err
    assert "written file (bfloat16 weights) vs original" in out and "tolerance 1.6e-02" in out
    reported = _written_error(out)
    written = torch.load(tmp_path / "bf16.deploy.pth", weights_only=True)["model"]
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.bfloat16}
    # the same comparison made independently: the original checkpoint's model against the file's
    original, deployed = _model(), _model()
    original.load_state_dict(torch.load(src, weights_only=True)["model"])
    lkpatch.load_checkpoint(deployed, tmp_path / "bf16.deploy.pth")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = original(x), deployed(x)
    expected = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert expected > 0  # the merged weights were rounded to bf16: the file differs from fp32 math
    assert reported == pytest.approx(expected, rel=0.02, abs=1e-9)


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_batch_must_be_at_least_one(capsys, ckpt, value):
    code, _, err = run(capsys, "convert", ckpt, *ARGS, "--batch", value)
    assert code == 2 and "--batch" in err and err.count("\n") == 1


def test_default_device_is_auto_and_the_report_names_the_path(capsys, ckpt):
    code, out, err = run(capsys, "convert", ckpt, *ARGS)
    assert code == 0, err
    if torch.cuda.is_available():
        assert "path: lkpatch's CUDA kernels" in out
    else:
        assert "path: PyTorch's F.conv2d on the CPU (lkpatch's kernels need a CUDA GPU)" in out


@pytest.mark.cuda
def test_cuda_check_runs_lkpatch_kernels(capsys, ckpt):
    from lkpatch import dispatch

    with dispatch.force("kernel"):  # tiny shapes would go to PyTorch by the speed rule
        code, out, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "--device", "auto")
    assert code == 0, err
    lines = [line for line in out.splitlines() if "max relative error" in line]
    assert len(lines) == 3 and all("path: lkpatch's CUDA kernels in" in line for line in lines), out
    assert all(not re.search(r"kernels in 0 of", line) for line in lines)


# --- without --reparam -----------------------------------------------------------------------------

def test_without_reparam_nothing_is_written_unless_asked(capsys, tmp_path, ckpt, sd):
    code, out, err = run(capsys, "convert", ckpt, *ARGS)
    assert code == 0, err
    assert "the weights are unchanged by design" in out and "nothing was written" in out
    assert files(tmp_path) == ["in.pth"]
    code, out, err = run(capsys, "convert", ckpt, *ARGS, "-o", tmp_path / "copy.pth")
    assert code == 0, err
    copy = torch.load(tmp_path / "copy.pth", weights_only=True)
    assert copy.keys() == sd.keys() and all(torch.equal(copy[k], v) for k, v in sd.items())
    assert "written file (float32 weights) vs original: max relative error 0.00e+00" in out


# --- safe writes -----------------------------------------------------------------------------------

def test_file_mode_follows_the_umask_and_a_replaced_file_keeps_its_own(capsys, tmp_path, ckpt):
    saved = os.umask(0o027)
    try:
        code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", tmp_path / "a.pth")
        assert code == 0, err
        assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        ckpt_io.save_atomic({"w": torch.ones(1)}, str(tmp_path / "b.pth"))
        assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o664
        (tmp_path / "a.pth").chmod(0o604)
        code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", tmp_path / "a.pth", "--force")
        assert code == 0, err
        assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(saved)


class _FailingFile:
    """The temporary file, failing once ``limit`` bytes went in (the disk fills up midway)."""

    def __init__(self, fh, limit, error):
        self.fh, self.limit, self.error, self.count = fh, limit, error, 0

    def write(self, data):
        self.count += len(data)
        if self.count > self.limit:
            self.error()
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


def _fail_writes(monkeypatch, error, limit=50_000):
    init = ckpt_io._Sink.__init__
    monkeypatch.setattr(ckpt_io._Sink, "__init__", lambda self, fh: init(self, _FailingFile(fh, limit, error)))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_disk_full_midway_names_the_cause_and_leaves_no_file(capsys, tmp_path, ckpt, monkeypatch, fmt):
    out_file = tmp_path / f"out.{'pth' if fmt == 'torch' else 'safetensors'}"
    out_file.write_bytes(b"old")

    def enospc():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _fail_writes(monkeypatch, enospc)
    code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", out_file, "--force")
    assert code == 1
    assert err == f"lkpatch: error: no space left on device: '{out_file}'; nothing was written\n"
    assert out_file.read_bytes() == b"old" and files(tmp_path) == sorted(["in.pth", out_file.name])


def test_a_real_write_error_is_reported_the_same_way(capsys, tmp_path, ckpt):
    """A file size limit makes the kernel refuse the write (EFBIG), as a full disk does (ENOSPC)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    sigxfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", tmp_path / "out.pth")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, sigxfsz)
    assert code == 1 and err == f"lkpatch: error: file too large: '{tmp_path / 'out.pth'}'; nothing was written\n"
    assert files(tmp_path) == ["in.pth"]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_write_removes_the_temporary_file(capsys, tmp_path, ckpt, monkeypatch, sig, status):
    _fail_writes(monkeypatch, lambda: os.kill(os.getpid(), sig), limit=0)
    before = signal.getsignal(sig)
    code, out, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", tmp_path / "out.pth")
    assert code == status
    assert err == f"lkpatch: interrupted by {sig.name}; nothing written\n"
    assert files(tmp_path) == ["in.pth"]
    assert signal.getsignal(sig) is before  # the command's handlers are gone again


@pytest.mark.parametrize("force", [False, True])
def test_a_signal_while_the_file_is_put_in_place_says_it_was_written(capsys, tmp_path, ckpt, monkeypatch, force):
    """The rename and the writer's record of it are one step: a signal between the two is raised
    after both, and the message names the complete file instead of "nothing written"."""
    out_file = tmp_path / "out.pth"
    if force:
        out_file.write_bytes(b"old")
    rename = "replace" if force else "link"
    real = getattr(os, rename)

    def rename_then_signal(*args):
        real(*args)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(os, rename, rename_then_signal)
    code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", out_file, *(["--force"] if force else []))
    assert code == 143
    assert err == f"lkpatch: interrupted by SIGTERM after writing '{out_file}' (complete and checked)\n"
    assert files(tmp_path) == ["in.pth", "out.pth"]
    assert set(torch.load(out_file, weights_only=True)) == _fused_keys()


_SLOW_WRITE = """
import pathlib, sys, time
from lkpatch import checkpoint
from lkpatch.cli import main

class Slow:  # the temporary file, pausing at its first write until the test sends a signal
    def __init__(self, fh):
        self.fh = fh
    def write(self, data):
        n = self.fh.write(data)
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(120)
        return n
    def flush(self):
        self.fh.flush()

init = checkpoint._Sink.__init__
checkpoint._Sink.__init__ = lambda self, fh: init(self, Slow(fh))
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_from_outside_while_writing_exits_143_and_leaves_nothing(tmp_path, ckpt):
    marker, out_file = tmp_path / "writing", tmp_path / "out.pth"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(marker), "convert", str(ckpt), *ARGS,
                             "--reparam", "-o", str(out_file)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=60)[1][-2000:]
        assert any(name.endswith(".tmp") for name in files(tmp_path))  # mid-write: the temporary file is there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and err.endswith("lkpatch: interrupted by SIGTERM; nothing written\n"), err
    assert files(tmp_path) == ["in.pth", "writing"]


# --- problems with the output (and the model name) are reported before any work ------------------

def _unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    # root ignores permission bits; sysfs takes no new files from anyone
    if os.path.isdir("/sys"):
        try:
            os.close(os.open("/sys/.lkpatch-probe", os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError:
            return "/sys"
    pytest.skip("no folder here refuses new files")


@pytest.mark.parametrize("case,message", [
    ("missing folder", "output folder '{tmp}/missing' does not exist"),
    ("directory", "output '{tmp}/adir' is a directory"),
    ("directory --force", "output '{tmp}/adir' is a directory"),
    ("exists", "output '{tmp}/exists.pth' exists; pass --force to overwrite it"),
    ("input", "the output is the input checkpoint"),
    ("unwritable", "cannot write in output folder: "),
    ("virtual folder", "cannot write in output folder '/proc': it takes no new files"),
    ("format", "--format safetensors, but '{tmp}/x.pth' is named as a torch file"),
    ("no model", "--model NAME is required"),
    ("unknown model", "unknown model 'no_such_net'"),
    ("format without output", "--format sets the written file's format"),
    ("dangling link", "output '{tmp}/link.pth' is a symbolic link to '{tmp}/nowhere/x.pth', which does not exist"),
])
def test_output_problems_are_reported_before_any_work(capsys, tmp_path, ckpt, monkeypatch, case, message):
    if case == "virtual folder" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    def no_work(*args, **kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(ckpt_io, "load", no_work)
    monkeypatch.setattr(cli, "build_model", no_work)
    (tmp_path / "adir").mkdir()
    (tmp_path / "exists.pth").write_bytes(b"x")
    args = {"missing folder": ["-o", tmp_path / "missing" / "o.pth"],
            "directory": ["-o", tmp_path / "adir"],
            "directory --force": ["-o", tmp_path / "adir", "--force"],
            "exists": ["--reparam", "-o", tmp_path / "exists.pth"],
            "input": ["-o", ckpt, "--force"],
            "unwritable": ["-o", f"{_unwritable_folder(tmp_path) if case == 'unwritable' else ''}/o.pth"],
            "virtual folder": ["-o", "/proc/o.pth"],
            "format": ["-o", tmp_path / "x.pth", "--format", "safetensors"],
            "format without output": ["--format", "torch"],
            "dangling link": ["-o", tmp_path / "link.pth", "--force"]}.get(case, [])
    (tmp_path / "link.pth").symlink_to(tmp_path / "nowhere" / "x.pth")
    model = {"no model": [], "unknown model": ["--model", "no_such_net"]}.get(case, ARGS)
    code, _, err = run(capsys, "convert", ckpt, *model, *args)
    assert code == 1 and message.format(tmp=tmp_path) in err and err.count("\n") == 1, err


# --- formats and wrappers --------------------------------------------------------------------------

def test_safetensors_in_and_out(capsys, tmp_path, sd):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "w.safetensors"
    save_file(sd, src, metadata={"format": "pt", "source": "test"})
    code, out, err = run(capsys, "convert", src, *ARGS, "--reparam")
    assert code == 0, err
    out_file = tmp_path / "w.deploy.safetensors"
    assert ckpt_io.file_format(str(out_file)) == "safetensors"
    with safe_open(str(out_file), framework="pt") as fh:
        assert set(fh.keys()) == _fused_keys() and fh.metadata() == {"format": "pt", "source": "test"}
    # a torch file in, safetensors out by extension; --format where the name says neither
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "model_ema": sd, "epoch": 3}, tmp_path / "t.pth")
    code, out, err = run(capsys, "convert", tmp_path / "t.pth", *ARGS, "-o", tmp_path / "t.safetensors")
    assert code == 0, err
    assert "writing 'model'; not written: model_ema, epoch" in out
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {f"module.{k}" for k in sd}
    code, out, err = run(capsys, "convert", tmp_path / "w.safetensors", *ARGS, "-o", tmp_path / "w.weights",
                         "--format", "torch")
    assert code == 0, err
    assert ckpt_io.file_format(str(tmp_path / "w.weights")) == "torch"
    assert torch.load(tmp_path / "w.weights", weights_only=True).keys() == sd.keys()


@pytest.mark.parametrize("name,want", [("in.pth", "in.deploy.pth"), ("model_best.pth.tar", "model_best.deploy.pth"),
                                       ("w.safetensors", "w.deploy.pth"), ("ckpt", "ckpt.deploy.pth"),
                                       ("a.b.pth", "a.b.deploy.pth"), (".hidden", ".hidden.deploy.pth")])
def test_the_default_output_replaces_the_extension(name, want):
    assert cli._default_output(Path("/d") / name) == Path("/d") / want


def test_reparam_with_format_names_the_default_output_by_it(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "--format", "safetensors")
    assert code == 0, err
    assert files(tmp_path) == ["in.deploy.safetensors", "in.pth"]
    assert ckpt_io.file_format(str(tmp_path / "in.deploy.safetensors")) == "safetensors"


def test_checkpoints_without_num_batches_tracked_load_as_pytorch_loads_them(capsys, tmp_path, sd):
    """PyTorch's strict loading fills a BatchNorm's missing num_batches_tracked; so do the command,
    also under a prefix, and lkpatch.load_checkpoint."""
    trimmed = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(sd)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trimmed.items()}}, tmp_path / "old.pth")
    code, out, err = run(capsys, "convert", tmp_path / "old.pth", *ARGS, "--reparam")
    assert code == 0, err
    written = torch.load(tmp_path / "old.deploy.pth", weights_only=True)["state_dict"]
    assert set(written) == {f"model.{k}" for k in _fused_keys()}
    model = _model().train()
    assert lkpatch.load_checkpoint(model, tmp_path / "old.pth") is model and model.training
    for k, v in trimmed.items():
        assert torch.equal(model.state_dict()[k], v), k
    # a key that is missing for real still is
    trimmed.pop(next(k for k in trimmed if k.endswith("running_var")))
    with pytest.raises(ValueError, match="1 missing"):
        lkpatch.load_checkpoint(_model(), trimmed)


def test_an_input_too_small_for_the_model_is_named(capsys, tmp_path):
    import timm

    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "c.pth")
    code, _, err = run(capsys, "convert", tmp_path / "c.pth", "--model", "convnext_atto", "--input-size", "8",
                       "--batch", "1")
    assert code == 1 and err.count("\n") == 1, err
    assert "convnext_atto does not run on the check's 1x3x8x8 input (" in err and "give --input-size" in err


def test_reparam_with_nothing_to_reparameterize_writes_nothing(capsys, tmp_path):
    import timm

    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "c.pth")  # LayerNorms, no BatchNorm
    code, _, err = run(capsys, "convert", tmp_path / "c.pth", "--model", "convnext_atto", "--input-size", "32",
                       "--batch", "1", "--reparam")
    assert code == 1 and "--reparam: convnext_atto has nothing to re-parameterize" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def test_reparam_of_a_deploy_checkpoint_writes_nothing(capsys, tmp_path):
    """A RepLKNet checkpoint in the deploy structure has nothing left to merge: no copy of it is
    written as if it had been re-parameterized."""
    small = ["--model", "replknet_31b", "--model-arg", "channels=[8,16,16,16]", "--model-arg", "layers=[1,1,1,1]",
             "--model-arg", "large_kernel_sizes=[5,5,5,5]", "--model-arg", "small_kernel=3",
             "--model-arg", "num_classes=10", "--input-size", "32", "--batch", "1"]
    model = lkpatch.models.RepLKNet(large_kernel_sizes=[5] * 4, layers=[1] * 4, channels=[8, 16, 16, 16],
                                    small_kernel=3, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "r.pth")
    code, out, err = run(capsys, "convert", tmp_path / "r.pth", *small, "--reparam")
    assert code == 0 and (tmp_path / "r.deploy.pth").exists(), err
    code, _, err = run(capsys, "convert", tmp_path / "r.deploy.pth", *small, "--reparam")
    assert code == 1 and "has nothing to re-parameterize" in err and "a deploy checkpoint has none" in err, err
    assert files(tmp_path) == ["r.deploy.pth", "r.pth"]


def test_a_folded_checkpoint_given_back_is_named_as_the_deploy_structure(capsys, tmp_path, ckpt):
    """``--reparam``'s own output (BatchNorms folded) given to convert again: the error says what the
    file is and how it loads, instead of blaming --model."""
    code, _, err = run(capsys, "convert", ckpt, *ARGS, "--reparam", "-o", tmp_path / "folded.pth")
    assert code == 0, err
    code, _, err = run(capsys, "convert", tmp_path / "folded.pth", *ARGS)
    assert code == 1 and "deploy structure (BatchNorms folded" in err and "Check --model" not in err, err
    assert f"lkpatch.load_checkpoint(model, '{tmp_path / 'folded.pth'}')" in err, err
    other = [a if a != NAME else "mobilenetv3_small_075" for a in ARGS]  # a model it does not fit either way
    code, _, err = run(capsys, "convert", tmp_path / "folded.pth", *other)
    assert code == 1 and "Check --model" in err and "deploy structure" not in err, err


@pytest.mark.parametrize("value", ["[1,1,1", "(1,", "{'a': 1", "1 2", "'x"])
def test_a_malformed_model_arg_is_named(capsys, ckpt, value):
    code, _, err = run(capsys, "convert", ckpt, "--model", NAME, "--model-arg", f"num_classes={value}")
    assert code == 1 and f"--model-arg num_classes: '{value}' is neither a Python literal" in err, err


def test_bare_word_model_args_stay_strings():
    assert cli._parse_model_args(["act=gelu", "path=a/b.pt", "x=timm:y", "n=3"]) == \
        {"act": "gelu", "path": "a/b.pt", "x": "timm:y", "n": 3}


def test_timm_checkpoint_saver_files_load_without_the_unsafe_flag(capsys, tmp_path):
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(model=NAME, lr=0.1, epochs=3, data_dir="/data", mean=None, input_size=(3, 32, 32))
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ModelEmaV3(model),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    src = tmp_path / "checkpoint-0.pth.tar"
    code, out, err = run(capsys, "convert", src, *ARGS, "--reparam", "-o", tmp_path / "deploy.pth")
    assert code == 0, err
    written = torch.load(tmp_path / "deploy.pth", weights_only=False)
    assert written["args"] == args and written["epoch"] == 0 and written["metric"] == 0.5
    assert set(written["state_dict"]) == set(written["state_dict_ema"]) == _fused_keys()
    assert written["optimizer"]["state"].keys() == optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "model."])
def test_wrapper_prefixes_are_handled_and_kept(capsys, tmp_path, sd, prefix):
    if prefix == "_orig_mod.":  # what a torch.compile'd model's state_dict holds (compiled lazily: no cost)
        assert all(k.startswith("_orig_mod.") for k in torch.compile(_model()).state_dict())
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, tmp_path / "p.pth")
    code, out, err = run(capsys, "convert", tmp_path / "p.pth", *ARGS, "--reparam")
    assert code == 0, err
    written = torch.load(tmp_path / "p.deploy.pth", weights_only=True)["state_dict"]
    assert {k[len(prefix):] for k in written} == _fused_keys() and all(k.startswith(prefix) for k in written)


@pytest.mark.parametrize("form", ["dict", "wrappers"])
def test_pickled_models_in_wrappers(capsys, tmp_path, form):
    """A whole model at the top of the file is test_cli's; here under wrapper keys, DataParallel too."""
    model = _model()
    obj = ({"model": model, "epoch": 4} if form == "dict" else
           {"state_dict": nn.DataParallel(model), "state_dict_ema": _model(), "epoch": 4})
    torch.save(obj, tmp_path / "whole.pth")
    code, out, err = run(capsys, "convert", tmp_path / "whole.pth", *ARGS, "--reparam", "-o", tmp_path / "d.pth",
                         "--unsafe-load-pickle-runs-code")
    assert code == 0, err
    assert "holds a pickled model under" in out
    written = torch.load(tmp_path / "d.pth", weights_only=True)  # the models became state_dicts
    fused = _fused_keys()
    assert written["epoch"] == 4
    if form == "dict":
        assert set(written["model"]) == fused
    else:
        assert set(written["state_dict"]) == {f"module.{k}" for k in fused} and set(written["state_dict_ema"]) == fused


# --- the checkpoint module -------------------------------------------------------------------------

def test_plain_data_objects_load_tensors_only_and_code_stays_refused(tmp_path):
    import pathlib

    import numpy as np

    data = {"model": {"w": torch.ones(1)}, "metric": np.float64(0.5), "path": pathlib.PurePosixPath("/a"),
            "args": argparse.Namespace(lr=0.1, sizes=[1, 2], mean=None)}
    torch.save(data, tmp_path / "plain.pth")
    loaded = ckpt_io.load(str(tmp_path / "plain.pth"))
    assert loaded["args"] == data["args"] and loaded["metric"] == 0.5 and loaded["path"] == data["path"]
    torch.save({"model": {"w": torch.ones(1)}, "f": print}, tmp_path / "code.pth")
    with pytest.raises(ckpt_io.CheckpointError, match=r"pickled Python object \((builtins\.)?print\)"):
        ckpt_io.load(str(tmp_path / "code.pth"))


def test_prefixes_nest_and_a_foreign_leading_component_moves_to_the_prefix():
    sd = {"a.weight": torch.ones(1), "b.bias": torch.ones(1)}
    assert ckpt_io.strip_prefixes({f"module._orig_mod.module.{k}": v for k, v in sd.items()})[0] == \
        "module._orig_mod.module."
    assert ckpt_io.strip_prefixes({"module.a": torch.ones(1), "b": torch.ones(1)})[0] == ""  # not all keys
    entry = ckpt_io.state_dicts({"state_dict": {f"_orig_mod.net.{k}": v for k, v in sd.items()}})[0]
    assert entry.prefix == "_orig_mod." and ckpt_io.fit_prefix(entry, sd)
    assert entry.prefix == "_orig_mod.net." and entry.state_dict.keys() == sd.keys()
    assert ckpt_io.restored(entry).keys() == {f"_orig_mod.net.{k}" for k in sd}
    other = ckpt_io.state_dicts({"x.a.weight": torch.ones(1), "x.c": torch.ones(1)})[0]
    assert not ckpt_io.fit_prefix(other, sd) and other.prefix == ""  # no component makes the keys match


def test_relative_error_counts_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    t = torch.tensor
    assert cli.relative_error([t([1.0, 4.0])], [t([1.0, 4.5])]) == 0.125
    assert cli.relative_error([t([1.0, 4.0])], [t([1.0, nan])]) == inf  # NaN where the original had none
    assert cli.relative_error([t([nan, 4.0])], [t([nan, 4.5])]) == 0.125  # the same NaN; the rest compared
    assert cli.relative_error([t([inf, 4.0])], [t([-inf, 4.0])]) == inf
    assert cli.relative_error([t([1.0])], [t([1.0]), t([2.0])]) == inf


def test_file_format_comes_from_the_bytes(tmp_path):
    from safetensors.torch import save_file

    header = b"{" + b" " * 127  # a header length of 0x80: the first byte a pickle also starts with
    (tmp_path / "a.bin").write_bytes((128).to_bytes(8, "little") + header)
    assert ckpt_io.file_format(str(tmp_path / "a.bin")) == "safetensors"
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    assert ckpt_io.file_format(str(tmp_path / "legacy.safetensors")) == "torch"  # misnamed: the bytes decide
    assert torch.equal(ckpt_io.load(str(tmp_path / "legacy.safetensors"))["w"], torch.ones(2))
    save_file({"w": torch.ones(2)}, tmp_path / "st.pth")
    assert ckpt_io.file_format(str(tmp_path / "st.pth")) == "safetensors"


class _Detector(nn.Module):
    """A detector's kind of output: a list (one per image) of dicts of tensors."""

    def __init__(self, found: bool = True):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.found = found

    def forward(self, x):
        y = self.dw(x).flatten(1)
        n = 3 if self.found else 0
        return [{"boxes": row[:4 * n].reshape(n, 4), "labels": torch.arange(n), "meta": "image"} for row in y]


def test_check_compares_every_tensor_of_nested_outputs():
    torch.manual_seed(0)
    model, x = _Detector(), torch.randn(2, 4, 5, 5)
    ref = cli._outputs(model, x)
    assert [tuple(t.shape) for t in ref] == [(3, 4), (3,), (3, 4), (3,)]
    with torch.no_grad():
        model.dw.weight[0] += 0.5  # a wrong conversion shows in the boxes (channel 0)
    assert cli.relative_error(ref, cli._outputs(model, x)) > 0.01


def test_check_refuses_outputs_without_values():
    empty = cli._outputs(_Detector(found=False), torch.randn(2, 4, 5, 5))
    with pytest.raises(cli.CLIError, match="holds no values on the check's random input.*score threshold"):
        cli._check("converted", empty, empty, 1e-4)


def test_the_class_count_comes_from_the_checkpoint_on_its_own_line(capsys, ckpt):
    """A message from inside a progress step ends the step's line; the step's time follows on a
    line of its own."""
    args = [a for a in ARGS if a not in ("--model-arg", "num_classes=10")]
    code, out, err = run(capsys, "convert", ckpt, *args)
    assert code == 0, err
    lines = out.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("the checkpoint's classifier has 10 classes"))
    assert lines[said - 1] == f"building {NAME} for the state_dict ...", lines
    assert re.fullmatch(rf"building {NAME} for the state_dict: \d+\.\d s", lines[said + 1]), lines
