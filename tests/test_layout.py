"""The tutorial's shape: the chapters stay small and plain, and "Read next" follows the README.

The chapters (model/attention, clip, unet, vae, ddim, sdxl, mapper) hold the math and the modules;
loading lives in model/checkpoint.py and speed paths in model/speed.py. These tests fail when a
chapter grows past the budget, when a speed or loading mechanism moves back into a chapter, or when
a "Read next" pointer and the README's reading order disagree."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ["attention", "clip", "unet", "vae", "ddim", "sdxl", "mapper"]
# lines, the seven chapters together, comments and PITFALLs included (1,600 until SDXL.generate became the one
# batched path every command calls: its batches and per-image pseudo-words took ten lines)
BUDGET = 1610


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_chapters_fit_the_budget():
    lines = {c: read(f"model/{c}.py").count("\n") for c in CHAPTERS}
    assert sum(lines.values()) <= BUDGET, f"chapters take {sum(lines.values())} lines (budget {BUDGET}): {lines}"


def test_chapters_hold_no_speed_or_loading_machinery():
    # Each of these belongs to model/speed.py or model/checkpoint.py, swapped in or called from outside.
    forbidden = ["torch.compile", "torch.cuda.CUDAGraph(", "torch.cuda.graph(", "autograd.Function", "safe_open", "load_file",
                 "huggingface", "HF_HOME", "from_diffusers", "torch.load"]
    for c in CHAPTERS:
        code = read(f"model/{c}.py")
        found = [w for w in forbidden if w in code]
        assert not found, f"model/{c}.py mentions {found}"


def reading_order():
    """The first file named by each item of the README's numbered reading order."""
    readme = read("README.md")
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. `([^`]+)`", section, flags=re.M)
    return [item.rstrip("/") + ("/world.py" if item.endswith("/") else "") for item in items]


def read_next(path):
    doc = ast.get_docstring(ast.parse(read(path))) or ""
    match = re.search(r"Read next: ([\w/]+\.py)", doc)
    return match and match.group(1)


def test_read_next_follows_the_readme():
    order = reading_order()
    assert order[:7] == [f"model/{c}.py" for c in CHAPTERS], order
    for here, there in zip(order, order[1:]):
        assert os.path.isfile(os.path.join(ROOT, here)), here
        assert read_next(here) == there, f"{here} says read next {read_next(here)}, the README says {there}"


def test_no_comment_cites_an_issue_number():
    # Readers cannot see the project's issue tracker: a comment must say the thing, not point at it.
    for folder in ("model", "."):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                text = read(os.path.join(folder, name))
                assert not re.search(r"\bissue\s*#?\d+", text, flags=re.I), f"{folder}/{name} cites an issue number"
