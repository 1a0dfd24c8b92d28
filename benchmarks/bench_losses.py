"""Forward + backward time and peak memory of every member against ``F.cross_entropy``.

Same logits, same run, on the CPU (the default) or on a GPU (``--device cuda``), in float32 or
bfloat16 (``--dtype``; a comma list, ``float32,bfloat16``, runs both into one table with a
dtype column; in bfloat16 the logits themselves are bfloat16, for ``F.cross_entropy`` alike).
Times are medians over interleaved rounds (each method timed in turn, round after round, so
that load on a shared machine hits all alike); ratios are against ``F.cross_entropy`` in the
same round. Each method is timed over as many calls as fit in ``--budget`` seconds (from its
own warm-up call); on a GPU each timed block ends with ``torch.cuda.synchronize()``, so the
eager time is the wall time of a call, Python and kernel launches included.

On a GPU, the graph columns time the same forward + backward captured once in a CUDA graph
(``torch.cuda.CUDAGraph``, after a warm-up on a side stream) and replayed, with CUDA events:
the device's time without Python or launch overhead, against ``F.cross_entropy``'s graph. A
method that cannot be captured is reported with its error and an empty cell.

The compiled columns time ``torch.compile(loss, fullgraph=True)`` (inductor) of each method,
forward + backward, against compiled ``F.cross_entropy``: on by default on the CPU, off on a
GPU unless ``--compile`` (compilation is long where device time is short).

Peak memory, on the CPU, is measured in a fresh process per method and size: the rise of the
peak resident set size over a forward+backward, beyond the logits themselves (glibc is told to
give large blocks back to the system, so that the resident set follows what is live). On a GPU
it is the allocator's peak (``torch.cuda.max_memory_allocated``) over a forward+backward above
what was allocated before it (the logits and targets), in the same process.

``--kernels off|on|both`` sets ``SPHERICAL_LOSSES_KERNELS`` (``0`` disables the dense engine's
Triton kernels; ``on`` leaves the library's default): ``both`` reports every member twice, the
second time with the suffix ``[ops]`` and the variable set to ``0`` around its calls (the
library reads it at call time).

    python benchmarks/bench_losses.py                  # the full table
    python benchmarks/bench_losses.py --quick          # small sizes, a few seconds
    python benchmarks/bench_losses.py --no-compile     # without the compiled columns
    python benchmarks/bench_losses.py --device cuda --dtype float32,bfloat16   # the GPU table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import spherical_losses as sl

SIZES = [(4096, 10), (4096, 1000), (2048, 10000), (256, 100000)]
QUICK = [(512, 10), (512, 1000)]
# Every registered member (log_softmax is F.cross_entropy behind the library's checks), and
# the bound at a fixed ξ, which skips the search for the optimal one.
MEMBERS = [*sl.member_names(), "softmax_bound(xi=1)"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The defaults per device: (rounds, seconds per method per round).
DEFAULT_TIMING = {"cpu": (7, 0.3), "cuda": (5, 0.05)}

KERNELS_ENV = "SPHERICAL_LOSSES_KERNELS"
OPS = " [ops]"  # the method with the dense engine's kernels disabled (KERNELS_ENV=0)
COMPILED = " [compiled]"


def make_loss(method: str) -> Callable[..., torch.Tensor]:
    method = method.removesuffix(OPS)
    if method == "cross_entropy":
        return F.cross_entropy
    name, _, opts = method.partition("(")
    options = dict(kv.split("=") for kv in opts.rstrip(")").split(",") if kv)
    return sl.get_loss(name, **{k: float(v) for k, v in options.items()})


@contextlib.contextmanager
def kernels_off(off: bool) -> Iterator[None]:
    """``SPHERICAL_LOSSES_KERNELS=0`` for the duration (the library reads it at call time)."""
    if not off:
        yield
        return
    old = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = old


def kernels_note() -> str:
    """Whether the library honours ``SPHERICAL_LOSSES_KERNELS=0`` at call time."""
    try:
        from spherical_losses import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return (
            "spherical_losses._kernels does not exist in this tree: no kernels to disable, "
            "the [ops] rows run the same code as the others"
        )
    try:
        with kernels_off(True):
            off = _kernels.enabled()
    except Exception as e:  # (an interface other than the one this script expects)
        return f"spherical_losses._kernels.enabled() failed ({type(e).__name__}: {e})"
    if off:
        return f"{KERNELS_ENV}=0 did not disable spherical_losses._kernels (enabled() is True)"
    return f"[ops]: {KERNELS_ENV}=0 around the call (spherical_losses._kernels.enabled() False)"


def data(
    n: int, c: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return x, torch.randint(0, c, (n,), generator=g).to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def capture(step: Callable[[], None], x: torch.Tensor, ops: bool) -> torch.cuda.CUDAGraph:
    """``step`` (a forward + backward to ``x``) captured in a CUDA graph, after a warm-up on
    a side stream, as the PyTorch documentation does for a whole network. The graph writes
    ``x``'s gradient afresh (into its own memory pool), as an eager step with ``x.grad`` None.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), kernels_off(ops):
        for _ in range(3):
            step()
            x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with kernels_off(ops), torch.cuda.graph(g):
        step()
    torch.cuda.synchronize()
    return g


def replay_time(g: torch.cuda.CUDAGraph, number: int) -> float:
    """Seconds per replay of ``g``, over ``number`` replays, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(number):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def time_methods(
    n: int,
    c: int,
    methods: list[str],
    rounds: int,
    budget: float,
    compiled: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    graph: bool = False,
) -> tuple[dict, dict, dict]:
    """``({method: {"ms", "ratio"}}, {method: {"ms", "ratio"} or {"error"}}, {method: MiB})``:
    eager (and ``method + COMPILED`` with ``compiled``), CUDA-graph replay (with ``graph``),
    and, on a GPU, the allocator's peak rise over a forward+backward.
    """
    x, t = data(n, c, dtype, device)
    fns = {m: make_loss(m) for m in methods}
    if compiled:
        torch._dynamo.reset()
        for m in methods:
            fns[m + COMPILED] = torch.compile(fns[m], fullgraph=True, dynamic=False)

    def once(m: str) -> None:
        with kernels_off(OPS in m):
            fns[m](x, t).backward()
        x.grad = None

    def timed(m: str, number: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(number):
            once(m)
        synchronize(device)
        return (time.perf_counter() - start) / number

    number = {}
    for m in fns:  # warm-up (and compilation), then the number of calls per timing
        once(m)
        number[m] = max(1, int(budget / max(timed(m, 1), 1e-6)))

    memory = {}
    if device == "cuda":
        for m in methods:
            synchronize(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with kernels_off(OPS in m):
                fns[m](x, t).backward()
            synchronize(device)
            memory[m] = (torch.cuda.max_memory_allocated() - before) / 2**20
            x.grad = None

    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    graph_number: dict[str, int] = {}
    graph_result: dict[str, dict] = {}
    if graph:
        for m in methods:
            try:
                graphs[m] = capture(lambda m=m: fns[m](x, t).backward(), x, OPS in m)
            except Exception as e:  # a method that cannot be captured: an empty cell
                lines = str(e).strip().splitlines()
                msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
                print(f"{n} × {c} {m}: CUDA graph capture failed: {msg}", flush=True)
                graph_result[m] = {"error": msg}
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
            x.grad = None  # (the graph's own gradient lives on in its private pool)
        if "cross_entropy" not in graphs:  # no ratios without it
            graphs.clear()
        for m, g in graphs.items():
            replay_time(g, 1)
            graph_number[m] = max(1, int(budget / max(replay_time(g, 1), 1e-7)))

    times: dict[str, list[float]] = {m: [] for m in fns}
    ratios: dict[str, list[float]] = {m: [] for m in fns}
    gtimes: dict[str, list[float]] = {m: [] for m in graphs}
    gratios: dict[str, list[float]] = {m: [] for m in graphs}
    for _ in range(rounds):
        this_round, this_graph = {}, {}
        for m in fns:
            this_round[m] = timed(m, number[m])
            times[m].append(this_round[m])
            if m in graphs:
                this_graph[m] = replay_time(graphs[m], graph_number[m])
                gtimes[m].append(this_graph[m])
        for m in fns:
            base = "cross_entropy" + (COMPILED if m.endswith(COMPILED) else "")
            ratios[m].append(this_round[m] / this_round[base])
        for m in graphs:
            gratios[m].append(this_graph[m] / this_graph["cross_entropy"])
    graphs.clear()
    eager = {
        m: {"ms": 1e3 * statistics.median(times[m]), "ratio": statistics.median(ratios[m])}
        for m in fns
    }
    for m in gtimes:
        graph_result[m] = {
            "ms": 1e3 * statistics.median(gtimes[m]),
            "ratio": statistics.median(gratios[m]),
        }
    return eager, graph_result, memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_probe(method: str, n: int, c: int, dtype: str = "float32") -> None:
    """Run in a fresh process: prints the peak-RSS rise (bytes) over one forward+backward."""
    x, t = data(n, c, DTYPES[dtype])
    fn = make_loss(method)
    fn(x, t).backward()  # the first call also sets up autograd and the thread pool
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    fn(x, t).backward()
    print(json.dumps({"rise": (_status_kib("VmHWM") - before) * 1024}))


def peak_memory(method: str, n: int, c: int, dtype: str = "float32") -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if OPS in method:
        env[KERNELS_ENV] = "0"
    out = subprocess.run(
        [sys.executable, __file__, "--probe", method, str(n), str(c), dtype],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["rise"] / 2**20


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), Python {platform.python_version()}"
        )
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main() -> None:
    began = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sizes", nargs="+", metavar="NxC", help="the sizes to run, e.g. 8x5 (a smoke run)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", default="float32", help="float32, bfloat16, or both: float32,bfloat16"
    )
    p.add_argument("--rounds", type=int, help="default: 7 on the CPU, 5 on a GPU")
    p.add_argument(
        "--budget", type=float, help="seconds per method per round (default: 0.3 CPU, 0.05 GPU)"
    )
    p.add_argument("--no-memory", action="store_true")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument(
        "--no-compile", action="store_true", help="leave out the compiled columns"
    )
    compile_group.add_argument(
        "--compile", action="store_true", help="the compiled columns (default on the CPU only)"
    )
    p.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph columns")
    p.add_argument(
        "--kernels",
        choices=["on", "off", "both"],
        help=f"{KERNELS_ENV}: on (the library's default), off (0), both (members twice, "
        "the second as '[ops]' with the kernels off); default: the environment as it is",
    )
    p.add_argument(
        "--out", help="default: benchmarks/results/losses_cpu.md, or losses_gpu.md on a GPU"
    )
    p.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        peak_memory_probe(args.probe[0], int(args.probe[1]), int(args.probe[2]), args.probe[3])
        return
    dtypes = args.dtype.split(",")
    for dt in dtypes:
        if dt not in DTYPES:
            p.error(f"--dtype: unknown {dt!r}; expected {', '.join(DTYPES)} or a comma list")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"bench_losses.py: --device cuda, but no CUDA device is available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    if args.kernels == "off":
        os.environ[KERNELS_ENV] = "0"  # before the library's first call
    elif args.kernels == "on":
        os.environ.pop(KERNELS_ENV, None)
    cuda = args.device == "cuda"
    rounds, budget = DEFAULT_TIMING[args.device]
    rounds = args.rounds if args.rounds is not None else rounds
    budget = args.budget if args.budget is not None else budget
    compiled = args.compile or (not cuda and not args.no_compile)
    graph = cuda and not args.no_graph
    out = Path(args.out or f"benchmarks/results/losses_{'gpu' if cuda else 'cpu'}.md")
    sizes = QUICK if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    methods = ["cross_entropy", *MEMBERS]
    if args.kernels == "both":
        methods += [m + OPS for m in MEMBERS]
    command = " ".join(["python benchmarks/bench_losses.py", *map(shlex.quote, sys.argv[1:])])
    dtype_col = len(dtypes) > 1
    columns = ["N × C", *(["dtype"] if dtype_col else []), "method"]
    columns += ["fwd+bwd (ms)", "time / cross_entropy"]
    if compiled or not cuda:  # (the CPU table keeps its columns, "—" when not compiled)
        columns += ["compiled (ms)", "compiled / cross_entropy compiled"]
    if graph:
        columns += ["graph (ms)", "graph / cross_entropy graph"]
    columns += ["peak memory (MiB)", "memory / cross_entropy"]
    lines = [f"Machine: {machine(args.device)}", f"Command: `{command}`"]
    if not dtype_col and dtypes != ["float32"]:
        lines.append(f"dtype: {dtypes[0]} logits")
    if cuda:
        lines.append(
            f"Timing: median of {rounds} rounds of {budget} s per method; eager = wall time "
            "(synchronized), graph = CUDA-graph replay (CUDA events)"
        )
    if args.kernels == "both":
        lines.append(kernels_note())
    elif args.kernels:
        lines.append(f"{KERNELS_ENV}: {os.environ.get(KERNELS_ENV, 'unset (library default)')}")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    failed: list[str] = []
    for dt in dtypes:
        for n, c in sizes:
            result, graph_result, mem = time_methods(
                n, c, methods, rounds, budget, compiled, args.device, DTYPES[dt], graph
            )
            if not cuda and not args.no_memory:
                mem = {m: peak_memory(m, n, c, dt) for m in methods}
            elif args.no_memory:
                mem = {}
            for m in methods:
                r = result[m]
                cells = [f"{n} × {c}", *([dt] if dtype_col else []), m]
                cells += [f"{r['ms']:.3f}", f"{r['ratio']:.2f}"]
                if compiled or not cuda:
                    rc = result.get(m + COMPILED)
                    cells += [f"{rc['ms']:.3f}", f"{rc['ratio']:.2f}"] if rc else ["—", "—"]
                if graph:
                    rg = graph_result.get(m, {})
                    cells += [f"{rg['ms']:.4f}", f"{rg['ratio']:.2f}"] if "ms" in rg else ["", ""]
                if mem:
                    base = mem["cross_entropy"]
                    rel = f"{mem[m] / base:.2f}" if base > 1 else "n/a (below resolution)"
                    cells += [f"{mem[m]:.1f}", rel]
                else:
                    cells += ["—", "—"]
                lines.append("| " + " | ".join(cells) + " |")
                if "error" in graph_result.get(m, {}):
                    failed.append(f"{n} × {c}, {dt}, {m}: {graph_result[m]['error']}")
            print("\n".join(lines[-len(methods) :]), flush=True)
    if failed:
        lines += ["", "CUDA graph capture failed (empty graph cells):", ""]
        lines += [f"- {f}" for f in failed]
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"\n{table}\nwritten to {out}; {time.perf_counter() - began:.1f} s in all")


if __name__ == "__main__":
    main()
