"""Benchmark: two GPT-2-small-shaped language models, every real token an example.

Two random GPT-2 models built from a config (width 768, 12 heads, GPT-2 small's vocabulary and
block shape; ``--blocks`` blocks each, default 4 of GPT-2 small's 12 to fit a 2-core CPU: the
per-block cost is the same, so time over the floor does not depend on the count much), different
seeds. Data: ``--batches`` batches of 16 sequences of 128 random token ids, every token real (so
pytorch-cka, which drops the attention mask, sees the same tokens). Layers: the blocks
``h.0 ... h.{B-1}`` of both models.

Methods, each in a fresh process (peak memory is its own), round-robin over ``--repeats`` rounds:

  floor        the two models' forward passes with no-op hooks on the same blocks
  cka-all      this library, ``CKA(m1, m2, tokens="all")``: every real token an example,
               n = 2048 per batch (a 2048 x 2048 Gram per block)
  cka-mean     this library, ``tokens="mean"``: one example per sequence (masked mean), n = 16
  pytorch-cka  pytorch-cka (PyPI; import name also ``cka``, so in its own venv, created as
               ``benchmarks/compare_models.py`` does: ``ensure_pcka_venv``, plus transformers):
               its own handling of ``(batch, tokens, dim)`` outputs, each sequence's tokens
               flattened into one ``128 * 768`` feature vector, n = 16, the attention mask dropped

Reported: time (median over rounds), that time over the floor's, and peak memory during the run
above the memory before it, once models and data are loaded and a warm-up batch has run (CPU: the
peak-RSS counter reset before the run, the largest over rounds; CUDA: peak allocated). The three methods
estimate different quantities (tokens as examples; mean per sequence; flattened sequences), so
their values are not compared here; ``tests/test_transformers.py`` tests the token modes' values.

Run: ``python benchmarks/transformers_bench.py`` (~5 min on 2 CPU cores) or ``--device cuda --blocks 12``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_models import PCKA_VENV, ensure_pcka_venv, rss_mb

REPO = Path(__file__).resolve().parents[1]
BATCH, LENGTH, WIDTH, HEADS, VOCAB = 16, 128, 768, 12, 50257


def config(blocks: int):
    import transformers

    return transformers.GPT2Config(n_embd=WIDTH, n_head=HEADS, n_layer=blocks, n_positions=1024, vocab_size=VOCAB)


def build(workdir: Path, blocks: int, batches: int) -> None:
    """Both models' weights and the token ids, saved for the workers (which rebuild from the config)."""
    import transformers

    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.GPT2Model(config(blocks))
        torch.save(model.state_dict(), workdir / f"m{seed}.pt")
    ids = torch.randint(0, VOCAB, (batches * BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    torch.save(ids, workdir / "ids.pt")


def load(workdir: Path, blocks: int, device: torch.device):
    import transformers

    models = []
    for seed in (0, 1):
        model = transformers.GPT2Model(config(blocks))
        model.load_state_dict(torch.load(workdir / f"m{seed}.pt"))
        models.append(model.to(device).eval())
    ids = torch.load(workdir / "ids.pt")
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(BATCH)]
    # a DataLoader over ready batches (batch_size=None yields them as they are): what every method gets
    return models, torch.utils.data.DataLoader(batches, batch_size=None)


def run_floor(m1, m2, layers, batches, device):
    handles = [dict(m.named_modules())[n].register_forward_hook(lambda *a: None) for m in (m1, m2) for n in layers]
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                m1(**batch), m2(**batch)
    finally:
        for handle in handles:
            handle.remove()


def run_cka(m1, m2, layers, batches, device, tokens):
    from cka import CKA

    return (
        CKA(m1, m2, model1_layers=layers, model2_layers=layers, tokens=tokens, progress=False).compare(batches).matrix
    )


def run_pytorch_cka(m1, m2, layers, batches, device):
    from cka import compute_cka  # pytorch-cka, in its own venv

    return compute_cka(m1, m2, batches, layers=layers, model2_layers=layers, device=device, progress=False)[0]


METHODS = {
    "floor": run_floor,
    "cka-all": lambda *a: run_cka(*a, tokens="all"),
    "cka-mean": lambda *a: run_cka(*a, tokens="mean"),
    "pytorch-cka": run_pytorch_cka,
}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux: ``5 > /proc/self/clear_refs``),
    so that the peak covers the timed run only, not loading the models or the warm-up batch."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mb() -> float:
    """VmHWM (peak RSS) in MB, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.worker.startswith("cka"):  # imports outside the timed region
        sys.path.insert(0, str(REPO))
        import cka.frontends.torch
    elif args.worker == "pytorch-cka":
        import cka  # noqa: F401
    (m1, m2), batches = load(Path(args.workdir), args.blocks, device)
    layers = [f"h.{i}" for i in range(args.blocks)]
    with torch.inference_mode():  # warm-up: allocator, oneDNN primitives
        first = {k: v.to(device) for k, v in next(iter(batches)).items()}
        m1(**first), m2(**first)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_mb()
    if device.type != "cuda" and not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux")
    start = time.perf_counter()
    METHODS[args.worker](m1, m2, layers, batches, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        (torch.cuda.max_memory_allocated() - base) / 2**20
        if device.type == "cuda"
        else peak_rss_since_reset_mb() - base_rss
    )
    print(json.dumps({"time": elapsed, "peak_mb": peak}))


def ensure_transformers(python: Path) -> None:
    """The pytorch-cka venv needs transformers too (to build the same models)."""
    found = subprocess.run([str(python), "-c", "import transformers"], check=False, capture_output=True)
    if found.returncode != 0:
        import transformers

        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"transformers=={transformers.__version__}"], check=True
        )


def launch(python: str, method: str, args: argparse.Namespace) -> dict:
    command = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        "--workdir",
        args.workdir,
        "--device",
        args.device,
        "--blocks",
        str(args.blocks),
        "--batches",
        str(args.batches),
    ]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=args.timeout
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=4, help="GPT-2 blocks per model (GPT-2 small has 12)")
    parser.add_argument("--batches", type=int, default=4, help=f"batches of {BATCH} x {LENGTH} tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pcka-python", default=str(PCKA_VENV / "bin" / "python"))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    methods = args.methods.split(",")
    pcka = "pytorch-cka" in methods and ensure_pcka_venv(Path(args.pcka_python))
    if pcka:
        ensure_transformers(Path(args.pcka_python))
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        build(Path(workdir), args.blocks, args.batches)
        results: dict[str, dict] = {}
        for round_ in range(args.repeats):  # round-robin: drifting machine load hits every method alike
            for method in methods:
                if method == "pytorch-cka" and not pcka:
                    results[method] = {"error": f"no {args.pcka_python}"}
                    continue
                r = launch(args.pcka_python if method == "pytorch-cka" else sys.executable, method, args)
                print(f"{method:12s} round {round_} {r}", file=sys.stderr, flush=True)
                entry = results.setdefault(method, {"times": [], "peaks": []})
                if "error" in r:
                    entry["error"] = r["error"]
                    continue
                entry["times"].append(r["time"])
                entry["peaks"].append(r["peak_mb"])
    print_table(results, args)


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    tokens = args.batches * BATCH * LENGTH
    print(
        f"\n{args.device}, {torch.get_num_threads()} threads; two GPT-2-shaped models ({args.blocks} blocks, width "
        f"{WIDTH}, {HEADS} heads), {args.batches} batches of {BATCH} x {LENGTH} tokens ({tokens} tokens); "
        f"median of {args.repeats}\n"
    )
    print("| method | examples per batch | time (s) | x floor | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    examples = {
        "floor": "-",
        "cka-all": str(BATCH * LENGTH),
        "cka-mean": str(BATCH),
        "pytorch-cka": f"{BATCH} (flattened)",
    }
    floor = statistics.median(results["floor"]["times"]) if results.get("floor", {}).get("times") else None
    for method, r in results.items():
        if not r["times"]:
            print(f"| {method} | | failed: {r.get('error', '')} | | |")
            continue
        t = statistics.median(r["times"])
        ratio = f"{t / floor:.2f}" if floor else ""
        print(f"| {method} | {examples.get(method, '')} | {t:.1f} | {ratio} | {max(r['peaks']):.0f} |")


if __name__ == "__main__":
    main()
