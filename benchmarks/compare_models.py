"""Benchmark: comparing two models layer by layer, against torch_cka, pytorch-cka and the floor.

ResNet-18-like vs ResNet-34-like (CIFAR size: 32x32 inputs, width 64, random init, BatchNorm
statistics from a few train-mode batches so activations look trained), 1024 examples in batches of
128, for two layer sets:

  (a) blocks: the stem, every residual block, the classifier (10 vs 18 layers);
  (b) leaves: every leaf module (59 vs 107 layers).

Per method: time (median over ``--repeats`` rounds that run the methods in turn, each run in a fresh
process after a warm-up batch, so load drift hits all alike), peak memory above the
process's memory once models and data are loaded (CPU: peak RSS; CUDA: peak allocated), and the
maximum deviation of its matrix from a float64 computation of the same estimator (unbiased minibatch
CKA, Nguyen et al. 2021) on the same features. Methods:

  floor        the two models' forward passes with hooks on the same layers that store nothing
  cka          this library: ``CKA(m1, m2, ...).compare(loader)``
  torch_cka    torch_cka 0.21 (installed in this venv: pip install --no-deps torch-cka==0.21)
  pytorch-cka  pytorch-cka (PyPI), whose import name is also ``cka``: it runs in its own venv,
               ``--pcka-python`` (default /tmp/pcka-venv/bin/python; created on first use with
               ``python -m venv /tmp/pcka-venv && /tmp/pcka-venv/bin/pip install torch==2.13.0 pytorch-cka``)

Each (method, layer set) runs in a fresh subprocess so peak memory is its own. torch_cka recomputes
model 2's Grams for every model-1 layer, so on the leaf set it is timed on ``--slow-batches``
batches and its time scaled to all examples (marked ``*``).

Run: ``python benchmarks/compare_models.py`` (CPU, ~10 min on 2 cores) or
``python benchmarks/compare_models.py --device cuda`` (torchvision ResNet-18/34 at 224x224 when
torchvision is installed, else the CIFAR models on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PCKA_VENV = Path("/tmp/pcka-venv")
N_EXAMPLES, BATCH = 1024, 128


# --------------------------------------------------------------------------------------------
# Models (plain torch; modules defined in forward order, each leaf runs once per forward)
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out else None
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + (self.downsample(x) if self.downsample is not None else x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, count in enumerate(blocks):
            c_out = width * 2**i
            stages.append(nn.Sequential(*[Block(c_in if k == 0 else c_out, c_out, 2 if (i and k == 0) else 1) for k in range(count)]))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def layer_sets(model: nn.Module) -> dict[str, list[str]]:
    names = [n for n, _ in model.named_modules()]
    blocks = ["stem"] + [n for n in names if n.count(".") == 1 and n.startswith("layer")] + ["fc"]
    if "stem" not in names:  # torchvision: conv1/bn1/relu/maxpool stem
        blocks = ["relu"] + blocks[1:]
    leaves = [n for n, m in model.named_modules() if n and next(m.children(), None) is None]
    return {"blocks": blocks, "leaves": leaves}


def build(device: str, workdir: Path, examples: int = N_EXAMPLES, models: str = "auto", batch: int = BATCH) -> str:
    """Models with BatchNorm statistics from train-mode batches, and the data, saved for the workers.
    ``models``: "torchvision" (ResNet-18/34 at 224 x 224), "cifar" (the models above at 32 x 32) or
    "auto" (torchvision on CUDA when it imports, else cifar). Returns the choice made."""
    torch.manual_seed(0)
    size = 32
    use_torchvision = models == "torchvision" or (models == "auto" and device == "cuda")
    try:
        if not use_torchvision:
            raise ImportError
        import torchvision

        m1, m2, size = torchvision.models.resnet18(), torchvision.models.resnet34(), 224
        chosen = "torchvision ResNet-18 vs ResNet-34, 224 x 224"
    except ImportError:
        if models == "torchvision":
            raise
        m1, m2 = CifarResNet((2, 2, 2, 2)), CifarResNet((3, 4, 6, 3))
        chosen = "ResNet-18-like vs ResNet-34-like, 32 x 32"

    x = torch.randn(examples, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (examples,), generator=torch.Generator().manual_seed(2))
    for m in (m1, m2):
        m.to(device).train()
        with torch.no_grad():
            for chunk in x[:4 * batch].split(batch):
                m(chunk.to(device))
        m.eval().cpu()
    torch.save({"m1": m1, "m2": m2, "x": x, "y": y}, workdir / "setup.pt")
    return chosen


# --------------------------------------------------------------------------------------------
# Workers: one method on one layer set, in a fresh process
# --------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    setup = torch.load(Path(args.workdir) / "setup.pt", weights_only=False)
    device = torch.device(args.device)
    m1, m2 = setup["m1"].to(device).eval(), setup["m2"].to(device).eval()
    layers1, layers2 = layer_sets(m1)[args.set], layer_sets(m2)[args.set]
    n_batches, batch = args.batches, args.batch
    # TF32 off unless a method asks for it (cka's gram_precision="tf32" switches it on around its own
    # products only): the floor and every method run the models in full float32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dataset = torch.utils.data.TensorDataset(setup["x"][: n_batches * batch], setup["y"][: n_batches * batch])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    warmup = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(setup["x"][:batch], setup["y"][:batch]), batch_size=batch)
    run = METHODS[args.worker]
    if args.worker.startswith("cka"):  # imports outside the timed region
        sys.path.insert(0, str(REPO))
        import cka.frontends.torch  # noqa: F401
    elif args.worker == "pytorch-cka":
        import cka  # noqa: F401
    elif args.worker == "torch_cka":
        import torch_cka  # noqa: F401

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():  # warm-up: kernel selection, allocator, oneDNN primitives
        for x, _ in warmup:
            m1(x.to(device)), m2(x.to(device))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_mb()
    times, matrix = [], None
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        matrix = run(m1, m2, layers1, layers2, loader, device)
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else peak_rss_mb() - base_rss
    if matrix is not None:
        torch.save(torch.as_tensor(matrix).double().cpu(), Path(args.workdir) / f"{args.worker}-{args.set}.pt")
    print(json.dumps({"time": statistics.median(times), "times": times, "peak_mb": peak, "batches": n_batches}))


def run_floor(m1, m2, layers1, layers2, loader, device):
    handles = []
    for model, layers in ((m1, layers1), (m2, layers2)):
        modules = dict(model.named_modules())
        handles += [modules[n].register_forward_hook(lambda m, a, o: None) for n in layers]
    try:
        with torch.inference_mode():
            for x, _ in loader:
                x = x.to(device, non_blocking=True)
                m1(x), m2(x)
    finally:
        for h in handles:
            h.remove()
    return None


def run_cka(m1, m2, layers1, layers2, loader, device, gram_precision="highest"):
    from cka import CKA

    comparison = CKA(m1, m2, model1_layers=layers1, model2_layers=layers2, device=device, progress=False,
                     gram_precision=gram_precision)
    return comparison.compare(loader).matrix


def run_cka_tf32(m1, m2, layers1, layers2, loader, device):
    return run_cka(m1, m2, layers1, layers2, loader, device, gram_precision="tf32")


def run_cka_bf16(m1, m2, layers1, layers2, loader, device):
    return run_cka(m1, m2, layers1, layers2, loader, device, gram_precision="bf16")


def run_torch_cka(m1, m2, layers1, layers2, loader, device):
    import warnings

    from torch_cka import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = CKA(m1, m2, model1_layers=layers1, model2_layers=layers2, device=str(device))
        run.compare(loader)
    for model in (m1, m2):  # torch_cka never removes its hooks
        for module in model.modules():
            module._forward_hooks.clear()
    return run.export()["CKA"]


def run_pytorch_cka(m1, m2, layers1, layers2, loader, device):
    from cka import compute_cka  # pytorch-cka, in its own venv

    return compute_cka(m1, m2, loader, layers=layers1, model2_layers=layers2, device=device, progress=False)[0]


def run_reference(m1, m2, layers1, layers2, loader, device):
    """Unbiased minibatch CKA with float64 everything (features cast to float64 in the hook), written
    out here independently of the library: Song et al.'s HSIC_1 per batch, sums over batches."""
    sums = None
    for x, _ in loader:
        grams = []  # (L, n, n) float64 per model
        for model, layers in ((m1, layers1), (m2, layers2)):
            modules, store = dict(model.named_modules()), {}

            def hook(module, args, out, store=store):
                if module not in store:
                    f = out.detach().flatten(1).double()
                    f = f - f.mean(0)
                    store[module] = f @ f.T

            handles = [modules[n].register_forward_hook(hook) for n in layers]
            with torch.inference_mode():
                model(x.to(device))
            for h in handles:
                h.remove()
            grams.append(torch.stack([store[modules[n]] for n in layers]))
        kx, ky = (g.clone() for g in grams)
        n = kx.shape[-1]
        for k in (kx, ky):
            k.diagonal(dim1=-2, dim2=-1).zero_()

        def hsic(a, b):  # all pairs (La, Lb)
            trace = a.flatten(1) @ b.flatten(1).T
            ra, rb = a.sum(-1), b.sum(-1)
            sa, sb = ra.sum(-1), rb.sum(-1)
            return (trace + torch.outer(sa, sb) / ((n - 1) * (n - 2)) - 2 * ra @ rb.T / (n - 2)) / (n * (n - 3))

        terms = (hsic(kx, ky), torch.diagonal(hsic(kx, kx)), torch.diagonal(hsic(ky, ky)))
        sums = terms if sums is None else tuple(s + t for s, t in zip(sums, terms))
    return sums[0] / torch.sqrt(torch.outer(sums[1], sums[2]))


METHODS = {
    "floor": run_floor, "cka": run_cka, "cka-tf32": run_cka_tf32, "cka-bf16": run_cka_bf16,
    "torch_cka": run_torch_cka, "pytorch-cka": run_pytorch_cka,
    "reference": run_reference,
}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def ensure_pcka_venv(python: Path, wheel: str | None = None) -> bool:
    """A venv for pytorch-cka (its import name is also ``cka``). With ``wheel`` (no network: the GPU
    script), the venv sees this interpreter's packages (torch, numpy, matplotlib, tqdm) and gets the
    wheel alone; otherwise it installs the CPU torch pin and pytorch-cka from the index."""
    if python.exists():
        return True
    if python != PCKA_VENV / "bin" / "python":
        return False
    print(f"creating {PCKA_VENV} for pytorch-cka ...", file=sys.stderr)
    if wheel:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(PCKA_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel], check=True)
        return True
    subprocess.run([sys.executable, "-m", "venv", str(PCKA_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "pytorch-cka"], check=True)
    return True


def launch(python: str, method: str, layer_set: str, args: argparse.Namespace, batches: int, repeats: int) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", method, "--set", layer_set, "--workdir", args.workdir,
               "--device", args.device, "--batches", str(batches), "--repeats", str(repeats), "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=args.timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=N_EXAMPLES, help="a multiple of --batch; times scale linearly")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--models", default="auto", choices=("auto", "cifar", "torchvision"))
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--markdown", help="also write the table to this path")
    parser.add_argument("--sets", default="blocks,leaves")
    parser.add_argument("--methods", default="floor,cka,pytorch-cka,torch_cka")
    parser.add_argument("--slow-batches", type=int, default=1, help="batches for torch_cka on the leaf set")
    parser.add_argument("--pcka-python", default=str(PCKA_VENV / "bin" / "python"))
    parser.add_argument("--pcka-wheel", help="install pytorch-cka from this wheel file (no network)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--set", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=N_EXAMPLES // BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        args.model_pair = build(args.device, Path(workdir), args.examples, args.models, args.batch)
        full = args.examples // args.batch
        methods = args.methods.split(",")
        pcka = "pytorch-cka" in methods and ensure_pcka_venv(Path(args.pcka_python), args.pcka_wheel)
        rows = []
        for layer_set in args.sets.split(","):
            launch(sys.executable, "reference", layer_set, args, full, 1)
            reference = torch.load(Path(workdir) / f"reference-{layer_set}.pt")
            results: dict[str, dict] = {}
            # Round-robin over methods, one run per process each time, so that a drift in machine load
            # hits every method alike; the time is the median over rounds, the peak the maximum.
            for round_ in range(args.repeats):
                for method in methods:
                    if method == "pytorch-cka" and not pcka:
                        results[method] = {"error": f"no {args.pcka_python}"}
                        continue
                    slow = method == "torch_cka" and layer_set == "leaves"
                    if slow and round_ > 0:
                        continue  # torch_cka on every leaf takes minutes per batch: one run
                    python = args.pcka_python if method == "pytorch-cka" else sys.executable
                    batches = args.slow_batches if slow else full
                    r = launch(python, method, layer_set, args, batches, 1)
                    print(f"{layer_set:7s} {method:12s} round {round_} {r}", file=sys.stderr, flush=True)
                    if "error" in r:
                        results[method] = r
                        continue
                    entry = results.setdefault(method, {"times": [], "peak_mb": 0.0, "scaled": batches != full})
                    entry["times"].append(r["time"] * full / batches)
                    entry["peak_mb"] = max(entry["peak_mb"], r["peak_mb"])
                    if round_ > 0:
                        continue
                    path = Path(workdir) / f"{method}-{layer_set}.pt"
                    if path.exists():
                        matrix = torch.load(path)
                        if batches != full:  # compare with the reference on the same batches
                            launch(sys.executable, "reference", layer_set, args, batches, 1)
                            ref = torch.load(Path(workdir) / f"reference-{layer_set}.pt")
                        else:
                            ref = reference
                        entry["deviation"] = float((matrix - ref).abs().nan_to_num(float("inf")).max())
            for entry in results.values():
                if "times" in entry:
                    entry["time"] = statistics.median(entry["times"])
            rows.append((layer_set, reference.shape, results))
        print_table(rows, args)


def print_table(rows, args) -> None:
    lines = table_lines(rows, args)
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    if args.json:
        payload = {
            "device": args.device, "models": args.model_pair, "examples": args.examples, "batch": args.batch,
            "repeats": args.repeats, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "rows": [{"layers": layer_set, "shape": list(shape), "results": results} for layer_set, shape, results in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))


def table_lines(rows, args) -> list[str]:
    memory = "peak GPU memory beyond the floor's (MB)" if args.device.startswith("cuda") else "peak memory (MB)"
    lines = [f"\n{args.device}, {args.model_pair}, {torch.get_num_threads()} threads, {args.examples} examples, "
             f"batch {args.batch}, median of {args.repeats}\n",
             f"| layers | method | time (s) | x floor | {memory} | beyond the floor (MB) | max deviation from float64 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for layer_set, shape, results in rows:
        floor = results.get("floor", {}).get("time")
        floor_peak = results.get("floor", {}).get("peak_mb")
        for method, r in results.items():
            label = f"{layer_set} ({shape[0]} x {shape[1]})"
            if "error" in r:
                lines.append(f"| {label} | {method} | failed: {r['error']} | | | | |")
                continue
            star = "*" if r.get("scaled") else ""
            ratio = f"{r['time'] / floor:.2f}" if floor else ""
            deviation = f"{r['deviation']:.1e}" if "deviation" in r else "-"
            beyond = f"{r['peak_mb'] - floor_peak:.0f}" if floor_peak is not None else ""
            lines.append(f"| {label} | {method} | {r['time']:.1f}{star} | {ratio}{star} | {r['peak_mb']:.0f} | {beyond} | {deviation} |")
    return lines


if __name__ == "__main__":
    main()
