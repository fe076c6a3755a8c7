"""examples/: DDP training under torchrun (two CPU processes over gloo), resuming, ImageFolder
training, deploy and backbone on small inputs, and the extension build lock that DDP ranks share.

Every script runs as a subprocess with PYTHONPATH set to this checkout, so a clone tests its own
code, and with one thread per process (OpenMP threads of several processes on a small machine
spin against each other)."""
import hashlib
import importlib.util
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import lkpatch
from lkpatch import build

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# A RepLKNet small enough for a CPU test: one block per stage, small kernels (still merged by
# structural re-parameterization), through the timm name and --model-arg.
TINY_REPLKNET = ["--model", "replknet_31b", "--model-arg", "layers=[1,1,1,1]", "channels=[8,16,16,16]",
                 "large_kernel_sizes=[7,7,5,3]", "small_kernel=3"]
# Drop-path and mixup/cutmix draw from the torch and numpy random states that a resume restores;
# 2 steps an epoch, so the runs cross epochs (validation, a new data order).
DDP_ARGS = ["--device", "cpu", "--synthetic", *TINY_REPLKNET, "drop_path_rate=0.2", "--img-size", "32",
            "--batch-size", "4", "--synthetic-images", "16", "--epochs", "4", "--warmup-epochs", "0", "--lr", "1e-3",
            "--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--val-batches", "1", "--log-interval", "1"]
LOSS = re.compile(r"^step (\d+) epoch \d+ loss ([0-9.]+)", re.M)
SAME = re.compile(r"^ranks: parameters identical on all 2 processes \(sha256 ([0-9a-f]+)\)", re.M)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _start(cmd, **env):
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out: {' '.join(proc.args)}\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(proc.args)}\n{out[-4000:]}"
    return out


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            EXAMPLES / "train.py", *args]


def _losses(out):
    return {int(s): float(v) for s, v in LOSS.findall(out)}


def _digest(named_params):
    """train.py's checksum of the parameters (logical order, whatever the memory format)."""
    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two CPU processes: 4 steps; then a resume to step 6; and, alongside the first, 6 steps in one go."""
    root = tmp_path_factory.mktemp("ddp")
    t0 = time.perf_counter()
    first = _start(_torchrun(*DDP_ARGS, "--steps", "4", "--output", root / "a"))
    whole = _start(_torchrun(*DDP_ARGS, "--steps", "6", "--output", root / "whole"))
    out_first = _finish(first)
    ckpt_first = torch.load(root / "a" / "last.pth", map_location="cpu", weights_only=True)
    resumed = _start(_torchrun(*DDP_ARGS, "--steps", "6", "--output", root / "b", "--resume", root / "a" / "last.pth"))
    out_whole, out_resumed = _finish(whole), _finish(resumed)
    print(f"ddp runs: {time.perf_counter() - t0:.1f} s")
    return dict(root=root, first=out_first, ckpt_first=ckpt_first, whole=out_whole, resumed=out_resumed)


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(ddp_runs):
    out, ckpt = ddp_runs["first"], ddp_runs["ckpt_first"]
    assert "lkpatch: 13 of 13 depthwise convolutions converted" in out
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    match = SAME.search(out)
    assert match, out[-3000:]
    assert re.search(r"^done: 4 steps of 8 images; [0-9.]+ img/s", out, re.M)
    assert re.search(r"^val after step 4 .*top-1 model [0-9.]+%, EMA [0-9.]+% on 8 images", out, re.M)
    # The checkpoint: everything needed to go on, and the weights the ranks agreed on.
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    for key in ("model", "model_ema", "optimizer", "scheduler"):
        assert ckpt[key], key
    import timm
    model = timm.create_model("replknet_31b", layers=[1, 1, 1, 1], channels=[8, 16, 16, 16],
                              large_kernel_sizes=[7, 7, 5, 3], small_kernel=3, drop_path_rate=0.2, num_classes=1000)
    model.load_state_dict(ckpt["model"])
    assert _digest(model.named_parameters()).startswith(match.group(1))
    assert not list((ddp_runs["root"] / "a").glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_resume_continues_like_an_uninterrupted_run(ddp_runs):
    first, whole, resumed = (_losses(ddp_runs[k]) for k in ("first", "whole", "resumed"))
    assert "resumed from" in ddp_runs["resumed"] and "at step 4" in ddp_runs["resumed"]
    assert sorted(whole) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [5, 6]
    for step in (1, 2, 3, 4):
        assert first[step] == whole[step], step
    for step in (5, 6):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6), (step, resumed, whole)
    # not just the losses: the weights after step 6 are the same bits
    assert SAME.search(ddp_runs["resumed"]).group(1) == SAME.search(ddp_runs["whole"]).group(1)


@pytest.fixture
def example(monkeypatch):
    """``example("deploy").main(argv)``: a single-process example run inside this process (its
    imports are loaded already: a subprocess would spend seconds importing torch and timm),
    with its folder on sys.path for ``import common`` and one thread, like the subprocesses."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def load(name):
        spec = importlib.util.spec_from_file_location(f"lkpatch_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)


def _image_folder(root: Path):
    """Two classes that colour tells apart: reddish and bluish noise images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls, colour in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 40, (40, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder_training_loss_goes_down(example, tmp_path, capsys):
    _image_folder(tmp_path / "data")
    assert example("train").main([
        "--device", "cpu", "--data", str(tmp_path / "data"), "--model", "convnext_atto", "--img-size", "32",
        "--batch-size", "4", "--steps", "8", "--epochs", "2", "--warmup-epochs", "0", "--lr", "2e-3",
        "--workers", "0", "--log-interval", "1", "--compare", "--compare-steps", "1", "--compare-warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out
    assert re.search(r"^compare \(.*\): PyTorch [0-9.]+ img/s, lkpatch [0-9.]+ img/s, speed-up", out, re.M)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9))
    first, last = (losses[1] + losses[2]) / 2, (losses[6] + losses[7] + losses[8]) / 3
    assert last < 0.7 * first, losses
    assert re.search(r"^val after step 8 \(2 epochs\): top-1 model [0-9.]+% on 8 images", out, re.M)


@pytest.mark.filterwarnings("ignore:.*legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_deploy_reparam_and_fold_then_onnx(ddp_runs, example, tmp_path, capsys):
    """RepLKNet from train.py's checkpoint (EMA weights), and a BatchNorm model from a plain state_dict."""
    import timm

    deploy = example("deploy")
    torch.manual_seed(0)
    mobilenet = timm.create_model("mobilenetv3_small_050", num_classes=7)
    for m in mobilenet.modules():  # BatchNorm statistics as after training, so folding changes numbers
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": mobilenet.state_dict()}, tmp_path / "mobilenet.pth")
    small = ["--device", "cpu", "--img-size", "32", "--batch-sizes", "1", "2", "--reps", "1", "--warmup", "0"]
    onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))  # torch.onnx.export's dependencies
    if not onnx:
        small.append("--no-onnx")
    assert deploy.main([str(ddp_runs["root"] / "a" / "last.pth"), "--ema", "--output", str(tmp_path / "rep"),
                        *small]) == 0
    out_rep = capsys.readouterr().out
    # the TorchScript exporter here (the default, torch.export-based one ran above): both paths, and faster
    assert deploy.main([str(tmp_path / "mobilenet.pth"), "--model", "mobilenetv3_small_050", "--output",
                        str(tmp_path / "fold"), "--onnx-exporter", "torchscript", *small]) == 0
    out_fold = capsys.readouterr().out
    assert "structural re-parameterization: 4 large kernels merged" in out_rep
    assert re.search(r"^deploy: (\d+) BatchNorms folded", out_fold, re.M).group(1) != "0"
    for out in (out_rep, out_fold):
        assert out.count("(ok, tolerance") == 2, out
        if onnx and importlib.util.find_spec("onnxruntime"):
            assert re.search(r"onnxruntime, batch 1 and 3: max relative error \S+ \(ok\)", out), out
        assert re.search(r"^  batch   2: PyTorch [0-9.]+ ms .*lkpatch [0-9.]+ ms", out, re.M), out
    mask = os.umask(0o022)
    os.umask(mask)
    for folder in ("rep", "fold"):  # lkpatch's writer: the umask's mode, no temporary file left
        assert not [p.name for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]
        written = next((tmp_path / folder).glob("*.deploy.pth"))
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask
    deployed = torch.load(tmp_path / "rep" / "replknet_31b.deploy.pth", map_location="cpu", weights_only=True)
    assert deployed["deploy"] == "structural_reparam"
    assert any(".lkb_reparam." in k for k in deployed["model"])
    assert not any(".lkb_origin." in k or ".small_conv." in k for k in deployed["model"])
    if onnx:
        assert (tmp_path / "rep" / "replknet_31b.onnx").stat().st_size > 0
        assert (tmp_path / "fold" / "mobilenetv3_small_050.onnx").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(deploy.ExampleError, match="exists; pass --force"):
        deploy.main([str(tmp_path / "mobilenet.pth"), "--model", "mobilenetv3_small_050", "--output",
                     str(tmp_path / "fold"), "--no-onnx", "--no-bench", "--device", "cpu", "--img-size", "32"])
    assert "deploy:" not in capsys.readouterr().out  # refused before the deploy model was made
    (tmp_path / "a_file").write_text("")  # an output folder that cannot be made: refused before the work too
    with pytest.raises(deploy.ExampleError, match="is not a directory"):
        deploy.main([str(tmp_path / "mobilenet.pth"), "--model", "mobilenetv3_small_050", "--output",
                     str(tmp_path / "a_file" / "sub"), "--no-bench", "--device", "cpu", "--img-size", "32"])
    assert "deploy:" not in capsys.readouterr().out
    # a damaged file: the reader's own words, not torch.load's advice to turn off weights_only
    (tmp_path / "damaged.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    for path, message in ((tmp_path / "damaged.pth", "not a PyTorch checkpoint"), (tmp_path, "is not a file")):
        with pytest.raises(deploy.ExampleError, match=message) as err:
            deploy.main([str(path), "--no-onnx", "--no-bench", "--device", "cpu"])
        assert "weights_only" not in str(err.value)


def test_deploy_takes_a_checkpoint_whose_batchnorms_are_folded(example, tmp_path, capsys):
    """lkpatch convert --reparam's output (or this script's) of a non-RepLKNet model: it used to be
    refused with "Check --model", while lkpatch.load_checkpoint loads it."""
    import timm

    deploy = example("deploy")
    torch.manual_seed(0)
    folded = timm.create_model("mobilenetv3_small_050", num_classes=5).eval()
    for m in folded.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    lkpatch.fuse_conv_bn(folded)
    torch.save(folded.state_dict(), tmp_path / "folded.pth")
    assert deploy.main([str(tmp_path / "folded.pth"), "--model", "mobilenetv3_small_050", "--output",
                        str(tmp_path / "out"), "--no-onnx", "--no-bench", "--device", "cpu", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "deploy: the checkpoint holds the deploy structure already" in out and out.count("(ok, tolerance") == 2
    model = deploy.load_deploy_checkpoint(str(tmp_path / "out" / "mobilenetv3_small_050.deploy.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5)
    with pytest.raises(deploy.ExampleError, match="Check --model"):  # a model it fits neither way
        deploy.main([str(tmp_path / "folded.pth"), "--model", "mobilenetv3_small_075", "--no-onnx", "--no-bench",
                     "--device", "cpu", "--output", str(tmp_path / "other")])


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")), reason="needs onnx, onnxscript")
@pytest.mark.filterwarnings("ignore")
def test_deploy_onnx_opset_is_the_one_asked_for_or_nothing_is_written(example, tmp_path):
    """The dynamo exporter falls back to opset 18 where it cannot convert down: that file was kept
    and called ok. A failed export must also leave a previous file as it was."""
    import onnx

    deploy = example("deploy")
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.ReLU()).eval()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(deploy.ExampleError, match="--opset 11: the dynamo exporter wrote opset 18 instead.*"
                                                  "--onnx-exporter torchscript"):
        deploy.export_onnx(model, 16, str(path), 11, "dynamo")
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    deploy.export_onnx(model, 16, str(path), 11, "torchscript")
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [11]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_deploy_finds_the_weights_as_lkpatch_convert_does(example, tmp_path):
    """timm's CheckpointSaver keeps EMA weights under 'state_dict_ema'; DDP prefixes are stripped."""
    deploy = example("deploy")
    plain, ema = {"module.w": torch.zeros(2)}, {"module.w": torch.ones(2)}
    torch.save({"state_dict": plain, "state_dict_ema": ema, "epoch": 3}, tmp_path / "saver.pth")
    torch.save({"state_dict": plain}, tmp_path / "no_ema.pth")
    for flags, want, key in (([], 0.0, "state_dict"), (["--ema"], 1.0, "state_dict_ema")):
        sd, info = deploy.read_checkpoint(deploy.parse_args([str(tmp_path / "saver.pth"), *flags]))
        assert list(sd) == ["w"] and sd["w"].eq(want).all() and info["weights"] == key
    with pytest.raises(deploy.ExampleError, match="holds no EMA weights"):
        deploy.read_checkpoint(deploy.parse_args([str(tmp_path / "no_ema.pth"), "--ema"]))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(deploy.ExampleError, match="no state_dict found"):
        deploy.read_checkpoint(deploy.parse_args([str(tmp_path / "empty.pth")]))


def test_backbone_of_a_timm_model_takes_strides_4_to_32(example):
    backbone = example("backbone")
    assert backbone.timm_backbone("resnet18").feature_info.reduction() == [4, 8, 16, 32]  # five stages, from 2
    assert backbone.timm_backbone("convnext_atto").feature_info.reduction() == [4, 8, 16, 32]
    with pytest.raises(backbone.ExampleError, match=r"strides \[16(, 16)*\], not 4, 8, 16 and 32"):
        backbone.timm_backbone("vit_tiny_patch16_224")


def test_deploy_img_size_must_be_positive(example, capsys):
    """0 ran at the default size (and recorded it); a negative size ended in a traceback."""
    deploy = example("deploy")
    for size in ("0", "-5"):
        with pytest.raises(SystemExit):
            deploy.parse_args(["ckpt.pth", "--img-size", size])
        assert f"--img-size must be at least 1, got {size}" in capsys.readouterr().err
    assert deploy.parse_args(["ckpt.pth", "--img-size", "32"]).img_size == 32


def test_backbone_arguments_it_cannot_take_are_one_line(example, capsys):
    backbone = example("backbone")
    for size in ("0", "-32", "48"):
        with pytest.raises(SystemExit):
            backbone.parse_args(["--size", size])
        assert "positive multiple of 32" in capsys.readouterr().err
    for args, message in ((["--size", "32", "--batch", "1"], "holds one value per channel"),  # a traceback before
                          (["--num-classes", "0"], "--num-classes must be at least 1")):
        with pytest.raises(SystemExit):
            backbone.parse_args(args)
        assert message in capsys.readouterr().err
    assert backbone.parse_args(["--size", "32", "--batch", "2"]).batch == 2
    with pytest.raises(backbone.ExampleError, match="out_indices: set by this example"):
        backbone.replknet_backbone("replknet_31b", {"out_indices": [1, 3]})


def test_backbone_features_and_timing(example, capsys):
    assert example("backbone").main([
        "--device", "cpu", "--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--timm", "convnext_atto",
        "--replknet-arg", "layers=[1,1,1,1]", "channels=[16,32,64,128]"]) == 0
    out = capsys.readouterr().out
    for stride, size in ((4, 16), (8, 8), (16, 4), (32, 2)):
        assert len(re.findall(rf"^  stage \d: \d+ x {size} x {size} \(stride {stride}\)$", out, re.M)) == 2, out
    assert len(re.findall(r"training step .*: PyTorch [0-9.]+ ms, lkpatch [0-9.]+ ms", out)) == 2


def test_examples_say_how_to_run_them(example):
    for name in ("train.py", "deploy.py", "backbone.py"):
        assert f"examples/{name}" in (EXAMPLES / name).read_text().split('"""')[1], name
    with pytest.raises(SystemExit) as stop:
        example("train").parse_args(["--synthetic", "--batch-size", "3", "--mixup", "0.8"])
    assert stop.value.code == 2


@pytest.mark.slow
@pytest.mark.skipif(build.find_cuda_home() is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_two_processes_build_into_an_empty_cache_at_once(tmp_path):
    """DDP ranks start together and all call build(): one compiles, the other waits on the file
    lock and loads the same library. The compile is this run's library copied after a pause (CI
    builds the extension for real before the tests; a second full compile here took minutes)."""
    built = build.build()
    code = (
        "import os, shutil, sys, time, torch, lkpatch.build as b\n"
        "def compile_(verbose):\n"
        "    time.sleep(2)  # the other process reaches the lock meanwhile\n"
        "    out = b.library_path()\n"
        "    out.parent.mkdir(parents=True, exist_ok=True)\n"
        "    shutil.copy(sys.argv[3], out)\n"
        "    return out\n"
        "b._compile = compile_\n"
        "open(os.path.join(sys.argv[1], 'ready' + sys.argv[2]), 'w').close()\n"
        "t = time.time()\n"
        "while len([f for f in os.listdir(sys.argv[1]) if f.startswith('ready')]) < 2 and time.time() - t < 120:\n"
        "    time.sleep(0.01)\n"
        "lib = b.build()\n"
        "assert hasattr(torch.ops.lkpatch_ext, 'dwconv2d')\n"
        "print('loaded', lib)\n")
    cache = tmp_path / "cache"
    env = {"LKPATCH_CACHE_DIR": str(cache), "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    procs = [_start([sys.executable, "-c", code, tmp_path, i, built], **env) for i in range(2)]
    outs = [_finish(p, timeout=240) for p in procs]
    libs = {re.search(r"^loaded (.+)$", out, re.M).group(1) for out in outs}
    assert len(libs) == 1
    lib = Path(libs.pop())
    assert lib.is_file() and lib.parent.parent.parent == cache and lib.read_bytes() == Path(built).read_bytes()
    assert sum("building the CUDA extension" in out for out in outs) == 1, outs


TINY_RUN = ["--device", "cpu", "--synthetic", "--model", "convnext_atto", "--img-size", "32", "--synthetic-images",
            "16", "--batch-size", "2", "--epochs", "4", "--warmup-epochs", "1", "--val-batches", "1", "--workers", "0",
            "--log-interval", "1", "--lr", "0.01"]


def test_train_output_problems_are_reported_before_training(example, tmp_path, capsys):
    train = example("train")
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "taken" / "last.pth").mkdir(parents=True)
    for output, message in ((tmp_path / "afile", "is a file; give a folder"),
                            (tmp_path / "afile" / "sub", "not a directory"),
                            (tmp_path / "taken", "last.pth in it is a folder")):
        with pytest.raises(train.ExampleError, match=message):
            train.main([*TINY_RUN, "--steps", "1", "--output", str(output)])
        assert "step 1" not in capsys.readouterr().out  # nothing trained
    # an earlier run's last.pth is replaced only by the run that resumes it
    assert train.main([*TINY_RUN, "--steps", "2", "--output", str(tmp_path / "run")]) == 0
    with pytest.raises(train.ExampleError, match="holds an earlier run's last.pth; continue it with --resume"):
        train.main([*TINY_RUN, "--steps", "2", "--output", str(tmp_path / "run")])
    # settings the saved optimizer and schedule depend on must stay as they were
    last = str(tmp_path / "run" / "last.pth")
    for changed, message in ((["--epochs", "2"], "written with --epochs 4, this run has 2"),
                             (["--lr", "0.02"], "written with --lr 0.01, this run has 0.02"),
                             (["--batch-size", "4"], "global batch of 2 x 1 processes, this run has 4 x 1")):
        args = [*TINY_RUN, "--steps", "3", "--resume", last]
        for i in range(0, len(changed), 2):
            args[args.index(changed[i]) + 1] = changed[i + 1]
        with pytest.raises(train.ExampleError, match=re.escape(message)):
            train.main(args)
    assert train.main([*TINY_RUN, "--steps", "3", "--resume", last]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(last, weights_only=False)["step"] == 3
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name != "last.pth"]
    with pytest.raises(train.ExampleError, match="is at step 3 already"):  # nothing left to train
        train.main([*TINY_RUN, "--steps", "3", "--resume", last])
    # a run that keeps an EMA is resumed by one that keeps it too: the next write would drop it
    assert train.main([*TINY_RUN, "--steps", "1", "--model-ema", "--output", str(tmp_path / "ema")]) == 0
    with pytest.raises(train.ExampleError, match="holds an EMA of the weights .* add --model-ema"):
        train.main([*TINY_RUN, "--steps", "2", "--resume", str(tmp_path / "ema" / "last.pth")])
    assert torch.load(tmp_path / "ema" / "last.pth", weights_only=False)["model_ema"] is not None


@pytest.mark.parametrize("option,value,message", [
    ("--img-size", "0", "at least 32"), ("--img-size", "7", "at least 32"), ("--val-batches", "0", "at least 1"),
    ("--synthetic-images", "0", "at least 1"), ("--lr", "-1", "positive"), ("--workers", "-1", "not be negative"),
    ("--model-ema-decay", "2", r"\[0, 1\)"), ("--compare-warmup", "-1", "not be negative")])
def test_train_arguments_out_of_range_are_one_line(example, capsys, option, value, message):
    train = example("train")
    args = list(TINY_RUN)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    with pytest.raises(SystemExit) as caught:
        train.parse_args(args)
    assert caught.value.code == 2 and re.search(f"{option}.*{message}", capsys.readouterr().err)


def test_a_signal_while_a_checkpoint_is_written_leaves_the_old_file_and_nothing_else(example, tmp_path):
    common = example("common")
    path = tmp_path / "last.pth"
    common.save_atomic({"step": 1}, str(path))
    with pytest.raises(common.Interrupted):
        with common.checkpoint_writer(str(path)) as writer:
            writer.write({"step": 2})
            os.kill(os.getpid(), signal.SIGTERM)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_signal_after_the_commit_keeps_the_new_file_and_says_so(example, tmp_path):
    common = example("common")
    path = tmp_path / "last.pth"
    common.save_atomic({"step": 1}, str(path))
    with pytest.raises(common.Interrupted) as caught:
        with common.checkpoint_writer(str(path)) as writer:
            writer.write({"step": 2})
            writer.commit()
            os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.written == str(path)
    assert common.interrupted_checkpoint(caught.value, "last.pth") == f"{path} was written in full first"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
    assert torch.load(path, weights_only=True) == {"step": 2}
