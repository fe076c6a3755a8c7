"""Deploying a converted model: ONNX (both exporters), torch.export, TorchScript, and loading the
deploy checkpoints ``lkpatch convert --reparam`` writes."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import lkpatch
from lkpatch import dispatch, functional
from lkpatch.modules import DepthwiseConv2d

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the exporters warn about deprecations and tracer constants; the tests check the graphs instead
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def _stack():
    """Every padding form a converted layer takes: TF 'SAME' with stride 2, symmetric, 'same', and
    a BatchNorm after a depthwise conv (what --reparam folds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Conv2dSame(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 5, padding="same", groups=8, bias=False))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _converted_stack():
    model = _stack()
    reference = copy.deepcopy(model)
    lkpatch.convert_model(model)
    assert sum(isinstance(m, DepthwiseConv2d) for m in model.modules()) == 3
    return model, reference


@pytest.fixture
def op_raises(monkeypatch):
    """CPU tensors routed as CUDA ones are (through lkpatch's op), and the op raising: whatever
    still runs did not call it."""
    def fail(*args, **kwargs):
        raise AssertionError("lkpatch's op ran")
    monkeypatch.setattr(functional, "_run_op", fail)
    with dispatch.force("auto", cpu_through_op=True):
        yield


def _graph_ops(gm) -> set:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


# --- the decision --------------------------------------------------------------------------------

def test_exporting_is_true_only_while_capturing_for_deployment():
    seen = {}

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen[self.name] = functional.exporting()
            return x + 1

    x = torch.randn(1, 2, 4, 4)
    Probe("eager")(x)
    torch.jit.trace(Probe("jit.trace"), x, check_trace=False)
    torch.export.export(Probe("torch.export"), (x,))
    torch.onnx.export(Probe("onnx"), (x,), io.BytesIO(), dynamo=False)
    torch.compile(Probe("compile"), backend="eager", fullgraph=True)(x)
    assert seen == {"eager": False, "jit.trace": True, "torch.export": True, "onnx": True, "compile": False}


def test_eager_calls_go_through_the_op_and_exports_do_not(op_raises):
    model, reference = _converted_stack()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(AssertionError, match="lkpatch's op ran"):  # the route is live in eager mode
        model(x)
    expected = reference(x)
    ep = torch.export.export(model, (x,))
    assert not any("lkpatch" in op for op in _graph_ops(ep.graph_module))
    traced = torch.jit.trace(model, x, check_trace=False)  # the check reruns it eagerly
    assert "lkpatch::" not in str(traced.inlined_graph) and "aten::_convolution" in str(traced.inlined_graph)
    assert torch.allclose(traced(x), expected, atol=1e-6)
    assert torch.allclose(ep.module()(x), expected, atol=1e-6)


# --- ONNX ----------------------------------------------------------------------------------------

def _onnx_proto(model, x, dynamo: bool):
    """The ONNX model of ``model(x)`` from the dynamo or the TorchScript-based exporter."""
    import onnx
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True).model_proto
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_gives_standard_conv_nodes(op_raises, dynamo):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, reference = _converted_stack()
    x = torch.randn(2, 3, 16, 16)
    proto = _onnx_proto(model, x, dynamo)
    nodes = list(proto.graph.node)
    assert sum(n.op_type == "Conv" for n in nodes) == 4  # 1x1 + three depthwise (BN may fold into one)
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    onnx_model = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = onnx_model.run(None, {onnx_model.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), reference(x), atol=1e-5)


# --- torch.export and TorchScript ----------------------------------------------------------------

def test_exported_and_scripted_programs_load_and_run_without_lkpatch(op_raises, tmp_path):
    model, reference = _converted_stack()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(model, (x,)).run_decompositions()
    ops = _graph_ops(ep.graph_module)
    assert "aten.convolution.default" in ops and not any("lkpatch" in op for op in ops)
    torch.export.save(ep, tmp_path / "model.pt2")
    torch.jit.save(torch.jit.script(model), tmp_path / "model.ts")
    torch.save({"x": x, "y": reference(x)}, tmp_path / "io.pt")
    # a fresh interpreter that never imports lkpatch
    code = (
        "import sys, torch\n"
        f"d = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"ep = torch.export.load({str(tmp_path / 'model.pt2')!r})\n"
        f"ts = torch.jit.load({str(tmp_path / 'model.ts')!r})\n"
        "for out in (ep.module()(d['x']), ts(d['x'])):\n"
        "    assert torch.allclose(out, d['y'], atol=1e-5), (out - d['y']).abs().max()\n"
        "assert not any(m.startswith('lkpatch') for m in sys.modules), 'lkpatch was imported'\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_torch_jit_script_of_a_converted_timm_model_matches_eager():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    lkpatch.convert_model(model)
    x = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)
    # scripting leaves the eager model as it was: still converted
    assert sum(isinstance(m, DepthwiseConv2d) for m in model.modules()) == 12


@pytest.mark.parametrize("form", ["classifier", "reparameterized", "backbone"])
def test_torch_jit_script_of_a_converted_replknet_matches_eager(form):
    """lkpatch's own RepLKNet scripts too: its gradient-checkpointing branch and its two outputs
    (logits, or the listed stages' features) stay out of the compiled graph's way."""
    import timm

    torch.manual_seed(0)
    kwargs = {"num_classes": None, "out_indices": (0, 2, 3)} if form == "backbone" else {"num_classes": 10}
    model = timm.create_model("replknet_31b", layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], **kwargs)
    model.set_grad_checkpointing(True)  # eager training would recompute blocks; the graph never does
    lkpatch.convert_model(model)
    model.eval()
    if form == "reparameterized":
        lkpatch.reparameterize(model)
    x = torch.randn(2, 3, 48, 48)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        got, want = scripted(x), model(x)
    if form == "backbone":
        assert [t.shape[1] for t in got] == [8, 32, 64]
    else:
        got, want = [got], [want]
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_torch_jit_script_computes_tf_same_padding_from_the_input():
    model, reference = _converted_stack()
    scripted = torch.jit.script(model)
    for size in (16, 13, 10):  # odd and even sizes: the scripted module pads per call
        x = torch.randn(1, 3, size, size + 1)
        assert torch.allclose(scripted(x), reference(x), atol=1e-6), size


def test_torch_jit_script_of_a_torch_fx_graph(tmp_path, op_raises):
    """torch.fx keeps a converted layer as one call, which TorchScript then compiles: it failed to
    (untyped arguments), so a converted model could not be scripted after fx passes."""
    model, reference = _converted_stack()
    graph = torch.fx.symbolic_trace(model)
    scripted = torch.jit.script(graph)
    torch.jit.save(scripted, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    for size in (16, 13):  # TF 'SAME' padding from each input's size
        x = torch.randn(2, 3, size, size + 3)
        assert torch.allclose(scripted(x), reference(x), atol=1e-6), size
        assert torch.allclose(loaded(x), reference(x), atol=1e-6), size


@pytest.mark.parametrize("capture", ["script", "trace", "submodule"])
def test_convert_model_refuses_torchscript(capture):
    model = _stack()
    x = torch.randn(1, 3, 8, 8)
    captured = {"script": lambda: torch.jit.script(model), "trace": lambda: torch.jit.trace(model, x),
                "submodule": lambda: nn.Sequential(nn.Identity(), torch.jit.script(model))}[capture]()
    where = r" \(at '1'\)" if capture == "submodule" else ""
    with pytest.raises(TypeError, match=rf"convert_model: the model is a TorchScript module{where} .*Convert before "
                                        r"scripting or tracing"):
        lkpatch.convert_model(captured)
    with pytest.raises(TypeError, match="revert_model: the model is a TorchScript module"):
        lkpatch.revert_model(captured)


def test_convert_model_on_an_exported_program_says_to_convert_first():
    ep = torch.export.export(_stack(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(TypeError, match="not ExportedProgram. Convert the nn.Module before torch.export"):
        lkpatch.convert_model(ep)


# --- loading deploy checkpoints ------------------------------------------------------------------

def test_load_checkpoint_takes_deploy_and_training_checkpoints(tmp_path):
    fused = _stack()
    assert lkpatch.reparameterize(fused) is fused
    x = torch.randn(2, 3, 16, 16)
    expected = _stack()(x)
    torch.save({"model": {f"module.{k}": v for k, v in fused.state_dict().items()}, "epoch": 3}, tmp_path / "d.pth")
    model = _stack().train()
    model[2].running_mean.zero_()  # its own statistics must not leak into the result
    assert lkpatch.load_checkpoint(model, tmp_path / "d.pth") is model
    assert not model.training and isinstance(model[2], nn.Identity) and model[1].bias is not None
    assert torch.allclose(model(x), expected, atol=1e-5)
    # a checkpoint of the training structure loads as it is, structure and mode untouched
    model = _stack().train()
    lkpatch.load_checkpoint(model, _stack().state_dict())
    assert model.training and isinstance(model[2], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="fits neither the model nor its deploy structure"):
        lkpatch.load_checkpoint(nn.Sequential(nn.Conv2d(3, 4, 1)), tmp_path / "d.pth")
    # a checkpoint that fits neither structure leaves the model as it was: mode, modules, values
    model = _stack().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = {k: v for k, v in fused.state_dict().items() if not k.endswith(".bias")}
    with pytest.raises(ValueError, match=r"the model is unchanged\). Against the model: .*; against its deploy"):
        lkpatch.load_checkpoint(model, wrong)
    assert model.training and isinstance(model[2], nn.BatchNorm2d) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_checkpoint_errors_are_the_python_ones(tmp_path):
    """A missing file is a FileNotFoundError and an unreadable one a ValueError (they were
    lkpatch's own CheckpointError); a file holding pickled code names the function's argument
    that allows it, not the command's flag."""
    model = _stack()
    with pytest.raises(FileNotFoundError, match="checkpoint does not exist"):
        lkpatch.load_checkpoint(model, tmp_path / "missing.pth")
    (tmp_path / "damaged.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        lkpatch.load_checkpoint(model, tmp_path / "damaged.pth")
    torch.save(_stack(), tmp_path / "pickled.pth")  # a whole module: pickled classes
    with pytest.raises(ValueError, match=r"Only if you trust the file, pass allow_pickled_code=True") as err:
        lkpatch.load_checkpoint(model, tmp_path / "pickled.pth")
    assert "--unsafe" not in str(err.value)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(lkpatch.load_checkpoint(_stack(), tmp_path / "pickled.pth", allow_pickled_code=True)(x),
                       _stack()(x))


def test_load_checkpoint_of_replknet_deploy_keys(shared_data):
    reference = torch.load(shared_data / "replknet_tiny_reference.pt", weights_only=True)
    model = lkpatch.models.RepLKNet(**reference["config"])  # the training structure
    lkpatch.convert_model(model)
    lkpatch.load_checkpoint(model, reference["deploy_state_dict"])
    with torch.no_grad():
        out = model(reference["input"])
    assert (out - reference["output_deploy"]).abs().max().item() <= 1e-4


def test_a_replknet_backbone_inside_a_model_gets_the_deploy_layout(shared_data, tmp_path):
    """reparameterize merges the kernels of a RepLKNet inside another model (a segmentation
    backbone) into the official deploy layout, and folds the BatchNorms outside it."""
    reference = torch.load(shared_data / "replknet_tiny_reference.pt", weights_only=True)

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = lkpatch.models.RepLKNet(**{**reference["config"], "num_classes": None,
                                                       "out_indices": [0, 1]})
            channels = self.backbone.stages[1].blocks[0].pw2.conv.out_channels
            self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                      nn.BatchNorm2d(channels), nn.Conv2d(channels, 2, 1))

        def forward(self, x):
            return self.head(self.backbone(x)[-1])

    model = Segmenter()
    for m in model.modules():  # statistics unlike a fresh BatchNorm's, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = reference["input"]
    with torch.no_grad():
        want = model(x)
    deployed = lkpatch.reparameterize(copy.deepcopy(model))
    keys = deployed.state_dict().keys()
    assert any(".lkb_reparam." in k for k in keys) and not any(".lkb_origin." in k for k in keys)
    assert isinstance(deployed.head[1], nn.Identity)                          # folded outside the backbone
    assert isinstance(deployed.backbone.stem[1].bn, nn.BatchNorm2d)  # a depthwise conv's, inside: the official layout
    with torch.no_grad():
        assert (deployed(x) - want).abs().max().item() <= 1e-4
    torch.save(deployed.state_dict(), tmp_path / "seg.deploy.pth")
    fresh = Segmenter()
    lkpatch.load_checkpoint(fresh, tmp_path / "seg.deploy.pth")
    assert fresh.state_dict().keys() == keys
    with torch.no_grad():
        assert (fresh(x) - want).abs().max().item() <= 1e-4


# --- on the GPU: lkpatch's kernels in eager mode, standard graphs when exported -------------------

@pytest.fixture
def cuda_kernels():
    """lkpatch's kernels wherever they apply, so the eager model really runs the extension's op."""
    if not dispatch.kernels_ready():
        pytest.skip("lkpatch's CUDA extension is not available here")
    with dispatch.force("kernel"):
        yield


@pytest.mark.cuda
def test_cuda_exports_of_a_converted_model(cuda_kernels):
    pytest.importorskip("onnx")
    model, reference = _converted_stack()
    model, reference = model.cuda(), reference.cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(model(x), expected, atol=1e-4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    assert any("lkpatch_ext" in e.name for e in prof.events()), "the eager model did not run lkpatch's op"
    ops = _graph_ops(torch.export.export(model, (x,)).run_decompositions().graph_module)
    assert "aten.convolution.default" in ops and not any("lkpatch" in op for op in ops)
    for dynamo in (False, True):
        proto = _onnx_proto(model, x, dynamo)
        assert sum(n.op_type == "Conv" for n in proto.graph.node) == 4
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, x)
    for captured in (scripted, traced):
        assert "lkpatch::" not in str(captured.inlined_graph) and "lkpatch_ext::" not in str(captured.inlined_graph)
        assert torch.allclose(captured(x), expected, atol=1e-4)
