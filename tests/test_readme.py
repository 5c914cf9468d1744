"""Every code block of README.md runs here, so the README cannot drift from the code.

Each ```python block runs in a fresh interpreter in a temporary folder. Blocks that name things a
reader brings (``model1``, ``dataloader1``, ``model.onnx``) get a small *prelude* defining them; blocks
that need what the test machine lacks (CUDA, ``torchrun`` on 8 GPUs, ImageNet) run in a *reduced*
form: listed text replacements (``"nccl"`` -> ``"gloo"``), each of which must still match the block,
so a README edit that removes it is noticed. A block holding ``# readme-test: skip (reason)`` is
skipped with that reason. ```bash blocks: ``make`` targets must exist, and every ``cka`` command
line must use only options that ``cka <command> --help`` lists (and runs, when it names no
placeholder). A block that none of this covers fails, asking for a prelude.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCRIPT = shutil.which("cka", path=str(Path(sys.executable).parent)) or shutil.which("cka")
SKIP_MARKER = re.compile(r"#\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)")


def code_blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in README.md."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if current is None and line.strip() == f"```{language}":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@dataclass
class Recipe:
    """How one README block runs here: what it needs defined, how it is reduced, how it is checked."""

    prelude: str = ""
    replacements: list[tuple[str, str]] = field(default_factory=list)
    epilogue: str = ""
    env: dict[str, str] = field(default_factory=dict)
    torchrun: int = 0  # run under torchrun with this many processes (gloo, CPU)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


TORCH_MODELS = """
import torch
from collections import OrderedDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
    def forward(self, x):
        return self.relu(self.conv(x) + x)

def resnet_like(depth, seed):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1),
        layer1=nn.Sequential(*[Block(8) for _ in range(depth)]),
        layer2=nn.Sequential(*[Block(8) for _ in range(depth)]),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 10),
    )).eval()
"""

JAX_BATCHES = """
import numpy as np, jax, jax.numpy as jnp
from cka.frontends import jax as ckj
rng = np.random.default_rng(0)
def layers(n):
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = x @ rng.normal(size=(16, 8)).astype(np.float32) + 0.5 * rng.normal(size=(n, 8)).astype(np.float32)
    return [jnp.asarray(x), jnp.asarray(np.maximum(x, 0))], [jnp.asarray(y), jnp.asarray(np.tanh(y))]
pairs = [layers(32) for _ in range(4)]
batches = [(*xs, *ys) for xs, ys in pairs]
x1_last, x2_last = layers(20)[0]
list_of_batches_x = [xs for xs, _ in pairs]
stacked_y, _ = ckj.stack_batches([ys for _, ys in pairs])
"""

#: Keyed by a line that identifies the block (it must occur in exactly one block).
RECIPES: dict[str, Recipe] = {
    "from cka import CKA            # the torch_cka API": Recipe(
        prelude=TORCH_MODELS + """
model1, model2 = resnet_like(1, 0), resnet_like(2, 1)
dataloader1 = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.zeros(64)), batch_size=32)
""",
        replacements=[] if _cuda() else [('device="cuda")', 'device="cpu") ')],
        epilogue="""
assert result.matrix.shape == (2, 4) and Path("r18_vs_r34.png").stat().st_size > 1000
assert CKAResult.load("r18_vs_r34.json") == result
""",
    ),
    "from cka.frontends.onnx import OnnxModel": Recipe(
        prelude=TORCH_MODELS + """
torch_model = resnet_like(1, 0)
torch.onnx.export(torch_model, (torch.randn(2, 3, 16, 16),), "model.onnx", dynamo=False, input_names=["x"],
                  dynamic_axes={"x": {0: "batch"}})
loader = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16)), batch_size=32)
""",
        epilogue="""
import numpy as np
assert np.allclose(np.diag(result.matrix), 1.0, atol=1e-4), result.matrix
""",
    ),
    "state = ckj.init(2, 2)": Recipe(prelude=JAX_BATCHES, epilogue="assert matrix.shape == (2, 2)\n"),
    "mesh = jax.make_mesh(": Recipe(
        prelude=JAX_BATCHES + "stacked_x, masks = ckj.stack_batches(list_of_batches_x)\n",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        epilogue="""
import numpy as np
assert jax.device_count() == 2
one = ckj.scan_update(ckj.init(2, 2), *jax.device_get((stacked_x, stacked_y, masks)))
assert np.allclose(ckj.finalize(state), ckj.finalize(one), atol=1e-6)
""",
    ),
    "flax_side = ckj.JaxModel.from_linen(": Recipe(
        prelude="""
import jax, jax.numpy as jnp, torch
import flax.linen as linen
from collections import OrderedDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from cka.frontends import jax as ckj

class CNN(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(8, (3, 3), name="conv1")(x))
        x = linen.relu(linen.Conv(8, (3, 3), name="conv2")(x))
        return linen.Dense(10, name="fc")(x.mean(axis=(1, 2)))

cnn = CNN()
variables = cnn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
torch.manual_seed(0)
torch_cnn = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(),
                                      conv2=nn.Conv2d(8, 8, 3, padding=1), relu2=nn.ReLU(),
                                      pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 10))).eval()
loader = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8)), batch_size=32)
""",
        epilogue="assert result.matrix.shape == (3, 3)\n",
    ),
    "# my_compare.py": Recipe(
        prelude=TORCH_MODELS + """
imagenet_val = TensorDataset(torch.randn(48, 3, 16, 16))
model1, model2 = resnet_like(1, 0), resnet_like(2, 1)
""",
        replacements=[
            ('dist.init_process_group("nccl")', 'dist.init_process_group("gloo")'),
            ("model1.cuda(), model2.cuda()", "model1, model2"),
            ("model1_layers=..., model2_layers=...", "model1_layers=None, model2_layers=None"),
            ("batch_size=256", "batch_size=8"),
        ],
        epilogue="""
assert result.matrix.shape == (2, 4) and result.n_examples == 48
dist.destroy_process_group()
""",
        torchrun=2,
    ),
}


def recipe_for(code: str) -> Recipe | None:
    matches = [key for key in RECIPES if key in code]
    assert len(matches) <= 1, f"README block matches several recipes: {matches}"
    return RECIPES[matches[0]] if matches else None


def test_every_recipe_matches_exactly_one_readme_block():
    blocks = [code for _, code in code_blocks("python")]
    for key in RECIPES:
        assert sum(key in code for code in blocks) == 1, f"no single README block holds {key!r}: update tests/test_readme.py"


PYTHON_BLOCKS = code_blocks("python")


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(tmp_path, line, code):
    skip = SKIP_MARKER.search(code)
    if skip:
        pytest.skip(skip.group("reason"))
    recipe = recipe_for(code) or Recipe()
    for old, new in recipe.replacements:
        assert old in code, f"README.md:{line} no longer holds {old!r}; update its reduced form in tests/test_readme.py"
        code = code.replace(old, new)
    source = "\n".join([
        "from pathlib import Path\nfrom cka.result import CKAResult",
        textwrap.dedent(recipe.prelude),
        f"# ---- README.md line {line} ----",
        code,
        "# ---- checks ----",
        textwrap.dedent(recipe.epilogue),
    ])
    script = tmp_path / "block.py"
    script.write_text(source)
    env = {**os.environ, "MPLBACKEND": "Agg", **recipe.env}
    env.pop("PYTHONWARNINGS", None)
    if recipe.torchrun:
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={recipe.torchrun}", str(script)]
    else:
        command = [sys.executable, str(script)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    hint = "" if recipe_for(code) or run.returncode == 0 or "NameError" not in run.stderr else (
        " (the block uses a name it does not define: give it a prelude in tests/test_readme.py)")
    assert run.returncode == 0, f"README.md:{line} failed{hint}:\n{run.stderr[-4000:]}"


# ------------------------------------------------------------------------------------------------
# bash blocks
# ------------------------------------------------------------------------------------------------

def _bash_commands() -> list[tuple[int, str]]:
    """Command lines of the bash blocks; an indented line continues the command above it."""
    commands: list[tuple[int, str]] = []
    for line, code in code_blocks("bash"):
        for offset, text in enumerate(code.splitlines()):
            if not text.strip() or text.strip().startswith("#"):
                continue
            if text[:1].isspace() and commands:
                commands[-1] = (commands[-1][0], f"{commands[-1][1]} {text.strip()}")
            else:
                commands.append((line + offset, text.strip()))
    return commands


BASH_LINES = _bash_commands()
#: Placeholders a command synopsis uses instead of values.
PLACEHOLDER = re.compile(r"\[|\]|\b[A-Z][A-Z0-9_]+\b|\.\.\.")


def _help(command: str) -> str:
    run = subprocess.run([SCRIPT, *command.split(), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("line,text", BASH_LINES, ids=[f"README.md:{line}" for line, _ in BASH_LINES])
def test_bash_line(tmp_path, line, text):
    command = text.split("#", 1)[0].strip()
    words = command.split()
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"README.md:{line}: the Makefile has no target {words[1]!r}"
        return
    if words[0] == "torchrun":
        script = words[-1]
        assert any(f"# {script}" in code for _, code in PYTHON_BLOCKS), f"README.md:{line}: no python block is {script}"
        return
    assert words[0] == "cka", f"README.md:{line}: a bash line this test does not know how to check: {text!r}"
    assert SCRIPT, "the cka console script is not installed (pip install -e .)"
    subcommand = words[1]
    known = _help(subcommand)
    for flag in re.findall(r"--[a-z][a-z0-9-]*", command):
        assert flag in known, f"README.md:{line}: `cka {subcommand}` has no option {flag}"
    if not PLACEHOLDER.search(" ".join(words[2:])):
        run = subprocess.run(words, capture_output=True, text=True, cwd=tmp_path, timeout=900)
        assert run.returncode == 0, run.stderr
