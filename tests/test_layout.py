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


def wc_l(path):
    return read(path).count("\n")


def test_the_readmes_line_counts_are_what_wc_counts():
    # "Reading order": items 1-14 (every file each names) and the toy world's files; "A short path": each part's
    # lines, whole files or a line range that must hold exactly the function it names, and their sum.
    readme = read("README.md")
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    stated = re.search(r"items 1-14 are ([\d,]+) lines, the toy\s+world's (\w+) files ([\d,]+) more", section)
    items = re.split(r"^\d+\. ", section, flags=re.M)[1:]
    files = [f for item in items[:14] for f in re.findall(r"`([\w/]+\.py)`", item)]
    toy = ["toyworld/" + f for f in re.findall(r"`(\w+\.py)`", items[14])]
    assert int(stated[1].replace(",", "")) == sum(wc_l(f) for f in files), files
    assert int(stated[3].replace(",", "")) == sum(wc_l(f) for f in toy), toy
    words = {"five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
    assert words[stated[2]] == len(toy)
    short = readme.split("## A short path", 1)[1].split("\n## ", 1)[0]
    total = 0
    for path, lines in re.findall(r"^\d+\. `([\w/]+\.py)`[^(\n]*\((\d+ lines|lines \d+-\d+)\)", short, flags=re.M):
        if lines.startswith("lines"):
            first, last = map(int, re.findall(r"\d+", lines))
            name = re.search(r"`\w+\.(\w+)`", short.split(path, 1)[1]).group(1)  # the function the range holds
            body = read(path).split("\n")[first - 1:last]
            assert body[0].lstrip().startswith(f"def {name}("), (path, first, body[0])
            assert re.match(r"\s+return ", body[-1]) and read(path).split("\n")[last] == "", body[-1]  # its last line
            total += last - first + 1
        else:
            assert int(lines.split()[0]) == wc_l(path), path
            total += wc_l(path)
    assert re.search(rf"without SDXL's internals: {total:,} lines", short), total
