"""The factored step captured in a CUDA graph (:class:`spherical_losses.factored.CapturedStep`).

A graph replays the kernels of one captured step on the addresses they had then, so every
tensor that outlives a step (the state, the sync-free record, the work tensors) must be
changed in place: the CPU tests check that, and the argument checks; the CUDA tests compare
replays with eager sync-free steps of a twin layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from spherical_losses import FactoredSGD, FactoredSphericalLoss
from spherical_losses import _conventions as conventions
from spherical_losses.factored import CapturedStep
from spherical_losses.factored import graph as graph_module
from spherical_losses.factored.update import Workspace

F64 = torch.float64
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (m, d): the Woodbury side (m < d) and the d × d side (m > d).
SIDES = [(16, 64), (96, 32)]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual.detach() - expected.detach()).abs().max() / scale).item()


def addresses(layer: FactoredSphericalLoss) -> dict[str, int]:
    """``data_ptr()`` of every tensor the layer keeps between steps, by name."""
    session = layer._session
    found = {"V": layer.V, "state": layer._state, "ones": session.ones}
    found.update({name: getattr(layer, name) for name in ("U", "U_inv", "omega", "Q", "w_bar")})
    found["book"] = session.book
    assert session.cast_cache is not None
    found["cast"] = session.cast_cache[1].packed
    ws = session.workspace
    assert isinstance(ws, Workspace)
    for name, value in vars(ws).items():
        if isinstance(value, torch.Tensor):
            found[f"ws.{name}"] = value
        elif isinstance(value, tuple):
            tensors = [t for t in value if isinstance(t, torch.Tensor)]
            found.update({f"ws.{name}[{i}]": t for i, t in enumerate(tensors)})
    assert all(isinstance(t, torch.Tensor) for t in found.values()), found
    return {name: t.data_ptr() for name, t in found.items()}


def step(opt: FactoredSGD, layer: FactoredSphericalLoss, h: torch.Tensor, target: torch.Tensor):
    opt.zero_grad()
    h = h.detach().requires_grad_()
    loss = layer(h, target)
    loss.backward()
    opt.step()
    return loss.detach(), h.grad


def batches(m: int, d: int, num_classes: int, count: int, dtype, device, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        h = torch.randn(m, d, generator=gen, dtype=dtype)
        target = torch.randint(num_classes, (m,), generator=gen)
        yield h.to(device), target.to(device)


# --------------------------------------------------------------------------------------------
# CPU: what a capture needs of the step


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("m", "d"), SIDES)
def test_sync_free_step_keeps_its_tensors_in_place(m: int, d: int, dtype: torch.dtype) -> None:
    """From the second step on (the first makes the work tensors and the record), no tensor
    the step reads or writes between steps moves: a graph replay would read stale ones. (A
    learning rate that changes at each step, with weight decay: its factors are rewritten.)
    """
    torch.manual_seed(0)
    layer = FactoredSphericalLoss(d, 300, "taylor", dtype=dtype)
    opt = FactoredSGD(layer, lr=0.5, weight_decay=1e-3, sync_free=True, check_every=0)
    first = None
    for i, (h, target) in enumerate(batches(m, d, 300, 6, dtype, "cpu")):
        opt.param_groups[0]["lr"] = 0.5 / (1 + i)
        step(opt, layer, h, target)
        if i == 0:
            first = addresses(layer)
            assert len(first) > 12
        else:
            assert addresses(layer) == first, f"step {i + 1}"
    assert opt.last_update == "direct"


@pytest.mark.parametrize(("m", "d"), SIDES)
def test_unchecked_sync_free_steps_match_checked_ones(m: int, d: int) -> None:
    """``check_every=0`` (what a capture needs) changes when the record is read, not the steps;
    and the sync-free steps match the eager ones.
    """
    torch.manual_seed(0)
    layers = [FactoredSphericalLoss(d, 300, "taylor", dtype=F64) for _ in range(3)]
    for other in layers[1:]:
        other.load_state_dict(layers[0].state_dict())
    opts = [
        FactoredSGD(layers[0], lr=0.5, sync_free=True, check_every=0),
        FactoredSGD(layers[1], lr=0.5, sync_free=True, check_every=3),
        FactoredSGD(layers[2], lr=0.5, sync_free=False),
    ]
    for h, target in batches(m, d, 300, 8, F64, "cpu"):
        outputs = [step(opt, layer, h, target) for opt, layer in zip(opts, layers, strict=True)]
        for loss, grad in outputs[1:]:
            assert rel(loss, outputs[0][0]) <= 1e-12
            assert rel(grad, outputs[0][1]) <= 1e-12
    opts[0].check()
    weight = layers[0].weight
    assert layers[0]._session.book[2].item() == 8  # the record counted every step
    for other in layers[1:]:
        assert rel(weight, other.weight) <= 1e-12


def test_learning_rate_reaches_the_step_through_a_tensor_written_in_place() -> None:
    """A captured step reads η from the work tensor ``scale`` (which :class:`CapturedStep`
    rewrites between replays when ``lr`` changes), never as a number of its own kernels.
    """
    ws = Workspace(4, 3, F64, torch.device("cpu"))
    address = ws.scale.data_ptr()
    for lr in (0.1, 0.25, 0.0):
        ws.set_lr(lr)
        assert ws.scale.data_ptr() == address
        assert ws.scale.tolist() == [-lr, 2 * lr, -lr]


# --------------------------------------------------------------------------------------------
# CPU: CapturedStep on an emulated CUDA graph


class _Recorder(TorchDispatchMode):
    """Records every operation run under it, with the tensors it read and made, as a stream
    capture records kernels; a read of a value on the host raises, as it does in a capture.
    A capture runs no kernel: what the operations wrote into tensors is undone at the end.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.before: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a value read on the host during the capture")
        for arg, value in zip(func._schema.arguments, args, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:
                key = (value.data_ptr(), value.shape, value.stride())
                self.before.setdefault(key, (value, value.clone()))
        for value in kwargs.values():  # out=
            if isinstance(value, torch.Tensor):
                key = (value.data_ptr(), value.shape, value.stride())
                self.before.setdefault(key, (value, value.clone()))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with torch.inference_mode():
            for tensor, value in reversed(self.before.values()):
                tensor.copy_(value)


class EmulatedGraph:
    """A CPU stand-in for :class:`torch.cuda.CUDAGraph`: a replay runs the recorded operations
    again on the recorded tensors (the same storages), with the recorded numbers, and no
    Python: what a graph replay does. An operation that returns a new tensor writes its
    result into the recorded one.
    """

    def __init__(self) -> None:
        self.recorder = _Recorder()
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        # (On detached aliases of the recorded tensors: kernels, not autograd.)
        bare = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
        with torch.no_grad():
            for func, args, kwargs, out in self.recorder.ops:
                result = func(*tree_map(bare, args), **tree_map(bare, kwargs))
                if func._schema.is_mutable:
                    continue  # in place or out=: it wrote into the recorded tensors
                outs, results = (out, result) if isinstance(out, tuple) else ((out,), (result,))
                for old, new in zip(outs, results, strict=True):
                    # (A view, or a .to() that changed nothing, aliases the recorded tensor.)
                    if isinstance(old, torch.Tensor) and storage(old) != storage(new):
                        old.detach().copy_(new)


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture
def emulated_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CapturedStep on the CPU: streams that do nothing, :class:`EmulatedGraph` for the graph,
    and the step's code as it runs on a GPU (no target read on the host).
    """

    class Stream:
        def __init__(self, *args: object) -> None:
            pass

        def wait_stream(self, other: object) -> None:
            pass

    monkeypatch.setattr(graph_module, "_check_device", lambda layer: None)
    monkeypatch.setattr(conventions, "reads_values", lambda t: False)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: g.recorder)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (F64, 1e-12)])
@pytest.mark.parametrize(("m", "d"), SIDES)
def test_emulated_replays_match_eager_sync_free_steps(
    m: int, d: int, dtype: torch.dtype, tol: float, emulated_cuda: None
) -> None:
    """The replays (no Python: the learning rate through its tensor, the record, the copy of
    the state) against eager sync-free steps of a twin, with a schedule, an eager step in
    between, check() and the weight as eager code sees it.
    """
    torch.manual_seed(0)
    layer = FactoredSphericalLoss(d, 300, "taylor", dtype=dtype, ignore_index=3)
    twin = copy.deepcopy(layer)
    opt = FactoredSGD(layer, lr=0.5, sync_free=True, check_every=0)
    twin_opt = FactoredSGD(twin, lr=0.5, sync_free=True, check_every=0)
    captured = CapturedStep(layer, opt, *next(batches(m, d, 300, 1, dtype, "cpu", seed=9)))
    assert len(captured.graph.recorder.ops) > 40
    assert rel(layer.weight, twin.weight) == 0.0  # the warm-up undone
    for i, (h, target) in enumerate(batches(m, d, 300, 12, dtype, "cpu")):
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"] = 0.5 / (1 + i % 4)
        if i == 6:
            step(opt, layer, h, target)  # an eager step between replays
            step(twin_opt, twin, h, target)
        else:
            loss = captured(h, target)
            twin_loss, twin_grad = step(twin_opt, twin, h, target)
            assert rel(loss, twin_loss) <= tol
            assert rel(captured.grad, twin_grad) <= tol
        if i == 8:  # a check between replays: the last check reads the later ones
            opt.check()
            twin_opt.check()
    assert captured.graph.replays == 11
    assert rel(layer.weight, twin.weight) <= tol  # (the forward's copy of the state follows)
    assert layer._session.book[2].item() == 12  # every step recorded, the warm-up not
    opt.check()
    twin_opt.check()
    # check() read the record that the replays wrote (the bounds on U's singular values).
    assert layer._session.sigma == pytest.approx(twin._session.sigma, rel=tol)
    assert rel(layer.weight, twin.weight) <= tol
    assert rel(layer.bias, twin.bias) <= tol


def test_emulated_replay_checks_its_arguments(emulated_cuda: None) -> None:
    layer, opt = sync_free_layer(weight_decay=1e-3)
    h, target = EXAMPLE
    captured = CapturedStep(layer, opt, h, target)
    with pytest.raises(ValueError, match=r"input of shape \(4, 8\).*got \(2, 8\)"):
        captured(h[:2], target[:2])
    with pytest.raises(ValueError, match=r"target of shape \(4,\), got \(2,\)"):
        captured(h, target[:2])
    with pytest.raises(ValueError, match=r"input dtype torch\.float64"):
        captured(h.double(), target)
    with pytest.raises(ValueError, match="class indices"):
        captured(h, target.float())
    captured(h, target)
    opt.zero_grad()
    layer(h, target).backward()
    with pytest.raises(RuntimeError, match="pending"):
        captured(h, target)
    opt.zero_grad()
    opt.param_groups[0]["lr"] = 0.2
    with pytest.raises(ValueError, match=r"\(lr, weight_decay\) changed .* capture again"):
        captured(h, target)
    opt.param_groups[0]["lr"] = 0.1
    captured(h, target)
    layer.double()
    with pytest.raises(RuntimeError, match="replaced since the capture"):
        captured(h.double(), target)


# --------------------------------------------------------------------------------------------
# CPU: the argument checks


def sync_free_layer(**options: object) -> tuple[FactoredSphericalLoss, FactoredSGD]:
    layer = FactoredSphericalLoss(8, 50, "taylor", reduction=options.pop("reduction", "mean"))
    opt = FactoredSGD(layer, lr=0.1, **{"sync_free": True, "check_every": 0, **options})
    return layer, opt


EXAMPLE = (torch.randn(4, 8), torch.randint(50, (4,)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"check_every": 5}, "check_every=0"),
        ({"sync_free": False}, "sync_free=True"),
        ({"reduction": "none"}, "reduction='none'"),
        ({}, "on a CUDA device, got cpu"),
    ],
)
def test_capture_rejects_what_it_cannot_replay(options: dict, message: str) -> None:
    layer, opt = sync_free_layer(**options)
    with pytest.raises(ValueError, match=message):
        CapturedStep(layer, opt, *EXAMPLE)


def test_capture_rejects_a_foreign_optimizer_and_bad_warmup() -> None:
    layer, opt = sync_free_layer()
    other = FactoredSphericalLoss(8, 50, "taylor")
    with pytest.raises(ValueError, match="FactoredSGD attached to the layer"):
        CapturedStep(other, opt, *EXAMPLE)
    with pytest.raises(ValueError, match="FactoredSGD attached to the layer"):
        CapturedStep(layer, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), *EXAMPLE)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1, got 0"):
        CapturedStep(layer, opt, *EXAMPLE, warmup=0)
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        CapturedStep(layer, opt, *EXAMPLE)


# --------------------------------------------------------------------------------------------
# CUDA: replays against eager sync-free steps


def captured_pair(m: int, d: int, dtype: torch.dtype, lr: float = 0.5, weight_decay=0.0):
    torch.manual_seed(0)
    layer = FactoredSphericalLoss(d, 400, "taylor", dtype=dtype).cuda()
    twin = copy.deepcopy(layer)
    opt = FactoredSGD(layer, lr=lr, weight_decay=weight_decay, sync_free=True, check_every=0)
    twin_opt = FactoredSGD(twin, lr=lr, weight_decay=weight_decay, sync_free=True, check_every=0)
    example = next(batches(m, d, 400, 1, dtype, "cuda", seed=99))
    captured = CapturedStep(layer, opt, *example)
    return layer, opt, captured, twin, twin_opt


@NEEDS_CUDA
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (F64, 1e-10)])
@pytest.mark.parametrize(("m", "d"), SIDES)
def test_replays_match_eager_sync_free_steps(m: int, d: int, dtype, tol: float) -> None:
    layer, opt, captured, twin, twin_opt = captured_pair(m, d, dtype)
    # Capturing leaves the layer as it was (the warm-up steps are undone).
    assert rel(layer.weight, twin.weight) == 0.0
    for h, target in batches(m, d, 400, 20, dtype, "cuda"):
        loss = captured(h, target)
        twin_loss, twin_grad = step(twin_opt, twin, h, target)
        assert rel(loss, twin_loss) <= tol
        assert rel(captured.grad, twin_grad) <= tol
    # The weight as the eager code sees it (the cast copy follows the replays).
    assert rel(layer.weight, twin.weight) <= tol
    assert rel(layer.bias, twin.bias) <= tol
    assert layer._session.book[2].item() == 20  # replays counted, warm-up steps not
    opt.check()
    twin_opt.check()
    assert rel(layer.weight, twin.weight) <= tol


@NEEDS_CUDA
def test_replays_follow_the_learning_rate_and_eager_steps() -> None:
    layer, opt, captured, twin, twin_opt = captured_pair(16, 64, F64)
    data = list(batches(16, 64, 400, 9, F64, "cuda"))
    for i, (h, target) in enumerate(data):
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"] = 0.5 / (1 + i)
        if i == 4:  # an eager step in between: the same layer, the same tensors
            step(opt, layer, h, target)
        else:
            captured(h, target)
        step(twin_opt, twin, h, target)
    assert rel(layer.weight, twin.weight) <= 1e-10


@NEEDS_CUDA
def test_replay_checks_its_arguments() -> None:
    _, opt, captured, _, _ = captured_pair(16, 64, torch.float32, weight_decay=1e-3)
    h, target = next(batches(16, 64, 400, 1, torch.float32, "cuda"))
    with pytest.raises(ValueError, match=r"input of shape \(16, 64\).*got \(8, 64\)"):
        captured(h[:8], target[:8])
    with pytest.raises(ValueError, match="target of shape"):
        captured(h, target[:8])
    with pytest.raises(ValueError, match="dtype"):
        captured(h.double(), target)
    opt.param_groups[0]["lr"] = 0.1
    with pytest.raises(ValueError, match="capture again"):
        captured(h, target)
